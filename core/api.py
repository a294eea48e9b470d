"""Pydantic models of the API bodies pallet reads (Docker Engine API v1.44 names).

Models accept fields they do not know (clients send many, some only for other
platforms) but check the type of every field they declare, so a wrong type is a 400
naming the field rather than a failure deep inside a job.
"""

from __future__ import annotations

from typing import Any

from pallet.errors import InvalidArgument
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


class HostConfigSpec(_Model):
    AutoRemove: bool = False
    Runtime: str | None = None
    Binds: StrList = None
    NetworkMode: str = ""
    Privileged: bool = False
    ReadonlyRootfs: bool = False
    Memory: int = Field(0, ge=0)
    MemorySwap: int = 0
    NanoCpus: int = Field(0, ge=0)
    CpuShares: int = Field(0, ge=0)
    CpuQuota: int = 0
    CpuPeriod: int = 0
    CpusetCpus: str = ""
    PidsLimit: int | None = None
    Init: bool | None = None
    RestartPolicy: RestartPolicySpec | None = None
    CapAdd: StrList = None
    CapDrop: StrList = None
    ExtraHosts: StrList = None
    Dns: StrList = None
    ShmSize: int = Field(0, ge=0)


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
