"""codellama bench: the multi-file workload, slice scaling arithmetic, and the latency command end to end."""

from __future__ import annotations

import json

import pytest
import torch

from codellama.api import DEFAULT_MODEL_DIR
from codellama.bench import latency
from codellama.bench.latency import Timing, time_shape
from codellama.bench.workload import multi_file_prompt, repository_files
from codellama.cli import main
from codellama.config import ModelConfig
from codellama.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model")


def test_workload_is_repository_context_of_exact_length(tokenizer):
    for n in (100, 1000, 5000):
        p = multi_file_prompt(tokenizer, n)
        assert len(p.tokens) == n and p.tokens[0] == tokenizer.bos_id
        text = tokenizer.decode(p.tokens[1:])
        assert text.count("# ---- ") >= 2 and text.rstrip().endswith(f"# ---- {p.new_file} ----")
        assert p.files[0] == repository_files()[0][0]
    assert multi_file_prompt(tokenizer, 1000).tokens == multi_file_prompt(tokenizer, 1000).tokens  # deterministic


def test_workload_from_a_given_repository(tokenizer, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def a():\n    return 1\n")
    (tmp_path / "pkg" / "b.py").write_text("def b():\n    return 2\n")
    p = multi_file_prompt(tokenizer, 200, root=tmp_path)
    assert len(p.tokens) == 200 and p.files[:2] == ["pkg/a.py", "pkg/b.py"]  # repeated to reach the length


def test_slice_scaling_is_head_plus_blocks(monkeypatch):
    """head + n_layers · (slice − head) / K, for TTFT and TPOT, from the two timed models."""
    seen = []

    def fake_time(model, prompt, output_tokens, repeats=1, pack=None):
        blocks = len(model.layers)
        seen.append((blocks, pack))
        return Timing(0.5 + 0.25 * blocks, 0.01 + 0.002 * blocks, 0.0, len(prompt), output_tokens)

    monkeypatch.setattr(latency, "time_generation", fake_time)
    config = ModelConfig(dim=64, n_layers=12, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=256)
    timing, how = time_shape(config, "fp32", torch.device("cpu"), [1] * 32, 4, layers=3)
    # The whole model is small: generation would pack it, so both parts are told to pack.
    assert seen == [(3, True), (0, True)] and how["method"] == "slice" and how["layers_timed"] == 3
    assert how["packed"] is True
    assert timing.ttft_s == pytest.approx(0.5 + 12 * 0.25)
    assert timing.tpot_s == pytest.approx(0.01 + 12 * 0.002)
    assert timing.e2e_s == pytest.approx(timing.ttft_s + 3 * timing.tpot_s)


def test_a_slice_runs_the_kernels_the_whole_model_would():
    """A 1-layer slice of 7B (0.9 GB) is small enough for generation to pack, the whole 13.5 GB model is not:
    the slice must be timed unpacked, or it measures faster kernels than the model it stands for."""
    from codellama.bench.latency import whole_model_packs

    c7 = ModelConfig.from_name("CodeLlama-7b")
    assert not whole_model_packs(c7, "bf16", 1000, 16)
    small = ModelConfig(dim=64, n_layers=12, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=4096)
    assert whole_model_packs(small, "fp32", 32, 4)
    assert not whole_model_packs(small, "fp32", 4000, 4)  # the KV cache outweighs the weights: no packing
    assert not whole_model_packs(small, "int8", 32, 4)  # quantized layers have their own kernels


def test_slice_check_times_whole_and_slice(capsys, monkeypatch):
    config = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=32016, max_seq_len=256)
    check = latency.slice_check(config, "fp32", torch.device("cpu"), [1] * 40, 4, layers=2, repeats=1)
    assert check["layers_timed"] == 2
    assert check["ttft_ratio"] == pytest.approx(check["sliced"]["ttft_s"] / check["whole"]["ttft_s"])
    assert check["tpot_ratio"] == pytest.approx(check["sliced"]["tpot_s"] / check["whole"]["tpot_s"])
    # The CLI: one row per context, whole and scaled timings side by side.
    monkeypatch.setattr(latency.ModelConfig, "from_name", classmethod(lambda cls, name: config))
    assert main(["bench", "latency", "--model", "tiny", "--context", "40", "--output-tokens", "4", "--layers", "2",
                 "--check-slice", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["method"] == "slice-check" and row["context"] == 40 and row["whole"]["ttft_s"] > 0
    assert main(["bench", "latency", "--check-slice", "--context", "40"]) == 2
    assert "--check-slice needs --layers" in capsys.readouterr().err


def test_timing_a_real_generation_is_positive_and_counts_tokens(tokenizer):
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4096, max_seq_len=512)
    model = latency.random_model(config, "fp32", torch.device("cpu"))
    prompt = multi_file_prompt(tokenizer, 200).tokens
    t = latency.time_generation(model, prompt, 8)
    assert t.ttft_s > 0 and t.tpot_s > 0 and t.context == 200 and t.output_tokens == 8
    q = latency.random_model(config, "int8", torch.device("cpu"))
    assert latency.time_generation(q, prompt, 4).tpot_s > 0


def test_random_quantized_model_is_built_block_by_block_in_quantize_models_layout():
    from codellama.model import Transformer
    from codellama.quantize import quantization_summary, quantize_model

    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)
    for mode in ("int8", "int4"):
        built = quantization_summary(latency.random_model(config, mode, torch.device("cpu")))
        reference = quantization_summary(quantize_model(Transformer(config).to(torch.bfloat16), mode))
        assert built == reference and len(built["layers"]) == 15  # 7 linears a block + the output head


