"""Issue 15 item 2, ``codellama self-instruct``: a scripted responder (in process, and as a small OpenAI-style
HTTP server) answering from tests/fixtures/selfinstruct/pipeline.json with right, wrong, crashing, hanging and
hostile solutions keeps exactly the expected triplets; every stage resumes after SIGKILL without duplicating or
losing items; dedup; CLI errors; and the whole pipeline against ``codellama serve`` of the embedded model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from codellama.cli import main
from codellama.selfinstruct import stages
from codellama.selfinstruct.dedup import deduplicate
from codellama.selfinstruct.parsing import parse_questions, parse_solution, parse_tests
from codellama.selfinstruct.responders import Reply, Sampling
from codellama.selfinstruct.store import read_records
from conftest import serving_url  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "selfinstruct"
PIPELINE = json.loads((FIXTURES / "pipeline.json").read_text())
PROBLEMS = PIPELINE["problems"]
SAMPLING = Sampling(0.0, 1.0, 64)
N = 4  # solutions per question in the fixture
# question id -> (problem, kept sample, passed): three requests of three questions (see make_pipeline.py)
EXPECTED = {"q000000.000": ("rev", 2, 2), "q000001.000": ("fib", 3, 1), "q000002.001": ("add", 2, 2)}
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"))


def scripted_reply(content: str, seed: int, marker: str, stage_file: str) -> str:
    """What the scripted model answers: chosen by the prompt's text, solutions by the sample index (the item
    seed is ``base + hash * 1000 + sample`` and the tests use base seed 0)."""
    if "programming interview questions" in content:
        return next((r for topic, r in PIPELINE["question_replies"].items() if topic in content), "")
    for p in PROBLEMS.values():
        if p["question"] in content:
            if "Write unit tests" in content:
                return p["tests"]
            text = p["solutions"][seed % 1000]
            return text.replace("{MARKER!r}", repr(marker)).replace("{STAGE_FILE!r}", repr(stage_file))
    return "I do not know."


class ScriptedResponder:
    def __init__(self, marker: str = "/nonexistent", stage_file: str = "/nonexistent"):
        self.marker, self.stage_file, self.calls = marker, stage_file, 0

    def provenance(self) -> dict:
        return {"responder": "scripted", "model_name": "fixture"}

    def run(self, jobs, sampling):
        for job in jobs:
            self.calls += 1
            yield job, Reply(scripted_reply(job.messages[-1]["content"], job.seed, self.marker, self.stage_file),
                             "stop")

    def close(self) -> None:
        pass


class FakeEndpoint:
    """An OpenAI-compatible ``/v1/chat/completions`` answering with ``scripted_reply``, ``delay`` seconds per
    request; ``fail_first`` makes the first attempt of every distinct request a 503 (retries must cope)."""

    def __init__(self, marker: str, stage_file: str, delay: float = 0.0, fail_first: bool = False):
        seen: set = set()
        lock = threading.Lock()
        outer = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fixture", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                key = (content, body["seed"])
                with lock:
                    outer.requests += 1
                    first = key not in seen
                    seen.add(key)
                if fail_first and first:
                    self.send_response(503)
                    self.send_header("Retry-After", "0.05")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                time.sleep(delay)
                text = scripted_reply(content, body["seed"], marker, stage_file)
                self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def run_pipeline(work: Path, responder, marker: Path) -> dict:
    stages.run_questions(work, responder, count=9, batch=3, sampling=SAMPLING, progress=False)
    stages.run_tests(work, responder, sampling=SAMPLING, progress=False)
    stages.run_solutions(work, responder, n=N, sampling=SAMPLING, progress=False)
    stages.run_verify(work, workers=2, timeout=2.0, memory_mb=512, progress=False)
    return stages.run_export(work)


def content(work: Path, name: str) -> list[dict]:
    """A stage file's records without what legitimately differs between runs (provenance, timings)."""
    # The hostile solutions name paths under each run's own directory: the same up to that directory.
    rows = json.loads(json.dumps(read_records(work / name)).replace(str(work.parent), "BASE"))
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k not in ("provenance", "settings")}
        for v in r.get("verdicts", []):
            v.pop("duration", None)
            v.pop("message", None)
        out.append(r)
    return sorted(out, key=lambda r: r["id"])


