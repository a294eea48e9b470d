"""The registry HTTP client: endpoints, TLS, authentication, errors.

Endpoints follow Docker's rules (``registry/service``):

- ``docker.io`` is served by ``registry-1.docker.io``; ``registry-mirrors`` come first
  (for pulls only), the upstream last;
- HTTPS by default, verified against the system CAs plus ``<certs.d>/<host>/*.crt``
  (``/etc/pallet/certs.d``, or ``$PALLET_CERTS_D``; Docker's ``/etc/docker/certs.d``);
- a registry in ``insecure-registries`` (``host[:port]`` or a CIDR), and any loopback
  address (Docker's default ``127.0.0.0/8``), is tried over HTTPS without verification and
  then over plain HTTP.

Authentication is the distribution challenge flow: ``GET /v2/`` answers 401 with
``WWW-Authenticate: Bearer realm=...,service=...`` (fetch a token for
``repository:<name>:pull[,push]`` from the realm, with basic credentials if there are
some) or ``Basic realm=...`` (send the credentials on every request).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

from pallet.errors import Forbidden, InvalidArgument, NotFound, PalletError, Unauthorized
from pallet.reference import DEFAULT_DOMAIN, Reference
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

DOCKER_HUB_HOST = "registry-1.docker.io"
DEFAULT_CERTS_D = "/etc/pallet/certs.d"
USER_AGENT = "pallet/0.1 (linux) docker/24.0-compatible"
CONNECT_TIMEOUT = 30.0
MAX_REDIRECTS = 5


class RegistryError(PalletError):
    """A registry answered with an error (or could not be reached)."""

    status = 500


class Unreachable(RegistryError):
    """The registry could not be reached at all (connection refused, DNS, TLS)."""


class AuthConfig(BaseModel):
    """Credentials as the Docker API carries them (``X-Registry-Auth``, ``POST /auth``)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    username: str = ""
    password: str = ""
    auth: str = ""
    email: str = ""
    serveraddress: str = ""
    identitytoken: str = ""
    registrytoken: str = ""

    def basic(self) -> tuple[str, str] | None:
        if self.username or self.password:
            return self.username, self.password
        if self.auth:
            try:
                user, _, pw = base64.b64decode(self.auth).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            return user, pw
        return None

    @classmethod
    def from_header(cls, value: str | None) -> AuthConfig | None:
        """Decode ``X-Registry-Auth`` (base64url JSON, padding optional); None if empty."""
        if not value or not value.strip():
            return None
        raw = value.strip()
        try:
            data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            # like dockerd: an undecodable header is treated as no credentials
            return None
        if not isinstance(obj, dict):
            return None
        conf = cls.model_validate(obj)
        return conf if (conf.basic() or conf.registrytoken or conf.identitytoken) else None


class RegistryOptions(BaseModel):
    """What the daemon's configuration says about registries."""

    model_config = ConfigDict(extra="forbid")

    insecure_registries: list[str] = Field(default_factory=list)
    registry_mirrors: list[str] = Field(default_factory=list)
    certs_d: str = Field(default_factory=lambda: os.environ.get("PALLET_CERTS_D", DEFAULT_CERTS_D))

    def is_insecure(self, host: str) -> bool:
        if host in self.insecure_registries:
            return True
        hostname = _hostname(host)
        if hostname == "localhost":
            return True
        try:
            addr = ipaddress.ip_address(hostname)
        except ValueError:
            try:
                infos = socket.getaddrinfo(hostname, None)
                addrs = {ipaddress.ip_address(i[4][0]) for i in infos}
            except (OSError, ValueError):
                return False
        else:
            addrs = {addr}
        for a in addrs:
            if a.is_loopback:
                return True
            for entry in self.insecure_registries:
                with contextlib.suppress(ValueError):
                    if a in ipaddress.ip_network(entry, strict=False):
                        return True
        return False


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass
class Endpoint:
    host: str  # host[:port]
    scheme: str  # "https" or "http"
    verify: bool
    mirror: bool = False
    fallback_http: bool = False  # insecure: plain HTTP is tried when HTTPS fails
    prefix: str = ""  # a mirror's path prefix

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}{self.prefix}"


