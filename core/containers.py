"""Containers: their records, their lifecycle, and the runtime state the daemon keeps.

A container's record is the document ``docker inspect`` shows, persisted in the
daemon's SQLite store. While it runs, a per-container monitor (:mod:`pallet.shim`)
owns its process, stdio and log; the daemon holds a connection to that monitor, fans
the output out to attached clients and learns the exit status through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal as signals
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pallet.api import ContainerCreate, parse_body
from pallet.errors import Conflict, InvalidArgument, NotFound, NotModified
from pallet.logs import now_rfc3339
from pallet.store import Store

if TYPE_CHECKING:
    from pallet.daemon import Daemon
    from pallet.shim import ShimClient

log = logging.getLogger("pallet.containers")

ZERO_TIME = "0001-01-01T00:00:00Z"
NAME_RE = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
# What Docker's inspect shows for fields the request left out.
HOST_CONFIG_DEFAULTS: dict[str, Any] = {
    "Binds": None,
    "ContainerIDFile": "",
    "LogConfig": {"Type": "json-file", "Config": {}},
    "PortBindings": {},
    "VolumeDriver": "",
    "VolumesFrom": None,
    "CapAdd": None,
    "CapDrop": None,
    "CgroupnsMode": "private",
    "Dns": [],
    "DnsOptions": [],
    "DnsSearch": [],
    "ExtraHosts": None,
    "GroupAdd": None,
    "IpcMode": "private",
    "Links": None,
    "OomScoreAdj": 0,
    "PidMode": "",
    "Privileged": False,
    "PublishAllPorts": False,
    "ReadonlyRootfs": False,
    "SecurityOpt": None,
    "UTSMode": "",
    "UsernsMode": "",
    "ShmSize": 67108864,
    "ConsoleSize": [0, 0],
    "Isolation": "",
    "MaskedPaths": None,
    "ReadonlyPaths": None,
}
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS containers (
        id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, created TEXT NOT NULL,
        image_id TEXT NOT NULL, doc TEXT NOT NULL)""",
]


def parse_signal(value: str | int | None, default: int) -> int:
    """``"SIGTERM"``, ``"TERM"``, ``"15"`` or 15 -> 15; Docker's error otherwise."""
    if value is None or value == "":
        return default
    text = str(value).strip()
    if text.isdigit():
        num = int(text)
        if 0 < num < signals.NSIG:
            return num
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signals.Signals, name, None)
        if sig is not None:
            return int(sig)
    raise InvalidArgument(f"Invalid signal: {value}")


def random_name() -> str:
    """A name in Docker's ``adjective_surname`` style."""
    adjectives = "brave calm eager fervent gifted happy jolly keen loving nifty quirky sharp "
    adjectives += "stoic tender upbeat vibrant wizardly xenodochial youthful zealous"
    people = "turing hopper lovelace curie noether ritchie thompson torvalds knuth dijkstra "
    people += "hamilton babbage shannon lamport liskov goldberg perlman wozniak"
    return f"{secrets.choice(adjectives.split())}_{secrets.choice(people.split())}"