# ---- the scripted pipeline ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("scripted")
    work, marker = base / "work", base / "escaped.txt"
    responder = ScriptedResponder(str(marker), str(work / "verify.jsonl"))
    t0 = time.monotonic()
    stats = run_pipeline(work, responder, marker)
    return work, marker, stats, time.monotonic() - t0


def test_scripted_pipeline_keeps_exactly_the_expected_triplets(scripted_run):
    work, marker, stats, _ = scripted_run
    dialogs = read_records(work / "sft.jsonl")
    assert {d["id"] for d in dialogs} == set(EXPECTED)
    for d in dialogs:
        name, sample, passed = EXPECTED[d["id"]]
        p = PROBLEMS[name]
        assert d["messages"][0] == {"role": "user", "content": p["question"]}
        assert d["messages"][1]["content"] == f"[PYTHON]\n{parse_solution(p['solutions'][sample]).code}\n[/PYTHON]"
        assert d["tests"] == parse_tests(p["tests"]).code
        assert d["provenance"]["sample"] == sample and d["provenance"]["passed"] == passed
        assert d["provenance"]["solution"]["prompt"]["name"] == "solutions"
    verify = {v["id"]: v for v in read_records(work / "verify.jsonl")}
    assert set(verify) == set(EXPECTED) | {"q000002.000"}  # prime: all four hostile, none kept
    assert verify["q000002.000"]["passed"] == 0 and verify["q000002.000"]["kept_sample"] is None
    statuses = {v["id"]: [x["status"] for x in v["verdicts"]] for v in verify.values()}
    assert statuses["q000000.000"] == ["failed", "error", "passed", "passed"]
    hang, fork_bomb, early_exit, right = statuses["q000001.000"]
    assert (hang, early_exit, right) == ("timeout", "error", "passed") and fork_bomb in ("timeout", "error")
    assert statuses["q000002.001"] == ["unparsed", "unparsed", "passed", "passed"]
    assert "passed" not in statuses["q000002.000"]
    assert stats | {"output": None} == {"generated_questions": 9, "after_dedup": 7, "with_tests": 4, "verified": 4,
                                        "with_passing_solution": 3, "kept": 3, "solutions_run": 16,
                                        "solutions_passed": 5, "output": None}
    assert json.loads((work / "stats.json").read_text())["kept"] == 3


def test_hostile_solutions_stay_contained(scripted_run):
    work, marker, _, _ = scripted_run
    assert not marker.exists()  # the file written from inside the sandbox never appeared outside it
    assert all(r["id"] != "forged" for r in read_records(work / "verify.jsonl"))  # nor its forged record
    assert len(read_records(work / "verify.jsonl")) == 4


def test_tests_and_questions_rejections_are_recorded(scripted_run):
    work, *_ = scripted_run
    tests = {t["id"]: t for t in read_records(work / "tests.jsonl")}
    assert {k: (t["status"], t["reason"]) for k, t in tests.items() if t["status"] != "ok"} == {
        "q000000.001": ("rejected", "no assert statements"),
        "q000001.001": ("rejected", "does not parse"),
        "q000002.002": ("rejected", "the tests define square_all themselves")}
    report = json.loads((work / "dedup.json").read_text())
    assert (report["generated"], report["exact_duplicates"], report["near_duplicates"], report["kept"]) == (9, 1, 1, 7)
    assert {(r["id"], r["duplicate_of"], r["kind"]) for r in report["removed"]} == {
        ("q000000.002", "q000000.000", "exact"), ("q000001.002", "q000001.000", "near")}
    sols = read_records(work / "solutions.jsonl")
    assert len(sols) == 16 and len({s["id"] for s in sols}) == 16
    for name in ("questions.raw.jsonl", "tests.jsonl", "solutions.jsonl"):
        for row in read_records(work / name):
            prov = row["provenance"]
            assert prov["responder"] == "scripted" and prov["prompt"]["version"] == "v1"
            assert prov["sampling"] == SAMPLING.to_dict() and isinstance(prov["seed"], int)


