"""The worker's confinement, applied by the worker to itself before it parses anything a user sent: Linux
Landlock for files and TCP, and a seccomp filter that refuses Unix sockets (Landlock cannot stop a connect()
to a socket file such as the daemon's control socket, which would take a worker for the daemon itself).

Landlock and seccomp restrict the calling thread and whatever it starts afterwards, so confine() runs while
the worker is still single-threaded, before numpy, CTranslate2 or onnxruntime start their thread pools.
Where the kernel lacks either, that part is skipped and said so; no root is needed, only no_new_privs."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import platform
import struct
import sys
from collections.abc import Iterable

import msgspec

# syscalls (one numbering on every architecture since 5.13) and flags: linux/landlock.h
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}  # then all 16 bits
_FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # the rights a rule on a file may hold
BIND_TCP, CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1

READ = EXECUTE | READ_FILE | READ_DIR
WRITE = WRITE_FILE | TRUNCATE | MAKE_REG | MAKE_DIR | REMOVE_FILE | REMOVE_DIR | REFER | MAKE_SYM
DEVICE = READ_FILE | WRITE_FILE | IOCTL_DEV

# What a worker needs of the system besides Python: shared libraries, ld.so.cache, CA certificates and name
# resolution (/etc), CPU topology and cgroup limits (/sys), the NVIDIA driver's nodes and /proc entries.
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/etc", "/sys", "/proc/cpuinfo", "/proc/meminfo",
               "/proc/stat", "/proc/driver/nvidia", "/dev/urandom", "/dev/random", "/dev/zero")  # fmt: skip
HTTPS_PORT = 443


class Rules(msgspec.Struct, frozen=True, kw_only=True):
    read: tuple[str, ...]  # readable (and executable) beneath these
    write: tuple[str, ...] = ()  # writable beneath these
    devices: tuple[str, ...] = ()  # character devices to read, write and ioctl
    https: bool = False  # TCP connect to port 443 (models fetched by name); otherwise no TCP at all
    # Unix sockets: refused, except to a CUDA worker, whose driver fails to start without one (seen on an
    # H200: cuInit answered error 304 under the filter, whatever errno it returned). The daemon refuses
    # its own workers on the control socket instead (server.py).
    unix_sockets: bool = False


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where it has none or it is disabled."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = ctypes.c_uint32(_CREATE_RULESET_VERSION)
    version = libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), flags)
    return max(0, int(version))


def worker_rules(
    model_paths: Iterable[str],
    extra_read: Iterable[str],
    extra_write: Iterable[str],
    downloads: bool,
    cuda: bool = False,
) -> Rules:
    """Python (its installation and import path, but never the working directory, which in service is /),
    the system, the model directories and the Hugging Face cache (writable only where models are fetched).
    The process's own /proc entries are writable: the CUDA driver writes there (its threads' names) and
    fails to start when it cannot (seen on an H200, `bench/gpu_sandbox_check.py`)."""
    try:
        here = os.getcwd()
    except OSError:  # removed meanwhile: nothing of it to keep out
        here = "/"
    python = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    python |= {p for p in sys.path if p and os.path.abspath(p) not in (here, "/")}
    python.add(os.path.dirname(os.path.abspath(__file__)))  # whisperd, wherever an editable install keeps it
    read = [*sorted(python), *SYSTEM_READ, *model_paths, *extra_read]
    write = [f"/proc/{os.getpid()}", *extra_write]
    for hub in hub_dirs():
        if downloads:
            with contextlib.suppress(OSError):  # then fetching fails, with its own error, not the worker
                os.makedirs(hub, exist_ok=True)
            write.append(hub)
        read.append(hub)
    devices = ["/dev/null", *sorted(glob.glob("/dev/nvidia*"))]
    return Rules(
        read=tuple(read), write=tuple(write), devices=tuple(devices), https=downloads, unix_sockets=cuda
    )


def confine(rules: Rules) -> list[str]:
    """Apply what the kernel supports; returns what took effect, in words, for the log."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return [f"no sandbox: no_new_privs refused ({os.strerror(ctypes.get_errno())})"]
    done = []
    abi = landlock_abi()
    if abi == 0:
        done.append("no Landlock in this kernel: files and TCP unrestricted")
    else:
        done.append(_landlock(libc, abi, rules))
    done.append(_deny_unix_sockets(libc, allow=rules.unix_sockets))
    return done


