"""The sandboxed executor: verdicts, and hostile programs that must be contained and scored as failures."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from codellama.errors import CodeLlamaError
from codellama.evaluation.execution import Executor, Limits, _processes_of, network_isolation_available

# Tight limits keep the hostile programs cheap on a small shared machine.
LIMITS = Limits(timeout=2.0, memory_mb=384, max_processes=8, file_size_mb=2)


@pytest.fixture(scope="module")
def executor():
    with Executor(workers=2, limits=LIMITS) as ex:
        yield ex


def _marker_processes(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(name))
            except OSError:
                pass
    return found


def test_basic_verdicts(executor):
    ok, bad, exc, syntax = executor.map(["x = 2\nassert x * 21 == 42\nprint('done')\n",
                                         "assert sorted([3, 1]) == [3, 1], 'not sorted'\n",
                                         "raise ValueError('boom')\n",
                                         "def f(:\n"])
    assert (ok.status, ok.output) == ("passed", "done\n")
    assert ok.passed and ok.duration < 2.0
    assert (bad.status, bad.message) == ("failed", "AssertionError: not sorted")
    assert (exc.status, exc.message) == ("error", "ValueError: boom")
    assert syntax.status == "error" and syntax.message.startswith("SyntaxError")


def test_program_can_import_stdlib_and_write_its_own_dir(executor):
    prog = ("import math, json, collections, heapq, re, fractions, decimal, itertools, encodings.idna\n"
            "open('scratch.txt', 'w').write('x' * 10)\n"
            "assert open('scratch.txt').read() == 'x' * 10\nassert math.comb(5, 2) == 10\n")
    assert executor.run(prog).status == "passed"


HOSTILE = {
    "infinite loop": ("while True:\n    pass\n", "timeout"),
    "sleep forever": ("import time\ntime.sleep(1000)\n", "timeout"),
    "memory bomb": ("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n", "error"),
    "huge output": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", "error"),
    "sys.exit(0) before asserts": ("import sys\nsys.exit(0)\nassert False\n", "error"),
    "os._exit(0) before asserts": ("import os\nos._exit(0)\nassert False\n", "error"),
    "kill its parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nassert False\n", None),
    "close stdout": ("import os\nos.close(1)\nos.close(2)\nassert 1 + 1 == 3\n", "failed"),
    "block on stdin": ("import sys\ndata = sys.stdin.read()\nx = input()\nassert False\n", "error"),
    "segfault": ("import ctypes\nctypes.string_at(0)\n", "error"),
    "fork then child returns, parent exits 0": ("import os\npid = os.fork()\nif pid:\n    os.waitpid(pid, 0)\n"
                                                "    os._exit(0)\n", "error"),
    "kill every process it can": ("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n"
                                  "    pass\nassert False\n", None),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained(executor, name):
    prog, expected = HOSTILE[name]
    t0 = time.monotonic()
    result = executor.run(prog)
    assert not result.passed, result
    if expected is not None:
        assert result.status == expected, result
    assert time.monotonic() - t0 < LIMITS.timeout + 5
    assert not result.extra.get("leaked_processes")
    # the executor is unharmed and still scores correctly afterwards
    assert executor.run("assert True\n").passed


def test_huge_output_is_capped(executor):
    result = executor.run("print('y' * 10**6)\nassert False\n")
    assert result.status == "failed"
    assert len(result.output) == LIMITS.output_chars


def test_fork_bomb_is_contained_and_leaves_nothing(executor):
    marker = "forkbomb_" + os.urandom(4).hex()
    prog = (f"import os\n# {marker}\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    limits = Limits(timeout=1.5, memory_mb=256, max_processes=8)
    t0 = time.monotonic()
    result = executor.run(prog, limits)
    assert result.status == "timeout"
    assert time.monotonic() - t0 < 10
    if executor.isolation == "uid":
        for uid in executor.uids:
            assert _processes_of(uid) == []
    plain = executor.run("import os\nwhile True:\n    os.fork()\n", limits)
    assert plain.status in ("error", "timeout") and not plain.passed
    time.sleep(0.1)
    assert executor.run("assert 2 + 2 == 4\n").passed


@pytest.fixture
def visible_dir():
    """A directory the sandboxed program can see (pytest's tmp_path lives in a 0700 tree it cannot enter)."""
    path = tempfile.mkdtemp(prefix="codellama-sentinel-")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_files_outside_the_sandbox_survive(executor, visible_dir):
    if executor.isolation != "uid":
        pytest.skip("only the private-uid isolation (running as root) protects your files; see execution.py")
    sentinel = visible_dir / "sentinel.txt"
    sentinel.write_text("keep me")
    os.chmod(sentinel, 0o644)
    prog = (f"import os, shutil\npath = {str(sentinel)!r}\nassert os.path.exists(path), 'cannot see it'\n"
            "for attempt in (lambda: os.remove(path), lambda: open(path, 'w').write('gone'),\n"
            "                lambda: os.chmod(path, 0o777), lambda: shutil.rmtree(os.path.dirname(path)),\n"
            "                lambda: os.rename(path, path + '.x')):\n"
            "    try:\n        attempt()\n    except OSError:\n        pass\n"
            "assert not os.path.exists(path), 'still there'\n")
    result = executor.run(prog)
    assert result.status == "failed" and result.message == "AssertionError: still there"
    assert sentinel.read_text() == "keep me"
    assert oct(sentinel.stat().st_mode & 0o777) == oct(0o644)


def test_no_network_under_uid_isolation(executor):
    if executor.isolation != "uid" or not network_isolation_available():
        pytest.skip("network is only cut off under the private-uid isolation, where namespaces are allowed")
    prog = ("import socket\ns = socket.socket()\ns.settimeout(1)\n"
            "try:\n    s.connect(('1.1.1.1', 53))\n    ok = True\nexcept OSError:\n    ok = False\nassert ok\n")
    assert executor.run(prog).status == "failed"


def test_limits_validation():
    with pytest.raises(CodeLlamaError, match="timeout"):
        Limits(timeout=0)
    with pytest.raises(CodeLlamaError, match="max_processes"):
        Limits(max_processes=0)
    with pytest.raises(CodeLlamaError, match="workers"):
        Executor(workers=0)
