"""Storage drivers: the conformance suite (from :mod:`pallet.testing.conformance`) on
every driver that runs on this host, and what is particular to each driver.

devmapper needs device-mapper, which this machine's kernel lacks: its conformance run
happens in a QEMU guest (tests/test_devmapper_guest.py). Every registered driver is
covered by one or the other.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pallet import mount
from pallet.errors import InvalidArgument, PluginSkip
from pallet.storage import Mount, StorageDriver
from pallet.testing import envs
from pallet.testing.conformance import (
    BASE,
    DriverConformance,
    DriverEnvs,
    DriverFactory,
    Mounter,
    add_layer,
    check_base,
    driver_env,
    registered_drivers,
    tar,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="storage drivers need root")

GUEST_DRIVERS = {"devmapper"}  # run in the QEMU guest
DRIVERS = registered_drivers()
HOST_DRIVERS = sorted(d.name for d in DRIVERS if d.name not in GUEST_DRIVERS)


class TestConformance(DriverConformance):
    drivers = HOST_DRIVERS


def test_every_registered_driver_is_covered() -> None:
    names = {d.name for d in DRIVERS}
    assert {"vfs", "overlay", "btrfs", "devmapper"} <= names
    assert set(HOST_DRIVERS) | GUEST_DRIVERS == names


def _cls(name: str) -> type[StorageDriver]:
    return next(c for c in DRIVERS if c.name == name)


DIR_DRIVERS = ["vfs", "overlay", "btrfs"]  # built on pallet.snapshots.DirSnapshotter


@pytest.fixture(params=DIR_DRIVERS)
def driver(
    request: pytest.FixtureRequest, pallet_driver_envs: DriverEnvs
) -> Iterator[StorageDriver]:
    cls = _cls(request.param)
    f = DriverFactory(cls, driver_env(pallet_driver_envs, cls.name))
    try:
        yield f.open()
    finally:
        f.close_all()


@pytest.fixture
def mounted(snapshot_mounter: Mounter) -> Mounter:
    return snapshot_mounter


def test_cleanup_removes_half_made_state(
    driver: StorageDriver, mounted: Mounter, tmp_path: Path
) -> None:
    d = driver
    base = add_layer(d, None, BASE, tmp_path)
    root = d.root
    # a crash in the middle of a prepare: a temp dir; after the rename: a dir with no row
    (root / "tmp" / ("a" * 64) / "diff").mkdir(parents=True)
    orphan = secrets.token_hex(32)
    parent_of_dirs = next(p for p in root.rglob("*") if p.is_dir() and len(p.name) == 64).parent
    (parent_of_dirs / orphan / "diff").mkdir(parents=True)
    if d.name == "overlay":
        os.symlink(f"../{orphan}/diff", root / "l" / "ORPHAN00")
    if d.name == "btrfs":  # a crash while a snapshot was being made: a subvolume in tmp
        import subprocess

        subprocess.run(["btrfs", "subvolume", "create", str(root / "tmp" / ("b" * 64))], check=True)
    d.cleanup()
    assert list((root / "tmp").iterdir()) == []
    assert not (parent_of_dirs / orphan).exists()
    assert not (root / "l" / "ORPHAN00").exists()
    with mounted(d.view("v", base)) as mnt:
        check_base(mnt)


def test_failed_create_leaves_nothing(
    driver: StorageDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = driver
    base = add_layer(d, None, BASE, tmp_path)
    before = sorted(p.name for p in d.root.iterdir())

    def boom(*a: Any) -> None:
        raise OSError(errno.EIO, "injected failure")

    target: Callable[..., Any] = boom
    monkeypatch.setattr(d, "_placed", target)  # after the rename, inside the transaction
    with pytest.raises(OSError, match="injected"):
        d.prepare("ctr", base)
    monkeypatch.undo()
    assert [i.key for i in d.walk()] == [base]
    assert sorted(p.name for p in d.root.iterdir()) == before
    assert list((d.root / "tmp").iterdir()) == []
    d.prepare("ctr", base)  # and the key is free


def test_overlay_layers_are_shared_not_copied(tmp_path: Path, mounted: Mounter) -> None:
    cls = _cls("overlay")
    d = cls(tmp_path / "d", cls.Options())
    base = add_layer(d, None, tar({"name": "big", "data": b"x" * 1_000_000}), tmp_path)
    mounts = d.prepare("ctr", base)
    assert mounts[0].type == "overlay"
    assert d.usage("ctr").size == 0
    opts = dict(o.split("=", 1) for o in mounts[0].options if "=" in o)
    assert (
        opts["lowerdir"]
        == f"{d.root}/l/"
        + (
            d.root / (d.store.one("SELECT id FROM snapshots WHERE key=?", (base,))["id"]) / "link"
        ).read_text()
    )  # type: ignore[attr-defined]
    meta = d.metadata(base)  # type: ignore[attr-defined]
    assert meta["UpperDir"].endswith("/diff")
    d.close()


def test_overlay_probe_refuses_overlay_root(tmp_path: Path) -> None:
    cls = _cls("overlay")
    for sub in ("lower", "upper", "work", "merged"):
        (tmp_path / sub).mkdir()
    mount.mount_all(
        [
            Mount(
                "overlay",
                "overlay",
                (
                    f"lowerdir={tmp_path / 'lower'}",
                    f"upperdir={tmp_path / 'upper'}",
                    f"workdir={tmp_path / 'work'}",
                ),
            )
        ],
        str(tmp_path / "merged"),
    )
    try:
        with pytest.raises(PluginSkip, match="overlayfs"):
            cls.probe(tmp_path / "merged" / "root", cls.Options())
    finally:
        mount.unmount(str(tmp_path / "merged"))


def test_overlay_mount_options_beyond_a_page(tmp_path: Path, mounted: Mounter) -> None:
    """A root so long that 40 lower directories exceed a page of mount options with
    absolute paths: the chain still mounts (new mount API or relative paths)."""
    d = _cls("overlay")(tmp_path / ("x" * 200) / "d", _cls("overlay").Options())
    try:
        top = None
        for i in range(40):
            top = add_layer(d, top, tar({"name": f"f{i}", "data": b"x"}), tmp_path)
        assert top is not None
        mounts = d.prepare("ctr", top)
        data = mount.split_options(mounts[0].options)[1]
        assert len(data) > mount.PAGE_SIZE
        with mounted(mounts) as root:
            assert len(os.listdir(root)) == 40
    finally:
        d.close()


def test_overlay_relative_fallback(
    tmp_path: Path, mounted: Mounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``lowerdir+`` (kernels before 6.5) long options are mounted relative to
    the links directory by a child process."""
    monkeypatch.setattr(mount, "_lowerdir_plus", False)
    d = _cls("overlay")(tmp_path / ("y" * 200) / "d", _cls("overlay").Options())
    try:
        top = None
        for i in range(30):
            top = add_layer(d, top, tar({"name": f"f{i}", "data": b"x"}), tmp_path)
        assert top is not None
        with mounted(d.prepare("ctr", top)) as root:
            assert len(os.listdir(root)) == 30
            (root / "w").write_text("upper")
        assert (Path(d.metadata("ctr")["UpperDir"]) / "w").read_text() == "upper"  # type: ignore[attr-defined]
    finally:
        d.close()


