"""The API server: Docker Engine API over HTTP/1.1, every route one Engine job.

Built on asyncio streams with h11 doing the HTTP/1.1 parsing and framing: h11 is a
small, strict, well-tested state machine with no I/O of its own, so the server keeps
full control of the socket. That is what Docker's API needs and what frameworks make
hard: ``wait`` must send its headers at once and its body at exit, and ``attach`` /
``exec start`` take the connection over (``101 UPGRADED``, then raw bytes both ways).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import pallet
from pallet.engine import Channel
from pallet.errors import InvalidArgument, NotFound, PalletError, http_status

if TYPE_CHECKING:
    from pallet.engine import Engine

log = logging.getLogger("pallet.server")

API_VERSION = "1.44"
MIN_API_VERSION = "1.24"
MAX_BODY = 64 * 1024 * 1024  # a JSON body larger than this is refused
READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    job: str
    status: int = 200  # status of a successful non-streamed answer
    stream_body: bool = False  # the job reads the request body itself (job.stdin)


def _route(method: str, path: str, job: str, status: int = 200, stream_body: bool = False) -> Route:
    # {name} matches one segment; {name*} matches several (image names contain "/").
    regex = re.sub(r"\{(\w+)\*\}", r"(?P<\1>.+)", path)
    regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", regex)
    return Route(method, re.compile(f"^{regex}$"), job, status, stream_body)


ROUTES: list[Route] = [
    _route("GET", "/_ping", "system.ping"),
    _route("HEAD", "/_ping", "system.ping"),
    _route("GET", "/version", "system.version"),
    _route("GET", "/info", "system.info"),
    _route("POST", "/containers/create", "container.create", 201),
    _route("GET", "/containers/json", "container.list"),
    _route("GET", "/containers/{id}/json", "container.inspect"),
    _route("POST", "/containers/{id}/start", "container.start", 204),
    _route("POST", "/containers/{id}/stop", "container.stop", 204),
    _route("POST", "/containers/{id}/restart", "container.restart", 204),
    _route("POST", "/containers/{id}/kill", "container.kill", 204),
    _route("POST", "/containers/{id}/wait", "container.wait"),
    _route("POST", "/containers/{id}/attach", "container.attach"),
    _route("POST", "/containers/{id}/resize", "container.resize"),
    _route("POST", "/containers/{id}/exec", "exec.create", 201),
    _route("POST", "/exec/{id}/start", "exec.start"),
    _route("POST", "/exec/{id}/resize", "exec.resize"),
    _route("GET", "/exec/{id}/json", "exec.inspect"),
    _route("GET", "/containers/{id}/logs", "container.logs"),
    _route("GET", "/containers/{id}/changes", "container.changes"),
    _route("GET", "/containers/{id}/export", "container.export"),
    _route("POST", "/commit", "container.commit", 201),
    _route("DELETE", "/containers/{id}", "container.delete", 204),
    _route("POST", "/containers/{id}/pause", "container.pause", 204),
    _route("POST", "/containers/{id}/unpause", "container.unpause", 204),
    _route("POST", "/containers/{id}/update", "container.update"),
    _route("GET", "/containers/{id}/stats", "container.stats"),
    _route("GET", "/containers/{id}/top", "container.top"),
    _route("POST", "/containers/{id}/rename", "container.rename", 204),
    _route("HEAD", "/containers/{id}/archive", "container.archive_head"),
    _route("GET", "/containers/{id}/archive", "container.archive_get"),
    _route("PUT", "/containers/{id}/archive", "container.archive_put", stream_body=True),
    _route("GET", "/volumes", "volume.list"),
    _route("POST", "/volumes/create", "volume.create", 201),
    _route("POST", "/volumes/prune", "volume.prune"),
    _route("GET", "/volumes/{name}", "volume.inspect"),
    _route("DELETE", "/volumes/{name}", "volume.delete", 204),
    _route("GET", "/images/json", "image.list"),
    _route("POST", "/images/create", "image.create", stream_body=True),
    _route("GET", "/images/{name*}/json", "image.inspect"),
    _route("GET", "/images/{name*}/history", "image.history"),
    _route("POST", "/images/{name*}/push", "image.push"),
    _route("GET", "/images/get", "image.save"),
    _route("GET", "/images/{name*}/get", "image.save"),
    _route("POST", "/images/load", "image.load", stream_body=True),
    _route("POST", "/images/prune", "image.prune"),
    _route("POST", "/auth", "system.auth"),
    _route("POST", "/images/{name*}/tag", "image.tag", 201),
    _route("DELETE", "/images/{name*}", "image.delete"),
    _route("GET", "/networks", "network.list"),
    _route("POST", "/networks/create", "network.create", 201),
    _route("POST", "/networks/prune", "network.prune"),
    _route("GET", "/networks/{id}", "network.inspect"),
    _route("DELETE", "/networks/{id}", "network.delete", 204),
    _route("POST", "/networks/{id}/connect", "network.connect"),
    _route("POST", "/networks/{id}/disconnect", "network.disconnect"),
]

_VERSION_PREFIX = re.compile(r"^/v(\d+)\.(\d+)(/.*)$")


def _version_tuple(v: str) -> tuple[int, int]:
    major, minor = v.split(".")
    return int(major), int(minor)


def split_version(path: str) -> tuple[str | None, str]:
    """``/v1.44/containers/json`` -> ("1.44", "/containers/json"). Refuses versions
    outside what the server speaks, with Docker's messages."""
    m = _VERSION_PREFIX.match(path)
    if not m:
        return None, path
    version = f"{int(m.group(1))}.{int(m.group(2))}"
    if _version_tuple(version) < _version_tuple(MIN_API_VERSION):
        raise InvalidArgument(
            f"client version {version} is too old. Minimum supported API version is "
            f"{MIN_API_VERSION}, please upgrade your client to a newer version"
        )
    if _version_tuple(version) > _version_tuple(API_VERSION):
        raise InvalidArgument(
            f"client version {version} is too new. Maximum supported API version is {API_VERSION}"
        )
    return version, m.group(3)


