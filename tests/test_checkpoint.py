"""Checkpoint loading, saving and conversion: parity with HF transformers, bit-exact round trips, peak memory,
and every error a user can hit with a broken or foreign checkpoint directory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from codellama.checkpoint import (convert, describe_checkpoint, detect_format, hf_to_meta_name, load_model,
                                  load_tokenizer, meta_to_hf_name, permute_from_hf, permute_to_hf, save_checkpoint)
from codellama.config import ModelConfig
from codellama.errors import CodeLlamaError
from codellama.model import Transformer

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def _random_model(config: ModelConfig, seed: int = 0, std: float = 0.1) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights(std)
    # Norm weights away from 1 so a norm loaded into the wrong slot would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def _state_equal(a: Transformer, b: Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


# Random tiny shapes with the features that matter: GQA, rope θ 1e6, an FFN multiplier, the 32016 vocabulary.
PARITY_CONFIGS = [
    ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32016, multiple_of=32,
                ffn_dim_multiplier=1.3, rope_theta=1_000_000.0, max_seq_len=256),
    ModelConfig(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=32016, multiple_of=64,
                ffn_dim_multiplier=1.0, rope_theta=1_000_000.0, max_seq_len=256),
    ModelConfig(dim=48, n_layers=1, n_heads=2, vocab_size=32016, multiple_of=16, rope_theta=10_000.0,
                max_seq_len=256),
]


@pytest.mark.parametrize("config", PARITY_CONFIGS, ids=["gqa-mult1.3", "gqa4-mult1.0", "mha-theta1e4"])
def test_logit_parity_with_hf_through_hf_and_meta_loaders(config, tmp_path):
    ours = _random_model(config)
    hf_dir = save_checkpoint(ours, tmp_path / "hf", format="hf")
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    # HF read our config.json with the right rotary base and shapes.
    assert hf.config.rope_parameters["rope_theta"] == config.rope_theta
    assert hf.config.num_key_value_heads == config.n_kv_heads
    assert hf.config.intermediate_size == config.ffn_hidden

    torch.manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (2, 48))
    with torch.no_grad():
        expected = hf(tokens).logits.float()
    assert expected.abs().max() > 1.0  # non-trivial logits, or the tolerance would mean nothing

    loaded = {"hf": load_model(hf_dir),
              "meta-1": load_model(save_checkpoint(ours, tmp_path / "meta1", format="meta", shards=1)),
              "meta-2": load_model(save_checkpoint(ours, tmp_path / "meta2", format="meta", shards=2))}
    assert len(list((tmp_path / "meta2").glob("consolidated.*.pth"))) == 2
    for name, model in loaded.items():
        with torch.no_grad():
            diff = (model(tokens) - expected).abs().max().item()
        assert diff <= 1e-4, f"{name}: max |Δlogit| = {diff}"
        assert _state_equal(model, ours), name


def test_our_hf_loader_reads_checkpoints_written_by_transformers(tmp_path):
    config = PARITY_CONFIGS[0]
    torch.manual_seed(3)
    hf = LlamaForCausalLM(LlamaConfig(**config.to_hf())).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.save(hf.state_dict(), tmp_path / "single" / "pytorch_model.bin")  # legacy .bin layout
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes((tmp_path / "single" / "pytorch_model.bin").read_bytes())
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "single" / "config.json").read_text())

    tokens = torch.randint(0, config.vocab_size, (1, 33))
    with torch.no_grad():
        expected = hf(tokens).logits
        for sub in ("single", "sharded", "bin"):
            model = load_model(tmp_path / sub)
            assert model.config.rope_theta == 1_000_000.0 and model.config.n_kv_heads == 2
            assert model.config.name == sub
            diff = (model(tokens) - expected).abs().max().item()
            assert diff <= 1e-4, f"{sub}: {diff}"


def test_meta_to_hf_to_meta_round_trip_is_bit_exact(tmp_path, tiny_tokenizer_path):
    config = PARITY_CONFIGS[1]
    original = _random_model(config, seed=5).to(torch.bfloat16)
    meta = save_checkpoint(original, tmp_path / "meta", format="meta", shards=2, tokenizer=tiny_tokenizer_path)
    convert(meta, tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "back", to="meta", shards=2)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tiny_tokenizer_path.read_bytes()
    assert (tmp_path / "back" / "tokenizer.model").is_file()
    # HF config.json states the FFN width, not Meta's multiplier: the params say the same in other terms.
    before = ModelConfig.from_params(meta / "params.json")
    after = ModelConfig.from_params(tmp_path / "back" / "params.json")
    assert after.ffn_hidden == before.ffn_hidden == 192
    assert (after.dim, after.n_layers, after.n_heads, after.n_kv_heads, after.vocab_size, after.rope_theta,
            after.norm_eps) == (before.dim, before.n_layers, before.n_heads, 2, 32016, 1e6, 1e-5)
    for rank in range(2):
        a = torch.load(meta / f"consolidated.{rank:02d}.pth", weights_only=True)
        b = torch.load(tmp_path / "back" / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k
    # The HF copy really is permuted (not a renamed copy): q rows differ from Meta's, k too.
    from safetensors.torch import load_file
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    wq = original.layers[0].attention.wq.weight
    assert not torch.equal(hf["model.layers.0.self_attn.q_proj.weight"], wq)
    assert torch.equal(hf["model.layers.0.self_attn.q_proj.weight"], permute_to_hf(wq, config.n_heads))


def test_native_round_trip_dtype_cast_and_name(tmp_path):
    model = _random_model(PARITY_CONFIGS[0])
    out = save_checkpoint(model, tmp_path / "mymodel", dtype=torch.bfloat16)
    assert detect_format(out) == "native"
    params = json.loads((out / "params.json").read_text())
    assert params["max_seq_len"] == 256 and params["n_kv_heads"] == 2
    loaded = load_model(out)
    assert loaded.config == model.config and loaded.config.name == "mymodel"
    assert loaded.output.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.output.weight, model.output.weight.to(torch.bfloat16))
    as_f32 = load_model(out, dtype=torch.float32, max_seq_len=1024)
    assert as_f32.output.weight.dtype == torch.float32 and as_f32.config.max_seq_len == 1024
    # params.json may name the model.
    (out / "params.json").write_text(json.dumps(params | {"name": "codellama-tiny"}))
    assert load_model(out).config.name == "codellama-tiny"


def test_permutation_inverse_and_names():
    w = torch.arange(8 * 4 * 3, dtype=torch.float32).view(8 * 4, 3)
    assert torch.equal(permute_from_hf(permute_to_hf(w, 4), 4), w)
    # Head 0, head_dim 8: Meta's interleaved rows 0..7 are pairs (0,1),(2,3),...; HF puts the evens first.
    assert permute_to_hf(w, 4)[:8, 0].tolist() == [0, 6, 12, 18, 3, 9, 15, 21]
    for name in ("tok_embeddings.weight", "norm.weight", "output.weight", "layers.7.attention.wk.weight",
                 "layers.0.feed_forward.w2.weight", "layers.3.ffn_norm.weight", "layers.3.attention_norm.weight"):
        assert hf_to_meta_name(meta_to_hf_name(name)) == name
    assert meta_to_hf_name("layers.2.feed_forward.w1.weight") == "model.layers.2.mlp.gate_proj.weight"
    assert hf_to_meta_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_meta_params_without_vocab_and_with_rope_freqs(tmp_path):
    """Llama 2 params.json says vocab_size -1 and has no rope_theta; Meta files carry ``rope.freqs``."""
    config = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=100, multiple_of=32, rope_theta=10_000.0)
    model = _random_model(config)
    out = save_checkpoint(model, tmp_path / "llama2", format="meta")
    params = json.loads((out / "params.json").read_text())
    params["vocab_size"] = -1
    del params["rope_theta"]
    (out / "params.json").write_text(json.dumps(params))
    sd = torch.load(out / "consolidated.00.pth", weights_only=True)
    sd["rope.freqs"] = torch.ones(4)
    torch.save(sd, out / "consolidated.00.pth")
    loaded = load_model(out)
    assert loaded.config.vocab_size == 100 and loaded.config.rope_theta == 10_000.0
    assert _state_equal(loaded, model)


def test_describe_reads_headers_only(tmp_path):
    model = _random_model(PARITY_CONFIGS[0]).to(torch.bfloat16)
    meta = save_checkpoint(model, tmp_path / "m", format="meta", shards=2)
    info = describe_checkpoint(meta)
    assert info["format"] == "meta" and info["shards"] == 2 and info["dtype"] == "bfloat16"
    assert info["files"] == ["params.json", "consolidated.00.pth", "consolidated.01.pth"]
    # Meta's params.json has no context length (its loader takes it as an argument): the 16k default applies.
    assert info["config"] == replace(model.config, max_seq_len=16384)
    hf = save_checkpoint(model, tmp_path / "h", format="hf", dtype=torch.float16)
    info = describe_checkpoint(hf)
    assert info["format"] == "hf" and info["dtype"] == "float16" and info["config"].ffn_hidden == 224
    assert info["config"].num_params() == model.config.num_params()
    released = describe_checkpoint("CodeLlama-34b")
    assert released["format"] == "released config" and released["files"] == []
    assert released["config"].n_kv_heads == 8 and released["config"].vocab_size == 32000


def test_hf_tied_embeddings(tmp_path):
    config = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64, multiple_of=32)
    model = _random_model(config)
    out = save_checkpoint(model, tmp_path / "tied", format="hf")
    from safetensors.torch import load_file, save_file
    sd = load_file(out / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, out / "model.safetensors")
    cfg = json.loads((out / "config.json").read_text()) | {"tie_word_embeddings": True}
    (out / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(out)
    assert torch.equal(loaded.output.weight, model.tok_embeddings.weight)


def test_load_tokenizer(tmp_path, tiny_tokenizer_path):
    model = _random_model(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=512, multiple_of=32))
    out = save_checkpoint(model, tmp_path / "c", tokenizer=tiny_tokenizer_path)
    assert load_tokenizer(out).n_words == 512
    assert load_tokenizer(tmp_path / "elsewhere", tiny_tokenizer_path).eot_id is not None
    assert load_tokenizer(None, out).n_words == 512  # a directory holding tokenizer.model
    with pytest.raises(CodeLlamaError, match=r"no tokenizer\.model in .*elsewhere; pass the tokenizer path"):
        load_tokenizer(tmp_path / "elsewhere")
    with pytest.raises(CodeLlamaError, match="tokenizer not found: .*missing.model"):
        load_tokenizer(out, tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CodeLlamaError, match="not a SentencePiece model"):
        load_tokenizer(out, tmp_path / "junk.model")


# ---- errors -------------------------------------------------------------------------------------------
@pytest.fixture
def small_meta(tmp_path) -> Path:
    model = _random_model(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=32))
    return save_checkpoint(model, tmp_path / "ckpt", format="meta", shards=2)


def test_error_missing_and_unknown_layouts(tmp_path):
    with pytest.raises(CodeLlamaError, match="checkpoint not found: .*nowhere"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CodeLlamaError, match="expected a checkpoint directory, got the file"):
        load_model(tmp_path / "file.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodeLlamaError, match="unknown checkpoint layout in .*empty: expected params.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "params.json").write_text("{}")
    with pytest.raises(CodeLlamaError, match="has params.json but no weights"):
        load_model(tmp_path / "p")
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "config.json").write_text("{}")
    with pytest.raises(CodeLlamaError, match="has config.json but no weights"):
        load_model(tmp_path / "h")
    with pytest.raises(CodeLlamaError, match="neither a checkpoint directory nor a released model name"):
        describe_checkpoint("CodeLlama-99b")


def test_error_wrong_shape_names_tensor_and_file(small_meta):
    sd = torch.load(small_meta / "consolidated.01.pth", weights_only=True)
    sd["layers.1.feed_forward.w2.weight"] = torch.zeros(32, 7)
    torch.save(sd, small_meta / "consolidated.01.pth")
    with pytest.raises(CodeLlamaError, match=r"tensor layers\.1\.feed_forward\.w2\.weight in consolidated\.01\.pth "
                                             r"has shape \(32, 7\) but the config expects shard shape \(32, 48\)"):
        load_model(small_meta)


def test_error_wrong_config_for_weights(small_meta):
    params = json.loads((small_meta / "params.json").read_text())
    (small_meta / "params.json").write_text(json.dumps(params | {"dim": 64}))
    with pytest.raises(CodeLlamaError, match=r"tensor tok_embeddings\.weight in consolidated\.00\.pth has shape"):
        load_model(small_meta)


def test_error_missing_unexpected_and_inconsistent_tensors(small_meta, tmp_path):
    for rank in range(2):
        sd = torch.load(small_meta / f"consolidated.{rank:02d}.pth", weights_only=True)
        del sd["layers.0.ffn_norm.weight"]
        torch.save(sd, small_meta / f"consolidated.{rank:02d}.pth")
    with pytest.raises(CodeLlamaError, match=r"is missing tensors: layers\.0\.ffn_norm\.weight"):
        load_model(small_meta)
    for rank in range(2):
        sd = torch.load(small_meta / f"consolidated.{rank:02d}.pth", weights_only=True)
        sd["layers.0.ffn_norm.weight"] = torch.ones(32)
        sd["layers.0.extra.bias"] = torch.ones(3)
        torch.save(sd, small_meta / f"consolidated.{rank:02d}.pth")
    with pytest.raises(CodeLlamaError, match=r"has unexpected tensors: layers\.0\.extra\.bias"):
        load_model(small_meta)
    sd = torch.load(small_meta / "consolidated.01.pth", weights_only=True)
    del sd["layers.0.extra.bias"]
    torch.save(sd, small_meta / "consolidated.01.pth")
    with pytest.raises(CodeLlamaError, match=r"tensor layers\.0\.extra\.bias is missing from consolidated\.01\.pth"):
        load_model(small_meta)


def test_error_shard_numbering_and_hf_names(small_meta, tmp_path):
    (small_meta / "consolidated.01.pth").rename(small_meta / "consolidated.02.pth")
    with pytest.raises(CodeLlamaError, match=r"not numbered 00\.\.01: consolidated\.00\.pth, consolidated\.02\.pth"):
        load_model(small_meta)
    model = _random_model(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64, multiple_of=32))
    hf = save_checkpoint(model, tmp_path / "hf", format="hf")
    from safetensors.torch import load_file, save_file
    sd = load_file(hf / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(sd, hf / "model.safetensors")
    with pytest.raises(CodeLlamaError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.q_proj\.bias "
                                             r"\(model\.safetensors\)"):
        load_model(hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(cfg | {"model_type": "mistral"}))
    with pytest.raises(CodeLlamaError, match="unsupported HF model_type 'mistral'"):
        load_model(hf)
    (hf / "config.json").write_text("{not json")
    with pytest.raises(CodeLlamaError, match="config.json is not valid JSON"):
        load_model(hf)


def test_error_refuses_pickled_objects_and_garbage(small_meta):
    torch.save({"tok_embeddings.weight": torch.zeros(2), "evil": Path("/")}, small_meta / "consolidated.01.pth")
    with pytest.raises(CodeLlamaError, match=r"refusing to load .*consolidated\.01\.pth: it holds more than tensors"):
        load_model(small_meta)
    (small_meta / "consolidated.01.pth").write_bytes(b"garbage")
    with pytest.raises(CodeLlamaError, match=r"cannot read .*consolidated\.01\.pth"):
        load_model(small_meta)
    (small_meta / "params.json").write_text("[1, 2]")
    with pytest.raises(CodeLlamaError, match="params.json must hold a JSON object"):
        load_model(small_meta)


def test_error_save_and_convert_arguments(small_meta, tmp_path):
    model = load_model(small_meta)
    with pytest.raises(CodeLlamaError, match="unknown checkpoint format 'gguf'"):
        save_checkpoint(model, tmp_path / "x", format="gguf")
    with pytest.raises(CodeLlamaError, match=r"shards exist only in the Meta layout"):
        save_checkpoint(model, tmp_path / "x", format="hf", shards=2)
    with pytest.raises(CodeLlamaError, match=r"cannot be split over 3 shards"):
        save_checkpoint(model, tmp_path / "x", format="meta", shards=3)
    with pytest.raises(CodeLlamaError, match="tokenizer not found"):
        save_checkpoint(model, tmp_path / "x", tokenizer=tmp_path / "nope.model")
    with pytest.raises(CodeLlamaError, match="already exists and is not an empty directory"):
        convert(small_meta, tmp_path, to="hf")
    with pytest.raises(CodeLlamaError, match="must differ from the source"):
        convert(small_meta, small_meta, to="hf")


# ---- memory -------------------------------------------------------------------------------------------
_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import torch
    from codellama.checkpoint import load_model, save_checkpoint
    from codellama.config import ModelConfig
    from codellama.model import Transformer

    path, fmt, shards = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    # Warm up on a tiny checkpoint of the same layout, so lazy imports and first-call caches are in the baseline.
    warm = save_checkpoint(Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64)),
                           path.parent / f"warm-{fmt}", format=fmt, shards=shards)
    load_model(warm)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = load_model(path)
    with torch.no_grad():  # touch every weight: a memory-mapped tensor counts once its pages are read
        total = sum(float(p.sum()) for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kib": peak - base, "finite": total == total}))
""")


