"""MultiPL-E (HumanEval translated into C++, Java, PHP, TypeScript, C# and Bash): loading, prompt repair, and a runner
that executes a built program with the language's native toolchain in a subprocess.

The upstream "reworded" files mark only the first line of each doc comment; :func:`repair_prompt` puts the comment
marker back on the rest of the block so that prompt + completion + tests compiles.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from codellama.errors import CodeLlamaError

from ._sandbox_workers import UID_BASE, UID_SLOTS, kill_uid

LANGUAGES: tuple[str, ...] = ("cpp", "java", "php", "ts", "cs", "sh")
FILE_PATTERN = "humaneval-{lang}-reworded.jsonl"
COMMENT_MARKERS: dict[str, str] = {"cpp": "//", "java": "//", "php": "//", "ts": "//", "cs": "//", "sh": "#"}
JAVATUPLES_JAR = "/usr/share/java/javatuples.jar"
# tool -> the package that provides it (Debian unless it says npm)
_PACKAGES: dict[str, str] = {
    "g++": "Debian package g++", "javac": "Debian package default-jdk-headless",
    "java": "Debian package default-jdk-headless", "php": "Debian package php-cli", "tsc": "npm package typescript",
    "node": "Debian package nodejs", "mcs": "Debian package mono-mcs", "mono": "Debian package mono-runtime",
    "bash": "Debian package bash", JAVATUPLES_JAR: "Debian package libjavatuples-java",
}
_TOOLS: dict[str, tuple[str, ...]] = {
    "cpp": ("g++",), "java": ("javac", "java", JAVATUPLES_JAR), "php": ("php",), "ts": ("tsc", "node"),
    "cs": ("mcs", "mono"), "sh": ("bash",),
}
STDERR_TAIL = 2000
# seconds per step (compile, run): javac and tsc alone take a few seconds on a busy machine
DEFAULT_TIMEOUT = 15.0


@dataclass(frozen=True)
class MultiplProblem:
    name: str
    language: str
    prompt: str  # repaired
    tests: str
    stop_tokens: tuple[str, ...]


@dataclass(frozen=True)
class Verdict:
    status: str  # "passed", "failed", "timeout" or "error"
    stderr: str = ""
    returncode: int | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _check_lang(lang: str) -> str:
    if lang not in LANGUAGES:
        raise CodeLlamaError(f"unknown MultiPL-E language {lang!r}; expected one of {', '.join(LANGUAGES)}")
    return lang


def repair_prompt(prompt: str, lang: str) -> str:
    """Give every line of the leading doc comment block its comment marker.

    The block runs from the first line that starts with the marker up to (not including) the last non-blank line,
    which is the function signature. Lines already marked are kept as they are, so the repair is idempotent; blank
    lines inside the block become a bare marker. C# is already correct and comes back unchanged.
    """
    marker = COMMENT_MARKERS[_check_lang(lang)]
    lines = prompt.split("\n")
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    if not nonblank:
        return prompt
    signature = nonblank[-1]
    start = next((i for i in range(signature) if lines[i].lstrip().startswith(marker)
                  and not (lang == "sh" and lines[i].startswith("#!"))), None)
    if start is None:
        return prompt
    first = lines[start]
    indent = first[:len(first) - len(first.lstrip())]
    # keep the upstream spacing style: "// text" or "//text"
    spaced = first.lstrip()[len(marker):len(marker) + 1] == " "
    for i in range(start + 1, signature):
        text = lines[i]
        if text.lstrip().startswith(marker):
            continue
        if not text.strip():
            lines[i] = indent + marker
        else:
            lines[i] = indent + marker + (" " if spaced else "") + text
    return "\n".join(lines)


def load_problems(path_or_dir: str | os.PathLike[str], lang: str) -> list[MultiplProblem]:
    """Problems from a MultiPL-E ``humaneval-{lang}-reworded.jsonl`` file (or the directory holding it)."""
    _check_lang(lang)
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / FILE_PATTERN.format(lang=lang)
    if not path.is_file():
        raise CodeLlamaError(f"MultiPL-E file not found: {path}")
    problems: list[MultiplProblem] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problems.append(MultiplProblem(
                    name=str(record["name"]), language=lang, prompt=repair_prompt(str(record["prompt"]), lang),
                    tests=str(record["tests"]), stop_tokens=tuple(str(t) for t in record["stop_tokens"])))
            except (ValueError, KeyError, TypeError) as error:
                raise CodeLlamaError(f"{path}:{number}: bad MultiPL-E record ({type(error).__name__}: {error})")
    return problems


def build_program(problem: MultiplProblem, completion: str) -> str:
    """MultiPL-E's construction: prompt + completion + newline + tests."""
    return problem.prompt + completion + "\n" + problem.tests


