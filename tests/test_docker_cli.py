"""The real docker CLI (the client on the machine image) drives pallet unchanged."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import Daemon

DOCKER = shutil.which("docker") or "/usr/local/bin/docker"


@pytest.fixture(scope="module")
def docker_cli(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    if not os.path.exists(DOCKER):
        pytest.fail(f"the docker CLI is not installed at {DOCKER}; scripts/install puts it there")
    config = tmp_path_factory.mktemp("docker-config")

    def run(
        *args: str, input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DOCKER_CONFIG": str(config), "DOCKER_HOST": daemon.host}
        env.pop("DOCKER_CONTEXT", None)
        r = subprocess.run([DOCKER, *args], input=input, capture_output=True, env=env, timeout=120)
        out = subprocess.CompletedProcess(
            r.args, r.returncode, r.stdout.decode(), r.stderr.decode()
        )
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} -> {r.returncode}: {out.stderr}")
        return out

    return run


def test_docker_run_rm_echo(docker_cli) -> None:  # type: ignore[no-untyped-def]
    r = docker_cli("run", "--rm", "busybox", "echo", "hi")
    assert r.stdout == "hi\n"
    assert docker_cli("ps", "-aq").stdout.strip() == ""


def test_docker_run_exit_code_and_stderr(docker_cli) -> None:  # type: ignore[no-untyped-def]
    r = docker_cli("run", "--rm", "busybox", "sh", "-c", "echo oops >&2; exit 3", check=False)
    assert r.returncode == 3 and "oops" in r.stderr


def test_docker_run_stdin(docker_cli) -> None:  # type: ignore[no-untyped-def]
    r = docker_cli("run", "--rm", "-i", "busybox", "tr", "a-z", "A-Z", input=b"shout\n")
    assert r.stdout == "SHOUT\n"


def test_docker_run_missing_executable(docker_cli) -> None:  # type: ignore[no-untyped-def]
    r = docker_cli("run", "--rm", "busybox", "nosuchcmd", check=False)
    assert r.returncode == 127
    assert "executable file not found" in r.stderr


def test_docker_ps_logs_rm(docker_cli) -> None:  # type: ignore[no-untyped-def]
    cid = docker_cli(
        "run", "-d", "--name", "cli-logs", "busybox", "sh", "-c", "echo logged; sleep 60"
    ).stdout.strip()
    assert len(cid) == 64
    ps = docker_cli("ps").stdout
    assert "cli-logs" in ps and "Up " in ps
    import time

    for _ in range(100):
        if "logged" in docker_cli("logs", "cli-logs").stdout:
            break
        time.sleep(0.05)
    assert docker_cli("logs", "cli-logs").stdout == "logged\n"
    assert docker_cli("inspect", "-f", "{{.State.Status}}", "cli-logs").stdout.strip() == "running"
    r = docker_cli("rm", "cli-logs", check=False)
    assert r.returncode != 0 and "cannot remove a running container" in r.stderr
    assert docker_cli("rm", "-f", "cli-logs").stdout.strip() == "cli-logs"
    assert "cli-logs" not in docker_cli("ps", "-a").stdout


def test_docker_images_and_errors(docker_cli) -> None:  # type: ignore[no-untyped-def]
    assert "busybox" in docker_cli("images").stdout
    r = docker_cli("logs", "nosuch", check=False)
    assert r.returncode == 1 and "No such container: nosuch" in r.stderr
    r = docker_cli("version")
    assert "1.44" in r.stdout


def test_docker_stop_and_wait(docker_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    docker_cli("run", "-d", "--name", "cli-stop", "busybox", "sleep", "60")
    docker_cli("stop", "-t", "1", "cli-stop")
    assert docker_cli("wait", "cli-stop").stdout.strip() == "137"
    docker_cli("rm", "cli-stop")