def endpoints(domain: str, opts: RegistryOptions, push: bool = False) -> list[Endpoint]:
    """Where to talk to for registry ``domain`` (mirrors first, for Docker Hub pulls)."""
    out: list[Endpoint] = []
    if domain == DEFAULT_DOMAIN:
        if not push:
            for m in opts.registry_mirrors:
                u = urlsplit(m if "://" in m else f"https://{m}")
                insecure = u.scheme == "http" or opts.is_insecure(u.netloc)
                out.append(
                    Endpoint(
                        u.netloc,
                        u.scheme or "https",
                        not insecure,
                        mirror=True,
                        fallback_http=insecure and u.scheme != "http",
                        prefix=u.path.rstrip("/"),
                    )
                )
        out.append(Endpoint(DOCKER_HUB_HOST, "https", True))
        return out
    insecure = opts.is_insecure(domain)
    out.append(Endpoint(domain, "https", not insecure, fallback_http=insecure))
    return out


def _ssl_context(host: str, verify: bool, certs_d: str) -> ssl.SSLContext:
    if not verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context()
    d = Path(certs_d) / host.replace(":", ":")
    if d.is_dir():
        for f in sorted(d.iterdir()):
            if f.suffix == ".crt":
                ctx.load_verify_locations(cafile=str(f))
        cert, key = d / "client.cert", d / "client.key"
        if cert.exists() and key.exists():
            ctx.load_cert_chain(str(cert), str(key))
    return ctx


