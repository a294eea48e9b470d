"""The client's HTTP layer against a small real server on a temporary unix socket.

The server parses requests with h11 (a strict, independent HTTP/1.1 implementation, so
it also checks what the client writes) and answers with bytes the test controls down
to the packet: chunk boundaries in the middle of JSON values, a ``101 UPGRADED`` and
multiplexed frames, output after the client half-closed, connections cut short.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import pytest
from pallet import client as cl
from pallet.streams import STDERR, STDOUT, FrameDecoder, frame

# --------------------------------------------------------------------------- stub server


@dataclass
class Request:
    method: str
    target: str
    path: str  # without the /vX.Y prefix and the query
    version: str | None
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    sock: socket.socket
    trailing: bytes = b""
    at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.body)

    def q(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    # -- answers
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def respond(
        self,
        status: int = 200,
        body: bytes | str | Any = b"",
        *,
        reason: str = "",
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        if not isinstance(body, bytes | str):
            body = json.dumps(body)
            content_type = content_type or "application/json"
        if isinstance(body, str):
            body = body.encode()
        lines = [f"HTTP/1.1 {status} {reason or REASONS.get(status, 'OK')}"]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if status not in (204, 304):
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def error(self, status: int, message: str) -> None:
        self.respond(status, {"message": message})

    def start_chunked(self, status: int = 200, content_type: str = "application/json") -> None:
        self.send(
            (
                f"HTTP/1.1 {status} {REASONS.get(status, 'OK')}\r\n"
                f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )

    def chunk(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.send(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        self.send(b"0\r\n\r\n")

    def upgrade(self, content_type: str = "application/vnd.docker.multiplexed-stream") -> None:
        self.send(
            (
                "HTTP/1.1 101 UPGRADED\r\n"
                f"Content-Type: {content_type}\r\n"
                "Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
            ).encode()
        )

    def read_until_eof(self, timeout: float = 10) -> bytes:
        """After an upgrade: everything the client sends until it half-closes."""
        self.sock.settimeout(timeout)
        data = bytearray(self.trailing)
        while True:
            piece = self.sock.recv(65536)
            if not piece:
                return bytes(data)
            data += piece


REASONS = {
    101: "UPGRADED",
    200: "OK",
    201: "Created",
    204: "No Content",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    409: "Conflict",
    500: "Internal Server Error",
}

Handler = Callable[[Request], None]


class StubServer:
    """A threaded HTTP/1.1 server on a unix (or loopback TCP) socket with a route table.

    ``route("POST", r"/containers/(\\w+)/start", handler)``: the handler gets the
    parsed :class:`Request` and writes its answer with the request's helpers. Every
    request is recorded in ``requests`` in arrival order.
    """

    def __init__(self, path: str | None = None, tcp: bool = False) -> None:
        if tcp:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("127.0.0.1", 0))
            self.host = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        else:
            assert path is not None
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
            self.host = f"unix://{path}"
        self.listener.listen(64)
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.requests: list[Request] = []
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept.start()

    def route(self, method: str, pattern: str, handler: Handler | None = None) -> Any:
        def register(fn: Handler) -> Handler:
            self.routes.append((method, re.compile(f"^{pattern}$"), fn))
            return fn

        return register(handler) if handler is not None else register

    def json_route(self, method: str, pattern: str, status: int, body: Any) -> None:
        self.route(method, pattern, lambda req: req.respond(status, body))

    def find(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and re.fullmatch(path, r.path)]

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, sock: socket.socket) -> None:
        try:
            req = self._read_request(sock)
            if req is None:
                return
            with self.lock:
                self.requests.append(req)
            for method, pattern, handler in self.routes:
                if method == req.method and pattern.match(req.path):
                    handler(req)
                    break
            else:
                req.error(404, f"page not found: {req.method} {req.path}")
        except BaseException as exc:  # recorded for the test to see
            self.errors.append(exc)
        finally:
            try:
                sock.close()
            except OSError:
                pass

    @staticmethod
    def _read_request(sock: socket.socket) -> Request | None:
        conn = h11.Connection(h11.SERVER)
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                if not data and head is None:
                    return None
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL or event is h11.PAUSED:
                    break
                if isinstance(event, h11.EndOfMessage):
                    break
            elif isinstance(event, h11.ConnectionClosed):
                return None
        assert head is not None
        target = head.target.decode()
        parts = urlsplit(target)
        m = re.match(r"^/v(\d+\.\d+)(/.*)$", parts.path)
        version, path = (m.group(1), m.group(2)) if m else (None, parts.path)
        headers = {k.decode().lower(): v.decode() for k, v in head.headers}
        return Request(
            method=head.method.decode(),
            target=target,
            path=path,
            version=version,
            query=parse_qs(parts.query, keep_blank_values=True),
            headers=headers,
            body=bytes(body),
            sock=sock,
            trailing=conn.trailing_data[0],
        )

    def close(self) -> None:
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for t in self._threads:
            t.join(5)


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="pallet-cli-")
    yield os.path.join(d, "s.sock")
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


@pytest.fixture
def server(sock_path: str) -> Iterator[StubServer]:
    s = StubServer(sock_path)
    yield s
    s.close()
    assert not s.errors, s.errors


@pytest.fixture
def client(server: StubServer) -> cl.Client:
    return cl.Client(server.host, timeout=20)


# --------------------------------------------------------------------------- requests


def test_json_get_and_request_shape(server: StubServer, client: cl.Client) -> None:
    server.json_route("GET", "/info", 200, {"Driver": "vfs", "Containers": 2})
    assert client.get("/info") == {"Driver": "vfs", "Containers": 2}
    (req,) = server.requests
    assert req.version == "1.44"
    assert req.target == "/v1.44/info"
    assert req.headers["host"]
    assert req.headers["user-agent"].startswith("pallet")
    assert "content-length" not in req.headers and "transfer-encoding" not in req.headers


def test_post_json_body(server: StubServer, client: cl.Client) -> None:
    server.json_route("POST", "/containers/create", 201, {"Id": "abc", "Warnings": []})
    body = {"Image": "busybox", "Cmd": ["echo", "hé"], "Env": []}
    assert client.post("/containers/create", {"name": "web"}, body)["Id"] == "abc"
    (req,) = server.requests
    assert req.json() == body
    assert req.headers["content-type"] == "application/json"
    assert req.q("name") == "web"


def test_query_encoding(server: StubServer, client: cl.Client) -> None:
    server.json_route("GET", "/containers/json", 200, [])
    client.get(
        "/containers/json",
        {
            "all": True,
            "size": False,
            "limit": None,
            "filters": {"status": ["exited"], "name": ["a b&c"]},
            "changes": ['CMD ["sh"]', "ENV A=1"],
        },
    )
    (req,) = server.requests
    assert req.q("all") == "1"
    assert req.q("size") == "0"
    assert "limit" not in req.query
    assert json.loads(req.q("filters") or "") == {"status": ["exited"], "name": ["a b&c"]}
    assert req.query["changes"] == ['CMD ["sh"]', "ENV A=1"]
    assert " " not in req.target and '"' not in req.target


def test_path_is_escaped(server: StubServer, client: cl.Client) -> None:
    server.json_route("GET", r"/images/.+/json", 200, {})
    client.get("/images/localhost:5000/a b?c#d%/json")
    (req,) = server.requests
    assert req.target == "/v1.44/images/localhost:5000/a%20b%3Fc%23d%25/json"


def test_quote_matches_urllib() -> None:
    from urllib.parse import quote

    for text in ["a b", "x/y:z", "é&=?#%", "~-._", '{"a":[1]}']:
        assert cl.quote(text) == quote(text, safe="")
        assert cl.quote(text, safe="/:") == quote(text, safe="/:")


def test_no_content_and_not_modified(server: StubServer, client: cl.Client) -> None:
    server.route("POST", "/containers/x/start", lambda r: r.respond(204))
    server.route("POST", "/containers/y/start", lambda r: r.respond(304))
    assert client.post("/containers/x/start") is None
    assert client.post("/containers/y/start") is None  # docker: already started is no error


def test_chunked_body_in_awkward_pieces(server: StubServer, client: cl.Client) -> None:
    payload = json.dumps({"Id": "c" * 64, "Names": ["/x"], "Text": "ü" * 100}).encode()

    @server.route("GET", "/containers/c/json")
    def _(req: Request) -> None:
        req.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        req.send(b"Transfer-Encoding: chunked\r\n\r\n")
        pos = 0
        for size in (1, 7, 100, 3, 10_000):
            piece = payload[pos : pos + size]
            pos += size
            if not piece:
                break
            # chunk extension, and the header, data and CRLF in separate packets
            req.send(b"%x;ext=1\r\n" % len(piece))
            time.sleep(0.002)
            req.send(piece)
            time.sleep(0.002)
            req.send(b"\r\n")
        req.send(b"0\r\nX-Trailer: yes\r\n\r\n")

    assert client.get("/containers/c/json") == json.loads(payload)


def test_body_until_close(server: StubServer, client: cl.Client) -> None:
    @server.route("GET", "/version")
    def _(req: Request) -> None:
        req.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
        req.send(b'{"Version":')
        time.sleep(0.01)
        req.send(b'"0.1.0"}')

    assert client.get("/version") == {"Version": "0.1.0"}


def test_streamed_json_arrives_message_by_message(server: StubServer, client: cl.Client) -> None:
    go_on = threading.Event()
    messages = [
        {"status": "Pulling from library/busybox", "id": "latest"},
        {"status": "Downloading", "progressDetail": {"current": 5, "total": 10}, "id": "a1"},
        {"status": "Digest: sha256:ab", "extra": "é" * 3},
        {"status": "Status: Downloaded newer image for busybox:latest"},
    ]

    @server.route("POST", "/images/create")
    def _(req: Request) -> None:
        req.start_chunked()
        req.chunk(json.dumps(messages[0]) + "\r\n")
        assert go_on.wait(10), "the client did not see the first message before the rest"
        # two messages in one chunk, the second cut in the middle of a UTF-8 sequence
        second = json.dumps(messages[2], ensure_ascii=False).encode() + b"\n"
        cut = second.index("é".encode()) + 1
        req.chunk(json.dumps(messages[1]).encode() + b"\n" + second[:cut])
        time.sleep(0.01)
        req.chunk(second[cut:])
        # and one without a trailing newline, closed by the end of the body
        req.chunk(json.dumps(messages[3]))
        req.end_chunked()

    got = []
    for msg in client.stream_json("POST", "/images/create", {"fromImage": "busybox"}):
        got.append(msg)
        go_on.set()
    assert got == messages


def test_streamed_json_with_raw_decode_helper(server: StubServer, client: cl.Client) -> None:
    @server.route("GET", "/events")
    def _(req: Request) -> None:
        req.start_chunked()
        req.chunk('{"a":1}{"b":2} \n{"c"')
        req.chunk(":3}")
        req.end_chunked()

    assert list(client.stream_json("GET", "/events")) == [{"a": 1}, {"b": 2}, {"c": 3}]


def test_truncated_stream_is_an_error(server: StubServer, client: cl.Client) -> None:
    @server.route("GET", "/events")
    def _(req: Request) -> None:
        req.start_chunked()
        req.chunk('{"a":1}\n{"b":')
        # connection closed without the last chunk

    with pytest.raises(cl.ProtocolError):
        list(client.stream_json("GET", "/events"))


def test_short_content_length_body(server: StubServer, client: cl.Client) -> None:
    @server.route("GET", "/info")
    def _(req: Request) -> None:
        req.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}")

    with pytest.raises(cl.ProtocolError):
        client.get("/info")


def test_streaming_request_body_is_chunked(server: StubServer, client: cl.Client) -> None:
    import io

    @server.route("POST", "/images/create")
    def _(req: Request) -> None:
        req.start_chunked()
        req.chunk(json.dumps({"status": f"sha256:{len(req.body)}"}) + "\r\n")
        req.end_chunked()

    data = os.urandom(300_000)
    msgs = list(
        client.stream_json(
            "POST",
            "/images/create",
            {"fromSrc": "-"},
            body=io.BytesIO(data),
            headers={"Content-Type": "application/x-tar"},
        )
    )
    assert msgs == [{"status": "sha256:300000"}]
    (req,) = server.requests
    assert req.headers["transfer-encoding"] == "chunked"
    assert req.headers["content-type"] == "application/x-tar"
    assert req.body == data

    # a generator works too
    list(client.stream_json("POST", "/images/create", body=(bytes([i]) * 10 for i in range(5))))
    assert server.requests[-1].body == b"".join(bytes([i]) * 10 for i in range(5))


def test_error_answer_while_body_is_sent(server: StubServer, client: cl.Client) -> None:
    """The daemon refuses before reading the whole upload: its error, not EPIPE."""

    @server.route("POST", "/build")
    def _(req: Request) -> None:
        req.error(400, "bad context")

    # h11 reads the whole body in the stub, so send a body the stub reads then refuses;
    # the real early-refusal case is covered by a raw server below
    with pytest.raises(cl.APIError) as info:
        client.call("POST", "/build", body=iter([b"x" * 1000]))
    assert info.value.status == 400 and info.value.message == "bad context"


def test_early_refusal_with_unread_upload(sock_path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(4096)
        body = b'{"message":"no space left on device"}'
        conn.sendall(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        conn.shutdown(socket.SHUT_WR)
        time.sleep(0.2)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    c = cl.Client(f"unix://{sock_path}", timeout=10)
    with pytest.raises(cl.APIError) as info:
        c.call("POST", "/images/create", body=iter([b"y" * 65536] * 200))
    assert info.value.status == 500
    assert str(info.value) == "Error response from daemon: no space left on device"
    t.join(5)
    listener.close()


# --------------------------------------------------------------------------- errors


def test_error_with_json_message(server: StubServer, client: cl.Client) -> None:
    server.route("GET", "/containers/nope/json", lambda r: r.error(404, "No such container: nope"))
    with pytest.raises(cl.APIError) as info:
        client.get("/containers/nope/json")
    assert info.value.status == 404
    assert info.value.message == "No such container: nope"
    assert str(info.value) == "Error response from daemon: No such container: nope"


def test_error_with_text_or_empty_body(server: StubServer, client: cl.Client) -> None:
    server.route("GET", "/a", lambda r: r.respond(502, "bad gateway\n", content_type="text/plain"))
    server.route("GET", "/b", lambda r: r.respond(500))
    with pytest.raises(cl.APIError) as info:
        client.get("/a")
    assert info.value.message == "bad gateway"
    with pytest.raises(cl.APIError) as info:
        client.get("/b")
    assert info.value.status == 500
    assert "500" in info.value.message


def test_check_false_returns_the_response(server: StubServer, client: cl.Client) -> None:
    server.route("GET", "/a", lambda r: r.error(409, "conflict"))
    with client.request("GET", "/a", check=False) as resp:
        assert resp.status == 409
        assert resp.json() == {"message": "conflict"}


def test_cannot_connect_missing_socket(sock_path: str) -> None:
    c = cl.Client(f"unix://{sock_path}")
    with pytest.raises(cl.DaemonUnreachable) as info:
        c.get("/info")
    assert str(info.value) == (
        f"Cannot connect to the pallet daemon at unix://{sock_path}. Is the daemon running?"
    )


def test_cannot_connect_stale_socket(sock_path: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)
    s.close()  # the file stays, nobody listens: ECONNREFUSED
    with pytest.raises(cl.DaemonUnreachable, match="Is the daemon running"):
        cl.Client(f"unix://{sock_path}").ping()


def test_cannot_connect_tcp() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(cl.DaemonUnreachable) as info:
        cl.Client(f"tcp://127.0.0.1:{port}").ping()
    assert f"tcp://127.0.0.1:{port}" in str(info.value)


def test_default_host_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PALLET_HOST", raising=False)
    assert cl.Client().host == "unix:///run/pallet.sock"
    monkeypatch.setenv("PALLET_HOST", "unix:///tmp/other.sock")
    assert cl.Client().host == "unix:///tmp/other.sock"
    assert cl.Client("tcp://10.0.0.1:1").host == "tcp://10.0.0.1:1"


def test_parse_host() -> None:
    assert cl.parse_host("unix:///run/p.sock")[:2] == (socket.AF_UNIX, "/run/p.sock")
    assert cl.parse_host("tcp://127.0.0.1:2375")[:2] == (socket.AF_INET, ("127.0.0.1", 2375))
    assert cl.parse_host("tcp://[::1]:2376")[:2] == (socket.AF_INET6, ("::1", 2376))
    assert cl.parse_host("tcp://localhost")[1] == ("localhost", 2375)
    for bad in ("ssh://x", "unix://", "tcp://h:port"):
        with pytest.raises(cl.ClientError):
            cl.parse_host(bad)


def test_tcp_host() -> None:
    s = StubServer(tcp=True)
    try:
        s.route("GET", "/_ping", lambda r: r.respond(200, "OK", content_type="text/plain"))
        assert cl.Client(s.host).ping()
        assert s.requests[0].headers["host"] == s.host[len("tcp://") :]
    finally:
        s.close()


# --------------------------------------------------------------------------- hijack


def _read_frames(conn: cl.Hijacked) -> list[tuple[int, bytes]]:
    decoder = FrameDecoder()
    frames: list[tuple[int, bytes]] = []
    while True:
        data = conn.recv()
        if not data:
            break
        frames.extend(decoder.feed(data))
    assert decoder.pending == 0
    return frames


def test_hijack_frames_stdin_and_half_close(server: StubServer, client: cl.Client) -> None:
    received: list[bytes] = []

    @server.route("POST", "/containers/c1/attach")
    def _(req: Request) -> None:
        assert req.headers["connection"].lower() == "upgrade"
        assert req.headers["upgrade"] == "tcp"
        req.upgrade()
        time.sleep(0.01)  # the first frame comes in its own packet
        req.send(frame(STDOUT, b"ready\n"))
        stdin = req.read_until_eof()  # the client half-closes when its stdin ends
        received.append(stdin)
        # output keeps flowing after the client's EOF
        req.send(frame(STDERR, b"got " + stdin))
        req.send(frame(STDOUT, b"bye\n")[:5])
        time.sleep(0.01)
        req.send(frame(STDOUT, b"bye\n")[5:])

    conn = client.hijack(
        "POST", "/containers/c1/attach", {"stream": 1, "stdin": 1, "stdout": 1, "stderr": 1}
    )
    with conn:
        assert conn.multiplexed is True
        first = conn.recv()
        assert FrameDecoder().feed(first) == [(STDOUT, b"ready\n")]
        conn.sendall(b"hello ")
        conn.sendall(b"world\n")
        conn.close_write()
        conn.close_write()  # twice is harmless
        assert _read_frames(conn) == [(STDERR, b"got hello world\n"), (STDOUT, b"bye\n")]
    assert received == [b"hello world\n"]
    (req,) = server.requests
    assert req.query == {"stream": ["1"], "stdin": ["1"], "stdout": ["1"], "stderr": ["1"]}


def test_hijack_output_in_the_same_packet_as_the_headers(
    server: StubServer, client: cl.Client
) -> None:
    @server.route("POST", "/containers/c2/attach")
    def _(req: Request) -> None:
        req.send(
            b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
            b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n" + frame(STDOUT, b"early\n")
        )

    with client.hijack("POST", "/containers/c2/attach") as conn:
        assert conn.multiplexed is None
        assert _read_frames(conn) == [(STDOUT, b"early\n")]


def test_hijack_raw_tty_stream(server: StubServer, client: cl.Client) -> None:
    @server.route("POST", "/containers/t/attach")
    def _(req: Request) -> None:
        req.upgrade("application/vnd.docker.raw-stream")
        req.send(b"\x1b[1mraw tty bytes\r\n")

    with client.hijack("POST", "/containers/t/attach") as conn:
        data = b""
        while chunk := conn.recv():
            data += chunk
    assert data == b"\x1b[1mraw tty bytes\r\n"


def test_hijack_refused(server: StubServer, client: cl.Client) -> None:
    server.route("POST", "/containers/x/attach", lambda r: r.error(404, "No such container: x"))
    with pytest.raises(cl.APIError) as info:
        client.hijack("POST", "/containers/x/attach")
    assert info.value.status == 404
    assert info.value.message == "No such container: x"


def test_wait_headers_now_body_later(server: StubServer, client: cl.Client) -> None:
    """docker's run: the wait answer's headers come at once, its body at exit."""
    exited = threading.Event()

    @server.route("POST", "/containers/c/wait")
    def _(req: Request) -> None:
        req.start_chunked()
        exited.wait(10)
        req.chunk(json.dumps({"StatusCode": 3, "Error": None}))
        req.end_chunked()

    t0 = time.monotonic()
    resp = client.request("POST", "/containers/c/wait", {"condition": "next-exit"})
    assert resp.status == 200
    assert time.monotonic() - t0 < 5
    exited.set()
    assert resp.json() == {"StatusCode": 3, "Error": None}
    resp.close()


def test_malformed_status_line(sock_path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with pytest.raises(cl.ProtocolError):
        cl.Client(f"unix://{sock_path}", timeout=5).get("/info")
    t.join(5)
    listener.close()
