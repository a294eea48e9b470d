"""The Graph: pallet's image store.

Content addressing, as Docker's layer and image stores do it:

- a layer is known by its *diff ID* (sha256 of its uncompressed tar) and stored as the
  driver snapshot named by its *chain ID* (chainID(1) = diffID(1), chainID(n) =
  sha256(chainID(n-1) + " " + diffID(n))), so a layer shared by two images exists once;
- an image is its config JSON, stored as a blob ``<root>/blobs/sha256/<hex>`` whose
  digest is the image ID;
- images, tags/digests, layers and their reference counts, and which images use which
  layer, are rows in ``<root>/graph.db`` (:class:`pallet.store.Store`), changed in
  transactions.

A layer's ``refs`` counts every image and every container rootfs whose chain includes
it; when it drops to zero the layer leaves the database and the driver. Layers being
added belong to a :class:`Lease` until an image refers to them, so a failed import (or
a crash: see :meth:`Graph.cleanup`) leaves nothing behind, and a concurrent delete never
removes a layer an import is about to use.

The Graph asks the driver for snapshots and never mounts anything itself (applying a
layer to a driver without an ``apply_target`` is :mod:`pallet.archive`'s business).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import platform as _platform
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pallet import archive, reference
from pallet.errors import Conflict, InvalidArgument, NotFound, PalletError
from pallet.reference import Reference
from pallet.storage import Kind, Mount, StorageDriver
from pallet.store import Store

log = logging.getLogger(__name__)

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS layers (
        chain_id TEXT PRIMARY KEY,
        diff_id TEXT NOT NULL,
        parent TEXT,
        size INTEGER NOT NULL,
        refs INTEGER NOT NULL CHECK (refs >= 0),
        created REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS images (
        id TEXT PRIMARY KEY,
        top_layer TEXT REFERENCES layers(chain_id),
        parent TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        size INTEGER NOT NULL,
        added REAL NOT NULL,
        last_tag_time TEXT NOT NULL DEFAULT ''
    )""",
    """CREATE TABLE IF NOT EXISTS image_layers (
        image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        chain_id TEXT NOT NULL REFERENCES layers(chain_id),
        PRIMARY KEY (image_id, position)
    )""",
    "CREATE INDEX IF NOT EXISTS image_layers_chain ON image_layers(chain_id)",
    """CREATE TABLE IF NOT EXISTS refs (
        name TEXT PRIMARY KEY,
        image_id TEXT NOT NULL REFERENCES images(id),
        created REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS refs_image ON refs(image_id)",
    """CREATE TABLE IF NOT EXISTS rootfs (
        container_id TEXT PRIMARY KEY,
        image_id TEXT NOT NULL,
        chain_id TEXT REFERENCES layers(chain_id),
        created REAL NOT NULL
    )""",
]

ZERO_TIME = "0001-01-01T00:00:00Z"
TMP_KEY_PREFIX = "tmp-"

# Docker's container.Config as an image config carries it: these keys always appear
# (null/empty when unset), the others only when set.
_CONFIG_KEYS = (
    "Hostname",
    "Domainname",
    "User",
    "AttachStdin",
    "AttachStdout",
    "AttachStderr",
    "ExposedPorts",
    "Tty",
    "OpenStdin",
    "StdinOnce",
    "Env",
    "Cmd",
    "Healthcheck",
    "ArgsEscaped",
    "Image",
    "Volumes",
    "WorkingDir",
    "Entrypoint",
    "NetworkDisabled",
    "MacAddress",
    "OnBuild",
    "Labels",
    "StopSignal",
    "StopTimeout",
    "Shell",
)
_CONFIG_DEFAULTS: dict[str, Any] = {
    "Hostname": "",
    "Domainname": "",
    "User": "",
    "AttachStdin": False,
    "AttachStdout": False,
    "AttachStderr": False,
    "Tty": False,
    "OpenStdin": False,
    "StdinOnce": False,
    "Env": None,
    "Cmd": None,
    "Image": "",
    "Volumes": None,
    "WorkingDir": "",
    "Entrypoint": None,
    "OnBuild": None,
    "Labels": None,
}


def docker_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """An image's ``config`` as Docker's API shows it (defaults filled, Docker's order)."""
    src = dict(cfg or {})
    out: dict[str, Any] = {}
    for k in _CONFIG_KEYS:
        if k in src:
            out[k] = src.pop(k)
        elif k in _CONFIG_DEFAULTS:
            out[k] = _CONFIG_DEFAULTS[k]
    out.update(src)
    return out


# --- time ---------------------------------------------------------------------------


def format_time(ns: int) -> str:
    """RFC 3339 with nanoseconds, UTC, trailing zeros trimmed (Go's RFC3339Nano)."""
    sec, frac = divmod(ns, 1_000_000_000)
    t = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC) + _dt.timedelta(seconds=sec)
    base = f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    f = f"{frac:09d}".rstrip("0")
    return f"{base}.{f}Z" if f else f"{base}Z"


_TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|z|[+-]\d{2}:?\d{2})?$"
)


def parse_time_ns(s: str) -> int:
    """Unix nanoseconds of an RFC 3339 timestamp (any number of fraction digits)."""
    m = _TIME_RE.match(s.strip())
    if not m:
        raise InvalidArgument(f"invalid timestamp {s!r}")
    y, mo, d, h, mi, se, frac, tz = m.groups()
    offset = 0
    if tz and tz not in ("Z", "z"):
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        offset = sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    try:
        dt = _dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(se), tzinfo=_dt.UTC)
    except ValueError as e:
        raise InvalidArgument(f"invalid timestamp {s!r}: {e}") from None
    sec = int((dt - _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)).total_seconds()) - offset
    return sec * 1_000_000_000 + int(((frac or "") + "000000000")[:9])


def parse_time(s: str) -> float:
    """Unix seconds of an RFC 3339 timestamp."""
    return parse_time_ns(s) / 1e9


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(s: str) -> float:
    """Go's ``time.ParseDuration`` in seconds (``1h30m``, ``500ms``, ``-10s``)."""
    t = s.strip()
    sign = -1.0 if t.startswith("-") else 1.0
    t = t.lstrip("+-")
    if t == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(t) or not t:
        raise InvalidArgument(f"time: invalid duration {s!r}")
    return sign * total


def parse_timestamp(value: str, now: float | None = None) -> float:
    """A filter timestamp as Docker takes it: Unix seconds, RFC 3339 (or a date), or a
    Go duration counted back from now."""
    now = time.time() if now is None else now
    v = value.strip()
    if re.match(r"^-?\d+(\.\d+)?$", v):
        return float(v)
    with contextlib.suppress(InvalidArgument):
        return now - parse_duration(v)
    if re.match(r"^\d{4}-\d{2}-\d{2}$", v):
        v += "T00:00:00"
    if re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?$", v):
        # no zone: local time, like Docker
        fmt = "%Y-%m-%dT%H:%M:%S" if v.count(":") == 2 else "%Y-%m-%dT%H:%M"
        return _dt.datetime.strptime(v, fmt).timestamp()
    return parse_time(v)


