"""Start one sandbox worker: the privileged set-up that needs ``ctypes``, then ``exec`` of the fork server.

Run by ``execution.py`` as ``python -I -B _sandbox_launch.py CONFIG_JSON``, never imported. The fork server
(``_sandbox.py --serve``) must be a fresh interpreter that has never loaded ``ctypes``: every program is a
fork of it, and a loaded ``_ctypes`` stays reachable from Python (``object.__subclasses__()``) and calls C
functions and reads and writes memory without an audit event, which would let a program switch off the
guard (``_sandbox_guard.py``). Everything that needs ``ctypes`` therefore happens here, once per worker, and
survives the ``exec``:

- child subreaper: every orphan of a program is re-parented to the fork server, which reaps it;
- no_new_privs and a seccomp filter that refuses: SIGSTOP through every syscall but ``kill`` (``raise_signal``,
  ``pthread_kill``, ``pidfd_send_signal`` ...), so that the only way to send the pass signal is ``os.kill``,
  which the guard checks; ``execve``/``execveat``, so that no program escapes the guard by becoming another
  program, however it got there (the one exception: ``execveat`` of descriptor ``EXEC_FD``, which this launcher
  opens on the interpreter to start the fork server and the fork server closes); ``ptrace`` and
  ``process_vm_readv``/``writev``. x86-64 and arm64 only; elsewhere the guard falls back (see its docstring);
- as root (``"uid"`` isolation): a new network namespace (no network), a new IPC namespace (SysV objects die with
  the worker) and a new mount namespace in which every mount is read-only except the worker's slot directory (where
  the programs' own directories are) and a private, size-capped tmpfs on /dev/shm, both ``noexec``. Read-only /proc
  also means a program cannot write its own memory through /proc/self/mem. Each is optional: where the kernel or a
  container refuses it, the fork server is told and falls back (see ``execution.py``).

The results go to the fork server as a JSON argument; it reports them to the executor when it is ready.
"""

import ctypes
import json
import os
import platform
import resource
import struct
import sys

PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 36, 22, 2
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
MS_NOEXEC = 0x8
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOEXEC, SYS_MOUNT_SETATTR = -100, 0x8000, 0x1, 0x8, 442
SHM_SIZE = "64m"
SIGSTOP, EPERM = 19, 1
EXEC_FD = 987  # the only descriptor execveat may run (the interpreter, for the fork server); lower if need be

# Per architecture: the seccomp audit arch and the syscalls the filter inspects, as (number, index of the signal
# argument) for the signal senders, (number, None) for syscalls refused outright and (number, "fd") for execveat.
ARCHES = {
    "x86_64": (0xC000003E, {"tkill": (200, 1), "tgkill": (234, 2), "rt_sigqueueinfo": (129, 1),
                            "rt_tgsigqueueinfo": (297, 2), "pidfd_send_signal": (424, 1), "ptrace": (101, None),
                            "process_vm_readv": (310, None), "process_vm_writev": (311, None),
                            "execve": (59, None), "execveat": (322, "fd")}),
    "aarch64": (0xC00000B7, {"tkill": (130, 1), "tgkill": (131, 2), "rt_sigqueueinfo": (138, 1),
                             "rt_tgsigqueueinfo": (240, 2), "pidfd_send_signal": (424, 1), "ptrace": (117, None),
                             "process_vm_readv": (270, None), "process_vm_writev": (271, None),
                             "execve": (221, None), "execveat": (281, "fd")}),
}
X32_SYSCALL_BIT = 0x40000000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x06
RET_ALLOW, RET_EPERM, RET_KILL = 0x7FFF0000, 0x00050000 | EPERM, 0x80000000


class SetupError(Exception):
    pass


def _check(libc, result: int, what: str) -> None:
    if result != 0:
        raise SetupError(f"{what}: {os.strerror(ctypes.get_errno())}")


