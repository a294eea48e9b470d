"""The OCI runtime spec: pydantic models of the part pallet writes, and the builder that
turns an image config plus a container's config into the one description every
execution backend gets (``config.json`` in the bundle).

Defaults follow Docker's (moby ``oci/defaults.go``): the same mounts, masked and
read-only paths, and the 14 default capabilities.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from pallet.capabilities import CAPABILITIES
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
    inheritable: list[str] = Field(default_factory=list)
    ambient: list[str] = Field(default_factory=list)


class Rlimit(_Spec):
    type: str
    hard: int
    soft: int


class Process(_Spec):
    terminal: bool = False
    consoleSize: dict[str, int] | None = None  # {"height": rows, "width": columns}
    user: User = Field(default_factory=User)
    args: list[str]
    env: list[str] = Field(default_factory=list)
    cwd: str = "/"
    capabilities: Capabilities | None = None
    rlimits: list[Rlimit] = Field(default_factory=list)
    noNewPrivileges: bool = False
    oomScoreAdj: int | None = None


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


class Device(_Spec):
    """A device node created in the container (OCI ``linux.devices``)."""

    path: str
    type: str
    major: int
    minor: int
    fileMode: int | None = None
    uid: int | None = None
    gid: int | None = None


class DeviceRule(_Spec):
    """A device cgroup rule (OCI ``linux.resources.devices``)."""

    allow: bool
    type: str | None = None
    major: int | None = None
    minor: int | None = None
    access: str | None = None


class Resources(_Spec):
    memory: dict[str, int] | None = None
    pids: dict[str, int] | None = None
    cpu: dict[str, Any] | None = None
    blockIO: dict[str, Any] | None = None
    devices: list[DeviceRule] | None = None


class Linux(_Spec):
    namespaces: list[Namespace]
    cgroupsPath: str
    resources: Resources = Field(default_factory=Resources)
    devices: list[Device] = Field(default_factory=list)
    maskedPaths: list[str] = Field(default_factory=lambda: list(MASKED_PATHS))
    readonlyPaths: list[str] = Field(default_factory=lambda: list(READONLY_PATHS))
    seccomp: dict[str, Any] | None = None
    sysctl: dict[str, str] | None = None


class Spec(_Spec):
    ociVersion: str = OCI_VERSION
    process: Process
    root: Root = Field(default_factory=Root)
    hostname: str = ""
    mounts: list[Mount]
    linux: Linux


def default_mounts(shm_size: int = 64 * 1024 * 1024, privileged: bool = False) -> list[Mount]:
    """Docker's default mounts; a privileged container gets /sys and its cgroups rw."""
    ro = [] if privileged else ["ro"]
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
            options=["nosuid", "noexec", "nodev", *ro],
        ),
        Mount(
            destination="/sys/fs/cgroup",
            type="cgroup",
            source="cgroup",
            options=["nosuid", "noexec", "nodev", "relatime", *ro],
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
            options=["nosuid", "noexec", "nodev", "mode=1777", f"size={shm_size // 1024}k"],
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


# --- hardening: capabilities, security options, devices, rlimits ---------------------

ALL_CAPABILITIES = CAPABILITIES


def host_capabilities() -> list[str]:
    """Every capability the running kernel knows and the daemon may hand on (its own
    bounding set): what ``--privileged`` and ``--cap-add ALL`` get. A daemon in a
    sandbox that lacks some would otherwise make runc's and crun's capset fail."""
    try:
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        last = len(ALL_CAPABILITIES) - 1
    bounding = (1 << (last + 1)) - 1
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapBnd:"):
                bounding = int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return [c for i, c in enumerate(ALL_CAPABILITIES[: last + 1]) if bounding >> i & 1]


def normalize_capabilities(names: list[str] | None) -> list[str]:
    """``chown``, ``CAP_CHOWN``, ``ALL`` -> canonical names; Docker's error otherwise."""
    out: list[str] = []
    for raw in names or []:
        name = raw.strip().upper()
        if name == "ALL":
            out.append("ALL")
            continue
        if not name.startswith("CAP_"):
            name = "CAP_" + name
        if name not in ALL_CAPABILITIES:
            raise ValueError(f"unknown capability: {raw!r}")
        out.append(name)
    return out


def container_capabilities(
    cap_add: list[str] | None, cap_drop: list[str] | None, privileged: bool
) -> list[str]:
    """The container's capabilities from Docker's defaults (moby TweakCapabilities)."""
    if privileged:
        return host_capabilities()
    adds = normalize_capabilities(cap_add)
    drops = normalize_capabilities(cap_drop)
    if not adds and not drops:
        return list(DEFAULT_CAPABILITIES)
    if "ALL" in adds:
        return [c for c in host_capabilities() if c not in drops]
    if "ALL" in drops:
        caps = []
    else:
        caps = [c for c in DEFAULT_CAPABILITIES if c not in drops]
    for c in adds:
        if c not in caps:
            caps.append(c)
    return caps


class SecurityOptions(BaseModel):
    """``--security-opt`` values, parsed."""

    seccomp: str = "default"  # "default", "unconfined" or a profile (JSON text)
    no_new_privileges: bool = False
    systempaths_unconfined: bool = False


def parse_security_opts(opts: list[str] | None) -> SecurityOptions:
    """Docker's ``--security-opt`` forms; its messages for the wrong ones."""
    out = SecurityOptions()
    for opt in opts or []:
        if opt == "no-new-privileges":
            out.no_new_privileges = True
            continue
        if opt == "disable":  # label=disable in the old form
            continue
        key, sep, value = opt.partition("=")
        if not sep:
            key, sep, value = opt.partition(":")
        if not sep:
            raise ValueError(f'invalid --security-opt 1: "{opt}"')
        if key == "seccomp":
            if not value:
                raise ValueError(f'invalid --security-opt 2: "{opt}"')
            out.seccomp = "default" if value == "builtin" else value
        elif key == "no-new-privileges":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"invalid --security-opt 2: {opt!r}")
            out.no_new_privileges = value.lower() in ("true", "1")
        elif key == "systempaths":
            if value != "unconfined":
                raise ValueError(f'invalid --security-opt 2: "{opt}"')
            out.systempaths_unconfined = True
        elif key in ("label", "apparmor"):
            continue  # no SELinux or AppArmor here: accepted and not applied, as Docker
        else:
            raise ValueError(f'invalid --security-opt 2: "{opt}"')
    return out


