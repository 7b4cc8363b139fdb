"""MBPP-Infilling v1: the shipped mask file, its reproducibility from MBPP, mask placement, oracle and empty
middles through the sandbox, seed independence, scoring of samples files and the bootstrap intervals.

The tests that rebuild from MBPP read ``../shared/data/mbpp/mbpp.jsonl`` and skip when it is absent; the others
only need the file shipped in the package."""

from __future__ import annotations

import ast
import gzip
import json
import warnings
from pathlib import Path

import pytest

from codellama.cli import main
from codellama.errors import CodeLlamaError
from codellama.evaluation import mbpp_infilling as mi
from codellama.evaluation.execution import Limits
from codellama.evaluation.harness import score_samples
from codellama.evaluation.metrics import bootstrap_ci

MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"
COUNTS = {"single-line": 500, "multi-line": 459, "random-span": 500}
# Reference solutions that fail their own asserts under the default 3 s limit: 341 (set iteration order in this
# MBPP revision) always; 123 needs ~5 s on a slow core, so it may pass on a fast one.
REFERENCE_FAILS = {341}
REFERENCE_MAY_TIME_OUT = {123}
EMPTY_MIDDLE_PASSES = {"single-line": 18, "multi-line": 1, "random-span": 4}


@pytest.fixture(scope="module")
def shipped() -> tuple[dict, list[dict]]:
    return mi.load()


@pytest.fixture(scope="module")
def mbpp_path() -> Path:
    if not MBPP.is_file():
        pytest.skip("../shared/data/mbpp/mbpp.jsonl is absent")
    return MBPP


def _run(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ---- the file ------------------------------------------------------------------------------------------
def test_shipped_file_equals_a_fresh_rebuild(shipped, mbpp_path, tmp_path):
    header, rows = mi.build(mbpp_path)
    assert (header, rows) == shipped
    assert gzip.decompress(mi.serialize(header, rows)) == gzip.decompress(mi.DATA_FILE.read_bytes())
    assert mi.serialize(header, rows) == mi.serialize(*mi.build(mbpp_path))  # gzip bytes are stable too
    assert mi.main(["build", "--data", str(mbpp_path), "--check"]) == 0
    out = tmp_path / "v1.jsonl.gz"
    assert mi.main(["build", "--data", str(mbpp_path), "--output", str(out)]) == 0
    assert mi.load(out) == shipped
    tampered = tmp_path / "t.jsonl.gz"
    text = gzip.decompress(out.read_bytes()).decode().replace("MBPP-Infilling-v1/single-line/11\"",
                                                              "MBPP-Infilling-v1/single-line/12\"", 1)
    tampered.write_bytes(gzip.compress(text.encode()))
    assert mi.main(["build", "--data", str(mbpp_path), "--check", "--output", str(tampered)]) == 1


def test_build_refuses_another_mbpp_revision(tmp_path):
    other = tmp_path / "mbpp.jsonl"
    other.write_text(json.dumps({"text": "t", "code": "def f():\n    return 1", "task_id": 11,
                                 "test_setup_code": "", "test_list": ["assert f() == 1"]}) + "\n")
    with pytest.raises(CodeLlamaError, match="not the MBPP revision"):
        mi.build(other)


def test_header_counts_and_skipped_tasks(shipped, mbpp_path):
    header, rows = shipped
    assert header["version"] == "v1" and header["source"]["sha256"] == mi.sha256_file(mbpp_path)
    assert header["source"]["license"] == "CC BY 4.0"
    assert header["counts"] == COUNTS
    assert {s: sum(r["subset"] == s for r in rows) for s in mi.SUBSETS} == COUNTS
    assert header["skipped"]["single-line"] == [] and header["skipped"]["random-span"] == []
    skipped = header["skipped"]["multi-line"]
    assert len(skipped) == 41 and set(skipped).isdisjoint(r["mbpp_task_id"] for r in rows
                                                          if r["subset"] == "multi-line")
    # Skipped because every function body in them is a single line: no two consecutive body lines.
    from codellama.evaluation.mbpp import load_mbpp
    tasks = load_mbpp(mbpp_path)
    for tid in skipped:
        for node in ast.walk(_parse(tasks[tid]["code"])):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.body[0].lineno <= 0, tid


def test_rows_reproduce_every_reference_solution(shipped, mbpp_path):
    from codellama.evaluation.mbpp import load_mbpp
    tasks = load_mbpp(mbpp_path)
    _, rows = shipped
    for r in rows:
        task = tasks[r["mbpp_task_id"]]
        assert r["code_prefix"] + r["middle"] + r["code_suffix"] == task["code"], r["task_id"]
        assert r["task_id"] == f"MBPP-Infilling-v1/{r['subset']}/{r['mbpp_task_id']}"
        assert (r["text"], r["test_list"], r["test_setup_code"]) == \
            (task["text"], task["test_list"], task["test_setup_code"])


def test_model_context_carries_the_task_and_the_tests(shipped):
    _, rows = shipped
    for r in rows:
        assert r["prefix"] == f"# {r['text'].strip()}\n" + r["code_prefix"]
        tests = "\n".join(r["test_list"]) + "\n"
        assert r["suffix"].startswith(r["code_suffix"]) and r["suffix"].endswith(tests)
        between = r["suffix"][len(r["code_suffix"]):-len(tests)]
        code = r["code_prefix"] + r["middle"] + r["code_suffix"]
        setup = r["test_setup_code"].rstrip("\n") + "\n" if r["test_setup_code"].strip() else ""
        assert (code + between).endswith("\n\n" + setup), r["task_id"]  # a blank line before the tests
        prog = mi.program(r, r["middle"])
        assert prog.startswith(code) and prog.rstrip().endswith(r["test_list"][-1].rstrip())


def _parse(code: str) -> ast.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))  # MBPP's "\w" in plain strings
        return ast.parse(code)