def test_rerun_is_a_no_op_and_other_settings_are_refused(scripted_run, tmp_path):
    work, marker, _, _ = scripted_run
    responder = ScriptedResponder(str(marker))
    before = {n: (work / n).read_bytes() for n in ("questions.raw.jsonl", "tests.jsonl", "solutions.jsonl")}
    stages.run_questions(work, responder, count=9, batch=3, sampling=SAMPLING, progress=False)
    stages.run_tests(work, responder, sampling=SAMPLING, progress=False)
    stages.run_solutions(work, responder, n=N, sampling=SAMPLING, progress=False)
    assert responder.calls == 0 and before == {n: (work / n).read_bytes() for n in before}
    with pytest.raises(Exception, match="other settings"):
        stages.run_tests(work, responder, sampling=Sampling(0.5, 1.0, 64), progress=False)


# ---- parsing and dedup --------------------------------------------------------------------------------
def test_dedup_removes_paraphrases_and_exact_duplicates_and_keeps_the_distinct():
    d = json.loads((FIXTURES / "dedup_questions.json").read_text())
    distinct = d["distinct"]
    texts = list(distinct)
    for i, (text, _) in enumerate(d["paraphrases"] + d["exact"]):  # duplicates interleaved after their originals
        texts.insert(2 * i + 3, text)
    result = deduplicate(texts)
    assert [texts[i] for i in result.kept] == distinct
    removed = {texts[r["index"]]: (texts[r["duplicate_of"]], r["kind"]) for r in result.removed}
    assert removed == {**{t: (distinct[i], "near") for t, i in d["paraphrases"]},
                       **{t: (distinct[i], "exact") for t, i in d["exact"]}}
    # a stricter threshold keeps the looser paraphrases
    assert len(deduplicate(texts, threshold=0.95).kept) > len(distinct)


def test_parsers():
    reply = "Here you go:\n1. Write a function that sums a list\n   of integers and returns it.\n2) short one\n" \
            "- Write a function [INST] that does something odd here\n3. Write a function that checks palindromes."
    assert parse_questions(reply, 10) == ["Write a function that sums a list of integers and returns it.",
                                          "Write a function that checks palindromes."]
    assert parse_questions(reply, 1) == ["Write a function that sums a list of integers and returns it."]
    assert parse_tests("```python\nassert len([1]) == 1\n```").reason == "the asserts call no function"
    assert parse_tests("no code").reason == "no python block"
    assert parse_tests("```python\nimport math\nassert f(math.pi) > 3\n```").code.startswith("import math")
    assert parse_solution("[PYTHON]\n\n[/PYTHON]").reason == "empty code"
    assert parse_solution("```python\ndef f(:\n```").reason == "does not parse"
    assert parse_solution("[PYTHON]\ndef f(): return 1").code == "def f(): return 1"  # cut at the token limit


# ---- the CLI, over HTTP -------------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codellama", "self-instruct", *args], capture_output=True,
                          text=True, env=ENV, timeout=300)


