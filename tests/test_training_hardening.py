"""Hostile or broken training inputs (issue 12): crafted checkpoints must not run code, damaged checkpoints and
logs must not block a resume, and every bad recipe value is a one-line ``CodeLlamaError`` naming key and value."""

from __future__ import annotations

import json
import math
import os
import pickle
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codellama.cli import main
from codellama.config import ModelConfig
from codellama.errors import CodeLlamaError
from codellama.model import Transformer
from codellama.training.checkpointing import (CHECKPOINT_VERSION, read_checkpoint_file, read_log, rng_state,
                                              save_run_checkpoint, truncate_log)
from codellama.training.recipe import TrainConfig, load_recipe
from codellama.training.trainer import model_from_run, train

FIELDS = [name for name in TrainConfig.__dataclass_fields__]


def quiet(_msg: str) -> None:
    pass


class PlantsMarker:
    """What an attacker pickles: unpickling it calls ``open(marker, "w")``, i.e. runs code of their choosing."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def malicious_files(marker: Path) -> dict[str, bytes]:
    payload = {"model": PlantsMarker(marker), "step": 1}
    saved = Path(str(marker) + ".torch")
    torch.save(payload, saved)  # the zip layout torch.save writes, data.pkl inside
    return {"pickle-protocol-2": pickle.dumps(payload, protocol=2), "pickle-latest": pickle.dumps(payload),
            "torch-zip": saved.read_bytes()}


@pytest.fixture(scope="module")
def reference(base) -> list[dict]:
    """The uninterrupted run's log: what every recovered run must reproduce exactly."""
    config = replace(base, out_dir=base.out_dir + "-reference")
    train(config, log=quiet)
    return read_log(config.out_dir)


def same_curve(log: list[dict], reference: list[dict]) -> bool:
    return [(r["step"], r["loss"], r.get("val_loss")) for r in log] == \
        [(r["step"], r["loss"], r.get("val_loss")) for r in reference]


# ---- item 1: nothing loaded from disk can run code ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["pickle-protocol-2", "pickle-latest", "torch-zip"])
def test_resume_refuses_a_malicious_checkpoint_without_running_it(base, tmp_path, kind):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(malicious_files(marker)[kind])
    config = replace(base, out_dir=str(run), data_dir=str(tmp_path / "data"))
    with pytest.raises(CodeLlamaError) as caught:
        train(config, resume=True, log=quiet)
    message = str(caught.value)
    assert "\n" not in message and str(run / "ckpt.pt") in message
    assert "refused" in message or "not a readable checkpoint" in message
    assert "weights_only" not in message  # torch's advice to retry unsafely is never passed on
    assert not marker.exists()
    assert not (tmp_path / "data").exists()  # refused before any data was prepared
    assert main(["train", str(_recipe_file(tmp_path, config)), "--resume", "--no-progress"]) == 2
    assert not marker.exists()


def test_init_from_and_model_from_run_refuse_a_malicious_checkpoint(base, tmp_path):
    marker = tmp_path / "marker"
    source = tmp_path / "earlier-run"
    source.mkdir()
    (source / "ckpt.pt").write_bytes(malicious_files(marker)["torch-zip"])
    config = replace(base, out_dir=str(tmp_path / "lcft"), data_dir=str(tmp_path / "data"), init_from=str(source))
    with pytest.raises(CodeLlamaError, match=r"refused: it holds more than tensors and plain data \(a pickled (io|builtins)\.open"):
        train(config, log=quiet)
    with pytest.raises(CodeLlamaError, match="refused"):
        model_from_run(source)
    assert not marker.exists() and not (tmp_path / "data").exists()


def test_an_old_format_checkpoint_is_refused_with_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # What earlier versions wrote: NumPy's RNG state pickled as NumPy objects (loadable only with weights_only=False).
    torch.save({"model": {}, "step": 4, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}},
               run / "ckpt.pt")
    with pytest.raises(CodeLlamaError, match="written by an older version of codellama .* cannot be loaded safely"):
        model_from_run(run)


