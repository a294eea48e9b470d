"""Registry and archive commands: pull, push, login, logout, save, load, history.

Credentials live in ``$PALLET_CONFIG/config.json`` (default ``~/.pallet/config.json``;
``$DOCKER_CONFIG`` / ``~/.docker/config.json`` are read too), in Docker's format:
``{"auths": {"registry": {"auth": base64("user:password")}}}``; they go to the daemon
in the ``X-Registry-Auth`` header, as the docker CLI sends them.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import IO, Any

import click
from pallet.cli._common import _client, _fail, split_reference
from pallet.cli.format import display_jsonmessages

HUB_KEY = "https://index.docker.io/v1/"


def config_path() -> Path:
    d = os.environ.get("PALLET_CONFIG")
    return Path(d or Path.home() / ".pallet") / "config.json"


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _fail(f"Error loading config file {path}: {e}")
    return data if isinstance(data, dict) else {}


def registry_key(name: str) -> str:
    """The ``auths`` key of the registry of an image name (or a server address)."""
    host = name.split("://", 1)[-1].split("/", 1)[0]
    if "://" in name or "/" not in name:
        candidate = host
    else:
        first = name.split("/", 1)[0]
        candidate = first if ("." in first or ":" in first or first == "localhost") else ""
    if candidate in ("", "docker.io", "index.docker.io", "registry-1.docker.io"):
        return HUB_KEY
    return candidate


def credentials_for(key: str) -> dict[str, str] | None:
    paths = [config_path()]
    docker = os.environ.get("DOCKER_CONFIG")
    paths.append(Path(docker or Path.home() / ".docker") / "config.json")
    for p in paths:
        entry = (_read_config(p).get("auths") or {}).get(key)
        if isinstance(entry, dict) and entry.get("auth"):
            try:
                user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            return {"username": user, "password": pw, "serveraddress": key}
        if isinstance(entry, dict) and entry.get("identitytoken"):
            return {"identitytoken": entry["identitytoken"], "serveraddress": key}
    return None


def auth_header(image: str) -> dict[str, str]:
    creds = credentials_for(registry_key(image)) or {}
    raw = json.dumps(creds).encode()
    return {"X-Registry-Auth": base64.urlsafe_b64encode(raw).decode()}


def _stream(
    method: str, path: str, params: dict[str, Any], headers: dict[str, str], out: IO[str]
) -> Any:
    return display_jsonmessages(_client().stream_json(method, path, params, headers=headers), out)


@click.command(short_help="Download an image from a registry.")
@click.option(
    "-a", "--all-tags", is_flag=True, help="Download all tagged images in the repository."
)
@click.option("--platform", default=None, help="Set platform if server is multi-platform capable.")
@click.option("-q", "--quiet", is_flag=True, help="Suppress verbose output.")
@click.argument("name")
def pull(all_tags: bool, platform: str | None, quiet: bool, name: str) -> None:
    """Download an image from a registry."""
    repo, tag = split_reference(name)
    params: dict[str, Any] = {"fromImage": repo}
    if "@" in name:
        params = {"fromImage": name}
    elif all_tags:
        if tag:
            _fail("tag can't be used with --all-tags/-a")
    else:
        params["tag"] = tag or "latest"
        if not tag:
            click.echo("Using default tag: latest")
    if platform:
        params["platform"] = platform
    out: IO[str] = open(os.devnull, "w") if quiet else sys.stdout
    _stream("POST", "/images/create", params, auth_header(name), out)
    if quiet:
        click.echo(name if ("@" in name or tag or all_tags) else f"{name}:latest")


@click.command(short_help="Upload an image to a registry.")
@click.option("-a", "--all-tags", is_flag=True, help="Push all tags of an image to the repository.")
@click.option("-q", "--quiet", is_flag=True, help="Suppress verbose output.")
@click.argument("name")
def push(all_tags: bool, quiet: bool, name: str) -> None:
    """Upload an image to a registry."""
    from pallet.client import quote

    repo, tag = split_reference(name)
    params: dict[str, Any] = {}
    if all_tags:
        if tag:
            _fail("tag can't be used with --all-tags/-a")
    else:
        if not tag:
            click.echo("Using default tag: latest")
        params["tag"] = tag or "latest"
    out: IO[str] = open(os.devnull, "w") if quiet else sys.stdout
    _stream("POST", f"/images/{quote(repo, safe='/:')}/push", params, auth_header(name), out)
    if quiet:
        click.echo(name)


@click.command(short_help="Log in to a registry.")
@click.option("-u", "--username", default=None, help="Username.")
@click.option("-p", "--password", default=None, help="Password.")
@click.option("--password-stdin", is_flag=True, help="Take the password from stdin.")
@click.argument("server", required=False)
def login(
    username: str | None, password: str | None, password_stdin: bool, server: str | None
) -> None:
    """Log in to a registry (Docker Hub when no server is given)."""
    if password_stdin:
        if password:
            _fail("--password and --password-stdin are mutually exclusive")
        if not username:
            _fail("Must provide --username with --password-stdin")
        password = sys.stdin.read().rstrip("\r\n")
    if username is None:
        username = click.prompt("Username")
    if password is None:
        password = click.prompt("Password", hide_input=True)
    key = registry_key(server) if server else HUB_KEY
    body = {"username": username, "password": password, "serveraddress": key}
    resp = _client().post("/auth", None, body)
    path = config_path()
    cfg = _read_config(path)
    auths = cfg.setdefault("auths", {})
    auths[key] = {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
    if resp and resp.get("IdentityToken"):
        auths[key] = {"identitytoken": resp["IdentityToken"]}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent="\t")
    os.replace(tmp, path)
    click.echo(
        f"WARNING! Your password will be stored unencrypted in {path}.\n"
        "Configure a credential helper to remove this warning.",
        err=True,
    )
    click.echo((resp or {}).get("Status") or "Login Succeeded")


@click.command(short_help="Log out from a registry.")
@click.argument("server", required=False)
def logout(server: str | None) -> None:
    """Log out from a registry (Docker Hub when no server is given)."""
    key = registry_key(server) if server else HUB_KEY
    path = config_path()
    cfg = _read_config(path)
    auths = cfg.get("auths") or {}
    if key not in auths:
        click.echo(f"Not logged in to {server or key}")
        return
    click.echo(f"Removing login credentials for {server or key}")
    del auths[key]
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent="\t")
    os.replace(tmp, path)


@click.command(short_help="Save images to a tar archive (STDOUT by default).")
@click.option("-o", "--output", default=None, help="Write to a file, instead of STDOUT.")
@click.argument("images", nargs=-1, required=True)
def save(output: str | None, images: tuple[str, ...]) -> None:
    """Save one or more images to a tar archive."""
    if output is None and sys.stdout.isatty():
        _fail("Cowardly refusing to save to a terminal. Use the -o flag or redirect.")
    resp = _client().request("GET", "/images/get", {"names": list(images)})
    target: IO[bytes]
    tmp: Path | None = None
    if output:
        tmp = Path(output + ".tmp")
        target = open(tmp, "wb")
    else:
        target = sys.stdout.buffer
    try:
        with resp:
            for chunk in resp.iter_raw():
                target.write(chunk)
        target.flush()
    except BaseException:
        if tmp is not None:
            target.close()
            tmp.unlink(missing_ok=True)
        raise
    if tmp is not None and output:
        target.close()
        os.replace(tmp, output)


@click.command(short_help="Load an image from a tar archive or STDIN.")
@click.option(
    "-i", "--input", "input_", default=None, help="Read from tar archive file, instead of STDIN."
)
@click.option("-q", "--quiet", is_flag=True, help="Suppress the load output.")
def load(input_: str | None, quiet: bool) -> None:
    """Load an image from a tar archive or STDIN."""
    src: Any
    if input_:
        try:
            src = open(input_, "rb")
        except OSError as e:
            _fail(f"open {input_}: {(e.strerror or str(e)).lower()}")
    else:
        if sys.stdin.isatty():
            _fail("requested load from stdin, but stdin is empty")
        src = sys.stdin.buffer
    try:
        msgs = _client().stream_json(
            "POST",
            "/images/load",
            {"quiet": "1" if quiet else "0"},
            body=src,
            headers={"Content-Type": "application/x-tar"},
        )
        display_jsonmessages(msgs, sys.stdout)
    finally:
        if input_:
            src.close()


@click.command(short_help="Show the history of an image.")
@click.option(
    "-H", "--human", default=True, type=bool, help="Print sizes and dates in human readable format."
)
@click.option("--no-trunc", is_flag=True, help="Don't truncate output.")
@click.option("-q", "--quiet", is_flag=True, help="Only show image IDs.")
@click.argument("image")
def history(human: bool, no_trunc: bool, quiet: bool, image: str) -> None:
    """Show the history of an image."""
    import time

    from pallet.cli.format import ellipsis, human_duration, human_size, short_id, tabwrite
    from pallet.client import quote

    rows = _client().get(f"/images/{quote(image, safe='/:@')}/history") or []
    if quiet:
        for r in rows:
            click.echo(r["Id"] if no_trunc or r["Id"] == "<missing>" else short_id(r["Id"]))
        return
    lines = ["IMAGE\tCREATED\tCREATED BY\tSIZE\tCOMMENT"]
    now = time.time()
    for r in rows:
        ident = r["Id"] if (no_trunc or r["Id"] == "<missing>") else short_id(r["Id"])
        created = (
            f"{human_duration(now - r['Created'])} ago"
            if human
            else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["Created"]))
        )
        by = r.get("CreatedBy") or ""
        if not no_trunc:
            by = ellipsis(by, 45)
        size = human_size(r.get("Size") or 0) if human else str(r.get("Size") or 0)
        lines.append(f"{ident}\t{created}\t{by}\t{size}\t{r.get('Comment') or ''}")
    click.echo(tabwrite(lines), nl=False)


@click.group(short_help="Manage images.")
def image() -> None:
    """Manage images."""


@image.command(short_help="Remove unused images.")
@click.option(
    "-a", "--all", "all_", is_flag=True, help="Remove all unused images, not just dangling ones."
)
@click.option("-f", "--force", is_flag=True, help="Do not prompt for confirmation.")
@click.option(
    "--filter", "filter_", multiple=True, help="Provide filter values (e.g. 'until=<timestamp>')."
)
def prune(all_: bool, force: bool, filter_: tuple[str, ...]) -> None:
    """Remove unused images."""
    from pallet.cli._common import _filters
    from pallet.cli.format import human_size

    if not force:
        what = (
            "all images without at least one container associated to them"
            if all_
            else "all dangling images"
        )
        if not click.confirm(
            f"WARNING! This will remove {what}.\nAre you sure you want to continue?"
        ):
            return
    f = _filters(filter_) or {}
    if all_:
        f["dangling"] = ["false"]
    resp = _client().post("/images/prune", {"filters": json.dumps(f)} if f else None) or {}
    deleted = resp.get("ImagesDeleted") or []
    if deleted:
        click.echo("Deleted Images:")
        for d in deleted:
            for k, v in d.items():
                click.echo(f"{k.lower()}: {v}")
        click.echo()
    click.echo(f"Total reclaimed space: {human_size(resp.get('SpaceReclaimed') or 0)}")


@image.command("history", short_help="Show the history of an image.")
@click.pass_context
@click.argument("args", nargs=-1)
def image_history(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Show the history of an image."""
    history.main(list(args), standalone_mode=False, obj=ctx.obj)


for _name, _cmd in (("pull", pull), ("push", push), ("save", save), ("load", load)):
    image.add_command(_cmd, _name)
