"""docker diff / commit / export through a real daemon, on every storage driver that
runs on this host (overlay, vfs, btrfs on a loop device). devmapper runs the same
scenario in the QEMU guest (tests/test_devmapper_guest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pallet.testing.envs import btrfs_filesystem

from tests.conftest import Daemon
from tests.daemon_storage_scenario import scenario

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def test_diff_commit_export(daemon: Daemon) -> None:
    """overlay and vfs (the conftest's daemon fixture)."""
    scenario(daemon)


@pytest.fixture(scope="module")
def btrfs_daemon(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Iterator[Daemon]:
    with btrfs_filesystem(tmp_path_factory.mktemp("btrfs-fs"), 1 << 30) as fs:
        (fs / "palletd").mkdir()
        d = Daemon(fs / "palletd", "btrfs", [])
        d.start()
        try:
            d.import_busybox(busybox_tar)
            yield d
        finally:
            d.cleanup()
            import shutil

            shutil.rmtree(fs / "palletd", ignore_errors=True)


def test_diff_commit_export_btrfs(btrfs_daemon: Daemon) -> None:
    scenario(btrfs_daemon)
    _, info = btrfs_daemon.api("GET", "/info")
    assert info["Driver"] == "btrfs"
    status = dict(info["DriverStatus"])
    assert status["Backing Filesystem"] == "btrfs"
