"""Issue 12, the evaluation sandbox: programs that try to fake a pass. Every attack program ends with a failing
test, so it can only score "passed" by forging the verdict; each must score as a failure while honest programs
still pass. (Links, leftovers, lost output and unencodable text: tests/test_execution.py.)

Run under each isolation this machine allows: as root, "uid" with the IPC and mount namespaces (where the
kernel allows them) and without them (the fallback clean-up); otherwise "rlimits"."""

from __future__ import annotations

import dis
import importlib.util
import os
import time
from pathlib import Path

import pytest

from codellama.evaluation import execution
from codellama.evaluation.execution import Executor, Limits
from conftest import cmdline_has

LIMITS = Limits(timeout=3.0, memory_mb=512, max_processes=8, file_size_mb=2)
ROOT = os.geteuid() == 0
FAILS = "\nassert False, 'the tests fail'\n"

MODES = ["uid", "uid-fallback"] if ROOT else ["rlimits"]


@pytest.fixture(scope="module", params=MODES)
def executor(request):
    with Executor(workers=1, limits=LIMITS, namespaces=request.param == "uid") as ex:
        ex.mode = request.param
        yield ex


# ---- item 2: a faked pass -------------------------------------------------------------------------------
# Each first collects anything that might be a pass token (the old executor kept one in the child's frames) and
# then writes forged "pass" lines to every descriptor and path it can find before exiting 0.
FORGE = r'''
import json, os, sys
def forge(tokens):
    lines = [json.dumps({"ok": t, "pid": os.getpid(), "status": "passed"}) + "\n" for t in tokens]
    lines.append(json.dumps({"status": "passed", "pid": os.getpid()}) + "\n")
    for fd in range(3, 300):
        for line in lines:
            try:
                os.write(fd, line.encode())
            except OSError:
                break
    print("".join(lines), flush=True)
    os._exit(0)
'''

