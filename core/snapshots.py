"""Bookkeeping shared by the directory-based snapshotters (vfs, overlay, btrfs).

A snapshot is a row ``(key, id, parent, kind)`` in a SQLite store under the driver
root plus a directory named by its random ``id``. The database is the truth:

- a directory is built completely under ``<root>/tmp/<id>`` and renamed into place
  inside the transaction that inserts its row (a crash before the commit leaves a
  directory no row names, which :meth:`DirSnapshotter.cleanup` removes);
- removal deletes the row first, then moves the directory to ``tmp`` and deletes it.

Subclasses say where a snapshot's directory lives, how to fill it and how to mount it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import sqlite3
import stat
import time
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path

from pallet.errors import Conflict, InvalidArgument, NotFound
from pallet.storage import Info, Kind, Mount, StorageDriver, Usage
from pallet.store import Store
from pydantic import BaseModel

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS snapshots (
        key TEXT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        parent TEXT REFERENCES snapshots(key),
        kind TEXT NOT NULL CHECK (kind IN ('view', 'active', 'committed')),
        created REAL NOT NULL,
        link TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent)",
]

ID_RE = re.compile(r"^[0-9a-f]{64}$")


def dir_usage(path: Path) -> Usage:
    """Bytes (apparent size, each inode once, as Docker's ``directory.Size``) and inodes
    under ``path``, ``path`` itself included."""
    seen: set[tuple[int, int]] = set()
    size = inodes = 0
    stack = [str(path)]
    first = True
    while stack:
        p = stack.pop()
        st = os.lstat(p)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if not first and not stat.S_ISDIR(st.st_mode):
                size += st.st_size
        first = False
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(p) as it:
                stack.extend(e.path for e in it)
    return Usage(size=size, inodes=inodes)


FS_MAGIC = {
    0xEF53: "extfs",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x01021994: "tmpfs",
    0x794C7630: "overlayfs",
    0x2FC12FC1: "zfs",
    0x6969: "nfs",
    0xF2F52010: "f2fs",
    0x65735546: "fuse",
    0x73717368: "squashfs",
}


def fs_magic(path: Path) -> int:
    """``statfs(2)`` f_type of the filesystem holding ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)
    if libc.statfs(os.fsencode(str(path)), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int.from_bytes(buf.raw[:8], "little", signed=True) & 0xFFFFFFFF


def backing_fs(path: Path) -> str:
    magic = fs_magic(path)
    return FS_MAGIC.get(magic, f"unknown (0x{magic:x})")


class DirSnapshotter(StorageDriver):
    """A snapshotter whose snapshots are directories under ``root``."""

    def __init__(self, root: Path, options: BaseModel) -> None:
        super().__init__(Path(os.path.abspath(root)), options)  # mounts need absolute paths
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.store = Store(self.root / "metadata.db", SCHEMA)

    # --- what a subclass provides -----------------------------------------------------

    @abstractmethod
    def _dir(self, sid: str) -> Path:
        """The directory of snapshot ``sid`` once it is in place."""

    def _ids_on_disk(self) -> Iterator[tuple[str, Path]]:
        """(id, path) of every snapshot directory present, for :meth:`cleanup`."""
        base = self._dir("0" * 64).parent
        if base.is_dir():
            for e in base.iterdir():
                if ID_RE.match(e.name):
                    yield e.name, e

    @abstractmethod
    def _build(self, tmp: Path, kind: Kind, parent: sqlite3.Row | None) -> None:
        """Make the new snapshot directory ``tmp`` (which does not exist yet) and fill it."""

    @abstractmethod
    def _mounts(self, row: sqlite3.Row) -> list[Mount]:
        """Mounts of an active snapshot or a view."""

    def _own_dir(self, row: sqlite3.Row) -> Path:
        """What :meth:`usage` measures."""
        return self._dir(row["id"])

    def _placed(self, sid: str, link: str) -> None:
        """Called inside the creating transaction once the directory is in place."""

    def _new_link(self) -> str:
        return ""

    def _destroyed(self, row: sqlite3.Row) -> None:
        """Called after a snapshot's row is gone and before its directory is deleted."""

    # --- the contract -----------------------------------------------------------------

    def _row(self, key: str) -> sqlite3.Row:
        row = self.store.one("SELECT * FROM snapshots WHERE key = ?", (key,))
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        return row

    def _create(self, key: str, parent: str | None, kind: Kind) -> sqlite3.Row:
        if self.store.one("SELECT 1 FROM snapshots WHERE key = ?", (key,)):
            raise Conflict(f"snapshot {key} already exists")
        prow = None
        if parent is not None:
            prow = self._row(parent)
            if prow["kind"] != Kind.COMMITTED:
                raise InvalidArgument(f"parent snapshot {parent} is not committed")
        sid = secrets.token_hex(32)
        tmp = self.tmp / sid
        final = self._dir(sid)
        placed = False
        try:
            self._build(tmp, kind, prow)
            with self.store.transaction() as db:
                if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
                    raise Conflict(f"snapshot {key} already exists")
                if (
                    parent is not None
                    and not db.execute(
                        "SELECT 1 FROM snapshots WHERE key = ? AND kind = 'committed'", (parent,)
                    ).fetchone()
                ):
                    raise NotFound(f"snapshot {parent} does not exist")
                link = self._new_link()
                db.execute(
                    "INSERT INTO snapshots (key, id, parent, kind, created, link)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (key, sid, parent, str(kind), time.time(), link),
                )
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, final)
                placed = True
                self._placed(sid, link)
        except BaseException:
            self._remove_tree(final if placed else tmp)
            raise
        return self._row(key)

    def prepare(self, key: str, parent: str | None) -> list[Mount]:
        return self._mounts(self._create(key, parent, Kind.ACTIVE))

    def view(self, key: str, parent: str | None) -> list[Mount]:
        return self._mounts(self._create(key, parent, Kind.VIEW))

    def mounts(self, key: str) -> list[Mount]:
        row = self._row(key)
        if row["kind"] == Kind.COMMITTED:
            raise InvalidArgument(f"snapshot {key} is committed: view or prepare on it")
        return self._mounts(row)

    def commit(self, name: str, key: str) -> None:
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

    def remove(self, key: str) -> None:
        with self.store.transaction() as db:
            row = db.execute("SELECT * FROM snapshots WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise NotFound(f"snapshot {key} does not exist")
            n = db.execute("SELECT COUNT(*) FROM snapshots WHERE parent = ?", (key,)).fetchone()[0]
            if n:
                raise Conflict(f"snapshot {key} has {n} child snapshot(s)")
            db.execute("DELETE FROM snapshots WHERE key = ?", (key,))
        self._destroyed(row)
        self._delete_dir(self._dir(row["id"]))

    def _delete_dir(self, path: Path) -> None:
        trash = self.tmp / f"rm-{secrets.token_hex(8)}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        self._remove_tree(trash)

    def _remove_tree(self, path: Path) -> None:
        """Delete a snapshot directory (or what is left of one); missing is fine."""
        shutil.rmtree(path, ignore_errors=True)

    def stat(self, key: str) -> Info:
        row = self._row(key)
        return Info(key=row["key"], kind=Kind(row["kind"]), parent=row["parent"])

    def walk(self) -> Iterator[Info]:
        for row in self.store.query("SELECT key, kind, parent FROM snapshots"):
            yield Info(key=row["key"], kind=Kind(row["kind"]), parent=row["parent"])

    def usage(self, key: str) -> Usage:
        return dir_usage(self._own_dir(self._row(key)))

    def chain(self, key: str) -> list[sqlite3.Row]:
        """Rows of ``key`` and its ancestors, nearest first."""
        rows = []
        cur: str | None = key
        while cur is not None:
            row = self._row(cur)
            rows.append(row)
            cur = row["parent"]
        return rows

    def cleanup(self) -> None:
        """Remove leftovers of interrupted operations: ``tmp`` and unknown directories."""
        for e in list(self.tmp.iterdir()):
            if e.is_dir() and not e.is_symlink():
                self._remove_tree(e)
            else:
                with contextlib.suppress(FileNotFoundError):
                    e.unlink()
        known = {r["id"] for r in self.store.query("SELECT id FROM snapshots")}
        for sid, path in list(self._ids_on_disk()):
            if sid not in known:
                self._delete_dir(path)

    def close(self) -> None:
        self.store.close()


def snapshot_changes(driver: StorageDriver, key: str, scratch: Path) -> list[tuple[str, int]]:
    """``docker diff`` of active snapshot ``key``: ``(path, kind)`` against its parent
    (kinds 0 modified, 1 added, 2 deleted), found by comparing the snapshot with a
    read-only view of the parent, both mounted under ``scratch``."""
    from pallet import archive, mount

    info = driver.stat(key)
    if info.kind != Kind.ACTIVE:
        raise InvalidArgument(f"snapshot {key} is not active")
    scratch.mkdir(parents=True, exist_ok=True)
    mounted: list[str] = []
    view_key = None
    try:
        upper = scratch / f"changes-{secrets.token_hex(8)}"
        upper.mkdir()
        mounted.append(str(upper))
        mount.mount_all(driver.mounts(key), str(upper))
        lower: Path | None = None
        if info.parent is not None:
            view_key = f"tmp-changes-{secrets.token_hex(8)}"
            lower = scratch / view_key
            lower.mkdir()
            mounted.append(str(lower))
            mount.mount_all(driver.view(view_key, info.parent), str(lower))
        return [("/" + rel, kind) for rel, kind in archive.changes(lower, upper)]
    finally:
        for m in reversed(mounted):
            mount.unmount(m)
            with contextlib.suppress(OSError):
                os.rmdir(m)
        if view_key is not None:
            with contextlib.suppress(NotFound):
                driver.remove(view_key)