def seccomp_for(opts: SecurityOptions, caps: list[str], privileged: bool) -> dict[str, Any] | None:
    """The OCI ``linux.seccomp`` a container gets (None: unconfined)."""
    import json

    from pallet.seccomp import default_profile, parse_profile, to_oci

    if privileged or opts.seccomp == "unconfined":
        return None
    if opts.seccomp == "default":
        return to_oci(parse_profile(default_profile(), "default"), caps)
    try:
        data = json.loads(opts.seccomp)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"Decoding seccomp profile failed: {e}") from None
    return to_oci(parse_profile(data, "profile"), caps)


RLIMITS = {
    "as",
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
}


def rlimits_for(ulimits: list[dict[str, Any]] | None) -> list[Rlimit]:
    """Docker's default (nofile 1048576) overridden by ``--ulimit`` values."""
    limits: dict[str, Rlimit] = {
        "RLIMIT_NOFILE": Rlimit(type="RLIMIT_NOFILE", hard=1048576, soft=1048576)
    }
    for u in ulimits or []:
        name = str(u.get("Name") or "")
        if name not in RLIMITS:
            raise InvalidArgument(f"invalid ulimit type: {name}")
        soft, hard = int(u.get("Soft", 0)), int(u.get("Hard", 0))
        if soft > hard and hard != -1:
            raise InvalidArgument(
                f"ulimit soft limit must be less than or equal to hard limit: {soft} > {hard}"
            )
        key = f"RLIMIT_{name.upper()}"
        limits[key] = Rlimit(
            type=key,
            soft=soft if soft >= 0 else 2**64 - 1,
            hard=hard if hard >= 0 else 2**64 - 1,
        )
    return list(limits.values())