def test_bench_latency_cli_on_a_checkpoint(capsys):
    code = main(["bench", "latency", "--model", str(DEFAULT_MODEL_DIR), "--context", "256,512", "--output-tokens",
                 "4", "--dtype", "fp32", "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["context"] for r in rows] == [256, 512]
    assert all(r["ttft_s"] > 0 and r["tpot_s"] > 0 and r["method"] == "whole" for r in rows)
    assert all("measured_over_predicted" in r for r in rows)


def test_bench_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "latency", "--context", "0"])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error:")
    assert main(["bench"]) == 2
    assert "needs a command" in capsys.readouterr().err
    assert main(["bench", "latency", "--model", str(DEFAULT_MODEL_DIR), "--context", "5000"]) == 2
    assert "exceeds the checkpoint" in capsys.readouterr().err


def test_throughput_sweep_through_the_serving_engine():
    import codellama
    from codellama.bench.hardware import HardwareProfile
    from codellama.bench.throughput import predict_row, sweep
    llama = codellama.load()
    text = llama.tokenizer.decode(multi_file_prompt(llama.tokenizer, 96).tokens[1:])
    rows = sweep(llama, text, [1, 3], output_tokens=6, rounds=2)
    assert [(r.concurrency, r.requests, r.output_tokens) for r in rows] == [(1, 2, 12), (3, 6, 36)]
    for r in rows:
        assert r.tokens_per_s > 0 and r.requests_per_s > 0 and 0 < r.ttft_p50_s <= r.ttft_p90_s
        assert 0 < r.tpot_p50_s <= r.tpot_p90_s <= r.tpot_p99_s
    # The prediction of the same run: rounds x (c prefills alone + (n - 1) decode steps of c sequences).
    cpu = HardwareProfile("toy", 2 ** 34, 1e10, {"fp32": 1e11, "bf16": 1e11, "int8": 1e11}, kind="cpu")
    from codellama.bench.perf_model import predict
    pred = predict_row(llama.config, cpu, "fp32", 96, 3, 6, rounds=2)
    first = predict(llama.config, 96, dtype="fp32", hardware=cpu).prefill_s
    step = predict(llama.config, 99, batch=3, dtype="fp32", hardware=cpu).decode_s_per_token
    assert pred["wall_s"] == pytest.approx(2 * (3 * first + 5 * step))
    assert pred["tokens_per_s"] == pytest.approx(36 / pred["wall_s"])


