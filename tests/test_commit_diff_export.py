"""docker diff / commit / export through a real daemon, on every storage driver that
runs on this host (overlay, vfs, btrfs on a loop device). devmapper runs the same
scenario in the QEMU guest (tests/test_devmapper_guest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def test_info_shows_driver_status_and_skips(btrfs_daemon: Daemon) -> None:
    out = btrfs_daemon.cli("info").stdout
    assert "Storage Driver: btrfs" in out
    assert "Backing Filesystem: btrfs" in out
    # devmapper cannot work on this kernel (no device-mapper): pallet info says why
    _, info = btrfs_daemon.api("GET", "/info")
    report = {(r["Kind"], r["Name"]): r for r in info["PalletDrivers"]}
    dm = report[("storage", "devmapper")]
    if not os.path.exists("/dev/mapper/control"):
        assert dm["State"] == "skipped" and "device-mapper" in dm["Reason"]
    assert report[("storage", "btrfs")]["State"] == "selected"


def test_btrfs_refused_off_btrfs(make_daemon: Any) -> None:
    d = make_daemon(storage_driver="btrfs", start=False)
    with pytest.raises(RuntimeError, match="not btrfs"):
        d.start()


def test_switching_driver_over_a_store_is_refused(make_daemon: Any, busybox_tar: Path) -> None:
    d = make_daemon(storage_driver="vfs")
    d.import_busybox(busybox_tar)
    d.stop()
    d.args[d.args.index("--storage-driver") + 1] = "overlay"
    with pytest.raises(RuntimeError, match="already holds images and containers of the 'vfs'"):
        d.start()
    # without a configured driver, the one with state is taken
    i = d.args.index("--storage-driver")
    del d.args[i : i + 2]
    d.start()
    _, info = d.api("GET", "/info")
    assert info["Driver"] == "vfs" and info["Images"] == 1


@pytest.mark.parametrize("driver", ["vfs", "overlay"])
def test_kill_during_commit_leaves_no_half_layer(
    make_daemon: Any, busybox_tar: Path, driver: str
) -> None:
    """kill -9 in the middle of a commit: after a restart the image is either there whole
    or not at all, and no temporary snapshot, file or mount remains."""
    import signal
    import sqlite3
    import threading
    import time

    d = make_daemon(storage_driver=driver)
    d.import_busybox(busybox_tar)
    d.cli(
        "run",
        "--name",
        "big",
        "--network",
        "none",
        "busybox",
        "sh",
        "-c",
        "head -c 200000000 /dev/zero > /big; echo done > /marker",
    )
    answers: list[Any] = []

    def commit() -> None:
        try:
            answers.append(d.api("POST", "/commit?container=big&repo=half&tag=t"))
        except Exception as e:
            answers.append(e)

    t = threading.Thread(target=commit)
    t.start()
    time.sleep(0.7)
    d.stop(signal.SIGKILL)
    t.join()
    d.start()
    _, images = d.api("GET", "/images/json")
    tags = {t for i in images for t in i["RepoTags"] or []}
    if "half:t" in tags:  # the commit won the race: then it is whole
        r = d.cli("run", "--rm", "--network", "none", "half:t", "cat", "/marker")
        assert r.stdout == "done\n"
    else:
        assert len(images) == 1
    db = sqlite3.connect(d.data_root / driver / "metadata.db")
    keys = [k for (k,) in db.execute("SELECT key FROM snapshots")]
    db.close()
    assert not [k for k in keys if k.startswith("tmp-")], keys
    scratch = d.data_root / "image" / driver / "tmp"
    assert not list(scratch.iterdir()), list(scratch.iterdir())
    # and the container is still there, committable
    code, res = d.api("POST", "/commit?container=big&repo=whole&tag=t")
    assert code == 201, res


def test_docker_cli_and_sdk_diff_commit_export(daemon: Daemon, tmp_path: Path) -> None:
    """The real docker CLI and the docker Python SDK against pallet."""
    import shutil
    import subprocess
    import tarfile

    docker_bin = shutil.which("docker") or "/usr/local/bin/docker"
    (tmp_path / "cfg").mkdir()
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "cfg"), "DOCKER_HOST": daemon.host}
    env.pop("DOCKER_CONTEXT", None)

    def docker(*args: str) -> str:
        r = subprocess.run([docker_bin, *args], capture_output=True, text=True, env=env)
        assert r.returncode == 0, f"docker {args}: {r.stderr}"
        return r.stdout

    docker("run", "--name", "dk", "--network", "none", "busybox", "sh", "-c", "echo v > /made")
    assert "A /made" in docker("diff", "dk").splitlines()
    image_id = docker("commit", "--change", "ENV FROM_DOCKER=1", "-m", "via docker", "dk", "dk:img")
    assert image_id.strip().startswith("sha256:")
    assert "FROM_DOCKER=1" in docker("inspect", "-f", "{{.Config.Env}}", "dk:img")
    docker("export", "-o", str(tmp_path / "dk.tar"), "dk")
    with tarfile.open(tmp_path / "dk.tar") as tf:
        assert "made" in {n.lstrip("./") for n in tf.getnames()}

    import docker as docker_sdk

    client = docker_sdk.DockerClient(base_url=daemon.host)
    try:
        c = client.containers.get("dk")
        assert {"Path": "/made", "Kind": 1} in c.diff()
        img = c.commit(repository="sdk", tag="v1", message="via sdk", author="sdk")
        assert img.attrs["Comment"] == "via sdk" and img.attrs["Author"] == "sdk"
        data = b"".join(c.export())
        assert len(data) > 1000
        client.images.remove("sdk:v1")
    finally:
        client.close()
    docker("rm", "dk")
    docker("rmi", "dk:img")
