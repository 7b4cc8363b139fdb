"""Worker slots of the sandboxed executor: private uids, the fork-server process of each worker, its slot
directory, and killing what programs left behind when a fork server itself had to go.

Used by ``execution.py`` only; see its docstring for what the sandbox guarantees."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import CodeLlamaError
from ._sandbox_cleanup import sysv_objects

LAUNCH_SCRIPT = Path(__file__).with_name("_sandbox_launch.py")
START_TIMEOUT = 60.0  # seconds for a worker to set up, start the fork server and preload its modules
UID_BASE = 2_100_000_000  # far above system users, subuid ranges (100000+65536*n) and container id maps
UID_SLOTS = 4096


# ---- uid slots ---------------------------------------------------------------------------------------
_LOCK_DIR = Path(tempfile.gettempdir()) / "codellama-sandbox-slots"


def claim_uid() -> tuple[int, int]:
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


def processes_of(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def kill_uid(uid: int) -> None:
    """Belt and braces when a supervisor itself had to be killed (root only)."""
    for _ in range(200):
        pids = processes_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def kill_marked(marker: str) -> None:
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


def uids_mapped() -> bool:
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
    return "uid" if hasattr(os, "geteuid") and os.geteuid() == 0 and uids_mapped() else "rlimits"


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


class Server:
    """One worker slot: a persistent fork-server supervisor (``_sandbox_launch.py`` -> ``_sandbox.py
    --serve``), its slot directory (the programs' run directories live in it; under the read-only mount
    namespace it is the only writable place besides /dev/shm) and, as root, the slot's private uid. Started
    lazily, restarted whenever it dies, stops answering or must drop its IPC namespace."""

    def __init__(self, uid: int | None, lock_fd: int | None, namespaces: bool):
        self.uid, self.lock_fd, self.namespaces = uid, lock_fd, namespaces
        self.proc: subprocess.Popen | None = None
        self.marker = ""
        self.info: dict = {}
        self._buf = b""
        self.slot_dir = tempfile.mkdtemp(prefix="codellama-sandbox-")
        os.chmod(self.slot_dir, 0o711)  # the private uid may pass through, not list or write

    def start(self) -> None:
        self.marker = secrets.token_hex(16)
        cfg = {"uid": self.uid, "slot_dir": self.slot_dir, "namespaces": self.namespaces}
        self.proc = subprocess.Popen([sys.executable, "-I", "-B", str(LAUNCH_SCRIPT), json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=_env(tempfile.gettempdir(), self.marker), cwd="/",
                                     start_new_session=True)
        self._buf = b""
        ready = self._read_line(START_TIMEOUT)
        if not (isinstance(ready, dict) and ready.get("ready")):
            self.kill()
            reason = ready.get("error") if isinstance(ready, dict) else "it did not answer"
            raise CodeLlamaError(f"the sandbox could not start: {reason}")
        self.info = ready

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
            kill_uid(self.uid)
        if self.marker:  # programs that outlived their supervisor (e.g. one that killed it), any isolation
            kill_marked(self.marker)

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
        rmtree(self.slot_dir)

    def _read_line(self, timeout: float) -> dict | None:
        """The server's next JSON line; ``None`` (and the server killed) if it died, hung or said nonsense."""
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
        verdict = self._read_line(timeout)
        return verdict if isinstance(verdict, dict) and "status" in verdict else None


def remove_sysv(objects: list, uid: int) -> None:
    """Remove the SysV shared-memory segments, semaphore sets and message queues a run left (``[kind, id]``
    pairs from its verdict) that still belong to the slot's private ``uid``; the executor is trusted with
    ``ctypes``, the fork server is not."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ipc_rmid = 0
    still_there = sysv_objects(uid)
    for kind, ident in {(k, i) for k, i in objects} & still_there:
        if kind == "shm":
            libc.shmctl(ident, ipc_rmid, None)
        elif kind == "sem":
            libc.semctl(ident, 0, ipc_rmid)
        else:
            libc.msgctl(ident, ipc_rmid, None)


def rmtree(root: str) -> None:
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


