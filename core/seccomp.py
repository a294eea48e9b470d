"""Seccomp profiles: Docker's default profile, profiles from files, and their conversion
into the OCI spec's ``linux.seccomp`` for one container (its capabilities, the host's
architecture, the running kernel), as moby's ``profiles/seccomp`` does.

The default below carries the same rules as Docker's ``default.json`` (moby,
Apache-2.0): deny with EPERM by default, allow a long list of ordinary syscalls, allow
the privileged ones only to containers holding the capability that guards them, keep
``clone`` from creating namespaces without CAP_SYS_ADMIN, make ``clone3`` fail with
ENOSYS (libc falls back to ``clone``, which can be filtered), refuse ``socket`` for
AF_VSOCK and ``personality`` except for its harmless values. Which syscalls a profile
names is data; how a rule is selected (``includes``/``excludes`` of capabilities,
architectures and minimum kernel) follows Docker's semantics.

A profile given with ``--security-opt seccomp=<file>`` uses the same format (Docker's
JSON profiles work unchanged).
"""

from __future__ import annotations

import os
import platform
from typing import Any

from pallet.errors import InvalidArgument
from pydantic import BaseModel, ConfigDict, Field, ValidationError

_ALLOWED = """
accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown chown32
clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime
clock_gettime64 clock_nanosleep clock_nanosleep_time64 close close_range connect
copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old
epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit
exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir
fchmod fchmodat fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr
flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync
ftruncate ftruncate64 futex futex_time64 futex_waitv futimesat getcpu getcwd getdents
getdents64 getegid getegid32 geteuid geteuid32 getgid getgid32 getgroups getgroups32
getitimer getpeername getpgid getpgrp getpid getppid getpriority getrandom getresgid
getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage getsid getsockname
getsockopt get_thread_area gettid gettimeofday getuid getuid32 getxattr inotify_add_watch
inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy io_getevents
io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit
io_uring_enter io_uring_register io_uring_setup ipc kill landlock_add_rule
landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link linkat
listen listxattr llistxattr _llseek lremovexattr lseek lsetxattr lstat lstat64 madvise
membarrier memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2
mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open mq_timedreceive
mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap msgctl msgget
msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep newfstatat
_newselect open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc
pkey_free pkey_mprotect poll ppoll ppoll_time64 prctl pread64 preadv preadv2 prlimit64
process_mrelease pselect6 pselect6_time64 pwrite64 pwritev pwritev2 read readahead
readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg remap_file_pages
removexattr rename renameat renameat2 restart_syscall rmdir rseq rt_sigaction
rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait
rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam
sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval
sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam
sched_setscheduler sched_yield seccomp select semctl semget semop semtimedop
semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid setfsgid32
setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid setpriority
setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32
setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid
setuid32 setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4
sigprocmask sigreturn socketcall socketpair splice stat stat64 statfs statfs64 statx
symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create
timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64
timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times
tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat utime utimensat
utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write writev
"""

# Namespace flags of clone(2): CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET.
CLONE_NS_MASK = 0x7E020000
AF_VSOCK = 40


def _rule(names: str, **extra: Any) -> dict[str, Any]:
    return {"names": names.split(), "action": "SCMP_ACT_ALLOW", **extra}


def _caps(*caps: str) -> dict[str, Any]:
    return {"caps": list(caps)}