class Response:
    """A streamed HTTP response; ``read`` it, then ``close`` it (or use ``with``)."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, url: str):
        self.conn = conn
        self.resp = resp
        self.url = url
        self.status = resp.status
        self.headers = resp.headers

    def header(self, name: str) -> str | None:
        return self.resp.getheader(name)

    def read(self, n: int = -1) -> bytes:
        return self.resp.read(n) if n >= 0 else self.resp.read()

    def readinto(self, b: memoryview) -> int:
        return self.resp.readinto(b)

    def read1(self, n: int) -> bytes:
        """What has arrived, up to ``n`` bytes (one read: progress on slow links)."""
        return self.resp.read1(n)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.resp.close()
        with contextlib.suppress(Exception):
            self.conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect_error(method: str, url: str, e: BaseException) -> Unreachable:
    verb = method.capitalize()
    if isinstance(e, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(e).upper():
        return Unreachable(f'{verb} "{url}": http: server gave HTTP response to HTTPS client')
    if isinstance(e, ssl.SSLCertVerificationError):
        return Unreachable(
            f'{verb} "{url}": tls: failed to verify certificate: {e.verify_message or e}'
        )
    if isinstance(e, ConnectionRefusedError):
        host = urlsplit(url).netloc
        return Unreachable(f'{verb} "{url}": dial tcp {host}: connect: connection refused')
    if isinstance(e, socket.gaierror):
        name = urlsplit(url).hostname
        return Unreachable(f'{verb} "{url}": dial tcp: lookup {name}: no such host')
    if isinstance(e, TimeoutError | socket.timeout):
        return Unreachable(f'{verb} "{url}": i/o timeout')
    return Unreachable(f'{verb} "{url}": {e}')


def _error_text(body: bytes) -> str:
    """The registry's error body in Docker's words (``code lower: message``)."""
    try:
        obj = json.loads(body)
        errs = obj.get("errors") if isinstance(obj, dict) else None
        if errs:
            parts = []
            for e in errs:
                code = str(e.get("code", "unknown")).lower().replace("_", " ")
                parts.append(f"{code}: {e.get('message', '')}".rstrip(": "))
            return ", ".join(parts)
        if isinstance(obj, dict) and obj.get("details"):
            return str(obj["details"])
    except (ValueError, AttributeError, TypeError):
        pass
    text = body.decode(errors="replace").strip()
    return text[:200]


def error_codes(body: bytes) -> list[str]:
    try:
        return [str(e.get("code", "")) for e in json.loads(body).get("errors") or []]
    except (ValueError, AttributeError, TypeError):
        return []


_CHALLENGE_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_RE.finditer(rest)
    }
    return scheme.lower(), params


@dataclass
class Repository:
    """One repository on one registry endpoint, with its authorisation."""

    opts: RegistryOptions
    endpoint: Endpoint
    path: str  # repository path on the registry ("library/busybox")
    auth: AuthConfig | None = None
    actions: tuple[str, ...] = ("pull",)
    extra_scopes: list[str] = field(default_factory=list)
    _authz: str | None = None
    _pinged: bool = False
    _challenge: tuple[str, dict[str, str]] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- low level -------------------------------------------------------------------

    def _open(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | Any | None,
        timeout: float | None,
    ) -> Response:
        u = urlsplit(url)
        conn: http.client.HTTPConnection
        if u.scheme == "https":
            ctx = _ssl_context(u.netloc, self.endpoint.verify, self.opts.certs_d)
            conn = http.client.HTTPSConnection(u.netloc, timeout=timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(u.netloc, timeout=timeout)
        target = u.path or "/"
        if u.query:
            target += "?" + u.query
        hdrs = {"User-Agent": USER_AGENT, **headers}
        try:
            conn.request(method, target, body=body, headers=hdrs)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise _connect_error(method, url, e) from e
        return Response(conn, resp, url)

    def _raw(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | Any | None = None,
        timeout: float | None = CONNECT_TIMEOUT * 4,
        authorize: bool = True,
    ) -> Response:
        """One request, following redirects (credentials only to the same host)."""
        origin = urlsplit(url).netloc
        hdrs = dict(headers or {})
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(hdrs)
            if authorize and self._authz and urlsplit(url).netloc == origin:
                h["Authorization"] = self._authz
            resp = self._open(method, url, h, body, timeout)
            if resp.status in (301, 302, 303, 307, 308) and resp.header("Location"):
                loc = urljoin(url, resp.header("Location") or "")
                resp.close()
                url = loc
                if resp.status == 303:
                    method, body = "GET", None
                continue
            return resp
        raise RegistryError(f'{method} "{url}": stopped after {MAX_REDIRECTS} redirects')

    def url(self, suffix: str) -> str:
        return f"{self.endpoint.base}/v2/{self.path}/{suffix}"

    # --- ping and authorisation ------------------------------------------------------

    def ping(self) -> None:
        """``GET /v2/``: pick the scheme (insecure fallback) and learn the challenge."""
        with self._lock:
            if self._pinged:
                return
            url = f"{self.endpoint.base}/v2/"
            try:
                resp = self._raw("GET", url, timeout=CONNECT_TIMEOUT, authorize=False)
            except Unreachable as e:
                if not (self.endpoint.fallback_http and self.endpoint.scheme == "https"):
                    raise
                log.debug("%s; trying plain HTTP", e.message)
                self.endpoint.scheme = "http"
                url = f"{self.endpoint.base}/v2/"
                resp = self._raw("GET", url, timeout=CONNECT_TIMEOUT, authorize=False)
            with resp:
                resp.read()
                if resp.status == 401:
                    header = resp.header("WWW-Authenticate") or ""
                    self._challenge = parse_challenge(header)
                elif resp.status >= 500:
                    raise RegistryError(
                        f'Get "{url}": received unexpected HTTP status: {resp.status} {resp.resp.reason}'
                    )
            self._authorize()
            self._pinged = True

    def _authorize(self) -> None:
        if self._challenge is None:
            return
        scheme, params = self._challenge
        if scheme == "basic":
            creds = self.auth.basic() if self.auth else None
            if creds is None:
                self._authz = None
                return
            self._authz = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        elif scheme == "bearer":
            if self.auth is not None and self.auth.registrytoken:
                self._authz = "Bearer " + self.auth.registrytoken
                return
            self._authz = "Bearer " + self._fetch_token(params)

    def scopes(self) -> list[str]:
        if not self.path:
            return list(self.extra_scopes)
        return [f"repository:{self.path}:{','.join(self.actions)}", *self.extra_scopes]

    def _fetch_token(self, params: dict[str, str]) -> str:
        realm = params.get("realm")
        if not realm:
            raise RegistryError("the registry's bearer challenge names no realm")
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        for s in self.scopes():
            query.append(("scope", s))
        creds = self.auth.basic() if self.auth else None
        if creds:
            query.append(("account", creds[0]))
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers: dict[str, str] = {}
        if creds:
            headers["Authorization"] = (
                "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            )
        u = urlsplit(url)
        verify = u.netloc != self.endpoint.host or self.endpoint.verify
        probe = Repository(self.opts, Endpoint(u.netloc, u.scheme, verify), "")
        resp = probe._open("GET", url, headers, None, CONNECT_TIMEOUT)
        with resp:
            body = resp.read()
            if resp.status == 401:
                raise Unauthorized(
                    f'Get "{url.split("?")[0]}": unauthorized: incorrect username or password'
                )
            if resp.status != 200:
                raise RegistryError(
                    f'Get "{url.split("?")[0]}": token server answered {resp.status}: '
                    f"{_error_text(body)}"
                )
        try:
            obj = json.loads(body)
            token = obj.get("token") or obj.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token or not isinstance(token, str):
            raise RegistryError(f'Get "{url.split("?")[0]}": the token server sent no token')
        return token

    # --- requests --------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | Any | None = None,
        timeout: float | None = CONNECT_TIMEOUT * 4,
        retry: bool = True,
    ) -> Response:
        """An authorised request (after :meth:`ping`). A 401 is turned into
        :class:`Unauthorized` with Docker's message."""
        self.ping()
        stale = f"https://{self.endpoint.host}/"
        if self.endpoint.scheme == "http" and url.startswith(stale):  # built before the ping
            url = f"http://{self.endpoint.host}/" + url[len(stale) :]
        resp = self._raw(method, url, headers, body, timeout)
        if resp.status == 401:
            data = resp.read()
            resp.close()
            header = resp.header("WWW-Authenticate") or ""
            resendable = body is None or isinstance(body, bytes)
            if header and retry and resendable:
                # a registry that challenges only on the repository URL, or a bearer
                # token that expired during a long pull: authorise again, once
                before = self._authz
                with self._lock:
                    self._challenge = parse_challenge(header)
                    self._authorize()
                if self._authz and (self._authz != before or self._challenge[0] == "bearer"):
                    return self.request(method, url, headers, body, timeout, retry=False)
            raise self.unauthorized(method, url, data)
        return resp

    def unauthorized(self, method: str, url: str, body: bytes) -> PalletError:
        verb = method.capitalize()
        if self._challenge is not None and self._challenge[0] == "basic" and not self._authz:
            return Unauthorized(f'{verb} "{url}": no basic auth credentials')
        text = _error_text(body) or "unauthorized: authentication required"
        if "DENIED" in error_codes(body):
            return Forbidden(f'{verb} "{url}": {text}')
        return Unauthorized(f'{verb} "{url}": {text}')

    def check(self, resp: Response, what: str) -> None:
        """Raise for an error status, in Docker's words, naming ``what``."""
        if resp.status < 400:
            return
        body = resp.read()
        resp.close()
        text = _error_text(body)
        codes = error_codes(body)
        if resp.status == 404:
            raise NotFound(f"{what}: {text or 'not found'}")
        if resp.status == 403 or "DENIED" in codes:
            raise Forbidden(f"{what}: {text or 'denied'}")
        if resp.status == 400:
            raise InvalidArgument(f"{what}: {text}")
        raise RegistryError(f"{what}: received unexpected HTTP status: {resp.status} {text}")


