"""Tensor parallelism (tensor_parallel.py): two real ranks under torchrun (gloo on CPU) against one process.

TP=2 gives TP=1's logits (float32, to 1e-5) and its greedy tokens for a GQA config with vocabulary 32016; a Meta
checkpoint written with 2 model-parallel shards loads with each rank reading only its own shard and holding about
half of the weights; HF checkpoints are sliced per rank; splits that do not divide the model are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codellama.checkpoint import rank_slice, save_checkpoint, shard_dim
from codellama.config import ModelConfig
from codellama.errors import CodeLlamaError
from codellama.generation import generate
from codellama.model import Transformer
from codellama.tensor_parallel import build_sharded, check_tp
from conftest import torchrun  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
WORKER = Path(__file__).resolve().parent / "workers" / "tp_worker.py"
# GQA (8 query heads over 2 KV heads), the released vocabulary with the FIM pieces; big enough (180 MB in float32)
# that half the weights is visible in a rank's memory.
CONFIG = ModelConfig(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=32016, max_seq_len=256)
PROMPTS = [[1, 5, 900, 32010, 7, 31999, 3, 3, 8], [1, 400, 401, 402], [1, 9, 9, 9, 9, 12, 13]]


def test_sharded_shapes_follow_meta_layout():
    model = build_sharded(CONFIG, 2)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["layers.0.attention.wq.weight"] == (256, 512)  # 4 of 8 query heads
    assert shapes["layers.0.attention.wk.weight"] == (64, 512)  # 1 of 2 KV heads
    assert shapes["layers.0.attention.wo.weight"] == (512, 256)
    assert shapes["layers.0.feed_forward.w1.weight"] == (CONFIG.ffn_hidden // 2, 512)
    assert shapes["layers.0.feed_forward.w2.weight"] == (512, CONFIG.ffn_hidden // 2)
    assert shapes["tok_embeddings.weight"] == (32016, 256)  # Meta's ParallelEmbedding: split on the feature dim
    assert shapes["output.weight"] == (16008, 512)  # vocabulary-parallel head
    assert shapes["norm.weight"] == (512,)
    a = model.layers[0].attention
    assert (a.n_heads, a.n_kv_heads) == (4, 1)
    assert shard_dim("layers.3.attention.wq.weight") == 0 and shard_dim("layers.3.ffn_norm.weight") is None
    t = torch.arange(12.0).view(3, 4)
    assert rank_slice("layers.0.feed_forward.w2.weight", t, 1, 2).tolist() == [[2, 3], [6, 7], [10, 11]]


def test_a_split_that_does_not_divide_is_refused():
    with pytest.raises(CodeLlamaError, match="n_kv_heads divisible by 4; this model has 2 .*KV head"):
        check_tp(CONFIG, 4)
    with pytest.raises(CodeLlamaError, match="vocab_size divisible by 2"):
        check_tp(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=101), 2)
    check_tp(ModelConfig.from_name("CodeLlama-70b"), 8)  # 8 KV heads, 32016 ids, FFN 28672: all divide by 8
    check_tp(ModelConfig.from_name("CodeLlama-34b"), 8)  # 32000 ids


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    root = tmp_path_factory.mktemp("tp")
    save_checkpoint(model, root / "meta2", format="meta", shards=2)
    save_checkpoint(model, root / "meta1", format="meta", shards=1)
    save_checkpoint(model, root / "hf", format="hf")
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPTS[0]]))
    greedy = [r.tokens for r in generate(model, PROMPTS, max_new_tokens=12, pack=False)]
    return {"root": root, "logits": logits, "greedy": greedy,
            "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def _run_tp(reference, ckpt: Path, out: Path, nproc: int = 2, *extra: str) -> list[dict]:
    done = torchrun([str(ckpt), str(out), json.dumps(PROMPTS), *extra], reference["root"], script=WORKER,
                    nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_tp2_from_meta_shards_equals_one_process(reference):
    ranks = _run_tp(reference, reference["root"] / "meta2", reference["root"] / "meta2.json")
    whole = _run_tp(reference, reference["root"] / "meta1", reference["root"] / "meta1.json", 1, "only-load")
    logits = torch.load(str(reference["root"] / "meta2.json") + ".logits.pt")
    assert torch.allclose(logits, reference["logits"], atol=1e-5, rtol=0)
    for r in ranks:
        assert r["greedy"] == reference["greedy"]  # every rank decodes the same tokens as one process
        # Each rank opened only its own shard, holds half the weights, and the load's peak memory is about half of
        # one process loading the whole model the same way (its weights plus one layer's mapped pages).
        assert [Path(f).name for f in r["files"]] == [f"consolidated.{r['rank']:02d}.pth"]
        assert abs(r["params_bytes"] / reference["bytes"] - 0.5) < 0.01
        assert 0.4 < r["load_rss_kib"] / whole[0]["load_rss_kib"] < 0.6, (r["load_rss_kib"], whole)
    assert ranks[0]["sampled"] == ranks[1]["sampled"]  # one random stream for every rank


def test_tp2_slices_an_hf_checkpoint(reference):
    ranks = _run_tp(reference, reference["root"] / "hf", reference["root"] / "hf.json")
    logits = torch.load(str(reference["root"] / "hf.json") + ".logits.pt")
    assert torch.allclose(logits, reference["logits"], atol=1e-5, rtol=0)
    assert all(r["greedy"] == reference["greedy"] for r in ranks)


def test_cli_complete_under_torchrun_prints_once_with_tp_size(tmp_path, capsys):
    from codellama.cli import main

    args = ["complete", "def fibonacci(n):", "--max-new-tokens", "12", "--json", "--temperature", "0"]
    assert main(args) == 0
    alone = json.loads(capsys.readouterr().out)
    done = torchrun(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    out = json.loads(lines[0])
    assert out["tp_size"] == 2 and alone["tp_size"] == 1
    assert out["tokens"] == alone["tokens"] and out["text"] == alone["text"]


def test_tensor_parallel_needs_torchrun_and_float_weights():
    import codellama

    with pytest.raises(CodeLlamaError, match="runs under torchrun"):
        codellama.load(tensor_parallel=True)
    with pytest.raises(CodeLlamaError, match="float weights without a draft"):
        codellama.load(tensor_parallel=True, quantize="int8")


def test_serve_under_torchrun_rank0_serves_and_every_rank_steps_together(tmp_path):
    """Two gloo ranks: rank 0 serves HTTP, rank 1 replays its engine (serving/lockstep.py). Concurrent requests of
    different lengths (rows join, finish and move) give one process's greedy text; a cached prompt reuses its row."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    import httpx

    import codellama
    from conftest import SRC, serving_url

    prompts = ["def fibonacci(n):", "import os\n\ndef list_files(path):", "class Stack:\n    def __init__(self):",
               "# sort a list\ndef bubble_sort(xs):"]
    lengths = [16, 5, 24, 9]
    alone = codellama.load()
    want = [alone.complete(p, max_new_tokens=n, temperature=0.0).text for p, n in zip(prompts, lengths)]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "codellama", "serve", "--port", "0", "--max-batch-size", "3", "--threads", "1",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        url = serving_url(proc, lambda: os.killpg(proc.pid, signal.SIGKILL))
        got: dict[int, str] = {}

        def ask(i: int) -> None:
            r = httpx.post(url + "/v1/completions", timeout=120,
                           json={"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0})
            got[i] = r.json()["choices"][0]["text"]
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [got.get(i) for i in range(len(prompts))] == want  # 4 requests over 3 rows: one waits, rows move
        # After an idle spell longer than the heartbeat, a cached prompt is served again from its row.
        import time
        time.sleep(6)
        for _ in range(2):
            r = httpx.post(url + "/completion", timeout=120,
                           json={"prompt": prompts[0], "n_predict": lengths[0], "temperature": 0, "cache_prompt": True})
            assert r.status_code == 200 and r.json()["content"] == want[0]
        assert r.json()["tokens_cached"] > 0
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_bench_latency_under_torchrun_times_the_sharded_model(tmp_path):
    from codellama.api import DEFAULT_MODEL_DIR

    done = torchrun(["bench", "latency", "--model", str(DEFAULT_MODEL_DIR), "--context", "128", "--output-tokens", "4",
                     "--dtype", "fp32", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["tp_size"] == 2 and rows[0]["ttft_s"] > 0 and rows[0]["tpot_s"] > 0
