"""The daemon's configuration: one pydantic model, read from a JSON file whose keys are
those of Docker's ``daemon.json`` where the meaning is the same, overridden by flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG_FILE = Path("/etc/pallet/daemon.json")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the source, key and reason."""


class Runtime(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    runtimeArgs: list[str] = Field(default_factory=list)


class AddressPool(BaseModel):
    """One of ``default-address-pools``: subnets of ``size`` bits carved from ``base``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base: str
    size: int = Field(ge=1, le=30)

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        import ipaddress

        try:
            ipaddress.IPv4Network(v, strict=False)
        except ValueError as e:
            raise ValueError(f"{v!r} is not an IPv4 network: {e}") from None
        return v

    def __getitem__(self, key: str) -> str | int:
        return str(self.base) if key == "base" else int(self.size)


class DaemonConfig(BaseModel):
    """Keys as in ``daemon.json``; Python names are the snake_case of the JSON keys."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    data_root: Path = Field(Path("/var/lib/pallet"), alias="data-root")
    exec_root: Path = Field(Path("/run/pallet"), alias="exec-root")
    hosts: list[str] = Field(default_factory=lambda: ["unix:///run/pallet.sock"])
    socket_mode: int = Field(0o660, alias="socket-mode", ge=0, le=0o777)
    group: str | None = None
    storage_driver: str | None = Field(None, alias="storage-driver")
    storage_opts: list[str] = Field(default_factory=list, alias="storage-opts")
    default_runtime: str = Field("native", alias="default-runtime")
    cgroup_parent: str = Field("/pallet", alias="cgroup-parent")
    runtimes: dict[str, Runtime] = Field(default_factory=dict)
    log_level: Literal["debug", "info", "warn", "error", "fatal"] = Field("info", alias="log-level")
    live_restore: bool = Field(True, alias="live-restore")
    bip: str | None = None
    iptables: bool = True
    bridge: str = Field("pallet0", pattern=r"^[a-zA-Z0-9_.-]{1,15}$")  # the default bridge
    mtu: int = Field(1500, ge=68, le=65535)
    ip_forward: bool = Field(True, alias="ip-forward")
    default_address_pools: list[AddressPool] = Field(
        default_factory=list, alias="default-address-pools"
    )
    dns: list[str] = Field(default_factory=list)  # upstream resolvers for containers
    insecure_registries: list[str] = Field(default_factory=list, alias="insecure-registries")
    registry_mirrors: list[str] = Field(default_factory=list, alias="registry-mirrors")
    disabled_plugins: list[str] = Field(default_factory=list, alias="disabled-plugins")
    debug: bool = False

    @field_validator("data_root", "exec_root")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"must be an absolute path, got {str(v)!r}")
        return v

    @field_validator("bip")
    @classmethod
    def _bip(cls, v: str | None) -> str | None:
        import ipaddress

        if v is None:
            return v
        try:
            iface = ipaddress.IPv4Interface(v)
        except ValueError:
            raise ValueError(
                f"expected an address with its prefix like 172.17.0.1/16, got {v!r}"
            ) from None
        if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
            raise ValueError(f"{v!r}: the bridge address must be a host address of its subnet")
        return v

    @field_validator("cgroup_parent")
    @classmethod
    def _cgroup_parent(cls, v: str) -> str:
        if not v.startswith("/") or ".." in v.split("/"):
            raise ValueError(f"must be an absolute cgroup path like /pallet, got {v!r}")
        return v.rstrip("/") or "/"

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one address, e.g. unix:///run/pallet.sock")
        for h in v:
            if h.startswith("unix://"):
                if not h[len("unix://") :].startswith("/"):
                    raise ValueError(f"{h!r}: a unix socket path must be absolute")
            elif h.startswith("tcp://"):
                hostport = h[len("tcp://") :]
                _host, sep, port = hostport.rpartition(":")
                if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                    raise ValueError(f"{h!r}: expected tcp://HOST:PORT")
            else:
                raise ValueError(f"{h!r}: expected unix:///path or tcp://host:port")
        return v

    @field_validator("storage_opts")
    @classmethod
    def _opts(cls, v: list[str]) -> list[str]:
        for o in v:
            if "=" not in o:
                raise ValueError(f"{o!r}: expected KEY=VALUE")
        return v

    def storage_options(self) -> dict[str, str]:
        """``storage-opts`` as a dict; the driver validates the keys with its own model."""
        return dict(o.split("=", 1) for o in self.storage_opts)


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (see the README's list of configuration keys)"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> DaemonConfig:
    """Read ``path`` (JSON; absent default file = defaults), apply flag overrides.

    Raises :class:`ConfigError` naming the file, the key and the reason.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            if path != DEFAULT_CONFIG_FILE:
                raise ConfigError(f"{path}: no such file") from None
            text = "{}"
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
    if overrides:
        source = f"{source} with command-line flags" if path else "command-line flags"
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return DaemonConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None
