"""overlay: layers shared through overlayfs, laid out as Docker's overlay2.

::

    <root>/<id>/diff     the snapshot's own files (a layer's content; a container's upper)
    <root>/<id>/work     overlayfs' work directory for an active snapshot
    <root>/<id>/link     the short link name of this snapshot's diff
    <root>/<id>/lower    the parent chain as "l/<LINK>:l/<LINK>..." (nearest first)
    <root>/l/<LINK>      -> ../<id>/diff
    <root>/metadata.db   key -> id, parent, kind
    <root>/tmp/          half-made snapshots, removed by cleanup()

Mount descriptions name lower layers by their short link (``<root>/l/<LINK>``) so a
chain keeps the mount data short; when it still exceeds a page, :mod:`pallet.mount`
mounts it through the new mount API (``lowerdir+``) or relative to ``<root>/l``, so
chains go up to overlayfs' 500 layers. A chain that cannot be mounted is refused
with "max depth exceeded" rather than mounted truncated. A snapshot without parent is
a bind mount of its ``diff``; a view of one layer a read-only bind mount of it; a view
of several an overlay with lower directories only. Layers are applied straight into an
active snapshot's ``diff`` with overlay whiteouts (0/0 character devices,
``trusted.overlay.opaque=y``) and are never copied.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
import stat
from pathlib import Path

from pallet import linux, mount
from pallet.errors import InvalidArgument, PluginSkip
from pallet.snapshots import DirSnapshotter, backing_fs, fs_magic
from pallet.storage import Kind, Mount, WhiteoutFormat
from pydantic import BaseModel

LINK_DIR = "l"
LINK_LEN = 8  # characters of A-Z0-9: Docker uses 26; short keeps deep chains mountable
_LINK_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
MAX_LAYERS = 500  # overlayfs' own limit on lower layers (OVL_MAX_STACK)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_OVERLAY_MAGIC = 0x794C7630
_TMPFS_MAGIC = 0x01021994
_PARAMS = Path("/sys/module/overlay/parameters")


def _kernel_at_least(major: int, minor: int) -> bool:
    rel = os.uname().release.split("-")[0].split(".")
    try:
        return (int(rel[0]), int(rel[1])) >= (major, minor)
    except (IndexError, ValueError):
        return False


def _supported_off_options() -> tuple[str, ...]:
    """Features that break layer diffs from the upper dir, switched off explicitly when
    the kernel knows them (Docker's overlay2 does the same for ``index``)."""
    out = []
    for opt in ("index", "redirect_dir", "metacopy"):
        if (_PARAMS / opt).exists():
            out.append(f"{opt}=off")
    return tuple(out)


class OverlayDriver(DirSnapshotter):
    name = "overlay"

    @classmethod
    def probe(cls, root: Path, options: BaseModel) -> None:
        if os.geteuid() != 0:
            raise PluginSkip("overlay: needs root")
        try:
            with open("/proc/filesystems") as f:
                if not any(line.split()[-1:] == ["overlay"] for line in f):
                    raise PluginSkip("overlay: the kernel does not support overlayfs")
        except OSError as e:
            raise PluginSkip(f"overlay: cannot read /proc/filesystems: {e}") from e
        if any(c in str(root) for c in ",:"):
            raise PluginSkip(f"overlay: the data root {root} contains ',' or ':'")
        root.mkdir(parents=True, exist_ok=True)
        magic = fs_magic(root)
        if magic == _OVERLAY_MAGIC:
            raise PluginSkip(f"overlay: {root} is on overlayfs, which cannot be an upper dir")
        if magic == _TMPFS_MAGIC and not _kernel_at_least(5, 0):
            raise PluginSkip(f"overlay: {root} is on tmpfs, unsupported as upper before 5.0")
        reason = cls._try_mount(root)
        if reason:
            raise PluginSkip(f"overlay: {reason}")

    @staticmethod
    def _try_mount(root: Path) -> str | None:
        """Mount a small overlay under ``root``: whiteouts and opaque dirs must work."""
        d = root / f"probe-{secrets.token_hex(6)}"
        try:
            for sub in ("lower1", "lower2", "upper", "work", "merged"):
                (d / sub).mkdir(parents=True)
            (d / "lower1" / "gone").write_text("x")
            (d / "lower1" / "opq").mkdir()
            (d / "lower1" / "opq" / "hidden").write_text("x")
            (d / "lower2" / "kept").write_text("x")
            try:
                os.mknod(d / "upper" / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
                (d / "upper" / "opq").mkdir()
                os.setxattr(d / "upper" / "opq", "trusted.overlay.opaque", b"y")
            except OSError as e:
                return f"cannot write overlay whiteouts on {backing_fs(root)}: {e.strerror}"
            opts = [
                f"lowerdir={d / 'lower1'}:{d / 'lower2'}",
                f"upperdir={d / 'upper'}",
                f"workdir={d / 'work'}",
                *_supported_off_options(),
            ]
            try:
                linux.mount("overlay", str(d / "merged"), "overlay", 0, ",".join(opts))
            except OSError as e:
                return f"mounting overlay on {backing_fs(root)} failed: {e.strerror}"
            try:
                merged = d / "merged"
                if (merged / "gone").exists() or (merged / "opq" / "hidden").exists():
                    return "whiteouts are not honoured"
                if not (merged / "kept").exists():
                    return "lower layers are not merged"
            finally:
                mount.unmount(str(d / "merged"))
            return None
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def __init__(self, root: Path, options: BaseModel) -> None:
        super().__init__(root, options)
        (self.root / LINK_DIR).mkdir(exist_ok=True)
        self._off_opts = _supported_off_options()

    # --- layout -----------------------------------------------------------------------

    def _dir(self, sid: str) -> Path:
        return self.root / sid

    def _diff(self, row: sqlite3.Row) -> Path:
        return self.root / row["id"] / "diff"

    def _link_path(self, link: str) -> str:
        return f"{self.root}/{LINK_DIR}/{link}"

    def _own_dir(self, row: sqlite3.Row) -> Path:
        return self._diff(row)

    def _new_link(self) -> str:
        while True:
            link = "".join(secrets.choice(_LINK_ALPHABET) for _ in range(LINK_LEN))
            if not os.path.lexists(self._link_path(link)):
                return link

    def _build(self, tmp: Path, kind: Kind, parent: sqlite3.Row | None) -> None:
        tmp.mkdir(mode=0o700)
        (tmp / "diff").mkdir(mode=0o755)
        (tmp / "diff").chmod(0o755)
        (tmp / "work").mkdir(mode=0o700)
        lowers = self._lowers(parent) if parent is not None else []
        # refuse a chain that could not be mounted now, rather than at container start
        if kind == Kind.ACTIVE and lowers:
            final = self._dir(tmp.name)
            self._overlay(lowers, str(final / "diff"), str(final / "work"))
        elif len(lowers) > 1:
            self._overlay(lowers, None, None)
        if lowers:
            (tmp / "lower").write_text(":".join(f"{LINK_DIR}/{x}" for x in lowers))

    def _placed(self, sid: str, link: str) -> None:
        (self.root / sid / "link").write_text(link)
        lp = self._link_path(link)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lp)
        os.symlink(f"../{sid}/diff", lp)

    def _destroyed(self, row: sqlite3.Row) -> None:
        if row["link"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._link_path(row["link"]))

    def _lowers(self, row: sqlite3.Row) -> list[str]:
        """Link names of ``row`` and its ancestors, nearest first."""
        return [r["link"] for r in self.chain(row["key"])]

    # --- mounts -----------------------------------------------------------------------

    def _overlay(self, lowers: list[str], upper: str | None, work: str | None) -> Mount:
        if len(lowers) > MAX_LAYERS:
            raise InvalidArgument(f"max depth exceeded: {len(lowers)} layers (max {MAX_LAYERS})")
        opts = ["lowerdir=" + ":".join(self._link_path(x) for x in lowers)]
        if upper is not None and work is not None:
            opts += [f"upperdir={upper}", f"workdir={work}"]
        opts += list(self._off_opts)
        if upper is None:
            opts.insert(0, "ro")
        data = ",".join(o for o in opts if o != "ro")
        if len(data) >= PAGE_SIZE and not self._fits_long(data, len(lowers)):
            raise InvalidArgument(
                f"max depth exceeded: {len(lowers)} layers need {len(data)} bytes of mount "
                f"options under {self.root}, more than a page ({PAGE_SIZE})"
            )
        return Mount("overlay", "overlay", tuple(opts))

    def _fits_long(self, data: str, nlowers: int) -> bool:
        """Whether :func:`pallet.mount.mount_overlay_long` can mount options ``data``:
        with ``lowerdir+`` always; else relative to ``<root>/l`` they must fit a page."""
        if mount.supports_lowerdir_plus():
            return True
        prefix = f"{self.root}/{LINK_DIR}/"
        return len(data.replace(prefix, "")) < PAGE_SIZE

    def _mounts(self, row: sqlite3.Row) -> list[Mount]:
        parent = self._row(row["parent"]) if row["parent"] else None
        if row["kind"] == Kind.VIEW:
            if parent is None:
                return [Mount("bind", str(self._diff(row)), ("bind", "ro"))]
            if parent["parent"] is None:
                return [Mount("bind", str(self._diff(parent)), ("bind", "ro"))]
            return [self._overlay(self._lowers(parent), None, None)]
        if parent is None:
            return [Mount("bind", str(self._diff(row)), ("bind", "rw"))]
        sdir = self.root / row["id"]
        return [self._overlay(self._lowers(parent), str(sdir / "diff"), str(sdir / "work"))]

    def apply_target(self, key: str) -> tuple[Path, WhiteoutFormat] | None:
        row = self._row(key)
        if row["kind"] != Kind.ACTIVE:
            raise InvalidArgument(f"snapshot {key} is not active")
        return self._diff(row), "overlay"

    def metadata(self, key: str) -> dict[str, str]:
        """``GraphDriver.Data`` for ``docker inspect``, as Docker's overlay2 reports it."""
        row = self._row(key)
        data = {"UpperDir": str(self._diff(row)), "WorkDir": str(self.root / row["id"] / "work")}
        if row["parent"]:
            parents = self.chain(row["parent"])
            data["LowerDir"] = ":".join(str(self._diff(r)) for r in parents)
        return data

    def status(self) -> list[tuple[str, str]]:
        def param(name: str) -> str:
            try:
                v = (_PARAMS / name).read_text().strip()
            except OSError:
                return "false"
            return "true" if v in ("Y", "on") and f"{name}=off" not in self._off_opts else "false"

        return [
            ("Backing Filesystem", backing_fs(self.root)),
            ("Supports d_type", "true"),
            ("Using metacopy", param("metacopy")),
            ("Native Overlay Diff", "true"),
            ("userxattr", "false"),
        ]

    def cleanup(self) -> None:
        super().cleanup()
        known = {r["link"] for r in self.store.query("SELECT link FROM snapshots")}
        for e in (self.root / LINK_DIR).iterdir():
            if e.name not in known:
                with contextlib.suppress(FileNotFoundError):
                    e.unlink()
        for e in self.root.iterdir():
            if e.name.startswith("probe-"):
                shutil.rmtree(e, ignore_errors=True)
