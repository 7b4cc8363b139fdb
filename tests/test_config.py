"""ModelConfig: the released hyper-parameters, parameter counts (ours and HF's), params.json / config.json,
and the memory estimate."""

from __future__ import annotations

import json

import pytest
import torch

from codellama.config import RELEASED, ModelConfig
from codellama.errors import CodeLlamaError

# Exact counts: Llama 2 at 32000 pieces (6,738,415,616 / 13,015,864,320 / 68,976,648,192) plus 2 x 16 x dim
# for Code Llama's 16 added pieces (embedding and output rows); 34B keeps the 32000 vocabulary.
PARAM_COUNTS = {
    "CodeLlama-7b": 6_738_546_688,
    "CodeLlama-13b": 13_016_028_160,
    "CodeLlama-34b": 33_743_970_304,
    "CodeLlama-70b": 68_976_910_336,
}
PUBLISHED = {"CodeLlama-7b": 6.74e9, "CodeLlama-13b": 13.0e9, "CodeLlama-34b": 33.7e9, "CodeLlama-70b": 69.0e9}


@pytest.mark.parametrize("name", PARAM_COUNTS)
def test_released_parameter_counts(name):
    config = ModelConfig.from_name(name)
    assert config.num_params() == PARAM_COUNTS[name]
    assert config.num_params() == pytest.approx(PUBLISHED[name], rel=0.005)


@pytest.mark.parametrize("name", PARAM_COUNTS)
def test_hf_llama_config_built_from_ours_has_the_same_count(name):
    transformers = pytest.importorskip("transformers")
    config = ModelConfig.from_name(name)
    with torch.device("meta"):  # shapes only: no memory for 70B
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf()))
    assert sum(p.numel() for p in hf.parameters()) == PARAM_COUNTS[name]
    assert hf.config.rope_parameters["rope_theta"] == config.rope_theta


# dim, n_layers, n_heads, n_kv_heads, ffn hidden, vocab, rope theta, context
TABLE = {
    "codellama-7b": (4096, 32, 32, 32, 11008, 32016, 1e6, 16384),
    "codellama-13b": (5120, 40, 40, 40, 13824, 32016, 1e6, 16384),
    "codellama-34b": (8192, 48, 64, 8, 22016, 32000, 1e6, 16384),
    "codellama-70b": (8192, 80, 64, 8, 28672, 32016, 1e6, 16384),
    "codellama-7b-python": (4096, 32, 32, 32, 11008, 32000, 1e6, 16384),
    "codellama-13b-instruct": (5120, 40, 40, 40, 13824, 32016, 1e6, 16384),
    "codellama-34b-instruct": (8192, 48, 64, 8, 22016, 32000, 1e6, 16384),
    "codellama-70b-python": (8192, 80, 64, 8, 28672, 32000, 1e4, 4096),
    "codellama-70b-instruct": (8192, 80, 64, 8, 28672, 32016, 1e4, 4096),
}


@pytest.mark.parametrize("name", TABLE)
def test_released_table(name):
    c = ModelConfig.from_name(name)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_hidden, c.vocab_size, c.rope_theta,
            c.max_seq_len) == TABLE[name]
    assert c.norm_eps == 1e-5 and c.head_dim == 128 and c.name == name


def test_all_twelve_released_names_and_spellings():
    assert len(RELEASED) == 12
    for spelled in ("CodeLlama-7b-Instruct", "codellama/CodeLlama-7b-Instruct-hf", " codellama-7b-instruct "):
        assert ModelConfig.from_name(spelled).name == "codellama-7b-instruct"
    with pytest.raises(CodeLlamaError, match=r"unknown model name 'CodeLlama-8b'; known: codellama-13b"):
        ModelConfig.from_name("CodeLlama-8b")


def test_params_json_round_trip_matches_meta_files():
    # The 34B params.json as Meta ships it (plus rope_theta), and the 70B one.
    meta_34b = {"dim": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 32000,
                "multiple_of": 256, "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000}
    c = ModelConfig.from_params(meta_34b)
    assert c == ModelConfig.from_name("CodeLlama-34b")
    assert c.to_params() == {**meta_34b, "rope_theta": 1e6}
    c70 = ModelConfig.from_name("CodeLlama-70b")
    assert ModelConfig.from_params(c70.to_params()) == c70
    # Llama 2's params.json: vocab -1 and no rope_theta -> θ 10,000.
    llama2 = ModelConfig.from_params({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
                                      "norm_eps": 1e-05, "vocab_size": -1})
    assert llama2.rope_theta == 10_000.0 and llama2.vocab_size == 32016 and llama2.ffn_hidden == 11008


def test_hf_config_round_trip_and_explicit_widths(tmp_path):
    for name in ("CodeLlama-7b", "CodeLlama-34b", "CodeLlama-70b-Instruct"):
        c = ModelConfig.from_name(name)
        hf = c.to_hf()
        assert hf["intermediate_size"] == c.ffn_hidden and hf["num_key_value_heads"] == c.n_kv_heads
        back = ModelConfig.from_hf(hf)
        assert back.to_params() == c.to_params() and back.max_seq_len == c.max_seq_len
    # transformers 5 keeps θ in rope_parameters.
    hf5 = ModelConfig.from_name("CodeLlama-7b").to_hf()
    del hf5["rope_theta"]
    hf5["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(hf5))
    assert ModelConfig.from_hf(tmp_path / "config.json").rope_theta == 1e6
    # A width that no params.json rule gives stays explicit, and to_params expresses it exactly.
    odd = ModelConfig.from_hf({**hf5, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
                               "intermediate_size": 200})
    assert odd.hidden_dim == 200 and odd.ffn_hidden == 200
    assert ModelConfig.from_params(odd.to_params()).ffn_hidden == 200
    small = ModelConfig.from_hf({**hf5, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "intermediate_size": 96})
    assert ModelConfig.from_params(small.to_params()).ffn_hidden == 96


def test_config_errors(tmp_path):
    with pytest.raises(CodeLlamaError, match="dim 100 is not divisible by n_heads 3"):
        ModelConfig(dim=100, n_heads=3)
    with pytest.raises(CodeLlamaError, match="n_heads 8 is not divisible by n_kv_heads 3"):
        ModelConfig(dim=64, n_heads=8, n_kv_heads=3)
    with pytest.raises(CodeLlamaError, match="unsupported HF model_type 'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(CodeLlamaError, match="config file not found"):
        ModelConfig.from_params(tmp_path / "params.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CodeLlamaError, match="bad.json is not valid JSON"):
        ModelConfig.from_hf(tmp_path / "bad.json")


def test_memory_estimate():
    c34 = ModelConfig.from_name("CodeLlama-34b")
    # KV cache per token: 2 (k, v) x 48 layers x 8 kv heads x 128 x 2 bytes = 196,608 bytes.
    assert c34.kv_cache_bytes(1) == 196_608
    m = c34.memory_estimate(100_000, batch=1, dtype=torch.bfloat16)
    assert m["weights"] == 2 * 33_743_970_304 and m["kv_cache"] == 19_660_800_000
    assert m["total"] == m["weights"] + m["kv_cache"]
    c7 = ModelConfig.from_name("CodeLlama-7b")  # no GQA: 2 x 32 x 32 x 128 x 4 bytes per token in float32
    assert c7.memory_estimate(None, batch=2, dtype=torch.float32)["kv_cache"] == 1_048_576 * 16384 * 2
