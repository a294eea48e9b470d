"""Run inside the QEMU guest (tests/test_devmapper_guest.py): the conformance suite and
devmapper's own tests, on a kernel with device-mapper. Not collected on the host."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pallet import archive, mount
from pallet.errors import Unavailable
from pallet.testing.conformance import BASE, DriverConformance, Mounter, add_layer, tar
from pallet.testing.envs import ENVIRONMENTS


class TestConformance(DriverConformance):
    drivers = ["devmapper"]


def _open(root: Path, **opts: str):  # type: ignore[no-untyped-def]
    from pallet.plugins.storage_devmapper.driver import DevmapperDriver

    with ENVIRONMENTS["devmapper"](root) as env:
        options = DevmapperDriver.Options.model_validate({**env.options, **opts})
    DevmapperDriver.probe(root, options)
    return DevmapperDriver(root / "dm", options)


def test_devmapper_devices_and_persisted_ids(tmp_path: Path, snapshot_mounter: Mounter) -> None:
    d = _open(tmp_path)
    try:
        base = add_layer(d, None, BASE, tmp_path)
        mounts = d.prepare("ctr", base)
        assert mounts[0].type == "ext4" and mounts[0].source.startswith("/dev/mapper/pallet-")
        assert os.path.exists(mounts[0].source), "udev made the /dev/mapper link"
        meta = d.metadata("ctr")
        status = dict(d.status())
        assert status["Pool Name"].endswith("-pool") and status["Thin Pool Mode"] == "rw"
        tables = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
        assert meta["DeviceName"] in tables
        d.close()
        d = _open(tmp_path)  # a restart: same pool, same ids
        assert d.metadata("ctr") == meta
        with snapshot_mounter(d.mounts("ctr")) as root:
            assert (root / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
        d.remove("ctr")
        assert (
            meta["DeviceName"]
            not in subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
        )
    finally:
        d.close()
    assert "pallet-" not in subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout


def test_devmapper_restart_after_a_crash(tmp_path: Path, snapshot_mounter: Mounter) -> None:
    """A daemon killed with its pool active: the next one adopts the pool and its loop
    devices, deletes thin devices a half-done prepare left, and releases it all on close."""
    d1 = _open(tmp_path)
    base = add_layer(d1, None, BASE, tmp_path)
    d1.prepare("ctr", base)
    d1._next_id()  # type: ignore[attr-defined]  # a prepare killed before its device was made
    d1.store.close()  # type: ignore[attr-defined]  # killed: nothing deactivated
    d2 = _open(tmp_path)
    try:
        d2.cleanup()
        assert d2.store.one("SELECT COUNT(*) AS n FROM pending")["n"] == 0  # type: ignore[attr-defined]
        status = dict(d2.status())
        assert status["Data file"].startswith("/dev/loop"), status
        with snapshot_mounter(d2.mounts("ctr")) as root:
            assert (root / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    finally:
        d2.close()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in loops, loops
    assert "pallet-" not in subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout


def test_devmapper_full_pool_is_a_clear_error(tmp_path: Path, snapshot_mounter: Mounter) -> None:
    d = _open(tmp_path, **{"dm.loopdatasize": "64MB", "dm.basesize": "128MB"})
    try:
        base = add_layer(d, None, BASE, tmp_path)
        big = tar({"name": "blob", "data": os.urandom(80 << 20)})
        with pytest.raises((Unavailable, OSError)) as e:
            add_layer(d, base, big, tmp_path)
        msg = str(e.value)
        assert "thin pool" in msg and "is full" in msg, msg
        # what was stored is unharmed and readable; the failed layer's blocks are freed,
        # so the pool takes new snapshots again
        assert [i.key for i in d.walk()] == [base]
        with snapshot_mounter(d.view("v", base)) as root:
            assert (root / "etc/big").read_bytes() == bytes(range(256)) * 1024
        with snapshot_mounter(d.prepare("more", base)) as root:
            (root / "small").write_bytes(b"fits")
        assert dict(d.status())["Thin Pool Mode"] == "rw"
    finally:
        d.close()
    _ = (io, archive, mount)


def test_devmapper_daemon_run_diff_commit_export(make_daemon: Any, busybox_tar: Path) -> None:
    """A real palletd on devmapper: run, diff, commit, export (the host drivers' scenario)."""
    from tests.daemon_storage_scenario import scenario

    d = make_daemon(
        storage_driver="devmapper",
        extra=[
            "--storage-opt",
            "dm.loopdatasize=2GB",
            "--storage-opt",
            "dm.loopmetadatasize=64MB",
            "--storage-opt",
            "dm.basesize=256MB",
        ],
    )
    d.import_busybox(busybox_tar)
    scenario(d)
    _, info = d.api("GET", "/info")
    assert info["Driver"] == "devmapper"
    status = dict(info["DriverStatus"])
    assert status["Thin Pool Mode"] == "rw" and status["Backing Filesystem"] == "extfs"
