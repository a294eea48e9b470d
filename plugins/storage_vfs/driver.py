"""vfs: a directory per snapshot under ``<root>/dir/<id>``.

``prepare`` copies the parent (``cp -a --reflink=auto``: owners, modes, xattrs,
hardlinks, symlinks and device nodes kept; a reflink clone where the filesystem can);
a view of a committed snapshot is a read-only bind mount of it (committed snapshots
never change, so nothing needs copying). Layers are applied straight into an active
snapshot's directory, deletions done by removing paths.
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

from pallet.errors import InvalidArgument
from pallet.snapshots import DirSnapshotter, backing_fs
from pallet.storage import Kind, Mount, WhiteoutFormat


class VfsDriver(DirSnapshotter):
    name = "vfs"

    def _dir(self, sid: str) -> Path:
        return self.root / "dir" / sid

    def _build(self, tmp: Path, kind: Kind, parent: sqlite3.Row | None) -> None:
        if parent is None or kind == Kind.VIEW:
            tmp.mkdir(mode=0o755)
            tmp.chmod(0o755)
            return
        src = self._dir(parent["id"])
        res = subprocess.run(
            ["cp", "-a", "--reflink=auto", "--", str(src), str(tmp)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise OSError(f"vfs: copying snapshot {parent['key']} failed: {res.stderr.strip()}")

    def _mounts(self, row: sqlite3.Row) -> list[Mount]:
        if row["kind"] == Kind.VIEW:
            src = (
                self._dir(self._row(row["parent"])["id"]) if row["parent"] else self._dir(row["id"])
            )
            return [Mount("bind", str(src), ("bind", "ro"))]
        return [Mount("bind", str(self._dir(row["id"])), ("bind", "rw"))]

    def apply_target(self, key: str) -> tuple[Path, WhiteoutFormat] | None:
        row = self._row(key)
        if row["kind"] != Kind.ACTIVE:
            raise InvalidArgument(f"snapshot {key} is not active")
        return self._dir(row["id"]), "delete"

    def metadata(self, key: str) -> dict[str, str]:
        """``GraphDriver.Data`` for ``docker inspect`` (Docker's vfs reports none)."""
        self._row(key)
        return {}

    def status(self) -> list[tuple[str, str]]:
        return [("Backing Filesystem", backing_fs(self.root))]
