"""Pull and push against a real registry (Debian's docker-registry on 127.0.0.1, plain
HTTP), with images written by skopeo/umoci and read back by skopeo; the docker CLI and
the pallet CLI as clients; corrupted blobs; a daemon killed mid-pull."""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.registry import Registry, SlowProxy, skopeo, start_registry, umoci_image

DOCKER = "/usr/local/bin/docker"


def _tar(entries: dict[str, bytes | None], path: Path) -> Path:
    """A layer tar: name -> content (None: a directory)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries.items():
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if data is None:
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                tf.addfile(ti)
            else:
                ti.size = len(data)
                ti.mode = 0o644
                tf.addfile(ti, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path, registry: Registry) -> Path:
    """An OCI layout written by umoci (busybox + a second layer), copied to the registry
    by skopeo as ``interop/bb:v1`` (OCI manifest) and ``interop/bb:docker`` (schema 2)."""
    d = tmp_path_factory.mktemp("umoci")
    plain = d / "busybox.tar"
    with open(busybox_tar, "rb") as src, open(plain, "wb") as dst:
        head = src.read(2)
        src.seek(0)
        if head == b"\x1f\x8b":
            dst.write(gzip.decompress(src.read()))
        else:
            shutil.copyfileobj(src, dst)
    extra = _tar({"etc/": None, "etc/motd": b"hello from umoci\n", "data/": None}, d / "extra.tar")
    lay = d / "layout"
    umoci_image(lay, "v1", [plain, extra], ["--config.cmd", "sh", "--config.env", "FOO=bar"])
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        f"oci:{lay}:v1",
        f"docker://{registry.host}/interop/bb:v1",
    )
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--format",
        "v2s2",
        f"oci:{lay}:v1",
        f"docker://{registry.host}/interop/bb:docker",
    )
    return lay


def _messages(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_pull_oci_and_run(daemon: Any, registry: Registry, layout: Path) -> None:
    ref = f"{registry.host}/interop/bb:v1"
    status, body = daemon.api("POST", f"/images/create?fromImage={registry.host}/interop/bb&tag=v1")
    assert status == 200, body
    msgs = body if isinstance(body, list) else _messages(body)
    statuses = [m.get("status", "") for m in msgs]
    assert any(s.startswith("Pulling from interop/bb") for s in statuses), statuses
    assert "Pull complete" in statuses and "Download complete" in statuses
    assert any(s.startswith("Digest: sha256:") for s in statuses)
    assert statuses[-1] == f"Status: Downloaded newer image for {ref}"
    assert not any("error" in m for m in msgs)
    inspect = json.loads(daemon.cli("inspect", ref).stdout)[0]
    assert inspect["RepoTags"] == [ref]
    assert inspect["RepoDigests"][0].startswith(f"{registry.host}/interop/bb@sha256:")
    assert len(inspect["RootFS"]["Layers"]) == 2
    assert inspect["Config"]["Env"] == ["FOO=bar"]
    out = daemon.cli("run", "--rm", ref, "cat", "/etc/motd").stdout
    assert out == "hello from umoci\n"
    # again: nothing to fetch
    status, body = daemon.api("POST", f"/images/create?fromImage={ref}")
    statuses = [m.get("status", "") for m in (body if isinstance(body, list) else _messages(body))]
    assert statuses[-1] == f"Status: Image is up to date for {ref}"
    assert "Pull complete" not in statuses


def test_pull_schema2_by_digest_shares_layers(
    daemon: Any, registry: Registry, layout: Path
) -> None:
    raw = skopeo(
        "inspect", "--tls-verify=false", "--raw", f"docker://{registry.host}/interop/bb:docker"
    )
    import hashlib

    digest = "sha256:" + hashlib.sha256(raw.encode()).hexdigest()
    assert json.loads(raw)["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    ref = f"{registry.host}/interop/bb@{digest}"
    r = daemon.cli("pull", ref)
    assert digest in r.stdout
    inspect = json.loads(daemon.cli("inspect", ref).stdout)[0]
    assert inspect["RepoDigests"] == [ref] or ref in inspect["RepoDigests"]
    # a wrong digest is refused by the registry or by pallet, never stored
    bad = f"{registry.host}/interop/bb@sha256:{'0' * 64}"
    r = daemon.cli("pull", bad, check=False)
    assert r.returncode != 0
    assert "not found" in r.stderr or "manifest unknown" in r.stderr, r.stderr


def test_docker_cli_pulls_through_pallet(daemon: Any, registry: Registry, layout: Path) -> None:
    env = {**os.environ, "DOCKER_HOST": daemon.host}
    r = subprocess.run(
        [DOCKER, "pull", f"{registry.host}/interop/bb:docker"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "Digest: sha256:" in r.stdout
    assert "Status: " in r.stdout
    r = subprocess.run(
        [
            DOCKER,
            "run",
            "--rm",
            "--network",
            "none",
            f"{registry.host}/interop/bb:v1",
            "cat",
            "/etc/motd",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from umoci\n"


def test_push_read_by_skopeo_and_pull_back(
    make_daemon: Any, daemon: Any, registry: Registry, tmp_path: Path
) -> None:
    name = f"{registry.host}/pallet/busybox:pushed"
    daemon.cli("tag", "busybox:latest", name)
    r = daemon.cli("push", name)
    assert "pushed: digest: sha256:" in r.stdout, r.stdout
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{name}"))
    assert info["Digest"].startswith("sha256:")
    assert len(info["Layers"]) == 1
    # skopeo can copy it out to an OCI layout and umoci can unpack it
    skopeo("copy", "--src-tls-verify=false", f"docker://{name}", f"oci:{tmp_path}/out:pushed")
    subprocess.run(
        ["umoci", "unpack", "--image", f"{tmp_path}/out:pushed", str(tmp_path / "bundle")],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "bundle/rootfs/bin/busybox").exists()
    # a second push: the blobs are there already
    r = daemon.cli("push", name)
    assert "Layer already exists" in r.stdout
    # cross-repository mount
    other = f"{registry.host}/pallet/other:v1"
    daemon.cli("tag", "busybox:latest", other)
    r = daemon.cli("push", other)
    assert "Mounted from pallet/busybox" in r.stdout, r.stdout
    for tmp in Path(daemon.data_root).glob("image/*/distribution/tmp"):
        assert list(tmp.iterdir()) == []
    # pulled back by a fresh daemon: the same image ID
    local_id = json.loads(daemon.cli("inspect", name).stdout)[0]["Id"]
    fresh = make_daemon(storage_driver="vfs")
    fresh.cli("pull", name)
    assert json.loads(fresh.cli("inspect", name).stdout)[0]["Id"] == local_id
    assert fresh.cli("run", "--rm", name, "echo", "ok").stdout == "ok\n"


def test_corrupted_blob_refused(
    make_daemon: Any, registry: Registry, layout: Path, tmp_path: Path
) -> None:
    """Flip bytes of a layer blob in the registry's storage: the pull fails naming the
    blob, and nothing of the image is stored."""
    lay = tmp_path / "lay"
    umoci_image(lay, "c", [_tar({"f": b"x" * 100_000}, tmp_path / "l.tar")])
    ref = f"{registry.host}/corrupt/img:c"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{lay}:c", f"docker://{ref}")
    man = json.loads(skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{ref}"))
    digest = man["layers"][0]["digest"]
    blob = registry.blob_path("corrupt/img", digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    d = make_daemon(storage_driver="overlay")
    r = d.cli("pull", ref, check=False)
    assert r.returncode != 0
    assert f"filesystem layer verification failed for digest {digest}" in r.stderr, r.stderr
    assert d.api("GET", "/images/json")[1] == []
    assert d.api("GET", "/_ping")[0] == 200
    root = Path(d.data_root) / "image" / "overlay"
    assert list((root / "distribution/tmp").iterdir()) == []
    assert list((root / "distribution/blobs/sha256").iterdir()) == []


def test_killed_mid_pull_cleaned_at_start(
    make_daemon: Any, registry: Registry, tmp_path: Path
) -> None:
    """SIGKILL the daemon while it downloads and unpacks a layer (served slowly through
    a proxy); the next start leaves no trace and the pull then completes."""
    lay = tmp_path / "lay"
    big: dict[str, bytes | None] = {f"d{i}/": None for i in range(20)}
    for i in range(3000):
        big[f"d{i % 20}/f{i}"] = os.urandom(1024)
    umoci_image(lay, "big", [_tar(big, tmp_path / "big.tar")])
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        f"oci:{lay}:big",
        f"docker://{registry.host}/killed/img:big",
    )
    proxy = SlowProxy(registry.port, rate=512 * 1024)
    ref = f"{proxy.host}/killed/img:big"
    try:
        d = make_daemon(storage_driver="overlay")
        conn = http.client.HTTPConnection("localhost", timeout=120)
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.connect(d.sock)
        conn.request("POST", f"/images/create?fromImage={proxy.host}/killed/img&tag=big")
        resp = conn.getresponse()
        assert resp.status == 200
        while line := resp.readline():
            if b"Extracting" in line:
                break
        d.stop(signal.SIGKILL)
        conn.close()
        # the unpacker child dies with the daemon (PDEATHSIG)
        d.start()
        root = Path(d.data_root) / "image" / "overlay"
        assert d.api("GET", "/images/json")[1] == []
        assert list((root / "distribution/tmp").iterdir()) == []
        assert list((root / "distribution/blobs/sha256").iterdir()) == []
        assert not list((Path(d.data_root) / "overlay").rglob("f2999"))
        d.cli("pull", ref)
        assert json.loads(d.cli("inspect", ref).stdout)[0]["RepoTags"] == [ref]
        assert len(list((Path(d.data_root) / "overlay").rglob("f2999"))) == 1
    finally:
        proxy.close()


def test_progress_messages_are_docker_jsonmessages(
    daemon: Any, registry: Registry, layout: Path
) -> None:
    """The stream the docker CLI draws its bars from: per-layer ids, progressDetail."""
    ref = f"{registry.host}/interop/bb"
    daemon.cli("rmi", f"{ref}:v1", check=False)
    daemon.cli("rmi", f"{ref}:docker", check=False)
    status, body = daemon.api("POST", f"/images/create?fromImage={ref}&tag=v1")
    assert status == 200
    msgs = body if isinstance(body, list) else _messages(body)
    layer_ids = {m["id"] for m in msgs if m.get("status") == "Pulling fs layer"}
    present = {m["id"] for m in msgs if m.get("status") == "Already exists"}
    # the busybox layer may be here already (the imported busybox has the same diff ID)
    assert len(layer_ids | present) == 2 and layer_ids and not layer_ids & present
    assert all(len(i) == 12 for i in layer_ids | present)
    downloading = [m for m in msgs if m.get("status") == "Downloading"]
    assert downloading, msgs
    for m in downloading:
        assert m["id"] in layer_ids
        assert 0 < m["progressDetail"]["current"] <= m["progressDetail"]["total"]
        assert m["progress"].startswith("[")
    for lid in layer_ids:
        order = [m["status"] for m in msgs if m.get("id") == lid]
        assert order[0] == "Pulling fs layer" and order[-1] == "Pull complete"
        assert "Download complete" in order and "Verifying Checksum" in order
    # the schema 2 copy shares both layers: nothing is fetched again
    status, body = daemon.api("POST", f"/images/create?fromImage={ref}&tag=docker")
    msgs = body if isinstance(body, list) else _messages(body)
    statuses = [m.get("status") for m in msgs]
    assert statuses.count("Already exists") == 2 and "Downloading" not in statuses


def test_concurrent_pulls_share_layers(
    make_daemon: Any, registry: Registry, tmp_path: Path
) -> None:
    lay = tmp_path / "lay"
    umoci_image(lay, "cc", [_tar({"shared-marker": b"s" * 50_000}, tmp_path / "s.tar")])
    ref = f"{registry.host}/concurrent/img:cc"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{lay}:cc", f"docker://{ref}")
    d = make_daemon(storage_driver="overlay")
    env = {**os.environ, "PALLET_HOST": d.host}
    procs = [
        subprocess.Popen(
            ["pallet", "pull", "-q", ref], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    for p in procs:
        _out, err = p.communicate()
        assert p.returncode == 0, err
    assert len(list((Path(d.data_root) / "overlay").rglob("shared-marker"))) == 1
    assert len(d.api("GET", "/images/json")[1]) == 1


def test_registry_mirror_serves_docker_hub_names(
    make_daemon: Any, registry: Registry, layout: Path
) -> None:
    """docker.io names go to the mirror first (nothing leaves the machine: the mirror
    has the image)."""
    skopeo(
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        f"docker://{registry.host}/interop/bb:v1",
        f"docker://{registry.host}/library/mirrored:v1",
    )
    d = make_daemon(storage_driver="vfs", start=False)
    (Path(d.data_root).parent / "daemon.json").write_text(
        json.dumps({"registry-mirrors": [f"http://{registry.host}"]})
    )
    d.start()
    r = d.cli("pull", "mirrored:v1")
    assert "Status: Downloaded newer image for mirrored:v1" in r.stdout
    info = json.loads(d.cli("inspect", "mirrored:v1").stdout)[0]
    assert info["RepoTags"] == ["mirrored:v1"]
    assert info["RepoDigests"][0].startswith("mirrored@sha256:")


def test_pull_all_tags(make_daemon: Any, registry: Registry, layout: Path) -> None:
    d = make_daemon(storage_driver="vfs")
    r = d.cli("pull", "-a", f"{registry.host}/interop/bb")
    assert r.stdout.count("Digest: sha256:") == 2
    tags = sorted(t for i in d.api("GET", "/images/json")[1] for t in i["RepoTags"])
    assert tags == [f"{registry.host}/interop/bb:docker", f"{registry.host}/interop/bb:v1"]


def test_push_committed_image(daemon: Any, make_daemon: Any, registry: Registry) -> None:
    """A layer pallet has no blob for (a commit) is written from its snapshot and pushed;
    the image pulled back runs with the change."""
    name = f"c-{uuid.uuid4().hex[:8]}"
    daemon.cli(
        "run",
        "--name",
        name,
        "--network",
        "none",
        "busybox",
        "sh",
        "-c",
        "echo committed > /c.txt; rm /bin/true",
    )
    ref = f"{registry.host}/pallet/committed:v1"
    daemon.cli("commit", name, ref)
    daemon.cli("rm", name)
    r = daemon.cli("push", ref)
    assert "v1: digest: sha256:" in r.stdout
    fresh = make_daemon(storage_driver="overlay")
    fresh.cli("pull", ref)
    out = fresh.cli(
        "run", "--rm", "--network", "none", ref, "sh", "-c", "cat /c.txt; ls /bin/true || echo gone"
    )
    assert out.stdout == "committed\ngone\n", out


def test_cli_progress_bars_on_a_tty(make_daemon: Any, registry: Registry, layout: Path) -> None:
    """On a terminal `pallet pull` redraws one line per layer (cursor movements, bars);
    piped, it prints plain lines."""
    import pty

    d = make_daemon(storage_driver="vfs")
    ref = f"{registry.host}/interop/bb:v1"
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        ["pallet", "pull", ref],
        env={**os.environ, "PALLET_HOST": d.host},
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait()
    os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, out
    assert "\x1b[2K" in out and "\x1b[1A" in out  # redrawn lines
    assert "Pull complete" in out and "Digest: sha256:" in out
    d.cli("rmi", ref)
    plain = d.cli("pull", ref).stdout
    assert "\x1b[" not in plain
    assert ": Pull complete" in plain


def test_client_going_away_cancels_the_pull(
    make_daemon: Any, registry: Registry, tmp_path: Path
) -> None:
    """Closing the connection mid-pull stops it: nothing stays, the daemon serves, and
    the pull then completes."""
    lay = tmp_path / "lay"
    files: dict[str, bytes | None] = {f"c{i}": os.urandom(4096) for i in range(400)}
    umoci_image(lay, "gone", [_tar(files, tmp_path / "gone.tar")])
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        f"oci:{lay}:gone",
        f"docker://{registry.host}/cancel/img:gone",
    )
    proxy = SlowProxy(registry.port, rate=64 * 1024)
    try:
        d = make_daemon(storage_driver="overlay")
        conn = http.client.HTTPConnection("localhost", timeout=120)
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.connect(d.sock)
        conn.request("POST", f"/images/create?fromImage={proxy.host}/cancel/img&tag=gone")
        resp = conn.getresponse()
        while line := resp.readline():
            if b"Downloading" in line:
                break
        conn.sock.shutdown(socket.SHUT_RDWR)  # the response's file object holds it open
        resp.close()
        conn.close()
        root = Path(d.data_root) / "image" / "overlay" / "distribution"
        while list((root / "tmp").iterdir()):  # the pull notices at its next progress line
            time.sleep(0.1)
        assert list((root / "tmp").iterdir()) == []
        assert d.api("GET", "/images/json")[1] == []
        d.cli("pull", f"{registry.host}/cancel/img:gone")
        assert len(d.api("GET", "/images/json")[1]) == 1
    finally:
        proxy.close()


def test_docker_sdk_pull_push_save_load(daemon: Any, registry: Registry, layout: Path) -> None:
    """The docker Python SDK drives pull, push, save and load unchanged."""
    import docker

    client = docker.DockerClient(base_url=daemon.host, version="1.44", timeout=120)
    try:
        img = client.images.pull(f"{registry.host}/interop/bb", tag="v1")
        assert f"{registry.host}/interop/bb:v1" in img.tags
        assert img.attrs["RootFS"]["Layers"] and img.attrs["RepoDigests"]
        img.tag(f"{registry.host}/sdk/pushed", tag="s1")
        lines = list(
            client.images.push(f"{registry.host}/sdk/pushed", tag="s1", stream=True, decode=True)
        )
        assert any("aux" in m and m["aux"]["Tag"] == "s1" for m in lines), lines
        assert not any("error" in m for m in lines)
        data = b"".join(img.save(named=True))
        client.images.remove(f"{registry.host}/sdk/pushed:s1")
        client.images.remove(f"{registry.host}/interop/bb:v1", force=True)
        loaded = client.images.load(data)
        assert loaded[0].id == img.id
        with pytest.raises(docker.errors.NotFound):
            client.images.pull(f"{registry.host}/interop/bb", tag="nope")
    finally:
        client.close()