def truncate(completion: str, stop_tokens: tuple[str, ...] | list[str]) -> str:
    """Cut ``completion`` at the earliest occurrence of any stop token."""
    cut = len(completion)
    for token in stop_tokens:
        if token:
            at = completion.find(token)
            if 0 <= at < cut:
                cut = at
    return completion[:cut]


def _tool_path(tool: str) -> str | None:
    if tool.startswith("/"):
        return tool if os.path.exists(tool) else None
    return shutil.which(tool)


def toolchain_available(lang: str) -> bool:
    return all(_tool_path(tool) is not None for tool in _TOOLS[_check_lang(lang)])


def require_toolchain(lang: str) -> None:
    """CodeLlamaError naming the package to install when ``lang``'s compiler or runtime is missing."""
    _require_tools(_check_lang(lang))


def _require_tools(lang: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for tool in _TOOLS[lang]:
        path = _tool_path(tool)
        if path is None:
            raise CodeLlamaError(f"{lang} toolchain missing: {tool} not found (install the {_PACKAGES[tool]})")
        found[tool] = path
    return found


# Started as root, a model's program must not run as root: each job runs as an otherwise unused uid taken from
# this pool (above the Python sandbox's slots), owning nothing but its own work directory, so RLIMIT_NPROC binds
# and it cannot touch your files or processes. Not root: it runs as you, like the Python sandbox's rlimits mode.
_PROGRAM_UIDS: queue.SimpleQueue[int] = queue.SimpleQueue()
for _uid in range(UID_BASE + UID_SLOTS, UID_BASE + UID_SLOTS + 64):
    _PROGRAM_UIDS.put(_uid)


def _limits(cpu_seconds: int, address_space: int | None, uid: int | None):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        if os.getuid() != 0:
            resource.setrlimit(resource.RLIMIT_NPROC, (512, 512))
    return apply


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


# Under mono a failed Debug.Assert only prints (the process still exits 0). MultiPL-E's C# evaluator routes the
# trace listener to stderr and reads a failure from these markers; so do we, on top of the exit status.
MONO_ENV = {"MONO_TRACE_LISTENER": "Console.Error"}
MONO_FAILURE_MARKERS = ("System.Diagnostics.DefaultTraceListener.Fail", "Unhandled Exception")


def _run(argv: list[str], cwd: str, timeout: float, address_space: int | None,
         env: dict[str, str] | None = None, uid: int | None = None) -> tuple[str, int | None, str]:
    """Run one step: ("ok"|"exit"|"timeout", returncode, the whole stderr)."""
    process = subprocess.Popen(
        argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True, preexec_fn=_limits(max(1, int(timeout) + 1), address_space, uid),
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": cwd, "LANG": "C.UTF-8", "TMPDIR": cwd,
             **(env or {})})
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, err = process.communicate()
        return "timeout", None, _text(err)
    finally:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    return ("ok" if process.returncode == 0 else "exit"), process.returncode, _text(err)


_GIB = 1 << 30


def run_program(lang: str, program: str, timeout: float = DEFAULT_TIMEOUT) -> Verdict:
    """Compile (where the language needs it) and run ``program``; passed means compiled and exited with status 0.

    ``timeout`` is wall-clock seconds for each step. A compile error is a "failed" verdict carrying the compiler's
    message; a missing toolchain raises CodeLlamaError naming the package to install.
    """
    tools = _require_tools(_check_lang(lang))
    uid = _PROGRAM_UIDS.get() if os.getuid() == 0 else None
    try:
        return _compile_and_run(lang, program, timeout, tools, uid)
    finally:
        if uid is not None:
            kill_uid(uid)  # whatever it left running, even outside its session
            _PROGRAM_UIDS.put(uid)


