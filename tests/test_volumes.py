"""Volumes and mounts on real containers: named volumes (create/ls/inspect/rm/prune,
created on demand, the image's content copied in), anonymous volumes, bind mounts,
--mount, --tmpfs; docker cp both ways; bad input refused without leftovers."""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import pytest

from tests.conftest import Daemon


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_volume_commands(daemon: Daemon) -> None:
    name = uniq("vol")
    assert daemon.cli("volume", "create", "--label", "a=b", name).stdout.strip() == name
    # creating again returns the same volume
    assert daemon.cli("volume", "create", name).stdout.strip() == name
    doc = json.loads(daemon.cli("volume", "inspect", name).stdout)[0]
    assert doc["Name"] == name and doc["Driver"] == "local" and doc["Labels"] == {"a": "b"}
    assert doc["Scope"] == "local" and Path(doc["Mountpoint"]).is_dir()
    ls = daemon.cli("volume", "ls").stdout.splitlines()
    assert ls[0].split() == ["DRIVER", "VOLUME", "NAME"]
    assert any(line.split() == ["local", name] for line in ls[1:])
    assert name in daemon.cli("volume", "ls", "-q", "-f", "label=a=b").stdout.split()
    assert name not in daemon.cli("volume", "ls", "-q", "-f", "label=a=c").stdout.split()
    daemon.cli("volume", "rm", name)
    assert not Path(doc["Mountpoint"]).exists()
    r = daemon.cli("volume", "inspect", name, check=False)
    assert r.returncode == 1 and f"get {name}: no such volume" in r.stderr
    r = daemon.cli("volume", "create", "bad/name", check=False)
    assert r.returncode == 1 and "includes invalid characters" in r.stderr


def test_named_volume_on_demand_persists_and_is_in_use(daemon: Daemon) -> None:
    name = uniq("data")
    r = daemon.cli(
        "run",
        "--rm",
        "-v",
        f"{name}:/data",
        "busybox",
        "sh",
        "-c",
        "echo hello > /data/f; ls /data",
    )
    assert r.stdout == "f\n"
    r = daemon.cli(
        "run",
        "--rm",
        "-v",
        f"{name}:/data:ro",
        "busybox",
        "sh",
        "-c",
        "cat /data/f; touch /data/g || echo ro",
    )
    assert r.stdout == "hello\nro\n"
    cid = daemon.cli("create", "-v", f"{name}:/data", "busybox", "true").stdout.strip()
    try:
        mounts = json.loads(daemon.cli("inspect", cid).stdout)[0]["Mounts"]
        assert mounts[0]["Type"] == "volume" and mounts[0]["Name"] == name
        assert mounts[0]["Destination"] == "/data" and mounts[0]["RW"] is True
        r = daemon.cli("volume", "rm", name, check=False)
        assert r.returncode == 1 and f"remove {name}: volume is in use - [{cid}]" in r.stderr
    finally:
        daemon.cli("rm", cid)
    daemon.cli("volume", "rm", name)


def test_volume_gets_image_content(daemon: Daemon) -> None:
    name = uniq("etc")
    r = daemon.cli("run", "--rm", "-v", f"{name}:/etc", "busybox", "cat", "/etc/passwd")
    assert "root:" in r.stdout
    mountpoint = json.loads(daemon.cli("volume", "inspect", name).stdout)[0]["Mountpoint"]
    assert (Path(mountpoint) / "passwd").exists()
    # nocopy: stays empty
    empty = uniq("empty")
    r = daemon.cli("run", "--rm", "-v", f"{empty}:/etc:nocopy", "busybox", "ls", "-A", "/etc")
    assert "passwd" not in r.stdout.split()  # only the mount points of /etc/hosts & co.
    daemon.cli("volume", "rm", name, empty)