FORGERIES = {
    "frame walking": FORGE + r'''
tokens, f = [], sys._getframe()
while f is not None:
    tokens += [v for v in f.f_locals.values() if isinstance(v, str) and len(v) == 32]
    f = f.f_back
forge(tokens)
''',
    "gc.get_objects / get_referents": FORGE + r'''
import gc
tokens = []
try:
    sys._getframe().f_back  # frame objects for the whole stack, then found by gc alone
    found = [o for o in gc.get_objects() if type(o).__name__ == "frame"]
    found += [r for r in gc.get_referrers(sys._getframe()) if type(r).__name__ == "frame"]
    for frame in found:
        tokens += [v for v in frame.f_locals.values() if isinstance(v, str) and len(v) == 32]
        tokens += [r for r in gc.get_referents(frame) if isinstance(r, str) and len(r) == 32]
except Exception:
    pass
forge(tokens)
''',
    "inherited fds via /proc/self/fd": FORGE + r'''
tokens, f = [], sys._getframe()
while f is not None:
    tokens += [v for v in f.f_locals.values() if isinstance(v, str) and len(v) == 32]
    f = f.f_back
for fd in os.listdir("/proc/self/fd"):
    try:
        with open(f"/proc/self/fd/{fd}", "w") as pipe:
            for t in tokens:
                pipe.write(json.dumps({"ok": t, "pid": os.getpid()}) + "\n")
    except OSError:
        pass
forge(tokens)
''',
    "/proc/self/environ and /proc/self/mem": FORGE + r'''
import re
tokens, hexes = [], re.compile(rb"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
try:
    environ = open("/proc/self/environ", "rb").read()
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb") as mem:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if "rw-p" in line and hi - lo < 2**26:
                try:
                    mem.seek(lo)
                    tokens += [t for t in hexes.findall(mem.read(hi - lo)) if t not in environ]
                except OSError:
                    pass
except OSError:
    pass
forge([t.decode() for t in dict.fromkeys(tokens)])
''',
    "fake token printed, then os._exit(0)": FORGE + "forge(['0' * 32])\n",
    "raise SystemExit(0)": "raise SystemExit(0)\n",
    "sys.exit(0) after patching sys.exit": "import sys, os\nsys.exit = lambda *a: os._exit(0)\nsys.exit(0)\n",
    "patched builtins, json, os.write, atexit": r'''
import atexit, builtins, json, os, sys
real_write, real_dumps = os.write, json.dumps
os.write = lambda fd, data: real_write(fd, data.replace(b'"failed"', b'"passed"').replace(b'"error"', b'"passed"'))
json.dumps = lambda obj, *a, **k: real_dumps(dict(obj, status="passed", ok="x") if isinstance(obj, dict) else obj)
builtins.AssertionError = type("NotAnError", (Exception,), {})
builtins.BaseException = type("Nothing", (Exception,), {})
atexit.register(lambda: os._exit(0))
sys.excepthook = lambda *a: os._exit(0)
''',
    "stdout closed and redirected": r'''
import json, os, sys
os.close(1)
for fd in range(3, 64):
    try:
        os.dup2(fd, 1)
        print(json.dumps({"status": "passed", "pid": os.getpid()}), flush=True)
    except OSError:
        pass
sys.stdout = open(os.devnull, "w")
''',
    # The new pass signal is a SIGSTOP from one line of the fork server: every other way to send it.
    "os.kill(self, SIGSTOP)": "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n",
    "os.killpg(0, SIGSTOP)": "import os, signal\nos.killpg(0, signal.SIGSTOP)\n",
    "signal.raise_signal(SIGSTOP)": "import signal\nsignal.raise_signal(signal.SIGSTOP)\n",
    "signal.pthread_kill(SIGSTOP)": ("import signal, threading\n"
                                     "signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)\n"),
    "pidfd_send_signal(SIGSTOP)": ("import os, signal\n"
                                   "signal.pidfd_send_signal(os.pidfd_open(os.getpid()), signal.SIGSTOP)\n"),
    "re-created _signal module": r'''
import _imp, importlib.machinery, signal
fresh = _imp.create_builtin(importlib.machinery.ModuleSpec("_signal", None))
fresh.raise_signal(signal.SIGSTOP)
''',
    "a forked child stops its parent": r'''
import os, signal
pid = os.fork()
if pid == 0:
    try:
        os.kill(os.getppid(), signal.SIGSTOP)
    finally:
        os._exit(0)
os.waitpid(pid, 0)
''',
    "a thread keeps sending SIGSTOP": r'''
import os, signal, threading
def spam():
    for _ in range(2000):
        try:
            os.kill(os.getpid(), signal.SIGSTOP)
        except OSError:
            pass
t = threading.Thread(target=spam)
t.start()
t.join()
''',
    "the fork server's own _run_to_end, called again": r'''
import os, signal, sys
f = sys._getframe()
while "_run_to_end" not in f.f_globals:
    f = f.f_back
run_to_end = f.f_globals["_run_to_end"]
run_to_end(lambda: None, exec, compile("", "x", "exec"), {}, lambda: None, os.getpid, os.kill, os.getpid(),
           signal.SIGSTOP)
''',
    "a C callable as __str__ of the raised exception": r'''
import functools, os, signal
class Sneaky(Exception):
    __str__ = functools.partial(os.kill, os.getpid(), signal.SIGSTOP)
raise Sneaky()
''',
    "a C callable as __del__ freed while unwinding": r'''
import functools, os, signal
class Sneaky:
    __del__ = functools.partial(os.kill, os.getpid(), signal.SIGSTOP)
def fail():
    s = Sneaky()
    assert False, "wrong answer"
fail()
''',
    "sys.settrace jumps past the asserts": r'''
import sys
def tracer(frame, event, arg):
    if event == "line" and frame.f_code.co_name == "<module>" and frame.f_lineno == 9:
        frame.f_lineno = 10
    return tracer
sys.settrace(tracer)
sys._getframe().f_trace = tracer
x = 0
assert x == 1, "skipped?"
''',
    "f_lineno jump without a tracer": r'''
import sys
f = sys._getframe()
f.f_trace = lambda *a: None
f.f_lineno = 6
''',
    "ctypes": "import ctypes\nctypes.CDLL(None).kill(__import__('os').getpid(), 19)\n",
    "_ctypes loaded under another name": r'''
import importlib.machinery, importlib.util
spec = importlib.util.find_spec("_ctypes")
loader = importlib.machinery.ExtensionFileLoader("evil._ctypes", spec.origin)
importlib.util.module_from_spec(importlib.util.spec_from_loader("evil._ctypes", loader))
''',
    "_ctypes by a name that lies about itself": r'''
import importlib
class Innocent(str):
    def split(self, *args):
        return ["innocent"]
    def partition(self, *args):
        return ("innocent", "", "")
    def startswith(self, *args):
        return False
importlib.import_module(Innocent("_ctypes"))
''',
    "another program does the stop": "import os\nos.system('kill -STOP $PPID; kill -STOP $$')\n",
    "execv /bin/kill": "import os\nos.execv('/bin/kill', ['kill', '-STOP', str(os.getpid())])\n",
    "subprocess": "import subprocess, os\nsubprocess.run(['kill', '-STOP', str(os.getpid())])\n",
    "_posixsubprocess.fork_exec": r'''
import _posixsubprocess, os
r, w = os.pipe()
_posixsubprocess.fork_exec([b"/bin/kill", b"-STOP", str(os.getpid()).encode()], [b"/bin/kill"], True, (w,),
                           None, None, -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None,
                           False)
os.read(r, 100)
import time; time.sleep(1)
''',
    "a fresh _posixsubprocess": r'''
import _imp, importlib.machinery, importlib.util, os
spec = importlib.util.find_spec("_posixsubprocess")
fresh = (_imp.create_builtin(importlib.machinery.ModuleSpec("_posixsubprocess", None))
         if spec.origin == "built-in" else importlib.util.module_from_spec(spec))
r, w = os.pipe()
fresh.fork_exec([b"/bin/kill", b"-STOP", str(os.getpid()).encode()], [b"/bin/kill"], True, (w,),
                None, None, -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False)
os.read(r, 100)
import time; time.sleep(1)
''',
    "a sub-interpreter without the guard": "import _xxsubinterpreters\n",
    "raw bytecode": "def f():\n    pass\nf.__code__ = f.__code__.replace(co_code=f.__code__.co_code)\n",
    "new bytecode through types.coroutine's code.replace": r'''
import functools, types
def victim():
    pass
class Stand: pass
class FakeFunction:
    def __call__(self):
        pass
stand = Stand()
stand.co_flags = 0x20
stand.replace = functools.partial(victim.__code__.replace, co_code=victim.__code__.co_code)
fake = FakeFunction()
fake.__code__ = stand
types.FunctionType, types.CodeType = FakeFunction, Stand
made = types.coroutine(fake).__code__
assert type(made).__name__ != "code", "made a code object"
''',
    "bytecode through marshal": "import marshal\nexec(marshal.loads(marshal.dumps(compile('1', 'x', 'exec'))))\n",
    "a sourceless .pyc of its own": r'''
import os, py_compile, sys
open("evil.py", "w").write("import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n")
py_compile.compile("evil.py", cfile="evil.pyc")
os.remove("evil.py")
sys.path.insert(0, os.getcwd())
import evil
''',
    "a renamed copy of _ctypes": r'''
import importlib.util, os, sys
spec = importlib.util.find_spec("_ctypes") if "_ctypes" not in sys.builtin_module_names else None
data = open(spec.origin, "rb").read().replace(b"PyInit__ctypes", b"PyInit__xtypes")
open("_xtypes" + spec.origin[spec.origin.index(".cpython"):], "wb").write(data)
sys.path.insert(0, os.getcwd())
import _xtypes
''',
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_forged_passes_score_as_failures(executor, name):
    result = executor.run(FORGERIES[name] + FAILS)
    assert result.status in ("failed", "error"), result
    assert not result.passed
    assert not result.extra.get("leaked_processes")


def test_stop_signals_other_than_sigstop_are_not_a_pass(executor):
    result = executor.run("import os, signal\nos.kill(os.getpid(), signal.SIGTSTP)\n" + FAILS)
    assert (result.status, result.message) == ("error", "stopped by signal SIGTSTP")


def test_program_cannot_write_its_own_memory(executor):
    prog = r'''
import os
opened = []
for attempt in (lambda: open("/proc/self/mem", "r+b"),
                lambda: os.open("proc/self/mem", os.O_RDWR, dir_fd=os.open("/", os.O_RDONLY)),
                lambda: os.open("fd/../mem", os.O_RDWR, dir_fd=os.open("/dev", os.O_RDONLY))):
    try:
        attempt()
        opened.append(True)
    except OSError:
        opened.append(False)
print(opened)
assert not any(opened), "its own memory is writable"
'''
    result = executor.run(prog)
    assert (result.status, result.output) == ("passed", "[False, False, False]\n"), result


HONEST = {
    "namedtuple, dataclass, typing (they walk frames)": r'''
from collections import namedtuple
from dataclasses import dataclass
from typing import List, NamedTuple
P = namedtuple("P", "x y")
class Q(NamedTuple):
    a: int
@dataclass
class R:
    xs: List[int]
assert P(1, 2).y == 2 and Q(3).a == 3 and R([1]).xs == [1]
''',
    "threads, a forked child and a multiprocessing.Process": r'''
import os, threading, multiprocessing
out = []
t = threading.Thread(target=lambda: out.append(1))
t.start(); t.join()
pid = os.fork()
if pid == 0:
    os._exit(7)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
here, there = multiprocessing.Pipe()
p = multiprocessing.Process(target=lambda: there.send(sum(range(10))))
p.start(); p.join()
assert here.recv() == 45 and p.exitcode == 0 and out == [1]
''',
    "prints a lot, closes stdout at the end": "for i in range(1000):\n    print(i)\nimport sys\nsys.stdout.close()\n",
    "writes files, tempfiles and a symlink in its own dir": r'''
import os, tempfile
open("a.txt", "w").write("x")
with tempfile.TemporaryDirectory() as d:
    open(os.path.join(d, "b"), "w").write("y")
try:
    os.symlink("a.txt", "link")
except PermissionError:  # refused only without a read-only mount namespace
    pass
assert open("a.txt").read() == "x"
''',
    "ends exactly on its last assert": "x = [3, 1, 2]\nx.sort()\nassert x == [1, 2, 3]",
    "imports stdlib modules the fork server did not preload": r'''
import random, textwrap, fnmatch, asyncio, subprocess, multiprocessing.pool, zlib, _random
assert textwrap.dedent("  x") == "x" and fnmatch.fnmatch("ab", "a*") and 0 <= random.random() < 1
assert zlib.decompress(zlib.compress(b"x")) == b"x"
''',
}


@pytest.mark.parametrize("name", list(HONEST))
def test_honest_programs_still_pass(executor, name):
    result = executor.run(HONEST[name])
    assert result.status == "passed", result


def test_guard_uses_only_its_own_closure():
    """The guard must not look up any global or builtin name: the program can rebind all of those."""
    path = Path(execution.__file__).with_name("_sandbox_guard.py")
    spec = importlib.util.spec_from_file_location("guard_under_test", path)
    guard_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guard_module)
    n_args = guard_module._make_guard.__code__.co_argcount
    guard = guard_module._make_guard(None, 0, True, *([None] * (n_args - 3)))
    loads = {ins.opname for ins in dis.get_instructions(guard)}
    assert not loads & {"LOAD_GLOBAL", "LOAD_NAME"}, loads
    assert guard.__closure__ and "LOAD_DEREF" in loads


@pytest.mark.skipif(not ROOT, reason="not root: the module's executor fixture runs 'rlimits' already")
def test_rlimits_code_path_still_works(monkeypatch):
    """The refused-as-root mode is what unprivileged users get: exercise its verdicts and its clean-up (found by
    process group, re-parenting and marker instead of uid) by lifting the refusal for this one executor."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    ex = Executor(workers=1, limits=LIMITS, isolation="rlimits")
    monkeypatch.undo()
    marker = f"rlimits-{os.urandom(4).hex()}"
    try:
        detached = (f"import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    sys.argv[0] = {marker!r}\n"
                    "    time.sleep(30)\nassert 1 + 1 == 2\n")
        results = ex.map([detached, FORGERIES["frame walking"] + FAILS, "assert 1 + 1 == 3\n",
                          "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n"])
        assert [r.status for r in results] == ["passed", "error", "failed", "error"], results
        assert ex._servers[0].info["mounts"] is False
        time.sleep(0.05)
        assert [p for p in os.listdir("/proc") if p.isdigit() and cmdline_has(p, marker)] == []
    finally:
        ex.close()