def test_overlay_more_than_overlayfs_stack_is_refused(tmp_path: Path) -> None:
    d = _cls("overlay")(tmp_path / "d", _cls("overlay").Options())
    try:
        with pytest.raises(InvalidArgument, match="max depth exceeded"):
            d._overlay([f"L{i:07d}" for i in range(501)], None, None)  # type: ignore[attr-defined]
    finally:
        d.close()


def test_btrfs_probe_refuses_other_filesystems(tmp_path: Path) -> None:
    with pytest.raises(PluginSkip, match="not btrfs") as e:
        _cls("btrfs").probe(tmp_path / "btrfs", _cls("btrfs").Options())
    assert str(tmp_path) in e.value.reason or "/" in e.value.reason


def test_btrfs_subvolume_per_snapshot(tmp_path: Path, mounted: Mounter) -> None:
    from pallet.plugins.storage_btrfs.driver import is_subvolume

    with envs.btrfs_filesystem(tmp_path / "fs", 300 << 20) as fs:
        cls = _cls("btrfs")
        cls.probe(fs / "btrfs", cls.Options())
        d = cls(fs / "btrfs", cls.Options())
        try:
            base = add_layer(d, None, BASE, tmp_path)
            d.prepare("ctr", base)
            d.view("v", base)
            subs = sorted(p for p in (d.root / "subvolumes").iterdir())
            assert len(subs) == 3 and all(is_subvolume(p) for p in subs)
            with mounted(d.mounts("ctr")) as root:
                check_base(root)
                # a container that makes its own subvolume can still be removed
                import subprocess

                subprocess.run(["btrfs", "subvolume", "create", str(root / "inner")], check=True)
            status = dict(d.status())
            assert status["Backing Filesystem"] == "btrfs"
            d.remove("ctr")
            d.remove("v")
            d.remove(base)
            assert list((d.root / "subvolumes").iterdir()) == []
        finally:
            d.close()


def test_btrfs_usage_counts_rewritten_extents_only(tmp_path: Path, mounted: Mounter) -> None:
    """A container that rewrites 8 KiB in the middle of a 4 MiB file owns ~8 KiB, and a
    layer's usage does not drop when children share its data."""
    with envs.btrfs_filesystem(tmp_path / "fs", 300 << 20) as fs:
        cls = _cls("btrfs")
        d = cls(fs / "btrfs", cls.Options())
        try:
            base = add_layer(d, None, tar({"name": "big", "data": os.urandom(4 << 20)}), tmp_path)
            before = d.usage(base).size
            assert before >= 4 << 20
            with mounted(d.prepare("ctr", base)) as root:
                with open(root / "big", "r+b") as f:
                    f.seek(1 << 20)
                    f.write(os.urandom(8192))
            u = d.usage("ctr")
            assert 8192 <= u.size < 256 << 10, u
            assert u.inodes >= 1
            assert d.usage(base).size == before
        finally:
            d.close()


def test_conformance_suite_as_a_third_party_plugin(tmp_path: Path) -> None:
    """What a third-party driver's test module does: subclass DriverConformance; the
    pytest11 plugin provides the fixtures and ``--pallet-driver``."""
    import subprocess
    import sys

    (tmp_path / "test_mine.py").write_text(
        "from pallet.testing.conformance import DriverConformance\n\n\n"
        "class TestMyConformance(DriverConformance):\n"
        "    pass\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rA",
            "--pallet-driver",
            "vfs",
            "-k",
            "conformance and (lifecycle or whiteouts)",
            str(tmp_path / "test_mine.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASSED test_mine.py::TestMyConformance::test_lifecycle_and_errors[vfs]" in r.stdout
    assert "2 passed" in r.stdout and "overlay" not in r.stdout
