"""The network driver contract: networks, endpoints, joining a container's netns.

The network *service* (:mod:`pallet.networks`) owns the records: networks, endpoints,
IPAM leases and port reservations live in the daemon's SQLite store, so a driver is
handed complete, already-allocated descriptions and only has to make them real:

- ``create_network`` makes the network exist on the host (a bridge, ...). It is also
  called at every daemon start for every network, so it must be idempotent and adopt
  what a previous daemon left.
- ``join`` puts an endpoint into the container's network namespace (the process is
  created, not started yet; the namespace is ``/proc/<pid>/ns/net``).
- ``leave`` removes an endpoint; it must leave nothing behind (links, rules).
- ``program`` is given the whole state after any change and makes the host's
  packet-filter rules (NAT, published ports, isolation) match it exactly.
- ``shutdown`` runs at daemon stop: ``keep`` lists the networks whose endpoints live on
  (live-restore); everything else the driver made may be removed.

A driver that cannot work on this host raises :class:`pallet.errors.PluginSkip` from
``probe``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


class DriverSettings(BaseModel):
    """What the daemon's configuration tells every network driver."""

    model_config = ConfigDict(frozen=True)

    iptables: bool = True  # program NAT / port / isolation rules at all
    ip_forward: bool = True  # enable net.ipv4.ip_forward when programming rules
    table: str = "pallet"  # name of pallet's own nftables table
    mtu: int = 1500


@dataclass
class PortMapping:
    """One published port: ``host_ip:host_port`` -> the endpoint's ``container_port``."""

    proto: str  # "tcp" | "udp"
    container_port: int
    host_ip: str  # "0.0.0.0" = every address of the host
    host_port: int


@dataclass
class NetworkInfo:
    """A network as the driver sees it."""

    id: str
    name: str
    driver: str
    subnet: str = ""  # "172.18.0.0/16"; empty for host/null
    gateway: str = ""
    internal: bool = False
    bridge: str = ""  # the host link serving the network (bridge driver)
    mtu: int = 1500
    options: dict[str, str] = field(default_factory=dict)

    @property
    def prefixlen(self) -> int:
        return int(self.subnet.split("/")[1]) if self.subnet else 0


@dataclass
class EndpointInfo:
    """An endpoint: one container's attachment to one network."""

    id: str
    network_id: str
    container_id: str
    ifname: str = "eth0"  # name inside the container
    address: str = ""
    prefixlen: int = 0
    gateway: str = ""  # default route through it ("" = no default route)
    mac: str = ""
    mtu: int = 1500
    host_ifname: str = ""  # the host end (veth) when there is one
    ports: list[PortMapping] = field(default_factory=list)


@dataclass
class Endpoint:
    """What a joined endpoint looks like from inside the container."""

    network_id: str
    endpoint_id: str
    ip_address: str = ""
    ip_prefix_len: int = 0
    gateway: str = ""
    mac_address: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class NetworkDriver(ABC):
    """Base of every network driver; the defaults suit a driver with nothing to do."""

    name: ClassVar[str]
    uses_ipam: ClassVar[bool] = False  # endpoints get addresses from the subnet
    own_namespace: ClassVar[bool] = True  # False: containers stay in the host's netns
    user_creatable: ClassVar[bool] = False  # `network create -d NAME` is allowed

    @classmethod
    def probe(cls) -> None:
        """Raise ``PluginSkip`` with the reason if the driver cannot work here."""

    def __init__(self, state_dir: Path, settings: DriverSettings) -> None:
        self.state_dir = state_dir
        self.settings = settings

    def create_network(self, net: NetworkInfo) -> None:
        """Make ``net`` exist on the host; idempotent (called again at every start)."""

    def delete_network(self, net: NetworkInfo) -> None:
        """Remove what ``create_network`` made."""

    def join(self, net: NetworkInfo, ep: EndpointInfo, netns: Path) -> Endpoint:
        """Create the endpoint and put it into the namespace at ``netns``. On failure
        nothing of it may remain."""
        return Endpoint(network_id=net.id, endpoint_id=ep.id)

    def leave(self, net: NetworkInfo, ep: EndpointInfo) -> None:
        """Remove the endpoint; it must leave nothing behind (links, rules, leases).
        Called also for endpoints whose container died with the daemon away."""

    def endpoint_alive(self, net: NetworkInfo, ep: EndpointInfo) -> bool:
        """At daemon start: does the endpoint still exist (to be re-adopted)?"""
        return True

    def program(self, networks: list[NetworkInfo], endpoints: list[EndpointInfo]) -> None:
        """Make the host's packet-filter rules match the whole state of this driver."""

    def shutdown(self, networks: list[NetworkInfo], keep: set[str]) -> None:
        """Daemon stop: tear down networks not in ``keep`` (ids of networks with live
        endpoints that outlive the daemon)."""

    def rule_count(self) -> int:
        """How many packet-filter rules the driver has installed (for ``info`` and tests)."""
        return 0


def run_in_netns(netns: Path | str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh thread that has entered the network namespace ``netns``.

    Sockets (netlink, UDP...) created by ``fn`` belong to that namespace for their whole
    life. The thread ends afterwards, so no pool thread is ever left in a foreign netns.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(str(netns), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            error.append(e)
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                error.append(OSError(err, f"setns {netns}: {os.strerror(err)}"))
                return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=target, name="netns", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]
