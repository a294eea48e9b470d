"""System jobs: ping, version, info."""

from __future__ import annotations

import os
import platform
import socket
from typing import TYPE_CHECKING, Any

import pallet
from pallet.hookspecs import hookimpl
from pallet.logs import now_rfc3339

if TYPE_CHECKING:
    from pallet.daemon import Daemon
    from pallet.engine import Engine, Job

GIT_COMMIT = "pallet"


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


class SystemJobs:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @hookimpl
    def pallet_register_jobs(self, engine: Engine) -> None:
        engine.register("system.ping", self.ping)
        engine.register("system.version", self.version)
        engine.register("system.info", self.info)

    async def ping(self, job: Job) -> str:
        return "OK"

    async def version(self, job: Job) -> dict[str, Any]:
        from pallet.server import API_VERSION, MIN_API_VERSION

        details = {
            "ApiVersion": API_VERSION,
            "MinAPIVersion": MIN_API_VERSION,
            "GitCommit": GIT_COMMIT,
            "GoVersion": f"python{platform.python_version()}",
            "Os": "linux",
            "Arch": _arch(),
            "KernelVersion": platform.release(),
            "BuildTime": "",
        }
        return {
            "Platform": {"Name": "pallet"},
            "Components": [{"Name": "Engine", "Version": pallet.__version__, "Details": details}],
            "Version": pallet.__version__,
            **details,
        }

    async def info(self, job: Job) -> dict[str, Any]:
        d = self.daemon
        containers = list(d.containers.by_id.values())
        running = sum(1 for c in containers if c.running)
        cgroup_v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        return {
            "ID": d.daemon_id,
            "Containers": len(containers),
            "ContainersRunning": running,
            "ContainersPaused": 0,
            "ContainersStopped": len(containers) - running,
            "Images": len(d.graph.list_images()),
            "Driver": d.storage.name,
            "DriverStatus": [list(kv) for kv in d.graph.driver_status()],
            "Plugins": {
                "Volume": [],
                "Network": sorted(d.network_drivers),
                "Authorization": None,
                "Log": ["json-file"],
            },
            "MemoryLimit": True,
            "SwapLimit": True,
            "CpuCfsPeriod": True,
            "CpuCfsQuota": True,
            "CPUShares": True,
            "CPUSet": True,
            "PidsLimit": True,
            "IPv4Forwarding": True,
            "Debug": d.config.debug,
            "NFd": len(os.listdir("/proc/self/fd")),
            "NGoroutines": 0,
            "SystemTime": now_rfc3339(),
            "LoggingDriver": "json-file",
            "CgroupDriver": "cgroupfs",
            "CgroupVersion": "2" if cgroup_v2 else "1",
            "NEventsListener": 0,
            "KernelVersion": platform.release(),
            "OperatingSystem": _os_name(),
            "OSVersion": "",
            "OSType": "linux",
            "Architecture": platform.machine(),
            "IndexServerAddress": "https://index.docker.io/v1/",
            "RegistryConfig": {
                "InsecureRegistryCIDRs": [],
                "IndexConfigs": {},
                "Mirrors": list(d.config.registry_mirrors),
            },
            "NCPU": os.cpu_count() or 1,
            "MemTotal": _mem_total(),
            "DockerRootDir": str(d.config.data_root),
            "HttpProxy": "",
            "HttpsProxy": "",
            "NoProxy": "",
            "Name": socket.gethostname(),
            "Labels": [],
            "ExperimentalBuild": False,
            "ServerVersion": pallet.__version__,
            "Runtimes": {name: {"path": name} for name in sorted(d.exec_backends)},
            "DefaultRuntime": d.config.default_runtime,
            "Swarm": {"LocalNodeState": "inactive", "ControlAvailable": False},
            "LiveRestoreEnabled": d.config.live_restore,
            "Isolation": "",
            "InitBinary": "",
            "SecurityOptions": [],
            "Warnings": d.warnings,
            # pallet's own: every plugin, loaded or not, and why.
            "PalletPlugins": [
                {"Name": r.name, "State": r.state, "Module": r.module, "Reason": r.reason}
                for r in sorted(d.plugins.records.values(), key=lambda r: r.name)
            ],
            "PalletDrivers": d.driver_report,
        }


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "Linux"
