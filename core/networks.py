"""The network service: networks, IPAM, endpoints, published ports, embedded DNS.

Records (networks, endpoints, address leases) live in SQLite (``network/network.db``
under the data root), changed in transactions, so an allocation is either wholly made
or not at all and survives a daemon crash. The drivers (:mod:`pallet.network`) are
handed complete descriptions and make them real on the host.

A container's endpoints live while it runs, as in Docker: ``prepare`` (before the
container's process exists) allocates addresses, MACs and host ports; ``attach`` (the
process exists, not started) joins its network namespace; ``release`` (exit, failed
start, removal) undoes all of it. At daemon start, endpoints of containers that still
run are re-adopted (ports reserved again, DNS served again, rules rebuilt); the others
are cleaned.

Published ports: the daemon holds a socket bound to each host port (so a port in use
is refused, as Docker's proxy does), and nftables DNAT carries the traffic, including
from the host's own 127.0.0.1 (``route_localnet`` on the bridge).

Containers on user-defined networks get Docker's embedded DNS: a UDP socket the daemon
creates inside the container's namespace on 127.0.0.11:53. It answers the names and
aliases of containers on the networks the asking container shares, and forwards other
questions to the host's resolvers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import re
import secrets
import socket
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pallet.errors import Conflict, Forbidden, Internal, InvalidArgument, NotFound
from pallet.logs import now_rfc3339
from pallet.network import (
    DriverSettings,
    EndpointInfo,
    NetworkDriver,
    NetworkInfo,
    PortMapping,
    run_in_netns,
)
from pallet.store import Store
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from pallet.containers import Container
    from pallet.daemon import Daemon

log = logging.getLogger("pallet.networks")

PREDEFINED = ("bridge", "host", "none")
DNS_ADDRESS = "127.0.0.11"
DEFAULT_POOLS: list[dict[str, Any]] = [
    *({"base": f"172.{n}.0.0/16", "size": 16} for n in range(17, 32)),
    {"base": "192.168.0.0/16", "size": 20},
]
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS networks (
        id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, doc TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS endpoints (
        id TEXT PRIMARY KEY, network_id TEXT NOT NULL REFERENCES networks(id),
        container_id TEXT NOT NULL, doc TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS leases (
        network_id TEXT NOT NULL REFERENCES networks(id), address TEXT NOT NULL,
        endpoint_id TEXT NOT NULL, PRIMARY KEY (network_id, address))""",
]


# --- API bodies and records ------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class IPAMPool(_Body):
    Subnet: str = ""
    Gateway: str = ""
    IPRange: str = ""
    AuxiliaryAddresses: dict[str, str] | None = None


class IPAMSpec(_Body):
    Driver: str = "default"
    Config: list[IPAMPool] | None = None
    Options: dict[str, str] | None = None


class NetworkCreate(_Body):
    """Body of ``POST /networks/create``."""

    Name: str
    Driver: str = "bridge"
    Internal: bool = False
    Attachable: bool = False
    EnableIPv6: bool | None = None
    CheckDuplicate: bool | None = None
    IPAM: IPAMSpec | None = None
    Options: dict[str, str] | None = None
    Labels: dict[str, str] | None = None


class EndpointIPAM(_Body):
    IPv4Address: str = ""
    IPv6Address: str = ""


class EndpointSpec(_Body):
    IPAMConfig: EndpointIPAM | None = None
    Aliases: list[str] | None = None
    MacAddress: str = ""


class NetworkConnect(_Body):
    Container: str
    EndpointConfig: EndpointSpec | None = None


class NetworkDisconnect(_Body):
    Container: str
    Force: bool = False


class NetworkRecord(BaseModel):
    """A network as stored."""

    id: str
    name: str
    driver: str
    created: str
    subnet: str = ""
    gateway: str = ""
    internal: bool = False
    attachable: bool = False
    bridge: str = ""
    mtu: int = 1500
    options: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    ipam_options: dict[str, str] = Field(default_factory=dict)
    ip_range: str = ""  # addresses are allocated from here (default: the whole subnet)
    predefined: bool = False

    @property
    def prefixlen(self) -> int:
        return int(self.subnet.split("/")[1]) if self.subnet else 0

    def info(self) -> NetworkInfo:
        return NetworkInfo(
            id=self.id,
            name=self.name,
            driver=self.driver,
            subnet=self.subnet,
            gateway=self.gateway,
            internal=self.internal,
            bridge=self.bridge,
            mtu=self.mtu,
            options=dict(self.options),
        )


class PortRecord(BaseModel):
    proto: str
    container_port: int
    host_ip: str
    host_port: int


class EndpointRecord(BaseModel):
    """An endpoint as stored (exists while its container runs)."""

    id: str
    network_id: str
    container_id: str
    ifname: str = "eth0"
    address: str = ""
    prefixlen: int = 0
    gateway: str = ""
    mac: str = ""
    mtu: int = 1500
    host_ifname: str = ""
    aliases: list[str] = Field(default_factory=list)
    ports: list[PortRecord] = Field(default_factory=list)
    joined: bool = False

    def info(self) -> EndpointInfo:
        return EndpointInfo(
            id=self.id,
            network_id=self.network_id,
            container_id=self.container_id,
            ifname=self.ifname,
            address=self.address,
            prefixlen=self.prefixlen,
            gateway=self.gateway,
            mac=self.mac,
            mtu=self.mtu,
            host_ifname=self.host_ifname,
            ports=[PortMapping(**p.model_dump()) for p in self.ports],
        )


def summary_ports(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """``Ports`` of ``GET /containers/json`` from a container's inspect document."""
    out: list[dict[str, Any]] = []
    for key, bindings in ((doc.get("NetworkSettings") or {}).get("Ports") or {}).items():
        port, _, proto = key.partition("/")
        if not bindings:
            out.append({"PrivatePort": int(port), "Type": proto})
        for b in bindings or []:
            out.append(
                {
                    "IP": b["HostIp"],
                    "PrivatePort": int(port),
                    "PublicPort": int(b["HostPort"]),
                    "Type": proto,
                }
            )
    return out


def mac_for(address: str) -> str:
    """Docker's MAC for an IPv4 address: 02:42 followed by the address's four bytes."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(address).packed)


# --- ports --------------------------------------------------------------------------------


def parse_port_key(key: str) -> tuple[int, str]:
    """``"80/tcp"`` -> (80, "tcp"); Docker's messages for bad ones."""
    port, _, proto = key.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in ("tcp", "udp", "sctp"):
        raise InvalidArgument(f"invalid proto: {proto}")
    if proto == "sctp":
        raise InvalidArgument("sctp ports are not supported by pallet")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"invalid containerPort: {port}")
    return int(port), proto


def parse_host_port(value: str) -> tuple[int, int]:
    """``""``/``"0"`` -> (0, 0) ephemeral; ``"8080"`` -> (8080, 8080); ``"8000-8010"``."""
    value = (value or "").strip()
    if value in ("", "0"):
        return 0, 0
    lo, sep, hi = value.partition("-")
    try:
        start, end = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise InvalidArgument(f"invalid hostPort: {value}") from None
    if not (0 < start <= end < 65536):
        raise InvalidArgument(f"invalid hostPort: {value}")
    return start, end


# --- DNS messages --------------------------------------------------------------------------


def _dns_question(data: bytes) -> tuple[str, int, int] | None:
    """(name, qtype, end offset of the question) of a query, None if malformed."""
    if len(data) < 12:
        return None
    qdcount = struct.unpack("!H", data[4:6])[0]
    if qdcount != 1:
        return None
    labels, i = [], 12
    while True:
        if i >= len(data):
            return None
        n = data[i]
        i += 1
        if n == 0:
            break
        if n & 0xC0 or i + n > len(data):
            return None
        labels.append(data[i : i + n].decode("ascii", "replace"))
        i += n
    if i + 4 > len(data):
        return None
    qtype = struct.unpack("!H", data[i : i + 2])[0]
    return ".".join(labels).lower(), qtype, i + 4


