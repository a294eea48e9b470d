"""The Docker Engine API against a real daemon, with real containers, on overlay and vfs.

Driven by the docker Python SDK (a real client) and by raw HTTP where the bytes on the
wire are the point (hijack, headers flushed early, malformed requests).
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import docker
import pytest
from docker.errors import APIError, ImageNotFound, NotFound

from .conftest import Daemon


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Any:
    c = docker.DockerClient(base_url=daemon.host, version="1.44", timeout=120)
    yield c
    for ctr in c.containers.list(all=True):
        ctr.remove(force=True)
    c.close()


def raw(
    daemon: Daemon, request: bytes, read_until: bytes = b"\r\n\r\n", timeout: float = 30
) -> tuple[socket.socket, bytes]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(daemon.sock)
    s.sendall(request)
    data = b""
    while read_until not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return s, data


def read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def demux(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {1: b"", 2: b""}
    while len(data) >= 8:
        stream, size = data[0], int.from_bytes(data[4:8], "big")
        out[stream] = out.get(stream, b"") + data[8 : 8 + size]
        data = data[8 + size :]
    assert data == b"", "trailing bytes that are not a whole frame"
    return out


# --- system ------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/v1.44", "/v1.24"])
def test_ping_headers_with_and_without_version(daemon: Daemon, prefix: str) -> None:
    for method in ("GET", "HEAD"):
        s, data = raw(daemon, f"{method} {prefix}/_ping HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.close()
        head = data.split(b"\r\n\r\n")[0].decode()
        assert head.startswith("HTTP/1.1 200")
        assert "Api-Version: 1.44" in head
        assert "Ostype: linux" in head
        assert "Server: pallet/" in head


def test_version_limits(daemon: Daemon) -> None:
    status, body = daemon.api("GET", "/v1.12/version")
    assert status == 400 and "too old" in body["message"] and "1.24" in body["message"]
    status, body = daemon.api("GET", "/v1.99/version")
    assert status == 400 and "too new" in body["message"]
    status, body = daemon.api("GET", "/version")
    assert status == 200 and body["ApiVersion"] == "1.44" and body["MinAPIVersion"] == "1.24"


def test_info(client: Any, daemon: Daemon) -> None:
    info = client.info()
    assert info["Driver"] in ("overlay", "vfs")
    assert info["OSType"] == "linux"
    assert info["DockerRootDir"] == str(daemon.data_root)
    assert "native" in info["Runtimes"]


def test_unknown_route_and_bad_json_keep_daemon_serving(daemon: Daemon) -> None:
    status, body = daemon.api("GET", "/nope")
    assert status == 404 and body["message"] == "page not found"
    s, data = raw(
        daemon,
        b"POST /containers/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 9\r\n\r\n{not json",
    )
    s.close()
    assert data.startswith(b"HTTP/1.1 400")
    s, data = raw(daemon, b"GARBAGE\r\n\r\n")
    s.close()
    assert data.startswith(b"HTTP/1.1 400")
    status, _ = daemon.api("GET", "/_ping")
    assert status == 200


def test_wrong_types_in_body_name_the_field(daemon: Daemon) -> None:
    status, body = daemon.api("POST", "/containers/create", {"Image": "busybox", "Env": "A=1"})
    assert status == 400 and "Env" in body["message"]
    status, body = daemon.api(
        "POST",
        "/containers/create",
        {"Image": "busybox", "Cmd": ["true"], "HostConfig": {"Memory": -1}},
    )
    assert status == 400 and "HostConfig.Memory" in body["message"]


def test_unknowns_give_dockers_messages(daemon: Daemon, client: Any) -> None:
    for method, path in [
        ("GET", "/containers/nosuch/json"),
        ("POST", "/containers/nosuch/start"),
        ("POST", "/containers/nosuch/stop"),
        ("POST", "/containers/nosuch/kill"),
        ("POST", "/containers/nosuch/wait"),
        ("GET", "/containers/nosuch/logs?stdout=1"),
        ("DELETE", "/containers/nosuch"),
    ]:
        status, body = daemon.api(method, path)
        assert status == 404, (method, path, body)
        assert body["message"] == "No such container: nosuch"
    status, body = daemon.api("POST", "/containers/create", {"Image": "nosuch", "Cmd": ["true"]})
    assert status == 404 and "No such image" in body["message"]
    with pytest.raises(ImageNotFound):
        client.images.get("nosuch:latest")
    status, body = daemon.api("DELETE", "/images/nosuch")
    assert status == 404 and "No such image" in body["message"]
    status, body = daemon.api(
        "POST", "/containers/create", {"Image": "busybox", "HostConfig": {"Runtime": "nope"}}
    )
    assert status == 400 and "unknown or invalid runtime name: nope" in body["message"]


# --- containers -----------------------------------------------------------------------


def test_run_echo(client: Any) -> None:
    assert client.containers.run("busybox", ["echo", "hi"], remove=True) == b"hi\n"


@pytest.mark.parametrize("code", [0, 1, 3, 255])
def test_exit_codes(client: Any, code: int) -> None:
    c = client.containers.run("busybox", ["sh", "-c", f"exit {code}"], detach=True)
    assert c.wait(timeout=60)["StatusCode"] == code
    c.reload()
    assert c.attrs["State"]["ExitCode"] == code and c.status == "exited"
    c.remove()


def test_env_workdir_user_hostname_pid1(client: Any) -> None:
    script = 'echo "$FOO|$(pwd)|$(id -u):$(id -g)|$(hostname)|$$|$HOME"'
    out = client.containers.run(
        "busybox",
        ["sh", "-c", script],
        environment=["FOO=bar"],
        working_dir="/tmp/newdir",
        user="nobody",
        hostname="boxy",
        remove=True,
    )
    assert out.decode().strip() == "bar|/tmp/newdir|65534:65534|boxy|1|/home"


def test_default_hostname_is_short_id_and_image_cmd(client: Any) -> None:
    c = client.containers.create("busybox", ["hostname"])
    c.start()
    c.wait(timeout=60)
    assert c.logs() == c.id[:12].encode() + b"\n"
    assert c.attrs["Config"]["Cmd"] == ["hostname"]
    c.remove()
    # No command given: the image's CMD (sh) runs and exits at once without stdin.
    c = client.containers.run("busybox", detach=True)
    assert c.wait(timeout=60)["StatusCode"] == 0
    assert c.attrs["Path"] == "sh"
    c.remove()


def test_only_container_processes_and_loopback(client: Any) -> None:
    out = client.containers.run(
        "busybox",
        ["sh", "-c", "ls /proc | grep -c '^[0-9]'; ls /sys/class/net"],
        remove=True,
        network_mode="none",  # the default bridge would add eth0 (tests/test_network.py)
    )
    count, *ifaces = out.decode().split()
    assert int(count) <= 3  # sh, ls, grep
    assert ifaces == ["lo"]


def test_logs_streams_tail_timestamps(client: Any) -> None:
    c = client.containers.run(
        "busybox", ["sh", "-c", "echo out1; echo err1 >&2; echo out2"], detach=True
    )
    c.wait(timeout=60)
    assert c.logs(stdout=True, stderr=False) == b"out1\nout2\n"
    assert c.logs(stdout=False, stderr=True) == b"err1\n"
    assert c.logs(tail=1, stderr=False) == b"out2\n"
    stamped = c.logs(timestamps=True, stderr=False).decode().splitlines()
    assert len(stamped) == 2 and stamped[0].endswith(" out1") and stamped[0][:4].isdigit()
    assert "Z " in stamped[0]
    c.remove()


def test_logs_follow_until_exit(client: Any) -> None:
    c = client.containers.run(
        "busybox", ["sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.2; done"], detach=True
    )
    lines = b"".join(c.logs(stream=True, follow=True))
    assert lines == b"1\n2\n3\n"
    c.remove()


def test_logs_need_a_stream(daemon: Daemon, client: Any) -> None:
    c = client.containers.create("busybox", ["true"])
    status, body = daemon.api("GET", f"/containers/{c.id}/logs")
    assert status == 400 and "you must choose at least one stream" in body["message"]
    c.remove()


def test_stop_signal_then_kill_after_timeout(client: Any) -> None:
    # pid 1 ignores SIGTERM without a handler: stop must fall back to SIGKILL.
    c = client.containers.run("busybox", ["sleep", "60"], detach=True)
    t0 = time.monotonic()
    c.stop(timeout=1)
    elapsed = time.monotonic() - t0
    c.reload()
    assert c.attrs["State"]["ExitCode"] == 137
    assert elapsed >= 1.0
    # A process that handles SIGTERM exits on it.
    c2 = client.containers.run(
        "busybox", ["sh", "-c", "trap 'exit 7' TERM; while true; do sleep 0.1; done"], detach=True
    )
    time.sleep(0.3)
    c2.stop(timeout=30)
    c2.reload()
    assert c2.attrs["State"]["ExitCode"] == 7
    for x in (c, c2):
        x.remove()


def test_kill_with_signal_and_not_running(client: Any, daemon: Daemon) -> None:
    c = client.containers.run("busybox", ["sleep", "60"], detach=True)
    c.kill(signal="SIGKILL")
    assert c.wait(timeout=60)["StatusCode"] == 137
    status, body = daemon.api("POST", f"/containers/{c.id}/kill")
    assert status == 409 and "is not running" in body["message"]
    c2 = client.containers.run("busybox", ["sleep", "60"], detach=True)
    status, body = daemon.api("POST", f"/containers/{c2.id}/kill?signal=NOPE")
    assert status == 400 and "Invalid signal: NOPE" in body["message"]
    c2.kill(signal="TERM")  # pid 1 without handler: ignored
    time.sleep(0.3)
    c2.reload()
    assert c2.status == "running"
    c2.remove(force=True)
    c.remove()


def test_start_twice_and_stop_stopped(daemon: Daemon, client: Any) -> None:
    c = client.containers.run("busybox", ["sleep", "60"], detach=True)
    status, _ = daemon.api("POST", f"/containers/{c.id}/start")
    assert status == 304
    c.kill()
    c.wait(timeout=60)
    status, _ = daemon.api("POST", f"/containers/{c.id}/stop")
    assert status == 304
    c.remove()


def test_remove_running_needs_force(client: Any) -> None:
    c = client.containers.run("busybox", ["sleep", "60"], detach=True)
    with pytest.raises(APIError) as err:
        c.remove()
    assert err.value.status_code == 409 and "You cannot remove a running container" in str(
        err.value
    )
    c.remove(force=True)
    with pytest.raises(NotFound):
        client.containers.get(c.id)


def test_names_and_lookup(client: Any, daemon: Daemon) -> None:
    c = client.containers.create("busybox", ["true"], name="named-one")
    assert client.containers.get("named-one").id == c.id
    assert client.containers.get(c.id[:10]).id == c.id
    with pytest.raises(APIError) as err:
        client.containers.create("busybox", ["true"], name="named-one")
    assert (
        err.value.status_code == 409
        and 'The container name "/named-one" is already in use' in str(err.value)
    )
    status, body = daemon.api(
        "POST", "/containers/create?name=bad%20name", {"Image": "busybox", "Cmd": ["true"]}
    )
    assert status == 400 and "Invalid container name" in body["message"]
    c.remove()


def test_list_all_and_filters(client: Any) -> None:
    running = client.containers.run("busybox", ["sleep", "60"], detach=True, name="lister-run")
    done = client.containers.run("busybox", ["true"], detach=True, name="lister-done")
    done.wait(timeout=60)
    ids = [c.id for c in client.containers.list()]
    assert running.id in ids and done.id not in ids
    ids = [c.id for c in client.containers.list(all=True)]
    assert running.id in ids and done.id in ids
    assert [c.id for c in client.containers.list(all=True, filters={"name": "lister-done"})] == [
        done.id
    ]
    assert [
        c.id
        for c in client.containers.list(all=True, filters={"status": "exited", "name": "lister"})
    ] == [done.id]
    assert [c.id for c in client.containers.list(all=True, filters={"id": running.id[:12]})] == [
        running.id
    ]
    summary = client.api.containers(all=True, filters={"id": done.id})[0]
    assert summary["Names"] == ["/lister-done"] and summary["Command"] == "true"
    assert summary["Status"].startswith("Exited (0)")
    running.remove(force=True)
    done.remove()


def test_auto_remove(client: Any, daemon: Daemon) -> None:
    c = client.containers.run("busybox", ["true"], detach=True, auto_remove=True)
    status, _ = daemon.api("POST", f"/containers/{c.id}/wait?condition=removed")
    assert status in (200, 404)
    time.sleep(0.1)
    with pytest.raises(NotFound):
        client.containers.get(c.id)


def test_missing_executable(client: Any, daemon: Daemon) -> None:
    c = client.containers.create("busybox", ["nosuchcmd"])
    with pytest.raises(APIError) as err:
        c.start()
    assert 'exec: "nosuchcmd": executable file not found in $PATH' in str(err.value)
    c.reload()
    assert c.attrs["State"]["ExitCode"] == 127
    c.remove()
    status, _ = daemon.api("GET", "/_ping")
    assert status == 200


# --- the wire: wait and attach ------------------------------------------------------------


def test_wait_sends_headers_before_exit_and_attach_hijacks(daemon: Daemon) -> None:
    status, body = daemon.api(
        "POST",
        "/containers/create",
        {
            "Image": "busybox",
            "Cmd": ["sh", "-c", "echo to-out; echo to-err >&2; exit 5"],
            "AttachStdout": True,
            "AttachStderr": True,
        },
    )
    assert status == 201, body
    cid = body["Id"]
    att, head = raw(
        daemon,
        f"POST /v1.44/containers/{cid}/attach?stream=1&stdout=1&stderr=1 HTTP/1.1\r\nHost: x\r\n"
        "Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n".encode(),
    )
    assert head.startswith(b"HTTP/1.1 101 UPGRADED\r\n")
    assert b"Content-Type: application/vnd.docker.multiplexed-stream" in head
    rest_of_attach = head.split(b"\r\n\r\n", 1)[1]
    wait, whead = raw(
        daemon,
        f"POST /containers/{cid}/wait?condition=next-exit HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    # Headers arrive while the container has not even started.
    assert whead.startswith(b"HTTP/1.1 200")
    status, _ = daemon.api("POST", f"/containers/{cid}/start")
    assert status == 204
    wait_body = whead.split(b"\r\n\r\n", 1)[1] + read_all(wait)
    # chunked: size line, JSON, terminator
    assert b'"StatusCode": 5' in wait_body or b'"StatusCode":5' in wait_body
    frames = demux(rest_of_attach + read_all(att))
    assert frames[1] == b"to-out\n" and frames[2] == b"to-err\n"
    att.close()
    wait.close()
    daemon.api("DELETE", f"/containers/{cid}")


def test_attach_stdin_round_trip(daemon: Daemon) -> None:
    status, body = daemon.api(
        "POST",
        "/containers/create",
        {
            "Image": "busybox",
            "Cmd": ["cat"],
            "OpenStdin": True,
            "StdinOnce": True,
            "AttachStdin": True,
        },
    )
    cid = body["Id"]
    att, head = raw(
        daemon,
        f"POST /containers/{cid}/attach?stream=1&stdin=1&stdout=1&stderr=1 HTTP/1.1\r\nHost: x\r\n"
        "Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n".encode(),
    )
    assert head.startswith(b"HTTP/1.1 101")
    att.sendall(b"hello through stdin\n")  # before start: must not be lost
    status, _ = daemon.api("POST", f"/containers/{cid}/start")
    assert status == 204
    att.shutdown(socket.SHUT_WR)  # half-close: output must still come back
    frames = demux(head.split(b"\r\n\r\n", 1)[1] + read_all(att))
    assert frames[1] == b"hello through stdin\n"
    att.close()
    status, body = daemon.api("POST", f"/containers/{cid}/wait")
    assert body["StatusCode"] == 0
    daemon.api("DELETE", f"/containers/{cid}")


# --- images -------------------------------------------------------------------------------


def test_images_list_inspect_tag_delete(client: Any, daemon: Daemon) -> None:
    img = client.images.get("busybox")
    assert "busybox:latest" in img.tags
    assert img.attrs["RootFS"]["Type"] == "layers" and len(img.attrs["RootFS"]["Layers"]) == 1
    assert img.attrs["Config"]["Cmd"] == ["sh"]
    img.tag("mybox", "v1")
    assert "mybox:v1" in client.images.get("busybox").tags
    assert any("mybox:v1" in i.tags for i in client.images.list())
    # In use by a container: removing the last tag by ID is refused.
    c = client.containers.create("mybox:v1", ["true"])
    result = client.api.remove_image("mybox:v1")
    assert {"Untagged": "mybox:v1"} in result
    with pytest.raises(APIError) as err:
        client.api.remove_image(img.id)
    assert err.value.status_code == 409
    c.remove()
    status, body = daemon.api("POST", f"/images/{img.id}/tag?repo=Bad_Upper")
    assert status == 400 and "invalid reference format" in body["message"]


def test_import_via_api_streams_status(daemon: Daemon, busybox_tar: Any) -> None:
    data = busybox_tar.read_bytes()
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.sock)
    s.sendall(
        b"POST /images/create?fromSrc=-&repo=imported&tag=t1&changes=CMD%20%5B%22echo%22%2C%22x%22%5D HTTP/1.1\r\n"
        b"Host: x\r\nContent-Type: application/x-tar\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    s.settimeout(60)
    body = b""
    while b"0\r\n\r\n" not in body:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    s.close()
    assert body.startswith(b"HTTP/1.1 200")
    assert b'"status": "sha256:' in body or b'"status":"sha256:' in body
    status, info = daemon.api("GET", "/images/imported:t1/json")
    assert status == 200 and info["Config"]["Cmd"] == ["echo", "x"]
    status, _ = daemon.api("DELETE", "/images/imported:t1")
    assert status == 200


def test_nothing_left_running(daemon: Daemon, client: Any) -> None:
    for c in client.containers.list(all=True):
        c.remove(force=True)
    assert json.loads(json.dumps(client.api.containers(all=True))) == []