class Container:
    """A container's record (``doc``, the inspect document) and its runtime state."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.shim: ShimClient | None = None
        self.attachers: set[asyncio.Queue[tuple[int, bytes] | None]] = set()
        self.changed = asyncio.Condition()  # notified on start, exit, removal, output
        self.exits = 0  # how many times it exited since the daemon started
        self.removed = False
        self.removing = False
        self.lock = asyncio.Lock()  # serialises start/stop/remove

    @property
    def id(self) -> str:
        return str(self.doc["Id"])

    @property
    def name(self) -> str:
        return str(self.doc["Name"]).lstrip("/")

    @property
    def state(self) -> dict[str, Any]:
        return self.doc["State"]

    @property
    def config(self) -> dict[str, Any]:
        return self.doc["Config"]

    @property
    def host_config(self) -> dict[str, Any]:
        return self.doc["HostConfig"]

    @property
    def running(self) -> bool:
        return bool(self.state["Running"])

    @property
    def tty(self) -> bool:
        return bool(self.config.get("Tty"))

    def on_output(self, stream: int, data: bytes) -> None:
        for q in self.attachers:
            q.put_nowait((stream, data))
        asyncio.get_running_loop().create_task(self.notify())

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class Containers:
    """The container service: records in SQLite, lifecycle through the shim."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.store = Store(daemon.config.data_root / "containers.db", SCHEMA)
        self.by_id: dict[str, Container] = {}
        self.names: dict[str, str] = {}  # name -> id, including names being created
        self.tasks: set[asyncio.Task[Any]] = set()
        for row in self.store.query("SELECT doc FROM containers"):
            c = Container(json.loads(row["doc"]))
            self.by_id[c.id] = c
            self.names[c.name] = c.id

    # --- paths ---------------------------------------------------------------------

    def data_dir(self, cid: str) -> Path:
        return self.daemon.config.data_root / "containers" / cid

    def bundle_dir(self, cid: str) -> Path:
        return self.daemon.config.exec_root / "containers" / cid

    # --- lookup ----------------------------------------------------------------------

    def get(self, ref: str) -> Container:
        """By full ID, name (with or without ``/``) or unique ID prefix, as Docker."""
        if ref in self.by_id:
            return self.by_id[ref]
        cid = self.names.get(ref.lstrip("/"))
        if cid is not None and cid in self.by_id:
            return self.by_id[cid]
        if ref and re.fullmatch(r"[0-9a-f]+", ref):
            matches = [c for i, c in self.by_id.items() if i.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise InvalidArgument(f"multiple IDs found with provided prefix: {ref}")
        raise NotFound(f"No such container: {ref}")

    def users_of_image(self, image_id: str) -> list[tuple[str, bool]]:
        return [(c.id, c.running) for c in self.by_id.values() if c.doc["Image"] == image_id]

    def save(self, c: Container) -> None:
        with self.store.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO containers (id, name, created, image_id, doc)"
                " VALUES (?,?,?,?,?)",
                (c.id, c.name, c.doc["Created"], c.doc["Image"], json.dumps(c.doc)),
            )

    def event(self, action: str, c: Container, **attrs: Any) -> None:
        attributes = {"name": c.name, "image": c.config.get("Image", ""), **attrs}
        self.daemon.plugins.hook.pallet_container_event(
            action=action, container_id=c.id, attributes=attributes
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- create ------------------------------------------------------------------

    async def create(self, body: Any, name: str | None) -> Container:
        cfg: ContainerCreate = parse_body(ContainerCreate, body, "container config")
        if not cfg.Image:
            raise InvalidArgument("no image specified in the container config (Image)")
        hc = cfg.HostConfig
        runtime = hc.Runtime or self.daemon.config.default_runtime
        if runtime not in self.daemon.exec_backends:
            raise InvalidArgument(f"unknown or invalid runtime name: {runtime}")
        if name:
            if not NAME_RE.match(name):
                raise InvalidArgument(
                    f"Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
                )
            name = name.lstrip("/")
        graph = self.daemon.graph
        image_id = graph.resolve(cfg.Image)
        image = graph.image_config(image_id).get("config") or {}
        if cfg.Entrypoint is not None:
            entrypoint = [a for a in cfg.Entrypoint if a != ""] if cfg.Entrypoint != [""] else []
            cmd = cfg.Cmd or []
        else:
            entrypoint = image.get("Entrypoint") or []
            cmd = cfg.Cmd if cfg.Cmd else (image.get("Cmd") or [])
        args = [*entrypoint, *cmd]
        if not args:
            raise InvalidArgument("No command specified")

        cid = secrets.token_hex(32)
        if name is None:
            name = random_name()
            while name in self.names:
                name = random_name() + str(secrets.randbelow(100))
        if name in self.names:
            raise Conflict(
                f'Conflict. The container name "/{name}" is already in use by container '
                f'"{self.names[name]}". You have to remove (or rename) that container to be '
                "able to reuse that name."
            )
        mounts = await asyncio.to_thread(  # -v/--mount checked, volumes made (volumes.py)
            self.daemon.volumes.setup_container,
            hc.model_dump(exclude_none=True),
            {**(image.get("Volumes") or {}), **(cfg.Volumes or {})},
        )
        self.names[name] = cid  # reserved while the rootfs is prepared
        try:
            await asyncio.to_thread(graph.prepare_rootfs, cid, image_id)
        except BaseException:
            self.names.pop(name, None)
            self.daemon.volumes.release(mounts, True)  # anonymous volumes made above
            raise
        env = [*(image.get("Env") or [])]
        from pallet.spec import merge_env

        env = merge_env(env, cfg.Env or [])
        labels = {**(image.get("Labels") or {}), **(cfg.Labels or {})}
        config = cfg.model_dump(exclude={"HostConfig", "NetworkingConfig"})
        config.update(
            Hostname=cfg.Hostname or cid[:12],
            Env=env,
            Cmd=cmd,
            Entrypoint=entrypoint or None,
            WorkingDir=cfg.WorkingDir or image.get("WorkingDir") or "",
            User=cfg.User or image.get("User") or "",
            Labels=labels,
            StopSignal=cfg.StopSignal or image.get("StopSignal"),
        )
        host_config = {**HOST_CONFIG_DEFAULTS, **hc.model_dump(exclude_none=True)}
        host_config["Runtime"] = runtime
        host_config["NetworkMode"] = hc.NetworkMode or "default"
        if not host_config.get("RestartPolicy", {}).get("Name"):
            host_config["RestartPolicy"] = {"Name": "no", "MaximumRetryCount": 0}
        data_dir = self.data_dir(cid)
        doc: dict[str, Any] = {
            "Id": cid,
            "Created": now_rfc3339(),
            "Path": args[0],
            "Args": args[1:],
            "State": {
                "Status": "created",
                "Running": False,
                "Paused": False,
                "Restarting": False,
                "OOMKilled": False,
                "Dead": False,
                "Pid": 0,
                "ExitCode": 0,
                "Error": "",
                "StartedAt": ZERO_TIME,
                "FinishedAt": ZERO_TIME,
            },
            "Image": image_id,
            "ResolvConfPath": str(data_dir / "resolv.conf"),
            "HostnamePath": str(data_dir / "hostname"),
            "HostsPath": str(data_dir / "hosts"),
            "LogPath": str(data_dir / f"{cid}-json.log"),
            "Name": "/" + name,
            "RestartCount": 0,
            "Driver": self.daemon.storage.name,
            "Platform": "linux",
            "MountLabel": "",
            "ProcessLabel": "",
            "AppArmorProfile": "",
            "ExecIDs": None,
            "HostConfig": host_config,
            "GraphDriver": {"Name": self.daemon.storage.name, "Data": None},
            "Mounts": mounts,
            "Config": config,
            "NetworkSettings": {
                "Bridge": "",
                "SandboxID": "",
                "Ports": {},
                "SandboxKey": "",
                "IPAddress": "",
                "IPPrefixLen": 0,
                "Gateway": "",
                "MacAddress": "",
                "Networks": {},
            },
        }
        c = Container(doc)
        try:
            self.daemon.networks.on_create(doc, cfg.NetworkingConfig)  # validates, fills
            data_dir.mkdir(parents=True, exist_ok=True)
            self.save(c)
        except BaseException:
            self.names.pop(name, None)
            shutil.rmtree(data_dir, ignore_errors=True)
            await asyncio.to_thread(graph.remove_rootfs, cid)
            self.daemon.volumes.release(mounts, True)  # anonymous volumes made above
            raise
        self.by_id[cid] = c
        self.event("create", c)
        return c

    # --- start -------------------------------------------------------------------

    def _write_etc_files(self, c: Container) -> list[Any]:
        """The container's /etc/hostname, /etc/hosts and /etc/resolv.conf, bind-mounted."""
        from pallet.spec import Mount

        d = self.data_dir(c.id)
        hostname = c.config["Hostname"]
        (d / "hostname").write_text(hostname + "\n")
        # Contents depend on the container's networks (addresses, embedded DNS, mode).
        (d / "hosts").write_text(self.daemon.networks.hosts_file(c))
        (d / "resolv.conf").write_text(self.daemon.networks.resolv_conf(c))
        return [
            Mount(
                destination=f"/etc/{n}",
                type="bind",
                source=str(d / n),
                options=["rbind", "rprivate"],
            )
            for n in ("resolv.conf", "hostname", "hosts")
        ]

    async def start(self, c: Container) -> None:
        async with c.lock:
            if c.running:
                raise NotModified("container already started")
            if c.removing or c.removed:
                raise Conflict(f"removal of container {c.id} is in progress")
            self.daemon.lifecycle.starting(c)  # a user's start: restart policy applies again
            await self._start_locked(c)

    async def _start_locked(self, c: Container) -> None:
        from pallet.execution import ExecError
        from pallet.mount import mount_all
        from pallet.shim import ShimClient
        from pallet.spec import build_spec

        bundle = self.bundle_dir(c.id)
        rootfs = bundle / "rootfs"

        def prepare() -> None:
            if bundle.exists():
                self._teardown_bundle(bundle)
            rootfs.mkdir(parents=True)
            mount_all(self.daemon.graph.rootfs_mounts(c.id), str(rootfs))

        await asyncio.to_thread(prepare)
        try:
            netns = await self.daemon.networks.prepare(c)  # addresses, ports: before /etc
            etc_mounts = self._write_etc_files(c)
            spec = build_spec(
                container_id=c.id,
                cgroup_parent=self.daemon.config.cgroup_parent,
                args=[c.doc["Path"], *c.doc["Args"]],
                env=c.config["Env"],
                cwd=c.config["WorkingDir"],
                user=c.config["User"],
                hostname=c.config["Hostname"],
                tty=c.tty,
                rootfs=rootfs,
                host_config=c.host_config,
                extra_mounts=[
                    *etc_mounts,
                    *self.daemon.volumes.container_mounts(c.doc["Mounts"], c.host_config, rootfs),
                ],
                network_namespace=netns,
            )
            (bundle / "config.json").write_text(spec.model_dump_json(exclude_none=True))
            backend = self.daemon.exec_backends[c.host_config["Runtime"]]
            shim = await ShimClient.launch(
                bundle,
                backend,
                Path(c.doc["LogPath"]),
                stdin=bool(c.config.get("OpenStdin")),
                on_output=c.on_output,
            )
            try:
                await self.daemon.networks.attach(c, shim.pid)  # netns exists, not started
                await shim.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await shim.kill(signals.SIGKILL)
                with contextlib.suppress(Exception):
                    await shim.wait()
                await shim.close()
                raise
        except ExecError as e:
            await asyncio.to_thread(self._teardown_bundle, bundle)
            await self.daemon.networks.release(c)
            c.state.update(ExitCode=e.exit_code, Error=e.message)
            self.save(c)
            if c.host_config.get("AutoRemove"):
                self._spawn(self.remove(c, force=True))
            raise InvalidArgument(
                "failed to create task for container: OCI runtime create failed: "
                f"{e.message}: unknown"
            ) from None
        except BaseException:
            await asyncio.to_thread(self._teardown_bundle, bundle)
            await self.daemon.networks.release(c)
            if c.host_config.get("AutoRemove"):  # a bad user, device...: --rm still removes
                self._spawn(self.remove(c, force=True))
            raise
        c.shim = shim
        c.state.update(
            Status="running",
            Running=True,
            Pid=shim.pid,
            ExitCode=0,
            Error="",
            OOMKilled=False,
            StartedAt=now_rfc3339(),
            FinishedAt=ZERO_TIME,
        )
        self.save(c)
        self.event("start", c)
        await c.notify()
        self._spawn(self._watch(c, shim))

    def _teardown_bundle(self, bundle: Path) -> None:
        from pallet.mount import unmount_all

        rootfs = bundle / "rootfs"
        if rootfs.exists():
            unmount_all(str(rootfs))
            # rmdir, never rmtree: a rootfs still mounted must not be emptied.
            os.rmdir(rootfs)
        shutil.rmtree(bundle, ignore_errors=True)

    async def _watch(self, c: Container, shim: ShimClient) -> None:
        status = await shim.wait()
        await shim.close()
        await self._exited(c, status.exit_code, status.oom_killed, status.finished_at, status.error)

    async def _exited(self, c: Container, code: int, oom: bool, finished: str, error: str) -> None:
        c.shim = None
        c.state.update(
            Status="exited",
            Running=False,
            Pid=0,
            ExitCode=code,
            OOMKilled=oom,
            FinishedAt=finished or now_rfc3339(),
            Error=error,
        )
        await asyncio.to_thread(self._teardown_bundle, self.bundle_dir(c.id))
        await self.daemon.networks.release(c)  # veths, rules, leases, ports, DNS
        if not c.removed:
            self.save(c)
        for q in c.attachers:
            q.put_nowait(None)
        c.exits += 1
        self.event("die", c, exitCode=str(code))
        self.daemon.lifecycle.exited(c)  # pause state, restart policy (lifecycle.py)
        await c.notify()
        if c.host_config.get("AutoRemove") and not c.removing and not c.removed:
            await self.remove(c, force=True)

    # --- stop, kill, remove --------------------------------------------------------

    async def _wait_exit(self, c: Container, timeout: float | None) -> bool:
        async with c.changed:
            try:
                await asyncio.wait_for(c.changed.wait_for(lambda: not c.running), timeout)
                return True
            except TimeoutError:
                return False

    async def kill(self, c: Container, signal: str | int | None) -> None:
        sig = parse_signal(signal, signals.SIGKILL)
        self.daemon.lifecycle.stopping(c)  # by hand: no restart policy
        if not c.running or c.shim is None:
            raise Conflict(f"Container {c.id} is not running")
        await c.shim.kill(sig)
        await self.daemon.lifecycle.signalled(c, sig)  # a paused one thaws to act on it
        self.event("kill", c, signal=str(sig))

    async def stop(self, c: Container, timeout: int | None, signal: str | None) -> None:
        self.daemon.lifecycle.stopping(c)  # by hand: no restart policy
        if not c.running or c.shim is None:
            raise NotModified("container already stopped")
        sig = parse_signal(signal or c.config.get("StopSignal"), signals.SIGTERM)
        if timeout is None:
            timeout = c.config.get("StopTimeout") or 10
        await c.shim.kill(sig)
        await self.daemon.lifecycle.signalled(c, sig)
        self.event("kill", c, signal=str(sig))
        if not await self._wait_exit(c, None if timeout < 0 else float(timeout)):
            if c.shim is not None:
                with contextlib.suppress(Exception):
                    await c.shim.kill(signals.SIGKILL)
                self.event("kill", c, signal=str(int(signals.SIGKILL)))
            await self._wait_exit(c, None)
        self.event("stop", c)

    async def remove(self, c: Container, force: bool = False, volumes: bool = False) -> None:
        if c.removed:
            return
        if c.removing:
            raise Conflict(f"removal of container {c.id} is already in progress")
        if c.running and not force:
            raise Conflict(
                f"You cannot remove a running container {c.id}. Stop the container before "
                "attempting removal or force remove"
            )
        c.removing = True
        try:
            self.daemon.lifecycle.cancel(c)  # a pending restart
            if c.running and c.shim is not None:
                with contextlib.suppress(Exception):
                    await c.shim.kill(signals.SIGKILL)
                await self.daemon.lifecycle.signalled(c, signals.SIGKILL)
                await self._wait_exit(c, None)
            await self.daemon.networks.release(c)
            await asyncio.to_thread(self.daemon.graph.remove_rootfs, c.id)
            await asyncio.to_thread(shutil.rmtree, self.data_dir(c.id), True)
            self.store.execute("DELETE FROM containers WHERE id = ?", (c.id,))
        finally:
            c.removing = False
        c.removed = True
        self.by_id.pop(c.id, None)
        self.daemon.volumes.release(c.doc["Mounts"], volumes)  # rm -v: anonymous volumes
        if self.names.get(c.name) == c.id:
            del self.names[c.name]
        self.event("destroy", c)
        await c.notify()

    # --- wait ----------------------------------------------------------------------

    async def wait(self, c: Container, condition: str, ready: Callable[[], Any]) -> dict[str, Any]:
        """Block until ``condition`` (not-running, next-exit, removed) holds.
        ``ready`` is awaited once the wait is registered (the API sends headers then)."""
        if condition not in ("not-running", "next-exit", "removed"):
            raise InvalidArgument(f"invalid condition: {condition!r}")
        exits = c.exits
        if condition == "not-running":
            done = lambda: not c.running or c.removed  # noqa: E731
        elif condition == "next-exit":
            done = lambda: c.exits > exits or c.removed  # noqa: E731
        else:
            done = lambda: c.removed  # noqa: E731
        await ready()
        async with c.changed:
            await c.changed.wait_for(done)
        result: dict[str, Any] = {"StatusCode": c.state["ExitCode"]}
        if c.state.get("Error"):
            result["Error"] = {"Message": c.state["Error"]}
        return result

    # --- restore and shutdown --------------------------------------------------------

    async def restore(self) -> None:
        """At daemon start: re-adopt containers whose monitor still runs, record the exit
        of those that ended while the daemon was away."""
        from pallet.shim import ShimClient, read_exit

        for c in list(self.by_id.values()):
            bundle = self.bundle_dir(c.id)
            if not c.running:
                if bundle.exists():
                    await asyncio.to_thread(self._teardown_bundle, bundle)
                continue
            try:
                shim = await ShimClient.connect(bundle, c.on_output)
            except (OSError, ConnectionError):
                status = read_exit(bundle)
                code = status.exit_code if status else 255
                await self._exited(
                    c,
                    code,
                    bool(status and status.oom_killed),
                    status.finished_at if status else "",
                    status.error if status else "monitor gone while the daemon was down",
                )
                continue
            c.shim = shim
            c.state["Pid"] = shim.pid
            self._spawn(self._watch(c, shim))

    async def shutdown(self, live_restore: bool) -> None:
        """Stop every container unless live-restore keeps them running."""
        running = [c for c in self.by_id.values() if c.running]
        if not live_restore:
            await asyncio.gather(
                *(self.stop(c, None, None) for c in running), return_exceptions=True
            )
        for t in list(self.tasks):
            t.cancel()
        for c in running:
            if c.shim is not None:
                await c.shim.close()
        self.store.close()