def _dns_answer(query: bytes, qend: int, rcode: int, addresses: list[str]) -> bytes:
    qid = query[:2]
    rd = query[2] & 0x01
    flags = 0x8000 | 0x0400 | (rd << 8) | 0x0080 | rcode  # QR, AA, RD copied, RA
    header = qid + struct.pack("!HHHHH", flags, 1, len(addresses), 0, 0)
    out = header + query[12:qend]
    for a in addresses:
        out += struct.pack("!HHHIH", 0xC00C, 1, 1, 600, 4) + socket.inet_aton(a)
    return out


def _dns_ptr_answer(query: bytes, qend: int, names: list[str]) -> bytes:
    qid = query[:2]
    rd = query[2] & 0x01
    flags = 0x8000 | 0x0400 | (rd << 8) | 0x0080
    out = qid + struct.pack("!HHHHH", flags, 1, len(names), 0, 0) + query[12:qend]
    for name in names:
        rdata = b"".join(
            bytes([len(label)]) + label.encode("ascii", "replace")
            for label in name.split(".")
            if label
        )
        rdata += b"\x00"
        out += struct.pack("!HHHIH", 0xC00C, 12, 1, 600, len(rdata)) + rdata
    return out


class _DNSServer(asyncio.DatagramProtocol):
    """The embedded resolver of one container over UDP (its socket lives in the
    container's netns)."""

    def __init__(self, service: Networks, container_id: str) -> None:
        self.service = service
        self.container_id = container_id
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.service._spawn(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = await self.service.dns_reply(self.container_id, data)
        if reply and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


class _Resolver:
    """A container's embedded DNS: UDP and TCP on 127.0.0.11:53 in its namespace."""

    def __init__(self, udp: asyncio.DatagramTransport, tcp: asyncio.Server | None) -> None:
        self.udp = udp
        self.tcp = tcp

    def close(self) -> None:
        self.udp.close()
        if self.tcp is not None:
            self.tcp.close()


class _Forward(asyncio.DatagramProtocol):
    def __init__(self, query_id: bytes) -> None:
        self.query_id = query_id
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[:2] == self.query_id and not self.answer.done():
            self.answer.set_result(data)


# --- the service -------------------------------------------------------------------------------


class Networks:
    """The network service of a daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        config = daemon.config
        self.root = config.data_root / "network"
        self.store = Store(self.root / "network.db", SCHEMA)
        self.bridge_name = config.bridge
        table = "pallet" if self.bridge_name == "pallet0" else "pallet_" + self.bridge_name
        self.settings = DriverSettings(
            iptables=config.iptables,
            ip_forward=config.ip_forward,
            table=re.sub(r"[^A-Za-z0-9_]", "_", table),
            mtu=config.mtu,
        )
        self.drivers: dict[str, NetworkDriver] = {}
        for name, cls in daemon.network_drivers.items():
            self.drivers[name] = cls(self.root / name, self.settings)
        self.nets: dict[str, NetworkRecord] = {}
        self._pending: dict[str, NetworkRecord] = {}  # being created
        for row in self.store.query("SELECT doc FROM networks"):
            n = NetworkRecord.model_validate_json(row["doc"])
            self.nets[n.id] = n
        self.eps: dict[str, EndpointRecord] = {}
        for row in self.store.query("SELECT doc FROM endpoints"):
            ep = EndpointRecord.model_validate_json(row["doc"])
            self.eps[ep.id] = ep
        self.reserved: dict[tuple[str, str, int], tuple[str, socket.socket]] = {}
        self.dns: dict[str, _Resolver] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self._rules_lock = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}  # per container: prepare vs release

    # --- start-up ----------------------------------------------------------------------

    def setup(self) -> None:
        """At daemon start (before serving): the predefined networks, every network
        made real again on the host."""
        self._ensure_predefined()
        for n in list(self.nets.values()):
            driver = self.drivers.get(n.driver)
            if driver is None:
                log.warning("network %s: driver %s is not available", n.name, n.driver)
                continue
            try:
                driver.create_network(n.info())
            except Exception as e:
                log.error("network %s: %s", n.name, e)

    def _ensure_predefined(self) -> None:
        by_name = {n.name: n for n in self.nets.values()}
        for name, driver in (("host", "host"), ("none", "null")):
            if name not in by_name and driver in self.drivers:
                self._save_net(
                    NetworkRecord(
                        id=secrets.token_hex(32),
                        name=name,
                        driver=driver,
                        created=now_rfc3339(),
                        predefined=True,
                    )
                )
        if "bridge" not in self.drivers:
            return
        cfg = self.daemon.config
        existing = by_name.get("bridge")
        in_use = existing is not None and any(
            ep.network_id == existing.id for ep in self.eps.values()
        )
        if cfg.bip:
            try:
                iface = ipaddress.IPv4Interface(cfg.bip)
            except ValueError as e:
                raise InvalidArgument(f"bip {cfg.bip!r}: {e}") from None
            subnet, gateway = str(iface.network), str(iface.ip)
        elif existing is not None and existing.bridge == self.bridge_name:
            subnet, gateway = existing.subnet, existing.gateway
        else:
            net = self._pick_subnet(exclude=existing.id if existing else None)
            subnet, gateway = str(net), str(next(net.hosts()))
        rec = NetworkRecord(
            id=existing.id if existing else secrets.token_hex(32),
            name="bridge",
            driver="bridge",
            created=existing.created if existing else now_rfc3339(),
            subnet=subnet,
            gateway=gateway,
            bridge=self.bridge_name,
            mtu=cfg.mtu,
            predefined=True,
            options={
                "com.docker.network.bridge.default_bridge": "true",
                "com.docker.network.bridge.enable_icc": "true",
                "com.docker.network.bridge.enable_ip_masquerade": "true",
                "com.docker.network.bridge.host_binding_ipv4": "0.0.0.0",
                "com.docker.network.bridge.name": self.bridge_name,
                "com.docker.network.driver.mtu": str(cfg.mtu),
            },
        )
        if existing is not None and existing.model_dump() == rec.model_dump():
            return
        if (
            existing is not None
            and in_use
            and (existing.subnet, existing.bridge)
            != (
                rec.subnet,
                rec.bridge,
            )
        ):
            log.warning("bridge network in use by running containers: keeping its old settings")
            return
        if existing is not None and existing.bridge and existing.bridge != rec.bridge:
            with contextlib.suppress(Exception):
                self.drivers["bridge"].delete_network(existing.info())
        self._save_net(rec)

    def _save_net(self, n: NetworkRecord) -> None:
        with self.store.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO networks (id, name, doc) VALUES (?,?,?)",
                (n.id, n.name, n.model_dump_json()),
            )
        self.nets[n.id] = n

    def _host_routes(self) -> list[ipaddress.IPv4Network]:
        """Networks routed on the host (not through a default route)."""
        found = []
        with contextlib.suppress(OSError):
            for line in Path("/proc/net/route").read_text().splitlines()[1:]:
                f = line.split()
                if len(f) < 8 or f[1] == "00000000":
                    continue
                dst = socket.inet_ntoa(struct.pack("<I", int(f[1], 16)))
                mask = socket.inet_ntoa(struct.pack("<I", int(f[7], 16)))
                with contextlib.suppress(ValueError):
                    found.append(ipaddress.IPv4Network(f"{dst}/{mask}", strict=False))
        return found

    def _pick_subnet(self, exclude: str | None = None) -> ipaddress.IPv4Network:
        """The first subnet of the address pools overlapping no network and no route."""
        taken = [
            ipaddress.IPv4Network(n.subnet)
            for n in self._all_nets()
            if n.subnet and n.id != exclude
        ] + self._host_routes()
        pools = self.daemon.config.default_address_pools or DEFAULT_POOLS
        for pool in pools:
            base = ipaddress.IPv4Network(str(pool["base"]), strict=False)
            size = int(pool["size"])
            for candidate in base.subnets(new_prefix=size) if size >= base.prefixlen else [base]:
                if not any(candidate.overlaps(t) for t in taken):
                    return candidate
        raise Forbidden(
            "could not find an available, non-overlapping IPv4 address pool among the "
            "defaults to assign to the network"
        )

    # --- lookup --------------------------------------------------------------------------

    def get(self, ref: str) -> NetworkRecord:
        """By full ID, name, or unique ID prefix, as Docker; ``network X not found``."""
        if ref in self.nets:
            return self.nets[ref]
        for n in self.nets.values():
            if n.name == ref:
                return n
        if ref:
            matches = [n for i, n in self.nets.items() if i.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise InvalidArgument(f"network {ref} is ambiguous ({len(matches)} matches found)")
        raise NotFound(f"network {ref} not found")

    def endpoints_of(self, container_id: str) -> list[EndpointRecord]:
        return sorted(
            (ep for ep in self.eps.values() if ep.container_id == container_id),
            key=lambda ep: int(ep.ifname[3:]) if ep.ifname[3:].isdigit() else 0,
        )

    def _container_name(self, cid: str) -> str:
        c = self.daemon.containers.by_id.get(cid)
        return c.name if c is not None else cid[:12]

    # --- network records: create, remove, inspect ---------------------------------------

    async def create_network(self, body: Any) -> dict[str, str]:
        """Validate, make it on the host (off the loop: netlink), then record it."""
        rec = self._plan_network(body)
        driver = self.drivers[rec.driver]
        self._pending[rec.id] = rec  # its name, subnet and bridge are taken meanwhile
        try:
            await asyncio.to_thread(driver.create_network, rec.info())
            try:
                self._save_net(rec)
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(driver.delete_network, rec.info())
                raise
        finally:
            self._pending.pop(rec.id, None)
        await self.program()  # its masquerade, its isolation from the others
        return {"Id": rec.id, "Warning": ""}

    def _all_nets(self) -> list[NetworkRecord]:
        return [*self.nets.values(), *self._pending.values()]

    def _plan_network(self, body: Any) -> NetworkRecord:
        from pallet.api import parse_body

        req: NetworkCreate = parse_body(NetworkCreate, body, "network config")
        name = req.Name.strip()
        if not name:
            raise InvalidArgument("network name must not be empty")
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name):
            raise InvalidArgument(
                f"invalid network name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
            )
        if any(n.name == name for n in self._all_nets()):
            raise Conflict(f"network with name {name} already exists")
        driver = self.drivers.get(req.Driver)
        if req.Driver in ("host", "null") or (driver is not None and not driver.user_creatable):
            raise Forbidden(f'only one instance of "{req.Driver}" network is allowed')
        if driver is None:
            raise NotFound(f'plugin "{req.Driver}" not found')
        if req.EnableIPv6:
            raise InvalidArgument("IPv6 networks are not supported by pallet")
        ipam = req.IPAM or IPAMSpec()
        if ipam.Driver not in ("", "default"):
            raise NotFound(f'plugin "{ipam.Driver}" not found')
        pools = ipam.Config or []
        if len(pools) > 1:
            raise InvalidArgument("pallet supports one IPv4 subnet per network")
        subnet_s = pools[0].Subnet if pools else ""
        gateway_s = pools[0].Gateway if pools else ""
        range_s = pools[0].IPRange if pools else ""
        if (gateway_s or range_s) and not subnet_s:
            raise InvalidArgument("every ip-range or gateway must have a corresponding subnet")
        if subnet_s:
            try:
                subnet = ipaddress.ip_network(subnet_s, strict=False)
            except ValueError:
                raise InvalidArgument(f"invalid subnet {subnet_s} : invalid CIDR address") from None
            if not isinstance(subnet, ipaddress.IPv4Network):
                raise InvalidArgument("IPv6 networks are not supported by pallet")
            if subnet.prefixlen > 30:
                raise InvalidArgument(f"invalid subnet {subnet_s} : too small for containers")
            for n in self._all_nets():
                if n.subnet and ipaddress.IPv4Network(n.subnet).overlaps(subnet):
                    raise Forbidden("Pool overlaps with other one on this address space")
        else:
            subnet = self._pick_subnet()
        if gateway_s:
            try:
                gw = ipaddress.IPv4Address(gateway_s)
            except ValueError:
                raise InvalidArgument(f"invalid gateway address {gateway_s}") from None
            if gw not in subnet or gw in (subnet.network_address, subnet.broadcast_address):
                raise InvalidArgument(
                    f"failed to allocate gateway ({gateway_s}): Address out of range"
                )
        else:
            gw = next(subnet.hosts())
        ip_range = ""
        if range_s:
            try:
                rng = ipaddress.IPv4Network(range_s, strict=False)
            except ValueError:
                raise InvalidArgument(
                    f"invalid ip-range {range_s} : invalid CIDR address"
                ) from None
            if not rng.subnet_of(subnet):
                raise InvalidArgument(f"invalid ip-range {range_s}: not within subnet {subnet}")
            ip_range = str(rng)
        options = dict(req.Options or {})
        nid = secrets.token_hex(32)
        bridge = options.get("com.docker.network.bridge.name") or f"br-{nid[:12]}"
        if len(bridge) > 15 or not re.fullmatch(r"[a-zA-Z0-9_.-]+", bridge):
            raise InvalidArgument(f"invalid bridge name {bridge!r}")
        if any(n.bridge == bridge for n in self._all_nets()):
            raise Conflict(f"bridge name {bridge} is used by another network")
        try:
            mtu = int(options.get("com.docker.network.driver.mtu") or self.settings.mtu)
        except ValueError:
            raise InvalidArgument("com.docker.network.driver.mtu: not an integer") from None
        if not 68 <= mtu <= 65535:
            raise InvalidArgument(f"invalid MTU number: {mtu}")
        rec = NetworkRecord(
            id=nid,
            name=name,
            driver=req.Driver,
            created=now_rfc3339(),
            subnet=str(subnet),
            gateway=str(gw),
            internal=req.Internal,
            attachable=req.Attachable,
            bridge=bridge if driver.uses_ipam else "",
            mtu=mtu,
            options=options,
            labels=dict(req.Labels or {}),
            ipam_options=dict(ipam.Options or {}),
            ip_range=ip_range,
        )
        return rec

    async def remove_network(self, ref: str) -> None:
        n = self.get(ref)
        if n.predefined:
            raise Forbidden(f"{n.name} is a pre-defined network and cannot be removed")
        if any(ep.network_id == n.id for ep in self.eps.values()):
            raise Forbidden(
                f"error while removing network: network {n.name} id {n.id} has active endpoints"
            )
        driver = self.drivers.get(n.driver)
        # Forget it first (nothing can join it any more), then take it off the host.
        self.nets.pop(n.id, None)
        with self.store.transaction() as db:
            db.execute("DELETE FROM leases WHERE network_id = ?", (n.id,))
            db.execute("DELETE FROM networks WHERE id = ?", (n.id,))
        await self.program()
        if driver is not None:
            await asyncio.to_thread(driver.delete_network, n.info())

    def _referenced(self, n: NetworkRecord) -> bool:
        for c in self.daemon.containers.by_id.values():
            networks = (c.doc.get("NetworkSettings") or {}).get("Networks") or {}
            if n.name in networks or any(
                (s or {}).get("NetworkID") == n.id for s in networks.values()
            ):
                return True
        return any(ep.network_id == n.id for ep in self.eps.values())

    async def prune(self, filters: dict[str, list[str]]) -> dict[str, Any]:
        deleted = []
        for n in list(self.nets.values()):
            if n.predefined or self._referenced(n):
                continue
            if not self._label_match(n, filters):
                continue
            try:
                await self.remove_network(n.id)
            except Exception as e:
                log.warning("prune: network %s: %s", n.name, e)
                continue
            deleted.append(n.name)
        return {"NetworksDeleted": deleted or None}

    @staticmethod
    def _label_match(n: NetworkRecord, filters: dict[str, list[str]]) -> bool:
        for v in filters.get("label", []):
            k, sep, val = v.partition("=")
            if k not in n.labels or (sep and n.labels[k] != val):
                return False
        for v in filters.get("label!", []):
            k, sep, val = v.partition("=")
            if k in n.labels and (not sep or n.labels[k] == val):
                return False
        return True

    def inspect(self, n: NetworkRecord) -> dict[str, Any]:
        containers = {}
        for ep in self.eps.values():
            if ep.network_id != n.id:
                continue
            containers[ep.container_id] = {
                "Name": self._container_name(ep.container_id),
                "EndpointID": ep.id,
                "MacAddress": ep.mac,
                "IPv4Address": f"{ep.address}/{ep.prefixlen}" if ep.address else "",
                "IPv6Address": "",
            }
        config: list[dict[str, str]] = []
        if n.subnet:
            config.append({"Subnet": n.subnet, "Gateway": n.gateway})
            if n.ip_range:
                config[0]["IPRange"] = n.ip_range
        return {
            "Name": n.name,
            "Id": n.id,
            "Created": n.created,
            "Scope": "local",
            "Driver": n.driver,
            "EnableIPv6": False,
            "IPAM": {
                "Driver": "default",
                "Options": n.ipam_options or None,
                "Config": config,
            },
            "Internal": n.internal,
            "Attachable": n.attachable,
            "Ingress": False,
            "ConfigFrom": {"Network": ""},
            "ConfigOnly": False,
            "Containers": containers,
            "Options": dict(n.options),
            "Labels": dict(n.labels),
        }

    def list_networks(self, filters: dict[str, list[str]]) -> list[dict[str, Any]]:
        known = {"name", "id", "driver", "type", "label", "label!", "scope", "dangling"}
        for key in filters:
            if key not in known:
                raise InvalidArgument(f"invalid filter '{key}'")
        out = []
        for n in sorted(self.nets.values(), key=lambda n: n.created):
            f = filters
            if "name" in f and not any(v in n.name for v in f["name"]):
                continue
            if "id" in f and not any(n.id.startswith(v) for v in f["id"]):
                continue
            if "driver" in f and n.driver not in f["driver"]:
                continue
            if "scope" in f and "local" not in f["scope"]:
                continue
            if "type" in f:
                for v in f["type"]:
                    if v not in ("custom", "builtin"):
                        raise InvalidArgument(f"invalid filter: 'type'='{v}'")
                if ("builtin" if n.predefined else "custom") not in f["type"]:
                    continue
            if "dangling" in f:
                want = f["dangling"][0].lower() in ("1", "true")
                if (not n.predefined and not self._referenced(n)) != want:
                    continue
            if not self._label_match(n, f):
                continue
            out.append(self.inspect(n))
        return out

    # --- containers: create-time validation --------------------------------------------

    def on_create(self, doc: dict[str, Any], networking_config: dict[str, Any] | None) -> None:
        """Validate the network settings of a new container and record them in its
        inspect document (``HostConfig.NetworkMode``, ``NetworkSettings.Networks``)."""
        hc = doc["HostConfig"]
        mode = hc.get("NetworkMode") or "default"
        endpoints_config = dict((networking_config or {}).get("EndpointsConfig") or {})
        self._validate_ports(hc, doc["Config"])
        networks: dict[str, Any] = {}
        if mode.startswith("container:"):
            other = self.daemon.containers.get(mode.split(":", 1)[1])
            if other.id == doc["Id"]:
                raise InvalidArgument("cannot join own network namespace")
            if hc.get("PortBindings") or hc.get("PublishAllPorts"):
                raise InvalidArgument(
                    "conflicting options: port publishing and the container type network mode"
                )
            if doc["Config"].get("Hostname") and doc["Config"]["Hostname"] != doc["Id"][:12]:
                raise InvalidArgument("conflicting options: hostname and the network mode")
            doc["Config"]["Hostname"] = other.config.get("Hostname", "")
        else:
            primary = self.get("bridge" if mode == "default" else mode)
            if primary.driver == "host" and doc["Config"].get("Hostname") == doc["Id"][:12]:
                doc["Config"]["Hostname"] = socket.gethostname()
            # The docker CLI names the primary network by what --network said ("default").
            first = endpoints_config.pop(mode, None)
            first = endpoints_config.pop(primary.name, None) or first
            first = endpoints_config.pop(primary.id, None) or first
            wanted = {primary.name: first}
            if primary.driver in ("host", "null") and endpoints_config:
                raise InvalidArgument(
                    f"container cannot be connected to multiple networks with one of the "
                    f"networks in private ({primary.name}) mode"
                )
            for ref, cfg in endpoints_config.items():
                other_net = self.get(ref)
                if other_net.driver in ("host", "null"):
                    raise InvalidArgument(
                        "container cannot be disconnected from host network or connected to "
                        "host network"
                    )
                wanted[other_net.name] = cfg
            for name, cfg in wanted.items():
                net = self.get(name)
                networks[net.name] = self._endpoint_settings(net, cfg)
        doc["NetworkSettings"]["Networks"] = networks

    def _endpoint_settings(self, net: NetworkRecord, cfg: Any) -> dict[str, Any]:
        from pallet.api import parse_body

        ec: EndpointSpec = parse_body(EndpointSpec, cfg or {}, "endpoint config")
        if ec.Aliases and (net.predefined or not self.drivers.get(net.driver, None)):
            raise InvalidArgument(
                "network-scoped alias is supported only for containers in user defined networks"
            )
        ipam = None
        if ec.IPAMConfig and ec.IPAMConfig.IPv4Address:
            if net.predefined:
                raise InvalidArgument(
                    "user specified IP address is supported on user defined networks only"
                )
            try:
                addr = ipaddress.IPv4Address(ec.IPAMConfig.IPv4Address)
            except ValueError:
                raise InvalidArgument(
                    f"invalid IPv4 address: {ec.IPAMConfig.IPv4Address}"
                ) from None
            if addr not in ipaddress.IPv4Network(net.subnet):
                raise InvalidArgument(
                    f"no configured subnet contains IP address {ec.IPAMConfig.IPv4Address}"
                )
            ipam = {"IPv4Address": str(addr)}
        return {
            "IPAMConfig": ipam,
            "Links": None,
            "Aliases": list(ec.Aliases) if ec.Aliases else None,
            "MacAddress": "",
            "NetworkID": net.id,
            "EndpointID": "",
            "Gateway": "",
            "IPAddress": "",
            "IPPrefixLen": 0,
            "IPv6Gateway": "",
            "GlobalIPv6Address": "",
            "GlobalIPv6PrefixLen": 0,
            "DriverOpts": None,
            "DNSNames": None,
        }

    def _validate_ports(self, hc: dict[str, Any], config: dict[str, Any]) -> None:
        bindings = hc.get("PortBindings") or {}
        if not isinstance(bindings, dict):
            raise InvalidArgument("HostConfig.PortBindings: expected an object")
        for key, items in bindings.items():
            parse_port_key(key)
            for b in items or []:
                parse_host_port(str((b or {}).get("HostPort") or ""))
                host_ip = (b or {}).get("HostIp") or ""
                if host_ip:
                    try:
                        ip = ipaddress.ip_address(host_ip)
                    except ValueError:
                        raise InvalidArgument(f"invalid host IP address: {host_ip}") from None
                    if ip.version != 4:
                        raise InvalidArgument("IPv6 host addresses are not supported by pallet")
        for key in config.get("ExposedPorts") or {}:
            parse_port_key(key)

    # --- containers: start, stop ----------------------------------------------------------

    def mode(self, c: Container) -> tuple[str, NetworkRecord | None, Container | None]:
        """("container", None, other) | ("host"|"none"|"bridge-like", network, None)."""
        mode = c.host_config.get("NetworkMode") or "default"
        if mode.startswith("container:"):
            other = self.daemon.containers.get(mode.split(":", 1)[1])
            return "container", None, other
        net = self.get("bridge" if mode == "default" else mode)
        if net.driver == "host":
            return "host", net, None
        if net.driver == "null":
            return "none", net, None
        return "network", net, None

    def _lock_for(self, cid: str) -> asyncio.Lock:
        lock = self._locks.get(cid)
        if lock is None:
            lock = self._locks[cid] = asyncio.Lock()
        return lock

    async def prepare(self, c: Container) -> str:
        """Before the container's process exists: allocate its endpoints (addresses,
        MACs, host ports) and say which network namespace it gets: ``"new"``,
        ``"host"`` or the path of another container's namespace. Waits for a release
        of the same container still under way (an exit just before a new start)."""
        async with self._lock_for(c.id):
            return self._prepare(c)

    def _prepare(self, c: Container) -> str:
        kind, primary, other = self.mode(c)
        if kind == "container":
            assert other is not None
            if not other.running or not other.state.get("Pid"):
                raise Conflict(f"cannot join network of a non running container: {other.id}")
            return f"/proc/{other.state['Pid']}/ns/net"
        if kind == "host":
            return "host"
        if kind == "none":
            return "new"
        assert primary is not None
        self.release_sync(c)  # whatever a previous run left
        settings = c.doc["NetworkSettings"]
        networks: dict[str, Any] = settings.setdefault("Networks", {})
        if primary.name not in networks:
            networks[primary.name] = self._endpoint_settings(primary, None)
        try:
            order = [primary.name] + [n for n in networks if n != primary.name]
            routed = False  # the default route: the first non-internal network's gateway
            for i, name in enumerate(order):
                ref = networks[name].get("NetworkID") or name
                try:
                    net = self.get(ref)
                except NotFound:
                    raise NotFound(f"network {name} not found") from None
                route = not routed and not net.internal and bool(net.gateway)
                routed = routed or route
                self._allocate(c, net, f"eth{i}", primary=i == 0, default_route=route)
        except BaseException:
            self.release_sync(c)
            raise
        return "new"

    def _allocate(
        self,
        c: Container,
        net: NetworkRecord,
        ifname: str,
        primary: bool,
        default_route: bool = False,
    ) -> None:
        driver = self.drivers.get(net.driver)
        if driver is None:
            raise NotFound(f'plugin "{net.driver}" not found')
        settings = c.doc["NetworkSettings"]["Networks"].get(net.name) or {}
        want = ((settings.get("IPAMConfig") or {}).get("IPv4Address")) or ""
        ep = EndpointRecord(
            id=secrets.token_hex(32),
            network_id=net.id,
            container_id=c.id,
            ifname=ifname,
            mtu=net.mtu,
            aliases=list(settings.get("Aliases") or []),
        )
        if primary:
            ep.ports = self._reserve_ports(c, ep)
        try:
            # The lease and the endpoint are written together or not at all.
            with self.store.transaction() as db:
                if driver.uses_ipam:
                    ep.address = self._lease(net, ep.id, want)
                    ep.prefixlen = net.prefixlen
                    ep.mac = mac_for(ep.address)
                    ep.gateway = net.gateway if default_route else ""
                db.execute(
                    "INSERT INTO endpoints (id, network_id, container_id, doc) VALUES (?,?,?,?)",
                    (ep.id, net.id, c.id, ep.model_dump_json()),
                )
        except BaseException:
            for p in ep.ports:
                self._unreserve(p)
            raise
        self.eps[ep.id] = ep

    def _lease(self, net: NetworkRecord, endpoint_id: str, want: str) -> str:
        subnet = ipaddress.IPv4Network(net.subnet)
        with self.store.transaction() as db:
            taken = {
                r["address"]
                for r in db.execute(
                    "SELECT address FROM leases WHERE network_id = ?", (net.id,)
                ).fetchall()
            }
            taken.add(net.gateway)
            if want:
                if want in taken:
                    raise Forbidden(f"Address already in use: {want}")
                address = want
            else:
                address = ""
                ends = {subnet.network_address, subnet.broadcast_address}
                pool = ipaddress.IPv4Network(net.ip_range) if net.ip_range else subnet
                for host in pool:
                    if host not in ends and str(host) not in taken:
                        address = str(host)
                        break
                if not address:
                    raise Forbidden(
                        f"no available IPv4 addresses on this network's address pools: {net.name} ({net.id})"
                    )
            db.execute(
                "INSERT INTO leases (network_id, address, endpoint_id) VALUES (?,?,?)",
                (net.id, address, endpoint_id),
            )
        return address

    # --- ports ---------------------------------------------------------------------------

    def _wanted_ports(self, c: Container) -> list[tuple[int, str, str, int, int]]:
        """(container port, proto, host ip, host port range start, end) to publish."""
        hc = c.host_config
        out = []
        for key, items in (hc.get("PortBindings") or {}).items():
            port, proto = parse_port_key(key)
            for b in items or [{}]:
                lo, hi = parse_host_port(str((b or {}).get("HostPort") or ""))
                out.append((port, proto, (b or {}).get("HostIp") or "0.0.0.0", lo, hi))
        if hc.get("PublishAllPorts"):
            exposed = dict(c.config.get("ExposedPorts") or {})
            with contextlib.suppress(Exception):
                image = self.daemon.graph.image_config(c.doc["Image"]).get("config") or {}
                exposed.update(image.get("ExposedPorts") or {})
            published = {(p, proto) for p, proto, *_ in out}
            for key in exposed:
                port, proto = parse_port_key(key)
                if (port, proto) not in published:
                    out.append((port, proto, "0.0.0.0", 0, 0))
        return out

    def _reserve_ports(self, c: Container, ep: EndpointRecord) -> list[PortRecord]:
        made: list[PortRecord] = []
        try:
            for port, proto, host_ip, lo, hi in self._wanted_ports(c):
                host_port = self._reserve(c, ep, proto, host_ip, lo, hi)
                made.append(
                    PortRecord(
                        proto=proto, container_port=port, host_ip=host_ip, host_port=host_port
                    )
                )
        except BaseException:
            for p in made:
                self._unreserve(p)
            raise
        return made

    def _reserve(
        self, c: Container, ep: EndpointRecord, proto: str, host_ip: str, lo: int, hi: int
    ) -> int:
        """Bind the host port (kept open while published); its number."""
        candidates = range(lo, hi + 1) if lo else [0]
        last: str = ""
        for port in candidates:
            if port and (proto, host_ip, port) in self.reserved:
                last = f"Bind for {host_ip}:{port} failed: port is already allocated"
                continue
            if port and any(
                k[0] == proto and k[2] == port and "0.0.0.0" in (k[1], host_ip)
                for k in self.reserved
            ):
                last = f"Bind for {host_ip}:{port} failed: port is already allocated"
                continue
            kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
            s = socket.socket(socket.AF_INET, kind)
            try:
                s.bind((host_ip, port))
                if proto == "tcp":
                    s.listen(1)
            except OSError as e:
                s.close()
                what = {errno.EADDRINUSE: "address already in use"}.get(
                    e.errno or 0, (e.strerror or str(e)).lower()
                )
                last = (
                    f"Error starting userland proxy: listen {proto}4 {host_ip}:{port}: bind: {what}"
                )
                continue
            bound = s.getsockname()[1]
            self.reserved[(proto, host_ip, bound)] = (ep.id, s)
            return int(bound)
        raise Internal(
            f"driver failed programming external connectivity on endpoint {c.name} "
            f"({ep.id}): {last}"
        )

    def _unreserve(self, p: PortRecord) -> None:
        held = self.reserved.pop((p.proto, p.host_ip, p.host_port), None)
        if held is not None:
            held[1].close()

    def port_settings(self, c: Container) -> dict[str, Any]:
        """``NetworkSettings.Ports``: exposed ports, with their host bindings if any."""
        ports: dict[str, Any] = {}
        exposed = dict(c.config.get("ExposedPorts") or {})
        with contextlib.suppress(Exception):
            image = self.daemon.graph.image_config(c.doc["Image"]).get("config") or {}
            exposed.update(image.get("ExposedPorts") or {})
        for key in exposed:
            port, proto = parse_port_key(key)
            ports[f"{port}/{proto}"] = None
        for ep in self.endpoints_of(c.id):
            for p in ep.ports:
                key = f"{p.container_port}/{p.proto}"
                ports.setdefault(key, None)
                ports[key] = [
                    *(ports[key] or []),
                    {"HostIp": p.host_ip, "HostPort": str(p.host_port)},
                ]
        return ports

    # --- attach / release ------------------------------------------------------------------

    async def attach(self, c: Container, pid: int) -> None:
        """The container's process exists (not started): join its namespace to every
        endpoint, serve its DNS, program the rules, fill ``NetworkSettings``."""
        eps = self.endpoints_of(c.id)
        netns = Path(f"/proc/{pid}/ns/net")
        kind, _primary, _ = self.mode(c)
        started = time.monotonic()
        for ep in eps:
            net = self.nets[ep.network_id]
            driver = self.drivers[net.driver]
            info = ep.info()
            await asyncio.to_thread(driver.join, net.info(), info, netns)
            ep.host_ifname, ep.joined = info.host_ifname, True
            self.store.execute(
                "UPDATE endpoints SET doc = ? WHERE id = ?", (ep.model_dump_json(), ep.id)
            )
        joined = time.monotonic()
        if self._wants_dns(c.id):
            await self._start_dns(c.id, netns)
        dns = time.monotonic()
        await self.program()
        self._fill_settings(c, pid if kind in ("network", "none") else 0)
        log.debug(
            "container %s: %d endpoint(s) joined in %.1f ms, DNS %.1f ms, rules %.1f ms",
            c.id[:12],
            len(eps),
            (joined - started) * 1000,
            (dns - joined) * 1000,
            (time.monotonic() - dns) * 1000,
        )

    def _wants_dns(self, cid: str) -> bool:
        return any(
            not self.nets[ep.network_id].predefined
            for ep in self.eps.values()
            if ep.container_id == cid and ep.network_id in self.nets
        )

    def _fill_settings(self, c: Container, pid: int) -> None:
        ns = c.doc["NetworkSettings"]
        networks: dict[str, Any] = ns.setdefault("Networks", {})
        top = {"EndpointID": "", "Gateway": "", "IPAddress": "", "IPPrefixLen": 0, "MacAddress": ""}
        bridge = ""
        for ep in self.endpoints_of(c.id):
            net = self.nets[ep.network_id]
            s = networks.get(net.name) or self._endpoint_settings(net, None)
            names = [c.name, c.id[:12], *ep.aliases] if not net.predefined else None
            s.update(
                NetworkID=net.id,
                EndpointID=ep.id,
                Gateway=net.gateway if net.subnet else "",
                IPAddress=ep.address,
                IPPrefixLen=ep.prefixlen,
                MacAddress=ep.mac,
                DNSNames=names,
            )
            networks[net.name] = s
            if net.name == "bridge":
                bridge = net.bridge
                top.update(
                    EndpointID=ep.id,
                    Gateway=net.gateway,
                    IPAddress=ep.address,
                    IPPrefixLen=ep.prefixlen,
                    MacAddress=ep.mac,
                )
        ns.update(
            Bridge=bridge,
            SandboxID=secrets.token_hex(32) if pid else "",
            SandboxKey=f"/proc/{pid}/ns/net" if pid else "",
            Ports=self.port_settings(c) if pid else {},
            HairpinMode=False,
            LinkLocalIPv6Address="",
            LinkLocalIPv6PrefixLen=0,
            SecondaryIPAddresses=None,
            SecondaryIPv6Addresses=None,
            GlobalIPv6Address="",
            GlobalIPv6PrefixLen=0,
            IPv6Gateway="",
            **top,
        )

    def _clear_settings(self, c: Container) -> None:
        ns = c.doc["NetworkSettings"]
        for s in (ns.get("Networks") or {}).values():
            if isinstance(s, dict):
                s.update(EndpointID="", Gateway="", IPAddress="", IPPrefixLen=0, MacAddress="")
                s["DNSNames"] = None
        ns.update(
            Bridge="",
            SandboxID="",
            SandboxKey="",
            Ports={},
            EndpointID="",
            Gateway="",
            IPAddress="",
            IPPrefixLen=0,
            MacAddress="",
        )

    def release_sync(self, c: Container) -> list[EndpointRecord]:
        """Records only (no await): ports, leases, endpoint rows. Returns what was removed
        so the caller can remove the links."""
        gone = self.endpoints_of(c.id)
        for ep in gone:
            for p in ep.ports:
                self._unreserve(p)
        if gone:
            with self.store.transaction() as db:
                for ep in gone:
                    db.execute("DELETE FROM leases WHERE endpoint_id = ?", (ep.id,))
                    db.execute("DELETE FROM endpoints WHERE id = ?", (ep.id,))
            for ep in gone:
                self.eps.pop(ep.id, None)
        return gone

    async def release(self, c: Container) -> None:
        """The container stopped (or failed to start, or is removed): remove its endpoints
        (links, rules, leases, ports, DNS). Idempotent."""
        async with self._lock_for(c.id):
            await self._release(c)
        if c.removed or c.removing:
            self._locks.pop(c.id, None)

    async def _release(self, c: Container) -> None:
        transport = self.dns.pop(c.id, None)
        if transport is not None:
            transport.close()
        gone = self.endpoints_of(c.id)
        started = time.monotonic()
        for ep in gone:
            net = self.nets.get(ep.network_id)
            driver = self.drivers.get(net.driver) if net else None
            if net is not None and driver is not None:
                try:
                    await asyncio.to_thread(driver.leave, net.info(), ep.info())
                except Exception as e:
                    log.warning("endpoint %s: %s", ep.id[:12], e)
        self.release_sync(c)
        if gone:
            await self.program()
            log.debug(
                "container %s: %d endpoint(s) released in %.1f ms",
                c.id[:12],
                len(gone),
                (time.monotonic() - started) * 1000,
            )
        self._clear_settings(c)

    # --- connect / disconnect -----------------------------------------------------------

    async def connect(self, ref: str, body: Any) -> None:
        from pallet.api import parse_body

        req: NetworkConnect = parse_body(NetworkConnect, body, "network connect")
        net = self.get(ref)
        c = self.daemon.containers.get(req.Container)
        kind, _, _ = self.mode(c)
        if net.driver in ("host", "null") or kind in ("host", "none", "container"):
            raise Forbidden(
                "container cannot be disconnected from host network or connected to host network"
                if "host" in (net.driver, kind)
                else f"container sharing network namespace with another container or host "
                f"cannot be connected to any other network ({net.name})"
            )
        networks = c.doc["NetworkSettings"].setdefault("Networks", {})
        if net.name in networks:
            raise Forbidden(f"endpoint with name {c.name} already exists in network {net.name}")
        settings = self._endpoint_settings(
            net, req.EndpointConfig.model_dump() if req.EndpointConfig else None
        )
        async with c.lock:
            if c.running and c.state.get("Pid"):
                used = {ep.ifname for ep in self.endpoints_of(c.id)}
                ifname = next(f"eth{i}" for i in range(64) if f"eth{i}" not in used)
                networks[net.name] = settings
                try:
                    self._allocate(c, net, ifname, primary=False)
                    ep = next(e for e in self.endpoints_of(c.id) if e.network_id == net.id)
                    info = ep.info()
                    driver = self.drivers[net.driver]
                    netns = Path(f"/proc/{c.state['Pid']}/ns/net")
                    try:
                        await asyncio.to_thread(driver.join, net.info(), info, netns)
                    except BaseException:
                        self._drop_endpoint(ep)
                        raise
                    ep.host_ifname, ep.joined = info.host_ifname, True
                    self.store.execute(
                        "UPDATE endpoints SET doc = ? WHERE id = ?", (ep.model_dump_json(), ep.id)
                    )
                except BaseException:
                    networks.pop(net.name, None)
                    raise
                if self._wants_dns(c.id) and c.id not in self.dns:
                    await self._start_dns(c.id, netns)
                    # Now served by the embedded DNS: rewrite the bind-mounted file in
                    # place (same inode, so the container sees it).
                    with contextlib.suppress(OSError):
                        with open(c.doc["ResolvConfPath"], "r+") as f:
                            f.truncate(0)
                            f.write(self.resolv_conf(c))
                await self.program()
                self._fill_settings(c, int(c.state["Pid"]))
            else:
                networks[net.name] = settings
            self.daemon.containers.save(c)

    def _drop_endpoint(self, ep: EndpointRecord) -> None:
        for p in ep.ports:
            self._unreserve(p)
        with self.store.transaction() as db:
            db.execute("DELETE FROM leases WHERE endpoint_id = ?", (ep.id,))
            db.execute("DELETE FROM endpoints WHERE id = ?", (ep.id,))
        self.eps.pop(ep.id, None)

    async def disconnect(self, ref: str, body: Any) -> None:
        from pallet.api import parse_body

        req: NetworkDisconnect = parse_body(NetworkDisconnect, body, "network disconnect")
        net = self.get(ref)
        c = self.daemon.containers.get(req.Container)
        kind, _, _ = self.mode(c)
        if net.driver == "host" or kind == "host":
            raise Forbidden(
                "container cannot be disconnected from host network or connected to host network"
            )
        networks = c.doc["NetworkSettings"].setdefault("Networks", {})
        if net.name not in networks:
            raise Forbidden(f"container {c.id} is not connected to network {net.name}")
        async with c.lock:
            for ep in [e for e in self.endpoints_of(c.id) if e.network_id == net.id]:
                driver = self.drivers.get(net.driver)
                if driver is not None:
                    await asyncio.to_thread(driver.leave, net.info(), ep.info())
                self._drop_endpoint(ep)
            networks.pop(net.name, None)
            if c.id in self.dns and not self._wants_dns(c.id):
                self.dns.pop(c.id).close()
            await self.program()
            if c.running and c.state.get("Pid"):
                self._fill_settings(c, int(c.state["Pid"]))
            self.daemon.containers.save(c)

    # --- rules ------------------------------------------------------------------------------

    async def program(self) -> None:
        """Bring every driver's rules in line with the state (serialised; each run takes
        the state as it is when it runs, so the last one wins with the latest)."""
        async with self._rules_lock:
            for name, driver in self.drivers.items():
                nets = [n.info() for n in self.nets.values() if n.driver == name]
                ids = {n.id for n in nets}
                eps = [ep.info() for ep in self.eps.values() if ep.network_id in ids]
                try:
                    await asyncio.to_thread(driver.program, nets, eps)
                except Exception as e:
                    log.error("network driver %s: programming rules failed: %s", name, e)

    def rule_count(self) -> int:
        return sum(d.rule_count() for d in self.drivers.values())

    # --- /etc files ------------------------------------------------------------------------

    def host_resolvers(self, keep_loopback: bool = False) -> tuple[list[str], list[str]]:
        """(nameservers, other resolv.conf lines) of the host."""
        servers, other = [], []
        with contextlib.suppress(OSError):
            for line in Path("/etc/resolv.conf").read_text().splitlines():
                parts = line.split()
                if parts[:1] == ["nameserver"] and len(parts) > 1:
                    if not keep_loopback and (parts[1].startswith("127.") or parts[1] == "::1"):
                        continue  # the host's loopback resolver is unreachable from inside
                    servers.append(parts[1])
                elif parts and not line.lstrip().startswith(("#", ";")):
                    other.append(line)
        return servers, other

    def resolv_conf(self, c: Container) -> str:
        hc = c.host_config
        kind, _, other = self.mode(c)
        if kind == "container" and other is not None:
            with contextlib.suppress(OSError):
                return Path(other.doc["ResolvConfPath"]).read_text()
        dns = list(hc.get("Dns") or []) or list(self.daemon.config.dns)
        search = list(hc.get("DnsSearch") or [])
        options = list(hc.get("DnsOptions") or [])
        servers, other_lines = self.host_resolvers(keep_loopback=kind == "host")
        lines: list[str] = []
        if kind != "host" and self._wants_dns(c.id):
            # Docker's embedded DNS: it forwards to --dns or the host's resolvers.
            lines.append(f"nameserver {DNS_ADDRESS}")
            options = ["ndots:0", *options]
        else:
            # Written into the container: only plain addresses reachable from inside
            # (an "ip:port" upstream or a loopback one is for the embedded DNS only).
            usable = [x for x in dns if x.count(":") != 1 and not x.startswith("127.")]
            lines += [f"nameserver {x}" for x in (usable or servers)]
        keep = [ln for ln in other_lines if not (search and ln.split()[:1] == ["search"])]
        keep = [ln for ln in keep if not (options and ln.split()[:1] == ["options"])]
        lines += keep
        if search:
            lines.append("search " + " ".join(search))
        if options:
            lines.append("options " + " ".join(options))
        return "".join(ln + "\n" for ln in lines)

    def hosts_file(self, c: Container) -> str:
        kind, _, other = self.mode(c)
        if kind == "container" and other is not None:
            with contextlib.suppress(OSError):
                return Path(other.doc["HostsPath"]).read_text()
        if kind == "host":
            with contextlib.suppress(OSError):
                return Path("/etc/hosts").read_text()
        text = (
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            "fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n"
            "ff02::2\tip6-allrouters\n"
        )
        gateway = ""
        for entry in c.host_config.get("ExtraHosts") or []:
            name, sep, addr = entry.partition(":") if "=" not in entry else entry.partition("=")
            if not sep:
                raise InvalidArgument(f"invalid extra host: {entry}")
            if addr == "host-gateway":
                eps = self.endpoints_of(c.id)
                gateway = gateway or (self.nets[eps[0].network_id].gateway if eps else "")
                addr = gateway or "127.0.0.1"
            text += f"{addr}\t{name}\n"
        hostname = c.config.get("Hostname") or c.id[:12]
        domain = c.config.get("Domainname") or ""
        full = f"{hostname}.{domain} {hostname}" if domain else hostname
        eps = self.endpoints_of(c.id)
        if eps and eps[0].address:
            text += f"{eps[0].address}\t{full}\n"
        else:
            text += f"127.0.1.1\t{full}\n"
        return text

    # --- DNS -----------------------------------------------------------------------------------

    async def _start_dns(self, cid: str, netns: Path) -> None:
        def make() -> tuple[socket.socket, socket.socket]:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                udp.bind((DNS_ADDRESS, 53))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((DNS_ADDRESS, 53))
                tcp.listen(16)
            except BaseException:
                udp.close()
                tcp.close()
                raise
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp

        try:
            udp_sock, tcp_sock = await asyncio.to_thread(run_in_netns, netns, make)
        except OSError as e:
            log.warning("container %s: embedded DNS unavailable: %s", cid[:12], e)
            return
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _DNSServer(self, cid), sock=udp_sock
        )

        async def serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    reply = await self.dns_reply(cid, await reader.readexactly(size))
                    if not reply:
                        return
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        tcp = await asyncio.start_server(serve_tcp, sock=tcp_sock)
        old = self.dns.pop(cid, None)
        if old is not None:
            old.close()
        self.dns[cid] = _Resolver(transport, tcp)

    async def dns_reply(self, cid: str, data: bytes) -> bytes | None:
        """The answer to one query from container ``cid``: its peers' names from the
        records, anything else from the upstream resolvers (SERVFAIL if none answers)."""
        q = _dns_question(data)
        if q is None:
            return None
        name, qtype, qend = q
        if qtype == 12 and name.endswith(".in-addr.arpa"):
            names = self.resolve_address(cid, name[: -len(".in-addr.arpa")])
            if names:
                return _dns_ptr_answer(data, qend, names)
        found = self.resolve_name(cid, name)
        if found:
            return _dns_answer(data, qend, 0, found if qtype in (1, 255) else [])
        forwarded = await self.forward_dns(cid, data)
        return forwarded or _dns_answer(data, qend, 2, [])

    def resolve_address(self, cid: str, reversed_ip: str) -> list[str]:
        """PTR: ``<name>.<network>`` of the container owning the address on a network
        the asking container shares (``reversed_ip``: "2.0.18.172")."""
        address = ".".join(reversed(reversed_ip.split(".")))
        mine = {
            ep.network_id
            for ep in self.eps.values()
            if ep.container_id == cid and not self.nets[ep.network_id].predefined
        }
        for ep in self.eps.values():
            if ep.network_id in mine and ep.address == address:
                return [f"{self._container_name(ep.container_id)}.{self.nets[ep.network_id].name}"]
        return []

    def resolve_name(self, cid: str, name: str) -> list[str]:
        """Addresses of ``name`` (container name, alias or short ID) on the user-defined
        networks the container ``cid`` is attached to."""
        name = name.rstrip(".").lower()
        mine = {
            ep.network_id
            for ep in self.eps.values()
            if ep.container_id == cid and not self.nets[ep.network_id].predefined
        }
        found: list[str] = []
        for ep in self.eps.values():
            if ep.network_id not in mine or not ep.address:
                continue
            c = self.daemon.containers.by_id.get(ep.container_id)
            names = {ep.container_id[:12], *(a.lower() for a in ep.aliases)}
            if c is not None:
                names.add(c.name.lower())
            if name in names and ep.address not in found:
                found.append(ep.address)
        return found

    async def forward_dns(self, cid: str, query: bytes) -> bytes | None:
        """Ask the upstream resolvers (``dns`` in the config or the host's)."""
        eps = [ep for ep in self.eps.values() if ep.container_id == cid]
        if eps and all(self.nets[ep.network_id].internal for ep in eps):
            return None  # an internal network reaches nothing outside
        c = self.daemon.containers.by_id.get(cid)
        upstream = list((c.host_config.get("Dns") if c else None) or []) or list(
            self.daemon.config.dns
        )
        if not upstream:
            upstream, _ = self.host_resolvers(keep_loopback=True)
        loop = asyncio.get_running_loop()
        for server in upstream:
            host, port = server, 53
            if server.count(":") == 1:
                host, _, p = server.partition(":")
                port = int(p) if p.isdigit() else 53
            try:
                transport, proto = await loop.create_datagram_endpoint(
                    lambda: _Forward(query[:2]), remote_addr=(host, port)
                )
            except OSError:
                continue
            try:
                transport.sendto(query)
                return await asyncio.wait_for(proto.answer, 3)
            except (TimeoutError, OSError):
                continue
            finally:
                transport.close()
        return None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- restore and shutdown ------------------------------------------------------------

    async def restore(self) -> None:
        """After the containers are restored: re-adopt the endpoints of running
        containers (ports, DNS), clean the others, rebuild the rules."""
        for ep in list(self.eps.values()):
            c = self.daemon.containers.by_id.get(ep.container_id)
            net = self.nets.get(ep.network_id)
            driver = self.drivers.get(net.driver) if net else None
            alive = (
                c is not None
                and c.running
                and net is not None
                and driver is not None
                and await asyncio.to_thread(driver.endpoint_alive, net.info(), ep.info())
            )
            if alive:
                assert c is not None
                for p in ep.ports:
                    kind = socket.SOCK_STREAM if p.proto == "tcp" else socket.SOCK_DGRAM
                    s = socket.socket(socket.AF_INET, kind)
                    try:
                        s.bind((p.host_ip, p.host_port))
                        if p.proto == "tcp":
                            s.listen(1)
                        self.reserved[(p.proto, p.host_ip, p.host_port)] = (ep.id, s)
                    except OSError as e:
                        s.close()
                        log.warning("port %s/%s taken while away: %s", p.host_port, p.proto, e)
                continue
            log.info("cleaning endpoint %s of container %s", ep.id[:12], ep.container_id[:12])
            if net is not None and driver is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(driver.leave, net.info(), ep.info())
            self._drop_endpoint(ep)
            if c is not None:
                self._clear_settings(c)
                self.daemon.containers.save(c)
        for cid in {ep.container_id for ep in self.eps.values()}:
            c = self.daemon.containers.by_id.get(cid)
            if c is not None and c.state.get("Pid") and self._wants_dns(cid):
                await self._start_dns(cid, Path(f"/proc/{c.state['Pid']}/ns/net"))
        await self.program()

    async def shutdown(self) -> None:
        """Daemon stop: live endpoints (live-restore) keep their networks and rules;
        what no running container uses is removed from the host."""
        for t in list(self.tasks):
            t.cancel()
        for transport in self.dns.values():
            transport.close()
        self.dns.clear()
        for _, s in self.reserved.values():
            s.close()
        self.reserved.clear()
        keep = {ep.network_id for ep in self.eps.values()}
        for name, driver in self.drivers.items():
            nets = [n.info() for n in self.nets.values() if n.driver == name]
            kept = [n for n in nets if n.id in keep]
            try:
                if keep:
                    ids = {n.id for n in kept}
                    eps = [ep.info() for ep in self.eps.values() if ep.network_id in ids]
                    await asyncio.to_thread(driver.program, kept, eps)
                await asyncio.to_thread(driver.shutdown, nets, keep)
            except Exception as e:
                log.warning("network driver %s: shutdown: %s", name, e)
        self.store.close()

    # --- helpers for the API -------------------------------------------------------------------

    def names(self) -> Iterable[str]:
        return (n.name for n in self.nets.values())

    def summary_ports(self, c: Container) -> list[dict[str, Any]]:
        return summary_ports(c.doc)

    def dumps_state(self) -> str:
        """For debugging: the records as JSON."""
        return json.dumps(
            {
                "networks": [n.model_dump() for n in self.nets.values()],
                "endpoints": [e.model_dump() for e in self.eps.values()],
            }
        )