def test_anonymous_volume_and_rm_v_and_prune(daemon: Daemon) -> None:
    cid = daemon.cli("create", "-v", "/scratch", "busybox", "true").stdout.strip()
    mounts = json.loads(daemon.cli("inspect", cid).stdout)[0]["Mounts"]
    anon = mounts[0]["Name"]
    assert len(anon) == 64
    daemon.cli("rm", "-v", cid)
    assert anon not in daemon.cli("volume", "ls", "-q").stdout.split()
    cid = daemon.cli("create", "-v", "/scratch", "busybox", "true").stdout.strip()
    anon = json.loads(daemon.cli("inspect", cid).stdout)[0]["Mounts"][0]["Name"]
    named = uniq("keep")
    daemon.cli("volume", "create", named)
    daemon.cli("rm", cid)  # without -v the volume stays
    assert anon in daemon.cli("volume", "ls", "-q").stdout.split()
    r = daemon.cli("volume", "prune", "-f")
    assert anon in r.stdout and named not in r.stdout  # anonymous only by default
    r = daemon.cli("volume", "prune", "-f", "-a", "--filter", f"name={named}")
    assert named in r.stdout
    assert named not in daemon.cli("volume", "ls", "-q").stdout.split()


def test_bind_mounts(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("from host\n")
    r = daemon.cli(
        "run",
        "--rm",
        "-v",
        f"{tmp_path}:/host",
        "busybox",
        "sh",
        "-c",
        "cat /host/in.txt; echo out > /host/out.txt",
    )
    assert r.stdout == "from host\n"
    assert (tmp_path / "out.txt").read_text() == "out\n"
    r = daemon.cli(
        "run",
        "--rm",
        "-v",
        f"{tmp_path}:/host:ro",
        "busybox",
        "sh",
        "-c",
        "touch /host/x || echo refused",
    )
    assert "refused" in r.stdout and not (tmp_path / "x").exists()
    # a single file, and --mount
    r = daemon.cli(
        "run",
        "--rm",
        "--mount",
        f"type=bind,source={tmp_path}/in.txt,target=/f,ro",
        "busybox",
        "cat",
        "/f",
    )
    assert r.stdout == "from host\n"
    # -v creates a missing host directory, as docker does
    missing = tmp_path / "made" / "here"
    daemon.cli("run", "--rm", "-v", f"{missing}:/m", "busybox", "true")
    assert missing.is_dir()


def test_mount_tmpfs_and_volume(daemon: Daemon) -> None:
    name = uniq("mv")
    r = daemon.cli(
        "run",
        "--rm",
        "--mount",
        "type=tmpfs,target=/t,tmpfs-size=1048576",
        "--mount",
        f"type=volume,source={name},target=/v",
        "busybox",
        "sh",
        "-c",
        "grep ' /t ' /proc/mounts; touch /v/ok && echo ok",
    )
    assert "tmpfs /t tmpfs" in r.stdout and "size=1024k" in r.stdout and "ok" in r.stdout
    daemon.cli("volume", "rm", name)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--mount", "type=bind,source=/nonexistent-pallet,target=/x"],
            'invalid mount config for type "bind": bind source path does not exist: /nonexistent-pallet',
        ),
        (["-v", "rel/path:/x"], '"rel/path" includes invalid characters for a local volume name'),
        (["-v", "/tmp:relative"], "mount path must be absolute"),
        (["-v", "/tmp:/x:bogus"], "invalid mode: bogus"),
        (["-v", "/tmp:/x", "-v", "/var:/x"], "Duplicate mount point: /x"),
        (["--mount", "type=nfs,target=/x"], 'mount type unknown: "nfs"'),
        (["--mount", "type=tmpfs,source=a,target=/x"], "field Source must not be specified"),
    ],
)
def test_bad_mounts(daemon: Daemon, flags: list[str], message: str) -> None:
    before = set(daemon.cli("volume", "ls", "-q").stdout.split())
    before_c = set(daemon.cli("ps", "-aq").stdout.split())
    r = daemon.cli("create", *flags, "busybox", "true", check=False)
    assert r.returncode == 125 and message in r.stderr, r
    assert set(daemon.cli("volume", "ls", "-q").stdout.split()) == before
    assert set(daemon.cli("ps", "-aq").stdout.split()) == before_c


