"""``codellama info`` and ``codellama convert``: output with real numbers, round trips, and one-line errors
(``error: ...`` on stderr, exit status 2, never a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from codellama.checkpoint import load_model, save_checkpoint
from codellama.cli import main
from codellama.config import ModelConfig
from codellama.model import Transformer


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's --help / usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def meta_ckpt(tmp_path, tiny_tokenizer_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                                    ffn_dim_multiplier=1.3))
    model.init_weights(0.1)
    return save_checkpoint(model, tmp_path / "tiny-meta", format="meta", shards=2, tokenizer=tiny_tokenizer_path,
                           dtype=torch.bfloat16)


def test_help_lists_core_commands(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "info" in out and "convert" in out
    code, out, _ = _run(capsys, "convert", "--help")
    assert code == 0 and "--to {meta,hf,native" in out and "--shards" in out


def test_info_released_name(capsys):
    code, out, err = _run(capsys, "info", "CodeLlama-34b", "--context", "100000")
    assert code == 0 and err == ""
    assert "codellama-34b  (released config, no weights read)" in out
    assert "parameters   33.744B (33,743,970,304)" in out
    assert "n_kv_heads   8" in out and "hidden_dim   22016" in out and "vocab_size   32000" in out
    # 2 x 33,743,970,304 bytes = 62.9 GiB; KV 196,608 bytes/token x 100k = 18.3 GiB.
    assert "bfloat16: weights 62.9 GiB + KV cache 18.3 GiB (100000 tokens x 1) = 81.2 GiB" in out

    code, out, _ = _run(capsys, "info", "CodeLlama-70b-Instruct", "--json", "--dtype", "float16", "--batch", "2")
    info = json.loads(out)
    assert info["params"] == 68_976_910_336 and info["format"] == "released config"
    assert info["config"]["rope_theta"] == 10_000.0 and info["config"]["max_seq_len"] == 4096
    # 70B: 2 x 80 layers x 8 kv heads x 128 x 2 bytes = 327,680 bytes per token, x 4096 x 2 sequences.
    assert info["memory"]["kv_cache"] == 327_680 * 4096 * 2
    assert info["memory"]["weights"] == 2 * 68_976_910_336


def test_info_checkpoint_directory(capsys, meta_ckpt):
    code, out, _ = _run(capsys, "info", str(meta_ckpt))
    assert code == 0
    assert "tiny-meta  (meta checkpoint, 2 shards)" in out
    assert "stored dtype bfloat16" in out and "hidden_dim   224" in out and "n_kv_heads   2" in out
    assert "files        params.json consolidated.00.pth consolidated.01.pth tokenizer.model" in out
    params = ModelConfig.from_params(meta_ckpt / "params.json").num_params()
    assert f"({params:,})" in out
    code, out, _ = _run(capsys, "info", str(meta_ckpt), "--json")
    info = json.loads(out)
    assert info["shards"] == 2 and info["checkpoint_dtype"] == "bfloat16" and info["params"] == params


def test_convert_round_trip(capsys, meta_ckpt, tmp_path):
    code, out, err = _run(capsys, "convert", str(meta_ckpt), str(tmp_path / "hf"), "--to", "hf")
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'hf'}: hf layout, bfloat16, 3 files")
    code, _, err = _run(capsys, "convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "meta",
                        "--shards", "2")
    assert code == 0, err
    for rank in range(2):
        a = torch.load(meta_ckpt / f"consolidated.{rank:02d}.pth", weights_only=True)
        b = torch.load(tmp_path / "back" / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, out, _ = _run(capsys, "convert", str(meta_ckpt), str(tmp_path / "f32"), "--to", "native",
                        "--dtype", "float32")
    assert code == 0 and "native layout, float32, 3 files" in out
    model = load_model(tmp_path / "f32")
    assert model.output.weight.dtype == torch.float32
    assert torch.equal(model.output.weight, load_model(meta_ckpt).output.weight.float())


@pytest.mark.parametrize("argv,message", [
    (["info", "/no/such/dir"], "error: /no/such/dir is neither a checkpoint directory nor a released model name"),
    (["info", "CodeLlama-7b", "--dtype", "float8"], "error: unknown dtype 'float8'"),
    (["info", "CodeLlama-7b", "--context", "0"], "error: --context and --batch must be positive"),
    (["convert", "/no/such/dir", "/tmp/x", "--to", "hf"], "error: checkpoint not found: /no/such/dir"),
    (["convert", "a", "b", "--to", "onnx"], "error: argument --to: invalid choice: 'onnx'"),
    (["convert", "a", "b"], "error: the following arguments are required: --to"),
])
def test_errors_are_one_line(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and err.startswith(message), err
    assert "Traceback" not in err and err.count("\n") == 1


def test_convert_errors(capsys, meta_ckpt, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (["--to", "hf", "--shards", "2"], tmp_path / "o1", "model-parallel shards exist only in the Meta layout"),
        (["--to", "meta", "--shards", "3"], tmp_path / "o2", "cannot be split over 3 shards"),
        (["--to", "meta"], tmp_path / "full", "already exists and is not an empty directory"),
    ]
    for extra, dst, message in cases:
        code, _, err = _run(capsys, "convert", str(meta_ckpt), str(dst), *extra)
        assert code == 2 and err.startswith("error: ") and message in err, err


def test_info_without_default_model(capsys, monkeypatch, tmp_path):
    import codellama.api
    monkeypatch.setattr(codellama.api, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    code, _, err = _run(capsys, "info")
    assert code == 2 and err.startswith("error: the embedded default model is not installed")


def test_subprocess_errors_have_no_traceback(meta_ckpt):
    (meta_ckpt / "consolidated.01.pth").write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "codellama", "convert", str(meta_ckpt), str(meta_ckpt.parent / "o"),
                           "--to", "hf"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: cannot read ") and "consolidated.01.pth" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
