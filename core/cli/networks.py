"""``pallet network ...``, ``pallet port``, and the network flags of ``run``/``create``
(``-p``, ``-P``, ``--expose``, ``--network-alias``, ``--ip``, ``--dns*``, ``--add-host``).

On the path of ``pallet run``: click only at the top."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from pallet.cli._common import _client, _each, _err, _filters

F = TypeVar("F", bound=Callable[..., Any])


# --- run / create flags ------------------------------------------------------------------


def network_options(f: F) -> F:
    """Decorate ``run``/``create`` with the network flags."""
    options = [
        click.option(
            "-p",
            "--publish",
            "publish",
            multiple=True,
            metavar="LIST",
            help="Publish a container's port(s) to the host.",
        ),
        click.option(
            "-P",
            "--publish-all",
            is_flag=True,
            help="Publish all exposed ports to random ports.",
        ),
        click.option("--expose", multiple=True, metavar="LIST", help="Expose a port or a range."),
        click.option(
            "--network-alias",
            "network_aliases",
            multiple=True,
            metavar="LIST",
            help="Add network-scoped alias for the container.",
        ),
        click.option("--ip", "ip_address", help="IPv4 address (e.g., 172.30.100.104)."),
        click.option("--dns", multiple=True, metavar="LIST", help="Set custom DNS servers."),
        click.option("--dns-search", multiple=True, metavar="LIST", help="Set DNS searches."),
        click.option(
            "--dns-option", "dns_options", multiple=True, metavar="LIST", help="Set DNS options."
        ),
        click.option(
            "--add-host",
            "add_hosts",
            multiple=True,
            metavar="LIST",
            help="Add a custom host-to-IP mapping (host:ip).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _port_range(text: str, what: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        start = int(lo)
        end = int(hi) if sep else start
    except ValueError:
        raise click.UsageError(f"invalid {what}: {text}") from None
    if not (0 < start <= end < 65536):
        raise click.UsageError(f"invalid {what}: {text}")
    return start, end


def parse_publish(spec: str) -> list[tuple[str, str, str]]:
    """``[ip:][hostPort:]containerPort[/proto]`` -> [(port/proto, host ip, host port)]."""
    rest, _, proto = spec.rpartition("/") if "/" in spec else (spec, "", "tcp")
    proto = proto.lower() or "tcp"
    if proto not in ("tcp", "udp", "sctp"):
        raise click.UsageError(f"invalid proto: {proto}")
    parts = rest.split(":")
    if len(parts) == 1:
        ip, host, container = "", "", parts[0]
    elif len(parts) == 2:
        ip, host, container = "", parts[0], parts[1]
    elif len(parts) == 3:
        ip, host, container = parts
    else:
        raise click.UsageError(f"invalid port format: {spec}")
    if not container:
        raise click.UsageError(f"no port specified: {spec}<empty>")
    c_lo, c_hi = _port_range(container, "containerPort")
    if host:
        h_lo, h_hi = _port_range(host, "hostPort")
        if c_hi - c_lo not in (0, h_hi - h_lo) and c_lo != c_hi:
            raise click.UsageError(f"invalid ranges specified for container and host Ports: {spec}")
    out = []
    for i, port in enumerate(range(c_lo, c_hi + 1)):
        if not host:
            hp = ""
        elif c_lo == c_hi:
            hp = host  # one container port, maybe a host range to pick from
        else:
            hp = str(h_lo + i)
        out.append((f"{port}/{proto}", ip.strip("[]"), hp))
    return out


def network_config_from_flags(
    opts: dict[str, Any], network: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HostConfig fields, container Config fields incl. NetworkingConfig)."""
    hc: dict[str, Any] = {}
    cfg: dict[str, Any] = {}
    exposed: dict[str, Any] = {}
    bindings: dict[str, list[dict[str, str]]] = {}
    for spec in opts.get("publish") or ():
        for key, host_ip, host_port in parse_publish(spec):
            exposed[key] = {}
            bindings.setdefault(key, []).append({"HostIp": host_ip, "HostPort": host_port})
    for spec in opts.get("expose") or ():
        port, _, proto = spec.partition("/")
        lo, hi = _port_range(port, "port")
        for p in range(lo, hi + 1):
            exposed[f"{p}/{(proto or 'tcp').lower()}"] = {}
    if exposed:
        cfg["ExposedPorts"] = exposed
    if bindings:
        hc["PortBindings"] = bindings
    if opts.get("publish_all"):
        hc["PublishAllPorts"] = True
    if opts.get("dns"):
        hc["Dns"] = list(opts["dns"])
    if opts.get("dns_search"):
        hc["DnsSearch"] = list(opts["dns_search"])
    if opts.get("dns_options"):
        hc["DnsOptions"] = list(opts["dns_options"])
    if opts.get("add_hosts"):
        hosts = []
        for item in opts["add_hosts"]:
            name, sep, addr = item.partition("=") if "=" in item else item.partition(":")
            if not sep or not name or not addr:
                raise click.UsageError(f"bad format for add-host: {item!r}")
            hosts.append(f"{name}:{addr}")
        hc["ExtraHosts"] = hosts
    aliases = list(opts.get("network_aliases") or ())
    ip = opts.get("ip_address")
    if network and not network.startswith("container:") and network not in ("host", "none"):
        endpoint: dict[str, Any] = {}
        if aliases:
            endpoint["Aliases"] = aliases
        if ip:
            endpoint["IPAMConfig"] = {"IPv4Address": ip}
        cfg["NetworkingConfig"] = {"EndpointsConfig": {network: endpoint}}
    elif aliases or ip:
        raise click.UsageError(
            "network-scoped aliases and --ip are supported only for containers in user "
            "defined networks (--network)"
        )
    return hc, cfg


