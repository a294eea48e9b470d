"""btrfs: a subvolume per snapshot, children made as btrfs snapshots (copy-on-write).

::

    <root>/subvolumes/<id>   the snapshot's subvolume (a layer, a container's rootfs)
    <root>/metadata.db       key -> id, parent, kind
    <root>/tmp/              subvolumes being made or deleted, removed by cleanup()

A layer is applied straight into its active subvolume (deletions by removing paths); a
child is a writable snapshot of its parent's subvolume and a view a read-only one, so
nothing is copied. Mounts are bind mounts of the subvolume directory (Docker's btrfs
driver mounts the same way). ``usage`` needs no quota groups: it counts the bytes of
the extents (``FIEMAP``) the parent's files do not have, and the inodes that differ from
the parent's.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import os
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path

from pallet.errors import InvalidArgument, PluginSkip, Unavailable
from pallet.snapshots import DirSnapshotter, fs_magic
from pallet.storage import Kind, Mount, Usage, WhiteoutFormat
from pydantic import BaseModel, ConfigDict, Field

BTRFS_MAGIC = 0x9123683E
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_DATA_INLINE = 0x200
BTRFS_FIRST_FREE_OBJECTID = 256  # the inode number of every subvolume's root


class _Extent(ctypes.Structure):
    _fields_ = [
        ("fe_logical", ctypes.c_uint64),
        ("fe_physical", ctypes.c_uint64),
        ("fe_length", ctypes.c_uint64),
        ("fe_reserved64", ctypes.c_uint64 * 2),
        ("fe_flags", ctypes.c_uint32),
        ("fe_reserved", ctypes.c_uint32 * 3),
    ]


_N_EXTENTS = 64


class _Fiemap(ctypes.Structure):
    _fields_ = [
        ("fm_start", ctypes.c_uint64),
        ("fm_length", ctypes.c_uint64),
        ("fm_flags", ctypes.c_uint32),
        ("fm_mapped_extents", ctypes.c_uint32),
        ("fm_extent_count", ctypes.c_uint32),
        ("fm_reserved", ctypes.c_uint32),
        ("fm_extents", _Extent * _N_EXTENTS),
    ]


def extents(fd: int) -> list[tuple[int, int, int, int]]:
    """``(logical, physical, length, flags)`` of file ``fd``'s extents (``FIEMAP``)."""
    out: list[tuple[int, int, int, int]] = []
    start = 0
    while True:
        fm = _Fiemap()
        fm.fm_start = start
        fm.fm_length = 0xFFFFFFFFFFFFFFFF - start
        fm.fm_flags = FIEMAP_FLAG_SYNC
        fm.fm_extent_count = _N_EXTENTS
        fcntl.ioctl(fd, FS_IOC_FIEMAP, fm)
        n = fm.fm_mapped_extents
        for i in range(n):
            e = fm.fm_extents[i]
            out.append((e.fe_logical, e.fe_physical, e.fe_length, e.fe_flags))
            if e.fe_flags & FIEMAP_EXTENT_LAST:
                return out
        if n == 0:
            return out
        last = fm.fm_extents[n - 1]
        start = last.fe_logical + last.fe_length


def _file_extents(path: str) -> list[tuple[int, int, int, int]]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return extents(fd)
    finally:
        os.close(fd)


