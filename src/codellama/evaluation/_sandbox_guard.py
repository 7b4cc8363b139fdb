"""The in-process half of the sandbox: an audit hook that keeps a program from forging its own pass.

Loaded by the fork server (``_sandbox.py``, standard library only, never ``ctypes``) and installed in each
program's process just before the program runs. The verdict protocol it protects (see ``execution.py``): a
program passes only if its process stops itself with SIGSTOP from the one call site in the fork server's
``_run_to_end`` that follows ``exec`` of the program, i.e. only once every top-level statement of the program
(the completion, then the tests) has run without an exception. There is no secret anywhere: reading memory,
frames, files or descriptors gives a program nothing to replay. What the hook prevents is *making* that stop
some other way:

- ``os.kill``/``os.killpg``/``signal.pthread_kill`` with SIGSTOP from anywhere else: refused. The raw
  syscalls (``raise_signal``, ``pidfd_send_signal`` ...) are refused by the seccomp filter of
  ``_sandbox_launch.py`` (where seccomp is missing, those two functions are removed instead);
- leaving Python for native code, which no hook can follow: ``ctypes`` and the standard library's other
  raw-memory and sub-interpreter modules cannot be imported, native modules load only from the interpreter's
  own directories (not a renamed copy of ``_ctypes`` the program wrote), code objects cannot be built from raw
  bytecode (``code.__new__``, ``marshal``; the fork server makes programs compile imports from source),
  no other program can be started (``exec*``, ``posix_spawn``, ``system``, ``subprocess``; the fork server
  replaces ``_posixsubprocess.fork_exec``, which has no audit event, and a fresh copy of that module cannot
  be loaded from its file). Exec is also refused by the seccomp filter, which holds even past this hook. So
  multiprocessing works with fork, but not its pools (they start a resource tracker);
- skipping the tests without an exception: tracing and profiling (``sys.settrace`` line jumps) are refused;
- tampering with this hook: the objects that lead to its function (``gc.get_objects``/``get_referrers``/
  ``get_referents``) are refused, and the hook reads only its own closure (immutable values and C functions
  captured before the program ran), never a global, a builtin name or a Python-level library function the
  program could replace;
- without a private read-only mount namespace (``unsafe_paths``): opening anything under /proc (its own
  memory there would let it undo all of the above) and making symlinks or hard links (which would let a path
  change between this check and the kernel's).

What it cannot prevent, stated in ``execution.py``: a program that corrupts the interpreter's memory some other
way (a CPython memory-safety bug, a third-party extension module that exposes raw memory) can switch the hook
off; and no hook can stop a completion from weakening the tests it is checked by (shadowing names they use,
returning objects that compare equal to anything).
"""

import os
import signal
import sys
import types

# Audit events refused outright.
DENIED_EVENTS = frozenset({
    "sys.settrace", "sys.setprofile", "sys.monitoring.register_callback",  # line jumps past the tests
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",  # the only paths to this hook's function
    "marshal.loads", "marshal.load",  # crafted bytecode reads and writes arbitrary memory (and code.__new__ below)
    "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "os.startfile",  # native code
    "cpython.PyInterpreterState_New",  # a sub-interpreter starts without this hook
})
# Modules whose import is refused (any dotted component): raw memory, sub-interpreters, the test-only C APIs.
# The fork server checks that none of them is loaded when it starts (a fork would hand them over).
NATIVE_MODULES = frozenset({"ctypes", "_ctypes", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
                            "_interpchannels", "_interpqueues"})
# Also refused, but always loaded in the program: a fresh copy would bring back what the fork server took away
# before the program ran (``_posixsubprocess.fork_exec``, which starts programs without an audit event, and where
# there is no seccomp filter ``_signal.raise_signal``). ``import`` of a loaded module makes no event.
DENIED_MODULES = NATIVE_MODULES | {"_posixsubprocess", "_signal"}
DENIED_MODULE_PREFIXES = ("_test", "_xx", "_ctypes", "_interp")
MAX_SYMLINKS = 40
S_IFMT, S_IFLNK = 0o170000, 0o120000


