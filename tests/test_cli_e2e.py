"""pallet's own CLI against a real palletd: containers really run, as root, on a real
kernel (busybox image from the host's busybox-static; see conftest's ``daemon``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon


def until(fn, timeout: float = 20.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_run_rm_echo(daemon: Daemon) -> None:
    r = daemon.cli("run", "--rm", "busybox", "echo", "hi")
    assert (r.returncode, r.stdout, r.stderr) == (0, "hi\n", "")
    assert daemon.cli("ps", "-aq").stdout == ""


def test_run_exit_status_and_streams(daemon: Daemon) -> None:
    r = daemon.cli(
        "run", "--rm", "busybox", "sh", "-c", "echo out; echo err >&2; exit 3", check=False
    )
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")


def test_run_env_workdir_user(daemon: Daemon) -> None:
    r = daemon.cli(
        "run",
        "--rm",
        "-e",
        "FOO=bar baz",
        "-w",
        "/tmp",
        "-u",
        "1000:1000",
        "busybox",
        "sh",
        "-c",
        'echo "$FOO"; pwd; id -u; id -g',
    )
    assert r.stdout == "bar baz\n/tmp\n1000\n1000\n"


def test_run_entrypoint(daemon: Daemon) -> None:
    r = daemon.cli("run", "--rm", "--entrypoint", "/bin/echo", "busybox", "via", "entrypoint")
    assert r.stdout == "via entrypoint\n"


def test_run_stdin_half_close(daemon: Daemon) -> None:
    r = daemon.cli("run", "--rm", "-i", "busybox", "tr", "a-z", "A-Z", input=b"shout\nloud\n")
    assert (r.returncode, r.stdout) == (0, "SHOUT\nLOUD\n")
    # output that comes after stdin ended still arrives
    r = daemon.cli(
        "run", "--rm", "-i", "busybox", "sh", "-c", "cat; sleep 0.3; echo done", input=b"x\n"
    )
    assert r.stdout == "x\ndone\n"


def test_run_missing_executable_127(daemon: Daemon) -> None:
    r = daemon.cli("run", "--rm", "busybox", "nosuchcmd", check=False)
    assert r.returncode == 127, r.stderr
    assert r.stderr.startswith("pallet: Error response from daemon: ")
    assert "See 'pallet run --help'." in r.stderr


def test_run_not_executable_126(daemon: Daemon) -> None:
    r = daemon.cli("run", "--rm", "busybox", "/etc/passwd", check=False)
    assert r.returncode == 126, r.stderr


def test_run_missing_image_125(daemon: Daemon) -> None:
    r = daemon.cli("run", "--rm", "nosuchimage", check=False)
    assert r.returncode == 125
    assert r.stderr.startswith("Unable to find image 'nosuchimage:latest' locally\n")
    assert "pallet: " in r.stderr


def test_detached_ps_logs_stop_rm(daemon: Daemon) -> None:
    cid = daemon.cli(
        "run", "-d", "--name", "e2e-web", "busybox", "sh", "-c", "echo started; sleep 300"
    ).stdout.strip()
    assert len(cid) == 64
    try:
        ps = daemon.cli("ps").stdout.splitlines()
        assert ps[0].split() == [
            "CONTAINER",
            "ID",
            "IMAGE",
            "COMMAND",
            "CREATED",
            "STATUS",
            "PORTS",
            "NAMES",
        ]
        row = next(line for line in ps if line.endswith("e2e-web"))
        assert row.startswith(cid[:12]) and "Up " in row and "busybox" in row
        assert cid[:12] in daemon.cli("ps", "-q").stdout.split()
        assert daemon.cli("ps", "-q", "--no-trunc").stdout.split().count(cid) == 1
        assert until(lambda: daemon.cli("logs", "e2e-web").stdout == "started\n")
        status = daemon.cli("inspect", "-f", "{{.State.Status}} {{.Name}}", "e2e-web")
        assert status.stdout == "running /e2e-web\n"

        r = daemon.cli("rm", "e2e-web", check=False)
        assert r.returncode == 1 and r.stderr.startswith("Error response from daemon: ")

        t0 = time.monotonic()
        assert daemon.cli("stop", "-t", "1", "e2e-web").stdout == "e2e-web\n"
        assert time.monotonic() - t0 < 20
        ps_a = daemon.cli("ps", "-a", "--filter", "status=exited").stdout
        assert "e2e-web" in ps_a and "Exited (137)" in ps_a
        assert "e2e-web" not in daemon.cli("ps").stdout
        assert daemon.cli("wait", "e2e-web").stdout == "137\n"
    finally:
        daemon.cli("rm", "-f", "e2e-web", check=False)
    assert "e2e-web" not in daemon.cli("ps", "-a").stdout


def test_kill_with_signal_and_rm_force(daemon: Daemon) -> None:
    daemon.cli("run", "-d", "--name", "e2e-kill", "busybox", "sleep", "300")
    try:
        assert daemon.cli("kill", "-s", "TERM", "e2e-kill").stdout == "e2e-kill\n"
        # sleep as pid 1 does not die of SIGTERM (no handler): still running
        time.sleep(0.5)
        state = daemon.cli("inspect", "-f", "{{.State.Running}}", "e2e-kill").stdout
        assert state == "true\n"
        assert daemon.cli("kill", "e2e-kill").stdout == "e2e-kill\n"
        assert daemon.cli("wait", "e2e-kill").stdout == "137\n"
    finally:
        daemon.cli("rm", "-f", "e2e-kill", check=False)

    daemon.cli("run", "-d", "--name", "e2e-rmf", "busybox", "sleep", "300")
    assert daemon.cli("rm", "-f", "e2e-rmf").stdout == "e2e-rmf\n"
    r = daemon.cli("inspect", "e2e-rmf", check=False)
    assert r.returncode == 1 and r.stderr == "Error: No such object: e2e-rmf\n"


def test_create_start_attach(daemon: Daemon) -> None:
    cid = daemon.cli("create", "--name", "e2e-created", "busybox", "sh", "-c", "echo hey; exit 4")
    try:
        assert len(cid.stdout.strip()) == 64
        assert "Created" in daemon.cli("ps", "-a").stdout
        r = daemon.cli("start", "-a", "e2e-created", check=False)
        assert (r.returncode, r.stdout) == (4, "hey\n")
        assert daemon.cli("logs", "e2e-created").stdout == "hey\n"
        assert daemon.cli("logs", "--tail", "0", "e2e-created").stdout == ""
    finally:
        daemon.cli("rm", "-f", "e2e-created", check=False)


def test_logs_streams_and_follow(daemon: Daemon) -> None:
    daemon.cli(
        "run",
        "-d",
        "--name",
        "e2e-logs",
        "busybox",
        "sh",
        "-c",
        "echo a; echo b >&2; sleep 1; echo c",
    )
    try:
        r = daemon.cli("logs", "-f", "e2e-logs")  # returns when the container exits
        assert (r.stdout, r.stderr) == ("a\nc\n", "b\n")
        r = daemon.cli("logs", "--tail", "1", "e2e-logs")
        assert r.stdout + r.stderr == "c\n"
        r = daemon.cli("logs", "-t", "e2e-logs")
        first = r.stdout.splitlines()[0]
        assert first.endswith(" a") and first[:4].isdigit()
    finally:
        daemon.cli("rm", "-f", "e2e-logs", check=False)


def test_images_inspect_tag_rmi(daemon: Daemon) -> None:
    out = daemon.cli("images").stdout.splitlines()
    assert out[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert any(line.split()[:2] == ["busybox", "latest"] for line in out[1:])
    image_id = json.loads(daemon.cli("inspect", "busybox").stdout)[0]["Id"]
    assert image_id.startswith("sha256:")
    assert image_id[7:19] in daemon.cli("images", "-q").stdout.split()
    daemon.cli("tag", "busybox", "e2e/copy:v1")
    try:
        rows = [line.split() for line in daemon.cli("images").stdout.splitlines()]
        assert ["e2e/copy", "v1", image_id[7:19]] in [row[:3] for row in rows]
        cfg = daemon.cli("inspect", "-f", "{{json .Config.Cmd}}", "e2e/copy:v1").stdout
        assert cfg == '["sh"]\n'
    finally:
        r = daemon.cli("rmi", "e2e/copy:v1")
    assert r.stdout == "Untagged: e2e/copy:v1\n"
    assert "e2e/copy" not in daemon.cli("images").stdout


def test_import_from_stdin(daemon: Daemon, busybox_tar: Path) -> None:
    r = daemon.cli(
        "import",
        "-c",
        'CMD ["echo", "imported"]',
        "-",
        "e2e-imported:1",
        input=busybox_tar.read_bytes(),
    )
    assert r.stdout.strip().startswith("sha256:")
    try:
        assert daemon.cli("run", "--rm", "e2e-imported:1").stdout == "imported\n"
    finally:
        daemon.cli("rmi", "e2e-imported:1", check=False)


def test_info_and_version(daemon: Daemon) -> None:
    info = daemon.cli("info").stdout
    assert "Server:\n" in info and " Storage Driver: " in info
    driver = daemon.cli("info", "-f", "{{.Driver}}").stdout.strip()
    assert driver in ("overlay", "vfs", "overlay2")
    version = daemon.cli("version").stdout
    assert "Server: " in version and "API version:       1.44" in version


@pytest.mark.parametrize("flag", ["--rm", None])
def test_run_many_quick(daemon: Daemon, flag: str | None) -> None:
    for i in range(3):
        args = ["run", *([flag] if flag else []), "busybox", "sh", "-c", f"exit {i}"]
        assert daemon.cli(*args, check=False).returncode == i
    if flag is None:
        daemon.cli("ps", "-aq", check=True)
        ids = daemon.cli("ps", "-aq").stdout.split()
        if ids:
            daemon.cli("rm", "-f", *ids)
