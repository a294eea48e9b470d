"""Terminals for real: the docker CLI and pallet's CLI run under a pseudo-terminal of
a known size (as a user's shell would run them), on every backend. `stty size` inside
sees the client's size, a window change is passed on, raw mode, exit codes, attach
and the detach keys (ctrl-p ctrl-q), the resize API."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import struct
import subprocess
import termios
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import PALLET, Daemon

DOCKER = shutil.which("docker") or "/usr/local/bin/docker"
BACKENDS = ["native", "runc", "crun"]
GUARD = 120.0  # seconds: only turns a hang into a failure
# crun 1.8 ignores process.consoleSize on exec and runs the process as soon as it has
# handed over the pty, which the monitor sizes right then: give it that moment.
CRUN_WAIT = {"native": "", "runc": "", "crun": "sleep 0.3; "}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class PtyProcess:
    """A command whose stdin/stdout/stderr (and controlling terminal) is a pty."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int, cols: int) -> None:
        self.master, slave = os.openpty()
        set_size(slave, rows, cols)

        def controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            preexec_fn=controlling_tty,
        )
        os.close(slave)
        self.out = bytearray()

    def _read(self, wait: float) -> bool:
        r, _, _ = select.select([self.master], [], [], wait)
        if not r:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:
            return False
        if not data:
            return False
        self.out += data
        return True

    def expect(self, needle: str, start: int = 0) -> int:
        deadline = time.monotonic() + GUARD
        while needle.encode() not in self.out[start:]:
            if time.monotonic() > deadline or not self._read(0.2):
                raise AssertionError(f"{needle!r} not seen; output: {bytes(self.out)!r}")
        return self.out.index(needle.encode(), start) + len(needle)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def resize(self, rows: int, cols: int) -> None:
        set_size(self.master, rows, cols)  # the kernel sends SIGWINCH to the CLI

    def wait(self) -> int:
        deadline = time.monotonic() + GUARD
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0):
            pass
        code = self.proc.wait(timeout=5)
        os.close(self.master)
        return code

    def text(self) -> str:
        return self.out.decode(errors="replace")


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("palletd-tty"), "overlay", [])
    daemon.start()
    try:
        daemon.import_busybox(busybox_tar)
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture(scope="module")
def envs(d: Daemon, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    base = {k: v for k, v in os.environ.items() if k != "DOCKER_CONTEXT"}
    base["TERM"] = "xterm"
    config = str(tmp_path_factory.mktemp("docker-config"))
    return {
        "docker": {**base, "DOCKER_HOST": d.host, "DOCKER_CONFIG": config},
        "pallet": {**base, "PALLET_HOST": d.host},
    }


def client(kind: str) -> str:
    return DOCKER if kind == "docker" else PALLET


def run_pty(kind: str, envs: dict[str, dict[str, str]], args: list[str], rows: int, cols: int):  # type: ignore[no-untyped-def]
    return PtyProcess([client(kind), *args], envs[kind], rows, cols)


def plain(kind: str, envs: dict[str, dict[str, str]], *args: str) -> Any:
    return subprocess.run(
        [client(kind), *args], env=envs[kind], capture_output=True, text=True, timeout=GUARD
    )


@pytest.mark.parametrize("runtime", BACKENDS)
@pytest.mark.parametrize("kind", ["docker", "pallet"])
def test_run_it_size_and_exit_code(
    kind: str, runtime: str, envs: dict[str, dict[str, str]]
) -> None:
    p = run_pty(
        kind,
        envs,
        [
            "run",
            "--rm",
            "-it",
            "--network",
            "none",
            "--runtime",
            runtime,
            "busybox",
            "sh",
            "-c",
            "stty size; tty; test -t 0 && echo stdin-is-a-tty; exit 5",
        ],
        rows=27,
        cols=91,
    )
    code = p.wait()
    text = p.text()
    assert code == 5, text
    assert "27 91\r\n" in text
    assert "/dev/pts/0\r\n" in text
    assert "stdin-is-a-tty" in text


@pytest.mark.parametrize("runtime", BACKENDS)
def test_run_it_interactive_shell_and_window_change(
    runtime: str, envs: dict[str, dict[str, str]]
) -> None:
    """A shell on a raw pty: typed input reaches it (echoed by the container's own
    terminal), a window change reaches `stty size`, `exit 3` is the CLI's status."""
    p = run_pty(
        "docker",
        envs,
        ["run", "--rm", "-it", "--network", "none", "--runtime", runtime, "busybox", "sh"],
        rows=20,
        cols=60,
    )
    p.expect("# ")
    p.send(b"echo $((6*7))\r")
    at = p.expect("42\r\n")
    p.send(b"stty size\r")
    at = p.expect("20 60\r\n", at)
    p.resize(33, 120)
    for _ in range(100):  # the CLI posts the resize from its SIGWINCH handler
        mark = len(p.out)
        p.send(b"stty size\r")
        end = p.expect("/ # ", p.expect("stty size", mark))
        if b"33 120\r\n" in p.out[mark:end]:
            break
        time.sleep(0.1)
    assert "33 120\r\n" in p.text()
    p.send(b"exit 3\r")
    assert p.wait() == 3, p.text()


@pytest.mark.parametrize("kind", ["docker", "pallet"])
def test_attach_and_detach_keys(kind: str, d: Daemon, envs: dict[str, dict[str, str]]) -> None:
    name = f"tty-{uuid.uuid4().hex[:8]}"
    r = plain(kind, envs, "run", "-dit", "--network", "none", "--name", name, "busybox", "sh")
    assert r.returncode == 0, r.stderr
    try:
        p = run_pty(kind, envs, ["attach", name], rows=24, cols=80)
        time.sleep(0.3)
        p.send(b"echo attached-$((40+2))\r")
        p.expect("attached-42\r\n")
        p.send(b"\x10\x11")  # ctrl-p ctrl-q
        # docker attach reports the detach as "read escape sequence", status 1
        assert p.wait() == 1, p.text()
        assert "read escape sequence" in p.text()
        _, info = d.api("GET", f"/containers/{name}/json")
        assert info["State"]["Running"] is True  # detached, not stopped
        # a second attach with other keys, then exit from inside: its status
        p = run_pty(kind, envs, ["attach", "--detach-keys", "ctrl-x", name], rows=24, cols=80)
        time.sleep(0.3)
        p.send(b"\x10\x11echo still-here\r")  # not the keys any more: passed through
        p.expect("still-here\r\n")
        p.send(b"exit 4\r")
        assert p.wait() == 4, p.text()
    finally:
        plain(kind, envs, "rm", "-f", name)


@pytest.mark.parametrize("runtime", BACKENDS)
def test_exec_it_and_resize_api(runtime: str, d: Daemon, envs: dict[str, dict[str, str]]) -> None:
    name = f"tty-{uuid.uuid4().hex[:8]}"
    r = plain("docker", envs, "run", "-dit", "--network", "none", "--runtime", runtime,
              "--name", name, "busybox", "sh")  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        for kind in ("docker", "pallet"):
            p = run_pty(
                kind,
                envs,
                ["exec", "-it", name, "sh", "-c", f"{CRUN_WAIT[runtime]}stty size; tty; exit 7"],
                15,
                45,
            )
            assert p.wait() == 7, p.text()
            assert "15 45\r\n" in p.text() and "/dev/pts/" in p.text()
        # the container's own terminal, resized through the API
        status, _ = d.api("POST", f"/containers/{name}/resize?h=50&w=150")
        assert status == 200
        r = plain("docker", envs, "exec", name, "stty", "-F", "/dev/pts/0", "size")
        assert r.stdout == "50 150\n", r.stderr
        status, body = d.api("POST", f"/containers/{name}/resize?h=x&w=1")
        assert status == 400
        plain("docker", envs, "kill", name)
        plain("docker", envs, "wait", name)
        status, body = d.api("POST", f"/containers/{name}/resize?h=10&w=10")
        assert status == 409 and "is not running" in body["message"]
    finally:
        plain("docker", envs, "rm", "-f", name)
