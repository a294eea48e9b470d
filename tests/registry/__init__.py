"""A real registry for tests: Debian's ``docker-registry`` (the distribution project) on
127.0.0.1 with its own storage directory, in three modes:

- plain HTTP, no auth;
- HTTPS with a throwaway CA (made here with openssl) and htpasswd basic auth;
- bearer tokens from :class:`TokenServer`, a small token service in this process that
  signs RS256 JWTs with a throwaway key (``x5c`` header, the key's self-signed
  certificate being the registry's ``rootcertbundle``).

Also helpers to build OCI images with umoci and copy them with skopeo.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

REGISTRY = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_ca(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost: (ca.crt, server.crt, server.key)."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = d / "ca.key", d / "ca.crt"
    key, csr, crt = d / "server.key", d / "server.csr", d / "server.crt"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
        "-out", str(ca_crt), "-days", "2", "-subj", "/CN=pallet test CA")  # fmt: skip
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca_crt, crt, key


@dataclass
class Registry:
    root: Path
    port: int
    proc: subprocess.Popen[bytes]
    tls: bool = False
    ca: Path | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    def blob_path(self, repo: str, digest: str) -> Path:
        hexpart = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
        scheme = "https" if self.tls else "http"
        req = urllib.request.Request(f"{scheme}://{self.host}{path}", headers=headers or {})
        ctx = ssl.create_default_context(cafile=str(self.ca)) if self.ca else None
        try:
            with urllib.request.urlopen(req, context=ctx) as r:
                return r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers


def start_registry(
    root: Path,
    *,
    tls: bool = False,
    htpasswd: tuple[str, str] | None = None,
    token: TokenServer | None = None,
) -> Registry:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "storage")},
            "delete": {"enabled": True},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "pallet-test"},
    }
    ca = None
    if tls:
        ca, crt, key = make_ca(root / "tls")
        cfg["http"]["tls"] = {"certificate": str(crt), "key": str(key)}
    if htpasswd:
        pw = subprocess.run(
            ["htpasswd", "-Bbn", htpasswd[0], htpasswd[1]], check=True, capture_output=True
        ).stdout
        (root / "htpasswd").write_bytes(pw)
        cfg["auth"] = {"htpasswd": {"realm": "basic-realm", "path": str(root / "htpasswd")}}
    if token:
        cfg["auth"] = {
            "token": {
                "realm": token.realm,
                "service": token.service,
                "issuer": token.issuer,
                "rootcertbundle": str(token.cert),
            }
        }
    # the registry reads YAML; JSON is YAML
    (root / "config.yml").write_text(json.dumps(cfg))
    log = open(root / "registry.log", "ab")
    proc = subprocess.Popen([REGISTRY, "serve", str(root / "config.yml")], stdout=log, stderr=log)
    reg = Registry(root, port, proc, tls, ca)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {(root / 'registry.log').read_text()}")
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        if time.monotonic() > deadline:
            reg.stop()
            raise RuntimeError("docker-registry did not start listening")
        time.sleep(0.05)
    return reg


# --- the token server -----------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues bearer tokens for ``repository:NAME:ACTIONS`` scopes; requires basic
    credentials when ``users`` is given. Records every request for the tests."""

    service = "pallet-test-registry"
    issuer = "pallet-test-token-issuer"

    def __init__(self, root: Path, users: dict[str, str] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.key = root / "token.key"
        self.cert = root / "token.crt"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
             "-out", str(self.cert), "-days", "2", "-subj", "/CN=pallet test token issuer"],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        self.x5c = base64.b64encode(der).decode()
        self.users = users
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                q = parse_qs(urlsplit(self.path).query)
                auth = self.headers.get("Authorization") or ""
                user = None
                if auth.startswith("Basic "):
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    if server.users is None or server.users.get(u) == p:
                        user = u
                    else:
                        self.send_response(401)
                        self.end_headers()
                        return
                elif server.users is not None:
                    self.send_response(401)
                    self.end_headers()
                    return
                scopes = q.get("scope", [])
                server.requests.append(
                    {"user": user, "scopes": scopes, "service": q.get("service")}
                )
                body = json.dumps({"token": server.sign(user or "", scopes), "expires_in": 300})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, sub: str, scopes: list[str]) -> str:
        access = []
        for s in scopes:
            parts = s.split(":")
            if len(parts) >= 3 and parts[0] == "repository":
                access.append(
                    {
                        "type": "repository",
                        "name": ":".join(parts[1:-1]),
                        "actions": parts[-1].split(","),
                    }
                )
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {
            "iss": self.issuer,
            "sub": sub,
            "aud": self.service,
            "exp": now + 600,
            "nbf": now - 60,
            "iat": now,
            "jti": hashlib.sha256(os.urandom(16)).hexdigest(),
            "access": access,
        }
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing}.{_b64(sig)}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- building images with umoci, copying with skopeo ------------------------------------


