"""Seccomp for the native runtime: the OCI spec's ``linux.seccomp`` compiled to a
classic BPF program with libseccomp (through ctypes), and loaded in the container init.

Compiling happens in the monitor, before any fork (:func:`compile_filter` returns the
program as bytes), so a bad profile is an error of ``create`` and the init only has to
hand the bytes to the kernel (:func:`load`) — after pivot_root nothing can be loaded.

What libseccomp gives us that a hand-written compiler would have to redo: syscall
numbers per architecture (x86_64 with its x86 and x32 sub-architectures, aarch64 with
arm...), pseudo-syscalls for names an architecture lacks, the architecture checks at the
top of the program and the 64-bit argument comparisons. As runc does, names that
libseccomp does not know are skipped, and the filter does not set no_new_privs itself
(that is the spec's ``noNewPrivileges``; without it, loading needs CAP_SYS_ADMIN, so the
init loads it before dropping capabilities).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Any

_LIB = "libseccomp.so.2"

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_KILL_THREAD = 0x00000000
SCMP_ACT_TRAP = 0x00030000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_FLTATR_CTL_NNP = 3
SCMP_FLTATR_ACT_BADARCH = 2
_ERRNO = 0x00050000
_TRACE = 0x7FF00000
NR_SCMP_ERROR = -1

OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
SECCOMP_SET_MODE_FILTER = 1


class SeccompError(Exception):
    """The profile cannot be compiled; the message says which part."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


_lib: Any = None
_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded now: load() runs after pivot_root
_libc.syscall.restype = ctypes.c_long


def _load_lib() -> Any:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL(_LIB, use_errno=True)
        except OSError as e:
            raise SeccompError(f"libseccomp is not available ({_LIB}): {e}") from None
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_arch_native.restype = ctypes.c_uint32
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(_ArgCmp),
        ]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _lib = lib
    return _lib


def available() -> bool:
    try:
        _load_lib()
        return True
    except SeccompError:
        return False


def action(name: str, errno_ret: int | None, default_errno: int | None = None) -> int:
    """An OCI action name -> libseccomp's action value."""
    if name == "SCMP_ACT_ALLOW":
        return SCMP_ACT_ALLOW
    if name == "SCMP_ACT_ERRNO":
        ret = errno_ret if errno_ret is not None else default_errno
        return _ERRNO | ((ret if ret is not None else errno.EPERM) & 0xFFFF)
    if name in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"):
        return SCMP_ACT_KILL_THREAD
    if name == "SCMP_ACT_KILL_PROCESS":
        return SCMP_ACT_KILL_PROCESS
    if name == "SCMP_ACT_TRAP":
        return SCMP_ACT_TRAP
    if name == "SCMP_ACT_TRACE":
        return _TRACE | ((errno_ret or errno.EPERM) & 0xFFFF)
    if name == "SCMP_ACT_LOG":
        return SCMP_ACT_LOG
    raise SeccompError(f"unknown seccomp action {name!r}")


def _arch_name(scmp: str) -> bytes:
    # SCMP_ARCH_X86_64 -> x86_64, SCMP_ARCH_AARCH64 -> aarch64 (libseccomp's names)
    return scmp.removeprefix("SCMP_ARCH_").lower().encode()