def _headers_and_bodies(code: str) -> tuple[set[int], list[tuple[int, int]]]:
    """1-based header lines of every function and the (first, last) line of every body, from ``ast``."""
    headers, bodies = set(), []
    for node in ast.walk(_parse(code)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            top = min([node.lineno] + [d.lineno for d in node.decorator_list])
            headers.update(range(top, node.body[0].lineno))
            headers.add(node.lineno)
            bodies.append((node.body[0].lineno, node.end_lineno))
    return headers, bodies


def test_masks_lie_inside_function_bodies(shipped):
    _, rows = shipped
    for r in rows:
        code = r["code_prefix"] + r["middle"] + r["code_suffix"]
        first = r["code_prefix"].count("\n") + 1
        last = first + r["middle"].rstrip("\n").count("\n")
        masked = set(range(first, last + 1))
        headers, bodies = _headers_and_bodies(code)
        assert masked.isdisjoint(headers), r["task_id"]
        assert any(a <= first and last <= b for a, b in bodies), r["task_id"]
        lines = code.split("\n")
        assert not any(lines[i - 1].lstrip().startswith(("def ", "async def ", "@")) for i in masked)
        assert r["middle"].strip() and "def " in r["code_prefix"]  # never the whole solution
        n_lines = len(r["middle"].splitlines())
        if r["subset"] == "single-line":
            assert n_lines == 1 and r["code_prefix"].endswith("\n")
            assert r["middle"].endswith("\n") or not r["code_suffix"]  # the last line may have no newline
        elif r["subset"] == "multi-line":
            assert 2 <= n_lines <= 5 and r["code_prefix"][-1:] in ("", "\n")
            assert r["middle"].endswith("\n") or not r["code_suffix"]
    # Random spans start and end anywhere: mid-line on both sides for most of them.
    spans = [r for r in rows if r["subset"] == "random-span"]
    mid = sum(not r["code_prefix"].endswith("\n") and not r["middle"].endswith("\n") for r in spans)
    assert mid > len(spans) // 2


# ---- execution -----------------------------------------------------------------------------------------
def test_oracle_middles_pass_except_failing_references():
    for subset in mi.SUBSETS:
        problems = mi.problems(subset)
        assert len(problems) == COUNTS[subset]
        res = score_samples(problems, [{"task_id": p.task_id, "completion": p.reference} for p in problems],
                            workers=2, progress=False, text_metrics=True)
        failed = {p["task_id"] for p in res["problems"] if not p["correct"]}
        failed_ids = {int(t.rsplit("/", 1)[1]) for t in failed}
        assert REFERENCE_FAILS <= failed_ids <= REFERENCE_FAILS | REFERENCE_MAY_TIME_OUT, (subset, failed)
        for p in res["problems"]:
            if p["task_id"] in failed and int(p["task_id"].rsplit("/", 1)[1]) in REFERENCE_MAY_TIME_OUT:
                assert p["samples"][0]["status"] == "timeout"
        assert res["metrics"]["exact_match"] == 1.0 and res["metrics"]["edit_similarity"] == 1.0


def test_empty_middle_pass_rates():
    # A 1 s limit keeps this fast; the counts are those of the default 3 s (no empty middle passes slowly).
    for subset in mi.SUBSETS:
        problems = mi.problems(subset)
        res = score_samples(problems, [{"task_id": p.task_id, "completion": ""} for p in problems],
                            workers=2, progress=False, limits=Limits(timeout=1.0))
        assert res["metrics"]["pass@1"] == EMPTY_MIDDLE_PASSES[subset] / COUNTS[subset], subset


def test_add_scores_on_oracle_and_broken_samples():
    problems = mi.problems("multi-line")[:4]
    samples = [{"task_id": p.task_id, "completion": p.reference} for p in problems[:2]]
    samples += [{"task_id": p.task_id, "completion": "    pass\n"} for p in problems[2:]]
    res = score_samples(problems, samples, workers=2, progress=False, text_metrics=True)
    mi.add_scores(res, problems, workers=2)
    m = res["metrics"]
    assert m["pass@1"] == 0.5 and m["exact_match"] == 0.5 and m["exact_match_codexglue"] == 0.5
    assert 50.0 < m["edit_similarity_lcc"] < 100.0 and 0.5 < m["edit_similarity"] < 1.0
    assert m["pass@1_empty_middle"] == 0.0 and res["empty_middle_passed"] == []
    ci = res["confidence_intervals"]
    assert ci["pass@1"] == list(bootstrap_ci([1, 1, 0, 0])) and ci["pass@1_empty_middle"] == [0.0, 0.0]
    assert set(ci) == set(res["metric_definitions"]) == {"exact_match", "edit_similarity", "exact_match_codexglue",
                                                         "edit_similarity_lcc", "pass@1", "pass@1_empty_middle"}
    assert "0-100" in res["metric_definitions"]["edit_similarity_lcc"]


# ---- the command ---------------------------------------------------------------------------------------
def test_benchmark_does_not_depend_on_the_sampling_seed(monkeypatch, capsys):
    from codellama.evaluation import command, harness
    seen = []

    class FakeModel:
        name = "fake"

    def fake_run_benchmark(llama, bench, problems, settings, **kw):
        seen.append((settings.seed, kw["extra_settings"], [(p.task_id, p.prompt, p.suffix, p.reference,
                                                            p.program("X")) for p in problems]))
        raise CodeLlamaError("stop before generating")

    monkeypatch.setattr(command, "_load", lambda args: FakeModel())
    monkeypatch.setattr(harness, "run_benchmark", fake_run_benchmark)
    for seed in ("1", "2"):
        code, _, err = _run(["eval", "mbpp-infilling", "--subset", "random-span", "--seed", seed,
                             "--temperature", "0.8", "--no-progress"], capsys)
        assert code == 2 and "stop before generating" in err
    (s1, extra1, p1), (s2, extra2, p2) = seen
    assert (s1, s2) == (1, 2) and p1 == p2 and len(p1) == COUNTS["random-span"]
    assert extra1 == extra2 and extra1["subset"] == "random-span" and extra1["version"] == "v1"
    assert extra1["source_sha256"] == mi.SOURCE["sha256"]


def test_evaluate_infers_the_subset_from_the_ids(tmp_path, capsys):
    problems = mi.problems("random-span")[:3]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"task_id": p.task_id, "completion": p.reference}) + "\n" for p in problems))
    code, out, err = _run(["eval", "evaluate", str(path), "--no-progress", "--workers", "2"], capsys)
    assert code == 0, err
    res = json.loads(path.with_suffix(".results.json").read_text())
    assert res["benchmark"] == "mbpp-infilling" and res["settings"]["subset"] == "random-span"
    assert res["settings"]["version"] == "v1" and res["settings"]["source_sha256"] == mi.SOURCE["sha256"]
    m = res["metrics"]
    assert (m["pass@1"], m["exact_match"], m["exact_match_codexglue"], m["edit_similarity_lcc"]) == (1, 1, 1, 100)
    assert m["pass@1_empty_middle"] == 0.0 and res["confidence_intervals"]["pass@1"] == [1.0, 1.0]
    # The old seeded ids cannot be scored against the new benchmark, and say so.
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"task_id": "MBPP-Infilling/line/11", "completion": "x"}) + "\n")
    code, _, err = _run(["eval", "evaluate", str(old), "--no-progress"], capsys)
    assert code == 2 and "old seeded masks" in err