def umoci_image(
    layout: Path, tag: str, layers: list[Path], config: list[str] | None = None
) -> None:
    """An OCI image in ``layout`` (created when missing) from layer tarballs (uncompressed
    tars; umoci gzips them)."""
    if not layout.exists():
        subprocess.run(["umoci", "init", "--layout", str(layout)], check=True, capture_output=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:{tag}"], check=True, capture_output=True)
    for layer in layers:
        subprocess.run(
            ["umoci", "raw", "add-layer", "--image", f"{layout}:{tag}", str(layer)],
            check=True,
            capture_output=True,
        )
    if config:
        subprocess.run(
            ["umoci", "config", "--image", f"{layout}:{tag}", *config],
            check=True,
            capture_output=True,
        )


def skopeo(*args: str) -> str:
    r = subprocess.run(["skopeo", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} -> {r.returncode}\n{r.stderr}")
    return r.stdout


class SlowProxy:
    """A TCP proxy to a registry that sends the registry's answers slowly (``rate``
    bytes per second), so a test can act in the middle of a download."""

    def __init__(self, target_port: int, rate: int = 256 * 1024) -> None:
        self.target_port = target_port
        self.rate = rate
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, 0), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(upstream, client, self.rate), daemon=True
            ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, rate: int) -> None:
        try:
            while data := src.recv(16384):
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed = True
        self.sock.close()


# --- raw pushes: crafted images in a real (plain HTTP, no auth) registry -----------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def _http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Any:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    return urllib.request.urlopen(req)


def push_blob(reg: Registry, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    base = f"http://{reg.host}"
    with _http("POST", f"{base}/v2/{repo}/blobs/uploads/", b"") as r:
        loc = r.headers["Location"]
    if loc.startswith("/"):
        loc = base + loc
    sep = "&" if "?" in loc else "?"
    with _http(
        "PUT", f"{loc}{sep}digest={digest}", data, {"Content-Type": "application/octet-stream"}
    ):
        pass
    return digest


def push_manifest(reg: Registry, repo: str, ref: str, raw: bytes, media_type: str) -> str:
    with _http(
        "PUT", f"http://{reg.host}/v2/{repo}/manifests/{ref}", raw, {"Content-Type": media_type}
    ):
        pass
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def push_image(
    reg: Registry,
    repo: str,
    tag: str,
    layers: list[bytes],
    *,
    diff_ids: list[str] | None = None,
    layer_media: str = OCI_LAYER_GZIP,
    config: dict[str, Any] | None = None,
) -> str:
    """Push an image made of raw layer blobs (as given: compressed or not, valid or not);
    diff IDs default to the sha256 of each gunzipped blob. Returns the manifest digest."""
    import gzip as _gzip

    if diff_ids is None:
        diff_ids = []
        for b in layers:
            raw = _gzip.decompress(b) if b[:2] == b"\x1f\x8b" else b
            diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        **(config or {}),
    }
    cfg_raw = json.dumps(cfg).encode()
    cfg_digest = push_blob(reg, repo, cfg_raw)
    descs = []
    for b in layers:
        descs.append({"mediaType": layer_media, "digest": push_blob(reg, repo, b), "size": len(b)})
    man = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": len(cfg_raw)},
        "layers": descs,
    }
    return push_manifest(reg, repo, tag, json.dumps(man).encode(), OCI_MANIFEST)


class FakeRegistry:
    """A tiny HTTP registry answering from a table (path -> status, headers, body), for
    answers a real registry refuses to store (malformed manifests, odd media types)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        table = self.routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, body: bool) -> None:
                path = urlsplit(self.path).path
                status, headers, data = table.get(
                    path,
                    (
                        404,
                        {"Content-Type": "application/json"},
                        b'{"errors":[{"code":"NOT_FOUND","message":"not found"}]}',
                    ),
                )
                if path == "/v2/" and path not in table:
                    status, headers, data = 200, {}, b"{}"
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer(True)

            def do_HEAD(self) -> None:
                self._answer(False)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
