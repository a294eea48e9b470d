"""Pydantic models of the API bodies pallet reads (Docker Engine API v1.44 names).

Models accept fields they do not know (clients send many, some only for other
platforms) but check the type of every field they declare, so a wrong type is a 400
naming the field rather than a failure deep inside a job.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pallet.errors import InvalidArgument
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

StrList = list[str] | None


def _str_or_list(v: Any) -> Any:
    # Docker accepts Cmd/Entrypoint as a string (shell form) or a list.
    if isinstance(v, str):
        return [v]
    return v


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class RestartPolicySpec(_Model):
    Name: str = ""
    MaximumRetryCount: int = 0


RESTART_POLICIES = ("", "no", "always", "on-failure", "unless-stopped")


class DeviceSpec(_Model):
    PathOnHost: str
    PathInContainer: str = ""
    CgroupPermissions: str = "rwm"


class UlimitSpec(_Model):
    Name: str
    Soft: int
    Hard: int


class ResourcesSpec(_Model):
    """The resource fields of HostConfig; also the body of ``POST /containers/{id}/update``."""

    Memory: int = Field(0, ge=0)
    MemorySwap: int = 0
    MemoryReservation: int = Field(0, ge=0)
    MemorySwappiness: int | None = None
    KernelMemory: int = 0
    OomKillDisable: bool | None = None
    NanoCpus: int = Field(0, ge=0)
    CpuShares: int = Field(0, ge=0)
    CpuQuota: int = 0
    CpuPeriod: int = 0
    CpusetCpus: str = ""
    CpusetMems: str = ""
    PidsLimit: int | None = None
    BlkioWeight: int = Field(0, ge=0)
    Devices: list[DeviceSpec] | None = None
    DeviceCgroupRules: StrList = None
    Ulimits: list[UlimitSpec] | None = None

    def check_resources(self, update: bool = False) -> None:
        """Docker's checks and messages (moby ``verifyPlatformContainerResources``)."""
        check_resources(self, update)


class HostConfigSpec(ResourcesSpec):
    AutoRemove: bool = False
    Runtime: str | None = None
    Binds: StrList = None
    Mounts: list[dict[str, Any]] | None = None
    Tmpfs: dict[str, str] | None = None
    NetworkMode: str = ""
    Privileged: bool = False
    ReadonlyRootfs: bool = False
    Init: bool | None = None
    RestartPolicy: RestartPolicySpec | None = None
    CapAdd: StrList = None
    CapDrop: StrList = None
    SecurityOpt: StrList = None
    GroupAdd: StrList = None
    OomScoreAdj: int = 0
    Sysctls: dict[str, str] | None = None
    ExtraHosts: StrList = None
    Dns: StrList = None
    ShmSize: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _docker_checks(self) -> HostConfigSpec:
        # InvalidArgument (not ValueError) passes through pydantic: Docker's exact text.
        from pallet.spec import normalize_capabilities, parse_security_opts

        self.check_resources()
        if self.Memory and not self.MemorySwap and _swap_limit_supported():
            self.MemorySwap = 2 * self.Memory  # Docker's default: as much swap as memory
        for field, value in (("CapAdd", self.CapAdd), ("CapDrop", self.CapDrop)):
            try:
                normalize_capabilities(value)
            except ValueError as e:
                raise InvalidArgument(f"invalid {field}: {e}") from None
        try:
            opts = parse_security_opts(self.SecurityOpt)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        if opts.seccomp not in ("default", "unconfined"):
            from pallet.seccomp import parse_profile

            try:
                data = json.loads(opts.seccomp)
            except json.JSONDecodeError as e:
                raise InvalidArgument(f"Decoding seccomp profile failed: {e}") from None
            parse_profile(data, "--security-opt seccomp")
        if not -1000 <= self.OomScoreAdj <= 1000:
            raise InvalidArgument(
                f"Invalid value {self.OomScoreAdj}, range for oom score adj is [-1000, 1000]"
            )
        for d in self.Devices or []:
            if not os.path.exists(d.PathOnHost):
                raise InvalidArgument(
                    "error gathering device information while adding custom device "
                    f'"{d.PathOnHost}": no such file or directory'
                )
        for target in self.Tmpfs or {}:
            if not target.startswith("/"):
                raise InvalidArgument(
                    f"invalid mount config for type \"tmpfs\": invalid mount path: '{target}' mount path must be absolute"
                )
        check_restart_policy(self.RestartPolicy, self.AutoRemove)
        return self


def _swap_limit_supported() -> bool:
    """Whether the kernel limits swap (v1 memsw files, or cgroup v2), as Docker's
    sysinfo.SwapLimit."""
    from pallet.cgroups import hierarchies

    hier = hierarchies()
    if hier.mode == "v2":
        return True
    mem = hier.v1.get(hier.controllers.get("memory", ""), "")
    return bool(mem) and os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes"))


def check_restart_policy(policy: RestartPolicySpec | None, auto_remove: bool) -> None:
    if policy is None:
        return
    name = policy.Name
    if name not in RESTART_POLICIES:
        raise InvalidArgument(
            f"invalid restart policy: unknown policy '{name}'; use one of 'no', 'always', "
            "'on-failure', or 'unless-stopped'"
        )
    if auto_remove and name not in ("", "no"):
        raise InvalidArgument("can't create 'AutoRemove' container with restart policy")
    if policy.MaximumRetryCount < 0:
        raise InvalidArgument("invalid restart policy: maximum retry count cannot be negative")
    if policy.MaximumRetryCount and name != "on-failure":
        raise InvalidArgument(
            "invalid restart policy: maximum retry count can only be used with 'on-failure'"
        )