def install(armed_frame, stop_line: int, unsafe_paths: bool) -> None:
    """Install the guard. ``armed_frame`` is the ``_run_to_end`` frame that will run the program and
    ``stop_line`` the line of its SIGSTOP call; ``unsafe_paths`` adds the /proc and link rules (no read-only
    mount namespace around the program). Native extension modules may then be loaded only from the
    directories on ``sys.path`` now (the interpreter's own), never from a file the program wrote."""
    native_roots = tuple(entry.rstrip("/") + "/" for entry in sys.path if entry.startswith("/"))
    # The one code-object maker the standard library needs (asyncio's @types.coroutine): ``co.replace(co_flags=
    # ...)`` on a function's own compiled code, allowed when ``co`` really is a code object (not a stand-in whose
    # ``replace`` is, say, a partial of some code's replace with new bytecode).
    flag_setter = types.coroutine.__code__
    hook = _make_guard(armed_frame, stop_line, unsafe_paths, native_roots, flag_setter, types.CodeType,
                       sys._getframe, os.getpid, os.getcwd, os.lstat, os.readlink, os.fspath, signal.SIGSTOP,
                       PermissionError, OSError, DENIED_EVENTS, DENIED_MODULES, DENIED_MODULE_PREFIXES, MAX_SYMLINKS,
                       S_IFMT, S_IFLNK, type, str, bytes, int)
    sys.addaudithook(hook)


def _make_guard(armed_frame, stop_line, unsafe_paths, native_roots, flag_setter, code_type, getframe, getpid,
                getcwd, lstat, readlink, fspath, SIGSTOP, Refused, os_error, denied_events, denied_modules,
                denied_prefixes, max_links, S_IFMT, S_IFLNK, type_of, str_type, bytes_type, int_type):
    # Everything the guard uses arrives as an argument (closure cells it alone can reach) and it calls only C
    # functions and methods of built-in types: the program can patch modules, builtins and classes at will
    # without changing what the guard does. tests/test_sandbox_hostile.py checks it loads no global name.

    def guard(event, args):
        if event in denied_events or event.startswith("ctypes."):
            raise Refused(f"the sandbox does not allow {event}")
        if event == "os.kill" or event == "os.killpg" or event == "signal.pthread_kill":
            if args[1] != SIGSTOP:
                return
            if event == "os.kill" and args[0] == getpid():
                caller = getframe(1)
                if caller is armed_frame and caller.f_lineno == stop_line:
                    return  # the stop that follows the program's normal end: the pass
            raise Refused("the sandbox does not allow SIGSTOP: it is the executor's pass signal")
        if event == "code.__new__":
            caller = getframe(1)
            if caller.f_code is flag_setter and type_of(caller.f_locals.get("co")) is code_type:
                return
            raise Refused("the sandbox does not allow code.__new__")
        if event == "import":
            # Every component: an extension module's init symbol comes from the last one ("x._ctypes"). The
            # name may be a str subclass with its own split(): str.split reads the characters themselves.
            for part in str_type.split(args[0], "."):
                if part in denied_modules or part.startswith(denied_prefixes):
                    raise Refused(f"the sandbox does not allow importing {args[0]}")
            origin = args[1]  # the file of a native extension module being loaded, else None
            if origin is not None and (type_of(origin) is not str_type or not origin.startswith(native_roots)
                                       or ".." in origin.split("/")):
                raise Refused("the sandbox loads native modules only from the interpreter's own directories")
            return
        if not unsafe_paths:
            return
        if event == "os.symlink" or event == "os.link":
            raise Refused(f"the sandbox does not allow {event} here")
        if event != "open":
            return
        path = args[0]
        if type_of(path) is int_type:
            return  # an already-open descriptor
        if type_of(path) is not str_type and type_of(path) is not bytes_type:
            path = fspath(path)
        if type_of(path) is bytes_type:
            path = path.decode("utf-8", "surrogateescape")
        if type_of(path) is not str_type:
            raise Refused("the sandbox only opens str or bytes paths")
        if not path.startswith("/"):
            if ".." in path.split("/"):
                raise Refused("the sandbox does not allow '..' in relative paths")
            path = getcwd() + "/" + path
        # Resolve symlinks the way the kernel will (links cannot be made or moved here, so it cannot change).
        pending = path.split("/")[::-1]
        resolved = []
        links = 0
        while pending:
            part = pending.pop()
            if part == "" or part == ".":
                continue
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = "/" + "/".join(resolved + [part])
            try:
                mode = lstat(candidate).st_mode
            except os_error:
                resolved.append(part)
                continue
            if mode & S_IFMT != S_IFLNK:
                resolved.append(part)
                continue
            links += 1
            if links > max_links:
                raise Refused("too many levels of symbolic links")
            try:
                target = readlink(candidate)
            except os_error:
                resolved.append(part)
                continue
            if target.startswith("/"):
                resolved = []
            pending.extend(target.split("/")[::-1])
        if not resolved:
            raise Refused("the sandbox does not allow opening /")  # a descriptor of / reaches /proc relatively
        if resolved[0] == "proc":
            raise Refused("the sandbox does not allow opening files under /proc")

    return guard
