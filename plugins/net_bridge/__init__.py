"""The ``bridge`` network driver, on pyroute2 (netlink; no ``ip`` command).

Each network is a Linux bridge holding the gateway address; each endpoint is a veth
pair whose host end is a port of the bridge and whose other end is moved into the
container's network namespace, renamed (``eth0``, ``eth1``...), given its MAC, MTU and
address, brought up, and - for the container's primary network - made the default
route. NAT, published ports and isolation are nftables rules in pallet's own table
(:mod:`.firewall`), rebuilt from the whole state on every change.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any

from pallet.errors import Internal, PluginSkip, Unavailable
from pallet.hookspecs import hookimpl
from pallet.network import (
    Endpoint,
    EndpointInfo,
    NetworkDriver,
    NetworkInfo,
    run_in_netns,
)

log = logging.getLogger("pallet.net_bridge")


def _lookup(ip: Any, name: str) -> int | None:
    """The link's index, or None (one RTM_GETLINK by name, not a dump of every link)."""
    from pyroute2 import NetlinkError

    try:
        return int(ip.link("get", ifname=name)[0]["index"])
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise


def _sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        log.warning("cannot set %s to %s: %s", path, value, e)


class BridgeDriver(NetworkDriver):
    name = "bridge"
    uses_ipam = True
    user_creatable = True

    @classmethod
    def probe(cls) -> None:
        try:
            import pyroute2  # noqa: F401
        except ImportError:
            raise PluginSkip("pyroute2 is not installed") from None
        if os.geteuid() != 0:
            raise PluginSkip("needs root (CAP_NET_ADMIN) to create bridges and veths")
        if not os.path.exists("/proc/self/ns/net"):
            raise PluginSkip("the kernel has no network namespaces")

    def __init__(self, state_dir: Path, settings: Any) -> None:
        super().__init__(state_dir, settings)
        self._firewall_error: str | None = None
        self._programmed: str | None = None  # the table's text as last applied
        if settings.iptables:
            from pallet.plugins.net_bridge import firewall

            self._firewall_error = firewall.available()
            if self._firewall_error:
                log.warning("iptables: %s; NAT and published ports are off", self._firewall_error)

    @staticmethod
    def _ipr() -> Any:
        from pyroute2 import IPRoute

        return IPRoute()

    # --- networks ------------------------------------------------------------------

    def create_network(self, net: NetworkInfo) -> None:
        from pyroute2 import NetlinkError

        if not net.bridge:
            raise Internal(f"network {net.name}: no bridge name")
        with self._ipr() as ip:
            idx = _lookup(ip, net.bridge)
            if idx is None:
                try:
                    ip.link("add", ifname=net.bridge, kind="bridge")
                except NetlinkError as e:
                    raise Unavailable(
                        f"failed to create bridge {net.bridge}: {os.strerror(e.code)}"
                    ) from None
                idx = _lookup(ip, net.bridge)
                assert idx is not None
            else:
                link = ip.get_links(idx)[0]
                info = link.get_attr("IFLA_LINKINFO")
                kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                if kind != "bridge":
                    raise Unavailable(f"{net.bridge} exists and is not a bridge (it is {kind})")
            try:
                ip.link("set", index=idx, mtu=net.mtu, ifalias=f"pallet network {net.id[:12]}")
                if net.gateway:
                    want = (net.gateway, net.prefixlen)
                    present = set()
                    for a in ip.get_addr(index=idx, family=socket.AF_INET):
                        have = (a.get_attr("IFA_ADDRESS"), int(a["prefixlen"]))
                        if have == want:
                            present.add(have)
                        else:  # a stale gateway (bip changed): Docker replaces it too
                            ip.addr("del", index=idx, address=have[0], prefixlen=have[1])
                    if not present:
                        ip.addr("add", index=idx, address=net.gateway, prefixlen=net.prefixlen)
                ip.link("set", index=idx, state="up")
            except NetlinkError as e:
                raise Unavailable(
                    f"failed to set up bridge {net.bridge}: {os.strerror(e.code)}"
                ) from None
        if self.settings.iptables:
            # The host reaching a published port on 127.0.0.1 (DNAT to the container).
            _sysctl(f"/proc/sys/net/ipv4/conf/{net.bridge}/route_localnet", "1")

    def delete_network(self, net: NetworkInfo) -> None:
        from pyroute2 import NetlinkError

        if not net.bridge:
            return
        with self._ipr() as ip:
            idx = _lookup(ip, net.bridge)
            if idx is not None:
                with contextlib.suppress(NetlinkError):
                    ip.link("del", index=idx)

    # --- endpoints -----------------------------------------------------------------

    def join(self, net: NetworkInfo, ep: EndpointInfo, netns: Path) -> Endpoint:
        from pyroute2 import NetlinkError

        if not ep.host_ifname:
            ep.host_ifname = "veth" + secrets.token_hex(4)[:7]
        with self._ipr() as ip:
            br = _lookup(ip, net.bridge)
            if br is None:
                raise Unavailable(f"bridge {net.bridge} of network {net.name} is missing")
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # One request: the host end a port of the bridge, the other end made
                # directly inside the container's namespace with its name, MAC and MTU.
                ip.link(
                    "add",
                    ifname=ep.host_ifname,
                    kind="veth",
                    master=br,
                    mtu=ep.mtu,
                    peer={
                        "ifname": ep.ifname,
                        "net_ns_fd": fd,
                        "address": ep.mac,
                        "mtu": ep.mtu,
                    },
                )
            except NetlinkError as e:
                raise Unavailable(
                    f"failed to add the host ({ep.host_ifname}) <=> sandbox ({ep.ifname}) pair "
                    f"interfaces: {os.strerror(e.code)}"
                ) from None
            finally:
                os.close(fd)
            host_idx = _lookup(ip, ep.host_ifname)
            try:
                assert host_idx is not None
                ip.link(
                    "set",
                    index=host_idx,
                    ifalias=f"pallet {ep.container_id[:12]} {ep.id[:12]}",
                )
                run_in_netns(netns, lambda: self._configure_inside(ep))
                if self.settings.iptables:
                    # Hairpin: the container reaching its own published port via the host.
                    ip.brport("set", index=host_idx, mode=1)
                ip.link("set", index=host_idx, state="up")
            except BaseException:
                if host_idx is not None:
                    with contextlib.suppress(Exception):
                        ip.link("del", index=host_idx)
                raise
        return Endpoint(
            network_id=net.id,
            endpoint_id=ep.id,
            ip_address=ep.address,
            ip_prefix_len=ep.prefixlen,
            gateway=ep.gateway,
            mac_address=ep.mac,
        )

    def _configure_inside(self, ep: EndpointInfo) -> None:
        from pyroute2 import NetlinkError

        try:
            with self._ipr() as ip:
                idx = _lookup(ip, ep.ifname)
                if idx is None:
                    raise Internal(f"{ep.ifname} did not arrive in the container's namespace")
                ip.addr("add", index=idx, address=ep.address, prefixlen=ep.prefixlen)
                ip.link("set", index=idx, state="up")
                if ep.gateway:
                    ip.route("add", dst="default", gateway=ep.gateway, oif=idx)
        except NetlinkError as e:
            raise Unavailable(
                f"failed to set up {ep.ifname} in the container: {os.strerror(e.code)}"
            ) from None

    def leave(self, net: NetworkInfo, ep: EndpointInfo) -> None:
        from pyroute2 import NetlinkError

        if not ep.host_ifname:
            return
        with self._ipr() as ip:
            idx = _lookup(ip, ep.host_ifname)
            if idx is not None:
                with contextlib.suppress(NetlinkError):
                    ip.link("del", index=idx)

    def endpoint_alive(self, net: NetworkInfo, ep: EndpointInfo) -> bool:
        with self._ipr() as ip:
            idx = _lookup(ip, ep.host_ifname) if ep.host_ifname else None
            if idx is None:
                return False
            br = _lookup(ip, net.bridge)
            return br is not None and ip.get_links(idx)[0].get_attr("IFLA_MASTER") == br

    # --- rules -----------------------------------------------------------------------

    def program(self, networks: list[NetworkInfo], endpoints: list[EndpointInfo]) -> None:
        if not self.settings.iptables or self._firewall_error:
            return
        from pallet.plugins.net_bridge import firewall

        text = firewall.render(self.settings.table, networks, endpoints)
        if text == self._programmed:
            return  # most endpoints (no published port) change no rule: no nft run
        if self.settings.ip_forward and networks:
            _sysctl("/proc/sys/net/ipv4/ip_forward", "1")
        self._programmed = None
        firewall.apply(self.settings.table, networks, endpoints)
        self._programmed = text

    def shutdown(self, networks: list[NetworkInfo], keep: set[str]) -> None:
        for net in networks:
            if net.id not in keep:
                self.delete_network(net)
        if not keep and self.settings.iptables and not self._firewall_error:
            from pallet.plugins.net_bridge import firewall

            with contextlib.suppress(Exception):
                firewall.remove(self.settings.table)
            self._programmed = None

    def rule_count(self) -> int:
        from pallet.plugins.net_bridge import firewall

        return firewall.rule_count(self.settings.table)


@hookimpl
def pallet_network_drivers_v1() -> list[type[NetworkDriver]]:
    return [BridgeDriver]
