"""Control groups, v1 and v2: create a container's cgroup, apply OCI ``linux.resources``,
put processes in it, read what the kernel recorded (OOM kills, usage), remove it.

Shared by the execution backends that run without runc (exec_native) and by stats.
Three host layouts are handled:

- **v1** (legacy): one hierarchy per controller set under ``/sys/fs/cgroup/<ctrl>``
  (``cpu,cpuacct`` may share one); named hierarchies (``name=systemd``) are joined too.
- **hybrid**: v1 controllers plus an (often controller-less) cgroup2 at
  ``/sys/fs/cgroup/unified``; the process is placed there as well, as runc does.
- **v2** (unified): ``/sys/fs/cgroup`` is cgroup2; controllers are enabled down the
  tree through ``cgroup.subtree_control``.

An absolute ``cgroupsPath`` is taken from each hierarchy's root; a relative one from the
calling process's own cgroup in that hierarchy (runc's cgroupfs behaviour). Kept free of
heavy imports: it runs in the per-container monitor.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Any

CGROUP_ROOT = "/sys/fs/cgroup"
UNIFIED = "unified"  # key of the cgroup2 hierarchy in :attr:`Cgroup.dirs`

# v1 controllers the kernel may offer; anything else in a cgroup mount's super options
# (rw, xattr, clone_children...) is not a controller.
_V1_CONTROLLERS = {
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
}

# Device rules every container gets (runc's AllowedDevices): mknod anything, use the
# standard character devices, ptys and /dev/net/tun.
DEFAULT_DEVICE_RULES: list[dict[str, Any]] = [
    {"allow": True, "type": "c", "major": None, "minor": None, "access": "m"},
    {"allow": True, "type": "b", "major": None, "minor": None, "access": "m"},
    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},  # null
    {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"},  # zero
    {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rwm"},  # full
    {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"},  # random
    {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"},  # urandom
    {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},  # tty
    {"allow": True, "type": "c", "major": 5, "minor": 1, "access": "rwm"},  # console
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},  # ptmx
    {"allow": True, "type": "c", "major": 136, "minor": None, "access": "rwm"},  # pts
    {"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rwm"},  # tun
]


class Hierarchies:
    """The cgroup hierarchies mounted on this host, read from ``/proc/self/mountinfo``.

    ``v1`` maps a hierarchy key (``"memory"``, ``"cpu,cpuacct"``, ``"name=systemd"``) to
    its mount point and ``controllers`` maps each v1 controller to its key; ``unified``
    is the cgroup2 mount point, if any. ``mode`` is ``"v1"``, ``"hybrid"`` or ``"v2"``.
    """

    def __init__(
        self, v1: dict[str, str], controllers: dict[str, str], unified: str | None
    ) -> None:
        self.v1 = v1
        self.controllers = controllers
        self.unified = unified
        if not v1:
            self.mode = "v2"
        elif unified:
            self.mode = "hybrid"
        else:
            self.mode = "v1"

    @classmethod
    def read(cls, mountinfo: str = "/proc/self/mountinfo") -> Hierarchies:
        v1: dict[str, str] = {}
        controllers: dict[str, str] = {}
        unified: str | None = None
        with open(mountinfo) as f:
            lines = f.read().splitlines()
        for line in lines:
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            fields = left.split()
            rfields = right.split()
            if len(fields) < 5 or len(rfields) < 3:
                continue
            fstype, root, mountpoint = rfields[0], fields[3], _unescape(fields[4])
            if root != "/":  # a bind of a sub-cgroup (we are nested): not a hierarchy root
                continue
            if fstype == "cgroup2":
                if unified is None or mountpoint == CGROUP_ROOT:
                    unified = mountpoint
            elif fstype == "cgroup":
                opts = rfields[2].split(",")
                names = [o for o in opts if o in _V1_CONTROLLERS or o.startswith("name=")]
                if not names:
                    continue
                key = ",".join(names)
                if key in v1:
                    continue
                v1[key] = mountpoint
                for n in names:
                    controllers.setdefault(n, key)
        return cls(v1, controllers, unified)


_hierarchies: Hierarchies | None = None


def hierarchies() -> Hierarchies:
    """The host's hierarchies (read once per process)."""
    global _hierarchies
    if _hierarchies is None:
        _hierarchies = Hierarchies.read()
    return _hierarchies


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal
    if "\\" not in path:
        return path
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 4 <= len(path) and path[i + 1 : i + 4].isdigit():
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def _self_cgroups() -> dict[str, str]:
    """This process's cgroup per hierarchy key (``""`` is the cgroup2 entry)."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f.read().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3:
                out[parts[1]] = parts[2]
    return out


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)  # O_TRUNC: as runc
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _read_int(path: str) -> int | None:
    try:
        raw = _read(path).strip()
    except OSError:
        return None
    if raw == "max":
        return -1
    try:
        return int(raw)
    except ValueError:
        return None


def _flat_keyed(path: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, memory.events, cpu.stat...)."""
    out: dict[str, int] = {}
    try:
        text = _read(path)
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def shares_to_weight(shares: int) -> int:
    """cgroup v1 ``cpu.shares`` (2..262144) to v2 ``cpu.weight`` (1..10000), as runc."""
    if shares <= 0:
        return 100
    return 1 + ((max(2, min(shares, 262144)) - 2) * 9999) // 262142


