"""Shared fixtures: a tokenizer the suite trains itself (so it never needs ../shared), tiny configs and models."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from codellama.config import ModelConfig
from codellama.model import Transformer
from codellama.training.recipe import TrainConfig
from codellama.training.tokenizer import train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
SRC = Path(__file__).resolve().parents[1] / "src"
REAL_TOKENIZER = SHARED / "tokenizers" / "codellama-tokenizer.model"


def _corpus_texts(n_files: int = 60) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:n_files]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    # Make sure multi-byte text is seen by the trainer too (it still falls back to bytes for rare characters).
    texts.append("# 注释 コメント émoji 😀 ünïcödé\n")
    return texts


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: OpenMP threads only add contention on a shared 2-core CPU (steps up to 30x slower);
    # subprocesses started by CLI tests get OMP_NUM_THREADS=1 for the same reason.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    """A 512-piece BPE model with byte fallback and the four FIM pieces."""
    return train_tokenizer(_corpus_texts(), tmp_path_factory.mktemp("tok") / "tiny.model", vocab_size=512)


@pytest.fixture(scope="session")
def tiny_step_tokenizer_path(tmp_path_factory) -> Path:
    """Like ``tiny_tokenizer_path`` plus the 70B-Instruct ``<step>`` piece."""
    return train_tokenizer(_corpus_texts(), tmp_path_factory.mktemp("tokstep") / "step.model",
                           vocab_size=512, step=True)


@pytest.fixture(scope="session")
def tiny_nofim_tokenizer_path(tmp_path_factory) -> Path:
    """A vocabulary without FIM pieces, like the 34B and Python models'."""
    return train_tokenizer(_corpus_texts(), tmp_path_factory.mktemp("toknofim") / "nofim.model",
                           vocab_size=512, fim=False)


@pytest.fixture
def real_tokenizer_path() -> Path:
    if not REAL_TOKENIZER.is_file():
        pytest.skip("../shared/tokenizers/codellama-tokenizer.model not present")
    return REAL_TOKENIZER


@pytest.fixture
def tiny_config() -> ModelConfig:
    """GQA, rope theta 1e6 and an FFN multiplier: the features that distinguish the 34B/70B shapes."""
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                       ffn_dim_multiplier=1.3, rope_theta=1_000_000.0, max_seq_len=256)


def peaked_model(max_seq_len: int = 128) -> Transformer:
    """The serving tests' model: ``tiny_config``'s shape with larger weights (std 0.3), so next-token
    distributions are peaked and varied: no near-ties for greedy decoding to flip on between batch layouts."""
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                         ffn_dim_multiplier=1.3, rope_theta=1_000_000.0, max_seq_len=max_seq_len)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(std=0.3)
    return model.eval()


def torchrun(args: list[str], cwd: Path, script: Path | None = None, timeout: int = 240, retry: bool = True,
             nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    target = [str(script)] if script else ["-m", "codellama"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *target, *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if retry and done.returncode and any(sign in done.stderr for sign in INFRASTRUCTURE_FAILURES):
        # The launcher's rendezvous or gloo's sockets, not our code: a busy machine loses a port race now and
        # then. One more try, once; a failure of ours fails the same way twice.
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return done


INFRASTRUCTURE_FAILURES = ("Address already in use", "RendezvousConnectionError", "RendezvousTimeoutError",
                           "Connection reset by peer", "Connection closed by peer", "Connection refused",
                           "DistNetworkError")


def serving_url(proc: subprocess.Popen, kill, timeout: float = 120, expect: str = "") -> str:
    """The URL a ``codellama serve`` subprocess announces on stderr ("serving NAME on URL (...)"), whose line must
    also contain ``expect``; ``kill`` is called if it has not announced within ``timeout`` seconds."""
    import re
    import threading

    timer = threading.Timer(timeout, kill)
    timer.start()
    line = ""
    for line in proc.stderr:
        if line.startswith("serving "):
            break
    timer.cancel()
    m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
    assert m and expect in line, line
    return m[1]


def cmdline_has(pid: str, marker: str) -> bool:
    """Whether process ``pid`` (a /proc entry name) was started with ``marker`` in its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


@pytest.fixture
def tiny_model(tiny_config) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_config)
    model.init_weights()
    return model.eval()


@pytest.fixture(scope="module")
def train_corpus_dir(tmp_path_factory) -> Path:
    """24 standard-library files: enough text for a seconds-long training run."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(stdlib.glob("*.py"))[:24]:
        shutil.copyfile(f, root / f.name)
    return root


@pytest.fixture(scope="module")
def base(train_corpus_dir, tmp_path_factory) -> TrainConfig:
    """The trainer tests' recipe: a 2-layer model that trains 16 steps in about a second."""
    work = tmp_path_factory.mktemp("runs")
    return TrainConfig(name="t", out_dir=str(work / "t"), data_dir=str(work / "data"),
                       corpus=[str(train_corpus_dir)],
                       vocab_size=384, seq_len=32, doc_chars=200, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       batch_size=8, lr=5e-3, warmup_steps=3, max_steps=16, eval_interval=8, eval_batches=4,
                       ckpt_interval=4, log_interval=1, num_threads=1, progress=False, seed=3,
                       precision="fp32")  # identical numbers on every CPU, with or without native bf16


@pytest.fixture(scope="session")
def infilling_dir(tmp_path_factory) -> Path:
    """Three HumanEval-style single-line infilling problems, as the released .jsonl.gz."""
    d = tmp_path_factory.mktemp("hei")
    rows = [{"task_id": f"SingleLineInfilling/HumanEval/{i}/L0", "entry_point": "f",
             "prompt": "def f(x):\n", "suffix": "    return y\n", "canonical_solution": f"    y = x + {i}\n",
             "test": f"\n\ndef check(candidate):\n    assert candidate(1) == {1 + i}\n"} for i in range(3)]
    with gzip.open(d / "HumanEval-SingleLineInfilling.jsonl.gz", "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return d
