"""What every command module shares: the client of the invocation, messages on stderr,
docker's exit statuses, and small argument parsers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import IO, TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from pallet.client import Client, Hijacked


class _State:
    def __init__(self, host: str | None) -> None:
        self.host = host
        self._client: Client | None = None

    def client(self) -> Client:
        if self._client is None:
            from pallet.client import Client

            self._client = Client(self.host)
        return self._client


def _client() -> Client:
    ctx = click.get_current_context()
    state = ctx.find_object(_State)
    if state is None:  # a command invoked on its own (tests)
        state = _State(None)
        ctx.obj = state
    return state.client()


def _err(message: str) -> None:
    click.echo(message, err=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    _err(message)
    sys.exit(code)


def _is_client_error(exc: BaseException) -> bool:
    if "pallet.client" not in sys.modules:
        return False
    from pallet.client import ClientError

    return isinstance(exc, ClientError)


def _is_status(exc: BaseException, *statuses: int) -> bool:
    from pallet.client import APIError

    return isinstance(exc, APIError) and exc.status in statuses


def _each(names: Iterable[str], action: Callable[[str], Any], summary: str | None = None) -> None:
    """Apply ``action`` to each name, reporting errors as docker does (exit 1 at the end)."""
    failed = []
    for name in names:
        try:
            action(name)
        except Exception as exc:
            if not _is_client_error(exc):
                raise
            _err(str(exc))
            failed.append(name)
    if failed:
        if summary:
            _err(f"Error: {summary}: {', '.join(failed)}")
        sys.exit(1)


def _filters(items: tuple[str, ...]) -> dict[str, list[str]] | None:
    if not items:
        return None
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(
                f"bad format of filter (expected name=value): {item}", param_hint="--filter"
            )
        out.setdefault(key.strip().lower(), []).append(value)
    return out


# --------------------------------------------------------------------------- references


def split_reference(ref: str) -> tuple[str, str]:
    """("repo", "tag") from "repo[:tag]"; a digest ("repo@sha256:...") goes in tag."""
    if "@" in ref:
        name, _, digest = ref.partition("@")
        return name, digest
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :]
    return ref, ""


def tagged_reference(ref: str) -> str:
    """The reference with ``:latest`` made explicit."""
    name, tag = split_reference(ref)
    if "@" in ref or tag:
        return ref
    return f"{name}:latest"


def pump_output(conn: Hijacked, tty: bool) -> None:
    """Copy the attach stream to our stdout/stderr until the daemon closes it."""
    from pallet.streams import STDERR, STDOUT, FrameDecoder

    out = _binary(sys.stdout)
    err = _binary(sys.stderr)
    raw = tty and conn.multiplexed is not True
    decoder = FrameDecoder()
    while True:
        try:
            data = conn.recv(65536)
        except OSError:
            break
        if not data:
            break
        if raw:
            out.write(data)
            out.flush()
            continue
        for stream, payload in decoder.feed(data):
            target = out if stream == STDOUT else err if stream >= STDERR else None
            if target is not None:
                target.write(payload)
                target.flush()


def _binary(stream: IO[str]) -> IO[bytes]:
    """The byte stream under a text stream (flushed first)."""
    buf = getattr(stream, "buffer", None)
    stream.flush()
    return buf if buf is not None else stream  # type: ignore[return-value]
