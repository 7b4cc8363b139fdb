"""Run untrusted, model-written programs against their tests and say passed / failed / timeout / error.

Each program runs in its own process, in a fresh temporary directory, forked by a supervisor (``_sandbox.py``:
one long-lived fork server per worker, so a program costs a fork, not an interpreter start; see its docstring
for the process layout) with:

- a wall-clock timeout (the supervisor kills the program; the executor kills the supervisor's session if that
  ever hangs), a CPU-time limit (RLIMIT_CPU), an address-space limit (RLIMIT_AS), a file-size limit
  (RLIMIT_FSIZE, which also caps stdout/stderr: they go to a file), a process-count limit (RLIMIT_NPROC), at most
  256 open files, no core dumps;
- stdin on /dev/null (a program that reads stdin gets EOF, it cannot block), a scrubbed environment
  (PATH, HOME and TMPDIR pointing at the sandbox directory, one-thread BLAS), nice +5;
- a pass recorded only when the program's code *returns*: ``sys.exit(0)``/``os._exit(0)`` before the asserts,
  a crash, a closed stdout or a killed supervisor all leave the pass token unwritten, so they score as failures;
- everything the program started killed and reaped afterwards (the supervisor is a child subreaper).

Isolation levels (``Executor.isolation``):

- ``"uid"`` (running as root, the default there): the program runs under a private, otherwise unused uid per
  worker slot (``UID_BASE + slot``, claimed with a lock file), in a new network namespace (no network at all;
  where namespaces are not allowed, e.g. a default Docker container, the network stays shared: see
  ``network_isolation_available``).
  RLIMIT_NPROC then really binds (it never binds root), a fork bomb stays inside its slot, the program cannot
  signal, ptrace or kill the executor, the supervisor or anybody else's processes, and cannot modify or delete any
  file it does not own (root's files, the project, the user's home). Leftover processes are found by uid; files it
  left in /tmp, /var/tmp and /dev/shm are deleted.
- ``"rlimits"`` (not root, or root in a user namespace without the uid range): same limits and cleanup, but the program runs as *you*. RLIMIT_NPROC counts all your
  processes, so the limit is set to "what you run now + max_processes"; leftover processes are found by process
  group and by a random marker in their inherited environment. It can read, modify and delete anything you can,
  signal your other processes, and use the network.

Not isolated in either mode: reading world-readable files; disk space (each file is capped, not their number:
a program can fill its temp dir's filesystem within its timeout); CPU caches/timing side channels; a determined
adversary who looks up the pass token in its own interpreter's memory. For full isolation run the evaluation in a
throw-away container, e.g. ``docker run --rm --network none --memory 8g --pids-limit 512 -v $PWD:/w IMAGE
codellama eval evaluate /w/samples.jsonl``; the executor works the same inside it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..errors import CodeLlamaError

SANDBOX_SCRIPT = Path(__file__).with_name("_sandbox.py")
UID_BASE = 2_100_000_000  # far above system users, subuid ranges (100000+65536*n) and container id maps
UID_SLOTS = 4096
STATUSES = ("passed", "failed", "timeout", "error")


@dataclass(frozen=True)
class Limits:
    """Per-program resource limits. ``cpu_seconds`` defaults to the wall-clock timeout rounded up, plus one."""

    timeout: float = 10.0
    memory_mb: int = 2048
    cpu_seconds: int | None = None
    file_size_mb: int = 16
    max_processes: int = 16
    output_chars: int = 2000

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


# ---- uid slots ---------------------------------------------------------------------------------------
_LOCK_DIR = Path(tempfile.gettempdir()) / "codellama-sandbox-slots"


def _claim_uid() -> tuple[int, int]:
    """Claim a private uid for one worker: an exclusive flock on its lock file, held until released.

    Several evaluations on one machine (or one process with several executors) never share a uid, so one run's
    cleanup ("kill every process of uid X") can never hit another run's programs."""
    _LOCK_DIR.mkdir(mode=0o755, exist_ok=True)
    st = _LOCK_DIR.stat()
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise CodeLlamaError(f"{_LOCK_DIR} must be owned by root and not group/world-writable")
    for i in range(UID_SLOTS):
        fd = os.open(_LOCK_DIR / f"{UID_BASE + i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return UID_BASE + i, fd
    raise CodeLlamaError("no free sandbox uid slot")


def _processes_of(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def _kill_uid(uid: int) -> None:
    """Belt and braces when a supervisor itself had to be killed (root only)."""
    for _ in range(200):
        pids = _processes_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _kill_marked(marker: str) -> None:
    """Kill every process whose inherited environment carries ``marker`` (they descend from one supervisor)."""
    needle = f"CODELLAMA_SANDBOX_MARKER={marker}".encode()
    for _ in range(50):
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/environ", "rb") as f:
                        if needle in f.read():
                            found.append(int(name))
                except OSError:
                    pass
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _uids_mapped() -> bool:
    """Whether the private uid range exists in this user namespace (not so under rootless containers, where
    root's setuid to an unmapped uid fails)."""
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inside, _, count = (int(x) for x in line.split())
                if inside <= UID_BASE and UID_BASE + UID_SLOTS <= inside + count:
                    return True
    except (OSError, ValueError):
        return False
    return False


def default_isolation() -> str:
    """``"uid"`` when running as root with the private uid range available, else ``"rlimits"``."""
    return "uid" if hasattr(os, "geteuid") and os.geteuid() == 0 and _uids_mapped() else "rlimits"


_NETWORK_PROBE: bool | None = None


def network_isolation_available() -> bool:
    """Whether a new network namespace can be made here (root with CAP_SYS_ADMIN; not in a default Docker
    container). Under "uid" isolation programs then have no network; otherwise they share the host's."""
    global _NETWORK_PROBE
    if _NETWORK_PROBE is None:
        probe = "import ctypes, sys; sys.exit(0 if ctypes.CDLL(None).unshare(0x40000000) == 0 else 1)"
        try:
            _NETWORK_PROBE = subprocess.run([sys.executable, "-I", "-c", probe], timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _NETWORK_PROBE = False
    return _NETWORK_PROBE


def _env(sandbox_dir: str, marker: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": sandbox_dir, "TMPDIR": sandbox_dir,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "CODELLAMA_SANDBOX_MARKER": marker}


class _Server:
    """One worker slot: a persistent fork-server supervisor (``_sandbox.py --serve``) and, as root, the slot's
    private uid. Started lazily, restarted whenever it dies or stops answering."""

    def __init__(self, uid: int | None, lock_fd: int | None):
        self.uid, self.lock_fd = uid, lock_fd
        self.proc: subprocess.Popen | None = None
        self.marker = ""
        self._buf = b""

    def start(self) -> None:
        self.marker = secrets.token_hex(16)
        home = tempfile.gettempdir()
        self.proc = subprocess.Popen([sys.executable, "-I", "-B", str(SANDBOX_SCRIPT), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=_env(home, self.marker), cwd="/", start_new_session=True)
        self._buf = b""

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self.proc = None
        if self.uid is not None:
            _kill_uid(self.uid)
        if self.marker:  # programs that outlived their supervisor (e.g. one that killed it), any isolation
            _kill_marked(self.marker)

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()  # EOF: the server finishes its loop and exits
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self.kill()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def job(self, cfg: dict, timeout: float) -> dict | None:
        """Send one job, wait for its verdict line; ``None`` if the server died or hung (it is then killed)."""
        if self.proc is None or self.proc.poll() is not None:
            self.kill()
            self.start()
        cfg = dict(cfg, marker=self.marker)
        try:
            self.proc.stdin.write(json.dumps(cfg).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            return None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(0.0, remaining))[0] if remaining > 0 else []
            if not ready:
                self.kill()
                return None
            data = os.read(fd, 65536)
            if not data:
                self.kill()
                return None
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            return json.loads(line.decode())
        except ValueError:
            self.kill()
            return None


class Executor:
    """A pool of ``workers`` sandbox slots; ``run`` executes one program, ``map`` many in parallel.

    Each slot keeps a fork-server supervisor alive between programs. Use as a context manager (or call
    ``close``) so the servers stop and the uid slots are released."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits(), isolation: str = "auto"):
        if workers is None:
            workers = os.cpu_count() or 1
        if not isinstance(workers, int) or workers < 1:
            raise CodeLlamaError(f"workers must be an integer >= 1, got {workers!r}")
        if sys.platform != "linux":
            raise CodeLlamaError("the sandboxed executor needs Linux (/proc, rlimits, pidfd)")
        isolation = default_isolation() if isolation == "auto" else isolation
        if isolation not in ("uid", "rlimits"):
            raise CodeLlamaError(f"isolation must be auto, uid or rlimits, got {isolation!r}")
        if isolation == "uid" and (os.geteuid() != 0 or not _uids_mapped()):
            raise CodeLlamaError("isolation 'uid' needs root and the uid range "
                                 f"{UID_BASE}-{UID_BASE + UID_SLOTS - 1} (it runs programs under private uids)")
        self.workers, self.limits, self.isolation = workers, limits, isolation
        self._servers: list[_Server] = []
        self._cv = threading.Condition()
        for _ in range(workers):
            if isolation == "uid":
                uid, fd = _claim_uid()
                _kill_uid(uid)  # a crashed earlier run may have left something under this uid
                self._servers.append(_Server(uid, fd))
            else:
                self._servers.append(_Server(None, None))
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

    def _run(self, program: str, limits: Limits, server: _Server) -> ExecResult:
        # A root-owned wrapper dir (0711) holds the program's own dir: the supervisor's "delete what the private
        # uid left in /tmp" sweep then never touches the sandbox itself, and nothing here ever changes /tmp.
        wrapper = tempfile.mkdtemp(prefix="codellama-exec-")
        try:
            os.chmod(wrapper, 0o711)
            sandbox_dir = os.path.join(wrapper, "box")
            os.mkdir(sandbox_dir, 0o700)
            prog_path = os.path.join(sandbox_dir, "program.py")
            with open(prog_path, "w", encoding="utf-8") as f:
                f.write(program)
            nproc = limits.max_processes
            if server.uid is not None:
                os.chown(sandbox_dir, server.uid, server.uid)
            else:
                nproc += len(_processes_of(os.getuid()))  # RLIMIT_NPROC counts all of this user's processes
            cfg = {"program": prog_path, "dir": sandbox_dir, "uid": server.uid,
                   "timeout": float(limits.timeout), "cpu_seconds": limits.cpu_limit,
                   "memory_bytes": limits.memory_mb * 2**20, "file_size_bytes": limits.file_size_mb * 2**20,
                   "nproc": nproc}
            # The supervisor enforces the timeout; the extra 15 s only catch a supervisor that itself hangs.
            verdict = server.job(cfg, limits.timeout + 15.0)
            if verdict is None:
                return ExecResult("error", "sandbox supervisor died or hung (restarted); program scored as failed")
            output = ""
            try:
                with open(os.path.join(sandbox_dir, "output.txt"), "rb") as f:
                    output = f.read(limits.output_chars * 4).decode("utf-8", errors="replace")[:limits.output_chars]
            except OSError:
                pass
            extra = {"leaked_processes": verdict["leaked"]} if verdict.get("leaked") else {}
            return ExecResult(verdict["status"], verdict.get("message", ""), float(verdict.get("duration", 0.0)),
                              output, extra)
        finally:
            _rmtree(wrapper)


def _rmtree(root: str) -> None:
    """Delete a sandbox wrapper dir even if the program chmod-ed its own dirs to 000 (only paths strictly inside
    ``root`` are ever chmod-ed)."""
    root = os.path.realpath(root)

    def fix(func, p, exc):
        if isinstance(exc, FileNotFoundError):
            return
        parent = os.path.realpath(os.path.dirname(p))
        if not (parent == root or parent.startswith(root + os.sep)):
            return
        try:
            os.chmod(parent, 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if os.path.isdir(root):
        shutil.rmtree(root, onexc=fix) if sys.version_info >= (3, 12) else shutil.rmtree(
            root, onerror=lambda f, p, info: fix(f, p, info[1]))


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
