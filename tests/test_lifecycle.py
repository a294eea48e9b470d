"""Restart policies (no, on-failure[:N], always, unless-stopped) with back-off, also at
daemon start; rename; stop/kill by hand ends the policy."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.test_cli_e2e import until
from tests.test_security import overlay_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Iterator[Daemon]:
    yield from overlay_daemon(tmp_path_factory, busybox_tar)


def state(daemon: Daemon, ref: str) -> dict[str, Any]:
    doc = json.loads(daemon.cli("inspect", ref).stdout)[0]
    return {**doc["State"], "RestartCount": doc["RestartCount"]}


def test_on_failure_with_limit(daemon: Daemon) -> None:
    cid = daemon.cli(
        "run", "-d", "--restart", "on-failure:2", "busybox", "sh", "-c", "echo run; exit 3"
    ).stdout.strip()
    try:
        assert until(lambda: daemon.cli("logs", cid).stdout.count("run") == 3, timeout=60)
        assert until(
            lambda: not state(daemon, cid)["Restarting"] and not state(daemon, cid)["Running"]
        )
        st = state(daemon, cid)
        assert st["RestartCount"] == 2 and st["ExitCode"] == 3 and st["Status"] == "exited"
    finally:
        daemon.cli("rm", "-f", cid)
    # exit 0: no restart under on-failure
    cid = daemon.cli("run", "-d", "--restart", "on-failure", "busybox", "true").stdout.strip()
    try:
        assert until(lambda: state(daemon, cid)["Status"] == "exited")
        assert state(daemon, cid)["RestartCount"] == 0
    finally:
        daemon.cli("rm", "-f", cid)


def test_always_with_backoff_and_stop_by_hand(daemon: Daemon) -> None:
    cid = daemon.cli(
        "run", "-d", "--restart", "always", "busybox", "sh", "-c", "echo run; exit 0"
    ).stdout.strip()
    try:
        assert until(lambda: state(daemon, cid)["RestartCount"] >= 4, timeout=60)
        from pallet.logs import rfc3339_to_unix

        stamps = [line.split()[0] for line in daemon.cli("logs", "-t", cid).stdout.splitlines()]
        times = [rfc3339_to_unix(t) for t in stamps]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # 100 ms, 200 ms, 400 ms... (each gap at least the delay, growing)
        # lower bounds only: a loaded machine makes gaps longer, never shorter
        assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4
        ps = daemon.cli("ps", "-a", "--filter", f"id={cid}").stdout
        assert "Restarting" in ps or "Up" in ps or "Exited" in ps
        daemon.cli("stop", "-t", "1", cid)
        count = state(daemon, cid)["RestartCount"]
        assert until(lambda: state(daemon, cid)["Status"] == "exited")
        import time

        time.sleep(1.0)
        st = state(daemon, cid)
        assert st["Status"] == "exited" and st["RestartCount"] <= count + 1
        # a start by hand brings the policy back
        daemon.cli("start", cid)
        assert until(lambda: state(daemon, cid)["RestartCount"] > count + 1, timeout=60)
    finally:
        daemon.cli("rm", "-f", cid)
    assert cid not in daemon.cli("ps", "-aq", "--no-trunc").stdout


def test_rename(daemon: Daemon) -> None:
    a, b = f"ren-{uuid.uuid4().hex[:6]}", f"ren-{uuid.uuid4().hex[:6]}"
    other = f"ren-{uuid.uuid4().hex[:6]}"
    cid = daemon.cli("create", "--name", a, "busybox", "true").stdout.strip()
    oid = daemon.cli("create", "--name", other, "busybox", "true").stdout.strip()
    try:
        daemon.cli("rename", a, b)
        assert json.loads(daemon.cli("inspect", b).stdout)[0]["Id"] == cid
        assert daemon.cli("inspect", a, check=False).returncode == 1
        r = daemon.cli("rename", b, other, check=False)
        assert r.returncode == 1 and f'The container name "/{other}" is already in use' in r.stderr
        r = daemon.cli("rename", b, "bad name", check=False)
        assert r.returncode == 1 and "Invalid container name" in r.stderr
        # the old name is free again
        daemon.cli("create", "--name", a, "busybox", "true")
        daemon.cli("rm", a)
    finally:
        daemon.cli("rm", "-f", cid, oid)


def test_policies_at_daemon_start(make_daemon: Any, busybox_tar: Path) -> None:
    d = make_daemon(storage_driver="vfs", extra=["--no-live-restore"])
    d.import_busybox(busybox_tar)
    always = d.cli("run", "-d", "--restart", "always", "busybox", "sleep", "600").stdout.strip()
    unless = d.cli(
        "run", "-d", "--restart", "unless-stopped", "busybox", "sleep", "600"
    ).stdout.strip()
    stopped = d.cli(
        "run", "-d", "--restart", "unless-stopped", "busybox", "sleep", "600"
    ).stdout.strip()
    plain = d.cli("run", "-d", "busybox", "sleep", "600").stdout.strip()
    d.cli("stop", "-t", "0", stopped)
    d.stop()  # no live-restore: the daemon stops them (not a stop by hand)
    d.start()
    assert until(lambda: state(d, always)["Running"] and state(d, unless)["Running"], timeout=60)
    assert not state(d, stopped)["Running"] and not state(d, plain)["Running"]