@pytest.fixture(scope="module")
def big_checkpoints(tmp_path_factory) -> Path:
    """A ~280 MB float32 checkpoint (74M parameters) in the layouts whose loading copies tensors."""
    root = tmp_path_factory.mktemp("big")
    config = ModelConfig(dim=512, n_layers=12, n_heads=8, n_kv_heads=4, vocab_size=32016)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_checkpoint(model, root / "meta", format="meta", shards=2)
    save_checkpoint(model, root / "hf", format="hf")
    return root


@pytest.mark.parametrize("fmt,shards", [("meta", 2), ("hf", 1)])
def test_peak_rss_while_loading_stays_under_1_3x_checkpoint_size(big_checkpoints, fmt, shards):
    path = big_checkpoints / fmt
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size > 250 * 2**20
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), fmt, str(shards)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = result["peak_kib"] * 1024 / size
    assert result["finite"]
    assert ratio < 1.3, f"peak RSS {result['peak_kib'] / 1024:.0f} MiB = {ratio:.2f}x the {size / 2**20:.0f} MiB checkpoint"


# ---- the public API on top of the loader ------------------------------------------------------------------
def test_api_load_and_logits(tmp_path, tiny_tokenizer_path, monkeypatch):
    import codellama
    import codellama.api
    model = _random_model(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32))
    out = save_checkpoint(model, tmp_path / "api-hf", format="hf", tokenizer=tiny_tokenizer_path)
    llm = codellama.load(out, device="cpu", dtype="bfloat16")
    assert llm.config.name == "api-hf" and llm.tokenizer.n_words == 512 and llm.dtype == torch.bfloat16
    tokens = llm.tokenizer.encode("def f(x):\n    return x", bos=True)
    one = llm.logits(tokens)
    assert one.shape == (len(tokens), 512) and one.dtype == torch.float32
    batch = llm.logits([tokens, tokens])
    assert batch.shape == (2, len(tokens), 512) and torch.equal(batch[0], one)
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0]
    assert (codellama.load(out, device="cpu", dtype="float32").logits(tokens) - expected).abs().max() < 1e-5
    with pytest.raises(CodeLlamaError, match="unknown dtype 'int3'"):
        codellama.load(out, device="cpu", dtype="int3")
    small_vocab = save_checkpoint(_random_model(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=100,
                                                            multiple_of=32)),
                                  tmp_path / "small", tokenizer=tiny_tokenizer_path)
    with pytest.raises(CodeLlamaError, match="tokenizer has 512 pieces but the model's vocabulary is 100"):
        codellama.load(small_vocab, device="cpu")
    monkeypatch.setattr(codellama.api, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(CodeLlamaError, match="the embedded default model is not installed"):
        codellama.load()
