"""The OCI runtime spec: pydantic models of the part pallet writes, and the builder that
turns an image config plus a container's config into the one description every
execution backend gets (``config.json`` in the bundle).

Defaults follow Docker's (moby ``oci/defaults.go``): the same mounts, masked and
read-only paths, and the 14 default capabilities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pallet.errors import InvalidArgument
from pydantic import BaseModel, ConfigDict, Field

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
MASKED_PATHS = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class User(_Spec):
    uid: int = 0
    gid: int = 0
    additionalGids: list[int] = Field(default_factory=list)


class Capabilities(_Spec):
    bounding: list[str] = Field(default_factory=list)
    effective: list[str] = Field(default_factory=list)
    permitted: list[str] = Field(default_factory=list)


class Rlimit(_Spec):
    type: str
    hard: int
    soft: int


class Process(_Spec):
    terminal: bool = False
    user: User = Field(default_factory=User)
    args: list[str]
    env: list[str] = Field(default_factory=list)
    cwd: str = "/"
    capabilities: Capabilities | None = None
    rlimits: list[Rlimit] = Field(default_factory=list)
    noNewPrivileges: bool = True


class Root(_Spec):
    path: str = "rootfs"
    readonly: bool = False


class Mount(_Spec):
    destination: str
    type: str | None = None
    source: str | None = None
    options: list[str] = Field(default_factory=list)


class Namespace(_Spec):
    type: str
    path: str | None = None


class Resources(_Spec):
    memory: dict[str, int] | None = None
    pids: dict[str, int] | None = None
    cpu: dict[str, Any] | None = None


class Linux(_Spec):
    namespaces: list[Namespace]
    cgroupsPath: str
    resources: Resources = Field(default_factory=Resources)
    maskedPaths: list[str] = Field(default_factory=lambda: list(MASKED_PATHS))
    readonlyPaths: list[str] = Field(default_factory=lambda: list(READONLY_PATHS))


class Spec(_Spec):
    ociVersion: str = OCI_VERSION
    process: Process
    root: Root = Field(default_factory=Root)
    hostname: str = ""
    mounts: list[Mount]
    linux: Linux


def default_mounts() -> list[Mount]:
    return [
        Mount(
            destination="/proc", type="proc", source="proc", options=["nosuid", "noexec", "nodev"]
        ),
        Mount(
            destination="/dev",
            type="tmpfs",
            source="tmpfs",
            options=["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        Mount(
            destination="/dev/pts",
            type="devpts",
            source="devpts",
            options=["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        Mount(
            destination="/sys",
            type="sysfs",
            source="sysfs",
            options=["nosuid", "noexec", "nodev", "ro"],
        ),
        Mount(
            destination="/dev/mqueue",
            type="mqueue",
            source="mqueue",
            options=["nosuid", "noexec", "nodev"],
        ),
        Mount(
            destination="/dev/shm",
            type="tmpfs",
            source="shm",
            options=["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
    ]


def _read_db(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_user(rootfs: Path, user: str) -> tuple[User, str]:
    """``-u`` value (``name``, ``uid``, ``name:group``, ``uid:gid``) -> OCI user and HOME,
    looked up in the container's own ``/etc/passwd`` and ``/etc/group`` as Docker does."""
    passwd = _read_db(rootfs / "etc/passwd")
    groups = _read_db(rootfs / "etc/group")
    name, _, group = (user or "0").partition(":")
    uid, gid, home = None, None, "/"
    for entry in passwd:
        if len(entry) >= 6 and (entry[0] == name or entry[2] == name):
            uid, gid, home = int(entry[2]), int(entry[3]), entry[5] or "/"
            break
    if uid is None:
        if not name.isdigit():
            raise InvalidArgument(f"unable to find user {name}: no matching entries in passwd file")
        uid, gid = int(name), 0
    username = next((e[0] for e in passwd if len(e) >= 3 and e[2] == str(uid)), None)
    if group:
        match = next((e for e in groups if len(e) >= 3 and (e[0] == group or e[2] == group)), None)
        if match is not None:
            gid = int(match[2])
        elif group.isdigit():
            gid = int(group)
        else:
            raise InvalidArgument(
                f"unable to find group {group}: no matching entries in group file"
            )
    additional = sorted(
        {
            int(e[2])
            for e in groups
            if len(e) >= 4 and username and username in e[3].split(",") and e[2].isdigit()
        }
        - {gid}
    )
    return User(uid=uid, gid=gid or 0, additionalGids=additional), home


def merge_env(image_env: list[str], env: list[str]) -> list[str]:
    """Image env overridden key by key by the container's, order kept."""
    merged: dict[str, str] = {}
    for item in [*image_env, *env]:
        key, sep, value = item.partition("=")
        merged[key] = f"{key}{sep}{value}"
    return list(merged.values())


def build_spec(
    *,
    container_id: str,
    cgroup_parent: str,
    args: list[str],
    env: list[str],
    cwd: str,
    user: str,
    hostname: str,
    tty: bool,
    rootfs: Path,
    host_config: dict[str, Any],
    extra_mounts: list[Mount],
) -> Spec:
    """The OCI spec for one container; ``rootfs`` (mounted) is read for user lookup."""
    oci_user, home = resolve_user(rootfs, user)
    keys = {e.partition("=")[0] for e in env}
    full_env = list(env)
    if "PATH" not in keys:
        full_env.insert(0, f"PATH={DEFAULT_PATH}")
    full_env.insert(1 if "PATH" not in keys else 0, f"HOSTNAME={hostname}")
    if "HOME" not in keys:
        full_env.append(f"HOME={home}")
    if tty and "TERM" not in keys:
        full_env.append("TERM=xterm")
    resources = Resources()
    memory = int(host_config.get("Memory") or 0)
    if memory:
        swap = int(host_config.get("MemorySwap") or 0)
        resources.memory = {"limit": memory, **({"swap": swap} if swap else {})}
    pids = host_config.get("PidsLimit")
    if pids and pids > 0:
        resources.pids = {"limit": int(pids)}
    cpu: dict[str, Any] = {}
    if host_config.get("CpuShares"):
        cpu["shares"] = int(host_config["CpuShares"])
    if host_config.get("NanoCpus"):
        cpu["period"] = 100000
        cpu["quota"] = int(host_config["NanoCpus"]) * 100000 // 1_000_000_000
    if host_config.get("CpusetCpus"):
        cpu["cpus"] = host_config["CpusetCpus"]
    resources.cpu = cpu or None
    caps = list(DEFAULT_CAPABILITIES)
    return Spec(
        process=Process(
            terminal=tty,
            user=oci_user,
            args=args,
            env=full_env,
            cwd=cwd or "/",
            capabilities=Capabilities(bounding=caps, effective=caps, permitted=caps),
            rlimits=[Rlimit(type="RLIMIT_NOFILE", hard=1048576, soft=1048576)],
        ),
        root=Root(path=str(rootfs), readonly=bool(host_config.get("ReadonlyRootfs"))),
        hostname=hostname,
        mounts=[*default_mounts(), *extra_mounts],
        linux=Linux(
            namespaces=[Namespace(type=t) for t in ("pid", "network", "ipc", "uts", "mount")],
            cgroupsPath=f"{cgroup_parent.rstrip('/')}/{container_id}",
            resources=resources,
        ),
    )