def test_bench_throughput_cli_rows_carry_the_prediction(capsys):
    assert main(["bench", "throughput", "--concurrency", "1,2", "--context", "64", "--output-tokens", "4",
                 "--rounds", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["concurrency"] for r in rows] == [1, 2] and rows[0]["dtype"] == "fp32"
    for r in rows:
        assert r["measured_over_predicted"]["tokens_per_s"] == pytest.approx(
            r["tokens_per_s"] / r["predicted"]["tokens_per_s"])


def test_bench_predict_cli_json(capsys):
    assert main(["bench", "predict", "--model", "CodeLlama-34b", "--context", "100000", "--hardware", "H100-SXM",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("prefill_s", "decode_s_per_token", "memory_bytes", "min_gpus"):
        assert key in out
    assert out["kv_bytes"] == 2 * 48 * 8 * 128 * 100_000 * 2 and out["min_gpus"] == 2
    assert main(["bench", "predict", "--model", "CodeLlama-34b", "--context", "1000", "--hardware", "TPU"]) == 2
    assert "error:" in capsys.readouterr().err


def test_bench_report_is_generated_with_plots_and_conclusions(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"model": "CodeLlama-34b", "dtype": "bf16", "context": 1000, "layers_timed": 1,
                                "ttft_s": 2.0, "tpot_s": 0.5, "predicted": {"prefill_s": 1.8,
                                                                             "decode_s_per_token": 0.45},
                                "measured_over_predicted": {"ttft": 1.11, "tpot": 1.11}}) + "\n")
    out = tmp_path / "docs" / "bench-report.md"
    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"model": "default", "dtype": "fp32", "context": 512, "concurrency": 4,
                                "requests": 8, "output_tokens": 512, "wall_s": 2.0, "tokens_per_s": 256.0,
                                "requests_per_s": 4.0, "ttft_p50_s": 0.1, "ttft_p90_s": 0.2, "tpot_p50_s": 0.01,
                                "tpot_p90_s": 0.02, "tpot_p99_s": 0.03, "predicted": {"tokens_per_s": 200.0},
                                "measured_over_predicted": {"tokens_per_s": 1.28}}) + "\n"
                    + json.dumps({"model": "CodeLlama-7b", "dtype": "bf16", "context": 1000, "method": "slice-check",
                                  "layers_timed": 2, "whole": {"ttft_s": 10.0, "tpot_s": 0.5},
                                  "sliced": {"ttft_s": 10.5, "tpot_s": 0.45}, "ttft_ratio": 1.05,
                                  "tpot_ratio": 0.9}) + "\n")
    assert main(["bench", "report", "--out", str(out), "--measured", str(rows), str(more)]) == 0
    text = out.read_text()
    assert "## Conclusions" in text and "70B needs more GPUs than 34B" in text and "| 100,000 |" in text
    assert "| CodeLlama-34b | cpu | bf16 | 1,000 | 1 | 2.00 | 1.80 | 1.11 |" in text
    assert "| default | fp32 | 512 | 4 | 8 | 256.0 | 200.0 | 1.28 | 4.00 |" in text
    assert "| CodeLlama-7b | bf16 | 1,000 | 2 | 10.00 | 10.50 | 1.05 | 500.0 | 450.0 | 0.90 |" in text
    assert "## Throughput vs batch at 16k context" in text and "| H100-SXM | 64 |" in text
    for name in ("bench-latency.png", "bench-prefill.png", "bench-memory.png", "bench-throughput.png",
                 "bench-report.json"):
        assert (out.parent / name).stat().st_size > 1000
    data = json.loads((out.parent / "bench-report.json").read_text())
    by = {(p["model"], p["hardware"], p["context"]): p for p in data["points"]}
    assert by[("CodeLlama-70b", "H100-SXM", 100_000)]["gpus"] >= by[("CodeLlama-34b", "H100-SXM", 100_000)]["gpus"]
    # Throughput per batch: more sequences, more tokens/s, until the KV caches need more GPUs.
    h100 = [b for b in data["batches"] if b["model"] == "CodeLlama-34b" and b["hardware"] == "H100-SXM"]
    assert [b["batch"] for b in h100] == [1, 2, 4, 8, 16, 32, 64]
    assert all(a["tokens_per_s"] < b["tokens_per_s"] for a, b in zip(h100, h100[1:]))
    # 64 x 16,000 tokens x 192 KiB = 201 GB of KV cache + 67.5 GB of weights: 74 GB a GPU over 4 H100s, with the reserve.
    assert h100[0]["gpus"] == 1 and h100[-1]["gpus"] == 4
    assert "report:" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\n')
    assert main(["bench", "report", "--out", str(out), "--measured", str(bad)]) == 2
    assert "must come from" in capsys.readouterr().err
