"""The native execution backend: an OCI bundle carried out in Python, as runc would.

Process layout (all inside the per-container monitor, :mod:`pallet.shim`)::

    monitor ── fork ──> intermediate: joins the cgroup, setns()/unshare() the
                        namespaces, forks the init, reports its pid, exits
                            └── fork ──> init (pid 1 of the new pid namespace):
                                         mounts, pivot_root, hostname, lo up,
                                         rlimits, capabilities, user, cwd, path
                                         lookup -> "ready"; blocks until start;
                                         no_new_privs; execve

The init is reparented to the monitor when the intermediate exits (the monitor is a
child subreaper), so the monitor can ``waitpid`` it. Two pipes tie them: *sync*
(monitor -> init: one byte means "exec now", EOF means "give up") and *status* (init ->
monitor, close-on-exec: JSON lines; EOF after "ready" means the exec succeeded).

Everything the children need is imported at the top: after pivot_root the host's
Python library is out of reach, so a lazy import there would fail.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import signal
import socket
import stat
import struct
import termios
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from pallet import linux
from pallet.capabilities import CAPABILITIES
from pallet.cgroups import Cgroup, hierarchies
from pallet.errors import PluginSkip
from pallet.execution import ExecBackend, ExecError, Stdio
from pallet.plugins.exec_native import capabilities, seccomp

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

NAMESPACES = {
    "pid": linux.CLONE_NEWPID,
    "network": linux.CLONE_NEWNET,
    "mount": linux.CLONE_NEWNS,
    "ipc": linux.CLONE_NEWIPC,
    "uts": linux.CLONE_NEWUTS,
    "cgroup": linux.CLONE_NEWCGROUP,
    "user": linux.CLONE_NEWUSER,
}

# mount(8) option -> (clear, set) flags
_MOUNT_FLAGS: dict[str, tuple[int, int]] = {
    "defaults": (0, 0),
    "ro": (0, linux.MS_RDONLY),
    "rw": (linux.MS_RDONLY, 0),
    "suid": (linux.MS_NOSUID, 0),
    "nosuid": (0, linux.MS_NOSUID),
    "dev": (linux.MS_NODEV, 0),
    "nodev": (0, linux.MS_NODEV),
    "exec": (linux.MS_NOEXEC, 0),
    "noexec": (0, linux.MS_NOEXEC),
    "sync": (0, linux.MS_SYNCHRONOUS),
    "async": (linux.MS_SYNCHRONOUS, 0),
    "dirsync": (0, linux.MS_DIRSYNC),
    "remount": (0, linux.MS_REMOUNT),
    "mand": (0, linux.MS_MANDLOCK),
    "nomand": (linux.MS_MANDLOCK, 0),
    "atime": (linux.MS_NOATIME, 0),
    "noatime": (0, linux.MS_NOATIME),
    "diratime": (linux.MS_NODIRATIME, 0),
    "nodiratime": (0, linux.MS_NODIRATIME),
    "relatime": (0, linux.MS_RELATIME),
    "norelatime": (linux.MS_RELATIME, 0),
    "strictatime": (0, linux.MS_STRICTATIME),
    "nostrictatime": (linux.MS_STRICTATIME, 0),
    "bind": (0, linux.MS_BIND),
    "rbind": (0, linux.MS_BIND | linux.MS_REC),
}
_PROPAGATION = {
    "private": linux.MS_PRIVATE,
    "rprivate": linux.MS_PRIVATE | linux.MS_REC,
    "shared": linux.MS_SHARED,
    "rshared": linux.MS_SHARED | linux.MS_REC,
    "slave": linux.MS_SLAVE,
    "rslave": linux.MS_SLAVE | linux.MS_REC,
    "unbindable": linux.MS_UNBINDABLE,
    "runbindable": linux.MS_UNBINDABLE | linux.MS_REC,
}

# statvfs f_flag bits that a read-only bind remount must keep (same values as MS_*)
_ST_KEEP = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC

# (path, type, major, minor): the nodes every container's /dev gets (runc's defaults)
DEFAULT_DEVICES = [
    ("/dev/null", "c", 1, 3),
    ("/dev/zero", "c", 1, 5),
    ("/dev/full", "c", 1, 7),
    ("/dev/random", "c", 1, 8),
    ("/dev/urandom", "c", 1, 9),
    ("/dev/tty", "c", 5, 0),
]


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


@dataclass
class _Created:
    """What the monitor keeps between create and start for one container."""

    pid: int
    bundle: str
    sync_w: int
    status_r: int
    buf: bytearray = field(default_factory=bytearray)


class _StepError(Exception):
    """A setup step in the container init failed: carries Docker's exit code."""

    def __init__(self, message: str, code: int = 125) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class NativeBackend(ExecBackend):
    """Runs OCI bundles without runc: see the module docs for the process layout."""

    name = "native"

    def __init__(self) -> None:
        self._created: dict[int, _Created] = {}

    @classmethod
    def probe(cls) -> None:
        if os.geteuid() != 0:
            raise PluginSkip("the native runtime needs root")
        if not os.path.exists("/proc/self/ns/pid"):
            raise PluginSkip("the kernel has no namespaces")

    # --- OCI operations ----------------------------------------------------------------

    def create(self, bundle: Path, spec: dict[str, Any], stdio: Stdio) -> int:
        plan = _Plan.from_spec(Path(bundle), spec)
        cgroup: Cgroup | None = None
        try:
            cgroup = Cgroup(plan.cgroups_path)
            cgroup.create(spec.get("linux", {}).get("resources") or {})
        except (OSError, ValueError) as e:
            raise ExecError(f"cgroups: {_reason(e)}", 125) from None
        # The init must end up our child when the intermediate exits.
        linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
        status_r, status_w = os.pipe()
        sync_r, sync_w = os.pipe()
        try:
            mid = os.fork()
        except OSError as e:
            for fd in (status_r, status_w, sync_r, sync_w):
                os.close(fd)
            cgroup.destroy()
            raise ExecError(f"fork: {e.strerror}", 125) from None
        if mid == 0:  # pragma: no cover - runs in the child
            try:
                os.close(status_r)
                os.close(sync_w)
                _intermediate(plan, cgroup, stdio, status_w, sync_r)
            finally:
                os._exit(125)
        os.close(status_w)
        os.close(sync_r)
        created = _Created(0, str(bundle), sync_w, status_r)
        init_pid = 0
        ready = False
        error: dict[str, Any] | None = None
        try:
            while True:
                msg = _read_msg(created)
                if msg is None:
                    error = {"error": "container init exited during setup", "code": 125}
                    break
                if "pid" in msg:
                    init_pid = created.pid = int(msg["pid"])
                    if ready:
                        break
                elif "error" in msg:
                    error = msg
                    break
                elif msg.get("ready"):
                    # The init and the intermediate share the pipe: "ready" can come
                    # before the intermediate got to report the pid. Both are needed.
                    ready = True
                    if init_pid:
                        break
        except (OSError, ValueError) as e:
            error = {"error": f"reading the container init's status: {e}", "code": 125}
        finally:
            _waitpid(mid)  # the intermediate exits right after reporting the init's pid
        if error is not None:
            if init_pid:
                try:
                    os.kill(init_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _waitpid(init_pid)
            os.close(sync_w)
            os.close(status_r)
            try:
                cgroup.destroy()
            except OSError:
                pass
            raise ExecError(str(error.get("error")), int(error.get("code", 125)))
        self._created[init_pid] = created
        return init_pid

    def start(self, bundle: Path, pid: int) -> None:
        created = self._created.pop(pid, None)
        if created is None:
            raise ExecError("container was not created (or already started)", 125)
        try:
            try:
                os.write(created.sync_w, b"\x00")
            except BrokenPipeError:
                raise ExecError("container init exited before start", 125) from None
            finally:
                os.close(created.sync_w)
            msg = _read_msg(created)  # EOF: the exec closed the pipe, all is well
            if msg is not None and "error" in msg:
                raise ExecError(str(msg["error"]), int(msg.get("code", 125)))
        finally:
            os.close(created.status_r)

    def delete(self, bundle: Path, spec: dict[str, Any]) -> None:
        for pid, created in list(self._created.items()):
            if created.bundle == str(bundle):
                del self._created[pid]
                os.close(created.sync_w)
                os.close(created.status_r)
        path = _cgroups_path(Path(bundle), spec)
        Cgroup(path).destroy()

    def exec(
        self, bundle: Path, spec: dict[str, Any], pid: int, process: dict[str, Any], stdio: Stdio
    ) -> int:
        return _exec(Path(bundle), spec, pid, process, stdio)

    def oom_killed(self, bundle: Path, spec: dict[str, Any]) -> bool:
        try:
            return Cgroup(_cgroups_path(Path(bundle), spec)).oom_killed()
        except (OSError, ValueError):
            return False


# --- the plan: the spec, checked and digested in the monitor before forking ------------


def _cgroups_path(bundle: Path, spec: dict[str, Any]) -> str:
    return str(spec.get("linux", {}).get("cgroupsPath") or f"/pallet/{bundle.name}")


@dataclass
class _Plan:
    bundle: Path
    rootfs: str
    readonly_root: bool
    args: list[str]
    env: list[str]
    cwd: str
    uid: int
    gid: int
    groups: list[int]
    umask: int | None
    rlimits: list[tuple[int, int, int]]
    no_new_privs: bool
    cap_drop: list[int]
    hostname: str | None
    domainname: str | None
    mounts: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    masked: list[str]
    readonly: list[str]
    sysctl: dict[str, str]
    oom_score_adj: int | None
    propagation: int
    join: list[tuple[int, str]]  # (flag, path) namespaces to enter
    new: int  # flags of namespaces to create
    cgroups_path: str
    cgroup_dirs: dict[str, str] = field(default_factory=dict)
    caps: capabilities.CapSets | None = None  # see _harden
    seccomp_bpf: bytes | None = None
    terminal: bool = False  # process.terminal: a pty, see _setup_terminal
    console_size: tuple[int, int] | None = None  # process.consoleSize (rows, columns)

    @classmethod
    def from_spec(cls, bundle: Path, spec: dict[str, Any]) -> _Plan:
        try:
            plan = cls._from_spec(bundle, spec)
            _harden(plan, spec)
            plan.terminal = bool((spec.get("process") or {}).get("terminal"))
            size = (spec.get("process") or {}).get("consoleSize") or {}
            if size.get("height") and size.get("width"):
                plan.console_size = (int(size["height"]), int(size["width"]))
            return plan
        except ExecError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ExecError(f"invalid OCI spec: {type(e).__name__}: {e}", 125) from None

    @classmethod
    def _from_spec(cls, bundle: Path, spec: dict[str, Any]) -> _Plan:
        proc = spec.get("process") or {}
        lnx = spec.get("linux") or {}
        args = [str(a) for a in proc.get("args") or []]
        if not args:
            raise ExecError("no command specified (process.args is empty)", 125)
        root = spec.get("root") or {}
        rootfs = str(root.get("path") or "rootfs")
        if not rootfs.startswith("/"):
            rootfs = str(bundle / rootfs)
        rootfs = os.path.realpath(rootfs)
        if not os.path.isdir(rootfs):
            raise ExecError(f"rootfs {rootfs} does not exist", 125)
        user = proc.get("user") or {}
        rlimits = []
        for rl in proc.get("rlimits") or []:
            kind = getattr(resource, str(rl["type"]), None)
            if kind is None:
                raise ExecError(f"unknown rlimit {rl['type']!r}", 125)
            rlimits.append((int(kind), int(rl["soft"]), int(rl["hard"])))
        cap_drop: list[int] = []
        caps = proc.get("capabilities")
        if caps is not None and caps.get("bounding") is not None:
            wanted = set()
            for name in caps["bounding"]:
                if name not in CAPABILITIES:
                    raise ExecError(f"unknown capability {name!r}", 125)
                wanted.add(CAPABILITIES.index(name))
            cap_drop = [c for c in range(_cap_last_cap() + 1) if c not in wanted]
        join: list[tuple[int, str]] = []
        new = 0
        for ns in lnx.get("namespaces") or []:
            kind = ns["type"]
            if kind not in NAMESPACES:
                raise ExecError(f"unknown namespace type {kind!r}", 125)
            if kind == "user":
                raise ExecError("the native runtime does not support user namespaces yet", 125)
            if kind == "cgroup" and not os.path.exists("/proc/self/ns/cgroup"):
                continue
            if ns.get("path"):
                join.append((NAMESPACES[kind], str(ns["path"])))
            else:
                new |= NAMESPACES[kind]
        has_uts = any(f == linux.CLONE_NEWUTS for f, _ in join) or new & linux.CLONE_NEWUTS
        hostname = spec.get("hostname") or None
        domainname = spec.get("domainname") or None
        if (hostname or domainname) and not has_uts:
            raise ExecError("unable to set hostname without a private UTS namespace", 125)
        if not (new & linux.CLONE_NEWNS):
            raise ExecError("the native runtime needs a new mount namespace", 125)
        mounts = [dict(m) for m in spec.get("mounts") or []]
        for m in mounts:
            if not str(m.get("destination", "")).startswith("/"):
                m["destination"] = "/" + str(m.get("destination", ""))
        propagation = _PROPAGATION.get(
            str(lnx.get("rootfsPropagation") or "rslave"), linux.MS_SLAVE | linux.MS_REC
        )
        umask = user.get("umask")
        return cls(
            bundle=bundle,
            rootfs=rootfs,
            readonly_root=bool(root.get("readonly")),
            args=args,
            env=[str(e) for e in proc.get("env") or []],
            cwd=str(proc.get("cwd") or "/"),
            uid=int(user.get("uid") or 0),
            gid=int(user.get("gid") or 0),
            groups=[int(g) for g in user.get("additionalGids") or []],
            umask=int(umask) if umask is not None else 0o022,
            rlimits=rlimits,
            no_new_privs=bool(proc.get("noNewPrivileges")),
            cap_drop=cap_drop,
            hostname=hostname,
            domainname=domainname,
            mounts=mounts,
            devices=list(lnx.get("devices") or []),
            masked=[str(p) for p in lnx.get("maskedPaths") or []],
            readonly=[str(p) for p in lnx.get("readonlyPaths") or []],
            sysctl={str(k): str(v) for k, v in (lnx.get("sysctl") or {}).items()},
            oom_score_adj=proc.get("oomScoreAdj"),
            propagation=propagation,
            join=join,
            new=new,
            cgroups_path=_cgroups_path(bundle, spec),
        )


def _cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(CAPABILITIES) - 1


# --- hardening: capability sets and seccomp (see capabilities.py, seccomp.py) ----------


def _harden(plan: _Plan, spec: dict[str, Any]) -> None:
    """Capability sets and the compiled seccomp filter, prepared before forking."""
    try:
        plan.caps = capabilities.CapSets.from_spec((spec.get("process") or {}).get("capabilities"))
    except ValueError as e:
        raise ExecError(f"capabilities: {e}", 125) from None
    config = (spec.get("linux") or {}).get("seccomp")
    if config is not None:
        try:
            cache = os.path.join(os.path.dirname(os.path.dirname(plan.bundle)), "seccomp")
            plan.seccomp_bpf = seccomp.compile_cached(config, cache)
        except seccomp.SeccompError as e:
            raise ExecError(f"seccomp: {e}", 125) from None


def _user_and_capabilities(plan: _Plan) -> None:  # pragma: no cover - container init
    """Bounding set, then the user switch keeping the permitted set, then the other
    capability sets (runc's finalizeNamespace)."""
    sets = plan.caps
    if sets is None:
        os.setgroups(plan.groups)
        os.setgid(plan.gid)
        os.setuid(plan.uid)
        return
    capabilities.drop_bounding(sets)
    capabilities.keep_caps(True)
    os.setgroups(plan.groups)
    os.setgid(plan.gid)
    os.setuid(plan.uid)
    capabilities.keep_caps(False)
    capabilities.apply_sets(sets)


# --- pipes between monitor and init -----------------------------------------------------


def _send(fd: int, msg: dict[str, Any]) -> None:
    data = (json.dumps(msg) + "\n").encode()
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _read_msg(created: _Created) -> dict[str, Any] | None:
    """The next JSON line from the init's status pipe, or None at EOF."""
    while b"\n" not in created.buf:
        chunk = os.read(created.status_r, 4096)
        if not chunk:
            return None
        created.buf += chunk
    line, _, rest = bytes(created.buf).partition(b"\n")
    created.buf[:] = rest
    result: dict[str, Any] = json.loads(line)
    return result


def _waitpid(pid: int) -> int:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror if not e.filename else f"{e.filename}: {e.strerror}"
    return str(e)


# --- child side: everything below runs in forked processes -----------------------------


def _reset_signals() -> None:
    """Give the child (and so the container) default signal handling: Python ignores
    SIGPIPE and SIGXFSZ, and the monitor has handlers and a wakeup fd."""
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(sig) != signal.SIG_DFL:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _intermediate(
    plan: _Plan, cgroup: Cgroup, stdio: Stdio, status_w: int, sync_r: int
) -> NoReturn:  # pragma: no cover - child
    step = "join cgroup"
    try:
        _reset_signals()
        cgroup.add(os.getpid())
        plan.cgroup_dirs = dict(cgroup.dirs)
        for flag, path in plan.join:
            step = f"join namespace {path}"
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                linux.setns(fd, flag)
            finally:
                os.close(fd)
        step = "unshare namespaces"
        if plan.new:
            linux.unshare(plan.new)
        step = "fork container init"
        pid = os.fork()
        if pid == 0:
            _init(plan, stdio, status_w, sync_r)
        _send(status_w, {"pid": pid})
        os._exit(0)
    except BaseException as e:
        try:
            _send(status_w, {"error": f"{step}: {_reason(e)}", "code": 125})
        finally:
            os._exit(125)


class _Init:
    """The container init's setup, step by step; ``step`` names the one running."""

    def __init__(self, plan: _Plan, stdio: Stdio) -> None:
        self.plan = plan
        self.stdio = stdio
        self.step = "init"
        self.rootfs = plan.rootfs
        self.dev_tmpfs = False
        self.has_proc = False
        self.has_pts = False

    # path handling inside the rootfs ---------------------------------------------------

    def inside(self, path: str) -> str:
        """``path`` in the container, resolved on the host without leaving the rootfs
        (symlinks are taken relative to the rootfs root)."""
        return secure_join(self.rootfs, path)

    # the steps -------------------------------------------------------------------------

    def setup_stdio(self) -> None:
        self.step = "set up stdio"
        stdin = self.stdio.stdin
        if stdin is None:
            stdin = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        # move them out of the way first, in case one of them already is 0, 1 or 2
        fds = [
            fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            for fd in (stdin, self.stdio.stdout, self.stdio.stderr)
        ]
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)

    def prepare_root(self) -> None:
        self.step = "make / private to the container"
        linux.mount(None, "/", None, self.plan.propagation)
        self.step = f"bind mount rootfs {self.rootfs}"
        linux.mount(self.rootfs, self.rootfs, None, linux.MS_BIND | linux.MS_REC)

    def do_mounts(self) -> None:
        for m in self.plan.mounts:
            dest = str(m["destination"])
            kind = str(m.get("type") or "")
            self.step = f'mount "{m.get("source") or kind}" on "{dest}"'
            self.mount_one(m, dest, kind)
        if self.dev_tmpfs:
            self.make_devices()

    def mount_one(self, m: dict[str, Any], dest: str, kind: str) -> None:
        flags, data, propagation = parse_mount_options([str(o) for o in m.get("options") or []])
        source = m.get("source")
        is_bind = kind == "bind" or bool(flags & linux.MS_BIND)
        target = self.inside(dest)
        if is_bind:
            src = str(source or "")
            if not src.startswith("/"):
                src = str(self.plan.bundle / src)
            st = os.stat(src)
            _ensure(target, directory=stat.S_ISDIR(st.st_mode))
            linux.mount(src, target, None, linux.MS_BIND | (flags & linux.MS_REC))
            rest = flags & ~(linux.MS_BIND | linux.MS_REC | linux.MS_REMOUNT)
            if rest:
                _remount_bind(target, rest)
        elif kind == "cgroup":
            _ensure(target, directory=True)
            self.mount_cgroup(target, flags)
        else:
            _ensure(target, directory=True)
            if kind == "sysfs":
                try:
                    linux.mount(str(source or "sysfs"), target, "sysfs", flags, data or None)
                except PermissionError:
                    # no private network namespace: bind the host's /sys instead
                    linux.mount("/sys", target, None, linux.MS_BIND | linux.MS_REC)
                    _remount_bind(target, flags | linux.MS_RDONLY)
            else:
                linux.mount(str(source or kind), target, kind or None, flags, data or None)
            if dest == "/dev" and kind == "tmpfs":
                self.dev_tmpfs = True
            elif dest == "/proc" and kind == "proc":
                self.has_proc = True
            elif dest == "/dev/pts" and kind == "devpts":
                self.has_pts = True
        for p in propagation:
            linux.mount(None, target, None, p)

    def mount_cgroup(self, target: str, flags: int) -> None:
        """``/sys/fs/cgroup``: the container's own cgroup in every hierarchy."""
        hier = hierarchies()
        dirs = self.plan.cgroup_dirs
        if hier.mode == "v2":
            linux.mount(dirs["unified"], target, None, linux.MS_BIND)
            _remount_bind(target, flags)
            return
        base = flags & (linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
        linux.mount("tmpfs", target, "tmpfs", base, "mode=755")
        for key, mnt in hier.v1.items():
            name = os.path.basename(mnt)
            sub = os.path.join(target, name)
            os.makedirs(sub, exist_ok=True)
            linux.mount(dirs[key], sub, None, linux.MS_BIND)
            _remount_bind(sub, flags)
            if "," in name:  # cpu,cpuacct -> cpu and cpuacct symlinks
                for part in name.split(","):
                    if not os.path.lexists(os.path.join(target, part)):
                        os.symlink(name, os.path.join(target, part))
        if hier.unified and "unified" in dirs:
            sub = os.path.join(target, os.path.basename(hier.unified))
            os.makedirs(sub, exist_ok=True)
            linux.mount(dirs["unified"], sub, None, linux.MS_BIND)
            _remount_bind(sub, flags)
        if flags & linux.MS_RDONLY:
            linux.mount(None, target, None, linux.MS_REMOUNT | base | linux.MS_RDONLY, "mode=755")

    def make_devices(self) -> None:
        devices: dict[str, dict[str, Any]] = {}
        for path, kind, major, minor in DEFAULT_DEVICES:
            devices[path] = {"path": path, "type": kind, "major": major, "minor": minor}
        for d in self.plan.devices:
            devices[str(d["path"])] = d
        old = os.umask(0)
        try:
            for d in devices.values():
                self.step = f"create device {d['path']}"
                self.make_device(d)
        finally:
            os.umask(old)
        self.step = "create /dev symlinks"
        links = [
            ("/proc/self/fd", "/dev/fd"),
            ("/proc/self/fd/0", "/dev/stdin"),
            ("/proc/self/fd/1", "/dev/stdout"),
            ("/proc/self/fd/2", "/dev/stderr"),
        ]
        if self.has_proc and os.path.exists("/proc/kcore"):
            links.append(("/proc/kcore", "/dev/core"))
        for src, dst in links:
            path = self.inside(dst)
            if not os.path.lexists(path):
                os.symlink(src, path)
        ptmx = self.inside("/dev/ptmx")
        if os.path.lexists(ptmx):
            os.unlink(ptmx)
        os.symlink("pts/ptmx", ptmx)

    def make_device(self, d: dict[str, Any]) -> None:
        kind = str(d.get("type") or "c")
        fmt = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[kind]
        mode = int(d.get("fileMode") or 0o666) & 0o7777
        path = self.inside(str(d["path"]))
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)
        dev = os.makedev(int(d.get("major") or 0), int(d.get("minor") or 0))
        try:
            os.mknod(path, mode | fmt, dev)
        except PermissionError:
            # mknod not allowed here: bind the host's node instead (runc does the same)
            with open(path, "w"):
                pass
            linux.mount(str(d["path"]), path, None, linux.MS_BIND)
            return
        os.chmod(path, mode)
        os.chown(path, int(d.get("uid") or 0), int(d.get("gid") or 0))

    def pivot(self) -> None:
        self.step = "pivot_root"
        oldroot = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
        newroot = os.open(self.rootfs, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fchdir(newroot)
            linux.pivot_root(".", ".")
            os.fchdir(oldroot)
            # rslave first so that the unmount does not propagate to the host
            linux.mount(None, ".", None, linux.MS_SLAVE | linux.MS_REC)
            linux.umount(".", linux.MNT_DETACH)
            os.chdir("/")
        finally:
            os.close(oldroot)
            os.close(newroot)
        self.rootfs = "/"

    def sysctls(self) -> None:
        for key, value in self.plan.sysctl.items():
            self.step = f"sysctl {key}"
            path = "/proc/sys/" + key.replace(".", "/")
            with open(path, "w") as f:
                f.write(value)

    def names(self) -> None:
        if self.plan.hostname:
            self.step = "sethostname"
            linux.sethostname(self.plan.hostname)
        if self.plan.domainname:
            self.step = "setdomainname"
            linux.setdomainname(self.plan.domainname)

    def loopback_up(self) -> None:
        if not self.plan.new & linux.CLONE_NEWNET:
            return
        self.step = "bring lo up"
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 0)
        try:
            req = struct.pack("16sH14x", b"lo", 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
        finally:
            s.close()

    def protect_paths(self) -> None:
        for path in self.plan.readonly:
            self.step = f"make {path} read-only"
            if not os.path.exists(path):
                continue
            linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
            _remount_bind(path, linux.MS_RDONLY, rec=True)
        for path in self.plan.masked:
            self.step = f"mask {path}"
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                linux.mount("tmpfs", path, "tmpfs", linux.MS_RDONLY, None)
            else:
                linux.mount("/dev/null", path, None, linux.MS_BIND)
        if self.plan.readonly_root:
            self.step = "make the root filesystem read-only"
            _remount_bind("/", linux.MS_RDONLY)

    def process_attrs(self) -> None:
        plan = self.plan
        if plan.oom_score_adj is not None:
            self.step = "set oom_score_adj"
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(int(plan.oom_score_adj)))
        for kind, soft, hard in plan.rlimits:
            self.step = f"setrlimit {kind}"
            try:
                resource.setrlimit(kind, (soft, hard))
            except ValueError:
                # Raising a hard limit needs CAP_SYS_RESOURCE, which a sandboxed
                # daemon may lack: cap the limit at what we have rather than fail.
                cur_hard = resource.getrlimit(kind)[1]
                if cur_hard == resource.RLIM_INFINITY or (
                    hard != resource.RLIM_INFINITY and hard <= cur_hard
                ):
                    raise
                resource.setrlimit(kind, (min(soft, cur_hard), cur_hard))
        self.step = f"create working directory {plan.cwd}"
        os.makedirs(plan.cwd, 0o755, exist_ok=True)
        if plan.seccomp_bpf is not None:
            # Before the capabilities go: without no_new_privs, loading a filter needs
            # CAP_SYS_ADMIN (runc). With it, no_new_privs is set first (harmless early).
            self.step = "load the seccomp filter"
            if plan.no_new_privs:
                linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
            seccomp.load(plan.seccomp_bpf)
        self.step = "set capabilities and user"
        _user_and_capabilities(plan)
        if plan.umask is not None:
            os.umask(plan.umask)
        self.step = f"chdir to cwd ({plan.cwd})"
        os.chdir(plan.cwd)

    def resolve(self) -> tuple[str, dict[str, str]]:
        self.step = "look up the executable"
        env: dict[str, str] = {}
        for item in self.plan.env:
            key, sep, value = item.partition("=")
            if sep and key:
                env[key] = value
        return lookup(self.plan.args[0], env.get("PATH", DEFAULT_PATH)), env