def open_repository(
    ref: Reference,
    opts: RegistryOptions,
    auth: AuthConfig | None,
    actions: Iterable[str] = ("pull",),
    push: bool = False,
) -> list[Repository]:
    """A :class:`Repository` per endpoint for ``ref``, in the order to try them."""
    return [
        Repository(opts, ep, ref.path, auth, tuple(actions))
        for ep in endpoints(ref.domain, opts, push)
    ]


def check_login(server: str, opts: RegistryOptions, auth: AuthConfig) -> str:
    """``POST /auth``: check credentials against ``server``'s ``/v2/``. Returns the status."""
    host = server
    if "://" in host:
        host = urlsplit(host).netloc
    host = host.rstrip("/")
    if host in ("", "docker.io", "index.docker.io", "registry-1.docker.io"):
        ep = Endpoint(DOCKER_HUB_HOST, "https", True)
    else:
        insecure = opts.is_insecure(host)
        ep = Endpoint(host, "https", not insecure, fallback_http=insecure)
    repo = Repository(opts, ep, "", auth, ())
    repo.ping()
    challenge = repo._challenge
    if challenge is None:
        return "Login Succeeded"
    if challenge[0] == "bearer":
        # _authorize fetched a token with the credentials: they were accepted
        pass
    url = f"{ep.base}/v2/"
    resp = repo._raw("GET", url, timeout=CONNECT_TIMEOUT)
    with resp:
        resp.read()
        if resp.status == 401:
            raise Unauthorized(f"login attempt to {url} failed with status: 401 Unauthorized")
        if resp.status >= 400:
            raise RegistryError(f"login attempt to {url} failed with status: {resp.status}")
    return "Login Succeeded"