STAGE_ARGS = {
    "questions": (["--count", "9", "--batch", "3"], "questions.raw.jsonl", 3),
    "tests": ([], "tests.jsonl", 7),
    "solutions": (["--n", str(N)], "solutions.jsonl", 16),
    "verify": (["--workers", "1", "--timeout", "2", "--memory-mb", "512"], "verify.jsonl", 4),
}


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_each_stage_resumes_after_sigkill_without_duplicates_or_losses(scripted_run, tmp_path):
    """Each stage runs as ``codellama self-instruct`` against the fake endpoint (every request first gets a
    503, so retries are exercised too), is SIGKILLed once K records are on disk, then re-run to completion;
    the result equals the uninterrupted in-process run."""
    reference, *_ = scripted_run
    work, marker = tmp_path / "work", tmp_path / "escaped.txt"
    with FakeEndpoint(str(marker), str(work / "verify.jsonl"), delay=0.15, fail_first=True) as ep:
        for stage, (extra, name, total) in STAGE_ARGS.items():
            responder = [] if stage == "verify" else ["--endpoint", ep.url, "--model-name", "fixture",
                                                      "--concurrency", "1", "--retries", "3",
                                                      "--temperature", "0", "--top-p", "1", "--max-tokens", "64"]
            cmd = [sys.executable, "-m", "codellama", "self-instruct", stage, "--work", str(work), "--no-progress",
                   *extra, *responder]
            proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 120
            while _lines(work / name) < 1 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = _lines(work / name)
            assert 1 <= killed_at < total, (stage, killed_at, proc.stderr.read())
            with open(work / name, "ab") as f:  # and as if the kill had torn the last line
                f.write(b'{"id": "torn", "sett')
            r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            ids = [row["id"] for row in read_records(work / name)]
            assert len(ids) == total == len(set(ids)), (stage, ids)
            assert content(work, name) == content(reference, name), stage
        assert ep.requests > 0
    r = cli("export", "--work", str(work))
    assert r.returncode == 0, r.stderr
    assert "kept (question, tests, solution)" in r.stdout and re.search(r"with a passing solution\s+3", r.stdout)
    assert content(work, "sft.jsonl") == content(reference, "sft.jsonl")
    assert not marker.exists()
    prov = read_records(work / "tests.jsonl")[0]["provenance"]
    assert prov["responder"] == "endpoint" and prov["endpoint"] == ep.url and prov["model_name"] == "fixture"


