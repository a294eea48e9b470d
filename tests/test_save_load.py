"""save/load: docker-archive and OCI image layout, round trips with skopeo and umoci
both ways, the docker CLI through pallet, bad archives; history and image prune."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.registry import skopeo, umoci_image

DOCKER = "/usr/local/bin/docker"


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("palletd-saveload"), "overlay", [])
    d.start()
    try:
        d.import_busybox(busybox_tar)
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def plain_busybox(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Path:
    out = tmp_path_factory.mktemp("plain") / "busybox.tar"
    with open(busybox_tar, "rb") as src:
        data = src.read()
    out.write_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return out


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {
            m.name: (tf.extractfile(m).read() if m.isreg() else b"")  # type: ignore[union-attr]
            for m in tf.getmembers()
        }


def test_save_is_docker_archive_and_oci_layout(
    pd: Daemon, tmp_path: Path, make_daemon: object
) -> None:
    out = tmp_path / "bb.tar"
    pd.cli("save", "-o", str(out), "busybox:latest")
    files = _members(out)
    manifest = json.loads(files["manifest.json"])
    assert manifest[0]["RepoTags"] == ["busybox:latest"]
    local = json.loads(pd.cli("inspect", "busybox:latest").stdout)[0]
    assert manifest[0]["Config"] == f"blobs/sha256/{local['Id'].split(':')[1]}"
    assert [f"blobs/sha256/{d.split(':')[1]}" for d in local["RootFS"]["Layers"]] == manifest[0][
        "Layers"
    ]
    index = json.loads(files["index.json"])
    assert (
        index["manifests"][0]["annotations"]["io.containerd.image.name"]
        == "docker.io/library/busybox:latest"
    )
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    # skopeo reads it both ways
    info = json.loads(skopeo("inspect", f"docker-archive:{out}"))
    assert info["Layers"] == local["RootFS"]["Layers"]
    skopeo("copy", f"oci-archive:{out}:latest", f"oci:{tmp_path}/layout:bb")
    subprocess.run(
        ["umoci", "unpack", "--image", f"{tmp_path}/layout:bb", str(tmp_path / "bundle")],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "bundle/rootfs/bin/busybox").is_file()
    # loaded into a fresh daemon: the same image, runnable
    fresh = make_daemon(storage_driver="vfs")  # type: ignore[operator]
    r = fresh.cli("load", "-i", str(out))
    assert "Loaded image: busybox:latest" in r.stdout
    assert json.loads(fresh.cli("inspect", "busybox:latest").stdout)[0]["Id"] == local["Id"]
    assert (
        fresh.cli("run", "--rm", "--network", "none", "busybox", "echo", "loaded").stdout
        == "loaded\n"
    )
    # through the API as `docker save` streams it, by ID: no tags
    import http.client
    import socket

    c = http.client.HTTPConnection("localhost", timeout=120)
    c.sock = socket.socket(socket.AF_UNIX)
    c.sock.connect(pd.sock)
    c.request("GET", f"/images/{local['Id']}/get")
    resp = c.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "application/x-tar"
    by_id = tmp_path / "by-id.tar"
    by_id.write_bytes(resp.read())
    c.close()
    assert json.loads(_members(by_id)["manifest.json"])[0]["RepoTags"] is None
    with pytest.raises(AssertionError, match="No such image"):
        pd.cli("save", "-o", str(tmp_path / "x.tar"), "nosuchimage:v9")
    assert not (tmp_path / "x.tar").exists()


def test_load_skopeo_docker_archive_and_umoci_layout(
    pd: Daemon, tmp_path: Path, plain_busybox: Path
) -> None:
    extra = tmp_path / "extra.tar"
    with tarfile.open(extra, "w") as tf:
        data = b"from umoci\n"
        ti = tarfile.TarInfo("etc/umoci-was-here")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    lay = tmp_path / "layout"
    umoci_image(lay, "u1", [plain_busybox, extra], ["--config.cmd", "sh"])
    # skopeo writes a docker-archive
    da = tmp_path / "da.tar"
    skopeo("copy", f"oci:{lay}:u1", f"docker-archive:{da}:skopeo/made:v1")
    r = pd.cli("load", "-i", str(da))
    assert "Loaded image: skopeo/made:v1" in r.stdout
    out = pd.cli(
        "run", "--rm", "--network", "none", "skopeo/made:v1", "cat", "/etc/umoci-was-here"
    ).stdout
    assert out == "from umoci\n"
    # the umoci layout itself, tarred (an OCI image layout, gzip layers), named by annotation
    index = json.loads((lay / "index.json").read_text())
    index["manifests"][0].setdefault("annotations", {})["io.containerd.image.name"] = (
        "docker.io/umoci/made:u1"
    )
    (lay / "index.json").write_text(json.dumps(index))
    ot = tmp_path / "oci.tar"
    with tarfile.open(ot, "w") as tf:
        for p in sorted(lay.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(lay)), recursive=False)
    r = pd.cli("load", "-i", str(ot))
    assert "Loaded image: umoci/made:u1" in r.stdout
    out = pd.cli(
        "run", "--rm", "--network", "none", "umoci/made:u1", "cat", "/etc/umoci-was-here"
    ).stdout
    assert out == "from umoci\n"
    # loaded twice: layers shared, the tag moves without duplicates
    before = len(list((Path(pd.data_root) / "overlay").rglob("umoci-was-here")))
    pd.cli("load", "-i", str(da))
    assert len(list((Path(pd.data_root) / "overlay").rglob("umoci-was-here"))) == before


def test_docker_cli_save_load_through_pallet(pd: Daemon, tmp_path: Path) -> None:
    env = {**os.environ, "DOCKER_HOST": pd.host, "DOCKER_CONFIG": str(tmp_path / "dc")}
    out = tmp_path / "docker-saved.tar"
    r = subprocess.run(
        [DOCKER, "save", "-o", str(out), "busybox"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    pd.cli("tag", "busybox:latest", "roundtrip/bb:x")
    pd.cli("rmi", "roundtrip/bb:x")
    r = subprocess.run([DOCKER, "load", "-i", str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Loaded image: busybox:latest" in r.stdout


def test_bad_archives(pd: Daemon, tmp_path: Path, make_daemon: object) -> None:
    images_before = pd.api("GET", "/images/json")[1]
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(4096))
    r = pd.cli("load", "-i", str(garbage), check=False)
    assert r.returncode != 0 and "invalid image archive" in r.stderr
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tf:
        ti = tarfile.TarInfo("hello.txt")
        tf.addfile(ti, io.BytesIO(b""))
    r = pd.cli("load", "-i", str(empty), check=False)
    assert r.returncode != 0 and "neither manifest.json" in r.stderr
    # an OCI layout whose layer does not match its digest
    saved = tmp_path / "bb.tar"
    pd.cli("save", "-o", str(saved), "busybox:latest")
    files = _members(saved)
    index = json.loads(files["index.json"])
    man_path = "blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]
    layer_path = "blobs/sha256/" + json.loads(files[man_path])["layers"][0]["digest"].split(":")[1]
    files[layer_path] = files[layer_path][:-1024] + b"\0" * 1024 + b"x"
    del files["manifest.json"]  # the OCI path
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tf:
        for name, data in files.items():
            if name.endswith("/"):
                continue
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    # a daemon without the layer (one that has it never reads the blob, as in Docker)
    fresh = make_daemon(storage_driver="overlay")  # type: ignore[operator]
    r = fresh.cli("load", "-i", str(bad), check=False)
    assert r.returncode != 0 and "does not match its digest" in r.stderr, r.stderr
    assert fresh.api("GET", "/_ping")[0] == 200
    assert fresh.api("GET", "/images/json")[1] == []
    root = Path(fresh.data_root) / "image" / "overlay"
    assert list((root / "distribution/blobs/sha256").iterdir()) == []
    fresh.cli("load", "-i", str(saved))
    assert fresh.cli("run", "--rm", "--network", "none", "busybox", "true").returncode == 0
    assert pd.api("GET", "/images/json")[1] == images_before


def test_history_and_prune(pd: Daemon, busybox_tar: Path) -> None:
    r = pd.cli("history", "busybox:latest")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["IMAGE", "CREATED", "CREATED", "BY", "SIZE", "COMMENT"]
    status, hist = pd.api("GET", "/images/busybox:latest/history")
    assert status == 200 and hist[0]["Tags"] == ["busybox:latest"]
    # a dangling image: import, then move its tag away
    first = pd.cli("import", str(busybox_tar), "prune/me:v1").stdout.strip()
    pd.cli("import", "--change", 'CMD ["true"]', str(busybox_tar), "prune/me:v1")
    dangling = pd.api("GET", '/images/json?filters={"dangling":["true"]}')[1]
    assert first in [i["Id"] for i in dangling]
    r = pd.cli("image", "prune", "-f")
    assert f"deleted: {first}" in r.stdout and "Total reclaimed space" in r.stdout
    assert pd.api("GET", '/images/json?filters={"dangling":["true"]}')[1] == []
    assert pd.cli("inspect", "prune/me:v1").returncode == 0
    # -a: every image no container uses (busybox too); re-import after
    r = pd.cli("image", "prune", "-a", "-f")
    assert "prune/me:v1" in r.stdout or "deleted:" in r.stdout
    assert pd.api("GET", "/images/json")[1] == []
    pd.import_busybox(busybox_tar)
