"""The distribution content store: original layer blobs kept beside the Graph.

A layer in the Graph is known by its diff ID (the sha256 of its *uncompressed* tar),
but a registry knows it by the digest of the compressed blob that was pulled, and
pushing or saving it again must reproduce exactly the bytes whose hash the image config
names. Like containerd's content store, pallet keeps the blob a layer came from (pulled,
loaded or imported) under ``<graph>/distribution/blobs/sha256/<hex>`` and remembers

- ``layer_blobs``: diff ID -> blob digest, media type (compression), size;
- ``blob_repos``: which repositories (``registry/path``) are known to hold a blob, for
  cross-repository mounts and HEAD-less pushes.

Files are written to a temporary name and renamed into place before the row that names
them commits. Blobs of layers the Graph no longer has are removed by :meth:`gc`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pallet.store import Store

if TYPE_CHECKING:
    from pallet.graph import Graph

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS layer_blobs (
        diff_id TEXT NOT NULL,
        digest TEXT NOT NULL,
        media_type TEXT NOT NULL,
        size INTEGER NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (diff_id, digest)
    )""",
    "CREATE INDEX IF NOT EXISTS layer_blobs_digest ON layer_blobs(digest)",
    """CREATE TABLE IF NOT EXISTS blob_repos (
        digest TEXT NOT NULL,
        repo TEXT NOT NULL,
        PRIMARY KEY (digest, repo)
    )""",
]


@dataclass(frozen=True)
class LayerBlob:
    diff_id: str
    digest: str
    media_type: str
    size: int


class Content:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.root = graph.root / "distribution"
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.root / "content.db", SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.store.close()

    def path(self, digest: str) -> Path:
        alg, _, hexpart = digest.partition(":")
        if (
            alg != "sha256"
            or len(hexpart) != 64
            or not all(c in "0123456789abcdef" for c in hexpart)
        ):
            raise ValueError(f"invalid digest {digest!r}")
        return self.blobs / hexpart

    def tmp_path(self, prefix: str = "spool-") -> Path:
        return self.tmp / f"{prefix}{secrets.token_hex(12)}"

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def keep(self, tmp: Path, digest: str, diff_id: str, media_type: str, size: int) -> None:
        """Move verified file ``tmp`` (whose sha256 is ``digest``) into the store as the
        blob of layer ``diff_id``."""
        with self._lock:
            self._keep(tmp, digest, diff_id, media_type, size)

    def _keep(self, tmp: Path, digest: str, diff_id: str, media_type: str, size: int) -> None:
        dest = self.path(digest)
        if dest.exists():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        else:
            os.rename(tmp, dest)
        self.store.execute(
            "INSERT OR REPLACE INTO layer_blobs (diff_id, digest, media_type, size, created)"
            " VALUES (?, ?, ?, ?, ?)",
            (diff_id, digest, media_type, size, time.time()),
        )

    def add_file(self, src: Path, diff_id: str, media_type: str) -> LayerBlob:
        """Hash and link (or copy) ``src`` into the store as layer ``diff_id``'s blob."""
        h = hashlib.sha256()
        size = 0
        with open(src, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        digest = "sha256:" + h.hexdigest()
        tmp = self.tmp_path("add-")
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        self.keep(tmp, digest, diff_id, media_type, size)
        return LayerBlob(diff_id, digest, media_type, size)

    def blobs_of(self, diff_id: str) -> list[LayerBlob]:
        rows = self.store.query(
            "SELECT diff_id, digest, media_type, size FROM layer_blobs WHERE diff_id = ?"
            " ORDER BY created DESC",
            (diff_id,),
        )
        out = []
        for r in rows:
            b = LayerBlob(r["diff_id"], r["digest"], r["media_type"], r["size"])
            if self.has(b.digest):
                out.append(b)
        return out

    def add_repo(self, digest: str, repo: str) -> None:
        self.store.execute(
            "INSERT OR IGNORE INTO blob_repos (digest, repo) VALUES (?, ?)", (digest, repo)
        )

    def repos_of(self, digest: str) -> list[str]:
        return [
            r["repo"]
            for r in self.store.query("SELECT repo FROM blob_repos WHERE digest = ?", (digest,))
        ]

    def gc(self, startup: bool = False) -> None:
        """Remove blobs of layers the Graph no longer has (at start and after deletes)
        and, at start, the spool files an interrupted pull left."""
        if startup:
            for e in list(self.tmp.iterdir()):
                if e.is_dir() and not e.is_symlink():  # a layer unpacked ahead (never a mount)
                    shutil.rmtree(e, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        e.unlink()
        # a pull keeps a blob once its layer is in the graph (pending until its image is
        # made): under the lock, what gc sees and what it removes agree
        with self._lock:
            rows = self.graph.store.query("SELECT DISTINCT diff_id FROM layers")
            diff_ids = {r["diff_id"] for r in rows}
            self._gc(diff_ids | {i.diff_id for i in list(self.graph._pending.values())})

    def _gc(self, diff_ids: set[str]) -> None:
        keep: set[str] = set()
        with self.store.transaction() as db:
            for r in db.execute("SELECT diff_id, digest FROM layer_blobs").fetchall():
                if r["diff_id"] in diff_ids:
                    keep.add(r["digest"])
                else:
                    db.execute(
                        "DELETE FROM layer_blobs WHERE diff_id = ? AND digest = ?",
                        (r["diff_id"], r["digest"]),
                    )
        for e in list(self.blobs.iterdir()):
            if f"sha256:{e.name}" not in keep:
                with contextlib.suppress(OSError):
                    e.unlink()
        with self.store.transaction() as db:
            for r in db.execute("SELECT DISTINCT digest FROM blob_repos").fetchall():
                if r["digest"] not in keep:
                    db.execute("DELETE FROM blob_repos WHERE digest = ?", (r["digest"],))