def test_checkpoints_are_plain_data_and_the_previous_one_is_kept(base, reference):
    config = replace(base, out_dir=base.out_dir + "-plain")
    train(config, until_step=8, log=quiet)  # checkpoints at steps 4 and 8
    run = Path(config.out_dir)
    latest = torch.load(run / "ckpt.pt", weights_only=True)
    previous = torch.load(run / "ckpt.prev.pt", weights_only=True)
    assert (latest["step"], previous["step"], latest["version"]) == (8, 4, CHECKPOINT_VERSION)
    numpy_state = latest["rng"]["numpy"]
    assert isinstance(numpy_state["keys"], list) and len(numpy_state["keys"]) == 624
    assert isinstance(latest["rng"]["python"]["internal"], list)
    assert not list(run.glob("*.tmp"))
    train(config, resume=True, log=quiet)
    assert same_curve(read_log(config.out_dir), reference)


def test_a_crafted_checkpoint_that_does_not_fit_is_a_clean_error(base, tmp_path):
    config = replace(base, out_dir=str(tmp_path / "run"))
    train(config, until_step=4, log=quiet)
    path = Path(config.out_dir) / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    first_moment = ckpt["optimizer"]["state"][0]
    first_moment["exp_avg"] = torch.zeros(3)
    torch.save(ckpt, path)
    with pytest.raises(CodeLlamaError, match=r"ckpt\.pt does not fit this run \(optimizer exp_avg of shape"):
        train(config, resume=True, log=quiet)
    ckpt["optimizer"]["state"][0]["exp_avg"] = torch.zeros(5)
    ckpt["model"]["norm.weight"] = torch.zeros(7)
    torch.save(ckpt, path)
    with pytest.raises(CodeLlamaError, match=r"does not fit this run \(.*size mismatch"):
        train(config, resume=True, log=quiet)


