"""Image commands: images, import, tag, rmi."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import click
from pallet.cli._common import _client, _each, _fail, _filters, split_reference
from pallet.cli.format import (
    _local_time,
    display_jsonmessages,
    format_rows,
    human_duration,
    human_size,
    short_id,
)

_IMAGES_HEADERS = {
    "Repository": "REPOSITORY",
    "Tag": "TAG",
    "Digest": "DIGEST",
    "ID": "IMAGE ID",
    "CreatedSince": "CREATED",
    "CreatedAt": "CREATED AT",
    "Size": "SIZE",
    "Containers": "CONTAINERS",
}
_IMAGES_TABLE = "table {{.Repository}}\t{{.Tag}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}"


def _image_rows(images: list[dict[str, Any]], trunc: bool, now: float) -> list[dict[str, Any]]:
    rows = []
    for img in images:
        created = img.get("Created") or 0
        base = {
            "ID": short_id(img.get("Id") or "", trunc),
            "CreatedSince": human_duration(now - created) + " ago" if created else "N/A",
            "CreatedAt": _local_time(created) if created else "",
            "Size": human_size(img.get("Size") or 0),
            "Containers": "N/A"
            if (img.get("Containers") is None or img.get("Containers", -1) < 0)
            else str(img["Containers"]),
        }
        digests = [d for d in img.get("RepoDigests") or [] if "@" in d]
        digest_of = {d.partition("@")[0]: d.partition("@")[2] for d in digests}
        tags = [t for t in img.get("RepoTags") or [] if t != "<none>:<none>"]
        if not tags:
            if digests:
                for d in digests:
                    repo, _, digest = d.partition("@")
                    rows.append({**base, "Repository": repo, "Tag": "<none>", "Digest": digest})
            else:
                rows.append({**base, "Repository": "<none>", "Tag": "<none>", "Digest": "<none>"})
            continue
        for t in tags:
            repo, tag = split_reference(t)
            rows.append(
                {
                    **base,
                    "Repository": repo,
                    "Tag": tag or "<none>",
                    "Digest": digest_of.get(repo, "<none>"),
                }
            )
    return rows


@click.command(short_help="List images.")
@click.option("-a", "--all", "all_", is_flag=True, help="Show all images.")
@click.option("-q", "--quiet", is_flag=True, help="Only show image IDs.")
@click.option("--no-trunc", is_flag=True, help="Don't truncate output.")
@click.option("--digests", is_flag=True, help="Show digests.")
@click.option("-f", "--filter", "filters", multiple=True, help="Filter output (name=value).")
@click.option("--format", "fmt", help="Format output using a Go template (or 'table ...').")
@click.argument("reference", required=False)
def images(
    all_: bool,
    quiet: bool,
    no_trunc: bool,
    digests: bool,
    filters: tuple[str, ...],
    fmt: str | None,
    reference: str | None,
) -> None:
    """List images."""
    filt = _filters(filters) or {}
    if reference:
        filt.setdefault("reference", []).append(reference)
    params = {"all": 1 if all_ else None, "filters": filt or None}
    found = _client().get("/images/json", params) or []
    rows = _image_rows(found, not no_trunc, time.time())
    if quiet:
        fmt = "{{.ID}}"
    elif not fmt or fmt == "table":
        fmt = _IMAGES_TABLE
        if digests:
            fmt = fmt.replace("{{.Tag}}\t", "{{.Tag}}\t{{.Digest}}\t")
    click.echo(format_rows(fmt, rows, _IMAGES_HEADERS), nl=False)


@click.command("import", short_help="Import the contents from a tarball to create an image.")
@click.option(
    "-c", "--change", "changes", multiple=True, help="Apply Dockerfile instruction to the image."
)
@click.option("-m", "--message", help="Set commit message for imported image.")
@click.option("--platform", help="Set platform if server is multi-platform capable.")
@click.argument("source")
@click.argument("reference", required=False)
def import_(
    changes: tuple[str, ...],
    message: str | None,
    platform: str | None,
    source: str,
    reference: str | None,
) -> None:
    """Import the contents from a tarball to create a filesystem image."""
    params: dict[str, Any] = {"fromSrc": "-"}
    if reference:
        repo, tag = split_reference(reference)
        params["repo"] = repo
        params["tag"] = tag or None
    if message:
        params["message"] = message
    if changes:
        params["changes"] = list(changes)
    if platform:
        params["platform"] = platform
    body: Any
    fh: IO[bytes] | None = None
    if source == "-":
        body = sys.stdin.buffer
    elif "://" in source:
        params["fromSrc"] = source
        body = None
    else:
        try:
            fh = open(source, "rb")
        except OSError as exc:
            _fail(f"open {source}: {exc.strerror.lower() if exc.strerror else exc}")
        body = fh
    headers = {"Content-Type": "application/x-tar"} if body is not None else None
    try:
        display_jsonmessages(
            _client().stream_json("POST", "/images/create", params, body=body, headers=headers),
            sys.stdout,
        )
    finally:
        if fh is not None:
            fh.close()


@click.command(short_help="Create a tag TARGET_IMAGE that refers to SOURCE_IMAGE.")
@click.argument("source")
@click.argument("target")
def tag(source: str, target: str) -> None:
    """Create a tag TARGET_IMAGE that refers to SOURCE_IMAGE."""
    repo, tag_ = split_reference(target)
    _client().post(f"/images/{source}/tag", {"repo": repo, "tag": tag_ or "latest"})


@click.command(short_help="Remove one or more images.")
@click.option("-f", "--force", is_flag=True, help="Force removal of the image.")
@click.option("--no-prune", is_flag=True, help="Do not delete untagged parents.")
@click.argument("images", nargs=-1, required=True)
def rmi(force: bool, no_prune: bool, images: tuple[str, ...]) -> None:
    """Remove one or more images."""
    client = _client()

    def do(name: str) -> None:
        result = client.delete(
            f"/images/{name}", {"force": force or None, "noprune": no_prune or None}
        )
        for item in result or []:
            if item.get("Untagged"):
                click.echo(f"Untagged: {item['Untagged']}")
            if item.get("Deleted"):
                click.echo(f"Deleted: {item['Deleted']}")

    _each(images, do)