def _init(plan: _Plan, stdio: Stdio, status_w: int, sync_r: int) -> NoReturn:  # pragma: no cover
    init = _Init(plan, stdio)
    code = 125
    try:
        os.setsid()
        init.setup_stdio()
        init.prepare_root()
        init.do_mounts()
        init.pivot()
        _setup_terminal(init)
        init.sysctls()
        init.names()
        init.loopback_up()
        init.protect_paths()
        init.process_attrs()
        path, env = init.resolve()
        _send(status_w, {"ready": True})
        if not os.read(sync_r, 1):  # the monitor went away: never exec
            os._exit(125)
        os.close(sync_r)
        _exec_program(init, plan, path, env)
    except BaseException as e:
        code = _report_failure(init, status_w, e)
    os._exit(code)


_EXEC_126 = (errno.EACCES, errno.EISDIR, errno.EPERM)


def _try_send(fd: int, msg: dict[str, Any]) -> None:
    try:
        _send(fd, msg)
    except OSError:
        pass


# --- helpers (pure, testable) ------------------------------------------------------------


def parse_mount_options(options: list[str]) -> tuple[int, str, list[int]]:
    """OCI mount options -> (mount flags, data string, propagation flags to apply)."""
    flags = 0
    data: list[str] = []
    propagation: list[int] = []
    for opt in options:
        if opt in _MOUNT_FLAGS:
            clear, set_ = _MOUNT_FLAGS[opt]
            flags = (flags & ~clear) | set_
        elif opt in _PROPAGATION:
            propagation.append(_PROPAGATION[opt])
        else:
            data.append(opt)
    return flags, ",".join(data), propagation


