"""Container lifecycle beyond create/start/stop: pause and unpause (the freezer),
live resource updates, stats from the cgroup counters, ``top``, rename, and restart
policies with Docker's back-off.

Restart policies (moby ``restartmanager``): after an exit that the policy covers, the
container is started again after a delay that starts at 100 ms and doubles each time
(at most one minute); a run of 10 s or more resets it. ``on-failure[:N]`` restarts on a
non-zero exit code, at most N times; ``always`` and ``unless-stopped`` restart on any
exit. ``docker stop``/``kill`` mark the container as stopped by hand: no restart then,
and at daemon start ``unless-stopped`` ones stay down while ``always`` ones start again.
A daemon stopping its containers (no live-restore) is not a stop by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pallet.cgroups import Cgroup
from pallet.errors import Conflict, InvalidArgument, NotFound
from pallet.logs import now_rfc3339, rfc3339_to_unix

if TYPE_CHECKING:
    from pallet.api import UpdateConfig
    from pallet.containers import Container, Containers

log = logging.getLogger("pallet.lifecycle")

BACKOFF_START = 0.1
BACKOFF_MAX = 60.0
BACKOFF_RESET_AFTER = 10.0  # a run this long resets the delay
MANUAL_STOP = "manually-stopped"  # marker file in the container's data dir
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def system_cpu_usage() -> int:
    """Host CPU time in ns, from /proc/stat (what ``docker stats`` divides by)."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu "):
                    ticks = sum(int(x) for x in line.split()[1:8])
                    return ticks * 1_000_000_000 // _CLK_TCK
    except OSError:
        pass
    return 0


