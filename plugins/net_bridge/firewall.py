"""pallet's packet-filter rules, in one nftables table of its own.

The whole table is rendered from the state (networks, endpoints, published ports) and
replaced in one ``nft -f`` transaction, so the rules are always exactly the state's:
nothing stale survives an endpoint's removal or a daemon restart, and nothing outside
the table is touched.

What the table does (Docker's iptables rules, in nftables):

- ``postrouting``: masquerade each non-internal subnet going out of any other link;
  masquerade loopback-sourced traffic entering a bridge (the host reaching a published
  port on 127.0.0.1: DNAT in ``output`` + ``route_localnet`` on the bridge).
- ``prerouting`` / ``output``: traffic to a local address goes through ``ports``, where
  each published port is a DNAT to its container.
- ``forward``: isolation (no traffic from one pallet bridge to another) and internal
  networks (nothing in or out of the bridge).
"""

from __future__ import annotations

import json
import subprocess

from pallet.errors import Internal
from pallet.network import EndpointInfo, NetworkInfo


def _q(name: str) -> str:
    return json.dumps(name)  # nft string literal: "name"


def render(table: str, networks: list[NetworkInfo], endpoints: list[EndpointInfo]) -> str:
    """The table's full text for ``nft -f``."""
    bridges = [n for n in networks if n.bridge]
    by_id = {n.id: n for n in bridges}
    post: list[str] = []
    ports: list[str] = []
    forward: list[str] = []
    for n in bridges:
        br = _q(n.bridge)
        if not n.internal and n.subnet:
            post.append(f"ip saddr {n.subnet} oifname != {br} masquerade")
        post.append(f"oifname {br} ip saddr 127.0.0.0/8 masquerade")
        if n.internal:
            forward.append(f"iifname {br} oifname != {br} drop")
            forward.append(f"oifname {br} iifname != {br} drop")
        others = [_q(o.bridge) for o in bridges if o.bridge != n.bridge]
        if others:
            forward.append(f"iifname {br} oifname {{ {', '.join(others)} }} drop")
    for ep in endpoints:
        net = by_id.get(ep.network_id)
        if net is None or net.internal or not ep.address:
            continue
        for p in ep.ports:
            match = f"ip daddr {p.host_ip} " if p.host_ip not in ("", "0.0.0.0") else ""
            ports.append(
                f"{match}{p.proto} dport {p.host_port} dnat to {ep.address}:{p.container_port}"
            )
            # A container reaching its own published port through the host (hairpin).
            post.append(
                f"ip saddr {ep.address} ip daddr {ep.address} {p.proto} dport "
                f"{p.container_port} masquerade"
            )

    def chain(name: str, head: str, rules: list[str]) -> str:
        body = "".join(f"\t\t{r}\n" for r in rules)
        return f"\tchain {name} {{\n{head}{body}\t}}\n"

    return (
        f"table ip {table} {{\n"
        + chain("ports", "", ports)
        + chain(
            "prerouting",
            "\t\ttype nat hook prerouting priority dstnat; policy accept;\n",
            ["fib daddr type local jump ports"],
        )
        + chain(
            "output",
            "\t\ttype nat hook output priority -100; policy accept;\n",
            ["fib daddr type local jump ports"],
        )
        + chain(
            "postrouting", "\t\ttype nat hook postrouting priority srcnat; policy accept;\n", post
        )
        + chain(
            "forward", "\t\ttype filter hook forward priority filter; policy accept;\n", forward
        )
        + "}\n"
    )


def _nft(script: str) -> None:
    try:
        r = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True)
    except FileNotFoundError:
        raise Internal("nft is not installed (Debian package nftables)") from None
    if r.returncode != 0:
        raise Internal(f"programming nftables failed: {r.stderr.decode(errors='replace').strip()}")


def apply(table: str, networks: list[NetworkInfo], endpoints: list[EndpointInfo]) -> None:
    """Replace the table atomically (create-if-missing, delete, re-create: one transaction)."""
    _nft(f"table ip {table} {{}}\ndelete table ip {table}\n" + render(table, networks, endpoints))


def remove(table: str) -> None:
    _nft(f"table ip {table} {{}}\ndelete table ip {table}\n")


def rule_count(table: str) -> int:
    """Rules in the table (0 when it does not exist)."""
    try:
        r = subprocess.run(["nft", "-j", "list", "table", "ip", table], capture_output=True)
    except FileNotFoundError:
        return 0
    if r.returncode != 0:
        return 0
    data = json.loads(r.stdout or b"{}")
    return sum(1 for item in data.get("nftables", []) if "rule" in item)


def available() -> str | None:
    """None when nft works here, else the reason."""
    try:
        r = subprocess.run(["nft", "list", "tables"], capture_output=True)
    except FileNotFoundError:
        return "nft is not installed (Debian package nftables)"
    if r.returncode != 0:
        return f"nft does not work here: {r.stderr.decode(errors='replace').strip()}"
    return None
