"""Shared fixtures: a busybox rootfs tarball and real palletd daemons on private roots.

Every daemon a test starts has its own data root, exec root and socket, so the suite
never touches a user's daemon; at the end nothing of it may remain mounted.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SESSION_DAEMONS: list[Daemon] = []  # every daemon this session made, for the leak check
BIN = Path(sys.executable).parent
PALLET = str(BIN / "pallet")
PALLETD = str(BIN / "palletd")


@pytest.fixture(scope="session")
def busybox_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("busybox") / "rootfs.tar"
    subprocess.run([str(REPO / "scripts/build-busybox-image"), "-o", str(out)], check=True)
    return out


def mounts_under(path: Path | str) -> list[str]:
    prefix = str(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


class Daemon:
    """A palletd process on private paths, and ways to talk to it."""

    def __init__(self, root: Path, storage_driver: str | None, extra: list[str]) -> None:
        # Exec roots hold unix sockets: keep them short (108-byte limit on socket paths).
        self.name = f"pallet-test-{uuid.uuid4().hex[:8]}"
        self.exec_root = Path(f"/run/{self.name}")
        self.cgroup_parent = f"/{self.name}"
        self.bridge = "pt" + self.name[-8:]
        SESSION_DAEMONS.append(self)
        self.data_root = root / "data"
        self.sock = str(self.exec_root) + ".sock"
        self.host = f"unix://{self.sock}"
        self.log_path = root / "palletd.log"
        self.args = [
            PALLETD,
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "-H",
            self.host,
            "--config-file",
            str(root / "daemon.json"),
            "--cgroup-parent",
            self.cgroup_parent,
            # Its own default bridge and subnet: never the user's pallet0 nor another's.
            "--bridge",
            self.bridge,
            "--bip",
            f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.1/24",
            *(["--storage-driver", storage_driver] if storage_driver else []),
            *extra,
        ]
        (root / "daemon.json").write_text("{}")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"palletd exited: {self.log_path.read_text()}")
            with contextlib.suppress(OSError):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.sock)
                    s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                    if b"OK" in s.recv(4096):
                        return
            time.sleep(0.05)
        raise RuntimeError("palletd did not answer /_ping")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cli(
        self, *args: str, input: bytes | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PALLET_HOST": self.host}
        r = subprocess.run(
            [PALLET, *args], input=input, capture_output=True, env=env, timeout=timeout
        )
        out = subprocess.CompletedProcess(
            r.args,
            r.returncode,
            r.stdout.decode(errors="replace"),
            r.stderr.decode(errors="replace"),
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"pallet {' '.join(args)} -> {r.returncode}\n{out.stdout}\n{out.stderr}"
            )
        return out

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request over the socket with the standard library (http.client)."""
        import http.client

        class Conn(http.client.HTTPConnection):
            def connect(conn) -> None:
                conn.sock = socket.socket(socket.AF_UNIX)
                conn.sock.connect(self.sock)

        c = Conn("localhost", timeout=60)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        raw = r.read()
        c.close()
        try:
            return r.status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return r.status, raw.decode(errors="replace")

    def import_busybox(self, tar: Path, tag: str = "busybox:latest") -> str:
        r = self.cli("import", "--change", 'CMD ["sh"]', str(tar), tag)
        return r.stdout.strip()

    def _remove_networking(self) -> None:
        """Bridges and the nftables table of a daemon killed with live endpoints (a clean
        stop with no running container removes them itself; tests/test_network.py checks)."""
        import sqlite3

        bridges = {self.bridge}
        with contextlib.suppress(sqlite3.Error):
            db = sqlite3.connect(self.data_root / "network" / "network.db")
            try:
                for (doc,) in db.execute("SELECT doc FROM networks"):
                    bridges.add(json.loads(doc).get("bridge") or "")
            finally:
                db.close()
        for b in sorted(bridges - {""}):
            if os.path.exists(f"/sys/class/net/{b}"):
                subprocess.run(["ip", "link", "del", b], capture_output=True, check=False)
        subprocess.run(
            ["nft", "delete", "table", "ip", f"pallet_{self.bridge}"], capture_output=True
        )

    def cleanup(self) -> None:
        # Live-restore keeps containers running past the daemon: remove them first.
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                _, found = self.api("GET", "/containers/json?all=1")
                for c in found or []:
                    self.api("DELETE", f"/containers/{c['Id']}?force=1")
        self.stop()
        self._remove_networking()
        # Whatever the daemon left mounted is a leak: report it, then clean the machine.
        leftovers = mounts_under(self.data_root) + mounts_under(self.exec_root)
        for m in sorted(leftovers, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(self.exec_root, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        assert not leftovers, f"daemon left mounts behind: {leftovers}"


@pytest.fixture
def make_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Factory: ``make_daemon(storage_driver="vfs")`` starts a daemon; all are cleaned."""
    made: list[Daemon] = []

    def make(
        storage_driver: str | None = None, extra: list[str] | None = None, start: bool = True
    ) -> Daemon:
        d = Daemon(tmp_path_factory.mktemp("palletd"), storage_driver, extra or [])
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture(scope="module", params=["overlay", "vfs"])
def daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path
) -> Iterator[Daemon]:
    """A running daemon with busybox:latest imported, once per storage driver."""
    d = Daemon(tmp_path_factory.mktemp(f"palletd-{request.param}"), request.param, [])
    d.start()
    try:
        d.import_busybox(busybox_tar)
        yield d
    finally:
        d.cleanup()


def _cgroups_of(parent: str) -> list[Path]:
    """Container cgroups under ``parent`` in every mounted hierarchy (v1, v2, hybrid)."""
    bases = [Path("/sys/fs/cgroup")] + [p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir()]
    found = []
    for base in bases:
        d = base / parent.lstrip("/")
        if d.is_dir():
            found += [p for p in d.iterdir() if p.is_dir()]
    return found


def _processes_mentioning(text: str) -> list[str]:
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in cmd:
                out.append(f"{proc.name}: {cmd}")
    return out


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the whole suite: nothing that this session's daemons made may remain
    (mounts, container cgroups, processes). Other sessions on the machine are ignored."""
    yield
    time.sleep(0.2)
    leaks = []
    for d in SESSION_DAEMONS:
        leaks += [f"mount {m}" for m in mounts_under(d.exec_root) + mounts_under(d.data_root)]
        leaks += [f"cgroup {c}" for c in _cgroups_of(d.cgroup_parent)]
        leaks += [f"process {p}" for p in _processes_mentioning(str(d.exec_root))]
        for base in [
            *Path("/sys/fs/cgroup").glob(d.name),
            *Path("/sys/fs/cgroup").glob("*/" + d.name),
        ]:
            with contextlib.suppress(OSError):
                base.rmdir()  # the parent cgroups, empty now
    assert not leaks, "the test suite left things behind:\n" + "\n".join(leaks)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The devmapper QEMU guest (tests/test_devmapper_guest.py) takes minutes under TCG:
    when its tests are selected, boot it now so it runs while the rest of the suite does."""
    if any(i.nodeid.startswith("tests/test_devmapper_guest.py") for i in session.items):
        from tests import test_devmapper_guest

        test_devmapper_guest.start_early()
