"""Networking pieces that need no daemon: -p parsing, the rules' text, DNS messages,
Docker's MACs, port-key validation."""

from __future__ import annotations

import socket
import struct

import click
import pytest
from pallet.cli.networks import network_config_from_flags, parse_publish
from pallet.errors import InvalidArgument
from pallet.network import EndpointInfo, NetworkInfo, PortMapping
from pallet.networks import _dns_answer, _dns_question, mac_for, parse_host_port, parse_port_key
from pallet.plugins.net_bridge.firewall import render


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("80", [("80/tcp", "", "")]),
        ("8080:80", [("80/tcp", "", "8080")]),
        ("127.0.0.1:8080:80/udp", [("80/udp", "127.0.0.1", "8080")]),
        ("127.0.0.1::53/udp", [("53/udp", "127.0.0.1", "")]),
        ("8000-8001:80-81", [("80/tcp", "", "8000"), ("81/tcp", "", "8001")]),
        ("9000-9010:80", [("80/tcp", "", "9000-9010")]),
    ],
)
def test_parse_publish(spec: str, expected: list[tuple[str, str, str]]) -> None:
    assert parse_publish(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("abc", "invalid containerPort: abc"),
        ("0", "invalid containerPort: 0"),
        ("8080:80/sctx", "invalid proto: sctx"),
        ("a:b:c:d", "invalid port format"),
        ("x:80", "invalid hostPort: x"),
    ],
)
def test_parse_publish_refuses(spec: str, message: str) -> None:
    with pytest.raises(click.UsageError, match=message):
        parse_publish(spec)


def test_flags_to_api_body() -> None:
    hc, cfg = network_config_from_flags(
        {
            "publish": ("8080:80", "53/udp"),
            "expose": ("9000-9001",),
            "publish_all": True,
            "network_aliases": ("web",),
            "ip_address": "10.9.0.9",
            "dns": ("10.0.0.53",),
            "add_hosts": ("db:10.0.0.5", "gw=host-gateway"),
        },
        "mynet",
    )
    assert hc["PortBindings"] == {
        "80/tcp": [{"HostIp": "", "HostPort": "8080"}],
        "53/udp": [{"HostIp": "", "HostPort": ""}],
    }
    assert hc["PublishAllPorts"] is True and hc["Dns"] == ["10.0.0.53"]
    assert hc["ExtraHosts"] == ["db:10.0.0.5", "gw:host-gateway"]
    assert set(cfg["ExposedPorts"]) == {"80/tcp", "53/udp", "9000/tcp", "9001/tcp"}
    assert cfg["NetworkingConfig"] == {
        "EndpointsConfig": {
            "mynet": {"Aliases": ["web"], "IPAMConfig": {"IPv4Address": "10.9.0.9"}}
        }
    }
    with pytest.raises(click.UsageError):
        network_config_from_flags({"network_aliases": ("x",)}, None)


def test_port_keys() -> None:
    assert parse_port_key("80") == (80, "tcp") and parse_port_key("53/UDP") == (53, "udp")
    assert parse_host_port("") == (0, 0) and parse_host_port("8000-8010") == (8000, 8010)
    for bad in ("80/icmp", "0/tcp", "x/tcp"):
        with pytest.raises(InvalidArgument):
            parse_port_key(bad)
    with pytest.raises(InvalidArgument, match="invalid hostPort: 9-1"):
        parse_host_port("9-1")


def test_mac_is_dockers() -> None:
    assert mac_for("172.17.0.2") == "02:42:ac:11:00:02"


def test_rules_text() -> None:
    a = NetworkInfo(id="a", name="a", driver="bridge", subnet="10.1.0.0/24", bridge="br-a")
    b = NetworkInfo(
        id="b", name="b", driver="bridge", subnet="10.2.0.0/24", bridge="br-b", internal=True
    )
    ep = EndpointInfo(
        id="e",
        network_id="a",
        container_id="c",
        address="10.1.0.2",
        ports=[PortMapping("tcp", 80, "0.0.0.0", 8080), PortMapping("udp", 53, "127.0.0.1", 53)],
    )
    hidden = EndpointInfo(
        id="f",
        network_id="b",
        container_id="d",
        address="10.2.0.2",
        ports=[PortMapping("tcp", 80, "0.0.0.0", 9090)],
    )
    text = render("pallet_t", [a, b], [ep, hidden])
    assert text.startswith("table ip pallet_t {")
    assert "tcp dport 8080 dnat to 10.1.0.2:80" in text
    assert "ip daddr 127.0.0.1 udp dport 53 dnat to 10.1.0.2:53" in text
    assert "9090" not in text  # nothing is published from an internal network
    assert 'ip saddr 10.1.0.0/24 oifname != "br-a" masquerade' in text
    assert "10.2.0.0/24 oifname" not in text  # internal: no masquerade
    assert 'iifname "br-a" oifname { "br-b" } drop' in text  # isolation
    assert 'iifname "br-b" oifname != "br-b" drop' in text  # internal
    assert 'oifname "br-a" ip saddr 127.0.0.0/8 masquerade' in text  # 127.0.0.1 path


def test_dns_messages() -> None:
    query = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x04test\x00\x00\x01\x00\x01"
    q = _dns_question(query)
    assert q == ("web.test", 1, len(query))
    reply = _dns_answer(query, q[2], 0, ["10.0.0.7"])
    assert reply[:2] == b"\xab\xcd"
    flags, qd, an = struct.unpack("!HHH", reply[2:8])
    assert flags & 0x8000 and flags & 0x0F == 0 and (qd, an) == (1, 1)
    assert reply.endswith(socket.inet_aton("10.0.0.7"))
    assert _dns_question(b"\x00" * 5) is None
    assert _dns_question(query[:-3]) is None  # truncated question
    pointer = query[:12] + b"\xc0\x0c\x00\x01\x00\x01"
    assert _dns_question(pointer) is None  # no compression in questions