def secure_join(root: str, unsafe: str) -> str:
    """``unsafe`` (a path in the container) as a host path under ``root``, resolving
    symlinks as if ``root`` were ``/`` so that nothing escapes it."""
    root = root.rstrip("/") or "/"
    pending = [p for p in reversed(unsafe.split("/"))]
    current: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if current:
                current.pop()
            continue
        candidate = os.path.join(root, *current, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            current.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 255:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), unsafe)
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = []
            pending.extend(reversed(target.split("/")))
        else:
            current.append(part)
    return os.path.join(root, *current) if current else root


def lookup(name: str, path_env: str) -> str:
    """``name`` resolved as ``execvp`` would, with Docker's error messages and exit
    codes (127: not found, 126: found but not executable)."""
    if "/" in name:
        try:
            st = os.stat(name)
        except FileNotFoundError:
            raise _StepError(
                f'exec: "{name}": stat {name}: no such file or directory', 127
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise _StepError(f'exec: "{name}": is a directory', 126)
        if not os.access(name, os.X_OK):
            raise _StepError(f'exec: "{name}": permission denied', 126)
        return name
    for d in path_env.split(":"):
        candidate = os.path.join(d or ".", name)
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(candidate, os.X_OK):
            return candidate
    raise _StepError(f'exec: "{name}": executable file not found in $PATH', 127)


def _ensure(path: str, directory: bool) -> None:
    """Create a mount point (a directory, or an empty file for a file bind mount)."""
    if os.path.lexists(path):
        return
    if directory:
        os.makedirs(path, 0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        os.close(fd)


def _remount_bind(path: str, flags: int, rec: bool = False) -> None:
    """Remount a bind mount with ``flags`` (ro, nosuid...), keeping the flags the mount
    already has that a bind remount must not drop."""
    keep = os.statvfs(path).f_flag & _ST_KEEP
    extra = linux.MS_REC if rec else 0
    linux.mount(None, path, None, linux.MS_BIND | linux.MS_REMOUNT | keep | flags | extra)


# --- terminals and exec (the interactive side) ------------------------------------------

_NS_FILES = {
    "pid": "pid",
    "network": "net",
    "mount": "mnt",
    "ipc": "ipc",
    "uts": "uts",
    "cgroup": "cgroup",
    "user": "user",
}
# setns order: the mount namespace last (runc's nsexec order)
_NS_ORDER = ["user", "ipc", "uts", "network", "pid", "cgroup", "mount"]


def _setup_terminal(init: _Init) -> None:  # pragma: no cover - runs in the child
    """``process.terminal``: a pty from the container's own devpts (``/dev/ptmx`` after
    pivot_root, or after joining the mount namespace), its master sent to the monitor
    on the console socket with SCM_RIGHTS (runc's protocol), the slave made the
    process's stdio and controlling terminal. Runs as root, before the user switch."""
    console = init.stdio.console
    if not init.plan.terminal or console is None:
        return
    init.step = "set up the terminal (openpty in the container's /dev/pts)"
    master, slave = os.openpty()
    init.step = "hand the terminal to the monitor"
    os.fchown(slave, init.plan.uid, -1)
    sock = socket.socket(fileno=console)
    try:
        socket.send_fds(sock, [b"console"], [master])
    finally:
        sock.detach()
        os.close(console)
        os.close(master)
    init.step = "make the terminal the controlling terminal"
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    if init.plan.console_size:  # before exec: the process must see its size at once
        rows, cols = init.plan.console_size
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    for target in (0, 1, 2):
        os.dup2(slave, target)
    if slave > 2:
        os.close(slave)


def _exec(
    bundle: Path, spec: dict[str, Any], pid: int, process: dict[str, Any], stdio: Stdio
) -> int:
    """One more process in the running container whose init is ``pid``: the monitor
    forks an intermediate that joins the container's cgroup and namespaces and forks
    the process (so it is in the pid namespace); the intermediate exits and the process
    is reparented to the monitor (a subreaper). The process sets itself up with the
    same steps as the init (rlimits, capability bounding set, user, cwd, path lookup,
    no_new_privs) and execs; its status pipe closes on exec (EOF = started)."""
    plan = _Plan.from_spec(bundle, {**spec, "process": process})
    ns_fds: list[tuple[int, int]] = []
    try:
        wanted = {
            str(ns.get("type")): ns for ns in (spec.get("linux") or {}).get("namespaces") or []
        }
        for kind in _NS_ORDER:
            if kind not in wanted or kind == "user":
                continue
            path = wanted[kind].get("path") or f"/proc/{pid}/ns/{_NS_FILES[kind]}"
            if kind == "cgroup" and not os.path.exists("/proc/self/ns/cgroup"):
                continue
            try:
                ns_fds.append((NAMESPACES[kind], os.open(str(path), os.O_RDONLY | os.O_CLOEXEC)))
            except FileNotFoundError:
                raise ExecError(f"container init {pid} is not running", 125) from None
            except OSError as e:
                raise ExecError(f"open namespace {path}: {e.strerror}", 125) from None
        cgroup = Cgroup(plan.cgroups_path)
        status_r, status_w = os.pipe()
        try:
            mid = os.fork()
        except OSError as e:
            os.close(status_r)
            os.close(status_w)
            raise ExecError(f"fork: {e.strerror}", 125) from None
        if mid == 0:  # pragma: no cover - child
            try:
                os.close(status_r)
                _exec_intermediate(plan, cgroup, ns_fds, stdio, status_w)
            finally:
                os._exit(125)
    finally:
        for _, fd in ns_fds:
            os.close(fd)
    os.close(status_w)
    created = _Created(0, str(bundle), -1, status_r)
    proc_pid = 0
    error: dict[str, Any] | None = None
    try:
        while True:
            msg = _read_msg(created)
            if msg is None:  # exec'd (close-on-exec), or died
                if not proc_pid:
                    error = {"error": "exec: the process exited during setup", "code": 125}
                break
            if "pid" in msg:
                proc_pid = int(msg["pid"])
            elif "error" in msg:
                error = msg
                break
    except (OSError, ValueError) as e:
        error = {"error": f"exec: reading the process's status: {e}", "code": 125}
    finally:
        _waitpid(mid)
        os.close(status_r)
    if error is not None:
        if proc_pid:
            try:
                os.kill(proc_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _waitpid(proc_pid)
        raise ExecError(str(error.get("error")), int(error.get("code", 125)))
    return proc_pid


def _exec_intermediate(
    plan: _Plan, cgroup: Cgroup, ns_fds: list[tuple[int, int]], stdio: Stdio, status_w: int
) -> NoReturn:  # pragma: no cover - child
    step = "join the container's cgroup"
    try:
        _reset_signals()
        cgroup.add(os.getpid())
        for flag, fd in ns_fds:
            step = f"join namespace {flag:#x}"
            linux.setns(fd, flag)
            os.close(fd)
        step = "fork the process"
        pid = os.fork()
        if pid == 0:
            _exec_process(plan, stdio, status_w)
        _send(status_w, {"pid": pid})
        os._exit(0)
    except BaseException as e:
        try:
            _send(status_w, {"error": f"exec: {step}: {_reason(e)}", "code": 125})
        finally:
            os._exit(125)


def _exec_process(plan: _Plan, stdio: Stdio, status_w: int) -> NoReturn:  # pragma: no cover
    init = _Init(plan, stdio)
    init.rootfs = "/"  # joining the mount namespace made the container's root ours
    code = 125
    try:
        os.setsid()
        init.setup_stdio()
        _setup_terminal(init)
        init.process_attrs()
        path, env = init.resolve()
        _exec_program(init, plan, path, env)
    except BaseException as e:
        code = _report_failure(init, status_w, e)
    os._exit(code)


def _exec_program(init: _Init, plan: _Plan, path: str, env: dict[str, str]) -> NoReturn:
    """The last steps of the container's init and of an exec: no_new_privs, execve.
    Exec errors get Docker's exit codes (127 not found, 126 not executable)."""
    if plan.no_new_privs:
        init.step = "set no_new_privs"
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    init.step = "exec"
    try:
        os.execve(path, plan.args, env)
    except OSError as e:
        code = 127 if e.errno == errno.ENOENT else 126 if e.errno in _EXEC_126 else 125
        raise _StepError(f'exec: "{plan.args[0]}": {e.strerror}', code) from None


def _report_failure(init: _Init, status_w: int, e: BaseException) -> int:
    """Tell the monitor which step failed and why; the exit code to use."""
    if isinstance(e, _StepError):
        _try_send(status_w, {"error": e.message, "code": e.code})
        return e.code
    _try_send(status_w, {"error": f"{init.step}: {_reason(e)}", "code": 125})
    return 125
