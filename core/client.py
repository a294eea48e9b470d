"""A lean client for the Docker Engine API, as spoken by palletd.

It sits on the hot path of every CLI command, so it imports only ``socket``, ``json``
and ``os`` (no ``http.client``, no ``urllib``): a small HTTP/1.1 request writer and a
response reader that understands ``Content-Length``, chunked and read-until-close
bodies, streams them as they arrive, and hijacks the connection for attach
(``101 UPGRADED`` followed by raw bytes, which may be multiplexed frames — see
:mod:`pallet.streams`).

One request, one connection: the daemon's answers for the slow routes (``wait``,
``logs -f``, ``attach``) own their connection anyway, and a unix socket connects in
microseconds.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any, Self

DEFAULT_HOST = "unix:///run/pallet.sock"
API_VERSION = "1.44"
USER_AGENT = "pallet-cli/0.1.0"
_RECV = 65536
_MAX_LINE = 65536
_MAX_HEADERS = 200


class ClientError(Exception):
    """Base of everything this module raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DaemonUnreachable(ClientError):
    """The daemon's socket cannot be reached (not running, wrong path, no permission)."""


class ProtocolError(ClientError):
    """The peer did not speak HTTP/1.1 the way we expected."""


class APIError(ClientError):
    """A non-2xx answer. ``status`` is the HTTP status, ``message`` the daemon's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def __str__(self) -> str:
        return f"Error response from daemon: {self.message}"


class StreamError(ClientError):
    """An error reported inside a stream (a jsonmessage with ``error``)."""

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------- helpers

_PATH_SAFE = "/:@!$&'()*+,;="
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def quote(value: str, safe: str = "") -> str:
    """Percent-encode ``value`` (UTF-8) like ``urllib.parse.quote``."""
    safe_bytes = _UNRESERVED | frozenset(safe.encode())
    out = []
    for b in value.encode("utf-8"):
        out.append(chr(b) if b in safe_bytes else f"%{b:02X}")
    return "".join(out)


def _param_value(value: Any) -> str:
    if value is True:
        return "1"
    if value is False:
        return "0"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def encode_query(params: Mapping[str, Any] | None) -> str:
    """``?a=1&b=x`` from a mapping. ``None`` values are left out, lists repeat the key,
    dicts become JSON (Docker's ``filters``), booleans ``1``/``0``."""
    if not params:
        return ""
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            parts.append(f"{quote(key)}={quote(_param_value(v))}")
    return "?" + "&".join(parts) if parts else ""


def resolve_host(host: str | None = None) -> str:
    """The daemon address: the argument, else ``$PALLET_HOST``, else the default."""
    return host or os.environ.get("PALLET_HOST") or DEFAULT_HOST


def parse_host(host: str) -> tuple[int, Any, str]:
    """``(address family, address, Host header)`` for ``unix://PATH`` or ``tcp://H:P``."""
    if host.startswith("unix://"):
        path = host[len("unix://") :]
        if not path:
            raise ClientError(f"invalid daemon address {host!r}: empty socket path")
        return socket.AF_UNIX, path, "pallet"
    if host.startswith("/"):
        return socket.AF_UNIX, host, "pallet"
    rest = None
    for prefix in ("tcp://", "http://"):
        if host.startswith(prefix):
            rest = host[len(prefix) :]
    if rest is None:
        raise ClientError(
            f"invalid daemon address {host!r}: use unix:///path/to/socket or tcp://host:port"
        )
    rest = rest.rstrip("/")
    if rest.startswith("["):  # [::1]:2375
        end = rest.find("]")
        if end < 0:
            raise ClientError(f"invalid daemon address {host!r}")
        hostname, _, port_s = rest[1:end], None, rest[end + 2 :]
    else:
        hostname, _, port_s = rest.rpartition(":")
        if not hostname:
            hostname, port_s = rest, ""
    try:
        port = int(port_s) if port_s else 2375
    except ValueError:
        raise ClientError(f"invalid daemon address {host!r}: bad port {port_s!r}") from None
    hostname = hostname or "127.0.0.1"
    header = f"[{hostname}]:{port}" if ":" in hostname else f"{hostname}:{port}"
    return (socket.AF_INET6 if ":" in hostname else socket.AF_INET), (hostname, port), header


# --------------------------------------------------------------------------- reading


class _Reader:
    """Buffered reads from a socket: lines for the head, pieces for the body."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        data = self.sock.recv(_RECV)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def readline(self) -> bytes:
        """One line including its ``\\n`` (or what is left at EOF)."""
        start = 0
        while True:
            idx = self.buf.find(b"\n", start)
            if idx >= 0:
                line = bytes(self.buf[: idx + 1])
                del self.buf[: idx + 1]
                return line
            start = len(self.buf)
            if start > _MAX_LINE:
                raise ProtocolError("line too long in HTTP response")
            if not self._fill():
                line = bytes(self.buf)
                self.buf.clear()
                return line

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes, as soon as any are there; ``b""`` at EOF."""
        if not self.buf and not self._fill():
            return b""
        data = bytes(self.buf[:limit])
        del self.buf[:limit]
        return data

    def take_buffer(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data


def _read_head(reader: _Reader) -> tuple[int, str, dict[str, str]]:
    line = reader.readline()
    if not line:
        raise ProtocolError("the daemon closed the connection without answering")
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ProtocolError(f"malformed HTTP status line: {line[:80]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise ProtocolError(f"malformed HTTP status line: {line[:80]!r}") from None
    reason = parts[2] if len(parts) > 2 else ""
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS):
        raw = reader.readline()
        if not raw:
            raise ProtocolError("connection closed in the middle of HTTP headers")
        text = raw.decode("latin-1").rstrip("\r\n")
        if not text:
            return status, reason, headers
        name, sep, value = text.partition(":")
        if not sep:
            continue  # obsolete line folding or junk: ignore, like most clients
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    raise ProtocolError("too many HTTP headers")


class _Socket:
    """Owns a socket: ``close`` and ``with`` close it."""

    sock: socket.socket

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Response(_Socket):
    """An HTTP response whose body is read on demand (whole, in pieces, or as JSON)."""

    def __init__(
        self,
        sock: socket.socket,
        reader: _Reader,
        status: int,
        reason: str,
        headers: dict[str, str],
        method: str,
    ) -> None:
        self.sock = sock
        self._reader = reader
        self.status = status
        self.reason = reason
        self.headers = headers
        self._done = False
        self._chunk_left = 0
        self._length_left = 0
        if method == "HEAD" or status < 200 or status in (204, 304):
            self._mode = "none"
            self._done = True
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode = "chunked"
        elif "content-length" in headers:
            try:
                self._length_left = int(headers["content-length"])
            except ValueError:
                raise ProtocolError("bad Content-Length in response") from None
            self._mode = "length"
            self._done = self._length_left == 0
        else:
            self._mode = "eof"

    # -- pieces
    def read_chunk(self, limit: int = _RECV) -> bytes:
        """The next piece of the body as soon as it arrives; ``b""`` at its end."""
        if self._done:
            return b""
        if self._mode == "length":
            data = self._reader.read_some(min(limit, self._length_left))
            if not data:
                raise ProtocolError("connection closed before the end of the response body")
            self._length_left -= len(data)
            self._done = self._length_left == 0
            return data
        if self._mode == "eof":
            data = self._reader.read_some(limit)
            if not data:
                self._done = True
            return data
        # chunked
        while self._chunk_left == 0:
            line = self._reader.readline()
            if not line:
                raise ProtocolError("connection closed in the middle of a chunked body")
            size_text = line.split(b";", 1)[0].strip()
            if not size_text:
                continue  # tolerate stray CRLF
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while True:  # trailers up to the blank line
                    trailer = self._reader.readline()
                    if not trailer or trailer in (b"\r\n", b"\n"):
                        break
                self._done = True
                return b""
            self._chunk_left = size
        data = self._reader.read_some(min(limit, self._chunk_left))
        if not data:
            raise ProtocolError("connection closed in the middle of a chunk")
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            self._reader.readline()  # the CRLF after the chunk data
        return data

    def iter_raw(self, limit: int = _RECV) -> Iterator[bytes]:
        while True:
            data = self.read_chunk(limit)
            if not data:
                return
            yield data

    def read(self) -> bytes:
        return b"".join(self.iter_raw())

    def json(self) -> Any:
        data = self.read()
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ProtocolError(f"invalid JSON from the daemon: {exc}") from None

    def iter_json(self) -> Iterator[Any]:
        """Each JSON value of a stream of concatenated (usually newline separated) values."""
        import codecs

        decoder = json.JSONDecoder()
        text_decoder = codecs.getincrementaldecoder("utf-8")("replace")
        buf = ""
        for data in self.iter_raw():
            buf += text_decoder.decode(data)
            pos = 0
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos >= len(buf):
                    break
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except ValueError:
                    break  # incomplete: wait for more
                yield value
                pos = end
            buf = buf[pos:]
        buf = (buf + text_decoder.decode(b"", final=True)).strip()
        if buf:
            raise ProtocolError(f"truncated JSON at the end of the stream: {buf[:80]!r}")


class Hijacked(_Socket):
    """A connection taken over after ``101 UPGRADED``: raw bytes both ways."""

    def __init__(self, sock: socket.socket, pending: bytes, headers: dict[str, str]) -> None:
        self.sock = sock
        self._pending = pending
        self.headers = headers
        self._write_closed = False

    @property
    def multiplexed(self) -> bool | None:
        """What the Content-Type says about framing (``None`` if it says nothing)."""
        ctype = self.headers.get("content-type", "")
        # "raw-stream" proves nothing: older daemons say it for both; ask the container's Tty.
        return True if "multiplexed-stream" in ctype else None

    def recv(self, size: int = _RECV) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:size], self._pending[size:]
            return data
        try:
            return self.sock.recv(size)
        except ConnectionResetError:
            return b""

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close_write(self) -> None:
        """Half-close: tell the daemon stdin ended, keep reading its output."""
        if self._write_closed:
            return
        self._write_closed = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


# --------------------------------------------------------------------------- errors


def _error_message(status: int, reason: str, body: bytes, content_type: str) -> str:
    text = body.decode("utf-8", "replace").strip()
    if text and ("json" in content_type or text.startswith("{")):
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            msg = doc.get("message")
            if msg is None and isinstance(doc.get("error"), str):
                msg = doc["error"]
            if isinstance(msg, str) and msg:
                return msg
    if text:
        return text
    return f"{status} {reason}".strip() if reason else f"HTTP status {status}"


def raise_for_status(resp: Response) -> None:
    """Raise :class:`APIError` (consuming the body) unless the status is 1xx/2xx/304."""
    if resp.status < 300 or resp.status == 304:
        return
    try:
        body = resp.read()
    except (OSError, ProtocolError):
        body = b""
    finally:
        resp.close()
    msg = _error_message(resp.status, resp.reason, body, resp.headers.get("content-type", ""))
    raise APIError(resp.status, msg)


# --------------------------------------------------------------------------- client

Body = bytes | str | IO[bytes] | Iterable[bytes] | None


class Client:
    """Talks to the daemon at ``host`` (``unix://...`` or ``tcp://...``)."""

    def __init__(
        self,
        host: str | None = None,
        version: str | None = API_VERSION,
        timeout: float | None = None,
    ) -> None:
        self.host = resolve_host(host)
        self.family, self.address, self.host_header = parse_host(self.host)
        self.prefix = f"/v{version}" if version else ""
        self.timeout = timeout

    # -- connection
    def _connect(self) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout if self.timeout is not None else 30.0)
            sock.connect(self.address)
            sock.settimeout(self.timeout)
        except PermissionError:
            sock.close()
            raise DaemonUnreachable(
                "permission denied while trying to connect to the pallet daemon socket at "
                f"{self.host}"
            ) from None
        except OSError:
            sock.close()
            raise DaemonUnreachable(
                f"Cannot connect to the pallet daemon at {self.host}. Is the daemon running?"
            ) from None
        if self.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _head(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
    ) -> list[str]:
        # names in paths (containers, images like "host:5000/a:b") are sent as given,
        # with only what may not appear in a path segment escaped
        target = self.prefix + quote(path, safe=_PATH_SAFE) + encode_query(params)
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {self.host_header}",
            f"User-Agent: {USER_AGENT}",
        ]
        if headers:
            lines.extend(f"{k}: {v}" for k, v in headers.items())
        return lines

    @staticmethod
    def _send(sock: socket.socket, head: list[str], body: Body) -> None:
        if body is None:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            return
        if isinstance(body, str):
            body = body.encode("utf-8")
        if isinstance(body, bytes | bytearray | memoryview):
            head.append(f"Content-Length: {len(body)}")
            data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
            if len(body) < 65536:
                sock.sendall(data + bytes(body))
            else:
                sock.sendall(data)
                sock.sendall(body)
            return
        # a stream: chunked transfer encoding, as the docker CLI does for import/build
        head.append("Transfer-Encoding: chunked")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        for piece in _iter_body(body):
            if piece:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"0\r\n\r\n")

    def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        *,
        json_body: Any = None,
        body: Body = None,
        headers: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> Response:
        """Send one request, read the status line and headers, return the response with
        its body unread. Non-2xx answers raise :class:`APIError` unless ``check`` is off."""
        all_headers = {"Connection": "close"}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            all_headers["Content-Type"] = "application/json"
        if headers:
            all_headers.update(headers)
        if body is not None and "Content-Type" not in all_headers:
            all_headers["Content-Type"] = "application/octet-stream"
        sock = self._connect()
        reader = _Reader(sock)
        try:
            try:
                self._send(sock, self._head(method, path, params, all_headers), body)
            except (BrokenPipeError, ConnectionResetError):
                # the daemon answered (an error, most likely) before reading all of the body
                if not reader._fill() and not reader.buf:
                    raise ProtocolError(
                        "the daemon closed the connection while the request was sent"
                    ) from None
            status, reason, resp_headers = _read_head(reader)
            while 100 <= status < 200 and status != 101:  # 100 Continue and friends
                status, reason, resp_headers = _read_head(reader)
        except OSError as exc:
            sock.close()
            raise ClientError(f"error talking to the daemon at {self.host}: {exc}") from None
        except BaseException:
            sock.close()
            raise
        resp = Response(sock, reader, status, reason, resp_headers, method)
        if check:
            raise_for_status(resp)
        return resp

    # -- conveniences
    def call(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        body: Body = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Request and return the decoded JSON answer (``None`` for an empty body)."""
        with self.request(
            method, path, params, json_body=json_body, body=body, headers=headers
        ) as resp:
            try:
                return resp.json()
            except OSError as exc:
                raise ClientError(f"error reading the daemon's answer: {exc}") from None

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.call("GET", path, params)

    def post(
        self, path: str, params: Mapping[str, Any] | None = None, json_body: Any = None
    ) -> Any:
        return self.call("POST", path, params, json_body=json_body)

    def delete(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.call("DELETE", path, params)

    def stream_json(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        body: Body = None,
        headers: Mapping[str, str] | None = None,
    ) -> Iterator[Any]:
        """Each message of a streamed JSON answer (jsonmessage), as it arrives."""
        with self.request(
            method, path, params, json_body=json_body, body=body, headers=headers
        ) as resp:
            yield from resp.iter_json()

    def ping(self) -> bool:
        with self.request("GET", "/_ping") as resp:
            return resp.read().strip() == b"OK"

    def hijack(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
    ) -> Hijacked:
        """Upgrade the connection (attach, exec start) and return it as a raw stream."""
        headers: dict[str, str] = {"Connection": "Upgrade", "Upgrade": "tcp"}
        body: bytes | None = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        sock = self._connect()
        reader = _Reader(sock)
        try:
            self._send(sock, self._head(method, path, params, headers), body)
            status, reason, resp_headers = _read_head(reader)
            while 100 <= status < 200 and status != 101:
                status, reason, resp_headers = _read_head(reader)
        except OSError as exc:
            sock.close()
            raise ClientError(f"error talking to the daemon at {self.host}: {exc}") from None
        except BaseException:
            sock.close()
            raise
        if status in (101, 200):
            # 200 is what daemons before the upgrade dance sent: raw bytes follow anyway
            return Hijacked(sock, reader.take_buffer(), resp_headers)
        resp = Response(sock, reader, status, reason, resp_headers, method)
        raise_for_status(resp)
        resp.close()
        raise ProtocolError(f"unable to upgrade the connection: HTTP status {status}")


def _iter_body(body: IO[bytes] | Iterable[bytes]) -> Iterator[bytes]:
    read = getattr(body, "read1", None) or getattr(body, "read", None)
    if read is not None:
        while True:
            data = read(_RECV)
            if not data:
                return
            yield data
    else:
        for piece in body:
            yield bytes(piece)