def _landlock(libc: ctypes.CDLL, abi: int, rules: Rules) -> str:
    handled_fs = _FS_BY_ABI.get(abi, (1 << 16) - 1)
    handled_net = BIND_TCP | CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = libc.syscall(_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return f"Landlock refused a ruleset ({os.strerror(ctypes.get_errno())})"
    try:
        for paths, access in ((rules.read, READ), (rules.write, READ | WRITE), (rules.devices, DEVICE)):
            for path in paths:
                _allow_path(libc, ruleset, path, access & handled_fs)
        if handled_net and rules.https:
            port = ctypes.create_string_buffer(struct.pack("=QQ", CONNECT_TCP, HTTPS_PORT), 16)
            if libc.syscall(_ADD_RULE, ruleset, _RULE_NET_PORT, port, ctypes.c_uint32(0)) != 0:
                raise OSError(ctypes.get_errno(), "cannot allow HTTPS")
        if libc.syscall(_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    except OSError as exc:
        return f"Landlock not applied: {exc.strerror}"
    finally:
        os.close(ruleset)
    net = ("TCP: connect to 443 only" if rules.https else "TCP: none") if handled_net else "TCP unrestricted"
    return f"Landlock ABI {abi}: files as allowed, {net}"


def _allow_path(libc: ctypes.CDLL, ruleset: int, path: str, access: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # not on this machine: nothing to allow
    try:
        if not os.path.isdir(path):
            access &= _FILE_ONLY
        attr = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
        # A rule the kernel refuses leaves that path closed: stricter, never looser.
        libc.syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, attr, ctypes.c_uint32(0))
    finally:
        os.close(fd)


# seccomp: struct seccomp_data is {int nr; u32 arch; u64 ip; u64 args[6]}; a BPF program of (code, jt, jf, k)
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SOCKET_NR = {"x86_64": 41, "aarch64": 198}
_X32_BIT = 0x40000000
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000


def _deny_unix_sockets(libc: ctypes.CDLL, allow: bool = False) -> str:
    """socket(AF_UNIX, ...) fails with EACCES (unless allowed); foreign-ABI system calls (i386, x32) fail
    with ENOSYS."""
    machine = platform.machine()
    if machine not in _AUDIT_ARCH:
        return f"Unix sockets allowed: no seccomp filter for {machine}"
    deny = _RET_ERRNO | errno.EACCES
    x32 = machine == "x86_64"
    program = [
        (_LD_W_ABS, 0, 0, 4),  # arch
        (_JEQ_K, 1, 0, _AUDIT_ARCH[machine]),
        (_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
        (_LD_W_ABS, 0, 0, 0),  # nr
        (_JGE_K, 0, 1, _X32_BIT) if x32 else (_JEQ_K, 0, 1, 0xFFFFFFFF),
        (_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS),
    ]
    if not allow:
        program += [
            (_JEQ_K, 0, 3, _SOCKET_NR[machine]),
            (_LD_W_ABS, 0, 0, 16),  # args[0], the domain (low half, little-endian)
            (_JEQ_K, 0, 1, 1),  # AF_UNIX
            (_RET_K, 0, 0, deny),
        ]
    program.append((_RET_K, 0, 0, _RET_ALLOW))
    filters = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    code = ctypes.create_string_buffer(filters, len(filters))

    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = _Prog(len(program), ctypes.cast(code, ctypes.c_void_p))
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        return f"Unix sockets allowed: seccomp refused ({os.strerror(ctypes.get_errno())})"
    return (
        "seccomp: Unix sockets allowed (CUDA), foreign ABIs refused" if allow else "seccomp: no Unix sockets"
    )


def hub_dirs() -> list[str]:
    """Where huggingface_hub keeps fetched models and its token: HF_HOME (else the XDG cache's huggingface),
    and HF_HUB_CACHE where it is set apart."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs = [os.environ.get("HF_HOME") or os.path.join(cache, "huggingface")]
    if hub := os.environ.get("HF_HUB_CACHE"):
        dirs.append(hub)
    return dirs