def _cpuset(value: str) -> set[int] | None:
    """``0-2,4`` -> {0, 1, 2, 4}; None if malformed."""
    out: set[int] = set()
    for part in value.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            return None
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            return None
        out.update(range(a, b + 1))
    return out


def check_resources(r: ResourcesSpec, update: bool = False) -> None:
    if r.Memory and r.Memory < 6 * 1024 * 1024:
        raise InvalidArgument("Minimum memory limit allowed is 6MB")
    if not update and r.MemorySwap and not r.Memory and r.MemorySwap != -1:
        raise InvalidArgument(
            "You should always set the Memory limit when using Memoryswap limit, see usage"
        )
    if r.Memory and r.MemorySwap > 0 and r.MemorySwap < r.Memory:
        raise InvalidArgument(
            "Minimum memoryswap limit should be larger than memory limit, see usage"
        )
    if r.MemorySwap < -1:
        raise InvalidArgument(f"invalid MemorySwap: {r.MemorySwap}")
    if r.Memory and r.MemoryReservation and r.Memory < r.MemoryReservation:
        raise InvalidArgument(
            "Minimum memory limit can not be less than memory reservation limit, see usage"
        )
    if r.MemorySwappiness is not None and r.MemorySwappiness != -1:
        if not 0 <= r.MemorySwappiness <= 100:
            raise InvalidArgument(
                f"Invalid value: {r.MemorySwappiness}, valid memory swappiness range is 0-100"
            )
    if r.NanoCpus and r.CpuPeriod:
        raise InvalidArgument("Conflicting options: Nano CPUs and CPU Period cannot both be set")
    if r.NanoCpus and r.CpuQuota:
        raise InvalidArgument("Conflicting options: Nano CPUs and CPU Quota cannot both be set")
    ncpu = os.cpu_count() or 1
    if r.NanoCpus and (r.NanoCpus < 10_000_000 or r.NanoCpus > ncpu * 1_000_000_000):
        raise InvalidArgument(
            f"Range of CPUs is from 0.01 to {ncpu}.00, as there are only {ncpu} CPUs available"
        )
    if r.CpuPeriod and not 1000 <= r.CpuPeriod <= 1_000_000:
        raise InvalidArgument(
            "CPU cfs period can not be less than 1ms (i.e. 1000) or larger than 1s (i.e. 1000000)"
        )
    if r.CpuQuota and 0 < r.CpuQuota < 1000:
        raise InvalidArgument("CPU cfs quota can not be less than 1ms (i.e. 1000)")
    if r.CpusetCpus:
        cpus = _cpuset(r.CpusetCpus)
        if cpus is None:
            raise InvalidArgument(f"Invalid value {r.CpusetCpus} for cpuset cpus")
        available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        if available and not cpus <= available:
            have = ",".join(str(c) for c in sorted(available))
            raise InvalidArgument(
                f"Requested CPUs are not available - requested {r.CpusetCpus}, available: {have}"
            )
    if r.CpusetMems and _cpuset(r.CpusetMems) is None:
        raise InvalidArgument(f"Invalid value {r.CpusetMems} for cpuset mems")
    if r.BlkioWeight and not 10 <= r.BlkioWeight <= 1000:
        raise InvalidArgument("Range of blkio weight is from 10 to 1000")
    for u in r.Ulimits or []:
        from pallet.spec import RLIMITS

        if u.Name not in RLIMITS:
            raise InvalidArgument(f"invalid ulimit type: {u.Name}")
        if u.Hard != -1 and u.Soft > u.Hard:
            raise InvalidArgument(
                f"ulimit soft limit must be less than or equal to hard limit: {u.Soft} > {u.Hard}"
            )
    for rule in r.DeviceCgroupRules or []:
        from pallet.spec import parse_device_cgroup_rule

        parse_device_cgroup_rule(rule)


class UpdateConfig(ResourcesSpec):
    """Body of ``POST /containers/{id}/update``."""

    RestartPolicy: RestartPolicySpec | None = None


class ContainerCreate(_Model):
    """Body of ``POST /containers/create``: a ContainerConfig plus HostConfig."""

    Hostname: str = ""
    Domainname: str = ""
    User: str = ""
    AttachStdin: bool = False
    AttachStdout: bool = True
    AttachStderr: bool = True
    Tty: bool = False
    OpenStdin: bool = False
    StdinOnce: bool = False
    Env: StrList = None
    Cmd: StrList = None
    Entrypoint: StrList = None
    Image: str = ""
    Labels: dict[str, str] | None = None
    WorkingDir: str = ""
    StopSignal: str | None = None
    StopTimeout: int | None = None
    ExposedPorts: dict[str, Any] | None = None
    Volumes: dict[str, Any] | None = None
    HostConfig: HostConfigSpec = Field(default_factory=lambda: HostConfigSpec())
    NetworkingConfig: dict[str, Any] | None = None

    _cmd = field_validator("Cmd", "Entrypoint", mode="before")(_str_or_list)

    @field_validator("Env")
    @classmethod
    def _env(cls, v: StrList) -> StrList:
        for item in v or []:
            if not item or item.startswith("="):
                raise ValueError(f"invalid environment variable: {item!r}")
        return v


def parse_body(model: type[BaseModel], body: Any, what: str) -> Any:
    """Validate a JSON body; errors name the field, as a 400."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InvalidArgument(f"{what}: expected a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidArgument(f"{what}: {field}: {first['msg']}") from None