def test_data_flag_verifies_against_the_source(tmp_path, capsys, mbpp_path):
    assert [p.prompt for p in mi.problems("multi-line", mbpp_path)] == [p.prompt for p in mi.problems("multi-line")]
    other = tmp_path / "mbpp.jsonl"
    other.write_text(mbpp_path.read_text().replace("Write a", "Write  a", 1))
    with pytest.raises(CodeLlamaError, match="sha256"):
        mi.problems("single-line", other)
    with pytest.raises(CodeLlamaError, match="unknown mbpp-infilling subset"):
        mi.problems("random-span-light")


# ---- bootstrap -----------------------------------------------------------------------------------------
def test_bootstrap_ci_small_cases():
    # n = 4 values 0, 0, 0, 1: a resample's mean is k/4 with k ~ Binomial(4, 1/4); P(k = 0) = 0.32 > 2.5% and
    # P(k <= 2) = 0.949 < 97.5% <= P(k <= 3) = 0.996, so the interval is (0, 0.75).
    assert bootstrap_ci([0, 0, 0, 1]) == (0.0, 0.75)
    assert bootstrap_ci([0, 1]) == (0.0, 1.0)  # means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    assert bootstrap_ci([0.25] * 7) == (0.25, 0.25) and bootstrap_ci([3.0]) == (3.0, 3.0)
    values = [i % 3 / 2 for i in range(60)]
    low, high = bootstrap_ci(values)
    assert (low, high) == bootstrap_ci(values, n_resamples=1000, seed=0)
    assert low < sum(values) / len(values) < high and bootstrap_ci(values, seed=1) != (low, high)
    assert high - low < bootstrap_ci(values[:15])[1] - bootstrap_ci(values[:15])[0]  # fewer problems, wider
    with pytest.raises(CodeLlamaError):
        bootstrap_ci([])
