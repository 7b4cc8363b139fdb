"""Sandbox supervisor: runs untrusted programs one at a time and answers a JSON verdict for each.

Executed as a plain script by ``execution.py``, never imported, so it uses the standard library only:
``python -I -B _sandbox.py --serve`` is a fork server (one per executor worker; jobs as JSON lines on stdin,
verdicts as JSON lines on stdout), ``python -I -B _sandbox.py CONFIG_JSON`` runs a single job. One job::

    executor (root or user) --Popen once, new session--> supervisor (this file; same uid as the executor)
        supervisor: child subreaper, so every orphan of the program is re-parented here and can be reaped
        --fork--> child: new process group, (root: new network namespace, drop to the slot's private uid),
                  rlimits (address space, CPU, file size, process count, open files, no core dumps),
                  stdin /dev/null, stdout+stderr -> a file in the sandbox dir, every other fd closed,
                  then ``exec`` of the program. Only if the program *returns* does the child write a random
                  token to a pipe; ``sys.exit``/``os._exit``/a crash before the asserts never produce it.
        supervisor: waits (pidfd) until the child exits or the wall-clock deadline, then kills everything the
                  program left behind (every process of the private uid, or of the program's process group and
                  marker environment when not root), reaps the zombies and prints the verdict.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36
CLONE_NEWNET = 0x40000000
MAX_MESSAGE = 2000


def _set_limits(cfg: dict) -> None:
    mem = cfg["memory_bytes"]
    cpu = cfg["cpu_seconds"]
    limits = [(resource.RLIMIT_CPU, (cpu, cpu + 1)),  # soft: SIGXCPU; hard one second later: SIGKILL
              (resource.RLIMIT_FSIZE, (cfg["file_size_bytes"],) * 2),
              (resource.RLIMIT_CORE, (0, 0)),
              (resource.RLIMIT_NOFILE, (256, 256)),
              (resource.RLIMIT_NPROC, (cfg["nproc"],) * 2)]
    if mem:
        limits.append((resource.RLIMIT_AS, (mem, mem)))
    for which, value in limits:
        resource.setrlimit(which, value)


def _remap_sys_path(keep_fds: list) -> None:
    """Let the unprivileged uid import the rest of the standard library and site-packages.

    The interpreter may live under a directory the sandbox uid cannot traverse (here: /root, mode 0700). We open
    every ``sys.path`` directory while still root and point imports at ``/proc/self/fd/N/...``: following that
    magic link needs no permission on the ancestors, only on what lies below the opened directory."""
    mapping = {}
    for entry in list(sys.path):
        if entry and os.path.isdir(entry) and entry not in mapping:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
            keep_fds.append(fd)
            mapping[entry] = f"/proc/self/fd/{fd}"

    def remap(path: str) -> str:
        for old in sorted(mapping, key=len, reverse=True):
            if path == old or path.startswith(old + os.sep):
                return mapping[old] + path[len(old):]
        return path

    sys.path[:] = [remap(p) for p in sys.path]
    for module in list(sys.modules.values()):
        search = getattr(module, "__path__", None)
        if isinstance(search, list):
            search[:] = [remap(p) for p in search]
    sys.path_importer_cache.clear()


def _report(fd: int, payload: dict) -> None:
    # Tagged with the writer's pid: a process the program forked inherits this pipe, but only the direct child's
    # report counts, so a forked copy that "returns normally" cannot make the run pass.
    payload["pid"] = os.getpid()
    try:
        os.write(fd, (json.dumps(payload) + "\n").encode())
    except OSError:
        pass


def _child(cfg: dict, libc, wfd: int, out_fd: int, token: str) -> None:
    os.setpgid(0, 0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    with open(cfg["program"], encoding="utf-8", errors="replace") as f:
        source = f.read()
    try:
        code = compile(source, "program.py", "exec")
    except (SyntaxError, ValueError) as e:
        _report(wfd, {"status": "error", "message": f"{type(e).__name__}: {e}"})
        return
    keep = [wfd]
    uid = cfg["uid"]
    if uid is not None:
        if libc.unshare(CLONE_NEWNET) == 0:  # no network: a fresh namespace has only a down loopback
            pass
        _remap_sys_path(keep)
    _set_limits(cfg)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # keeps /proc/self/fd usable after the uid change
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # set after setuid, which clears it
    os.chdir(cfg["dir"])
    try:
        os.nice(5)  # untrusted code yields to the people sharing this machine
    except OSError:
        pass
    fds = sorted(set(keep))
    lo = 3
    for fd in fds:
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 65536)
    sys.argv = ["program.py"]
    globs = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "program.py"}
    del source
    try:
        exec(code, globs)
    except SystemExit as e:
        _report(wfd, {"status": "error", "message": f"program called sys.exit({e.code!r}) before the tests finished"})
        return
    except AssertionError as e:
        text = str(e)
        _report(wfd, {"status": "failed", "message": "AssertionError" + (f": {text[:MAX_MESSAGE]}" if text else "")})
        return
    except BaseException as e:  # noqa: BLE001 - any exception from untrusted code is a verdict, not a crash
        _report(wfd, {"status": "error", "message": f"{type(e).__name__}: {str(e)[:MAX_MESSAGE]}"})
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stdout must not turn a pass into a crash
            pass
    _report(wfd, {"ok": token})


def _sandbox_pids(cfg: dict, me: int) -> list:
    """Processes the program may have left behind: every process of the private uid; without one, every
    process carrying this run's marker in its environment (inherited through fork)."""
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
            else:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if marker in f.read():
                        found.append(pid)
        except OSError:
            continue
    return found


def _reap() -> int:
    n = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return n
        if pid == 0:
            return n
        n += 1