def seccomp_filter(arch: str, exec_fd: int) -> bytes | None:
    """The BPF program (``struct sock_filter`` array) for ``arch``, or None where we have no syscall table."""
    if arch not in ARCHES:
        return None
    audit_arch, calls = ARCHES[arch]
    # Instructions as (code, jump-if-true target, jump-if-false target, k) with symbolic targets resolved below.
    prog: list[tuple] = [(BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
                         (BPF_JEQ_K, "+1", "kill", audit_arch),
                         (BPF_LD_W_ABS, 0, 0, 0)]  # seccomp_data.nr
    if arch == "x86_64":
        prog.append((BPF_JGE_K, "deny", "+1", X32_SYSCALL_BIT))
    for number, sig_arg in calls.values():
        prog.append((BPF_JEQ_K, "deny" if sig_arg is None else f"sig{sig_arg}", "+1", number))
    prog.append((BPF_RET_K, 0, 0, RET_ALLOW))
    labels = {"sigfd": len(prog)}
    prog += [(BPF_LD_W_ABS, 0, 0, 16),  # execveat's dirfd, args[0]
             (BPF_JEQ_K, "+1", "deny", exec_fd),
             (BPF_RET_K, 0, 0, RET_ALLOW)]
    for arg in sorted({a for _, a in calls.values() if isinstance(a, int)}):
        labels[f"sig{arg}"] = len(prog)
        prog += [(BPF_LD_W_ABS, 0, 0, 16 + 8 * arg),  # low 32 bits of seccomp_data.args[arg]: the int signal
                 (BPF_JEQ_K, "deny", "+1", SIGSTOP),
                 (BPF_RET_K, 0, 0, RET_ALLOW)]
    labels["deny"] = len(prog)
    prog.append((BPF_RET_K, 0, 0, RET_EPERM))
    labels["kill"] = len(prog)
    prog.append((BPF_RET_K, 0, 0, RET_KILL))  # another ABI (i386 on x86-64): only native code gets there

    def offset(target, i: int) -> int:
        if isinstance(target, int):
            return target
        return 0 if target == "+1" else labels[target] - i - 1

    return b"".join(struct.pack("HBBI", code, offset(jt, i), offset(jf, i), k)
                    for i, (code, jt, jf, k) in enumerate(prog))


def _install_seccomp(libc, exec_fd: int) -> bool:
    program = seccomp_filter(platform.machine(), exec_fd)
    if program is None:
        return False
    buf = ctypes.create_string_buffer(program)
    fprog = struct.pack("HxxxxxxP", len(program) // 8, ctypes.addressof(buf))  # struct sock_fprog
    fbuf = ctypes.create_string_buffer(fprog)
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fbuf, 0, 0) == 0


def _mount_setattr(libc, path: str, flags: int, attr_set: int, attr_clr: int) -> int:
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", attr_set, attr_clr, 0, 0))  # struct mount_attr
    return libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
                        ctypes.c_uint(flags), attr, ctypes.c_size_t(32))


def _read_only_world(libc, slot_dir: str) -> bool:
    """A private mount namespace where everything but ``slot_dir`` and a fresh /dev/shm is read-only. False
    (nothing changed that matters) where the kernel refuses the namespace or recursive read-only mounts."""
    if libc.unshare(CLONE_NEWNS) != 0:
        return False
    _check(libc, libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    if _mount_setattr(libc, "/", AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0) != 0:
        return False  # kernel < 5.12: stay read-write and let the fork server sweep instead
    # From here on the programs' directories must become writable again, or nothing can run: fail loudly.
    _check(libc, libc.mount(slot_dir.encode(), slot_dir.encode(), None, MS_BIND, None), "binding the slot dir")
    # Writable, but nothing written there can be mapped executable: no native code of the program's own.
    _check(libc, _mount_setattr(libc, slot_dir, 0, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_RDONLY),
           "making the slot dir writable")
    if os.path.isdir("/dev/shm"):
        _check(libc, libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                                f"size={SHM_SIZE},mode=1777".encode()), "mounting a private /dev/shm")
    return True


def main() -> None:
    cfg = json.loads(sys.argv[1])
    exec_fd = min(EXEC_FD, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1)
    info = {"net": False, "ipc": False, "mounts": False, "seccomp": False, "exec_fd": exec_fd}
    server = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox.py")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _check(libc, libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "becoming a child subreaper")
        if cfg["uid"] is not None:
            info["net"] = libc.unshare(CLONE_NEWNET) == 0
            if cfg["namespaces"]:
                info["ipc"] = libc.unshare(CLONE_NEWIPC) == 0
                info["mounts"] = _read_only_world(libc, cfg["slot_dir"])
        _check(libc, libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")
        os.dup2(os.open(sys.executable, os.O_RDONLY), exec_fd)  # before the filter: its one allowed exec
        info["seccomp"] = _install_seccomp(libc, exec_fd)
        os.execve(exec_fd, [sys.executable, "-I", "-B", server, "--serve", json.dumps(info)], dict(os.environ))
    except (OSError, SetupError) as e:
        sys.stdout.write(json.dumps({"ready": False, "error": str(e)}) + "\n")
        sys.stdout.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