class Cgroup:
    """One container's cgroup across every hierarchy of the host.

    ``dirs`` maps hierarchy keys (v1 keys, or :data:`UNIFIED`) to the cgroup's
    directory. Nothing touches the filesystem until :meth:`create`.
    """

    def __init__(self, path: str, hier: Hierarchies | None = None) -> None:
        if not path:
            raise ValueError("empty cgroup path")
        self.path = path
        self.hier = hier or hierarchies()
        self.version = 2 if self.hier.mode == "v2" else 1
        own = _self_cgroups() if not path.startswith("/") else {}
        self.dirs: dict[str, str] = {}
        for key, mnt in self.hier.v1.items():
            self.dirs[key] = self._join(mnt, own.get(key, "/"), path)
        if self.hier.unified:
            self.dirs[UNIFIED] = self._join(self.hier.unified, own.get("", "/"), path)

    @staticmethod
    def _join(mountpoint: str, own: str, path: str) -> str:
        rel = path if path.startswith("/") else os.path.join(own, path)
        rel = os.path.normpath("/" + rel).lstrip("/")
        if not rel or rel.startswith(".."):
            raise ValueError(f"invalid cgroup path {path!r}")
        return os.path.join(mountpoint, rel)

    # --- locating --------------------------------------------------------------------

    def dir_for(self, controller: str) -> str | None:
        """The directory holding ``controller``'s files (v1) or the unified dir (v2)."""
        if self.version == 2:
            return self.dirs.get(UNIFIED)
        key = self.hier.controllers.get(controller)
        return self.dirs.get(key) if key else None

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self.dirs.values())

    # --- lifecycle -------------------------------------------------------------------

    def create(self, resources: dict[str, Any] | None = None) -> None:
        """Make the cgroup in every hierarchy and apply ``resources`` (OCI
        ``linux.resources``). On failure, removes what it made and re-raises."""
        try:
            for key, d in self.dirs.items():
                self._mkdir(key, d)
            self.apply(resources or {})
        except BaseException:
            self.destroy(kill=False)
            raise

    def _mkdir(self, key: str, d: str) -> None:
        mnt = self.hier.unified if key == UNIFIED else self.hier.v1[key]
        assert mnt is not None
        parts = os.path.relpath(d, mnt).split("/")
        cur = mnt
        v2 = key == UNIFIED and self.version == 2
        for part in parts:
            parent, cur = cur, os.path.join(cur, part)
            if v2:
                self._enable_controllers(parent)
            try:
                os.mkdir(cur, 0o755)
            except FileExistsError:
                continue
            if "cpuset" in key.split(","):
                self._init_cpuset(parent, cur)

    @staticmethod
    def _init_cpuset(parent: str, d: str) -> None:
        # A v1 cpuset cgroup starts with empty cpus/mems: nothing can join it until they
        # are copied from the parent.
        for name in ("cpuset.cpus", "cpuset.mems"):
            try:
                if not _read(os.path.join(d, name)).strip():
                    _write(os.path.join(d, name), _read(os.path.join(parent, name)).strip())
            except OSError:
                pass

    @staticmethod
    def _enable_controllers(d: str) -> None:
        try:
            available = _read(os.path.join(d, "cgroup.controllers")).split()
            enabled = set(_read(os.path.join(d, "cgroup.subtree_control")).split())
        except OSError:
            return
        wanted = [c for c in ("cpuset", "cpu", "io", "memory", "pids", "hugetlb") if c in available]
        missing = [c for c in wanted if c not in enabled]
        if missing:
            try:
                _write(
                    os.path.join(d, "cgroup.subtree_control"), " ".join("+" + c for c in missing)
                )
            except OSError:
                for c in missing:  # one at a time: enable what can be enabled
                    try:
                        _write(os.path.join(d, "cgroup.subtree_control"), "+" + c)
                    except OSError:
                        pass

    def add(self, pid: int) -> None:
        """Move process ``pid`` (``0``: the caller) into the cgroup everywhere."""
        for d in self.dirs.values():
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        """Processes in the cgroup (empty if it does not exist)."""
        order = [self.dir_for("pids"), self.dir_for("freezer"), self.dir_for("memory")]
        order += list(self.dirs.values())
        seen: set[int] = set()
        for d in order:
            if not d:
                continue
            try:
                text = _read(os.path.join(d, "cgroup.procs"))
            except OSError:
                continue
            seen.update(int(x) for x in text.split())
            break
        return sorted(seen)

    def kill_all(self, sig: int = signal.SIGKILL, timeout: float = 2.0) -> None:
        """Signal every process in the cgroup until none is left (or ``timeout``)."""
        unified = self.dirs.get(UNIFIED)
        if self.version == 2 and unified and sig == signal.SIGKILL:
            try:
                _write(os.path.join(unified, "cgroup.kill"), "1")
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while True:
            procs = self.pids()
            if not procs:
                return
            for p in procs:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)

    def destroy(self, kill: bool = True) -> None:
        """Remove the cgroup (sub-cgroups first) from every hierarchy, after killing
        leftover processes if ``kill``. Retries briefly while the kernel reports busy."""
        if kill:
            self.kill_all()
        errors: list[OSError] = []
        for d in self.dirs.values():
            try:
                _rmtree_cgroup(d)
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    # --- resources -------------------------------------------------------------------

    def apply(self, res: dict[str, Any]) -> None:
        """Apply OCI ``linux.resources``. Raises ``OSError`` naming the file that failed."""
        if self.version == 2:
            self._apply_v2(res)
        else:
            self._apply_v1(res)

    def _set(self, controller: str, name: str, value: object) -> None:
        d = self.dir_for(controller)
        if d is None:
            raise OSError(errno.ENOTSUP, f"cgroup controller {controller!r} is not available")
        path = os.path.join(d, name)
        try:
            _write(path, str(value))
        except OSError as e:
            raise OSError(e.errno, f"write {value!r} to {path}: {os.strerror(e.errno or 0)}") from e

    def _has(self, controller: str, name: str) -> bool:
        d = self.dir_for(controller)
        return d is not None and os.path.exists(os.path.join(d, name))

    def _apply_v1(self, res: dict[str, Any]) -> None:
        mem = res.get("memory") or {}
        limit, swap = mem.get("limit"), mem.get("swap")
        if limit is not None or swap is not None:
            self._memory_v1(limit, swap)
        if mem.get("reservation") is not None:
            self._set("memory", "memory.soft_limit_in_bytes", mem["reservation"])
        if mem.get("swappiness") is not None and 0 <= mem["swappiness"] <= 100:
            self._set("memory", "memory.swappiness", mem["swappiness"])
        if mem.get("disableOOMKiller"):
            self._set("memory", "memory.oom_control", 1)
        cpu = res.get("cpu") or {}
        if cpu.get("shares"):
            self._set("cpu", "cpu.shares", cpu["shares"])
        if cpu.get("period"):
            self._set("cpu", "cpu.cfs_period_us", cpu["period"])
        if cpu.get("quota"):
            self._set("cpu", "cpu.cfs_quota_us", cpu["quota"])
        if cpu.get("cpus"):
            self._set("cpuset", "cpuset.cpus", cpu["cpus"])
        if cpu.get("mems"):
            self._set("cpuset", "cpuset.mems", cpu["mems"])
        pids = res.get("pids") or {}
        if pids.get("limit") is not None:
            lim = int(pids["limit"])
            self._set("pids", "pids.max", lim if lim > 0 else "max")
        blkio = res.get("blockIO") or {}
        if blkio.get("weight") and self._has("blkio", "blkio.weight"):
            self._set("blkio", "blkio.weight", blkio["weight"])
        if self.dir_for("devices") is not None:
            rules = res.get("devices")
            if rules is None:  # nothing said: deny all but the defaults
                rules = [{"allow": False, "access": "rwm"}, *DEFAULT_DEVICE_RULES]
            for rule in rules:
                self._set(
                    "devices",
                    "devices.allow" if rule.get("allow") else "devices.deny",
                    _device_rule(rule),
                )

    def _memory_v1(self, limit: int | None, swap: int | None) -> None:
        has_swap = self._has("memory", "memory.memsw.limit_in_bytes")
        if swap is None or not has_swap:
            if limit is not None:
                self._set("memory", "memory.limit_in_bytes", limit)
            return
        # memsw must stay >= limit: write them in the order that keeps that true.
        current = _read_int(os.path.join(self.dir_for("memory") or "", "memory.limit_in_bytes"))
        if (
            limit is not None
            and swap != -1
            and current is not None
            and current != -1
            and (swap >= current)
        ):
            self._set("memory", "memory.memsw.limit_in_bytes", swap)
            self._set("memory", "memory.limit_in_bytes", limit)
        else:
            if limit is not None:
                self._set("memory", "memory.limit_in_bytes", limit)
            self._set("memory", "memory.memsw.limit_in_bytes", swap)

    def _apply_v2(self, res: dict[str, Any]) -> None:
        mem = res.get("memory") or {}
        limit, swap = mem.get("limit"), mem.get("swap")
        if limit is not None:
            self._set("memory", "memory.max", limit if limit > 0 else "max")
        if swap is not None and self._has("memory", "memory.swap.max"):
            if swap == -1:
                self._set("memory", "memory.swap.max", "max")
            elif limit is not None and limit > 0 and swap >= limit:
                self._set("memory", "memory.swap.max", swap - limit)
        if mem.get("reservation") is not None:
            self._set("memory", "memory.low", mem["reservation"])
        if mem.get("disableOOMKiller"):
            pass  # no v2 equivalent
        cpu = res.get("cpu") or {}
        if cpu.get("shares"):
            self._set("cpu", "cpu.weight", shares_to_weight(int(cpu["shares"])))
        if cpu.get("quota") or cpu.get("period"):
            quota = cpu.get("quota") or 0
            period = cpu.get("period") or 100000
            self._set("cpu", "cpu.max", f"{quota if quota > 0 else 'max'} {period}")
        if cpu.get("cpus"):
            self._set("cpuset", "cpuset.cpus", cpu["cpus"])
        if cpu.get("mems"):
            self._set("cpuset", "cpuset.mems", cpu["mems"])
        pids = res.get("pids") or {}
        if pids.get("limit") is not None:
            lim = int(pids["limit"])
            self._set("pids", "pids.max", lim if lim > 0 else "max")
        blkio = res.get("blockIO") or {}
        if blkio.get("weight") and self._has("io", "io.weight"):
            # v1 blkio weight 10..1000 -> v2 io.weight 1..10000
            w = int(blkio["weight"])
            self._set("io", "io.weight", f"default {1 + (w - 10) * 9999 // 990}")
        # Device rules in v2 are an eBPF program: not done here (see module docs).

    # --- observing -------------------------------------------------------------------

    def oom_killed(self) -> bool:
        """Whether the OOM killer killed a process of this cgroup."""
        d = self.dir_for("memory")
        if d is None:
            return False
        if self.version == 2:
            return _flat_keyed(os.path.join(d, "memory.events")).get("oom_kill", 0) > 0
        ctl = _flat_keyed(os.path.join(d, "memory.oom_control"))
        if "oom_kill" in ctl:
            return ctl["oom_kill"] > 0
        # old kernels: a failcnt with the limit reached is the best hint there is
        return (_read_int(os.path.join(d, "memory.failcnt")) or 0) > 0 and ctl.get(
            "under_oom", 0
        ) > 0

    def stats(self) -> dict[str, Any]:
        """A few numbers for ``docker stats``: memory usage/limit, pids, cpu usage (ns)."""
        out: dict[str, Any] = {}
        mem = self.dir_for("memory")
        cpu = self.dir_for("cpuacct") if self.version == 1 else self.dir_for("cpu")
        pids = self.dir_for("pids")
        if mem:
            if self.version == 2:
                out["memory_usage"] = _read_int(os.path.join(mem, "memory.current"))
                out["memory_limit"] = _read_int(os.path.join(mem, "memory.max"))
                out["memory_stat"] = _flat_keyed(os.path.join(mem, "memory.stat"))
            else:
                out["memory_usage"] = _read_int(os.path.join(mem, "memory.usage_in_bytes"))
                out["memory_max_usage"] = _read_int(os.path.join(mem, "memory.max_usage_in_bytes"))
                out["memory_limit"] = _read_int(os.path.join(mem, "memory.limit_in_bytes"))
                out["memory_stat"] = _flat_keyed(os.path.join(mem, "memory.stat"))
        if pids:
            out["pids_current"] = _read_int(os.path.join(pids, "pids.current"))
            out["pids_limit"] = _read_int(os.path.join(pids, "pids.max"))
        if cpu:
            if self.version == 2:
                usec = _flat_keyed(os.path.join(cpu, "cpu.stat")).get("usage_usec")
                out["cpu_usage_ns"] = usec * 1000 if usec is not None else None
            else:
                out["cpu_usage_ns"] = _read_int(os.path.join(cpu, "cpuacct.usage"))
        return out

    # --- freezing (pause/unpause) ----------------------------------------------------

    def freeze(self, frozen: bool = True, timeout: float = 5.0) -> None:
        """Freeze (``docker pause``) or thaw the cgroup's processes."""
        d = self.dir_for("freezer")
        if d is None:
            raise OSError(errno.ENOTSUP, "freezer is not available")
        if self.version == 2:
            self._set("freezer", "cgroup.freeze", 1 if frozen else 0)
            return
        want = "FROZEN" if frozen else "THAWED"
        deadline = time.monotonic() + timeout
        while True:
            self._set("freezer", "freezer.state", want)
            if _read(os.path.join(d, "freezer.state")).strip() == want:
                return
            if time.monotonic() > deadline:
                raise OSError(errno.EBUSY, f"cgroup did not become {want}")
            time.sleep(0.001)


def _device_rule(rule: dict[str, Any]) -> str:
    """OCI device cgroup rule -> v1 ``devices.allow`` line (``c 1:3 rwm``)."""
    typ = rule.get("type") or "a"
    if typ == "a":
        return "a"

    def num(v: object) -> str:
        return "*" if v is None or v == -1 else str(v)

    return f"{typ} {num(rule.get('major'))}:{num(rule.get('minor'))} {rule.get('access') or 'rwm'}"


def _rmtree_cgroup(d: str, timeout: float = 1.0) -> None:
    """rmdir ``d`` and any sub-cgroups (deepest first), retrying on EBUSY briefly."""
    if not os.path.isdir(d):
        return
    subdirs: list[str] = []
    for root, dirnames, _files in os.walk(d):
        subdirs.extend(os.path.join(root, n) for n in dirnames)
    for sub in [*sorted(subdirs, key=len, reverse=True), d]:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                os.rmdir(sub)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
