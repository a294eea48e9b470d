"""``run``/``create`` flags for hardening, resources, mounts and restart policies, and
their translation into the create body, as the docker CLI sends them.

Kept apart from :mod:`pallet.cli.containers` (which adds these options to its commands
with :func:`host_options` and merges :func:`host_config_from_flags` into its body).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def ram_in_bytes(value: str, flag: str) -> int:
    """docker's ``RAMInBytes``: ``100m``, ``1.5g``, ``512k``, ``1024`` (``-1`` allowed)."""
    text = value.strip().lower()
    if text == "-1":
        return -1
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]?)b?", text)
    if not m:
        raise click.BadParameter(f"invalid size: '{value}'", param_hint=flag)
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _opt(*decls: str, **kw: Any) -> Callable[[F], F]:
    return click.option(*decls, **kw)


OPTIONS = [
    _opt("--cap-add", "cap_add", multiple=True, help="Add Linux capabilities."),
    _opt("--cap-drop", "cap_drop", multiple=True, help="Drop Linux capabilities."),
    _opt("--security-opt", "security_opt", multiple=True, help="Security Options."),
    _opt("--read-only", "read_only", is_flag=True, help="Mount the root filesystem read-only."),
    _opt("--device", "devices", multiple=True, help="Add a host device to the container."),
    _opt(
        "--device-cgroup-rule",
        "device_cgroup_rules",
        multiple=True,
        help="Add a rule to the cgroup allowed devices list.",
    ),
    _opt("--tmpfs", "tmpfs", multiple=True, help="Mount a tmpfs directory."),
    _opt("-v", "--volume", "volumes", multiple=True, help="Bind mount a volume."),
    _opt("--mount", "mounts", multiple=True, help="Attach a filesystem mount to the container."),
    _opt("--init", "init", is_flag=True, default=None, help="Run an init inside the container."),
    _opt("-m", "--memory", "memory", help="Memory limit."),
    _opt(
        "--memory-swap",
        "memory_swap",
        help="Swap limit equal to memory plus swap: -1 for unlimited.",
    ),
    _opt("--memory-reservation", "memory_reservation", help="Memory soft limit."),
    _opt(
        "--memory-swappiness",
        "memory_swappiness",
        type=int,
        help="Tune container memory swappiness (0 to 100).",
    ),
    _opt(
        "--oom-kill-disable",
        "oom_kill_disable",
        is_flag=True,
        default=None,
        help="Disable OOM Killer.",
    ),
    _opt(
        "--oom-score-adj",
        "oom_score_adj",
        type=int,
        help="Tune host's OOM preferences (-1000 to 1000).",
    ),
    _opt("--cpus", "cpus", help="Number of CPUs."),
    _opt("-c", "--cpu-shares", "cpu_shares", type=int, help="CPU shares (relative weight)."),
    _opt("--cpu-period", "cpu_period", type=int, help="Limit CPU CFS period."),
    _opt("--cpu-quota", "cpu_quota", type=int, help="Limit CPU CFS quota."),
    _opt("--cpuset-cpus", "cpuset_cpus", help="CPUs in which to allow execution (0-3, 0,1)."),
    _opt("--cpuset-mems", "cpuset_mems", help="MEMs in which to allow execution (0-3, 0,1)."),
    _opt(
        "--pids-limit", "pids_limit", type=int, help="Tune container pids limit (-1 for unlimited)."
    ),
    _opt(
        "--blkio-weight",
        "blkio_weight",
        type=int,
        help="Block IO (relative weight), between 10 and 1000.",
    ),
    _opt("--restart", "restart", help="Restart policy to apply when a container exits."),
    _opt("--ulimit", "ulimits", multiple=True, help="Ulimit options."),
    _opt("--group-add", "group_add", multiple=True, help="Add additional groups to join."),
    _opt("--shm-size", "shm_size", help="Size of /dev/shm."),
    _opt("--sysctl", "sysctls", multiple=True, help="Sysctl options."),
]