def test_cp_both_ways(daemon: Daemon, tmp_path: Path) -> None:
    cid = daemon.cli(
        "run",
        "-d",
        "busybox",
        "sh",
        "-c",
        "mkdir -p /work/sub; echo a > /work/a; echo b > /work/sub/b; sleep 60",
    ).stdout.strip()
    try:
        import time

        deadline = time.monotonic() + 30
        while daemon.cli("exec", cid, "test", "-f", "/work/sub/b", check=False).returncode:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # container -> host: a directory into an existing directory
        r = daemon.cli("cp", f"{cid}:/work", str(tmp_path))
        assert (tmp_path / "work" / "a").read_text() == "a\n"
        assert (tmp_path / "work" / "sub" / "b").read_text() == "b\n"
        assert "Successfully copied" in r.stderr
        # a file to a new name
        daemon.cli("cp", f"{cid}:/work/a", str(tmp_path / "renamed"))
        assert (tmp_path / "renamed").read_text() == "a\n"
        # host -> container: a file into a directory, a directory to a new name
        (tmp_path / "up.txt").write_text("up\n")
        daemon.cli("cp", str(tmp_path / "up.txt"), f"{cid}:/work/")
        daemon.cli("cp", str(tmp_path / "work"), f"{cid}:/copy")
        r = daemon.cli(
            "exec", cid, "sh", "-c", "cat /work/up.txt /copy/sub/b; stat -c %u /work/up.txt"
        )
        assert r.stdout == "up\nb\n0\n"
        # missing paths
        r = daemon.cli("cp", f"{cid}:/nope", str(tmp_path), check=False)
        assert r.returncode == 1 and "Could not find the file /nope in container" in r.stderr
        # the API: HEAD stat header, GET tar
        status, _ = daemon.api("HEAD", f"/containers/{cid}/archive?path=/work/a")
        assert status == 200
    finally:
        daemon.cli("rm", "-f", cid)


def test_cp_stopped_container_and_put_api(daemon: Daemon) -> None:
    cid = daemon.cli("create", "busybox", "true").stdout.strip()
    try:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            data = b"put via api\n"
            ti = tarfile.TarInfo("put.txt")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        import http.client
        import socket

        class Conn(http.client.HTTPConnection):
            def connect(conn) -> None:
                conn.sock = socket.socket(socket.AF_UNIX)
                conn.sock.connect(daemon.sock)

        c = Conn("localhost", timeout=60)
        c.request(
            "PUT",
            f"/containers/{cid}/archive?path=/tmp",
            body=buf.getvalue(),
            headers={"Content-Type": "application/x-tar"},
        )
        resp = c.getresponse()
        resp.read()
        assert resp.status == 200
        c.request("GET", f"/containers/{cid}/archive?path=/tmp/put.txt")
        resp = c.getresponse()
        body = resp.read()
        assert resp.status == 200
        stat = json.loads(
            __import__("base64").b64decode(resp.getheader("X-Docker-Container-Path-Stat"))
        )
        assert stat["name"] == "put.txt" and stat["size"] == 12
        with tarfile.open(fileobj=io.BytesIO(body)) as tf:
            f = tf.extractfile("put.txt")
            assert f is not None and f.read() == b"put via api\n"
        c.request("PUT", f"/containers/{cid}/archive?path=/etc/passwd", body=buf.getvalue())
        resp = c.getresponse()
        assert resp.status == 400 and b"not a directory" in resp.read()
        c.close()
    finally:
        daemon.cli("rm", cid)
    assert not [m for m in open("/proc/self/mountinfo") if str(daemon.exec_root) + "/archive" in m]
    _ = os


def test_failed_create_leaves_no_anonymous_volume(daemon: Daemon) -> None:
    before = set(daemon.cli("volume", "ls", "-q").stdout.split())
    r = daemon.cli(
        "create", "-v", "/anon", "--network", "no-such-net-pallet", "busybox", "true", check=False
    )
    assert r.returncode != 0 and "no-such-net-pallet" in r.stderr
    assert set(daemon.cli("volume", "ls", "-q").stdout.split()) == before


