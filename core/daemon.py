"""``palletd``: loads the configuration and the plugins, picks the drivers, builds the
Engine, Graph and container service, restores containers, and serves the API."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import click
from pallet.config import DEFAULT_CONFIG_FILE, ConfigError, DaemonConfig, load_config
from pallet.engine import Engine
from pallet.errors import PluginSkip
from pallet.plugin_manager import PluginManager
from pallet.storage import StorageDriver
from pydantic import ValidationError

log = logging.getLogger("pallet.daemon")

# Without a configured driver: the one that already has state, else the first that works.
# devmapper is never picked by itself (as in Docker: its default pool is loop files).
STORAGE_PREFERENCE = ["overlay", "btrfs", "vfs"]


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def _import_string(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.plugins = PluginManager(disabled=list(config.disabled_plugins))
        self.warnings: list[str] = []
        self.driver_report: list[dict[str, str]] = []
        self.exec_backends: dict[str, str] = {}  # runtime name -> "module:Class" for the shim
        self.network_drivers: dict[str, type] = {}
        self._lock_fd: int | None = None

    # --- start-up ----------------------------------------------------------------

    def _lock_data_root(self) -> None:
        root = self.config.data_root
        root.mkdir(parents=True, exist_ok=True, mode=0o711)
        fd = os.open(root / "palletd.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(
                f"another palletd is using the data root {root}; stop it or give another "
                "--data-root"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _daemon_id(self) -> str:
        path = self.config.data_root / "engine-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            ident = secrets.token_hex(16)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(ident)
            tmp.replace(path)
            return ident

    def _report(self, kind: str, name: str, state: str, reason: str = "") -> None:
        self.driver_report.append({"Kind": kind, "Name": name, "State": state, "Reason": reason})

    def _select_storage(self) -> StorageDriver:
        classes: dict[str, type[StorageDriver]] = {}
        for cls in self.plugins.collect("pallet_storage_drivers_v1"):
            classes[cls.name] = cls
        root = self.config.data_root
        wanted = self.config.storage_driver
        existing = [n for n in classes if (root / n).is_dir() and any((root / n).iterdir())]
        if wanted is None and len(existing) > 1:
            raise StartupError(
                f"{root} has state for several storage drivers ({', '.join(sorted(existing))}); "
                "choose one with storage-driver in the config or --storage-driver"
            )
        if wanted is not None and wanted not in classes:
            known = ", ".join(sorted(classes)) or "none"
            raise StartupError(f"storage-driver {wanted!r}: no such driver (available: {known})")
        if wanted is not None and existing and wanted not in existing:
            raise StartupError(
                f"storage-driver {wanted!r}: {root} already holds images and containers of the "
                f"{existing[0]!r} driver. Use storage-driver {existing[0]!r}, or move {root} "
                "aside to start empty with another driver"
            )
        order = (
            [wanted]
            if wanted
            else existing
            or [n for n in STORAGE_PREFERENCE if n in classes]
            + sorted(n for n in classes if n not in STORAGE_PREFERENCE)
        )
        chosen: StorageDriver | None = None
        for name in order:
            cls = classes[name]
            try:
                options = cls.Options.model_validate(self.config.storage_options())
            except ValidationError as e:
                first = e.errors()[0]
                key = ".".join(str(p) for p in first["loc"])
                raise StartupError(f"storage-opts for {name}: {key}: {first['msg']}") from None
            try:
                cls.probe(root / name, options)
            except PluginSkip as skip:
                self._report("storage", name, "skipped", skip.reason)
                if wanted:
                    raise StartupError(
                        f"storage-driver {name!r} cannot be used: {skip.reason}"
                    ) from None
                continue
            chosen = cls(root / name, options)
            self._report(
                "storage", name, "selected", "configured" if wanted else "first that works here"
            )
            break
        reported = {r["Name"] for r in self.driver_report if r["Kind"] == "storage"}
        for name, cls in classes.items():
            if name in reported:
                continue
            try:
                cls.probe(root / name, cls.Options.model_validate({}))
                self._report("storage", name, "available")
            except PluginSkip as skip:
                self._report("storage", name, "skipped", skip.reason)
            except ValidationError:
                self._report("storage", name, "available")
        if chosen is None:
            raise StartupError(
                "no storage driver works on this host: "
                + "; ".join(
                    f"{r['Name']}: {r['Reason']}"
                    for r in self.driver_report
                    if r["Kind"] == "storage"
                )
            )
        return chosen

    def _select_exec_backends(self) -> None:
        builtin: set[str] = set()
        for cls in self.plugins.collect("pallet_exec_backends_v1"):
            builtin.add(cls.name)
            try:
                cls.probe()
            except PluginSkip as skip:
                self._report("runtime", cls.name, "skipped", skip.reason)
                continue
            self.exec_backends[cls.name] = _import_string(cls)
            self._report("runtime", cls.name, "available")
        self._configured_runtimes(builtin)
        if self.config.default_runtime not in self.exec_backends:
            known = ", ".join(sorted(self.exec_backends)) or "none"
            raise StartupError(
                f"default-runtime {self.config.default_runtime!r} is not available "
                f"(available: {known})"
            )

    def _configured_runtimes(self, builtin: set[str]) -> None:
        """``runtimes`` in the config: OCI runtime binaries run by the class that the
        ``pallet_oci_runtime_class_v1`` hook provides (the exec_oci plugin)."""
        if not self.config.runtimes:
            return
        oci = self.plugins.hook.pallet_oci_runtime_class_v1()
        for name, rt in self.config.runtimes.items():
            if name in builtin:
                raise StartupError(
                    f"runtimes: runtime name {name!r} is reserved (a built-in runtime); "
                    "choose another name"
                )
            if oci is None:
                self._report("runtime", name, "skipped", "no plugin runs OCI runtime binaries")
                continue
            try:
                path = oci.probe_binary(rt.path)
            except PluginSkip as skip:
                self._report("runtime", name, "skipped", skip.reason)
                continue
            options = {"path": path, "runtime_args": list(rt.runtimeArgs), "name": name}
            self.exec_backends[name] = f"{_import_string(oci)}?{json.dumps(options)}"
            self._report("runtime", name, "available", f"configured: {path}")

    def _select_network_drivers(self) -> None:
        for cls in self.plugins.collect("pallet_network_drivers_v1"):
            try:
                cls.probe()
            except PluginSkip as skip:
                self._report("network", cls.name, "skipped", skip.reason)
                continue
            self.network_drivers[cls.name] = cls
            self._report("network", cls.name, "available")

    def setup(self) -> None:
        """Everything before serving that can fail with a user-facing reason."""
        from pallet.containers import Containers
        from pallet.graph import Graph
        from pallet.jobs.containers import ContainerJobs
        from pallet.jobs.distribution import DistributionJobs
        from pallet.jobs.exec import ExecJobs
        from pallet.jobs.images import ImageJobs
        from pallet.jobs.system import SystemJobs

        self._lock_data_root()
        self.config.exec_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.daemon_id = self._daemon_id()
        self.plugins.load_entry_points()
        self.storage = self._select_storage()
        self.storage.cleanup()
        self._select_exec_backends()
        self._select_network_drivers()
        self.graph = Graph(
            self.config.data_root / "image" / self.storage.name, self.storage, self.plugins.hook
        )
        self.graph.cleanup()
        self.containers = Containers(self)
        from pallet.jobs.volumes import VolumeJobs
        from pallet.volumes import Volumes

        self.volumes = Volumes(self.config.data_root, self.containers)
        self.volumes.cleanup()
        self.plugins.register(VolumeJobs(self), "core.volumes")
        from pallet.jobs.lifecycle import LifecycleJobs
        from pallet.lifecycle import Lifecycle

        self.lifecycle = Lifecycle(self.containers)
        self.plugins.register(LifecycleJobs(self.containers, self.lifecycle), "core.lifecycle")
        from pallet.networks import Networks

        self.networks = Networks(self)
        self.networks.setup()
        # The core's jobs register through the same hook as a plugin's.
        self.plugins.register(SystemJobs(self), "core.system")
        self.plugins.register(ContainerJobs(self.containers), "core.containers")
        self.plugins.register(ExecJobs(self.containers), "core.exec")
        self.plugins.register(ImageJobs(self), "core.images")
        from pallet.jobs.storage import StorageJobs

        self.plugins.register(StorageJobs(self), "core.storage")
        self.plugins.register(DistributionJobs(self), "core.distribution")
        from pallet.jobs.networks import NetworkJobs

        self.plugins.register(NetworkJobs(self.networks), "core.networks")
        self.engine = Engine(self.plugins, daemon=self)
        self.engine.load_jobs()

    async def serve(self, stop: asyncio.Event) -> None:
        from pallet.server import Server
        from pallet.shim import ShimClient

        # The shim zygote imports the backends now, so the first `run` is as fast as the rest.
        ShimClient.warm_up(list(self.exec_backends.values()))
        await self.containers.restore()
        await self.networks.restore()
        await self.lifecycle.at_daemon_start()  # restart policies of containers found down
        server = Server(self.engine)
        gid = None
        if self.config.group:
            try:
                gid = grp.getgrnam(self.config.group).gr_gid
            except KeyError:
                raise StartupError(f"group {self.config.group!r}: no such group") from None
        for host in self.config.hosts:
            if host.startswith("unix://"):
                await server.listen_unix(host[len("unix://") :], self.config.socket_mode, gid)
            else:
                h, _, port = host[len("tcp://") :].rpartition(":")
                await server.listen_tcp(h.strip("[]") or "127.0.0.1", int(port))
            log.info("API listen on %s", host)
        print(
            f"palletd {self.daemon_id[:12]} serving on {', '.join(self.config.hosts)}", flush=True
        )
        try:
            await stop.wait()
        finally:
            await server.close()
            self.lifecycle.shutdown()  # the daemon's own stops are not stops by hand
            await self.containers.shutdown(self.config.live_restore)
            await self.networks.shutdown()
            for host in self.config.hosts:
                if host.startswith("unix://"):
                    with contextlib.suppress(OSError):
                        os.unlink(host[len("unix://") :])
            self.storage.close()


def _run(config: DaemonConfig) -> None:
    daemon = Daemon(config)
    daemon.setup()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await daemon.serve(stop)

    asyncio.run(main())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config-file",
    type=click.Path(path_type=Path),
    default=None,
    help=f"Daemon configuration file (JSON, daemon.json keys) [default: {DEFAULT_CONFIG_FILE}]",
)
@click.option("--data-root", type=click.Path(path_type=Path), help="Root of persistent state")
@click.option("--exec-root", type=click.Path(path_type=Path), help="Root of runtime state")
@click.option(
    "-H",
    "--host",
    "hosts",
    multiple=True,
    help="Address to listen on (unix:///path, tcp://host:port)",
)
@click.option("-s", "--storage-driver", help="Storage driver to use")
@click.option(
    "--storage-opt", "storage_opts", multiple=True, help="Storage driver option KEY=VALUE"
)
@click.option("--default-runtime", help="Default execution backend for containers")
@click.option("--cgroup-parent", help="Parent cgroup of all containers (default /pallet)")
@click.option("-l", "--log-level", type=click.Choice(["debug", "info", "warn", "error", "fatal"]))
@click.option(
    "--live-restore/--no-live-restore",
    default=None,
    help="Keep containers running when the daemon stops",
)
@click.option("-G", "--group", help="Group owning the unix socket")
@click.option("-D", "--debug", is_flag=True, default=None, help="Debug logging")
@click.option("-b", "--bridge", help="Name of the default bridge (default pallet0)")
@click.option("--bip", help="Address and prefix of the default bridge, e.g. 172.17.0.1/16")
@click.option("--iptables/--no-iptables", default=None, help="NAT, published ports, isolation")
@click.option("--mtu", type=int, help="MTU of container interfaces (default 1500)")
@click.option("--dns", "dns", multiple=True, help="Upstream DNS server for containers")
@click.option("--validate", is_flag=True, help="Check the configuration and exit")
def main(config_file: Path | None, validate: bool, **flags: Any) -> None:
    """The pallet daemon: serves the Docker Engine API."""
    overrides = {
        "data-root": flags["data_root"],
        "exec-root": flags["exec_root"],
        "hosts": list(flags["hosts"]) or None,
        "storage-driver": flags["storage_driver"],
        "storage-opts": list(flags["storage_opts"]) or None,
        "default-runtime": flags["default_runtime"],
        "cgroup-parent": flags["cgroup_parent"],
        "log-level": flags["log_level"],
        "live-restore": flags["live_restore"],
        "group": flags["group"],
        "debug": flags["debug"],
        "bridge": flags["bridge"],
        "bip": flags["bip"],
        "iptables": flags["iptables"],
        "mtu": flags["mtu"],
        "dns": list(flags["dns"]) or None,
    }
    path = config_file if config_file is not None else DEFAULT_CONFIG_FILE
    try:
        config = load_config(path, overrides)
    except ConfigError as e:
        click.echo(f"palletd: {e}", err=True)
        sys.exit(1)
    if validate:
        click.echo("configuration OK")
        return
    level = "debug" if config.debug else config.log_level
    logging.basicConfig(
        level={"warn": logging.WARNING, "fatal": logging.CRITICAL}.get(level, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if os.geteuid() != 0:
        click.echo("palletd: must run as root", err=True)
        sys.exit(1)
    try:
        _run(config)
    except StartupError as e:
        click.echo(f"palletd: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
