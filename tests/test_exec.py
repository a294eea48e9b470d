"""``exec`` against a real daemon on every backend (native, runc, crun): the Engine API
(through the docker SDK), the docker CLI and pallet's CLI; exit codes from exec
inspect; user, env, working directory and stdin; Docker's errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Daemon

DOCKER = shutil.which("docker") or "/usr/local/bin/docker"
BACKENDS = ["native", "runc", "crun"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("palletd-exec"), "overlay", [])
    daemon.start()
    try:
        daemon.import_busybox(busybox_tar)
        yield daemon
    finally:
        daemon.cleanup()


Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def docker(d: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Run:
    config = tmp_path_factory.mktemp("docker-config")

    def run(*args: str, input: bytes | None = None, check: bool = True) -> Any:
        env = {**os.environ, "DOCKER_CONFIG": str(config), "DOCKER_HOST": d.host}
        env.pop("DOCKER_CONTEXT", None)
        r = subprocess.run([DOCKER, *args], input=input, capture_output=True, env=env, timeout=120)
        out = subprocess.CompletedProcess(
            r.args, r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode()
        )
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} -> {r.returncode}: {out.stderr}")
        return out

    return run


@pytest.fixture(params=BACKENDS)
def box(request: pytest.FixtureRequest, d: Daemon, docker: Run) -> Iterator[str]:
    """A running `sleep` container on the backend under test."""
    name = f"x-{request.param}-{uuid.uuid4().hex[:6]}"
    docker(
        "run", "-d", "--network", "none", "--runtime", request.param, "--name", name,
        "busybox", "sleep", "600",
    )  # fmt: skip
    yield name
    docker("rm", "-f", name, check=False)


def exec_ids(d: Daemon, name: str) -> list[str]:
    _, info = d.api("GET", f"/containers/{name}/json")
    return list(info["ExecIDs"] or [])


def test_docker_cli_exec(box: str, d: Daemon, docker: Run) -> None:
    r = docker("exec", box, "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    r = docker("exec", "-u", "1000:1000", "-w", "/tmp", "-e", "A=1", "-e", "PATH=/bin",
               box, "sh", "-c", "id -u; id -g; pwd; echo $A $PATH $HOSTNAME")  # fmt: skip
    uid, gid, cwd, env = r.stdout.splitlines()
    assert (uid, gid, cwd) == ("1000", "1000", "/tmp")
    assert env.startswith("1 /bin ")
    r = docker("exec", "-i", box, "tr", "a-z", "A-Z", input=b"shout\n")
    assert r.stdout == "SHOUT\n"
    r = docker("exec", box, "no-such-command", check=False)
    assert r.returncode == 127
    # each runtime words it its own way (crun: "executable file `x` not found in $PATH")
    assert "no-such-command" in r.stdout + r.stderr and "not found" in r.stdout + r.stderr
    r = docker("exec", "-u", "nosuchuser", box, "true", check=False)
    assert r.returncode == 126
    assert "unable to find user nosuchuser" in r.stdout + r.stderr
    # same namespaces as the container: its processes are visible, pid 1 is its init
    r = docker("exec", box, "ps", "-o", "pid,args")
    assert any(line.split()[:2] == ["1", "sleep"] for line in r.stdout.splitlines()[1:])
    # -d: runs in the background, its inspect tells when it is done and how
    docker("exec", "-d", box, "sh", "-c", "sleep 0.3; exit 9")
    last = exec_ids(d, box)[-1]
    for _ in range(600):
        _, info = d.api("GET", f"/exec/{last}/json")
        if not info["Running"]:
            break
        time.sleep(0.05)
    assert info["ExitCode"] == 9 and info["Pid"] > 0
    assert info["ProcessConfig"]["entrypoint"] == "sh"


def test_exec_api_with_sdk(box: str, d: Daemon) -> None:
    import docker as sdk

    client = sdk.APIClient(base_url=d.host, version="1.44")
    try:
        eid = client.exec_create(box, ["sh", "-c", "echo o; echo e >&2; exit 4"])["Id"]
        info = client.exec_inspect(eid)
        assert info["Running"] is False and info["ExitCode"] is None
        assert info["ContainerID"].startswith(client.inspect_container(box)["Id"][:12])
        out, err = client.exec_start(eid, demux=True)
        assert (out, err) == (b"o\n", b"e\n")
        info = client.exec_inspect(eid)
        assert info["Running"] is False and info["ExitCode"] == 4
        # started twice: a conflict
        with pytest.raises(sdk.errors.APIError) as e:
            client.exec_start(eid)
        assert e.value.status_code == 409
        # a tty exec: one raw stream, CRLF line ends
        eid = client.exec_create(box, ["sh", "-c", "echo a; echo b >&2"], tty=True)["Id"]
        assert client.exec_start(eid) == b"a\r\nb\r\n"
    finally:
        client.close()


def test_exec_errors(d: Daemon, docker: Run) -> None:
    name = f"x-stopped-{uuid.uuid4().hex[:6]}"
    docker("create", "--network", "none", "--name", name, "busybox", "true")
    try:
        status, body = d.api("POST", f"/containers/{name}/exec", {"Cmd": ["true"]})
        assert status == 409 and "is not running" in body["message"]
        docker("start", name)
        docker("wait", name)
        r = docker("exec", name, "true", check=False)
        assert r.returncode != 0 and "is not running" in r.stderr
    finally:
        docker("rm", "-f", name)
    status, body = d.api("POST", "/containers/nosuchcontainer/exec", {"Cmd": ["true"]})
    assert status == 404 and "No such container" in body["message"]
    status, body = d.api("GET", "/exec/0123456789abcdef/json")
    assert status == 404 and "No such exec instance" in body["message"]
    status, body = d.api("POST", "/exec/0123456789abcdef/start", {"Detach": True})
    assert status == 404


def test_exec_without_command_and_bad_keys(box: str, d: Daemon) -> None:
    status, body = d.api("POST", f"/containers/{box}/exec", {"Cmd": []})
    assert status == 400 and body["message"] == "No exec command specified"
    status, body = d.api(
        "POST", f"/containers/{box}/exec", {"Cmd": ["true"], "DetachKeys": "ctrl-1"}
    )
    assert status == 400 and "Invalid detach keys" in body["message"]
    status, body = d.api("POST", f"/containers/{box}/exec", {"Cmd": "notalist", "Tty": "x"})
    assert status == 400


def test_exec_dies_with_the_container(box: str, d: Daemon, docker: Run) -> None:
    docker("exec", "-d", box, "sleep", "500")
    eid = exec_ids(d, box)[-1]
    _, info = d.api("GET", f"/exec/{eid}/json")
    assert info["Running"] is True
    docker("kill", box)
    for _ in range(600):
        _, info = d.api("GET", f"/exec/{eid}/json")
        if not info["Running"]:
            break
        time.sleep(0.05)
    assert info["Running"] is False and info["ExitCode"] == 137


def test_pallet_cli_exec(box: str, d: Daemon) -> None:
    r = d.cli("exec", box, "sh", "-c", "echo out; echo err >&2; exit 5", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (5, "out\n", "err\n")
    r = d.cli(
        "exec", "-u", "1000", "-w", "/tmp", "-e", "B=2", box, "sh", "-c", "id -u; pwd; echo $B"
    )
    assert r.stdout.splitlines() == ["1000", "/tmp", "2"]
    assert d.cli("exec", "-i", box, "cat", input=b"round trip\n").stdout == "round trip\n"
    r = d.cli("exec", box, "nope", check=False)
    assert r.returncode == 127 and "not found" in r.stderr + r.stdout
    assert d.cli("exec", "-d", box, "sleep", "1").stdout == ""
    r = d.cli("exec", "--detach-keys", "ctrl-", box, "true", check=False)
    assert r.returncode == 125 and "Invalid detach keys" in r.stderr
    r = d.cli("exec", "nosuchcontainer", "true", check=False)
    assert r.returncode == 1 and "No such container: nosuchcontainer" in r.stderr