def default_profile() -> dict[str, Any]:
    """Docker's default profile, in Docker's profile format."""
    eq = "SCMP_CMP_EQ"
    syscalls = [
        _rule(_ALLOWED),
        _rule("process_vm_readv process_vm_writev ptrace", includes={"minKernel": "4.8"}),
        _rule("socket", args=[{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}]),
        *(
            _rule("personality", args=[{"index": 0, "value": v, "op": eq}])
            for v in (0, 8, 0x20000, 0x20008, 0xFFFFFFFF)
        ),
        _rule("sync_file_range2 swapcontext", includes={"arches": ["ppc64le"]}),
        _rule(
            "arm_fadvise64_64 arm_sync_file_range sync_file_range2 breakpoint cacheflush set_tls",
            includes={"arches": ["arm", "arm64"]},
        ),
        _rule("arch_prctl", includes={"arches": ["amd64", "x32"]}),
        _rule("modify_ldt", includes={"arches": ["amd64", "x32", "x86"]}),
        _rule(
            "s390_pci_mmio_read s390_pci_mmio_write s390_runtime_instr",
            includes={"arches": ["s390", "s390x"]},
        ),
        _rule("riscv_flush_icache", includes={"arches": ["riscv64"]}),
        _rule("open_by_handle_at", includes=_caps("CAP_DAC_READ_SEARCH")),
        _rule(
            "bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie mount"
            " mount_setattr move_mount open_tree perf_event_open quotactl quotactl_fd"
            " setdomainname sethostname setns syslog umount umount2 unshare",
            includes=_caps("CAP_SYS_ADMIN"),
        ),
        _rule(
            "clone",
            args=[{"index": 0, "value": CLONE_NS_MASK, "op": "SCMP_CMP_MASKED_EQ"}],
            excludes={"caps": ["CAP_SYS_ADMIN"], "arches": ["s390", "s390x"]},
        ),
        _rule(
            "clone",
            args=[{"index": 1, "value": CLONE_NS_MASK, "op": "SCMP_CMP_MASKED_EQ"}],
            includes={"arches": ["s390", "s390x"]},
            excludes=_caps("CAP_SYS_ADMIN"),
        ),
        {
            "names": ["clone3"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 38,  # ENOSYS: libc falls back to clone
            "excludes": _caps("CAP_SYS_ADMIN"),
        },
        _rule("reboot", includes=_caps("CAP_SYS_BOOT")),
        _rule("chroot", includes=_caps("CAP_SYS_CHROOT")),
        _rule("delete_module init_module finit_module", includes=_caps("CAP_SYS_MODULE")),
        _rule("acct", includes=_caps("CAP_SYS_PACCT")),
        _rule(
            "kcmp pidfd_getfd process_madvise process_vm_readv process_vm_writev ptrace",
            includes=_caps("CAP_SYS_PTRACE"),
        ),
        _rule("iopl ioperm", includes=_caps("CAP_SYS_RAWIO")),
        _rule("settimeofday stime clock_settime clock_settime64", includes=_caps("CAP_SYS_TIME")),
        _rule("vhangup", includes=_caps("CAP_SYS_TTY_CONFIG")),
        _rule(
            "get_mempolicy mbind set_mempolicy set_mempolicy_home_node",
            includes=_caps("CAP_SYS_NICE"),
        ),
        _rule("syslog", includes=_caps("CAP_SYSLOG")),
        _rule("bpf", includes=_caps("CAP_BPF")),
        _rule("perf_event_open", includes=_caps("CAP_PERFMON")),
    ]
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,  # EPERM
        "archMap": [
            {
                "architecture": "SCMP_ARCH_X86_64",
                "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            },
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
            {"architecture": "SCMP_ARCH_S390X", "subArchitectures": ["SCMP_ARCH_S390"]},
            {"architecture": "SCMP_ARCH_RISCV64", "subArchitectures": None},
        ],
        "syscalls": syscalls,
    }


# --- the profile format (Docker's), validated -------------------------------------------

ACTIONS = {
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
}
OPS = {
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
}


class _P(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Arg(_P):
    index: int = Field(ge=0, le=5)
    value: int = Field(ge=0)
    valueTwo: int = Field(0, ge=0)
    op: str


class Filter(_P):
    caps: list[str] = Field(default_factory=list)
    arches: list[str] = Field(default_factory=list)
    minKernel: str | None = None


class SyscallRule(_P):
    names: list[str] = Field(default_factory=list)
    name: str | None = None  # the old single-name form
    action: str
    errnoRet: int | None = None
    args: list[Arg] | None = None
    includes: Filter = Field(default_factory=Filter)
    excludes: Filter = Field(default_factory=Filter)


class ArchMap(_P):
    architecture: str
    subArchitectures: list[str] | None = None


class Profile(_P):
    defaultAction: str
    defaultErrnoRet: int | None = None
    architectures: list[str] | None = None
    archMap: list[ArchMap] | None = None
    syscalls: list[SyscallRule] = Field(default_factory=list)


def parse_profile(data: Any, source: str) -> Profile:
    """A profile (Docker's JSON format) checked; InvalidArgument names what is wrong."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"Decoding seccomp profile failed: {source}: not a JSON object")
    try:
        profile = Profile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidArgument(
            f"Decoding seccomp profile failed: {source}: {where}: {first['msg']}"
        ) from None
    for action in [profile.defaultAction, *(r.action for r in profile.syscalls)]:
        if action not in ACTIONS:
            raise InvalidArgument(f"seccomp profile {source}: unknown action {action!r}")
    for r in profile.syscalls:
        for a in r.args or []:
            if a.op not in OPS:
                raise InvalidArgument(f"seccomp profile {source}: unknown operator {a.op!r}")
    return profile


# --- conversion into the OCI spec for one container --------------------------------------

_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "x86", "armv7l": "arm"}
_NATIVE_SCMP = {
    "amd64": "SCMP_ARCH_X86_64",
    "arm64": "SCMP_ARCH_AARCH64",
    "x86": "SCMP_ARCH_X86",
    "arm": "SCMP_ARCH_ARM",
    "s390x": "SCMP_ARCH_S390X",
    "riscv64": "SCMP_ARCH_RISCV64",
    "ppc64le": "SCMP_ARCH_PPC64LE",
}


def host_arch(machine: str | None = None) -> str:
    """The host's architecture in Go's names (``amd64``, ``arm64``), as profiles use."""
    m = machine or platform.machine()
    return _GO_ARCH.get(m, m)


def _kernel_version() -> tuple[int, int]:
    try:
        major, minor = os.uname().release.split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def _version(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def to_oci(
    profile: Profile,
    capabilities: list[str],
    arch: str | None = None,
    kernel: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` for a container holding ``capabilities`` on ``arch``."""
    arch = arch or host_arch()
    kernel = kernel or _kernel_version()
    caps = set(capabilities)
    out: dict[str, Any] = {"defaultAction": profile.defaultAction}
    if profile.defaultErrnoRet is not None:
        out["defaultErrnoRet"] = profile.defaultErrnoRet
    arches: list[str] = []
    if profile.architectures:
        arches = list(profile.architectures)
    elif profile.archMap:
        native = _NATIVE_SCMP.get(arch)
        for m in profile.archMap:
            if m.architecture == native:
                arches = [m.architecture, *(m.subArchitectures or [])]
    if arches:
        out["architectures"] = arches
    rules: list[dict[str, Any]] = []
    for r in profile.syscalls:
        inc, exc = r.includes, r.excludes
        if inc.arches and arch not in inc.arches:
            continue
        if inc.caps and not all(c in caps for c in inc.caps):
            continue
        if inc.minKernel and kernel < _version(inc.minKernel):
            continue
        if exc.arches and arch in exc.arches:
            continue
        if exc.caps and any(c in caps for c in exc.caps):
            continue
        names = list(r.names) or ([r.name] if r.name else [])
        if not names:
            continue
        rule: dict[str, Any] = {"names": names, "action": r.action}
        if r.errnoRet is not None:
            rule["errnoRet"] = r.errnoRet
        if r.args:
            rule["args"] = [a.model_dump() for a in r.args]
        rules.append(rule)
    out["syscalls"] = rules
    return out