def _compile_and_run(lang: str, program: str, timeout: float, tools: dict[str, str], uid: int | None) -> Verdict:
    with tempfile.TemporaryDirectory(prefix=f"multipl-{lang}-") as work:
        steps: list[tuple[list[str], int | None]]
        if lang == "cpp":
            source = "prog.cpp"
            steps = [([tools["g++"], "-std=c++17", "-O0", "-o", "prog", source], 4 * _GIB), (["./prog"], 4 * _GIB)]
        elif lang == "java":
            source = "Problem.java"
            jar = tools[JAVATUPLES_JAR]
            # the JVM reserves far more address space than it uses: no RLIMIT_AS for it
            steps = [([tools["javac"], "-nowarn", "-cp", jar, source], None),
                     ([tools["java"], "-ea", "-cp", f".:{jar}", "Problem"], None)]
        elif lang == "php":
            source = "prog.php"
            steps = [([tools["php"], source], 4 * _GIB)]
        elif lang == "ts":
            source = "prog.ts"
            steps = [([tools["tsc"], "--target", "es2020", "--lib", "es2020,dom", "--skipLibCheck", source], None),
                     ([tools["node"], "prog.js"], None)]
        elif lang == "cs":
            source = "prog.cs"
            steps = [([tools["mcs"], "-d:DEBUG", "-r:System.Numerics.dll", "-out:prog.exe", source], None),
                     ([tools["mono"], "prog.exe"], None)]
        else:
            source = "prog.sh"
            steps = [([tools["bash"], source], 4 * _GIB)]
        Path(work, source).write_text(program, encoding="utf-8")
        if uid is not None:
            os.chown(work, uid, uid)
            os.chown(Path(work, source), uid, uid)
        for index, (argv, address_space) in enumerate(steps):
            compiling = index < len(steps) - 1
            mono_run = lang == "cs" and not compiling
            try:
                outcome, code, err = _run(argv, work, timeout, address_space, MONO_ENV if mono_run else None, uid)
            except OSError as error:
                return Verdict("error", f"{argv[0]}: {error}")
            if outcome == "timeout":
                return Verdict("timeout", err[-STDERR_TAIL:])
            if outcome == "ok" and mono_run and any(marker in err for marker in MONO_FAILURE_MARKERS):
                outcome = "exit"
            if outcome == "exit":
                return Verdict("failed", ("compile error: " if compiling else "") + err[-STDERR_TAIL:], code)
        return Verdict("passed", "", 0)


def to_exec_result(verdict: Verdict, duration: float = 0.0):
    """The harness's ExecResult for a verdict: same status strings, a one-line message, the stderr as output."""
    from .execution import ExecResult
    lines = [line.strip() for line in verdict.stderr.splitlines() if line.strip()]
    message = lines[0][:300] if lines else ("" if verdict.passed else f"exit status {verdict.returncode}")
    return ExecResult(verdict.status, message, round(duration, 3), verdict.stderr)


def run_programs(jobs: list[tuple[str, str, float]], workers: int | None = None,
                 on_result: Callable[[int, object], None] | None = None) -> list:
    """Run (language, program, timeout) jobs on a thread pool (each job is its own subprocess); ExecResults in
    order. The toolchains are checked once up front, so a missing one is one clear error, not N failures."""
    from concurrent.futures import ThreadPoolExecutor
    for lang in sorted({lang for lang, _, _ in jobs}):
        _require_tools(_check_lang(lang))

    def one(index: int):
        lang, program, timeout = jobs[index]
        start = time.monotonic()
        result = to_exec_result(run_program(lang, program, timeout), time.monotonic() - start)
        if on_result is not None:
            on_result(index, result)
        return result

    if not jobs:
        return []
    with ThreadPoolExecutor(max(1, min(workers or os.cpu_count() or 1, len(jobs)))) as pool:
        return list(pool.map(one, range(len(jobs))))


def problems(data: str | os.PathLike[str] | None, lang: str, timeout: float = DEFAULT_TIMEOUT) -> list:
    """harness.Problem objects for one language: continue the (repaired) prompt, cut at the data's stop tokens,
    run prompt + completion + tests with the language's toolchain. No reference solutions exist upstream."""
    from .harness import Problem
    if data is None:
        raise CodeLlamaError("multipl-e needs --data PATH (humaneval-LANG-reworded.jsonl or the directory holding it)")
    out = []
    for p in load_problems(data, lang):
        out.append(Problem(task_id=p.name, kind="complete", prompt=p.prompt, stop=list(p.stop_tokens),
                           program=lambda c, p=p: build_program(p, truncate(c, p.stop_tokens)), reference="",
                           timeout=timeout, language=lang))
    return out
