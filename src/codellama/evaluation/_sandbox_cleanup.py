"""What a sandboxed program leaves behind, found and removed after each run by the fork server
(``_sandbox.py``, which loads this file by path) and, for SysV IPC, by the executor (``_sandbox_workers.py``).

Standard library only (the fork server must never load ``ctypes``): processes are killed and reaped, files in
shared scratch directories deleted, SysV IPC objects only listed (removing one needs ``ctypes``: the executor
does it, or, with the worker's own IPC namespace, restarts the worker, which destroys them all)."""

import os
import shutil
import signal
import time

# Where any user can create files, swept after each run when there is no read-only mount namespace (with one
# only the private /dev/shm is writable). World-writable directories inside them are searched too.
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/shm", "/run/lock", "/var/lock", "/dev/mqueue")
SWEEP_DEPTH = 8
SYSV_KINDS = (("shm", "shmid"), ("sem", "semid"), ("msg", "msqid"))


def sandbox_pids(cfg: dict, me: int) -> list:
    """Processes the program may have left behind: every process of the private uid; without one, every
    process carrying this run's marker in its environment (inherited through fork) or re-parented to us."""
    uid, marker = cfg["uid"], cfg["marker"].encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        try:
            if uid is not None:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    found.append(pid)
                continue
            with open(f"/proc/{name}/stat", "rb") as f:
                parent = int(f.read().rsplit(b")", 1)[1].split()[1])
            if parent == me:
                found.append(pid)
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                if marker in f.read():
                    found.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    return found


def reap() -> int:
    n = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return n
        if pid == 0:
            return n
        n += 1


def sweep(path: str, uid: int, depth: int) -> None:
    """Delete what ``uid`` created under the world-writable ``path``, looking into world-writable subdirs."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            if st.st_uid == uid:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            elif entry.is_dir(follow_symlinks=False) and st.st_mode & 0o002 and depth < SWEEP_DEPTH:
                sweep(entry.path, uid, depth + 1)
        except OSError:
            pass


def sweep_scratch(uid: int, read_only_world: bool) -> None:
    seen = set()
    for scratch in ("/dev/shm",) if read_only_world else SCRATCH_DIRS:
        real = os.path.realpath(scratch)
        if real not in seen and os.path.isdir(real):
            seen.add(real)
            sweep(real, uid, 0)


def sysv_objects(uid: int) -> set:
    """(kind, id) of every SysV IPC object owned or created by ``uid`` in our IPC namespace."""
    found = set()
    for kind, id_column in SYSV_KINDS:
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                header, *rows = f.read().splitlines()
        except (OSError, ValueError):
            continue
        names = header.split()
        try:
            at_id, at_uid, at_cuid = names.index(id_column), names.index("uid"), names.index("cuid")
        except ValueError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) == len(names) and uid in (int(cols[at_uid]), int(cols[at_cuid])):
                found.add((kind, int(cols[at_id])))
    return found


def cleanup(cfg: dict, pgid: int, read_only_world: bool) -> int:
    """Kill and reap everything left; returns how many processes survived (0 unless something is very wrong)."""
    me = os.getpid()
    deadline = time.monotonic() + 5.0
    left = []
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
        left = sandbox_pids(cfg, me)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        reap()
        if not left:
            break
        time.sleep(0.005)
    if cfg["uid"] is not None:  # as yourself, a program's files cannot be told from yours: not swept
        sweep_scratch(cfg["uid"], read_only_world)
    return len(left)
