"""``pallet volume create|ls|inspect|rm|prune``: docker's volume commands."""

from __future__ import annotations

import json
from typing import Any

import click
from pallet.cli._common import _client, _each, _filters


@click.group(short_help="Manage volumes.")
def volume() -> None:
    """Manage volumes."""


def _kv(items: tuple[str, ...], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        k, _sep, v = item.partition("=")
        if not k:
            raise click.BadParameter(f"invalid argument {item!r}", param_hint=flag)
        out[k] = v
    return out


@volume.command("create", short_help="Create a volume.")
@click.option("-d", "--driver", default="local", help="Specify volume driver name.")
@click.option("--label", "labels", multiple=True, help="Set metadata for a volume.")
@click.option("-o", "--opt", "opts", multiple=True, help="Set driver specific options.")
@click.argument("name", required=False)
def create(driver: str, labels: tuple[str, ...], opts: tuple[str, ...], name: str | None) -> None:
    """Create a volume."""

    def do(_: str) -> None:
        body = {
            "Name": name or "",
            "Driver": driver,
            "Labels": _kv(labels, "--label"),
            "DriverOpts": _kv(opts, "--opt"),
        }
        doc = _client().call("POST", "/volumes/create", json_body=body)
        click.echo(doc["Name"])

    _each([name or ""], do)


@volume.command("ls", short_help="List volumes.")
@click.option("-q", "--quiet", is_flag=True, help="Only display volume names.")
@click.option("-f", "--filter", "filters", multiple=True, help="Provide filter values.")
@click.option("--format", "fmt", help="Format output using a Go template.")
def ls(quiet: bool, filters: tuple[str, ...], fmt: str | None) -> None:
    """List volumes."""
    from pallet.cli.format import format_rows, tabwrite

    f = _filters(filters)
    params = {"filters": json.dumps(f)} if f else None
    vols = _client().get("/volumes", params).get("Volumes") or []
    if quiet:
        for v in vols:
            click.echo(v["Name"])
        return
    rows: list[dict[str, Any]] = [
        {
            "Driver": v["Driver"],
            "Name": v["Name"],
            "Mountpoint": v.get("Mountpoint", ""),
            "Scope": v.get("Scope", "local"),
            "Labels": ",".join(f"{k}={x}" for k, x in (v.get("Labels") or {}).items()),
        }
        for v in vols
    ]
    if fmt:
        click.echo(format_rows(fmt, rows, {"Driver": "DRIVER", "Name": "VOLUME NAME"}), nl=False)
        return
    lines = ["DRIVER\tVOLUME NAME"] + [f"{r['Driver']}\t{r['Name']}" for r in rows]
    click.echo(tabwrite(lines, minwidth=1, padding=3), nl=False)


@volume.command("inspect", short_help="Display detailed information on one or more volumes.")
@click.option("-f", "--format", "fmt", help="Format output using a Go template.")
@click.argument("names", nargs=-1, required=True)
def inspect(fmt: str | None, names: tuple[str, ...]) -> None:
    """Display detailed information on one or more volumes."""
    found: list[Any] = []

    def do(name: str) -> None:
        found.append(_client().get(f"/volumes/{name}"))

    try:
        _each(names, do)
    finally:
        if fmt:
            from pallet.cli.format import _render, _template

            tpl = _template(fmt)
            for v in found:
                click.echo(_render(tpl, v))
        elif found or not names:
            click.echo(json.dumps(found, indent=4))


@volume.command("rm", short_help="Remove one or more volumes.")
@click.option("-f", "--force", is_flag=True, help="Force the removal of one or more volumes.")
@click.argument("names", nargs=-1, required=True)
def rm(force: bool, names: tuple[str, ...]) -> None:
    """Remove one or more volumes."""

    def do(name: str) -> None:
        _client().delete(f"/volumes/{name}", {"force": "1" if force else None})
        click.echo(name)

    _each(names, do)


@volume.command("prune", short_help="Remove unused local volumes.")
@click.option(
    "-a", "--all", "all_", is_flag=True, help="Remove all unused volumes, not just anonymous ones."
)
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.option("--filter", "filters", multiple=True, help="Provide filter values.")
def prune(all_: bool, force: bool, filters: tuple[str, ...]) -> None:
    """Remove unused local volumes."""
    from pallet.cli.format import human_size

    if not force:
        what = "all local volumes" if all_ else "all anonymous local volumes"
        click.echo(f"WARNING! This will remove {what} not used by at least one container.")
        if not click.confirm(
            "Are you sure you want to continue?", default=False, prompt_suffix=" "
        ):
            return
    f = _filters(filters) or {}
    if all_:
        f["all"] = ["true"]
    params = {"filters": json.dumps(f)} if f else None
    body = _client().post("/volumes/prune", params)
    deleted = body.get("VolumesDeleted") or []
    if deleted:
        click.echo("Deleted Volumes:")
        for name in deleted:
            click.echo(name)
        click.echo("")
    click.echo(f"Total reclaimed space: {human_size(body.get('SpaceReclaimed') or 0)}")