def match_route(method: str, path: str) -> tuple[Route, dict[str, str]]:
    for route in ROUTES:
        if route.method != method:
            continue
        m = route.pattern.match(path)
        if m:
            return route, {k: unquote(v) for k, v in m.groupdict().items()}
    raise NotFound("page not found")


def common_headers() -> list[tuple[str, str]]:
    return [
        ("Api-Version", API_VERSION),
        ("Ostype", "linux"),
        ("Server", f"pallet/{pallet.__version__} (linux)"),
        ("Docker-Experimental", "false"),
    ]


class _Body:
    """The request body as an async byte stream (what ``job.stdin`` is)."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._done = False

    async def read(self, n: int = -1) -> bytes:
        if self._done:
            return b""
        data = await self._conn.next_body_chunk()
        if data is None:
            self._done = True
            return b""
        return data


class _Raw:
    """A hijacked connection's input: what h11 had buffered, then the socket."""

    def __init__(self, leftover: bytes, reader: asyncio.StreamReader) -> None:
        self._leftover = leftover
        self._reader = reader

    async def read(self, n: int = READ_SIZE) -> bytes:
        if self._leftover:
            data, self._leftover = self._leftover, b""
            return data
        return await self._reader.read(n)


class HttpChannel(Channel):
    """A job's output, sent as an HTTP response on one connection."""

    def __init__(self, conn: _Connection, route_status: int) -> None:
        super().__init__()
        self.conn = conn
        self.status = route_status
        self.hijacked = False

    def add_header(self, name: str, value: str) -> None:
        """An extra response header (before ``start`` or the job's result)."""
        self.conn.extra_headers.append((name, value))

    async def start(self, status: int = 200, content_type: str = "application/json") -> None:
        if self.started:
            return
        self.started = True
        self.status, self.content_type = status, content_type
        await self.conn.send_head(status, content_type, None)

    async def write(self, data: bytes) -> None:
        if not self.started:
            await self.start()
        if data:
            await self.conn.send_data(data)

    async def hijack(
        self, content_type: str = "application/vnd.docker.raw-stream"
    ) -> tuple[Any, Any]:
        """Take the connection over: 101 UPGRADED when the client asked to upgrade
        (the docker CLI does), else 200 with a raw stream, as dockerd answers."""
        self.started = self.hijacked = True
        return await self.conn.hijack(content_type)