def host_device(path_on_host: str, path_in_container: str, permissions: str) -> list[Device]:
    """``--device /dev/x[:/dev/y[:rwm]]``: the node (or every node under a directory)."""
    import stat as st

    try:
        info = os.stat(path_on_host)
    except OSError as e:
        raise InvalidArgument(
            "error gathering device information while adding custom device "
            f'"{path_on_host}": {(e.strerror or str(e)).lower()}'
        ) from None
    if st.S_ISDIR(info.st_mode):
        out: list[Device] = []
        for root, _dirs, files in os.walk(path_on_host):
            for f in sorted(files):
                p = os.path.join(root, f)
                with contextlib.suppress(OSError, InvalidArgument):
                    rel = os.path.relpath(p, path_on_host)
                    out += host_device(p, os.path.join(path_in_container, rel), permissions)
        return out
    if st.S_ISCHR(info.st_mode):
        kind = "c"
    elif st.S_ISBLK(info.st_mode):
        kind = "b"
    else:
        raise InvalidArgument(
            "error gathering device information while adding custom device "
            f'"{path_on_host}": not a device node'
        )
    return [
        Device(
            path=path_in_container,
            type=kind,
            major=os.major(info.st_rdev),
            minor=os.minor(info.st_rdev),
            fileMode=st.S_IMODE(info.st_mode),
            uid=info.st_uid,
            gid=info.st_gid,
        )
    ]


def all_host_devices() -> list[Device]:
    """What ``--privileged`` puts in /dev: every device node of the host's /dev."""
    out: list[Device] = []
    skip = ("/dev/pts", "/dev/shm", "/dev/mqueue", "/dev/console")
    for root, dirs, files in os.walk("/dev"):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in skip]
        for f in files:
            p = os.path.join(root, f)
            if p in skip or p == "/dev/ptmx":
                continue
            with contextlib.suppress(InvalidArgument, OSError):
                out += host_device(p, p, "rwm")
    return out


def devices_for(host_config: dict[str, Any]) -> tuple[list[Device], list[DeviceRule]]:
    """Device nodes and cgroup rules: runc's defaults plus ``--device``; all for
    ``--privileged``."""
    from pallet.cgroups import DEFAULT_DEVICE_RULES

    if host_config.get("Privileged"):
        return all_host_devices(), [DeviceRule(allow=True, access="rwm")]
    devices: list[Device] = []
    rules = [DeviceRule(allow=False, access="rwm")]
    rules += [DeviceRule(**r) for r in DEFAULT_DEVICE_RULES]
    for d in host_config.get("Devices") or []:
        perms = d.get("CgroupPermissions") or "rwm"
        found = host_device(d["PathOnHost"], d.get("PathInContainer") or d["PathOnHost"], perms)
        devices += found
        rules += [
            DeviceRule(allow=True, type=n.type, major=n.major, minor=n.minor, access=perms)
            for n in found
        ]
    for rule in host_config.get("DeviceCgroupRules") or []:
        rules.append(parse_device_cgroup_rule(rule))
    return devices, rules


def parse_device_cgroup_rule(rule: str) -> DeviceRule:
    """``c 1:3 rwm`` (``*`` for any number) -> a rule; Docker's error otherwise."""
    import re

    m = re.fullmatch(r"([acb]) ([0-9]+|\*):([0-9]+|\*) ([rwm]{1,3})", rule.strip())
    if not m:
        raise InvalidArgument(f"invalid device cgroup format '{rule}'")
    return DeviceRule(
        allow=True,
        type=m.group(1),
        major=None if m.group(2) == "*" else int(m.group(2)),
        minor=None if m.group(3) == "*" else int(m.group(3)),
        access=m.group(4),
    )