@pytest.mark.parametrize("args, message", [
    (["questions", "--work", "{w}", "--count", "0"], "error: --count and --batch must be >= 1, got 0 and 10"),
    (["tests", "--work", "{w}"], "error: {w}/questions.jsonl not found: run `codellama self-instruct questions "
                                 "--work {w}` first"),
    (["verify", "--work", "{w}"], "error: {w}/tests.jsonl not found: run `codellama self-instruct tests --work {w}` "
                                  "first"),
    (["export", "--work", "{w}"], "error: {w}/questions.jsonl not found: run `codellama self-instruct questions "
                                  "--work {w}` first"),
    (["questions", "--work", "{w}", "--count", "2", "--endpoint", "http://127.0.0.1:9", "--model-name", "m"],
     "error: cannot reach endpoint http://127.0.0.1:9: [Errno 111] Connection refused"),
    (["questions", "--work", "{w}", "--count", "2", "--endpoint", "http://127.0.0.1:9"],
     "error: --endpoint needs --model-name (the model id the server serves)"),
    (["questions", "--work", "{w}", "--count", "2", "--top-p", "0"], "error: top_p must be in (0, 1], got 0.0"),
    (["solutions", "--work", "{w}", "--n", "x"], "error: argument --n: invalid int value: 'x'"),
    (["frobnicate", "--work", "{w}"], None),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    w = str(tmp_path / "w")
    try:
        code = main(["self-instruct", *[a.replace("{w}", w) for a in args]])
    except SystemExit as e:  # argparse's errors exit from inside the parser
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    if message:
        assert err == message.replace("{w}", w)


def test_unreachable_endpoint_via_subprocess(tmp_path):
    r = cli("questions", "--work", str(tmp_path), "--count", "2", "--endpoint", "http://127.0.0.1:9",
            "--model-name", "m")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: cannot reach endpoint http://127.0.0.1:9")


# ---- end to end against codellama serve -----------------------------------------------------------------
@pytest.fixture(scope="module")
def served():
    proc = subprocess.Popen([sys.executable, "-m", "codellama", "serve", "--port", "0", "--threads", "1",
                             "--max-batch-size", "4", "--log-level", "warning", "--name", "embedded"],
                            stderr=subprocess.PIPE, text=True, env=ENV)
    url = serving_url(proc, proc.kill)
    import httpx
    for _ in range(100):
        if httpx.get(url + "/health").status_code == 200:
            break
        time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(30)


def test_end_to_end_against_codellama_serve(served, tmp_path):
    url = served
    common = ["--endpoint", url, "--model-name", "embedded", "--concurrency", "4", "--max-tokens", "48",
              "--no-progress"]
    # The tiny model writes junk: a generated run must still complete every stage with its files.
    gen = tmp_path / "generated"
    for args in (["questions", "--count", "4", "--batch", "2"], ["tests"], ["solutions", "--n", "2"]):
        r = cli(args[0], "--work", str(gen), *args[1:], *common)
        assert r.returncode == 0, r.stderr
    r = cli("verify", "--work", str(gen), "--workers", "2", "--timeout", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = cli("export", "--work", str(gen), "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["generated_questions"] <= 4 and stats["kept"] <= stats["after_dedup"]
    raw = read_records(gen / "questions.raw.jsonl")
    assert len(raw) >= 2 and all(isinstance(row["reply"], str) for row in raw)
    prov = raw[0]["provenance"]
    assert prov["endpoint"] == url and prov["model_name"] == "embedded"
    assert prov["prompt"] == {"name": "questions", "version": "v1", "sha256": prov["prompt"]["sha256"]}
    assert prov["sampling"] == {"temperature": 0.8, "top_p": 0.95, "max_tokens": 48}
    # Imported questions take every later stage through the model for real.
    imported = tmp_path / "imported"
    qfile = tmp_path / "questions.txt"
    qfile.write_text("\n".join(PROBLEMS[n]["question"] for n in ("rev", "fib", "add")) + "\n")
    r = cli("questions", "--work", str(imported), "--count", "3", "--from", str(qfile))
    assert r.returncode == 0, r.stderr
    for args in (["tests"], ["solutions", "--n", "2"]):
        r = cli(args[0], "--work", str(imported), *args[1:], *common)
        assert r.returncode == 0, r.stderr
    tests = read_records(imported / "tests.jsonl")
    assert len(tests) == 3 and all(t["reply"] and t["provenance"]["stage"] == "tests" for t in tests)
    sols = read_records(imported / "solutions.jsonl")
    assert len(sols) == 2 * sum(t["status"] == "ok" for t in tests)
    r = cli("verify", "--work", str(imported), "--workers", "2", "--timeout", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = cli("export", "--work", str(imported))
    assert r.returncode == 0 and "generated questions" in r.stdout, r.stderr
    assert (imported / "stats.json").is_file() and (imported / "sft.jsonl").is_file()


# ---- the local responder --------------------------------------------------------------------------------
def test_local_responder_batches_with_each_items_own_seed(tmp_path):
    """``--model`` omitted: the embedded model through ``CodeLlama.chat``; a batched call gives every
    solution exactly the seed it records (the same text as asking for it alone)."""
    from codellama.selfinstruct.responders import ChatJob, LocalResponder

    responder = LocalResponder(None, batch_size=4, threads=1)
    assert responder.provenance()["responder"] == "local" and responder.provenance()["model"] == "default"
    sampling = Sampling(0.8, 0.95, 12)
    msgs = [{"role": "user", "content": "Write a function that adds two numbers."}]
    jobs = [ChatJob(f"q/{s}", msgs, stages.item_seed(0, "q", s)) for s in range(3)]
    batched = {job.key: reply.text for job, reply in responder.run(jobs, sampling)}
    alone = {job.key: next(iter(responder.run([job], sampling)))[1].text for job in jobs}
    assert batched == alone and len(set(batched.values())) > 1
    qfile = tmp_path / "q.txt"
    qfile.write_text(PROBLEMS["rev"]["question"] + "\n")
    assert main(["self-instruct", "questions", "--work", str(tmp_path / "w"), "--count", "1",
                 "--from", str(qfile)]) == 0
    assert main(["self-instruct", "tests", "--work", str(tmp_path / "w"), "--max-tokens", "16", "--threads", "1",
                 "--no-progress"]) == 0
    row = read_records(tmp_path / "w" / "tests.jsonl")[0]
    assert row["provenance"]["responder"] == "local" and row["provenance"]["sampling"]["max_tokens"] == 16
