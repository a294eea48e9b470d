"""Graph commands on containers: diff, commit, export."""

from __future__ import annotations

import sys

import click
from pallet.cli._common import _client, _fail, split_reference

_KINDS = {0: "C", 1: "A", 2: "D"}


@click.command(short_help="Inspect changes on a container's filesystem.")
@click.argument("container")
def diff(container: str) -> None:
    for ch in _client().get(f"/containers/{container}/changes") or []:
        click.echo(f"{_KINDS.get(ch['Kind'], '?')} {ch['Path']}")


@click.command(short_help="Create a new image from a container's changes.")
@click.option(
    "-a", "--author", default="", help='Author (e.g., "John Hannibal Smith <hannibal@a-team.com>")'
)
@click.option(
    "-c",
    "--change",
    "changes",
    multiple=True,
    help="Apply Dockerfile instruction to the created image",
)
@click.option("-m", "--message", default="", help="Commit message")
@click.option(
    "-p/--pause", "--pause/--no-pause", "pause", default=True, help="Pause container during commit"
)
@click.argument("container")
@click.argument("repository", required=False)
def commit(
    author: str,
    changes: tuple[str, ...],
    message: str,
    pause: bool,
    container: str,
    repository: str | None,
) -> None:
    params: dict[str, object] = {
        "container": container,
        "comment": message,
        "author": author,
        "pause": "1" if pause else "0",
    }
    if repository:
        repo, tag = split_reference(repository)
        params["repo"] = repo
        params["tag"] = tag or "latest"
    if changes:
        params["changes"] = list(changes)
    res = _client().post("/commit", params)
    click.echo(res["Id"])


@click.command(short_help="Export a container's filesystem as a tar archive.")
@click.option("-o", "--output", default=None, help="Write to a file, instead of STDOUT")
@click.argument("container")
def export(output: str | None, container: str) -> None:
    if output is None and sys.stdout.isatty():
        _fail("cowardly refusing to save to a terminal. Use the -o flag or redirect")
    with _client().request("GET", f"/containers/{container}/export") as resp:
        out = open(output, "wb") if output else sys.stdout.buffer
        try:
            for chunk in resp.iter_raw():
                out.write(chunk)
        finally:
            if output:
                out.close()
            else:
                out.flush()