class BtrfsOptions(BaseModel):
    """``storage-opts`` of the btrfs driver (Docker's keys)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    min_space: str = Field("", alias="btrfs.min_space")  # accepted for compatibility


def _btrfs(*args: str) -> str:
    try:
        res = subprocess.run(["btrfs", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise Unavailable("btrfs: the btrfs command (btrfs-progs) is not installed") from None
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise OSError(f"btrfs {' '.join(args[:2])} failed: {msg[-1] if msg else res.returncode}")
    return res.stdout


def is_subvolume(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_FIRST_FREE_OBJECTID


class BtrfsDriver(DirSnapshotter):
    name = "btrfs"
    Options = BtrfsOptions

    @classmethod
    def probe(cls, root: Path, options: BaseModel) -> None:
        if os.geteuid() != 0:
            raise PluginSkip("btrfs: needs root")
        if shutil.which("btrfs") is None:
            raise PluginSkip("btrfs: the btrfs command (btrfs-progs) is not installed")
        probe_at = root
        while not probe_at.exists() and probe_at != probe_at.parent:
            probe_at = probe_at.parent
        try:
            magic = fs_magic(probe_at)
        except OSError as e:
            raise PluginSkip(f"btrfs: cannot stat {probe_at}: {e.strerror}") from e
        if magic != BTRFS_MAGIC:
            from pallet.snapshots import backing_fs

            raise PluginSkip(
                f"btrfs: {probe_at} is on {backing_fs(probe_at)}, not btrfs "
                "(give a data root on a btrfs filesystem)"
            )

    def __init__(self, root: Path, options: BaseModel) -> None:
        super().__init__(root, options)
        self._to_freeze: set[str] = set()

    def _dir(self, sid: str) -> Path:
        return self.root / "subvolumes" / sid

    def _build(self, tmp: Path, kind: Kind, parent: sqlite3.Row | None) -> None:
        if parent is None:
            _btrfs("subvolume", "create", str(tmp))
            tmp.chmod(0o755)
            return
        _btrfs("subvolume", "snapshot", str(self._dir(parent["id"])), str(tmp))
        if kind == Kind.VIEW:  # made read-only once in place (a read-only one cannot move)
            self._to_freeze.add(tmp.name)

    def _placed(self, sid: str, link: str) -> None:
        if sid in self._to_freeze:
            self._to_freeze.discard(sid)
            _btrfs("property", "set", "-ts", str(self._dir(sid)), "ro", "true")

    def _delete_dir(self, path: Path) -> None:
        if is_subvolume(path):  # a read-only one (a view) cannot be moved to the trash
            _btrfs("property", "set", "-ts", str(path), "ro", "false")
        super()._delete_dir(path)

    def _remove_tree(self, path: Path) -> None:
        if not is_subvolume(path):
            shutil.rmtree(path, ignore_errors=True)
            return
        # nested subvolumes (a container may make its own) go first
        for sub in _nested_subvolumes(path):
            self._remove_tree(sub)
        _btrfs("property", "set", "-ts", str(path), "ro", "false")
        _btrfs("subvolume", "delete", str(path))

    def _mounts(self, row: sqlite3.Row) -> list[Mount]:
        path = str(self._dir(row["id"]))
        if row["kind"] == Kind.VIEW:
            return [Mount("bind", path, ("bind", "ro"))]
        return [Mount("bind", path, ("bind", "rw"))]

    def apply_target(self, key: str) -> tuple[Path, WhiteoutFormat] | None:
        row = self._row(key)
        if row["kind"] != Kind.ACTIVE:
            raise InvalidArgument(f"snapshot {key} is not active")
        return self._dir(row["id"]), "delete"

    def usage(self, key: str) -> Usage:
        row = self._row(key)
        path = self._dir(row["id"])
        parent = self._dir(self._row(row["parent"])["id"]) if row["parent"] else None
        return subvolume_usage(path, parent)

    def metadata(self, key: str) -> dict[str, str]:
        """``GraphDriver.Data`` for ``docker inspect`` (Docker's btrfs reports none)."""
        self._row(key)
        return {}

    def status(self) -> list[tuple[str, str]]:
        out = [("Backing Filesystem", "btrfs")]
        try:
            version = _btrfs("--version").strip().split()[-1]
            out.append(("Btrfs Version", version))
        except (OSError, Unavailable):
            pass
        st = os.statvfs(self.root)
        out.append(("Data Space Total", _human(st.f_blocks * st.f_frsize)))
        out.append(("Data Space Available", _human(st.f_bavail * st.f_frsize)))
        return out


def _nested_subvolumes(path: Path) -> list[Path]:
    found = []
    stack = [str(path)]
    while stack:
        p = stack.pop()
        with os.scandir(p) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    if os.lstat(e.path).st_ino == BTRFS_FIRST_FREE_OBJECTID:
                        found.append(Path(e.path))
                    else:
                        stack.append(e.path)
    return found


def subvolume_usage(path: Path, parent: Path | None) -> Usage:
    """What the subvolume at ``path`` holds of its own, against the subvolume it was
    snapshotted from: the bytes of file extents the parent's file at the same path does
    not have (new or rewritten data; children sharing them change nothing) and the
    inodes that are not the parent's unchanged ones."""
    seen: set[int] = set()
    size = inodes = 0
    stack = [""]
    while stack:
        rel = stack.pop()
        p = os.path.join(path, rel) if rel else str(path)
        st = os.lstat(p)
        if rel and stat.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_FIRST_FREE_OBJECTID:
            continue  # a nested subvolume is not part of this one
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            pst = None
            if parent is not None:
                pp = os.path.join(parent, rel) if rel else str(parent)
                try:
                    pst = os.lstat(pp)
                except FileNotFoundError:
                    pst = None
            unchanged = pst is not None and (pst.st_ino, pst.st_ctime_ns) == (
                st.st_ino,
                st.st_ctime_ns,
            )
            if not unchanged:
                inodes += 1
                if stat.S_ISREG(st.st_mode) and st.st_size:
                    theirs: list[tuple[int, int]] = []
                    if pst is not None and stat.S_ISREG(pst.st_mode) and pst.st_ino == st.st_ino:
                        theirs = sorted(
                            (e[1], e[1] + e[2])
                            for e in _file_extents(pp)
                            if not e[3] & FIEMAP_EXTENT_DATA_INLINE
                        )
                    for logical, physical, length, flags in _file_extents(p):
                        if flags & FIEMAP_EXTENT_DATA_INLINE:
                            size += min(length, max(st.st_size - logical, 0))
                        elif not _within(theirs, physical, physical + length):
                            size += length
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(p) as it:
                stack.extend(os.path.join(rel, e.name) for e in it)
    return Usage(size=size, inodes=inodes)


def _within(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether [start, end) lies inside one of the sorted ``ranges`` (a shared extent:
    a partly rewritten file keeps pieces of its parent's extents)."""
    i = bisect.bisect_right(ranges, (start, 1 << 64)) - 1
    return i >= 0 and ranges[i][0] <= start and end <= ranges[i][1]


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n}"