# --- pallet port -----------------------------------------------------------------------------


@click.command(short_help="List port mappings or a specific mapping for the container.")
@click.argument("container")
@click.argument("private_port", required=False)
def port(container: str, private_port: str | None) -> None:
    """List port mappings or a specific mapping for the container."""
    info = _client().get(f"/containers/{container}/json")
    ports = (info.get("NetworkSettings") or {}).get("Ports") or {}
    if private_port:
        key = private_port if "/" in private_port else f"{private_port}/tcp"
        bindings = ports.get(key)
        if not bindings:
            _err(f"Error: No public port '{key}' published for {container}")
            sys.exit(1)
        for b in bindings:
            click.echo(f"{b['HostIp']}:{b['HostPort']}")
        return

    def order(key: str) -> tuple[int, str]:
        p, _, proto = key.partition("/")
        return int(p) if p.isdigit() else 0, proto

    for key in sorted(ports, key=order):
        for b in ports[key] or []:
            click.echo(f"{key} -> {b['HostIp']}:{b['HostPort']}")


# --- pallet network ----------------------------------------------------------------------------

_LS_TABLE = "table {{.ID}}\t{{.Name}}\t{{.Driver}}\t{{.Scope}}"
_LS_HEADERS = {
    "ID": "NETWORK ID",
    "Name": "NAME",
    "Driver": "DRIVER",
    "Scope": "SCOPE",
    "IPv6": "IPV6",
    "Internal": "INTERNAL",
    "CreatedAt": "CREATED AT",
    "Labels": "LABELS",
}


@click.group(short_help="Manage networks.")
def network() -> None:
    """Manage networks."""


@network.command("create", short_help="Create a network.")
@click.option("-d", "--driver", default="bridge", help="Driver to manage the Network.")
@click.option("--subnet", "subnets", multiple=True, help="Subnet in CIDR format.")
@click.option("--gateway", "gateways", multiple=True, help="IPv4 Gateway for the subnet.")
@click.option("--ip-range", "ip_ranges", multiple=True, help="Allocate from a sub-range.")
@click.option("--internal", is_flag=True, help="Restrict external access to the network.")
@click.option("--attachable", is_flag=True, help="Enable manual container attachment.")
@click.option("--ipv6", is_flag=True, help="Enable IPv6 networking.")
@click.option("-o", "--opt", "opts", multiple=True, help="Set driver specific options.")
@click.option("--label", "labels", multiple=True, help="Set metadata on a network.")
@click.option("--ipam-driver", default="default", help="IP Address Management Driver.")
@click.argument("name")
def create(
    driver: str,
    subnets: tuple[str, ...],
    gateways: tuple[str, ...],
    ip_ranges: tuple[str, ...],
    internal: bool,
    attachable: bool,
    ipv6: bool,
    opts: tuple[str, ...],
    labels: tuple[str, ...],
    ipam_driver: str,
    name: str,
) -> None:
    """Create a network."""
    if len(gateways) > len(subnets):
        raise click.UsageError("every ip-range or gateway must have a corresponding subnet")
    pools = []
    for i, subnet in enumerate(subnets):
        pool = {"Subnet": subnet}
        if i < len(gateways):
            pool["Gateway"] = gateways[i]
        if i < len(ip_ranges):
            pool["IPRange"] = ip_ranges[i]
        pools.append(pool)
    body = {
        "Name": name,
        "Driver": driver,
        "Internal": internal,
        "Attachable": attachable,
        "EnableIPv6": ipv6,
        "IPAM": {"Driver": ipam_driver, "Config": pools, "Options": {}},
        "Options": dict(o.partition("=")[::2] for o in opts),
        "Labels": dict(o.partition("=")[::2] for o in labels),
    }
    result = _client().post("/networks/create", json_body=body)
    click.echo(result["Id"])