# --- docker import --change -------------------------------------------------------

CHANGE_COMMANDS = {
    "cmd",
    "entrypoint",
    "healthcheck",
    "env",
    "expose",
    "label",
    "onbuild",
    "stopsignal",
    "user",
    "volume",
    "workdir",
}

_VAR_RE = re.compile(
    r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def _expand(s: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(4)
        val = env.get(name, "")
        op, word = m.group(2), m.group(3)
        if op == ":-":
            return val if val else (word or "")
        if op == ":+":
            return (word or "") if val else ""
        return val

    return _VAR_RE.sub(sub, s)


def shell_words(s: str, env: dict[str, str] | None = None) -> list[str]:
    """Split like Dockerfile's ShellLex.ProcessWords: quotes removed, backslash escapes,
    ``$VAR``/``${VAR}`` expanded outside single quotes."""
    env = env or {}
    words: list[str] = []
    cur: list[str] = []
    in_word = False
    i, n = 0, len(s)

    def expand_at(j: int) -> tuple[str, int]:
        m = _VAR_RE.match(s, j)
        if m:
            return _expand(m.group(0), env), m.end()
        return "$", j + 1

    while i < n:
        c = s[i]
        if c in " \t\n":
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
            i += 1
            continue
        in_word = True
        if c == "\\" and i + 1 < n:
            cur.append(s[i + 1])
            i += 2
        elif c == "'":
            j = s.find("'", i + 1)
            if j == -1:
                raise InvalidArgument(
                    f"unexpected end of statement while looking for matching ': {s}"
                )
            cur.append(s[i + 1 : j])
            i = j + 1
        elif c == '"':
            i += 1
            while i < n and s[i] != '"':
                if s[i] == "\\" and i + 1 < n and s[i + 1] in '"\\$':
                    cur.append(s[i + 1])
                    i += 2
                elif s[i] == "$":
                    v, i = expand_at(i)
                    cur.append(v)
                else:
                    cur.append(s[i])
                    i += 1
            if i >= n:
                raise InvalidArgument(
                    f'unexpected end of statement while looking for matching ": {s}'
                )
            i += 1
        elif c == "$":
            v, i = expand_at(i)
            cur.append(v)
        else:
            cur.append(c)
            i += 1
    if in_word:
        words.append("".join(cur))
    return words


def _json_or_shell(rest: str, shell: Sequence[str] = ("/bin/sh", "-c")) -> list[str]:
    r = rest.strip()
    if r.startswith("["):
        try:
            v = json.loads(r)
        except ValueError:
            v = None
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return v
    return [*shell, r]


def _name_values(cmd: str, rest: str, env: dict[str, str]) -> list[tuple[str, str]]:
    words = shell_words(rest, env)
    if not words:
        raise InvalidArgument(f"{cmd.upper()} requires at least one argument")
    first = rest.strip().split(None, 1)
    if "=" not in first[0]:  # legacy form: "ENV key value with spaces"
        if len(first) < 2:
            raise InvalidArgument(f"{cmd.upper()} must have two arguments")
        return [(first[0], " ".join(shell_words(first[1], env)))]
    out = []
    for w in words:
        k, sep, v = w.partition("=")
        if not sep or not k:
            raise InvalidArgument(f"{cmd.upper()} names can not be blank")
        out.append((k, v))
    return out


def _parse_healthcheck(rest: str) -> dict[str, Any]:
    hc: dict[str, Any] = {}
    words = rest.strip().split(None)
    flags = {"interval": "Interval", "timeout": "Timeout", "start-period": "StartPeriod"}
    flags["start-interval"] = "StartInterval"
    i = 0
    while i < len(words) and words[i].startswith("--"):
        k, _, v = words[i][2:].partition("=")
        if k in flags:
            hc[flags[k]] = int(parse_duration(v) * 1e9)
        elif k == "retries":
            try:
                hc["Retries"] = int(v)
            except ValueError:
                raise InvalidArgument(f"invalid --retries value {v!r}") from None
        else:
            raise InvalidArgument(f"unknown flag: --{k}")
        i += 1
    remainder = rest.strip()
    for _ in range(i):
        remainder = remainder.split(None, 1)[1] if " " in remainder else ""
    typ, _, args = remainder.partition(" ")
    if typ.upper() == "NONE":
        if args.strip() or hc:
            raise InvalidArgument("HEALTHCHECK NONE takes no arguments")
        return {"Test": ["NONE"]}
    if typ.upper() != "CMD":
        raise InvalidArgument(f"Unknown type {typ!r} in HEALTHCHECK (try CMD)")
    test = _json_or_shell(args, ())
    if test == [args.strip()]:
        test = ["CMD-SHELL", args.strip()]
    else:
        test = ["CMD", *test]
    return {"Test": test, **hc}


def apply_changes(changes: Sequence[str], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply Dockerfile instructions (``docker import --change`` / ``commit --change``)
    to an image config (Docker's container.Config shape); returns the new config."""
    cfg = docker_config(config)
    cmd_set = False
    lines: list[str] = []
    for ch in changes:
        for line in ch.replace("\\\n", "").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
    for line in lines:
        word, _, rest = line.partition(" ")
        cmd = word.lower()
        rest = rest.strip()
        if cmd not in CHANGE_COMMANDS:
            raise InvalidArgument(f"{cmd} is not a valid change command")
        env = dict(e.split("=", 1) for e in (cfg.get("Env") or []) if "=" in e)
        if cmd == "cmd":
            cfg["Cmd"] = _json_or_shell(rest)
            cmd_set = True
        elif cmd == "entrypoint":
            ep = _json_or_shell(rest)
            cfg["Entrypoint"] = ep if rest else None
            if not cmd_set:
                cfg["Cmd"] = None
        elif cmd == "env":
            env_list = list(cfg.get("Env") or [])
            for k, v in _name_values(cmd, rest, env):
                env_list = [e for e in env_list if e.split("=", 1)[0] != k] + [f"{k}={v}"]
                env[k] = v
            cfg["Env"] = env_list
        elif cmd == "label":
            labels = dict(cfg.get("Labels") or {})
            for k, v in _name_values(cmd, rest, env):
                labels[k] = v
            cfg["Labels"] = labels
        elif cmd == "expose":
            ports = dict(cfg.get("ExposedPorts") or {})
            for p in shell_words(rest, env):
                port, _, proto = p.partition("/")
                proto = (proto or "tcp").lower()
                if proto not in ("tcp", "udp", "sctp"):
                    raise InvalidArgument(f"invalid proto: {proto}")
                lo, _, hi = port.partition("-")
                try:
                    a, b = int(lo), int(hi or lo)
                except ValueError:
                    raise InvalidArgument(f"invalid containerPort: {port}") from None
                if not (0 < a <= b <= 65535):
                    raise InvalidArgument(f"invalid containerPort: {port}")
                for x in range(a, b + 1):
                    ports[f"{x}/{proto}"] = {}
            cfg["ExposedPorts"] = ports
        elif cmd == "volume":
            vols = dict(cfg.get("Volumes") or {})
            paths = _json_or_shell(rest, ()) if rest.startswith("[") else shell_words(rest, env)
            if paths == [rest] and rest.startswith("["):
                paths = shell_words(rest, env)
            for v in paths:
                if not v.strip():
                    raise InvalidArgument("VOLUME specified can not be an empty string")
                vols[v] = {}
            cfg["Volumes"] = vols
        elif cmd == "workdir":
            wd = _expand(rest, env)
            if not wd.startswith("/"):
                wd = os.path.join(cfg.get("WorkingDir") or "/", wd)
            cfg["WorkingDir"] = os.path.normpath(wd).replace("//", "/")
        elif cmd == "user":
            cfg["User"] = _expand(rest, env)
        elif cmd == "stopsignal":
            sig = _expand(rest, env)
            if not re.match(r"^(SIG)?[A-Z0-9+-]+$|^\d+$", sig):
                raise InvalidArgument(f"Invalid signal: {sig}")
            cfg["StopSignal"] = sig
        elif cmd == "onbuild":
            trig = rest.split(None, 1)[0].upper() if rest else ""
            if trig in ("ONBUILD", "FROM", "MAINTAINER"):
                raise InvalidArgument(f"{trig} isn't allowed as an ONBUILD trigger")
            cfg["OnBuild"] = [*(cfg.get("OnBuild") or []), rest]
        elif cmd == "healthcheck":
            cfg["Healthcheck"] = _parse_healthcheck(rest)
    return docker_config(cfg)


def host_platform() -> tuple[str, str, str]:
    """(os, architecture, variant) of this host in OCI terms."""
    m = _platform.machine().lower()
    arch = {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "i386": "386",
        "i686": "386",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
        "mips64": "mips64",
    }.get(m)
    if arch is None and m.startswith("armv"):
        return "linux", "arm", "v" + m[4]
    return "linux", arch or m, ""


def parse_platform(p: str | None) -> tuple[str, str, str]:
    host = host_platform()
    if not p:
        return host
    parts = p.lower().split("/")
    if not parts[0] or len(parts) > 3:
        raise InvalidArgument(f"invalid platform {p!r}: expected os[/arch[/variant]]")
    if parts[0] != "linux":
        raise InvalidArgument(f"operating system {parts[0]!r} is not supported")
    arch = parts[1] if len(parts) > 1 else host[1]
    variant = parts[2] if len(parts) > 2 else (host[2] if arch == host[1] else "")
    return parts[0], {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch), variant


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# --- the store ------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    chain_id: str
    diff_id: str
    parent: str | None  # parent chain ID
    size: int


class _DeleteConflict(Conflict):
    def __init__(self, image_id: str, hard: bool, used: bool, message: str) -> None:
        force = "cannot be forced" if hard else "must be forced"
        super().__init__(
            f"conflict: unable to delete {reference.short_id(image_id)} ({force}) - {message}"
        )
        self.hard = hard
        self.used = used


_CONFLICT_CHILD, _CONFLICT_RUNNING, _CONFLICT_ACTIVE_REF, _CONFLICT_STOPPED = 1, 2, 4, 8
_CONFLICT_HARD = _CONFLICT_CHILD | _CONFLICT_RUNNING
_CONFLICT_SOFT = _CONFLICT_ACTIVE_REF | _CONFLICT_STOPPED


def _no_users(image_id: str) -> list[tuple[str, bool]]:
    return []


InUse = Callable[[str], list[tuple[str, bool]]]
Applier = Callable[[StorageDriver, str], archive.ApplyResult]


@dataclass
class _Events:
    items: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def image(self, action: str, image_id: str, ref: str | None = None) -> None:
        self.items.append(("image", (action, image_id, ref)))

    def layer(self, action: str, chain_id: str) -> None:
        self.items.append(("layer", (action, chain_id)))


class Lease:
    """Layers being added, held until an image refers to them or the lease ends.

    ``with graph.lease() as lease:`` then :meth:`add_layer` / :meth:`use_layer` and
    :meth:`create_image`. Leaving the block releases what no image took (a failed or
    abandoned pull/load/commit leaves nothing).
    """

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.chains: list[str] = []

    def use_layer(self, chain_id: str) -> LayerInfo | None:
        """Hold an existing layer (and its parents); None if the graph does not have it."""
        g = self.graph
        with g._lock:
            chain = g._chain_infos(chain_id)
            if chain is None:
                return None
            for info in reversed(chain):
                g._pin(info.chain_id, self)
            return chain[0]

    def add_layer(
        self,
        stream: BinaryIO,
        parent: str | None = None,
        *,
        expected_diff_id: str | None = None,
        apply: Applier | None = None,
    ) -> LayerInfo:
        """Apply a layer tar on top of layer ``parent``; reuse it if it exists already.

        With ``expected_diff_id`` (a pull knows it from the image config) an existing
        layer is found before reading ``stream``, which is then left unread.
        ``apply(driver, key)`` replaces the default :func:`archive.apply_to_snapshot`
        (a pull moves in a layer it unpacked ahead, in parallel, for overlay drivers).
        """
        return self.graph._add_layer(self, stream, parent, expected_diff_id, apply)

    def create_image(
        self,
        config: bytes,
        *,
        ref: Reference | None = None,
        parent_image: str = "",
        action: str = "import",
    ) -> str:
        """Store image config ``config`` (raw bytes: its digest is the image ID) whose
        ``rootfs.diff_ids`` are layers this lease holds; tag it ``ref``."""
        return self.graph._create_image(self, config, ref, parent_image, action)

    def release(self) -> None:
        self.graph._release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Graph:
    """The image store. Every method is blocking (call it from a worker thread)."""

    def __init__(self, root: Path, driver: StorageDriver, hook: Any | None = None) -> None:
        self.root = Path(os.path.abspath(root))
        self.driver = driver
        self.hook = hook
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.root / "graph.db", SCHEMA)
        self._lock = threading.RLock()
        # layers in the driver that no DB row holds (being added, or still leased)
        self._pending: dict[str, LayerInfo] = {}
        self._pins: dict[str, int] = {}
        self._configs: dict[str, dict[str, Any]] = {}

    def close(self) -> None:
        self.store.close()

    # --- events -------------------------------------------------------------------

    def _emit(self, ev: _Events) -> None:
        if self.hook is None:
            return
        for kind, args in ev.items:
            try:
                if kind == "image":
                    self.hook.pallet_image_event(action=args[0], image_id=args[1], ref=args[2])
                else:
                    self.hook.pallet_layer_event(action=args[0], chain_id=args[1])
            except Exception:  # observers must not break the store
                log.exception("%s event observer failed", kind)

    # --- blobs --------------------------------------------------------------------

    def _blob_path(self, digest: str) -> Path:
        alg, _, hexpart = digest.partition(":")
        if alg != "sha256" or not reference.IDENTIFIER_RE.match(hexpart):
            raise InvalidArgument(f"invalid digest {digest!r}")
        return self.blobs / hexpart

    def write_blob(self, data: bytes) -> str:
        """Store ``data`` content-addressed (tmp + fsync + rename); returns its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self._blob_path(digest)
        if path.exists():
            return digest
        tmp = self.blobs / f".tmp-{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return digest

    def read_blob(self, digest: str) -> bytes:
        try:
            return self._blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} not found") from None

    # --- layers ---------------------------------------------------------------------

    def _layer_row(self, chain_id: str) -> LayerInfo | None:
        row = self.store.one(
            "SELECT chain_id, diff_id, parent, size FROM layers WHERE chain_id = ?", (chain_id,)
        )
        if row is None:
            return None
        return LayerInfo(row["chain_id"], row["diff_id"], row["parent"], row["size"])

    def _layer_info(self, chain_id: str) -> LayerInfo | None:
        return self._layer_row(chain_id) or self._pending.get(chain_id)

    def _chain_infos(self, chain_id: str | None) -> list[LayerInfo] | None:
        """``chain_id`` and its parents, top first; None if any is unknown."""
        out: list[LayerInfo] = []
        cur = chain_id
        while cur is not None:
            info = self._layer_info(cur)
            if info is None:
                return None
            out.append(info)
            cur = info.parent
        return out

    def _pin(self, chain_id: str, lease: Lease) -> None:
        self._pins[chain_id] = self._pins.get(chain_id, 0) + 1
        lease.chains.append(chain_id)

    def _add_layer(
        self,
        lease: Lease,
        stream: BinaryIO,
        parent: str | None,
        expected_diff_id: str | None,
        apply: Applier | None = None,
    ) -> LayerInfo:
        if parent is not None and parent not in lease.chains and lease.use_layer(parent) is None:
            raise NotFound(f"layer {parent} not found")
        if expected_diff_id is not None:
            with self._lock:
                info = self._layer_info(archive.chain_id(parent, expected_diff_id))
                if info is not None:
                    self._pin(info.chain_id, lease)
                    return info
        tmpkey = f"{TMP_KEY_PREFIX}{secrets.token_hex(16)}"
        self.driver.prepare(tmpkey, parent)
        committed = False
        ev = _Events()
        try:
            if apply is not None:
                res = apply(self.driver, tmpkey)
            else:
                res = archive.apply_to_snapshot(self.driver, tmpkey, stream, self.tmp)
            if expected_diff_id is not None and res.diff_id != expected_diff_id:
                raise InvalidArgument(
                    f"layer content does not match its diff ID: expected {expected_diff_id}, "
                    f"got {res.diff_id}"
                )
            cid = archive.chain_id(parent, res.diff_id)
            with self._lock:
                info = self._layer_info(cid)
                if info is None:
                    info = LayerInfo(cid, res.diff_id, parent, res.size)
                    try:
                        self.driver.commit(cid, tmpkey)
                        committed = True
                    except Conflict:
                        # left by a crash before cleanup ran: same name, same content
                        if self.driver.stat(cid).kind != Kind.COMMITTED:
                            raise
                    self._pending[cid] = info
                    ev.layer("add", cid)
                self._pin(cid, lease)
        finally:
            if not committed:
                with contextlib.suppress(NotFound):
                    self.driver.remove(tmpkey)
        self._emit(ev)
        return info

    def _release(self, lease: Lease) -> None:
        ev = _Events()
        with self._lock:
            for cid in reversed(lease.chains):
                n = self._pins.get(cid, 0) - 1
                if n > 0:
                    self._pins[cid] = n
                    continue
                self._pins.pop(cid, None)
                if cid in self._pending and self._layer_row(cid) is None:
                    try:
                        self.driver.remove(cid)
                    except NotFound:
                        pass
                    except Conflict:  # a child is still pinned elsewhere: it stays pending
                        continue
                    del self._pending[cid]
                    ev.layer("remove", cid)
            lease.chains.clear()
        self._emit(ev)

    def _add_refs(self, db: Any, chain: list[LayerInfo]) -> None:
        """One more reference to every layer of ``chain`` (rows made from pending)."""
        now = time.time()
        for info in chain:
            db.execute(
                "INSERT OR IGNORE INTO layers (chain_id, diff_id, parent, size, refs, created)"
                " VALUES (?, ?, ?, ?, 0, ?)",
                (info.chain_id, info.diff_id, info.parent, info.size, now),
            )
            db.execute("UPDATE layers SET refs = refs + 1 WHERE chain_id = ?", (info.chain_id,))

    def _drop_refs(self, db: Any, top: str | None) -> list[str]:
        """One reference less on ``top``'s chain; returns the chain IDs now at zero, top
        first (their rows are deleted; the caller removes them from the driver)."""
        zero = []
        cur = top
        while cur is not None:
            row = db.execute(
                "SELECT parent, refs FROM layers WHERE chain_id = ?", (cur,)
            ).fetchone()
            if row is None:
                log.warning("layer %s has no row while dropping a reference", cur)
                break
            if row["refs"] <= 1:
                zero.append(cur)
                db.execute("DELETE FROM layers WHERE chain_id = ?", (cur,))
            else:
                db.execute("UPDATE layers SET refs = refs - 1 WHERE chain_id = ?", (cur,))
            cur = row["parent"]
        return zero

    def _forget_pending(self, chain: list[LayerInfo]) -> None:
        for info in chain:
            self._pending.pop(info.chain_id, None)

    def _remove_layers(
        self, chain_ids: list[str], infos: dict[str, LayerInfo], ev: _Events
    ) -> list[str]:
        """Remove layers whose rows are gone, top first; a layer a lease pins stays in the
        driver as pending. Returns the chain IDs removed."""
        removed = []
        for cid in chain_ids:
            if self._pins.get(cid):
                self._pending[cid] = infos[cid]
                continue
            try:
                self.driver.remove(cid)
            except NotFound:
                pass
            except Conflict as e:  # something else still stands on it: cleanup() decides
                log.warning("layer %s not removed: %s", cid, e.message)
                continue
            removed.append(cid)
            ev.layer("remove", cid)
        return removed

    # --- images ---------------------------------------------------------------------

    def _create_image(
        self,
        lease: Lease,
        config: bytes,
        ref: Reference | None,
        parent_image: str,
        action: str,
    ) -> str:
        try:
            cfg = json.loads(config)
            diff_ids = list((cfg.get("rootfs") or {}).get("diff_ids") or [])
        except (ValueError, AttributeError) as e:
            raise InvalidArgument(f"invalid image config: {e}") from e
        image_id = "sha256:" + hashlib.sha256(config).hexdigest()
        created = parse_time(cfg["created"]) if cfg.get("created") else 0.0
        ev = _Events()
        with self._lock:
            top: str | None = None
            for d in diff_ids:
                top = archive.chain_id(top, d)
            chain = self._chain_infos(top) or []
            if top is not None and (
                not chain or any(c.chain_id not in lease.chains for c in chain)
            ):
                raise InvalidArgument(f"image {image_id}: its layers are not held by this lease")
            if (
                parent_image
                and self.store.one("SELECT 1 FROM images WHERE id = ?", (parent_image,)) is None
            ):
                raise NotFound(f"No such image: {parent_image}")
            had_image = self.store.one("SELECT 1 FROM images WHERE id = ?", (image_id,))
            self.write_blob(config)
            size = sum(c.size for c in chain)
            try:
                with self.store.transaction() as db:
                    exists = db.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone()
                    if not exists:
                        self._add_refs(db, chain)
                        db.execute(
                            "INSERT INTO images (id, top_layer, parent, created, size, added)"
                            " VALUES (?, ?, ?, ?, ?, ?)",
                            (image_id, top, parent_image, created, size, time.time()),
                        )
                        for pos, info in enumerate(reversed(chain)):
                            db.execute(
                                "INSERT INTO image_layers (image_id, position, chain_id) VALUES (?, ?, ?)",
                                (image_id, pos, info.chain_id),
                            )
                    if ref is not None:
                        self._set_ref(db, ref, image_id, ev)
            except BaseException:
                if not had_image:  # the blob is ours: no row will ever name it
                    with contextlib.suppress(FileNotFoundError):
                        self._blob_path(image_id).unlink()
                raise
            if not exists:
                self._forget_pending(chain)
        ev.image(action, image_id, ref.familiar() if ref else None)
        self._emit(ev)
        return image_id

    def _set_ref(self, db: Any, ref: Reference, image_id: str, ev: _Events) -> None:
        db.execute(
            "INSERT OR REPLACE INTO refs (name, image_id, created) VALUES (?, ?, ?)",
            (str(ref), image_id, time.time()),
        )
        db.execute(
            "UPDATE images SET last_tag_time = ? WHERE id = ?",
            (format_time(time.time_ns()), image_id),
        )
        ev.image("tag", image_id, ref.familiar())

    def lease(self) -> Lease:
        return Lease(self)

    def add_reference(self, ref: Reference, image_id: str) -> None:
        """Point ``ref`` (a tag, or ``name@digest``: a RepoDigest) at ``image_id``; pull,
        push and load record what they fetched or sent this way."""
        ev = _Events()
        with self._lock:
            self._image_row(image_id)
            with self.store.transaction() as db:
                self._set_ref(db, ref, image_id, ev)
        self._emit(ev)

    def import_image(
        self,
        stream: BinaryIO,
        ref: str | None,
        *,
        changes: Sequence[str] = (),
        message: str = "",
        platform: str | None = None,
    ) -> str:
        """``docker import``: the tarball (any compression) becomes a one-layer image.

        ``ref`` is ``repo[:tag]`` (tag ``latest`` by default). Returns the image ID.
        """
        newref = None
        if ref:
            parsed = reference.parse_normalized(ref)
            if parsed.digest is not None:
                raise InvalidArgument("cannot import digest reference")
            newref = reference.repo_tag_reference(parsed.name, parsed.tag)
        os_, arch, variant = parse_platform(platform)
        cfg = apply_changes(changes)
        with self.lease() as lease:
            layer = lease.add_layer(stream)
            created = format_time(time.time_ns())
            comment = message or "Imported from -"
            img: dict[str, Any] = {
                "architecture": arch,
                "comment": comment,
                "config": cfg,
                "container_config": docker_config(None),
                "created": created,
                "history": [{"created": created, "comment": comment}],
                "os": os_,
                "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
            }
            if variant:
                img["variant"] = variant
            return lease.create_image(canonical_json(img), ref=newref, action="import")

    # --- lookups --------------------------------------------------------------------

    def _image_row(self, image_id: str) -> Any:
        row = self.store.one("SELECT * FROM images WHERE id = ?", (image_id,))
        if row is None:
            raise NotFound(f"No such image: {image_id}")
        return row

    def resolve(self, name: str) -> str:
        """Image ID of a reference, a familiar name, or a full or short image ID."""
        parsed = reference.parse_any(name)
        if isinstance(parsed, str):
            if self.store.one("SELECT 1 FROM images WHERE id = ?", (parsed,)):
                return parsed
            raise NotFound(f"No such image: {parsed}")
        key = parsed.with_default_tag()
        if key.digest is not None and key.tag is not None:
            key = Reference(key.domain, key.path, None, key.digest)
        row = self.store.one("SELECT image_id FROM refs WHERE name = ?", (str(key),))
        if row is not None:
            return str(row["image_id"])
        prefix = name[7:] if name.startswith("sha256:") else name
        if reference.SHORT_IDENTIFIER_RE.match(prefix):
            rows = self.store.query(
                "SELECT id FROM images WHERE id >= ? AND id < ? LIMIT 2",
                (f"sha256:{prefix}", f"sha256:{prefix}g"),
            )
            if len(rows) == 1:
                return str(rows[0]["id"])
        raise NotFound(f"No such image: {key.familiar()}")

    def exists(self, name: str) -> bool:
        try:
            self.resolve(name)
            return True
        except (NotFound, InvalidArgument):
            return False

    def image_config(self, image_id: str) -> dict[str, Any]:
        """The image's config JSON (a fresh copy)."""
        cfg = self._configs.get(image_id)
        if cfg is None:
            self._image_row(image_id)
            cfg = json.loads(self.read_blob(image_id))
            self._configs[image_id] = cfg
        return json.loads(json.dumps(cfg))

    def image_layers(self, image_id: str) -> list[LayerInfo]:
        """The image's layers, bottom first."""
        rows = self.store.query(
            "SELECT l.chain_id, l.diff_id, l.parent, l.size FROM image_layers il"
            " JOIN layers l ON l.chain_id = il.chain_id WHERE il.image_id = ? ORDER BY il.position",
            (image_id,),
        )
        return [LayerInfo(r["chain_id"], r["diff_id"], r["parent"], r["size"]) for r in rows]

    def _refs_of(self, image_id: str) -> list[Reference]:
        rows = self.store.query("SELECT name FROM refs WHERE image_id = ?", (image_id,))
        refs = [reference.parse(r["name"]) for r in rows]
        return sorted(refs, key=lambda r: r.familiar())

    def _children(self, image_id: str) -> list[str]:
        return [
            r["id"] for r in self.store.query("SELECT id FROM images WHERE parent = ?", (image_id,))
        ]

    def images_using_layer(self, chain_id: str) -> list[str]:
        """IDs of the images whose chain includes layer ``chain_id``."""
        rows = self.store.query(
            "SELECT DISTINCT image_id FROM image_layers WHERE chain_id = ? ORDER BY image_id",
            (chain_id,),
        )
        return [r["image_id"] for r in rows]

    # --- API shapes -----------------------------------------------------------------

    def _summary(self, row: Any, refs: list[Reference]) -> dict[str, Any]:
        cfg = self.image_config(row["id"])
        labels = (cfg.get("config") or {}).get("Labels") or {}
        return {
            "Containers": -1,
            "Created": int(row["created"]),
            "Id": row["id"],
            "Labels": labels,
            "ParentId": row["parent"],
            "RepoDigests": [r.familiar() for r in refs if r.is_canonical],
            "RepoTags": [r.familiar() for r in refs if not r.is_canonical],
            "SharedSize": -1,
            "Size": row["size"],
        }

    def list_images(
        self, all: bool = False, filters: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """``GET /images/json``: ImageSummary objects, newest first.

        ``filters`` is Docker's ``map[string][]string`` (the older ``map[string]map[string]bool``
        is accepted too): ``dangling``, ``label``, ``before``, ``since``, ``reference``,
        ``until``. Without ``all``, untagged images that have children are left out.
        """
        f = _normalize_filters(filters)
        for k in f:
            if k not in ("dangling", "label", "before", "since", "reference", "until"):
                raise InvalidArgument(f"invalid filter '{k}'")
        dangling: bool | None = None
        if "dangling" in f:
            vals = {v.lower() for v in f["dangling"]}
            if vals - {"true", "false", "1", "0"} or len(vals) != 1:
                raise InvalidArgument(f"invalid filter 'dangling={','.join(f['dangling'])}'")
            dangling = vals.pop() in ("true", "1")
        before = min((self._created(self.resolve(v)) for v in f.get("before", [])), default=None)
        since = max((self._created(self.resolve(v)) for v in f.get("since", [])), default=None)
        until = min((parse_timestamp(v) for v in f.get("until", [])), default=None)
        out = []
        rows = self.store.query("SELECT * FROM images")
        parents = {r["parent"] for r in rows if r["parent"]}
        for row in rows:
            created = row["created"]
            if before is not None and created >= before:
                continue
            if since is not None and created <= since:
                continue
            if until is not None and created >= until:
                continue
            refs = self._refs_of(row["id"])
            if "reference" in f:
                pats = f["reference"]
                if not any(reference.familiar_match(p, r) for p in pats for r in refs):
                    continue
            if not refs:
                if not all and row["id"] in parents:
                    continue
                if dangling is False:
                    continue
            elif dangling is True:
                continue
            if "label" in f:
                labels = (self.image_config(row["id"]).get("config") or {}).get("Labels") or {}
                if not all_labels_match(f["label"], labels):
                    continue
            out.append(self._summary(row, refs))
        out.sort(key=lambda s: (s["Created"], s["Id"]), reverse=True)
        return out

    def _created(self, image_id: str) -> float:
        return float(self._image_row(image_id)["created"])

    def inspect(self, name: str) -> dict[str, Any]:
        """``GET /images/{name}/json``: Docker's ImageInspect."""
        image_id = self.resolve(name)
        row = self._image_row(image_id)
        cfg = self.image_config(image_id)
        refs = self._refs_of(image_id)
        created = cfg.get("created")
        if created:
            with contextlib.suppress(InvalidArgument):
                created = format_time(parse_time_ns(created))
        graph_data: dict[str, str] = {}
        meta = getattr(self.driver, "metadata", None)
        if row["top_layer"] and callable(meta):
            with contextlib.suppress(PalletError):
                graph_data = dict(meta(row["top_layer"]))
        out: dict[str, Any] = {
            "Id": image_id,
            "RepoTags": [r.familiar() for r in refs if not r.is_canonical],
            "RepoDigests": [r.familiar() for r in refs if r.is_canonical],
            "Parent": row["parent"],
            "Comment": cfg.get("comment", ""),
            "Created": created or "",
            "Container": cfg.get("container", ""),
            "ContainerConfig": docker_config(cfg.get("container_config")),
            "DockerVersion": cfg.get("docker_version", ""),
            "Author": cfg.get("author", ""),
            "Config": docker_config(cfg["config"]) if cfg.get("config") is not None else None,
            "Architecture": cfg.get("architecture", ""),
        }
        if cfg.get("variant"):
            out["Variant"] = cfg["variant"]
        out["Os"] = cfg.get("os", "")
        if cfg.get("os.version"):
            out["OsVersion"] = cfg["os.version"]
        out["Size"] = row["size"]
        out["GraphDriver"] = {"Name": self.driver.name, "Data": graph_data}
        rootfs: dict[str, Any] = {"Type": (cfg.get("rootfs") or {}).get("type", "layers")}
        diff_ids = (cfg.get("rootfs") or {}).get("diff_ids") or []
        if diff_ids:
            rootfs["Layers"] = list(diff_ids)
        out["RootFS"] = rootfs
        out["Metadata"] = {"LastTagTime": row["last_tag_time"] or ZERO_TIME}
        return out

    def history(self, name: str) -> list[dict[str, Any]]:
        """``GET /images/{name}/history``: newest first, as Docker computes it."""
        image_id = self.resolve(name)
        cfg = self.image_config(image_id)
        layers = self.image_layers(image_id)
        refs = [r.familiar() for r in self._refs_of(image_id) if not r.is_canonical]
        out = []
        li = 0
        hist = cfg.get("history") or []
        for i, h in enumerate(hist):
            size = 0
            if not h.get("empty_layer"):
                size = layers[li].size if li < len(layers) else 0
                li += 1
            created = h.get("created")
            out.append(
                {
                    "Id": "<missing>",
                    "Created": int(parse_time(created)) if created else 0,
                    "CreatedBy": h.get("created_by", ""),
                    "Tags": None,
                    "Size": size,
                    "Comment": h.get("comment", ""),
                    "_last": i == len(hist) - 1,
                }
            )
        out.reverse()
        for h in out:
            if h.pop("_last"):
                h["Id"] = image_id
                h["Tags"] = refs or None
        return out

    # --- tags -----------------------------------------------------------------------

    def tag(self, name: str, repo: str, tag: str | None) -> None:
        """``docker tag``: point ``repo:tag`` (``latest`` by default) at image ``name``."""
        ref = reference.repo_tag_reference(repo, tag)
        ev = _Events()
        with self._lock:
            image_id = self.resolve(name)
            with self.store.transaction() as db:
                self._set_ref(db, ref, image_id, ev)
        self._emit(ev)

    # --- delete ---------------------------------------------------------------------

    def delete(
        self,
        name: str,
        force: bool = False,
        noprune: bool = False,
        in_use: InUse = _no_users,
    ) -> list[dict[str, str]]:
        """``docker rmi``: untag and delete, with Docker's rules and conflict messages.

        ``in_use(image_id)`` lists the containers using an image as
        ``(container_id, running)``. Returns ``[{"Untagged": ...}, {"Deleted": ...}]``.
        """
        ev = _Events()
        records: list[dict[str, str]] = []
        try:
            with self._lock:
                self._delete(name, force, not noprune, in_use, records, ev)
        finally:
            self._emit(ev)
        return records

    def _delete(
        self,
        name: str,
        force: bool,
        prune: bool,
        in_use: InUse,
        records: list[dict[str, str]],
        ev: _Events,
    ) -> None:
        image_id = self.resolve(name)
        refs = self._refs_of(image_id)
        removed_repo_ref = False
        if not _is_id_prefix(image_id, name):
            if not force and _is_single_reference(refs):
                users = in_use(image_id)
                if users:
                    raise Conflict(
                        f'conflict: unable to remove repository reference "{name}" (must force) '
                        f"- container {reference.short_id(users[0][0])} is using its referenced "
                        f"image {reference.short_id(image_id)}"
                    )
            parsed = reference.parse_normalized(name).with_default_tag()
            if parsed.digest is not None and parsed.tag is not None:
                parsed = Reference(parsed.domain, parsed.path, None, parsed.digest)
            self._untag(parsed, image_id, records, ev)
            refs = self._refs_of(image_id)
            if not parsed.is_canonical:
                if not any(not r.is_canonical and r.name == parsed.name for r in refs):
                    remaining = []
                    for r in refs:
                        if r.is_canonical and r.name == parsed.name:
                            self._untag(r, image_id, records, ev)
                        else:
                            remaining.append(r)
                    refs = remaining
            if refs:
                return
            removed_repo_ref = True
        elif _is_single_reference(refs):
            mask = _CONFLICT_HARD
            if not force:
                mask |= _CONFLICT_SOFT & ~_CONFLICT_ACTIVE_REF
            conflict = self._conflict(image_id, mask, in_use)
            if conflict is not None:
                raise conflict
            for r in refs:
                self._untag(r, image_id, records, ev)
        self._delete_helper(image_id, records, force, prune, removed_repo_ref, in_use, ev)

    def _untag(
        self, ref: Reference, image_id: str, records: list[dict[str, str]], ev: _Events
    ) -> None:
        self.store.execute("DELETE FROM refs WHERE name = ? AND image_id = ?", (str(ref), image_id))
        records.append({"Untagged": ref.familiar()})
        ev.image("untag", image_id, ref.familiar())

    def _conflict(self, image_id: str, mask: int, in_use: InUse) -> _DeleteConflict | None:
        if mask & _CONFLICT_CHILD and self._children(image_id):
            return _DeleteConflict(image_id, True, False, "image has dependent child images")
        users = in_use(image_id) if mask & (_CONFLICT_RUNNING | _CONFLICT_STOPPED) else []
        if mask & _CONFLICT_RUNNING:
            running = [c for c, r in users if r]
            if running:
                return _DeleteConflict(
                    image_id,
                    True,
                    True,
                    f"image is being used by running container {reference.short_id(running[0])}",
                )
        if mask & _CONFLICT_ACTIVE_REF and self._refs_of(image_id):
            return _DeleteConflict(
                image_id, False, False, "image is referenced in multiple repositories"
            )
        if mask & _CONFLICT_STOPPED:
            stopped = [c for c, r in users if not r]
            if stopped:
                return _DeleteConflict(
                    image_id,
                    False,
                    True,
                    f"image is being used by stopped container {reference.short_id(stopped[0])}",
                )
        return None

    def _delete_helper(
        self,
        image_id: str,
        records: list[dict[str, str]],
        force: bool,
        prune: bool,
        quiet: bool,
        in_use: InUse,
        ev: _Events,
    ) -> None:
        mask = _CONFLICT_HARD | (0 if force else _CONFLICT_SOFT)
        conflict = self._conflict(image_id, mask, in_use)
        if conflict is not None:
            dangling = not self._refs_of(image_id) and not self._children(image_id)
            if quiet and (not dangling or conflict.used):
                return
            raise conflict
        parent = self._image_row(image_id)["parent"]
        for r in self._refs_of(image_id):
            self._untag(r, image_id, records, ev)
        removed = self._remove_image(image_id, ev)
        records.append({"Deleted": image_id})
        ev.image("delete", image_id, None)
        records.extend({"Deleted": cid} for cid in removed)
        if prune and parent:
            self._delete_helper(parent, records, False, True, True, in_use, ev)

    def _remove_image(self, image_id: str, ev: _Events) -> list[str]:
        with self.store.transaction() as db:
            row = db.execute("SELECT top_layer FROM images WHERE id = ?", (image_id,)).fetchone()
            if row is None:
                raise NotFound(f"No such image: {image_id}")
            infos = {i.chain_id: i for i in (self._chain_infos(row["top_layer"]) or [])}
            db.execute("DELETE FROM refs WHERE image_id = ?", (image_id,))
            db.execute("DELETE FROM image_layers WHERE image_id = ?", (image_id,))
            db.execute("DELETE FROM images WHERE id = ?", (image_id,))
            zero = self._drop_refs(db, row["top_layer"])
        self._configs.pop(image_id, None)
        with contextlib.suppress(FileNotFoundError):
            self._blob_path(image_id).unlink()
        return self._remove_layers(zero, infos, ev)

    # --- container root filesystems -------------------------------------------------

    def prepare_rootfs(self, container_id: str, image_id: str) -> list[Mount]:
        """Make container ``container_id``'s writable rootfs on ``image_id``'s layers (an
        active snapshot keyed by the container ID); returns its mounts."""
        with self.lease() as lease:
            with self._lock:
                image_id = self.resolve(image_id)
                if self.store.one("SELECT 1 FROM rootfs WHERE container_id = ?", (container_id,)):
                    raise Conflict(f"rootfs of container {container_id} exists already")
                top = self._image_row(image_id)["top_layer"]
                chain = self._chain_infos(top) or []
                for info in reversed(chain):
                    self._pin(info.chain_id, lease)
            # the layers are pinned: copying (vfs) happens without holding the graph
            mounts = self.driver.prepare(container_id, top)
            try:
                with self._lock:
                    with self.store.transaction() as db:
                        if db.execute(
                            "SELECT 1 FROM rootfs WHERE container_id = ?", (container_id,)
                        ).fetchone():
                            raise Conflict(f"rootfs of container {container_id} exists already")
                        self._add_refs(db, chain)
                        db.execute(
                            "INSERT INTO rootfs (container_id, image_id, chain_id, created)"
                            " VALUES (?, ?, ?, ?)",
                            (container_id, image_id, top, time.time()),
                        )
                    self._forget_pending(chain)
            except BaseException:
                with contextlib.suppress(NotFound):
                    self.driver.remove(container_id)
                raise
        return mounts

    def rootfs_mounts(self, container_id: str) -> list[Mount]:
        if not self.store.one("SELECT 1 FROM rootfs WHERE container_id = ?", (container_id,)):
            raise NotFound(f"no rootfs for container {container_id}")
        return self.driver.mounts(container_id)

    def remove_rootfs(self, container_id: str) -> None:
        """Remove a container's rootfs (unmounted by the caller) and release its layers."""
        ev = _Events()
        with self._lock:
            row = self.store.one(
                "SELECT chain_id FROM rootfs WHERE container_id = ?", (container_id,)
            )
            if row is None:
                raise NotFound(f"no rootfs for container {container_id}")
            with contextlib.suppress(NotFound):
                self.driver.remove(container_id)
            with self.store.transaction() as db:
                infos = {i.chain_id: i for i in (self._chain_infos(row["chain_id"]) or [])}
                db.execute("DELETE FROM rootfs WHERE container_id = ?", (container_id,))
                zero = self._drop_refs(db, row["chain_id"])
            self._remove_layers(zero, infos, ev)
        self._emit(ev)

    def export_rootfs(self, container_id: str, out: BinaryIO, mounted: Path | None = None) -> None:
        """``docker export``: the container's whole filesystem as a tar. ``mounted``: where
        it is mounted already (a running container); otherwise it is mounted for this."""
        if mounted is not None:
            archive.write_tar(mounted, out)
            return
        archive.export_snapshot(self.rootfs_mounts(container_id), out, self.tmp)

    def rootfs_diff(self, container_id: str, out: BinaryIO) -> None:
        """Write the container's changes as a layer tar (for commit)."""
        if not self.store.one("SELECT 1 FROM rootfs WHERE container_id = ?", (container_id,)):
            raise NotFound(f"no rootfs for container {container_id}")
        archive.diff_snapshot(self.driver, container_id, out, self.tmp)

    # --- housekeeping -----------------------------------------------------------------

    def driver_status(self) -> list[tuple[str, str]]:
        return self.driver.status()

    def cleanup(self) -> None:
        """At daemon start: drop what an interrupted operation left (temporary snapshots
        and files, layers and blobs no row refers to). Calls the driver's own cleanup."""
        with self._lock:
            self.driver.cleanup()
            for e in list(self.tmp.iterdir()):
                if e.is_dir() and not e.is_symlink():
                    from pallet import mount

                    with contextlib.suppress(OSError):
                        mount.unmount_all(str(e))  # a scratch mount a crash left behind
                    with contextlib.suppress(OSError):
                        os.rmdir(e)  # a scratch mount point (never rmtree: may be mounted)
                    if e.exists():
                        log.warning("cleanup: %s left in place (mounted?)", e)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        e.unlink()
            images = {r["id"] for r in self.store.query("SELECT id FROM images")}
            for e in list(self.blobs.iterdir()):
                if e.name.startswith(".tmp-") or f"sha256:{e.name}" not in images:
                    with contextlib.suppress(FileNotFoundError):
                        e.unlink()
            layers = {r["chain_id"] for r in self.store.query("SELECT chain_id FROM layers")}
            rootfs = {
                r["container_id"] for r in self.store.query("SELECT container_id FROM rootfs")
            }
            snaps = list(self.driver.walk())
            keep = {
                s.key
                for s in snaps
                if (s.kind == Kind.COMMITTED and s.key in layers)
                or (s.kind == Kind.ACTIVE and s.key in rootfs)
            }
            doomed = [s for s in snaps if s.key not in keep]
            children: dict[str, int] = {}
            for s in snaps:
                if s.parent is not None:
                    children[s.parent] = children.get(s.parent, 0) + 1
            progress = True
            while doomed and progress:
                progress = False
                for s in list(doomed):
                    if children.get(s.key):
                        continue
                    try:
                        self.driver.remove(s.key)
                    except PalletError as e:
                        log.warning("cleanup: snapshot %s not removed: %s", s.key, e.message)
                        doomed.remove(s)
                        continue
                    log.info("cleanup: removed snapshot %s (%s)", s.key, s.kind)
                    doomed.remove(s)
                    if s.parent is not None:
                        children[s.parent] -= 1
                    progress = True
            for s in doomed:
                log.warning("cleanup: snapshot %s kept: something still stands on it", s.key)
            present = {s.key for s in snaps}
            for cid in layers - present:
                log.error("layer %s is missing from the %s driver", cid, self.driver.name)

    def walk_images(self) -> Iterator[str]:
        for r in self.store.query("SELECT id FROM images ORDER BY created"):
            yield r["id"]


def _is_id_prefix(image_id: str, name: str) -> bool:
    return image_id.startswith(name) or image_id.split(":", 1)[-1].startswith(name)


def _is_single_reference(refs: list[Reference]) -> bool:
    """Docker's isSingleReference: one tag, plus maybe digests of that same repo."""
    if len(refs) <= 1:
        return len(refs) == 1
    single: Reference | None = None
    canonical: set[str] = set()
    for r in refs:
        if r.is_canonical:
            canonical.add(r.name)
        elif single is None:
            single = r
        else:
            return False
    if single is None:
        single = refs[0]
    return len(canonical) == 1 and single.name in canonical


def _normalize_filters(filters: dict[str, Any] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in (filters or {}).items():
        if isinstance(v, dict):
            out[k] = [x for x, on in v.items() if on]
        elif isinstance(v, str):
            out[k] = [v]
        else:
            out[k] = [str(x) for x in v]
    return out


def all_labels_match(wanted: list[str], labels: dict[str, str]) -> bool:
    """Docker's label filter: every ``key`` or ``key=value`` must match."""
    for w in wanted:
        k, sep, v = w.partition("=")
        if k not in labels or (sep and labels[k] != v):
            return False
    return True