def host_options(f: F) -> F:
    """Decorate a command with every option above."""
    for option in reversed(OPTIONS):
        f = option(f)
    return f


def parse_restart(value: str) -> dict[str, Any]:
    """``on-failure:3`` -> RestartPolicy (the daemon checks the name)."""
    name, _, count = value.partition(":")
    if count and not count.isdigit():
        raise click.BadParameter(f"invalid restart policy format: {value}", param_hint="--restart")
    if count and name != "on-failure":
        raise click.BadParameter(
            "invalid restart policy format: maximum retry count can only be used with 'on-failure'",
            param_hint="--restart",
        )
    return {"Name": name, "MaximumRetryCount": int(count or 0)}


def parse_ulimit(value: str) -> dict[str, Any]:
    name, sep, limits = value.partition("=")
    if not sep:
        raise click.BadParameter(f"invalid ulimit argument: {value}", param_hint="--ulimit")
    soft, _, hard = limits.partition(":")
    try:
        s = int(soft)
        h = int(hard) if hard else s
    except ValueError:
        raise click.BadParameter(
            f"invalid ulimit argument: {value}", param_hint="--ulimit"
        ) from None
    return {"Name": name, "Soft": s, "Hard": h}


def parse_device(value: str) -> dict[str, str]:
    """``/dev/x[:/dev/y][:rwm]``."""
    parts = value.split(":")
    src = parts[0]
    dst, perms = src, "rwm"
    if len(parts) == 2:
        if re.fullmatch(r"[rwm]{1,3}", parts[1]):
            perms = parts[1]
        else:
            dst = parts[1]
    elif len(parts) == 3:
        dst, perms = parts[1], parts[2]
    elif len(parts) > 3:
        raise click.BadParameter(f"invalid device specification: {value}", param_hint="--device")
    if not re.fullmatch(r"[rwm]{1,3}", perms):
        raise click.BadParameter(f"invalid device mode: {perms}", param_hint="--device")
    return {"PathOnHost": src, "PathInContainer": dst, "CgroupPermissions": perms}


def _bool(value: str) -> bool:
    if value.lower() in ("", "1", "true"):
        return True
    if value.lower() in ("0", "false"):
        return False
    raise click.BadParameter(f"invalid boolean value {value!r}", param_hint="--mount")


def parse_mount(value: str) -> dict[str, Any]:
    """``type=bind,source=/a,target=/b,readonly`` -> an API Mount."""
    m: dict[str, Any] = {"Type": "volume"}
    for field in [f for f in value.split(",") if f]:
        key, sep, val = field.partition("=")
        key = key.strip().lower()
        if key == "type":
            m["Type"] = val
        elif key in ("source", "src"):
            m["Source"] = val
        elif key in ("target", "destination", "dst"):
            m["Target"] = val
        elif key in ("readonly", "ro"):
            m["ReadOnly"] = _bool(val if sep else "")
        elif key == "bind-propagation":
            m.setdefault("BindOptions", {})["Propagation"] = val
        elif key == "volume-nocopy":
            m.setdefault("VolumeOptions", {})["NoCopy"] = _bool(val if sep else "")
        elif key == "volume-label":
            k, _, v = val.partition("=")
            m.setdefault("VolumeOptions", {}).setdefault("Labels", {})[k] = v
        elif key == "tmpfs-size":
            m.setdefault("TmpfsOptions", {})["SizeBytes"] = ram_in_bytes(val, "--mount")
        elif key == "tmpfs-mode":
            m.setdefault("TmpfsOptions", {})["Mode"] = int(val, 8)
        else:
            raise click.BadParameter(f"unexpected key '{key}' in '{field}'", param_hint="--mount")
    return m