def tmpfs_mount(target: str, options: str) -> Mount:
    """``--tmpfs /run:rw,size=64m``: Docker's defaults (noexec,nosuid,nodev) + options."""
    opts = ["noexec", "nosuid", "nodev"]
    for o in [x for x in (options or "").split(",") if x]:
        if o in ("exec", "suid", "dev"):
            opts = [x for x in opts if x != "no" + o]
        opts.append(o)
    return Mount(destination=target, type="tmpfs", source="tmpfs", options=opts)


INIT_PATHS = ["/usr/bin/tini-static", "/usr/bin/docker-init", "/usr/libexec/docker/docker-init"]
INIT_IN_CONTAINER = "/sbin/docker-init"


def init_binary() -> str:
    """The init for ``--init`` (Debian's tini, static so that it runs in any image)."""
    for p in INIT_PATHS:
        if os.access(p, os.X_OK):
            return p
    raise InvalidArgument(
        "--init: no init binary found (looked for " + ", ".join(INIT_PATHS) + "; "
        "install Debian's tini package)"
    )


def resolve_groups(rootfs: Path, groups: list[str] | None) -> list[int]:
    """``--group-add`` names or gids, names looked up in the container's /etc/group."""
    out: list[int] = []
    entries = _read_db(rootfs / "etc/group")
    for g in groups or []:
        if g.isdigit():
            out.append(int(g))
            continue
        match = next((e for e in entries if len(e) >= 3 and e[0] == g), None)
        if match is None or not match[2].isdigit():
            raise InvalidArgument(f"Unable to find group {g}: no matching entries in group file")
        out.append(int(match[2]))
    return out


def resources_for(host_config: dict[str, Any]) -> Resources:
    """OCI ``linux.resources`` from HostConfig (what ``update`` changes, too)."""
    resources = Resources()
    mem: dict[str, int] = {}
    memory = int(host_config.get("Memory") or 0)
    swap = int(host_config.get("MemorySwap") or 0)
    if memory:
        mem["limit"] = memory
        # Docker: no --memory-swap means as much swap as memory (memsw = 2 x memory)
        mem["swap"] = swap if swap else 2 * memory
    if host_config.get("MemoryReservation"):
        mem["reservation"] = int(host_config["MemoryReservation"])
    swappiness = host_config.get("MemorySwappiness")
    if swappiness is not None and swappiness >= 0:
        mem["swappiness"] = int(swappiness)
    if host_config.get("OomKillDisable"):
        mem["disableOOMKiller"] = 1
    resources.memory = mem or None
    pids = host_config.get("PidsLimit")
    if pids is not None and pids != 0:
        resources.pids = {"limit": int(pids) if pids > 0 else -1}
    cpu: dict[str, Any] = {}
    if host_config.get("CpuShares"):
        cpu["shares"] = int(host_config["CpuShares"])
    if host_config.get("NanoCpus"):
        cpu["period"] = 100000
        cpu["quota"] = int(host_config["NanoCpus"]) * 100000 // 1_000_000_000
    else:
        if host_config.get("CpuPeriod"):
            cpu["period"] = int(host_config["CpuPeriod"])
        if host_config.get("CpuQuota"):
            cpu["quota"] = int(host_config["CpuQuota"])
    if host_config.get("CpusetCpus"):
        cpu["cpus"] = host_config["CpusetCpus"]
    if host_config.get("CpusetMems"):
        cpu["mems"] = host_config["CpusetMems"]
    resources.cpu = cpu or None
    if host_config.get("BlkioWeight"):
        resources.blockIO = {"weight": int(host_config["BlkioWeight"])}
    return resources