def test_cp_into_symlink_stays_in_the_container(daemon: Daemon, tmp_path: Path) -> None:
    """A symlink in the container naming a host path is resolved in the container's
    root: docker cp never writes to the host through it."""
    host_dir = Path("/") / uniq("pallet-escape")
    host_dir.mkdir()
    try:
        cid = daemon.cli(
            "run",
            "-d",
            "busybox",
            "sh",
            "-c",
            f"ln -s {host_dir} /tmp/evil; mkdir -p /inside; ln -s /inside /tmp/good; sleep 60",
        ).stdout.strip()
        try:
            (tmp_path / "payload").write_text("x\n")
            import time

            deadline = time.monotonic() + 30
            while daemon.cli("exec", cid, "test", "-L", "/tmp/good", check=False).returncode:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            r = daemon.cli("cp", str(tmp_path / "payload"), f"{cid}:/tmp/evil/", check=False)
            assert r.returncode != 0
            assert list(host_dir.iterdir()) == []
            # the daemon on its own (a client that does not follow links itself)
            import http.client
            import io
            import socket
            import tarfile

            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tf:
                tf.add(str(tmp_path / "payload"), arcname="payload")

            class Conn(http.client.HTTPConnection):
                def connect(conn) -> None:
                    conn.sock = socket.socket(socket.AF_UNIX)
                    conn.sock.connect(daemon.sock)

            c = Conn("localhost", timeout=60)
            c.request("PUT", f"/containers/{cid}/archive?path=/tmp/evil", body=buf.getvalue())
            resp = c.getresponse()
            assert resp.status == 404, resp.read()
            c.close()
            assert list(host_dir.iterdir()) == []
            daemon.cli("cp", str(tmp_path / "payload"), f"{cid}:/tmp/good/")
            assert daemon.cli("exec", cid, "cat", "/inside/payload").stdout == "x\n"
            assert list(host_dir.iterdir()) == []
        finally:
            daemon.cli("rm", "-f", cid)
    finally:
        for p in host_dir.iterdir():
            p.unlink()
        host_dir.rmdir()


def test_volume_with_mount_options(daemon: Daemon, tmp_path: Path) -> None:
    """The local driver's options: a tmpfs volume, and a bind of a host directory;
    mounted while a container uses them."""
    tmp_vol, bind_vol = uniq("tmpfsvol"), uniq("bindvol")
    daemon.cli(
        "volume", "create", "-o", "type=tmpfs", "-o", "device=tmpfs", "-o", "o=size=2m", tmp_vol
    )
    (tmp_path / "hostfile").write_text("on the host\n")
    daemon.cli(
        "volume",
        "create",
        "-o",
        "type=none",
        "-o",
        f"device={tmp_path}",
        "-o",
        "o=bind",
        bind_vol,
    )
    r = daemon.cli(
        "run",
        "--rm",
        "-v",
        f"{tmp_vol}:/t",
        "-v",
        f"{bind_vol}:/b",
        "busybox",
        "sh",
        "-c",
        "grep ' /t ' /proc/mounts; cat /b/hostfile; echo new > /b/fromctr",
    )
    assert "tmpfs" in r.stdout and "size=2048k" in r.stdout and "on the host" in r.stdout
    assert (tmp_path / "fromctr").read_text() == "new\n"
    mountpoint = json.loads(daemon.cli("volume", "inspect", tmp_vol).stdout)[0]["Mountpoint"]
    assert not [line for line in open("/proc/self/mountinfo") if f" {mountpoint} " in line]
    daemon.cli("volume", "rm", tmp_vol, bind_vol)
    r = daemon.cli("volume", "create", "-o", "type=tmpfs", uniq("bad"), check=False)
    assert r.returncode == 1 and 'missing required option: "device"' in r.stderr
    r = daemon.cli("volume", "create", "-o", "size=1", uniq("bad"), check=False)
    assert r.returncode == 1 and "invalid option: 'size'" in r.stderr