@network.command("ls", short_help="List networks.")
@click.option("-q", "--quiet", is_flag=True, help="Only display network IDs.")
@click.option("--no-trunc", is_flag=True, help="Do not truncate the output.")
@click.option("-f", "--filter", "filters", multiple=True, help="Provide filter values.")
@click.option("--format", "fmt", help="Format output using a Go template (or 'table ...').")
def ls(quiet: bool, no_trunc: bool, filters: tuple[str, ...], fmt: str | None) -> None:
    """List networks."""
    from pallet.cli.format import format_rows

    found = _client().get("/networks", {"filters": _filters(filters)}) or []
    found.sort(key=lambda n: n["Name"])
    rows = [
        {
            "ID": n["Id"] if no_trunc else n["Id"][:12],
            "Name": n["Name"],
            "Driver": n["Driver"],
            "Scope": n.get("Scope", "local"),
            "IPv6": str(bool(n.get("EnableIPv6"))).lower(),
            "Internal": str(bool(n.get("Internal"))).lower(),
            "CreatedAt": n.get("Created", ""),
            "Labels": ",".join(f"{k}={v}" for k, v in (n.get("Labels") or {}).items()),
        }
        for n in found
    ]
    if quiet:
        fmt = "{{.ID}}"
    elif not fmt or fmt == "table":
        fmt = _LS_TABLE
    click.echo(format_rows(fmt, rows, _LS_HEADERS), nl=False)


@network.command("inspect", short_help="Display detailed information on one or more networks.")
@click.option("-f", "--format", "fmt", help="Format output using a Go template.")
@click.option("-v", "--verbose", is_flag=True, help="Verbose output for diagnostics.")
@click.argument("networks", nargs=-1, required=True)
def inspect(fmt: str | None, verbose: bool, networks: tuple[str, ...]) -> None:
    """Display detailed information on one or more networks."""
    import json

    from pallet.cli.format import _render, _template

    client = _client()
    tpl = _template(fmt) if fmt else None
    results: list[Any] = []

    def one(name: str) -> None:
        obj = client.get(f"/networks/{name}")
        if tpl is not None:
            click.echo(_render(tpl, obj))
        else:
            results.append(obj)

    try:
        _each(networks, one)
    finally:
        if tpl is None:
            click.echo(json.dumps(results, indent=4, ensure_ascii=False))


@network.command("rm", short_help="Remove one or more networks.")
@click.option("-f", "--force", is_flag=True, help="Do not error if the network does not exist.")
@click.argument("networks", nargs=-1, required=True)
def rm(force: bool, networks: tuple[str, ...]) -> None:
    """Remove one or more networks."""
    from pallet.client import APIError

    client = _client()

    def one(name: str) -> None:
        try:
            client.delete(f"/networks/{name}")
        except APIError as exc:
            if force and exc.status == 404:
                return
            raise
        click.echo(name)

    _each(networks, one)


@network.command("connect", short_help="Connect a container to a network.")
@click.option("--alias", "aliases", multiple=True, help="Add network-scoped alias.")
@click.option("--ip", "ip_address", help="IPv4 address (e.g., 172.30.100.104).")
@click.argument("network_name", metavar="NETWORK")
@click.argument("container")
def connect(
    aliases: tuple[str, ...], ip_address: str | None, network_name: str, container: str
) -> None:
    """Connect a container to a network."""
    endpoint: dict[str, Any] = {}
    if aliases:
        endpoint["Aliases"] = list(aliases)
    if ip_address:
        endpoint["IPAMConfig"] = {"IPv4Address": ip_address}
    _client().post(
        f"/networks/{network_name}/connect",
        json_body={"Container": container, "EndpointConfig": endpoint or None},
    )


@network.command("disconnect", short_help="Disconnect a container from a network.")
@click.option("-f", "--force", is_flag=True, help="Force the container to disconnect.")
@click.argument("network_name", metavar="NETWORK")
@click.argument("container")
def disconnect(force: bool, network_name: str, container: str) -> None:
    """Disconnect a container from a network."""
    _client().post(
        f"/networks/{network_name}/disconnect",
        json_body={"Container": container, "Force": force},
    )


@network.command("prune", short_help="Remove all unused networks.")
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.option("--filter", "filters", multiple=True, help="Provide filter values.")
def prune(force: bool, filters: tuple[str, ...]) -> None:
    """Remove all unused networks."""
    if not force:
        click.echo(
            "WARNING! This will remove all custom networks not used by at least one container.\n"
            "Are you sure you want to continue? [y/N] ",
            nl=False,
        )
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            return
    result = _client().post("/networks/prune", {"filters": _filters(filters)}) or {}
    deleted = result.get("NetworksDeleted") or []
    if deleted:
        click.echo("Deleted Networks:")
        for name in deleted:
            click.echo(name)