def compile_filter(config: dict[str, Any]) -> bytes:
    """OCI ``linux.seccomp`` -> a BPF program (``struct sock_filter`` array as bytes)."""
    lib = _load_lib()
    default_errno = config.get("defaultErrnoRet")
    default = action(str(config.get("defaultAction") or ""), default_errno)
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise SeccompError("seccomp_init failed (bad default action?)")
    try:
        lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0)
        native = lib.seccomp_arch_native()
        for arch in config.get("architectures") or []:
            token = lib.seccomp_arch_resolve_name(_arch_name(str(arch)))
            if token == 0:
                raise SeccompError(f"unknown seccomp architecture {arch!r}")
            if token == native:
                continue
            ret = lib.seccomp_arch_add(ctx, token)
            if ret < 0 and ret != -errno.EEXIST:
                raise SeccompError(f"adding architecture {arch}: {os.strerror(-ret)}")
        for rule in config.get("syscalls") or []:
            act = action(str(rule.get("action") or ""), rule.get("errnoRet"), default_errno)
            if act == default:
                continue  # libseccomp refuses rules that repeat the default action
            args = rule.get("args") or []
            for name in rule.get("names") or []:
                nr = lib.seccomp_syscall_resolve_name(str(name).encode())
                if nr == NR_SCMP_ERROR:
                    continue  # unknown to libseccomp (newer than it): skipped, as runc
                _add(lib, ctx, act, nr, str(name), args)
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            ret = lib.seccomp_export_bpf(ctx, fd)
            if ret < 0:
                raise SeccompError(f"exporting the seccomp filter: {os.strerror(-ret)}")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def compile_cached(config: dict[str, Any], cache_dir: str | None) -> bytes:
    """:func:`compile_filter`, through a cache of programs keyed by the profile's hash
    (compiling Docker's default takes ~8 ms; every container of a daemon uses it).
    ``cache_dir`` lives under the daemon's exec root (root only, cleared at boot)."""
    if not cache_dir:
        return compile_filter(config)
    import hashlib
    import json

    canon = json.dumps([_CACHE_FORMAT, os.uname().machine, config], sort_keys=True)
    path = os.path.join(cache_dir, hashlib.sha256(canon.encode()).hexdigest() + ".bpf")
    try:
        with open(path, "rb") as f:
            program = f.read()
        if program and len(program) % 8 == 0:
            return program
    except OSError:
        pass
    program = compile_filter(config)
    try:
        os.makedirs(cache_dir, 0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(program)
        os.rename(tmp, path)
    except OSError:
        pass  # a cache only
    return program


_CACHE_FORMAT = "pallet-seccomp-1"


def _add(lib: Any, ctx: Any, act: int, nr: int, name: str, args: list[dict[str, Any]]) -> None:
    def add(conds: list[dict[str, Any]]) -> None:
        arr = (_ArgCmp * max(1, len(conds)))()
        for i, a in enumerate(conds):
            op = OPS.get(str(a.get("op")))
            if op is None:
                raise SeccompError(f"{name}: unknown seccomp operator {a.get('op')!r}")
            arr[i] = _ArgCmp(
                int(a["index"]), op, int(a.get("value") or 0), int(a.get("valueTwo") or 0)
            )
        ret = lib.seccomp_rule_add_array(ctx, act, nr, len(conds), arr)
        if ret < 0:
            raise SeccompError(f"seccomp rule for {name}: {os.strerror(-ret)}")

    indexes = [int(a["index"]) for a in args]
    if len(set(indexes)) == len(indexes):
        add(args)  # all conditions on different arguments: one rule, ANDed
    else:
        for a in args:  # the same argument twice: one rule each (ORed), as runc
            add([a])


def load(program: bytes) -> None:
    """Install the BPF program on the calling thread (``seccomp(2)``, falling back to
    ``prctl``). Needs no_new_privs or CAP_SYS_ADMIN."""
    if len(program) % 8:
        raise OSError(errno.EINVAL, "seccomp program size is not a multiple of 8")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = struct.pack("HxxxxxxQ", len(program) // 8, ctypes.addressof(buf))
    pbuf = ctypes.create_string_buffer(prog, len(prog))
    libc = _libc
    nr = _SYS_SECCOMP.get(os.uname().machine)
    if nr is not None:
        ret = libc.syscall(
            ctypes.c_long(nr),
            ctypes.c_ulong(SECCOMP_SET_MODE_FILTER),
            ctypes.c_ulong(0),
            ctypes.c_void_p(ctypes.addressof(pbuf)),
        )
    else:
        ret = libc.prctl(
            ctypes.c_int(PR_SET_SECCOMP),
            ctypes.c_ulong(SECCOMP_MODE_FILTER),
            ctypes.c_void_p(ctypes.addressof(pbuf)),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"loading the seccomp filter: {os.strerror(err)}")
