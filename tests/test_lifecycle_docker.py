"""The real docker CLI against pallet for the lifecycle commands: run --memory and
--cap-add, stats --no-stream, cp both ways, pause/unpause, update, top, rename, volume."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.test_docker_cli import DOCKER
from tests.test_security import overlay_daemon

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Iterator[Daemon]:
    yield from overlay_daemon(tmp_path_factory, busybox_tar)


@pytest.fixture(scope="module")
def docker(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not os.path.exists(DOCKER):
        pytest.fail(f"the docker CLI is not installed at {DOCKER}; scripts/install puts it there")
    config = tmp_path_factory.mktemp("docker-config")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DOCKER_CONFIG": str(config), "DOCKER_HOST": daemon.host}
        env.pop("DOCKER_CONTEXT", None)
        r = subprocess.run([DOCKER, *args], capture_output=True, env=env, timeout=120)
        out = subprocess.CompletedProcess(
            r.args, r.returncode, r.stdout.decode(), r.stderr.decode()
        )
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} -> {r.returncode}: {out.stderr}")
        return out

    return run


def test_docker_run_memory_and_caps(docker: Any, daemon: Daemon) -> None:
    r = docker(
        "run",
        "--rm",
        "--memory",
        "32m",
        "--cap-add",
        "NET_ADMIN",
        "--pids-limit",
        "9",
        "busybox",
        "sh",
        "-c",
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max; "
        "grep CapEff /proc/self/status",
    )
    lines = r.stdout.split("\n")
    assert lines[0] == str(32 * MiB) and lines[1] == "9"
    assert lines[2].split()[1] == f"{0xA80425FB | 1 << 12:016x}"


def test_docker_stats_no_stream(docker: Any) -> None:
    cid = docker(
        "run", "-d", "-m", "64m", "busybox", "sh", "-c", "while :; do :; done"
    ).stdout.strip()
    try:
        r = docker("stats", "--no-stream", cid)
        header, row = r.stdout.splitlines()
        assert header.split()[:4] == ["CONTAINER", "ID", "NAME", "CPU"]
        assert row.startswith(cid[:12])
        cpu = float(row.split()[2].rstrip("%"))
        assert cpu > 1  # a busy loop, on a machine shared by many
        assert "/ 64MiB" in row
        r = docker("stats", "--no-stream", "--format", "{{json .}}", cid)
        doc = json.loads(r.stdout)
        assert doc["MemUsage"].endswith("/ 64MiB") and int(doc["PIDs"]) >= 1
    finally:
        docker("rm", "-f", cid)


def test_docker_cp_both_ways(docker: Any, tmp_path: Path) -> None:
    cid = docker("run", "-d", "busybox", "sleep", "60").stdout.strip()
    try:
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "hello.txt").write_text("hello\n")
        docker("cp", str(tmp_path / "src"), f"{cid}:/dst")
        docker("cp", str(tmp_path / "src" / "hello.txt"), f"{cid}:/tmp/")
        r = docker("exec", cid, "cat", "/dst/hello.txt", "/tmp/hello.txt")
        assert r.stdout == "hello\nhello\n"
        out = tmp_path / "out"
        out.mkdir()
        docker("cp", f"{cid}:/etc/passwd", str(out))
        docker("cp", f"{cid}:/dst", str(out / "dir"))
        assert "root:" in (out / "passwd").read_text()
        assert (out / "dir" / "hello.txt").read_text() == "hello\n"
        r = docker("cp", f"{cid}:/nope", str(out), check=False)
        assert r.returncode != 0 and "Could not find the file /nope" in r.stderr
    finally:
        docker("rm", "-f", cid)


def test_docker_pause_update_top_rename(docker: Any, daemon: Daemon) -> None:
    name = "dk-" + os.urandom(3).hex()
    cid = docker(
        "run", "-d", "--name", name, "--restart", "unless-stopped", "busybox", "sleep", "60"
    ).stdout.strip()
    try:
        docker("pause", name)
        assert "(Paused)" in docker("ps", "--filter", f"id={cid}").stdout
        docker("unpause", name)
        docker("update", "--memory", "48m", "--memory-swap", "96m", name)
        mem = Path("/sys/fs/cgroup/memory") / daemon.cgroup_parent.lstrip("/") / cid
        assert int((mem / "memory.limit_in_bytes").read_text()) == 48 * MiB
        policy = docker("inspect", "-f", "{{.HostConfig.RestartPolicy.Name}}", cid).stdout
        assert policy.strip() == "unless-stopped"  # an update without --restart keeps it
        top = docker("top", name).stdout
        assert "sleep 60" in top and top.split()[0] == "UID"
        docker("rename", name, name + "-new")
        assert docker("inspect", "-f", "{{.Name}}", cid).stdout.strip() == f"/{name}-new"
    finally:
        docker("rm", "-f", cid)


def test_docker_volumes(docker: Any) -> None:
    name = "dkvol-" + os.urandom(3).hex()
    docker("volume", "create", name)
    assert name in docker("volume", "ls", "-q").stdout.split()
    docker("run", "--rm", "-v", f"{name}:/v", "busybox", "sh", "-c", "echo x > /v/f")
    r = docker("run", "--rm", "--mount", f"source={name},target=/w", "busybox", "cat", "/w/f")
    assert r.stdout == "x\n"
    assert docker("volume", "inspect", "-f", "{{.Driver}}", name).stdout.strip() == "local"
    docker("volume", "rm", name)


def test_docker_run_hardening_flags(docker: Any, tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    profile.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}],
            }
        )
    )
    r = docker(
        "run",
        "--rm",
        "--read-only",
        "--tmpfs",
        "/run:size=1m",
        "--init",
        "--device",
        "/dev/null:/dev/other-null",
        "--ulimit",
        "nofile=64:128",
        "--security-opt",
        f"seccomp={profile}",
        "--cap-drop",
        "ALL",
        "busybox",
        "sh",
        "-c",
        "touch /x || echo ro; mkdir /run/d || echo nomkdir; touch /run/f && echo tmpfs; "
        "ls /dev/other-null; ulimit -n; cat /proc/1/cmdline | tr '\\0' ' '; echo; "
        "grep CapEff /proc/self/status",
    )
    out = r.stdout.splitlines()
    assert out[:5] == ["ro", "nomkdir", "tmpfs", "/dev/other-null", "64"]
    assert out[5].startswith("/sbin/docker-init -- sh")
    assert out[6].split()[1] == "0000000000000000"
    r = docker("run", "--rm", "--security-opt", "bogus=1", "busybox", "true", check=False)
    assert r.returncode == 125 and 'invalid --security-opt 2: "bogus=1"' in r.stderr