class Lifecycle:
    """Pause, update, stats, top, rename and restart policies for the containers."""

    def __init__(self, containers: Containers) -> None:
        self.containers = containers
        self.shutting_down = False
        self._pending: dict[str, asyncio.Task[Any]] = {}  # container id -> restart task
        self._delay: dict[str, float] = {}

    def cgroup(self, c: Container) -> Cgroup:
        parent = self.containers.daemon.config.cgroup_parent.rstrip("/")
        return Cgroup(f"{parent}/{c.id}")

    # --- pause -------------------------------------------------------------------------

    def _require_running(self, c: Container) -> None:
        if not c.running:
            raise Conflict(f"Container {c.id} is not running")

    async def pause(self, c: Container) -> None:
        async with c.lock:
            self._require_running(c)
            if c.state.get("Paused"):
                raise Conflict(f"Container {c.id} is already paused")
            try:
                await asyncio.to_thread(self.cgroup(c).freeze, True)
            except OSError as e:
                raise Conflict(f"Cannot pause container {c.id}: {e.strerror or e}") from None
            c.state.update(Paused=True, Status="paused")
            self.containers.save(c)
            self.containers.event("pause", c)

    async def unpause(self, c: Container) -> None:
        async with c.lock:
            if not c.state.get("Paused"):
                raise Conflict(f"Container {c.id} is not paused")
            await self._thaw(c)
            self.containers.event("unpause", c)

    async def _thaw(self, c: Container) -> None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.cgroup(c).freeze, False)
        c.state.update(Paused=False, Status="running" if c.running else c.state["Status"])
        self.containers.save(c)

    async def signalled(self, c: Container, sig: int) -> None:
        """After a signal was sent: a frozen container must thaw to act on it (Docker
        resumes a paused container it kills or stops)."""
        if c.state.get("Paused"):
            await self._thaw(c)

    # --- update ------------------------------------------------------------------------

    async def update(self, c: Container, upd: UpdateConfig) -> dict[str, Any]:
        """``docker update``: changed fields into HostConfig, and into the cgroup now if
        the container runs."""
        from pallet.api import check_restart_policy
        from pallet.spec import resources_for

        hc = c.host_config
        changes = upd.model_dump(exclude_unset=True, exclude_none=True)
        changes.pop("RestartPolicy", None)
        changes = {k: v for k, v in changes.items() if v not in (0, "", None, [])}
        new = {**hc, **changes}
        if "Memory" in changes and "MemorySwap" not in changes:
            old_mem, old_swap = int(hc.get("Memory") or 0), int(hc.get("MemorySwap") or 0)
            if old_swap > 0 and changes["Memory"] > old_swap and old_swap != 2 * old_mem:
                raise InvalidArgument(
                    "Memory limit should be smaller than already set memoryswap limit, update "
                    "the memoryswap at the same time"
                )
            if old_swap in (0, 2 * old_mem):
                new["MemorySwap"] = 2 * changes["Memory"]  # Docker's default: twice
        if upd.RestartPolicy is not None and upd.RestartPolicy.Name:  # "": leave it
            check_restart_policy(upd.RestartPolicy, bool(hc.get("AutoRemove")))
            new["RestartPolicy"] = {
                "Name": upd.RestartPolicy.Name or "no",
                "MaximumRetryCount": upd.RestartPolicy.MaximumRetryCount,
            }
        from pallet.api import ResourcesSpec

        ResourcesSpec.model_validate(new).check_resources()
        if c.running and changes:
            res = resources_for(new).model_dump(exclude_none=True)
            res["devices"] = []  # device rules are not updated
            if (
                "Memory" in changes
                and "MemorySwap" not in changes
                and new.get("MemorySwap") != 2 * changes["Memory"]
            ):
                res.get("memory", {}).pop("swap", None)  # an explicit swap limit stays
            try:
                await asyncio.to_thread(self.cgroup(c).apply, res)
            except OSError as e:
                raise InvalidArgument(
                    f"Cannot update container {c.id}: {e.strerror or e}"
                ) from None
        hc.clear()
        hc.update(new)
        self.containers.save(c)
        self.containers.event("update", c)
        return {"Warnings": []}

    # --- stats -------------------------------------------------------------------------

    def sample(self, c: Container) -> dict[str, Any]:
        """One stats object in Docker's shape (cgroup v1 and v2 counters)."""
        cg = self.cgroup(c)
        raw = cg.stats() if c.running else {}
        host_mem = _host_memory()
        limit = raw.get("memory_limit")
        if limit is None or limit < 0 or (host_mem and limit > host_mem):
            limit = host_mem
        stat = raw.get("memory_stat") or {}
        usage = raw.get("memory_usage") or 0
        memory: dict[str, Any] = {}
        if c.running:
            memory = {"usage": usage, "stats": stat, "limit": limit}
            if raw.get("memory_max_usage") is not None:
                memory["max_usage"] = raw["memory_max_usage"]
            if cg.version == 1 and "failcnt" not in memory:
                memory["failcnt"] = 0
        cpu = self._cpu(cg) if c.running else {}
        pids: dict[str, Any] = {}
        if c.running:
            pids = {"current": raw.get("pids_current") or 0}
            if raw.get("pids_limit") not in (None, -1):
                pids["limit"] = raw["pids_limit"]
        out: dict[str, Any] = {
            "read": now_rfc3339() if c.running else "0001-01-01T00:00:00Z",
            "preread": "0001-01-01T00:00:00Z",
            "pids_stats": pids,
            "blkio_stats": {
                "io_service_bytes_recursive": None,
                "io_serviced_recursive": None,
                "io_queue_recursive": None,
                "io_service_time_recursive": None,
                "io_wait_time_recursive": None,
                "io_merged_recursive": None,
                "io_time_recursive": None,
                "sectors_recursive": None,
            },
            "num_procs": 0,
            "storage_stats": {},
            "cpu_stats": cpu,
            "precpu_stats": {
                "cpu_usage": {"total_usage": 0, "usage_in_kernelmode": 0, "usage_in_usermode": 0},
                "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0},
            },
            "memory_stats": memory,
            "name": "/" + c.name,
            "id": c.id,
        }
        if c.running:
            io = _blkio(cg)
            if io is not None:
                out["blkio_stats"]["io_service_bytes_recursive"] = io
            nets = _networks(int(c.state.get("Pid") or 0))
            if nets:
                out["networks"] = nets
        return out

    def _cpu(self, cg: Cgroup) -> dict[str, Any]:
        from pallet import cgroups

        total = kernel = user = 0
        throttling = {"periods": 0, "throttled_periods": 0, "throttled_time": 0}
        percpu: list[int] | None = None
        d = cg.dir_for("cpu")
        if cg.version == 2 and d:
            st = cgroups._flat_keyed(os.path.join(d, "cpu.stat"))
            total = st.get("usage_usec", 0) * 1000
            user = st.get("user_usec", 0) * 1000
            kernel = st.get("system_usec", 0) * 1000
            throttling = {
                "periods": st.get("nr_periods", 0),
                "throttled_periods": st.get("nr_throttled", 0),
                "throttled_time": st.get("throttled_usec", 0) * 1000,
            }
        else:
            acct = cg.dir_for("cpuacct")
            if acct:
                total = cgroups._read_int(os.path.join(acct, "cpuacct.usage")) or 0
                st = cgroups._flat_keyed(os.path.join(acct, "cpuacct.stat"))
                tick = 1_000_000_000 // _CLK_TCK
                user, kernel = st.get("user", 0) * tick, st.get("system", 0) * tick
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(acct, "cpuacct.usage_percpu")) as f:
                        percpu = [int(x) for x in f.read().split()]
            if d:
                st = cgroups._flat_keyed(os.path.join(d, "cpu.stat"))
                throttling = {
                    "periods": st.get("nr_periods", 0),
                    "throttled_periods": st.get("nr_throttled", 0),
                    "throttled_time": st.get("throttled_time", 0),
                }
        usage: dict[str, Any] = {
            "total_usage": total,
            "usage_in_kernelmode": kernel,
            "usage_in_usermode": user,
        }
        if percpu is not None:
            usage["percpu_usage"] = percpu
        return {
            "cpu_usage": usage,
            "system_cpu_usage": system_cpu_usage(),
            "online_cpus": os.cpu_count() or 1,
            "throttling_data": throttling,
        }

    async def stats(self, c: Container, emit: Any, stream: bool, one_shot: bool) -> None:
        """Send stats objects through ``emit`` (awaitable): one (after a second, so
        that ``precpu_stats`` is filled, unless ``one_shot``), or one a second."""
        prev = await asyncio.to_thread(self.sample, c)
        if not stream:
            if one_shot or not c.running:
                await emit(prev)
                return
            await asyncio.sleep(1.0)
            cur = await asyncio.to_thread(self.sample, c)
            cur.update(preread=prev["read"], precpu_stats=prev["cpu_stats"] or cur["precpu_stats"])
            await emit(cur)
            return
        await emit(prev)
        while c.running and not c.removed:
            await asyncio.sleep(1.0)
            cur = await asyncio.to_thread(self.sample, c)
            cur.update(preread=prev["read"], precpu_stats=prev["cpu_stats"] or cur["precpu_stats"])
            await emit(cur)
            prev = cur

    # --- top ---------------------------------------------------------------------------

    async def top(self, c: Container, ps_args: str) -> dict[str, Any]:
        """``ps`` on the host, rows of the container's processes only (Docker's way)."""
        import shlex

        self._require_running(c)
        pids = set(await asyncio.to_thread(self.cgroup(c).pids))
        args = shlex.split(ps_args or "-ef")
        proc = await asyncio.create_subprocess_exec(
            "ps",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise InvalidArgument(
                f"ps: {err.decode(errors='replace').strip() or 'exit ' + str(proc.returncode)}"
            )
        lines = out.decode(errors="replace").splitlines()
        if not lines:
            return {"Titles": [], "Processes": []}
        titles = lines[0].split()
        if "PID" not in titles:
            raise InvalidArgument(f"Couldn't find PID field in ps output: {lines[0]}")
        pid_col = titles.index("PID")
        rows = []
        for line in lines[1:]:
            fields = line.split(None, len(titles) - 1)
            if len(fields) <= pid_col:
                continue
            try:
                pid = int(fields[pid_col])
            except ValueError:
                continue
            if pid in pids:
                rows.append(fields)
        return {"Titles": titles, "Processes": rows}

    # --- rename ------------------------------------------------------------------------

    async def rename(self, c: Container, new: str) -> None:
        from pallet.containers import NAME_RE

        if not new:
            raise InvalidArgument("Neither old nor new names may be empty")
        if not NAME_RE.match(new):
            raise InvalidArgument(
                f"Invalid container name ({new}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
            )
        new = new.lstrip("/")
        old = c.name
        if new == old:
            raise InvalidArgument("Renaming a container with the same name as its current name")
        names = self.containers.names
        if new in names:
            raise Conflict(
                f'Conflict. The container name "/{new}" is already in use by container '
                f'"{names[new]}". You have to remove (or rename) that container to be able to '
                "reuse that name."
            )
        names[new] = c.id
        c.doc["Name"] = "/" + new
        try:
            self.containers.save(c)
        except BaseException:
            c.doc["Name"] = "/" + old
            del names[new]
            raise
        if names.get(old) == c.id:
            del names[old]
        self.containers.event("rename", c, oldName="/" + old)

    # --- restart policies --------------------------------------------------------------

    def _marker(self, c: Container) -> Path:
        return self.containers.data_dir(c.id) / MANUAL_STOP

    def manually_stopped(self, c: Container) -> bool:
        return self._marker(c).exists()

    def stopping(self, c: Container) -> None:
        """``stop``/``kill`` by a user: no restart (and cancel one that is pending)."""
        if self.shutting_down:
            return
        with contextlib.suppress(OSError):
            self._marker(c).touch()
        self.cancel(c)

    def starting(self, c: Container) -> None:
        """A start by a user: the policy applies again."""
        with contextlib.suppress(FileNotFoundError):
            self._marker(c).unlink()
        self._delay.pop(c.id, None)
        self.cancel(c, keep_state=True)

    def cancel(self, c: Container, keep_state: bool = False) -> None:
        task = self._pending.pop(c.id, None)
        if task is not None:
            task.cancel()
        if not keep_state and c.state.get("Restarting"):
            c.state.update(Restarting=False, Status="exited")
            if not c.removed:
                self.containers.save(c)

    def _should_restart(self, c: Container, at_daemon_start: bool = False) -> bool:
        policy = c.host_config.get("RestartPolicy") or {}
        name = policy.get("Name") or "no"
        if name == "no" or c.removed or c.removing or c.host_config.get("AutoRemove"):
            return False
        if name == "always":
            return at_daemon_start or not self.manually_stopped(c)
        if self.manually_stopped(c):
            return False
        if name == "unless-stopped":
            return True
        if name == "on-failure":
            if c.state.get("ExitCode", 0) == 0:
                return False
            limit = int(policy.get("MaximumRetryCount") or 0)
            return limit == 0 or int(c.doc.get("RestartCount") or 0) < limit
        return False

    def exited(self, c: Container) -> None:
        """Called when a container's process ended: the policy's decision, and a
        restart after the back-off if it says so."""
        if c.state.get("Paused"):
            c.state["Paused"] = False
            if not c.removed:
                self.containers.save(c)
        with contextlib.suppress(Exception):  # volumes with mount options: last user gone
            self.containers.daemon.volumes.unmount_unused(c.doc["Mounts"])
        if self.shutting_down or not self._should_restart(c):
            return
        ran = rfc3339_to_unix(c.state["FinishedAt"]) - rfc3339_to_unix(c.state["StartedAt"])
        delay = self._delay.get(c.id, 0.0)
        delay = BACKOFF_START if ran >= BACKOFF_RESET_AFTER or not delay else delay * 2
        delay = min(delay, BACKOFF_MAX)
        self._delay[c.id] = delay
        c.state.update(Restarting=True, Status="restarting")
        self.containers.save(c)
        self._pending[c.id] = asyncio.get_running_loop().create_task(self._restart(c, delay))

    async def _restart(self, c: Container, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            return
        self._pending.pop(c.id, None)
        if c.removed or c.removing or not c.state.get("Restarting"):
            return
        c.doc["RestartCount"] = int(c.doc.get("RestartCount") or 0) + 1
        c.state.update(Restarting=False)
        try:
            async with c.lock:
                if c.running or c.removed:
                    return
                await self.containers._start_locked(c)
            self.containers.event("restart", c)
        except Exception as e:  # the start failed: record it, the policy goes on
            log.warning("restarting container %s failed: %s", c.id[:12], e)
            c.state.update(
                Status="exited",
                Error=getattr(e, "message", str(e)),
                FinishedAt=now_rfc3339(),
                StartedAt=c.state.get("StartedAt") or now_rfc3339(),
            )
            if not c.removed:
                self.containers.save(c)
            if not self.shutting_down and self._should_restart(c):
                self.exited(c)

    async def at_daemon_start(self) -> None:
        """Apply restart policies to containers that are down when the daemon starts
        (Docker's restore: started at once, without back-off)."""
        with contextlib.suppress(Exception):  # volume mounts left by a crash, now unused
            self.containers.daemon.volumes.unmount_unused()
        for c in list(self.containers.by_id.values()):
            if c.running or c.id in self._pending or c.state.get("Status") == "created":
                continue
            if not self._should_restart(c, at_daemon_start=True):
                if c.state.get("Restarting"):
                    c.state.update(Restarting=False, Status="exited")
                    self.containers.save(c)
                continue
            c.state.update(Restarting=True, Status="restarting")
            self._pending[c.id] = asyncio.get_running_loop().create_task(self._restart(c, 0.0))

    def shutdown(self) -> None:
        self.shutting_down = True
        for task in self._pending.values():
            task.cancel()
        self._pending.clear()


def _blkio(cg: Cgroup) -> list[dict[str, Any]] | None:
    """Bytes read and written per device (v1 blkio throttle counters, v2 io.stat)."""
    out: list[dict[str, Any]] = []
    if cg.version == 2:
        d = cg.dir_for("io")
        try:
            text = open(os.path.join(d or "", "io.stat")).read() if d else ""
        except OSError:
            return None
        for line in text.splitlines():
            dev, *fields = line.split()
            major, _, minor = dev.partition(":")
            kv = dict(f.split("=", 1) for f in fields if "=" in f)
            for key, op in (("rbytes", "read"), ("wbytes", "write")):
                if key in kv:
                    out.append(
                        {"major": int(major), "minor": int(minor), "op": op, "value": int(kv[key])}
                    )
        return out
    d = cg.dir_for("blkio")
    if d is None:
        return None
    for name in ("blkio.throttle.io_service_bytes_recursive", "blkio.io_service_bytes_recursive"):
        try:
            text = open(os.path.join(d, name)).read()
        except OSError:
            continue
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and ":" in parts[0]:
                major, _, minor = parts[0].partition(":")
                out.append(
                    {
                        "major": int(major),
                        "minor": int(minor),
                        "op": parts[1],
                        "value": int(parts[2]),
                    }
                )
        return out
    return None


def _networks(pid: int) -> dict[str, dict[str, int]]:
    """Per-interface counters of the container's network namespace (/proc/PID/net/dev)."""
    if pid <= 0:
        return {}
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            lines = f.read().splitlines()[2:]
    except OSError:
        return {}
    keys = ["bytes", "packets", "errors", "dropped"]
    out: dict[str, dict[str, int]] = {}
    for line in lines:
        name, _, rest = line.partition(":")
        name = name.strip()
        if name == "lo":
            continue
        v = [int(x) for x in rest.split()]
        if len(v) < 16:
            continue
        entry = {f"rx_{k}": v[i] for i, k in enumerate(keys)}
        entry.update({f"tx_{k}": v[8 + i] for i, k in enumerate(keys)})
        out[name] = entry
    return out


def find_container_path(c: Container, path: str) -> str:
    """Normalise an archive path (absolute, inside the container)."""
    if not path:
        raise InvalidArgument("Path cannot be empty")
    return os.path.normpath("/" + path.lstrip("/")) if path != "/" else "/"


def not_found(c: Container, path: str) -> NotFound:
    return NotFound(f"Could not find the file {path} in container {c.name}")
