"""devmapper: a device-mapper thin pool, a thin device per snapshot (Docker's devicemapper).

::

    <root>/devicemapper/data, metadata   sparse files behind the pool's loop devices
                                         (unless dm.datadev/dm.metadatadev or dm.thinpooldev)
    <root>/metadata.db                   key -> thin device id, parent, kind; pool state

The base device (id 0) gets a filesystem (``dm.fs``, ext4 by default) of ``dm.basesize``
when the pool is made; a snapshot without parent is a thin snapshot of it, a child one
of its parent, a view a snapshot mounted read-only. A device is activated when its
mounts are asked for, and deactivated (deferred when busy) on commit, remove and close.
Thin device ids and the pool's identity are persisted; an id is recorded as *pending*
before its device is made, so a crash leaves nothing :meth:`cleanup` cannot find. Writes
to a full pool fail at once (``error_if_no_space``) and are reported as such.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pallet.errors import Conflict, InvalidArgument, NotFound, PluginSkip, Unavailable
from pallet.storage import Info, Kind, Mount, StorageDriver, Usage
from pallet.store import Store
from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS snapshots (
        key TEXT PRIMARY KEY,
        dev_id INTEGER NOT NULL UNIQUE,
        parent TEXT REFERENCES snapshots(key),
        kind TEXT NOT NULL CHECK (kind IN ('view', 'active', 'committed')),
        created REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent)",
    "CREATE TABLE IF NOT EXISTS pending (dev_id INTEGER PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS pool (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
]

BASE_DEV_ID = 0
SECTOR = 512
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(s: str) -> int:
    """Docker's sizes: ``10G``, ``512MB``, ``100GiB``, a plain byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(i?[bB])?\s*", s)
    if not m:
        raise ValueError(f"invalid size {s!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class DevmapperOptions(BaseModel):
    """``storage-opts`` of the devmapper driver (Docker's ``dm.*`` keys)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    thinpooldev: str = Field("", alias="dm.thinpooldev")
    datadev: str = Field("", alias="dm.datadev")
    metadatadev: str = Field("", alias="dm.metadatadev")
    loopdatasize: str = Field("100GB", alias="dm.loopdatasize")
    loopmetadatasize: str = Field("2GB", alias="dm.loopmetadatasize")
    basesize: str = Field("10GB", alias="dm.basesize")
    fs: Literal["ext4", "xfs"] = Field("ext4", alias="dm.fs")
    blocksize: str = Field("64K", alias="dm.blocksize")
    mkfsarg: str = Field("", alias="dm.mkfsarg")
    mountopt: str = Field("", alias="dm.mountopt")
    use_deferred_removal: bool = Field(True, alias="dm.use_deferred_removal")

    @field_validator("loopdatasize", "loopmetadatasize", "basesize", "blocksize")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v


def _run(*argv: str, input: str | None = None) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, input=input)
    except FileNotFoundError:
        raise Unavailable(f"devmapper: {argv[0]} is not installed") from None
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise OSError(f"{' '.join(argv[:3])}: {msg[-1] if msg else f'exit {res.returncode}'}")
    return res.stdout


def _dm_available() -> str | None:
    if not os.path.exists("/dev/mapper/control"):
        return "device-mapper is not available (no /dev/mapper/control)"
    for tool in ("dmsetup", "losetup", "thin_delta"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (dmsetup, util-linux, thin-provisioning-tools)"
    try:
        targets = _run("dmsetup", "targets")
    except OSError as e:
        return f"dmsetup targets failed: {e}"
    if not any(line.split()[:1] == ["thin-pool"] for line in targets.splitlines()):
        return "the kernel has no dm-thin-pool target (modprobe dm_thin_pool)"
    return None


class DevmapperDriver(StorageDriver):
    name = "devmapper"
    Options = DevmapperOptions

    @classmethod
    def probe(cls, root: Path, options: BaseModel) -> None:
        if os.geteuid() != 0:
            raise PluginSkip("devmapper: needs root")
        reason = _dm_available()
        if reason:
            raise PluginSkip(f"devmapper: {reason}")

    def __init__(self, root: Path, options: BaseModel) -> None:
        super().__init__(Path(os.path.abspath(root)), options)
        assert isinstance(options, DevmapperOptions)
        self.opts: DevmapperOptions = options
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = Store(self.root / "metadata.db", SCHEMA)
        self._lock = threading.RLock()
        st = os.stat(self.root)
        # as Docker: a prefix unique to this root
        self.prefix = f"pallet-{os.major(st.st_dev)}:{os.minor(st.st_dev)}-{st.st_ino}"
        self._loops: list[str] = []
        self.fs = self._pool_value("fs") or self.opts.fs
        self.base_size = int(self._pool_value("base_size") or parse_size(self.opts.basesize))
        self.pool = self._open_pool()

    # --- the pool ------------------------------------------------------------------------

    def _pool_value(self, k: str) -> str | None:
        row = self.store.one("SELECT v FROM pool WHERE k = ?", (k,))
        return str(row["v"]) if row else None

    def _set_pool_value(self, k: str, v: str) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO pool (k, v) VALUES (?, ?)", (k, v))

    def _dev_name(self, dev_id: int) -> str:
        return f"{self.prefix}-{dev_id}"

    def _dev_path(self, dev_id: int) -> str:
        return f"/dev/mapper/{self._dev_name(dev_id)}"

    @staticmethod
    def _exists(name: str) -> bool:
        """Whether device ``name`` is active, from sysfs (no process to start)."""
        for dm in glob.glob("/sys/block/dm-*/dm/name"):
            with contextlib.suppress(OSError), open(dm) as f:
                if f.read().strip() == name:
                    return True
        return False

    def _open_pool(self) -> str:
        if self.opts.thinpooldev:
            pool = os.path.basename(self.opts.thinpooldev)
            if not self._exists(pool):
                raise Unavailable(f"devmapper: thin pool {self.opts.thinpooldev} does not exist")
        else:
            pool = f"{self.prefix}-pool"
            if not self._exists(pool):
                self._create_pool(pool)
            else:  # left active by a daemon that did not stop cleanly: adopt its loops
                self._loops = self._pool_loops(pool)
        if self._pool_value("base_made") is None:
            self._make_base(pool)
        return pool

    def _create_pool(self, pool: str) -> None:
        fresh = self._pool_value("base_made") is None
        if self.opts.datadev:
            data, meta = self.opts.datadev, self.opts.metadatadev
            if not meta:
                raise InvalidArgument("devmapper: dm.datadev needs dm.metadatadev")
        else:
            d = self.root / "devicemapper"
            d.mkdir(exist_ok=True)
            data_file, meta_file = d / "data", d / "metadata"
            for f, size in (
                (data_file, parse_size(self.opts.loopdatasize)),
                (meta_file, parse_size(self.opts.loopmetadatasize)),
            ):
                if not f.exists():
                    with open(f, "wb") as fh:
                        fh.truncate(size)
            data = _run("losetup", "--find", "--show", str(data_file)).strip()
            self._loops.append(data)
            meta = _run("losetup", "--find", "--show", str(meta_file)).strip()
            self._loops.append(meta)
        if fresh:  # a new pool's metadata starts zeroed
            with open(meta, "r+b") as fh:
                fh.write(b"\0" * 4096)
        data_sectors = int(_run("blockdev", "--getsz", data).strip())
        block_sectors = parse_size(self.opts.blocksize) // SECTOR
        table = (
            f"0 {data_sectors} thin-pool {meta} {data} {block_sectors} 32768 "
            "2 skip_block_zeroing error_if_no_space"
        )
        try:
            _run("dmsetup", "create", pool, "--table", table)
        except OSError:
            self._detach_loops()
            raise

    def _pool_loops(self, pool: str) -> list[str]:
        """The loop devices (data, metadata) under ``pool`` backed by this root's files."""
        fields = _run("dmsetup", "table", pool).split()
        loops = []
        for mm in (fields[4], fields[3]):  # data, metadata
            sysdir = f"/sys/dev/block/{mm}"
            try:
                backing = Path(f"{sysdir}/loop/backing_file").read_text().strip()
            except OSError:
                continue
            if backing.startswith(str(self.root) + "/"):
                loops.append("/dev/" + os.path.basename(os.path.realpath(sysdir)))
        return loops

    def _detach_loops(self) -> None:
        for dev in self._loops:
            with contextlib.suppress(OSError):
                _run("losetup", "-d", dev)
        self._loops.clear()

    def _message(self, msg: str) -> None:
        _run("dmsetup", "message", self.pool if hasattr(self, "pool") else "", "0", msg)

    def _make_base(self, pool: str) -> None:
        self.pool = pool
        with contextlib.suppress(OSError):  # left by a crash before base_made was recorded
            self._message(f"delete {BASE_DEV_ID}")
        self._message(f"create_thin {BASE_DEV_ID}")
        self._activate(BASE_DEV_ID)
        try:
            dev = self._dev_path(BASE_DEV_ID)
            if self.fs == "xfs":
                _run("mkfs.xfs", "-q", "-f", *self.opts.mkfsarg.split(), dev)
            else:
                _run(
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-E",
                    "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                    *self.opts.mkfsarg.split(),
                    dev,
                )
        finally:
            self._deactivate(BASE_DEV_ID, deferred=False)
        self._set_pool_value("fs", self.fs)
        self._set_pool_value("base_size", str(self.base_size))
        self._set_pool_value("base_made", "1")

    def _activate(self, dev_id: int) -> str:
        name = self._dev_name(dev_id)
        if not self._exists(name):
            table = f"0 {self.base_size // SECTOR} thin /dev/mapper/{self.pool} {dev_id}"
            _run("dmsetup", "create", name, "--table", table)
            if not os.path.exists(self._dev_path(dev_id)):  # no udev: make the node
                _run("dmsetup", "mknodes", name)
        return self._dev_path(dev_id)

    def _deactivate(self, dev_id: int, deferred: bool | None = None) -> None:
        name = self._dev_name(dev_id)
        if not self._exists(name):
            return
        if deferred is None:
            deferred = self.opts.use_deferred_removal
        argv = ["dmsetup", "remove", *(["--deferred"] if deferred else []), name]
        for attempt in range(20):
            try:
                _run(*argv)
                return
            except OSError:
                if attempt == 19:
                    raise
                time.sleep(0.1)  # udev may still hold it for a moment

    def pool_status(self) -> dict[str, int | str]:
        """Used/total data and metadata blocks of the pool (``dmsetup status``)."""
        fields = _run("dmsetup", "status", self.pool).split()
        # start len thin-pool <trans id> <used meta>/<total meta> <used data>/<total data> ...
        um, tm = fields[4].split("/")
        ud, td = fields[5].split("/")
        mode = next((f for f in fields[6:] if f in ("rw", "ro", "out_of_data_space")), "rw")
        return {
            "used_meta": int(um),
            "total_meta": int(tm),
            "used_data": int(ud),
            "total_data": int(td),
            "mode": mode,
        }

    def _check_space(self) -> None:
        st = self.pool_status()
        if st["mode"] == "out_of_data_space" or int(st["used_data"]) >= int(st["total_data"]):
            raise Unavailable(
                f"devmapper: thin pool {self.pool} is full "
                f"({st['used_data']}/{st['total_data']} data blocks used)"
            )

    # --- the contract ------------------------------------------------------------------

    def _row(self, key: str) -> dict[str, object]:
        row = self.store.one("SELECT * FROM snapshots WHERE key = ?", (key,))
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        return dict(row)

    def _next_id(self) -> int:
        with self.store.transaction() as db:
            row = db.execute("SELECT v FROM pool WHERE k = 'next_id'").fetchone()
            dev_id = int(row["v"]) if row else BASE_DEV_ID + 1
            db.execute(
                "INSERT OR REPLACE INTO pool (k, v) VALUES ('next_id', ?)", (str(dev_id + 1),)
            )
            db.execute("INSERT INTO pending (dev_id) VALUES (?)", (dev_id,))
        return dev_id

    def _create(self, key: str, parent: str | None, kind: Kind) -> list[Mount]:
        with self._lock:
            if self.store.one("SELECT 1 FROM snapshots WHERE key = ?", (key,)):
                raise Conflict(f"snapshot {key} already exists")
            origin = BASE_DEV_ID
            if parent is not None:
                prow = self._row(parent)
                if prow["kind"] != Kind.COMMITTED:
                    raise InvalidArgument(f"parent snapshot {parent} is not committed")
                origin = int(str(prow["dev_id"]))
            if kind == Kind.ACTIVE:  # a view never writes
                self._check_space()
            dev_id = self._next_id()
            try:
                origin_name = self._dev_name(origin)
                active = self._exists(origin_name)
                if active:  # a snapshot of an active origin needs it suspended
                    _run("dmsetup", "suspend", origin_name)
                try:
                    self._message(f"create_snap {dev_id} {origin}")
                finally:
                    if active:
                        _run("dmsetup", "resume", origin_name)
                with self.store.transaction() as db:
                    db.execute(
                        "INSERT INTO snapshots (key, dev_id, parent, kind, created)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (key, dev_id, parent, str(kind), time.time()),
                    )
                    db.execute("DELETE FROM pending WHERE dev_id = ?", (dev_id,))
            except BaseException:
                with contextlib.suppress(OSError):
                    self._message(f"delete {dev_id}")
                with self.store.transaction() as db:
                    db.execute("DELETE FROM pending WHERE dev_id = ?", (dev_id,))
                raise
            return self._mounts(dev_id, kind)

    def _mounts(self, dev_id: int, kind: Kind | str) -> list[Mount]:
        dev = self._activate(dev_id)
        opts: list[str] = ["ro" if kind == Kind.VIEW else "rw"]
        if self.fs == "xfs":
            opts.append("nouuid")  # every snapshot has the base device's UUID
            if kind == Kind.VIEW:
                opts.append("norecovery")
        elif kind == Kind.VIEW:
            opts.append("noload")
        opts += [o for o in self.opts.mountopt.split(",") if o]
        return [Mount(self.fs, dev, tuple(opts))]

    def prepare(self, key: str, parent: str | None) -> list[Mount]:
        return self._create(key, parent, Kind.ACTIVE)

    def view(self, key: str, parent: str | None) -> list[Mount]:
        return self._create(key, parent, Kind.VIEW)

    def mounts(self, key: str) -> list[Mount]:
        with self._lock:
            row = self._row(key)
            if row["kind"] == Kind.COMMITTED:
                raise InvalidArgument(f"snapshot {key} is committed: view or prepare on it")
            return self._mounts(int(str(row["dev_id"])), str(row["kind"]))

    def apply_target(self, key: str) -> None:
        if self._row(key)["kind"] != Kind.ACTIVE:
            raise InvalidArgument(f"snapshot {key} is not active")
        return None  # a block device: layers are applied on a mount

    def commit(self, name: str, key: str) -> None:
        with self._lock:
            # writes that hit a full pool failed in writeback, after the caller's writes
            # returned: refuse to make such a layer
            st = self.pool_status()
            if st["mode"] == "out_of_data_space" or int(st["used_data"]) >= int(st["total_data"]):
                raise Unavailable(
                    f"devmapper: thin pool {self.pool} is full "
                    f"({st['used_data']}/{st['total_data']} data blocks used): "
                    f"snapshot {key} is incomplete"
                )
            with self.store.transaction() as db:
                row = db.execute("SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()
                if row is None:
                    raise NotFound(f"snapshot {key} does not exist")
                if row["kind"] != Kind.ACTIVE:
                    raise InvalidArgument(f"snapshot {key} is not active")
                if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
                    raise Conflict(f"snapshot {name} already exists")
                db.execute(
                    "UPDATE snapshots SET key = ?, kind = 'committed' WHERE key = ?", (name, key)
                )
            self._deactivate(int(row["dev_id"]))

    def remove(self, key: str) -> None:
        with self._lock:
            with self.store.transaction() as db:
                row = db.execute("SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()
                if row is None:
                    raise NotFound(f"snapshot {key} does not exist")
                n = db.execute(
                    "SELECT COUNT(*) FROM snapshots WHERE parent = ?", (key,)
                ).fetchone()[0]
                if n:
                    raise Conflict(f"snapshot {key} has {n} child snapshot(s)")
                db.execute("DELETE FROM snapshots WHERE key = ?", (key,))
                db.execute("INSERT OR IGNORE INTO pending (dev_id) VALUES (?)", (row["dev_id"],))
            self._destroy(int(row["dev_id"]))

    def _destroy(self, dev_id: int) -> None:
        """Deactivate and delete a thin device whose id is in ``pending``."""
        try:
            self._deactivate(dev_id, deferred=False)
            with contextlib.suppress(OSError):
                self._message(f"delete {dev_id}")
        except OSError:
            return  # busy: stays pending, cleanup() retries
        with self.store.transaction() as db:
            db.execute("DELETE FROM pending WHERE dev_id = ?", (dev_id,))

    def stat(self, key: str) -> Info:
        row = self._row(key)
        return Info(key=str(row["key"]), kind=Kind(str(row["kind"])), parent=row["parent"])  # type: ignore[arg-type]

    def walk(self) -> Iterator[Info]:
        for row in self.store.query("SELECT key, kind, parent FROM snapshots"):
            yield Info(key=row["key"], kind=Kind(row["kind"]), parent=row["parent"])

    def usage(self, key: str) -> Usage:
        """Bytes of the pool blocks this device maps differently from the device it was
        snapshotted from (``thin_delta`` on a metadata snapshot: no quota needed, and a
        layer's figure does not change when children share its blocks). Inodes are not
        counted (0): that needs a mount."""
        row = self._row(key)
        dev_id = int(str(row["dev_id"]))
        origin = BASE_DEV_ID
        if row["parent"] is not None:
            origin = int(str(self._row(str(row["parent"]))["dev_id"]))
        meta = self._metadata_device()
        with self._lock:
            self._message("reserve_metadata_snap")
            try:
                out = _run(
                    "thin_delta",
                    "--metadata-snap",
                    "--snap1",
                    str(origin),
                    "--snap2",
                    str(dev_id),
                    meta,
                )
            finally:
                self._message("release_metadata_snap")
        return Usage(size=thin_delta_bytes(out, parse_size(self.opts.blocksize)), inodes=0)

    def _metadata_device(self) -> str:
        table = _run("dmsetup", "table", self.pool).split()
        meta = table[3]  # "maj:min" or a path
        if ":" in meta and not meta.startswith("/"):
            return f"/dev/block/{meta}" if os.path.exists(f"/dev/block/{meta}") else meta
        return meta

    def metadata(self, key: str) -> dict[str, str]:
        """``GraphDriver.Data`` as Docker's devicemapper reports it."""
        row = self._row(key)
        dev_id = int(str(row["dev_id"]))
        return {
            "DeviceId": str(dev_id),
            "DeviceName": self._dev_name(dev_id),
            "DeviceSize": str(self.base_size),
        }

    def status(self) -> list[tuple[str, str]]:
        st = self.pool_status()
        bs = parse_size(self.opts.blocksize)
        out = [
            ("Pool Name", self.pool),
            ("Pool Blocksize", _human(bs)),
            ("Base Device Size", _human(self.base_size)),
            ("Backing Filesystem", "extfs" if self.fs == "ext4" else self.fs),
            ("Data file", self._loops[0] if self._loops else self.opts.datadev),
            ("Metadata file", self._loops[1] if len(self._loops) > 1 else self.opts.metadatadev),
            ("Data Space Used", _human(int(st["used_data"]) * bs)),
            ("Data Space Total", _human(int(st["total_data"]) * bs)),
            ("Metadata Space Used", _human(int(st["used_meta"]) * 4096)),
            ("Metadata Space Total", _human(int(st["total_meta"]) * 4096)),
            ("Thin Pool Mode", str(st["mode"])),
            ("Deferred Removal Enabled", str(self.opts.use_deferred_removal).lower()),
        ]
        return out

    def cleanup(self) -> None:
        """Delete thin devices a crash left pending."""
        with self._lock:
            for row in self.store.query("SELECT dev_id FROM pending"):
                self._destroy(int(row["dev_id"]))

    def close(self) -> None:
        """Deactivate this pool's devices and, if the driver made it, the pool."""
        with self._lock:
            for row in self.store.query("SELECT dev_id FROM snapshots"):
                with contextlib.suppress(OSError):
                    self._deactivate(int(row["dev_id"]), deferred=False)
            if not self.opts.thinpooldev:
                with contextlib.suppress(OSError):
                    _run("dmsetup", "remove", self.pool)
                self._detach_loops()
            self.store.close()


def thin_delta_bytes(xml_text: str, block_bytes: int) -> int:
    """Bytes of the ``different`` and ``right_only`` ranges of ``thin_delta``'s output."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml_text)
    sb = root if root.tag == "superblock" else root.find("superblock")
    if sb is not None and sb.get("data_block_size"):
        block_bytes = int(sb.get("data_block_size", "0")) * SECTOR or block_bytes
    blocks = sum(
        int(e.get("length", "0")) for e in root.iter() if e.tag in ("different", "right_only")
    )
    return blocks * block_bytes


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.4g} {unit}"
        n /= 1000
    return f"{n}"