def _seccomp_opt(opt: str) -> str:
    """docker's CLI sends the profile's content, not its path."""
    key, sep, value = opt.partition("=")
    if key != "seccomp" or not sep or value in ("unconfined", "builtin"):
        return opt
    try:
        with open(value, "rb") as f:
            data = json.loads(f.read())
    except OSError as e:
        raise click.BadParameter(
            f"opening seccomp profile ({value}) failed: open {value}: {(e.strerror or str(e)).lower()}",
            param_hint="--security-opt",
        ) from None
    except json.JSONDecodeError as e:
        raise click.BadParameter(
            f"decoding seccomp profile ({value}) failed: {e}", param_hint="--security-opt"
        ) from None
    return "seccomp=" + json.dumps(data, separators=(",", ":"))


def host_config_from_flags(opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HostConfig fields, container Config fields) from the parsed options."""
    hc: dict[str, Any] = {}
    cfg: dict[str, Any] = {}
    if opts.get("cap_add"):
        hc["CapAdd"] = list(opts["cap_add"])
    if opts.get("cap_drop"):
        hc["CapDrop"] = list(opts["cap_drop"])
    if opts.get("security_opt"):
        hc["SecurityOpt"] = [_seccomp_opt(o) for o in opts["security_opt"]]
    if opts.get("read_only"):
        hc["ReadonlyRootfs"] = True
    if opts.get("devices"):
        hc["Devices"] = [parse_device(d) for d in opts["devices"]]
    if opts.get("device_cgroup_rules"):
        hc["DeviceCgroupRules"] = list(opts["device_cgroup_rules"])
    if opts.get("tmpfs"):
        tmpfs = {}
        for t in opts["tmpfs"]:
            path, _, o = t.partition(":")
            tmpfs[path] = o
        hc["Tmpfs"] = tmpfs
    binds: list[str] = []
    anonymous: dict[str, Any] = {}
    for v in opts.get("volumes") or ():
        if ":" in v:
            src, sep, rest = v.partition(":")
            if src in (".", "..") or src.startswith(("./", "../")):
                import os

                v = os.path.abspath(src) + sep + rest  # docker >= 23 takes relative paths
            binds.append(v)
        else:
            anonymous[v] = {}
    if binds:
        hc["Binds"] = binds
    if anonymous:
        cfg["Volumes"] = anonymous
    if opts.get("mounts"):
        hc["Mounts"] = [parse_mount(m) for m in opts["mounts"]]
    if opts.get("init"):
        hc["Init"] = True
    for flag, key in (
        ("memory", "Memory"),
        ("memory_swap", "MemorySwap"),
        ("memory_reservation", "MemoryReservation"),
        ("shm_size", "ShmSize"),
    ):
        if opts.get(flag):
            hc[key] = ram_in_bytes(opts[flag], "--" + flag.replace("_", "-"))
    for flag, key in (
        ("memory_swappiness", "MemorySwappiness"),
        ("oom_score_adj", "OomScoreAdj"),
        ("cpu_shares", "CpuShares"),
        ("cpu_period", "CpuPeriod"),
        ("cpu_quota", "CpuQuota"),
        ("pids_limit", "PidsLimit"),
        ("blkio_weight", "BlkioWeight"),
        ("cpuset_cpus", "CpusetCpus"),
        ("cpuset_mems", "CpusetMems"),
    ):
        if opts.get(flag) is not None:
            hc[key] = opts[flag]
    if opts.get("oom_kill_disable"):
        hc["OomKillDisable"] = True
    if opts.get("cpus"):
        try:
            hc["NanoCpus"] = round(float(opts["cpus"]) * 1e9)
        except ValueError:
            raise click.BadParameter(
                f'invalid argument "{opts["cpus"]}"', param_hint="--cpus"
            ) from None
    if opts.get("restart"):
        hc["RestartPolicy"] = parse_restart(opts["restart"])
    if opts.get("ulimits"):
        hc["Ulimits"] = [parse_ulimit(u) for u in opts["ulimits"]]
    if opts.get("group_add"):
        hc["GroupAdd"] = list(opts["group_add"])
    if opts.get("sysctls"):
        hc["Sysctls"] = dict(s.partition("=")[::2] for s in opts["sysctls"])
    return hc, cfg