class _Connection:
    def __init__(
        self, engine: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.engine = engine
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        self.request: h11.Request | None = None
        self.closed = False
        self.extra_headers: list[tuple[str, str]] = []  # see HttpChannel.add_header

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(READ_SIZE)
                self.h11.receive_data(data)  # b"" = EOF
                continue
            return event

    async def next_body_chunk(self) -> bytes | None:
        event = await self._next_event()
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return None
        if isinstance(event, h11.ConnectionClosed):
            raise InvalidArgument("the client closed the connection before the request body ended")
        raise InvalidArgument(f"unexpected HTTP event {type(event).__name__}")

    async def _read_body(self) -> bytes:
        parts, size = [], 0
        while (chunk := await self.next_body_chunk()) is not None:
            size += len(chunk)
            if size > MAX_BODY:
                raise InvalidArgument(f"request body larger than {MAX_BODY} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def _send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            # asyncio drops writes to a transport a failed write closed, silently: say
            # so, or a streaming job (pull, logs) would never learn its client is gone
            if self.writer.is_closing():
                raise ConnectionResetError("the client closed the connection")
            self.writer.write(data)
            await self.writer.drain()

    async def send_head(self, status: int, content_type: str | None, length: int | None) -> None:
        headers = common_headers() + self.extra_headers
        self.extra_headers = []
        if content_type:
            headers.append(("Content-Type", content_type))
        if length is not None:
            headers.append(("Content-Length", str(length)))
        await self._send(h11.Response(status_code=status, headers=headers))

    async def send_data(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def send_complete(self, status: int, body: bytes, content_type: str | None) -> None:
        no_body = status in (204, 304) or (
            self.request is not None and self.request.method == b"HEAD"
        )
        await self.send_head(
            status, content_type if body else None, None if status in (204, 304) else len(body)
        )
        if body and not no_body:
            await self.send_data(body)
        await self._send(h11.EndOfMessage())

    async def hijack(self, content_type: str) -> tuple[_Raw, asyncio.StreamWriter]:
        assert self.request is not None
        headers = {k.lower(): v.lower() for k, v in self.request.headers}
        upgrade = (
            b"upgrade" in headers.get(b"connection", b"") and headers.get(b"upgrade") == b"tcp"
        )
        # The body (if any) was read already; what h11 buffered past it is the
        # client's first stdin bytes.
        leftover = bytes(self.h11.trailing_data[0])
        lines = (
            ["HTTP/1.1 101 UPGRADED", "Connection: Upgrade", "Upgrade: tcp"]
            if upgrade
            else ["HTTP/1.1 200 OK"]
        )
        lines.append(f"Content-Type: {content_type}")
        lines += [f"{k}: {v}" for k, v in common_headers()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()
        self.closed = True  # no further requests on a hijacked connection
        return _Raw(leftover, self.reader), self.writer

    async def serve(self) -> None:
        try:
            while not self.closed:
                event = await self._next_event()
                if isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.Request):
                    return
                self.request = event
                await self._handle(event)
                if self.closed or self.h11.our_state is h11.MUST_CLOSE:
                    return
                if self.h11.their_state is h11.DONE and self.h11.our_state is h11.DONE:
                    self.h11.start_next_cycle()
                else:
                    return
        except h11.RemoteProtocolError as e:
            with contextlib.suppress(Exception):
                body = json.dumps({"message": f"malformed HTTP request: {e}"}).encode()
                self.writer.write(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                self.writer.close()

    async def _handle(self, req: h11.Request) -> None:
        method = req.method.decode()
        target = urlsplit(req.target.decode("latin-1"))
        channel: HttpChannel | None = None
        try:
            version, path = split_version(target.path)
            route, params = match_route(method, path)
            pairs = parse_qsl(target.query, keep_blank_values=True)
            query: dict[str, Any] = dict(pairs)
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in req.headers}
            body: Any = None
            stdin: Any = None
            if route.stream_body:
                stdin = _Body(self)
            else:
                raw = await self._read_body()
                if raw.strip():
                    try:
                        body = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise InvalidArgument(f"invalid JSON in request body: {e}") from None
            channel = HttpChannel(self, route.status)
            env = {
                **query,
                "_query": pairs,
                "_version": version or API_VERSION,
                "_headers": headers,
            }
            job = self.engine.job(
                route.job, *params.values(), env=env, body=body, stdin=stdin, output=channel
            )
            result = await job.run()
            if channel.hijacked:
                return
            if stdin is not None:  # drain what the job did not read
                while await stdin.read():
                    pass
            if channel.started:
                if result is not None:
                    await channel.write(json.dumps(result).encode() + b"\n")
                await self._send(h11.EndOfMessage())
            elif isinstance(result, bytes | str):
                data = result.encode() if isinstance(result, str) else result
                await self.send_complete(route.status, data, "text/plain; charset=utf-8")
            elif result is None:
                await self.send_complete(route.status if route.status != 200 else 204, b"", None)
            else:
                await self.send_complete(
                    route.status, json.dumps(result).encode(), "application/json"
                )
        except (ConnectionError, asyncio.CancelledError):
            self.closed = True
            raise
        except Exception as e:
            await self._send_error(e, channel)

    async def _send_error(self, e: Exception, channel: HttpChannel | None) -> None:
        if not isinstance(e, PalletError):
            log.exception("job failed")
        message = (
            e.message if isinstance(e, PalletError) else f"internal error: {type(e).__name__}: {e}"
        )
        if channel is not None and channel.hijacked:
            self.closed = True
            return
        if channel is not None and channel.started:
            # Headers are gone: report in-band the way Docker's streams do, then end.
            with contextlib.suppress(Exception):
                if channel.content_type == "application/json":
                    await self.send_data(
                        json.dumps({"errorDetail": {"message": message}, "error": message}).encode()
                        + b"\n"
                    )
                await self._send(h11.EndOfMessage())
            self.closed = True
            return
        if self.h11.their_state is h11.SEND_BODY:  # unread request body: cannot reuse
            self.closed = True
        body = json.dumps({"message": message}).encode() + b"\n"
        await self.send_complete(http_status(e), body, "application/json")


class Server:
    """Listens on the configured hosts and serves the Engine's jobs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await _Connection(self.engine, reader, writer).serve()
        finally:
            self._tasks.discard(task)

    async def listen_unix(self, path: str, mode: int, gid: int | None) -> None:
        import os

        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        server = await asyncio.start_unix_server(self._client, path=path, limit=READ_SIZE)
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, 0, gid)
        self.servers.append(server)

    async def listen_tcp(self, host: str, port: int) -> None:
        server = await asyncio.start_server(self._client, host=host, port=port, limit=READ_SIZE)
        self.servers.append(server)

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for t in list(self._tasks):
            t.cancel()
        for s in self.servers:
            with contextlib.suppress(Exception):
                await s.wait_closed()