def _cleanup(cfg: dict, pgid: int) -> int:
    """Kill and reap everything left; returns how many processes survived (0 unless something is very wrong)."""
    me = os.getpid()
    deadline = time.monotonic() + 5.0
    left = []
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
        left = _sandbox_pids(cfg, me)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        _reap()
        if not left:
            break
        time.sleep(0.005)
    if cfg["uid"] is not None:  # files the private uid dropped in shared scratch dirs (they could fill RAM)
        import shutil
        for scratch in ("/tmp", "/dev/shm", "/var/tmp"):
            try:
                entries = list(os.scandir(scratch))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.stat(follow_symlinks=False).st_uid == cfg["uid"]:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path, ignore_errors=True)
                        else:
                            os.unlink(entry.path)
                except OSError:
                    pass
    return len(left)


def _verdict(cfg: dict, pid: int, status: int | None, rusage, timed_out: bool, raw: bytes, token: str) -> dict:
    timeout = cfg["timeout"]
    if timed_out:
        return {"status": "timeout", "message": f"timed out after {timeout:g} s (wall clock)"}
    msg = None
    for line in raw.decode(errors="replace").splitlines():
        try:
            candidate = json.loads(line)
        except ValueError:
            continue
        if isinstance(candidate, dict) and candidate.get("pid") == pid:
            msg = candidate
            break
    if isinstance(msg, dict) and msg.get("ok") == token:
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return {"status": "passed", "message": ""}
        msg = None  # the token arrived but the process then died: not a clean pass
    if isinstance(msg, dict) and msg.get("status") in ("failed", "error"):
        return {"status": msg["status"], "message": str(msg.get("message", ""))[:MAX_MESSAGE]}
    cpu = (rusage.ru_utime + rusage.ru_stime) if rusage is not None else 0.0
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cfg["cpu_seconds"]):
            return {"status": "timeout", "message": f"CPU time limit of {cfg['cpu_seconds']} s exceeded"}
        if sig == signal.SIGXFSZ:
            return {"status": "error", "message": "output or file size limit exceeded"}
        return {"status": "error", "message": f"killed by signal {signal.Signals(sig).name}"}
    code = os.WEXITSTATUS(status)
    return {"status": "error", "message": f"program exited with code {code} before the tests finished"}


def run_job(cfg: dict, libc) -> dict:
    """Run one program (fork, wait until exit or deadline, clean up) and return its verdict."""
    for key in ("HOME", "TMPDIR"):  # the program's own dir; inherited through fork by the child
        os.environ[key] = cfg["dir"]
    rfd, wfd = os.pipe()
    out_fd = os.open(os.path.join(cfg["dir"], "output.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    token = os.urandom(16).hex()
    start = time.monotonic()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(rfd)
            _child(cfg, libc, wfd, out_fd, token)
        except BaseException as e:  # noqa: BLE001 - report sandbox setup failures instead of hanging
            try:
                _report(wfd, {"status": "error", "message": f"sandbox setup failed: {type(e).__name__}: {e}"})
            finally:
                code = 70
        os._exit(code)
    os.close(wfd)
    os.close(out_fd)
    os.set_blocking(rfd, False)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        deadline = start + cfg["timeout"]
        raw, status, rusage, timed_out = b"", None, None, False
        watch = [rfd] + ([pidfd] if pidfd is not None else [])
        while True:
            wpid, st, ru = os.wait4(pid, os.WNOHANG)
            if wpid:
                status, rusage = st, ru
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            ready, _, _ = select.select(watch, [], [], remaining if pidfd is not None else min(remaining, 0.005))
            if rfd in ready:
                try:
                    data = os.read(rfd, 65536)
                except BlockingIOError:
                    data = None
                if data == b"":
                    watch.remove(rfd)  # EOF: only the pidfd (or polling, via the select timeout) is left
                elif data and len(raw) < 65536:
                    raw += data
        duration = time.monotonic() - start
        if timed_out:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        leaked = _cleanup(cfg, pid)
        if status is None:
            try:
                _, status, rusage = os.wait4(pid, 0)
            except ChildProcessError:
                status = 0
        while True:  # the result may still sit in the pipe
            try:
                data = os.read(rfd, 65536)
            except (BlockingIOError, OSError):
                break
            if not data or len(raw) >= 65536:
                break
            raw += data
    finally:
        os.close(rfd)
        if pidfd is not None:
            os.close(pidfd)
    verdict = _verdict(cfg, pid, status, rusage, timed_out, raw, token)
    verdict["duration"] = round(duration, 4)
    if leaked:
        verdict["leaked"] = leaked
    return verdict


# Imported once by the server so that forked programs do not pay for them (pure, stateless modules only:
# ``random`` is left out so that every program gets its own random seed).
PRELOAD = ("collections", "re", "math", "itertools", "functools", "heapq", "typing", "string", "bisect", "copy",
           "operator", "json", "fractions", "decimal", "statistics", "datetime", "hashlib", "cmath", "array")


def serve(libc) -> None:
    """Fork server: one job (a JSON config line) in on stdin, one verdict line out on stdout, until EOF.

    Forking a warm interpreter costs ~1 ms where starting one costs tens; the server itself never runs
    untrusted code and (as root) stays out of reach of the private uid."""
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        try:
            verdict = run_job(json.loads(line), libc)
        except Exception as e:  # noqa: BLE001 - a broken job must not take the server down
            verdict = {"status": "error", "message": f"sandbox failed: {type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(verdict) + "\n")
        sys.stdout.flush()


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if sys.argv[1:] == ["--serve"]:
        serve(libc)
    else:
        sys.stdout.write(json.dumps(run_job(json.loads(sys.argv[1]), libc)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
