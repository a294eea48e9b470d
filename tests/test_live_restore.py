"""live-restore (on by default): a daemon killed -9 with running containers, then
restarted: the containers still run and are re-adopted (state, logs -f, exec, stop),
one that exited meanwhile reports its exit code; restart policies apply to it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import PALLET
from tests.test_cli_e2e import until


def _state(d: Any, ref: str) -> dict[str, Any]:
    return json.loads(d.cli("inspect", ref).stdout)[0]["State"]


def test_daemon_killed_and_restarted(make_daemon: Any, busybox_tar: Path) -> None:
    d = make_daemon(storage_driver="overlay")
    d.import_busybox(busybox_tar)
    ticker = d.cli(
        "run",
        "-d",
        "--name",
        "ticker",
        "busybox",
        "sh",
        "-c",
        "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done",
    ).stdout.strip()
    quitter = d.cli(
        "run", "-d", "--name", "quitter", "busybox", "sh", "-c", "sleep 2; exit 7"
    ).stdout.strip()
    restarter = d.cli(
        "run",
        "-d",
        "--restart",
        "on-failure:1",
        "busybox",
        "sh",
        "-c",
        "sleep 2; echo attempt; exit 5",
    ).stdout.strip()
    pid = _state(d, ticker)["Pid"]
    assert pid > 0

    d.stop(signal.SIGKILL)
    time.sleep(3)  # the quitter and the restarter end while no daemon runs
    import os

    os.kill(pid, 0)  # the container's process is still there
    d.start()

    st = _state(d, ticker)
    assert st["Running"] is True and st["Pid"] == pid and st["Status"] == "running"
    assert until(lambda: _state(d, quitter)["Status"] == "exited")  # at once, unless loaded
    st = _state(d, quitter)
    assert st["Running"] is False and st["ExitCode"] == 7
    # the restart policy applies to what ended while the daemon was away
    assert until(lambda: d.cli("logs", restarter).stdout.count("attempt") == 2, timeout=60)
    assert until(lambda: _state(d, restarter)["Status"] == "exited", timeout=60)
    assert json.loads(d.cli("inspect", restarter).stdout)[0]["RestartCount"] == 1

    # logs -f follows the re-adopted container
    env = {**os.environ, "PALLET_HOST": d.host}
    follow = subprocess.Popen(
        [PALLET, "logs", "-f", "--tail", "0", ticker], stdout=subprocess.PIPE, env=env
    )
    try:
        assert follow.stdout is not None
        first = follow.stdout.readline().decode()
        second = follow.stdout.readline().decode()
        n1, n2 = int(first.split()[1]), int(second.split()[1])
        assert n2 == n1 + 1
    finally:
        follow.kill()
        follow.wait()
    # exec works again, and the container can be stopped through the new daemon
    assert d.cli("exec", ticker, "echo", "inside").stdout == "inside\n"
    d.cli("stop", "-t", "1", ticker)
    st = _state(d, ticker)
    assert st["Running"] is False and st["ExitCode"] in (137, 143)


def test_daemon_stopped_cleanly_keeps_containers(make_daemon: Any, busybox_tar: Path) -> None:
    d = make_daemon(storage_driver="vfs")
    d.import_busybox(busybox_tar)
    cid = d.cli("run", "-d", "busybox", "sleep", "600").stdout.strip()
    pid = _state(d, cid)["Pid"]
    d.stop()  # SIGTERM: live-restore keeps the container
    d.start()
    st = _state(d, cid)
    assert st["Running"] is True and st["Pid"] == pid
    d.cli("pause", cid)
    d.stop(signal.SIGKILL)
    d.start()
    st = _state(d, cid)
    assert st["Paused"] is True and st["Running"] is True
    d.cli("unpause", cid)
    d.cli("rm", "-f", cid)