# ---- item 12: damaged run directories -------------------------------------------------------------------------
def test_a_truncated_checkpoint_falls_back_to_the_previous_one(base, reference):
    config = replace(base, out_dir=base.out_dir + "-truncated")
    train(config, until_step=8, log=quiet)
    run = Path(config.out_dir)
    latest = (run / "ckpt.pt").read_bytes()
    (run / "ckpt.pt").write_bytes(latest[: len(latest) // 2])  # a copy cut short
    messages: list[str] = []
    summary = train(config, resume=True, log=messages.append)
    assert any("ckpt.pt is not a readable checkpoint" in m and "ckpt.prev.pt (step 4)" in m for m in messages)
    assert "resumed" in " ".join(messages) and f"{run} at step 4" in " ".join(messages)
    assert summary["step"] == 16 and same_curve(read_log(run), reference)
    assert (run / "ckpt.pt.damaged").is_file()  # set aside, never rotated into the fallback slot


def test_a_kill_between_the_two_renames_resumes_from_the_previous_checkpoint(base, reference):
    config = replace(base, out_dir=base.out_dir + "-renamed")
    train(config, until_step=8, log=quiet)
    run = Path(config.out_dir)
    os.replace(run / "ckpt.pt", run / "ckpt.pt.tmp")  # as after "ckpt.pt -> ckpt.prev.pt", before "tmp -> ckpt.pt"
    summary = train(config, resume=True, log=quiet)
    assert summary["step"] == 16 and same_curve(read_log(run), reference)


def test_a_damaged_checkpoint_without_a_previous_one_names_the_file_to_delete(base, tmp_path):
    config = replace(base, out_dir=str(tmp_path / "run"))
    train(config, until_step=4, log=quiet)
    path = Path(config.out_dir) / "ckpt.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CodeLlamaError) as caught:
        train(config, resume=True, log=quiet)
    message = str(caught.value)
    assert "\n" not in message and message.endswith(f"delete {path} to start the run again")


def test_a_torn_last_log_line_is_dropped_on_resume(base, reference):
    config = replace(base, out_dir=base.out_dir + "-torn")
    train(config, until_step=6, log=quiet)  # checkpoint at 6, log up to 6
    log_path = Path(config.out_dir) / "log.jsonl"
    with open(log_path, "a") as f:
        f.write('{"step": 7, "loss": 5.1')  # killed in the middle of writing step 7's record
    assert [r["step"] for r in read_log(config.out_dir)] == list(range(1, 7))
    train(config, resume=True, log=quiet)
    assert same_curve(read_log(config.out_dir), reference)
    assert log_path.read_text().endswith("}\n") and log_path.read_text().count("\n") == 16


def test_truncate_log_keeps_whole_records_up_to_the_checkpoint(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "log.jsonl").write_text("\n".join(lines[:3]) + "\n[1, 2]\n" + "\n".join(lines[3:]) + "\n{\"st")
    truncate_log(tmp_path, 2)
    assert (tmp_path / "log.jsonl").read_text() == lines[0] + "\n" + lines[1] + "\n"
    (tmp_path / "log.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe garbage')
    assert read_log(tmp_path) == [{"step": 1}]


def test_a_model_too_big_for_the_machine_is_refused_before_any_work(base, tmp_path):
    config = replace(base, out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), dim=16384,
                     n_layers=200, n_heads=128)
    with pytest.raises(CodeLlamaError, match=r"memory plan: needs [\d.]+ GiB per rank, the cpu device has [\d.]+ GiB"):
        train(config, log=quiet)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


# ---- item 12: recipe values ----------------------------------------------------------------------------------
BAD_VALUES = [
    ("lr", "nan", "lr must be a finite number, got nan"),
    ("lr", "-1e-3", "lr must be a number > 0, got -0.001"),
    ("lr", "inf", "lr must be a finite number, got inf"),
    ("lr", '"1e-3"', "lr must be a number, got '1e-3'"),
    ("min_lr", "1.0", "min_lr must be at most lr"),
    ("beta1", "2.0", "beta1 must be in [0, 1), got 2.0"),
    ("beta2", "1.0", "beta2 must be in [0, 1), got 1.0"),
    ("n_layers", "-2", "n_layers must be an integer >= 1, got -2"),
    ("n_layers", "2.5", "n_layers must be an integer, got 2.5"),
    ("n_layers", "true", "n_layers must be an integer, got True"),
    ("dim", "0", "dim must be an integer >= 1, got 0"),
    ("dim", "36", "dim must be a multiple of 2 * n_heads"),
    ("n_kv_heads", "3", "n_kv_heads must be 0 or a divisor of n_heads"),
    ("warmup_steps", "-1", "warmup_steps must be an integer >= 0, got -1"),
    ("weight_decay", "-0.1", "weight_decay must be a number >= 0, got -0.1"),
    ("grad_clip", "-1.0", "grad_clip must be a number >= 0 (0 disables it), got -1.0"),
    ("max_steps", "0", "max_steps must be an integer >= 1, got 0"),
    ("max_steps", "99999999999999999999999", "max_steps must be at most 2147483647"),  # beyond 64 bits
    ("batch_size", "0", "batch_size must be an integer >= 1, got 0"),
    ("fim_rate", "1.5", "fim_rate must be in [0, 1], got 1.5"),
    ("fim_spm_rate", "nan", "fim_spm_rate must be a finite number, got nan"),
    ("norm_eps", "0.0", "norm_eps must be a number > 0, got 0.0"),
    ("vocab_size", "10", "vocab_size must be at least 263"),
    ("seed", "-1", "seed must be an integer in [0, 2**63), got -1"),
    ("corpus", '"dir"', "corpus must be a non-empty list of non-empty strings"),
    ("corpus", "[]", "corpus must be a non-empty list"),
    ("corpus", '["stdlib", 3]', "corpus must be a non-empty list"),
    ("corpus", '[""]', "corpus must be a non-empty list of non-empty strings"),
    ("precision", '"fp16"', "precision must be auto, fp32 or bf16, got 'fp16'"),
    ("device", '"meta"', "device must be auto, cpu, cuda, cuda:N or mps, got 'meta'"),
    ("name", '"../elsewhere"', "name must be a non-empty name without path separators"),
    ("name", '""', "name must be a non-empty name"),
    ("progress", '"yes"', "progress must be true or false, got 'yes'"),
    ("out_dir", "5", "out_dir must be a string, got 5"),
    ("tokenizer", '"a\\u0000b"', "tokenizer must be a string without NUL characters"),
    ("lr", "{ value = 1 }", "lr must be a number, got {'value': 1}"),
]


@pytest.mark.parametrize("key,value,expected", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_recipe_values_are_one_line_errors_naming_key_and_value(tmp_path, key, value, expected):
    recipe = tmp_path / "bad.toml"
    keys = {"name": '"x"', "corpus": '["stdlib"]', "dim": "32", "n_heads": "4", "lr": "0.001", key: value}
    recipe.write_text("".join(f"{k} = {v}\n" for k, v in keys.items()))
    with pytest.raises(CodeLlamaError) as caught:
        load_recipe(recipe)
    message = str(caught.value)
    assert message.startswith(f"{recipe}: ") and "\n" not in message
    assert expected in message


def test_documented_edge_values_are_accepted(tmp_path):
    recipe = tmp_path / "edge.toml"
    recipe.write_text('name = "edge"\ngrad_clip = 0\nwarmup_steps = 0\nlr = 1\nmin_lr = 0\nn_kv_heads = 0\n'
                      'fim_rate = 0\nfim_spm_rate = 1\nbeta1 = 0\n')
    config = load_recipe(recipe)
    assert (config.grad_clip, config.warmup_steps, config.lr, config.fim_spm_rate) == (0.0, 0, 1.0, 1.0)
    assert isinstance(config.lr, float) and isinstance(config.grad_clip, float)
    with pytest.raises(CodeLlamaError, match=r"recipe: grad_clip must be a number >= 0 \(0 disables it\)"):
        replace(config, grad_clip=-0.5)  # code that builds a TrainConfig is checked the same way


def test_bad_recipe_files_are_one_line_errors(tmp_path):
    (tmp_path / "dir.toml").mkdir()
    (tmp_path / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    (tmp_path / "huge.toml").write_text("# padding\n" * 200_000)
    (tmp_path / "newline-key.toml").write_text('"a\\nb" = 1\n')
    (tmp_path / "base-number.toml").write_text("base = 5\n")
    (tmp_path / "nested.toml").write_text("[model.extra]\ndim = 3\n")
    cases = {
        "dir.toml": "recipe not found",
        "latin1.toml": "invalid TOML: the file is not UTF-8 text",
        "huge.toml": "a recipe is at most 1048576 bytes",
        "newline-key.toml": "unknown recipe keys: 'a\\nb'",
        "base-number.toml": "base must be a recipe name or path (a string), got 5",
        "nested.toml": "unknown recipe keys: extra",
    }
    for name, expected in cases.items():
        with pytest.raises(CodeLlamaError) as caught:
            load_recipe(tmp_path / name)
        assert expected in str(caught.value) and "\n" not in str(caught.value), name
    with pytest.raises(CodeLlamaError, match="recipe not found"):
        load_recipe("x" * 5000)  # a name too long for the file system is simply not a recipe
    with pytest.raises(CodeLlamaError, match="recipe not found"):
        load_recipe("a\0b")


def test_cli_train_with_a_bad_recipe_prints_one_error_line_and_exits_2(tmp_path):
    recipe = tmp_path / "nan.toml"
    recipe.write_text('name = "nan"\n[optim]\nlr = nan\n')
    done = subprocess.run([sys.executable, "-m", "codellama", "train", str(recipe)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {recipe}: lr must be a finite number, got nan\n"
    assert not (tmp_path / "runs").exists()


def test_cli_train_with_a_missing_or_broken_recipe(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err.startswith("error: recipe not found")
    (tmp_path / "broken.toml").write_text("lr = [1,\n")
    assert main(["train", str(tmp_path / "broken.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'broken.toml'}: invalid TOML") and err.count("\n") == 1
    (tmp_path / "steps.toml").write_text('name = "s"\n')
    assert main(["train", str(tmp_path / "steps.toml"), "--max-steps", "-3"]) == 2
    assert "max_steps must be an integer >= 1, got -3" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "steps.toml"), "--until-step", "-1"]) == 2
    assert capsys.readouterr().err == "error: until_step must be an integer >= 0, got -1\n"


def _recipe_file(tmp_path: Path, config: TrainConfig) -> Path:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in vars(config).items()))
    return recipe


# ---- fuzzing ---------------------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML wants DEL escaped, JSON not


def _toml(value) -> str:
    """A TOML rendering of a JSON-ish value (inline tables for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf
                                                else repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{ " + ", ".join(f"{_toml_string(k)} = {_toml(v)}" for k, v in value.items()) + " }"


# Values of every type, and (more often) values of the right type near the edges of their ranges, so that a good
# share of the recipes are valid and the checks of each range are reached.
scalars = st.one_of(st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
plausible = st.one_of(st.integers(-2, 600), st.floats(-0.5, 1.5), st.sampled_from([0, 1, 0.0, 1.0, 1e-3, 2**31]),
                      st.sampled_from(["stdlib", "auto", "fp32", "bf16", "cpu", "cuda:0", "", "runs/x", "a/b"]),
                      st.lists(st.sampled_from(["stdlib", "src", ""]), max_size=2))
values = st.recursive(st.one_of(plausible, plausible, scalars),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(st.sampled_from(FIELDS), inner, max_size=2)),
                      max_leaves=4)
# One key in ten is random text (unknown keys, odd characters); the rest are fields, "base", or a near-miss.
recipe_keys = st.integers(0, 9).flatmap(lambda i: st.text(max_size=4) if i == 0 else
                                        st.sampled_from(FIELDS + ["base", "lr_"]))
recipe_dicts = st.dictionaries(recipe_keys, values, max_size=6) | st.dictionaries(recipe_keys, values, max_size=1)


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=recipe_dicts, sectioned=st.booleans())
def test_fuzz_recipe_values_give_a_valid_config_or_a_clean_error(tmp_path, monkeypatch, recipe, sectioned):
    monkeypatch.chdir(tmp_path)
    rss_before = peak_rss_mib()
    path = tmp_path / "fuzz.toml"
    header = "[section]\n" if sectioned else ""
    path.write_text(header + "".join(f"{_toml_string(k)} = {_toml(v)}\n" for k, v in recipe.items()))
    started = time.perf_counter()
    try:
        config = load_recipe(path)
    except CodeLlamaError as e:
        assert "\n" not in str(e) and len(str(e)) < 600
    else:
        assert math.isfinite(config.lr) and config.lr > 0 and 0 <= config.beta1 < 1 and 0 <= config.beta2 < 1
        assert config.max_steps >= 1 and config.batch_size >= 1 and config.warmup_steps >= 0
        assert isinstance(config.corpus, list) and all(isinstance(r, str) and r for r in config.corpus)
        assert all(isinstance(getattr(config, k), float) and math.isfinite(getattr(config, k))
                   for k in ("lr", "min_lr", "weight_decay", "grad_clip", "fim_rate", "rope_theta", "norm_eps"))
    assert time.perf_counter() - started < 2.0 and peak_rss_mib() - rss_before < 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fuzz.toml"]  # reading a recipe writes nothing


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list('[]{}=",.\n #abclrsep0123456789-+_\\\'')) | st.characters(),
                    max_size=120))
def test_fuzz_recipe_text_gives_a_valid_config_or_a_clean_error(tmp_path, text):
    path = tmp_path / "text.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_recipe(path)
    except CodeLlamaError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> bytes:
    run = tmp_path_factory.mktemp("small-ckpt")
    model = Transformer(ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=32, multiple_of=16, max_seq_len=8))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    save_run_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1,
                         "position": 8, "best_val": math.inf, "rng": rng_state(), "train_config": {},
                         "model_config": {}}, run)
    return (run / "ckpt.pt").read_bytes()


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_damaged_checkpoints_load_or_fail_cleanly(tmp_path, small_checkpoint, data):
    blob = bytearray(small_checkpoint)
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
    for _ in range(data.draw(st.integers(0, 4), label="flips")):
        if blob:
            at = data.draw(st.integers(0, len(blob) - 1), label="at")
            blob[at] ^= data.draw(st.integers(1, 255), label="mask")
    path = tmp_path / "ckpt.pt"
    path.write_bytes(bytes(blob))
    rss_before, started = peak_rss_mib(), time.perf_counter()
    try:
        ckpt = read_checkpoint_file(path)
    except CodeLlamaError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        assert ckpt["step"] >= 0 and isinstance(ckpt["model"], dict)
    assert time.perf_counter() - started < 2.0 and peak_rss_mib() - rss_before < 64  # no size field believed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
