"""Networking on real bridges, veths, namespaces and nftables: the default bridge,
published ports (fetched on 127.0.0.1), user networks with name resolution and
isolation, host/none/container modes, Docker's errors, restart and crash recovery.

One daemon per module with its own default bridge and subnets unique to the run;
traffic goes only to 127.0.0.1 or to the test's own containers. Every test counts
veths, rules and leases before and after: equal.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon

DOCKER = shutil.which("docker") or "/usr/local/bin/docker"
# busybox 1.35's wget crashes on -T: timeouts come from `timeout`, never as the container's
# pid 1 (which ignores the SIGTERM that `timeout` sends).
HTTPD = "mkdir -p /www && echo {text} > /www/index.html && exec httpd -f -p 80 -h /www"


def _subnet() -> str:
    """A random 10.x.y (/24) that no route of the host covers yet."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    taken = [
        ipaddress.ip_network(line.split()[0], strict=False)
        for line in routes.splitlines()
        if line and line.split()[0] != "default"
    ]
    while True:
        prefix = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        net = ipaddress.ip_network(f"{prefix}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return prefix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(url: str) -> str:
    """GET from the host (only ever 127.0.0.1 here)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return str(r.read().decode())


def wait_log(n: Net, ref: str, text: str, after: int = 0) -> bool:
    """Until ``text`` shows in a log line past the first ``after`` lines (or the
    container exits)."""
    while True:
        lines = n.d.cli("logs", ref).stdout.splitlines()[after:]
        if any(text in line for line in lines):
            return True
        if not n.inspect(ref)["State"]["Running"]:
            return False
        time.sleep(0.2)


class Net:
    """Helpers bound to one daemon: counts of what networking leaves on the host."""

    def __init__(self, d: Daemon, tag: str) -> None:
        self.d = d
        self.tag = tag
        self.table = "pallet_" + d.bridge

    def bridges(self) -> list[str]:
        _, nets = self.d.api("GET", "/networks")
        return [n["Options"].get("com.docker.network.bridge.name", "") for n in nets] + [
            f"br-{n['Id'][:12]}" for n in nets if n["Driver"] == "bridge"
        ]

    def veths(self) -> list[str]:
        """Host links enslaved to this daemon's bridges."""
        bridges = {b for b in self.bridges() if b}
        found = []
        for link in Path("/sys/class/net").iterdir():
            master = link / "master"
            if master.exists() and os.path.basename(os.readlink(master)) in bridges:
                found.append(link.name)
        return sorted(found)

    def links_of(self, cid: str) -> list[str]:
        """Host links whose alias names container ``cid`` (what the driver made for it)."""
        out = []
        for link in Path("/sys/class/net").iterdir():
            try:
                alias = (link / "ifalias").read_text().strip()
            except OSError:
                continue
            if alias.startswith(f"pallet {cid[:12]}"):
                out.append(link.name)
        return out

    def rules(self) -> int:
        r = subprocess.run(["nft", "-j", "list", "table", "ip", self.table], capture_output=True)
        if r.returncode != 0:
            return 0
        return sum(1 for item in json.loads(r.stdout)["nftables"] if "rule" in item)

    def leases(self) -> int:
        db = sqlite3.connect(self.d.data_root / "network" / "network.db")
        try:
            return int(db.execute("SELECT COUNT(*) FROM leases").fetchone()[0])
        finally:
            db.close()

    def counts(self) -> tuple[int, int, int]:
        return len(self.veths()), self.rules(), self.leases()

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.d.cli("run", *args, check=check)

    def inspect(self, ref: str) -> dict[str, Any]:
        status, doc = self.d.api("GET", f"/containers/{ref}/json")
        assert status == 200, doc
        return doc  # type: ignore[no-any-return]

    def rm(self, *refs: str) -> None:
        for ref in refs:
            self.d.api("DELETE", f"/containers/{ref}?force=1")

    def network_create(self, name: str, subnet: str, *extra: str) -> str:
        r = self.d.cli("network", "create", "--subnet", f"{subnet}.0/24", *extra, name)
        return r.stdout.strip()


class Upstream:
    """A DNS server on 127.0.0.1 standing in for the host's resolvers (the daemon's
    ``--dns``): ``upstream.example`` is 192.0.2.7 (never contacted), all else NXDOMAIN."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.asked: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            labels, i = [], 12
            while data[i]:
                labels.append(data[i + 1 : i + 1 + data[i]].decode())
                i += 1 + data[i]
            name, qtype, end = ".".join(labels).lower(), data[i + 2], i + 5
            self.asked.append(name)
            found = name == "upstream.example" and qtype == 1
            flags = 0x8180 | (0 if name == "upstream.example" else 3)
            reply = data[:2] + struct.pack("!HHHHH", flags, 1, int(found), 0, 0) + data[12:end]
            if found:
                reply += struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + bytes([192, 0, 2, 7])
            self.sock.sendto(reply, addr)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Iterator[Net]:
    tag = uuid.uuid4().hex[:6]
    upstream = Upstream()  # name lookups never leave the machine
    d = Daemon(
        tmp_path_factory.mktemp("palletd-net"),
        None,
        ["--bip", f"{_subnet()}.1/24", "--dns", f"127.0.0.1:{upstream.port}"],
    )
    d.upstream = upstream  # type: ignore[attr-defined]
    d.start()
    try:
        d.import_busybox(busybox_tar)
        n = Net(d, tag)
        yield n
    finally:
        bridges: list[str] = []
        if d.proc is not None and d.proc.poll() is None:
            bridges = [b for b in Net(d, tag).bridges() if b]
            _, found = d.api("GET", "/containers/json?all=1")
            for c in found or []:
                d.api("DELETE", f"/containers/{c['Id']}?force=1")
        table = "pallet_" + d.bridge
        d.stop()
        # A stopped daemon with no live endpoint leaves no bridge and no table.
        left = [b for b in bridges if Path(f"/sys/class/net/{b}").exists()]
        r = subprocess.run(["nft", "list", "table", "ip", table], capture_output=True)
        d.cleanup()
        upstream.close()
        assert bridges and not left, f"bridges left behind: {left}"
        assert r.returncode != 0, f"nftables table {table} left behind"


@pytest.fixture
def counted(net: Net) -> Iterator[Net]:
    """Veths, rules and leases are the same after the test (its containers removed)."""
    before = net.counts()
    yield net
    _, found = net.d.api("GET", "/containers/json?all=1")
    for c in found or []:
        net.rm(c["Id"])
    _, nets = net.d.api("GET", "/networks")
    for n in nets:
        if n["Name"] not in ("bridge", "host", "none"):
            net.d.api("DELETE", f"/networks/{n['Id']}")
    assert net.counts() == before


def test_default_bridge_serves_and_publishes(counted: Net) -> None:
    n = counted
    port = free_port()
    n.run("-d", "--name", "web", "-p", f"{port}:80", "busybox", "sh", "-c", HTTPD.format(text="hi"))
    doc = n.inspect("web")
    ns = doc["NetworkSettings"]
    ip = ns["IPAddress"]
    bridge = ns["Networks"]["bridge"]
    assert ip and ip == bridge["IPAddress"] and ns["Gateway"] == bridge["Gateway"]
    assert ns["MacAddress"] == "02:42:" + ":".join(f"{int(b):02x}" for b in ip.split("."))
    assert ns["Ports"] == {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}]}
    # The container's own view: eth0 with the address, the MTU, the default route.
    out = n.run("--rm", "-h", "probe", "busybox", "sh", "-c", "ip -o addr show eth0; ip route")
    assert f"default via {ns['Gateway']} dev eth0" in out.stdout
    assert "inet " + ns["Gateway"].rsplit(".", 1)[0] + "." in out.stdout
    hosts = n.run("--rm", "-h", "probe", "busybox", "cat", "/etc/hosts").stdout
    assert hosts.splitlines()[0] == "127.0.0.1\tlocalhost" and hosts.rstrip().endswith("\tprobe")
    # Another container fetches it over the bridge; the host fetches the published port.
    for _ in range(50):
        r = n.run(
            "--rm", "busybox", "sh", "-c", f"timeout 5 wget -qO- http://{ip}/ && echo", check=False
        )
        if r.returncode == 0:
            break
        time.sleep(0.2)
    assert r.stdout.strip() == "hi", r.stderr
    assert fetch(f"http://127.0.0.1:{port}/").strip() == "hi"
    # Through the host's address on the bridge: another container, and web itself
    # (hairpin), reach the published port.
    gw = ns["Gateway"]
    url = f"http://{gw}:{port}/"
    r = n.run("--rm", "busybox", "sh", "-c", f"timeout 10 wget -qO- {url} && echo", check=False)
    assert r.stdout.strip() == "hi", r.stderr
    own = free_port()
    script = (
        f"({HTTPD.format(text='itself')}) & sleep 1; "
        f"timeout 10 wget -qO- http://{gw}:{own}/; echo; echo hairpin-done; sleep 600"
    )
    n.run("-d", "--name", "hairpin", "-p", f"{own}:80", "busybox", "sh", "-c", script)
    assert wait_log(n, "hairpin", "hairpin-done")
    assert "itself" in n.d.cli("logs", "hairpin").stdout
    assert n.d.cli("port", "web").stdout == f"80/tcp -> 0.0.0.0:{port}\n"
    assert n.d.cli("port", "web", "80").stdout == f"0.0.0.0:{port}\n"
    assert f"0.0.0.0:{port}->80/tcp" in n.d.cli("ps").stdout
    mtu = n.run("--rm", "busybox", "cat", "/sys/class/net/eth0/mtu").stdout.strip()
    assert mtu == "1500"
    # An ephemeral host port (-p 80) and -P with --expose.
    n.run("-d", "--name", "web2", "-p", "80", "--expose", "81", "-P", "busybox", "sleep", "600")
    ports = n.inspect("web2")["NetworkSettings"]["Ports"]
    assert set(ports) == {"80/tcp", "81/tcp"}
    assert all(int(b[0]["HostPort"]) > 1024 for b in ports.values())
    assert n.rules() > 0
    # Removing the container removes its veth, its rules and its lease.
    cid = doc["Id"]
    assert n.links_of(cid)
    n.rm("web")
    assert not n.links_of(cid)
    r = subprocess.run(["nft", "list", "table", "ip", n.table], capture_output=True, text=True)
    assert f"dport {port} " not in r.stdout


def test_port_in_use_and_allocated(counted: Net) -> None:
    n = counted
    before = n.counts()
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen(1)
        port = held.getsockname()[1]
        r = n.run(
            "-d", "--name", "clash", "-p", f"{port}:80", "busybox", "sleep", "60", check=False
        )
        assert r.returncode != 0
        assert f"0.0.0.0:{port}: bind: address already in use" in r.stderr, r.stderr
        assert "driver failed programming external connectivity on endpoint clash" in r.stderr
        assert not n.inspect("clash")["State"]["Running"]
        assert n.counts() == before
    port = free_port()
    n.run("-d", "--name", "first", "-p", f"{port}:80", "busybox", "sleep", "600")
    r = n.run("-d", "--name", "second", "-p", f"{port}:80", "busybox", "sleep", "60", check=False)
    assert f"Bind for 0.0.0.0:{port} failed: port is already allocated" in r.stderr, r.stderr
    # Stopping the first frees the port for the second.
    n.d.cli("stop", "-t", "0", "first")
    n.d.cli("start", "second")
    assert n.inspect("second")["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"] == str(port)
    assert n.inspect("first")["NetworkSettings"]["IPAddress"] == ""


def test_user_networks_resolve_names_and_are_isolated(counted: Net) -> None:
    n = counted
    a_sub, b_sub = _subnet(), _subnet()
    while b_sub == a_sub:
        b_sub = _subnet()
    a = f"neta-{n.tag}"
    b = f"netb-{n.tag}"
    a_id = n.network_create(a, a_sub)
    n.network_create(b, b_sub, "--gateway", f"{b_sub}.254")
    info = json.loads(n.d.cli("network", "inspect", b).stdout)[0]
    assert info["IPAM"]["Config"] == [{"Subnet": f"{b_sub}.0/24", "Gateway": f"{b_sub}.254"}]
    r_sub = _subnet()
    rng = f"rng-{n.tag}"
    n.network_create(rng, r_sub, "--ip-range", f"{r_sub}.128/25")
    out = n.run("--rm", "--network", rng, "busybox", "ip", "-o", "-4", "addr", "show", "eth0")
    assert f"inet {r_sub}.128/24" in out.stdout
    n.d.cli("network", "rm", rng)
    assert a in n.d.cli("network", "ls").stdout
    n.run("-d", "--name", "srv", "--network", a, "--network-alias", "webalias", "busybox", "sh",
          "-c", HTTPD.format(text="from-a"))  # fmt: skip
    srv = n.inspect("srv")["NetworkSettings"]
    srv_ip = srv["Networks"][a]["IPAddress"]
    assert srv_ip.startswith(a_sub + ".") and srv["IPAddress"] == ""  # as Docker: bridge only
    assert srv["Networks"][a]["NetworkID"] == a_id
    assert srv_ip in json.dumps(n.d.api("GET", f"/networks/{a}")[1]["Containers"])
    # Same network: names and aliases resolve through 127.0.0.11; HTTP by name works.
    script = (
        "cat /etc/resolv.conf; nslookup srv; "
        "for i in $(seq 20); do timeout 5 wget -qO- http://srv/ && break; sleep 0.2; done; "
        "timeout 5 wget -qO- http://webalias/"
    )
    r = n.run("--rm", "--network", a, "busybox", "sh", "-c", script, check=False)
    assert "nameserver 127.0.0.11" in r.stdout
    assert srv_ip in r.stdout
    ptr = n.run("--rm", "--network", a, "busybox", "nslookup", srv_ip, check=False)
    assert f"name = srv.{a}" in ptr.stdout, ptr.stdout + ptr.stderr  # reverse lookup
    assert r.stdout.count("from-a") == 2, r.stdout + r.stderr
    # Other names go to the upstream resolvers (here the test's, on 127.0.0.1); unknown
    # names are not invented.
    r = n.run("--rm", "--network", a, "busybox", "nslookup", "upstream.example", check=False)
    assert "192.0.2.7" in r.stdout, r.stdout + r.stderr
    r = n.run("--rm", "--network", a, "busybox", "nslookup", "no-such-name-here", check=False)
    assert srv_ip not in r.stdout and "NXDOMAIN" in r.stdout
    assert "no-such-name-here" in n.d.upstream.asked  # type: ignore[attr-defined]
    assert "srv" not in n.d.upstream.asked  # type: ignore[attr-defined]
    # Another network: the name does not resolve and the address is unreachable,
    # although the host forwards (ip_forward=1) and routes to both bridges.
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    r = n.run("--rm", "--network", b, "busybox", "sh", "-c",
              f"nslookup srv; timeout 3 wget -qO- http://{srv_ip}/; echo rc=$?", check=False)  # fmt: skip
    assert "from-a" not in r.stdout and "rc=0" not in r.stdout and "rc=" in r.stdout
    # Connected to both (network connect, live): eth1 appears and reaches srv by name.
    script = (
        "while [ ! -e /sys/class/net/eth1 ]; do sleep 0.1; done; "
        "for i in $(seq 50); do timeout 5 wget -qO- http://srv/ && break; sleep 0.2; done; sleep 600"
    )
    n.run("-d", "--name", "both", "--network", b, "busybox", "sh", "-c", script)
    n.d.cli("network", "connect", a, "both")
    doc = n.inspect("both")["NetworkSettings"]["Networks"]
    assert set(doc) == {a, b} and doc[a]["IPAddress"].startswith(a_sub + ".")
    on_a = n.d.cli("ps", "--filter", f"network={a}", "--format", "{{.Names}}").stdout.split()
    assert sorted(on_a) == ["both", "srv"]
    assert wait_log(n, "both", "from-a")
    # The resolver answers over TCP too (asked from inside "both"'s namespace).
    from pallet.network import run_in_netns

    def ask_tcp() -> bytes:
        query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03srv\x00\x00\x01\x00\x01"
        with socket.create_connection(("127.0.0.11", 53), timeout=30) as c:
            c.sendall(struct.pack("!H", len(query)) + query)
            size = struct.unpack("!H", c.recv(2))[0]
            data = b""
            while len(data) < size:
                data += c.recv(size - len(data))
            return data

    pid = n.inspect("both")["State"]["Pid"]
    answer = run_in_netns(f"/proc/{pid}/ns/net", ask_tcp)
    assert answer[:2] == b"\x12\x34" and answer.endswith(socket.inet_aton(srv_ip))
    # A container of the default bridge connected to a user network gets the resolver.
    n.run("-d", "--name", "late", "busybox", "sleep", "600")
    resolv = Path(n.inspect("late")["ResolvConfPath"])
    assert "127.0.0.11" not in resolv.read_text()
    n.d.cli("network", "connect", a, "late")
    assert "nameserver 127.0.0.11" in resolv.read_text()
    n.d.cli("network", "disconnect", a, "both")
    assert set(n.inspect("both")["NetworkSettings"]["Networks"]) == {b}
    # A network with containers attached cannot go; then it can.
    r = n.d.cli("network", "rm", a, check=False)
    assert r.returncode == 1 and "has active endpoints" in r.stderr
    n.rm("srv", "late")
    assert n.d.cli("network", "rm", a).stdout.strip() == a


def test_internal_network(counted: Net) -> None:
    n = counted
    sub = _subnet()
    name = f"int-{n.tag}"
    n.network_create(name, sub, "--internal")
    assert n.d.api("GET", f"/networks/{name}")[1]["Internal"] is True
    r = n.run("--rm", "--network", name, "busybox", "sh", "-c", "ip route", check=False)
    assert "default" not in r.stdout and f"{sub}.0/24" in r.stdout
    # Connected while stopped to the default bridge too: eth0 (internal, no route) and
    # eth1 (the bridge, which then gives the default route).
    n.d.cli("create", "--name", "two", "--network", name, "busybox", "sh", "-c",
            "ip -o addr; ip route; sleep 600")  # fmt: skip
    n.d.cli("network", "connect", "bridge", "two")
    n.d.cli("start", "two")
    ns = n.inspect("two")["NetworkSettings"]
    assert set(ns["Networks"]) == {name, "bridge"}
    assert wait_log(n, "two", "default via")
    out = n.d.cli("logs", "two").stdout
    assert ns["Networks"][name]["IPAddress"] in out
    assert ns["Networks"]["bridge"]["IPAddress"] in out
    assert f"default via {ns['Networks']['bridge']['Gateway']} dev eth1" in out


def test_errors(counted: Net) -> None:
    n = counted
    sub = _subnet()
    name = f"errs-{n.tag}"
    n.network_create(name, sub)
    before = n.d.api("GET", "/networks")[1]
    status, body = n.d.api(
        "POST", "/networks/create", {"Name": name + "x", "IPAM": {"Config": [{"Subnet": f"{sub}.128/25"}]}}
    )  # fmt: skip
    assert (status, body["message"]) == (403, "Pool overlaps with other one on this address space")
    status, body = n.d.api("POST", "/networks/create", {"Name": name})
    assert (status, body["message"]) == (409, f"network with name {name} already exists")
    status, body = n.d.api(
        "POST", "/networks/create", {"Name": name + "y", "IPAM": {"Config": [{"Subnet": "10.1.2.300/24"}]}}
    )  # fmt: skip
    assert status == 400 and "invalid subnet" in body["message"]
    status, body = n.d.api("POST", "/networks/create", {"Name": name + "z", "Driver": "nosuch"})
    assert (status, body["message"]) == (404, 'plugin "nosuch" not found')
    status, body = n.d.api("DELETE", "/networks/bridge")
    assert (status, body["message"]) == (
        403,
        "bridge is a pre-defined network and cannot be removed",
    )
    status, body = n.d.api("GET", "/networks/nosuch-net")
    assert (status, body["message"]) == (404, "network nosuch-net not found")
    r = n.run("--network", "nosuch-net", "busybox", "true", check=False)
    assert r.returncode == 125 and "network nosuch-net not found" in r.stderr
    r = n.run("--network-alias", "x", "busybox", "true", check=False)
    assert r.returncode != 0
    assert n.d.api("GET", "/networks")[1] == before


def test_host_none_and_container_modes(counted: Net) -> None:
    n = counted
    out = n.run("--rm", "--network", "none", "busybox", "ls", "/sys/class/net").stdout.split()
    assert out == ["lo"]
    doc_none = n.run("-d", "--network", "none", "busybox", "sleep", "600").stdout.strip()
    assert n.inspect(doc_none)["NetworkSettings"]["Networks"].keys() == {"none"}
    host = n.run("--rm", "--network", "host", "busybox", "ls", "/sys/class/net").stdout.split()
    assert n.d.bridge in host and "lo" in host
    assert n.run("--rm", "--network", "host", "busybox", "hostname").stdout.strip() == (
        socket.gethostname()
    )
    n.run("-d", "--name", "owner", "busybox", "sleep", "600")
    ip = n.inspect("owner")["NetworkSettings"]["IPAddress"]
    r = n.run("--rm", "--network", "container:owner", "busybox", "ip", "-o", "addr", "show", "eth0")
    assert f"inet {ip}/" in r.stdout
    # A stopped owner has no namespace to join.
    n.d.cli("stop", "-t", "0", "owner")
    r = n.run("--rm", "--network", "container:owner", "busybox", "true", check=False)
    assert "cannot join network of a non running container" in r.stderr


def test_docker_cli_drives_networks(counted: Net, tmp_path: Path) -> None:
    n = counted
    env = {**os.environ, "DOCKER_HOST": n.d.host, "DOCKER_CONFIG": str(tmp_path)}
    env.pop("DOCKER_CONTEXT", None)

    def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([DOCKER, *args], capture_output=True, text=True, env=env, timeout=120)
        if check:
            assert r.returncode == 0, f"docker {args}: {r.stderr}"
        return r

    sub = _subnet()
    name = f"dk-{n.tag}"
    docker("network", "create", "--subnet", f"{sub}.0/24", name)
    assert name in docker("network", "ls").stdout
    assert docker("network", "inspect", "-f", "{{.Driver}} {{.Internal}}", name).stdout == (
        "bridge false\n"
    )
    docker("run", "-d", "--name", "dk", "busybox", "sleep", "600")
    ip = docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "dk").stdout.strip()
    assert ip == n.inspect("dk")["NetworkSettings"]["IPAddress"] and ip
    docker("network", "connect", name, "dk")
    assert docker(
        "inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{name}").IPAddress}}}}', "dk"
    ).stdout.startswith(sub + ".")
    r = docker("network", "rm", name, check=False)
    assert r.returncode != 0 and "active endpoints" in r.stderr
    docker("network", "disconnect", name, "dk")
    docker("rm", "-f", "dk")
    docker("network", "rm", name)
    r = docker("network", "inspect", name, check=False)
    assert r.returncode != 0


def test_prune(counted: Net) -> None:
    n = counted
    used, unused = f"used-{n.tag}", f"unused-{n.tag}"
    n.network_create(used, _subnet())
    # Without --subnet: the first pool subnet that overlaps no network and no route.
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    n.d.cli("network", "create", unused)
    auto = n.d.api("GET", f"/networks/{unused}")[1]["IPAM"]["Config"][0]
    pool = ipaddress.ip_network(auto["Subnet"])
    assert ipaddress.ip_address(auto["Gateway"]) in pool
    for line in routes.splitlines():
        dst = line.split()[0]
        if dst != "default":
            assert not pool.overlaps(ipaddress.ip_network(dst, strict=False)), line
    n.d.cli("create", "--name", "holder", "--network", used, "busybox", "true")
    out = n.d.cli("network", "prune", "-f").stdout
    assert out == f"Deleted Networks:\n{unused}\n"
    names = [x["Name"] for x in n.d.api("GET", "/networks")[1]]
    assert used in names and unused not in names


def test_restart_keeps_addresses_and_crash_cleans(counted: Net) -> None:
    n = counted
    sub = _subnet()
    name = f"rs-{n.tag}"
    n.network_create(name, sub)
    port = free_port()
    n.run("-d", "--name", "keep", "--network", name, "-p", f"{port}:80", "busybox", "sh", "-c",
          HTTPD.format(text="kept"))  # fmt: skip
    probe = (
        "while true; do if timeout 2 wget -qO- http://keep/ >/tmp/o 2>/dev/null; "
        'then echo "ok $(cat /tmp/o)"; else echo fail; fi; sleep 0.3; done'
    )
    n.run("-d", "--name", "peer", "--network", name, "busybox", "sh", "-c", probe)
    assert wait_log(n, "peer", "ok kept")
    before = n.inspect("keep")["NetworkSettings"]["Networks"][name]
    counts = n.counts()
    # A clean stop with live-restore: endpoints stay, addresses stay, DNS comes back.
    n.d.stop()
    n.d.start()
    after = n.inspect("keep")["NetworkSettings"]["Networks"][name]
    assert (after["IPAddress"], after["EndpointID"]) == (before["IPAddress"], before["EndpointID"])
    assert n.counts() == counts
    assert fetch(f"http://127.0.0.1:{port}/").strip() == "kept"
    # The peer's embedded DNS is served again by the new daemon.
    seen = len(n.d.cli("logs", "peer").stdout.splitlines())
    assert wait_log(n, "peer", "ok kept", after=seen)
    # A killed daemon: the endpoints of the containers still running are re-adopted
    # (same address, the host port held again, DNS served again).
    n.d.stop(signal.SIGKILL)
    n.d.start()
    again = n.inspect("keep")["NetworkSettings"]["Networks"][name]
    assert again["IPAddress"] == before["IPAddress"] and n.counts() == counts
    assert fetch(f"http://127.0.0.1:{port}/").strip() == "kept"
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("0.0.0.0", port))
    seen = len(n.d.cli("logs", "peer").stdout.splitlines())
    assert wait_log(n, "peer", "ok kept", after=seen)
    # Killed daemon, and the container dies while it is away: cleaned at start.
    pid = n.inspect("keep")["State"]["Pid"]
    cid = n.inspect("keep")["Id"]
    n.d.stop(signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    n.d.start()
    deadline = time.monotonic() + 60
    while n.inspect("keep")["State"]["Running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not n.inspect("keep")["State"]["Running"]
    assert not n.links_of(cid)
    veths, rules, leases = n.counts()
    assert (veths, leases) == (counts[0] - 1, counts[2] - 1) and rules < counts[1]
    # The port is free again for someone else.
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))


def test_iptables_false_programs_nothing(make_daemon: Any, busybox_tar: Path) -> None:
    d = make_daemon(extra=["--no-iptables", "--bip", f"{_subnet()}.1/24", "--mtu", "1400"])
    d.import_busybox(busybox_tar)
    mtu = d.cli("run", "--rm", "busybox", "cat", "/sys/class/net/eth0/mtu").stdout.strip()
    assert mtu == "1400"  # the daemon's mtu, on the container's end of the veth
    port = free_port()
    d.cli("run", "-d", "--name", "plain", "-p", f"{port}:80", "busybox", "sleep", "600")
    ns = d.api("GET", "/containers/plain/json")[1]["NetworkSettings"]
    assert ns["IPAddress"] and ns["Ports"]["80/tcp"][0]["HostPort"] == str(port)
    r = subprocess.run(["nft", "list", "table", "ip", f"pallet_{d.bridge}"], capture_output=True)
    assert r.returncode != 0  # no table at all: no NAT, no DNAT, no isolation
    # The host port is still held, so nothing else takes it.
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("0.0.0.0", port))