def console_size(size: Any) -> dict[str, int] | None:
    """Docker's ``ConsoleSize`` ``[height, width]`` as OCI ``process.consoleSize``."""
    if isinstance(size, list | tuple) and len(size) == 2 and all(size):
        return {"height": int(size[0]), "width": int(size[1])}
    return None


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
    network_namespace: str = "new",
) -> Spec:
    """The OCI spec for one container; ``rootfs`` (mounted) is read for user lookup.
    ``network_namespace``: ``new``, ``host`` (none of its own) or another's netns path.
    Raises InvalidArgument (bad user, group, device, profile...)."""
    oci_user, home = resolve_user(rootfs, user)
    extra_gids = resolve_groups(rootfs, host_config.get("GroupAdd"))
    oci_user.additionalGids = sorted(set(oci_user.additionalGids) | set(extra_gids))
    keys = {e.partition("=")[0] for e in env}
    full_env = list(env)
    if "PATH" not in keys:
        full_env.insert(0, f"PATH={DEFAULT_PATH}")
    full_env.insert(1 if "PATH" not in keys else 0, f"HOSTNAME={hostname}")
    if "HOME" not in keys:
        full_env.append(f"HOME={home}")
    if tty and "TERM" not in keys:
        full_env.append("TERM=xterm")
    privileged = bool(host_config.get("Privileged"))
    try:
        caps = container_capabilities(
            host_config.get("CapAdd"), host_config.get("CapDrop"), privileged
        )
        secopts = parse_security_opts(host_config.get("SecurityOpt"))
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    resources = resources_for(host_config)
    devices, rules = devices_for(host_config)
    resources.devices = rules
    shm = int(host_config.get("ShmSize") or 64 * 1024 * 1024)
    user_mounts = [tmpfs_mount(t, o) for t, o in (host_config.get("Tmpfs") or {}).items()]
    user_mounts += extra_mounts
    taken = {m.destination.rstrip("/") or "/" for m in user_mounts}
    mounts = [m for m in default_mounts(shm, privileged) if m.destination not in taken]
    # parents before children, as Docker sorts them
    mounts += sorted(user_mounts, key=lambda m: len(Path(m.destination).parts))
    if host_config.get("Init"):
        mounts.append(
            Mount(
                destination=INIT_IN_CONTAINER,
                type="bind",
                source=init_binary(),
                options=["bind", "ro", "nosuid", "nodev"],
            )
        )
        args = [INIT_IN_CONTAINER, "--", *args]
    unconfined_paths = privileged or secopts.systempaths_unconfined
    sysctls = {str(k): str(v) for k, v in (host_config.get("Sysctls") or {}).items()}
    return Spec(
        process=Process(
            terminal=tty,
            consoleSize=console_size(host_config.get("ConsoleSize")) if tty else None,
            user=oci_user,
            args=args,
            env=full_env,
            cwd=cwd or "/",
            capabilities=Capabilities(bounding=caps, effective=caps, permitted=caps),
            rlimits=rlimits_for(host_config.get("Ulimits")),
            noNewPrivileges=secopts.no_new_privileges,
            oomScoreAdj=int(host_config.get("OomScoreAdj") or 0) or None,
        ),
        root=Root(path=str(rootfs), readonly=bool(host_config.get("ReadonlyRootfs"))),
        hostname=hostname,
        mounts=mounts,
        linux=Linux(
            namespaces=[
                Namespace(
                    type=t,
                    path=network_namespace if t == "network" and "/" in network_namespace else None,
                )
                for t in ("pid", "network", "ipc", "uts", "mount")
                if not (t == "network" and network_namespace == "host")
            ],
            cgroupsPath=f"{cgroup_parent.rstrip('/')}/{container_id}",
            resources=resources,
            devices=devices,
            maskedPaths=[] if unconfined_paths else list(MASKED_PATHS),
            readonlyPaths=[] if unconfined_paths else list(READONLY_PATHS),
            seccomp=seccomp_for(secopts, caps, privileged),
            sysctl=sysctls or None,
        ),
    )
