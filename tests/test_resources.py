"""Resource limits on real containers (cgroup v1 here; the v2 code paths against the
machine's v2 hierarchy): memory and swap, OOM kills, pids, cpus, cpuset, cpu shares;
live updates; stats from the cgroup counters; pause/unpause (freezer)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pallet.cgroups import Cgroup, Hierarchies

from tests.conftest import Daemon
from tests.test_cli_e2e import until
from tests.test_security import overlay_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Iterator[Daemon]:
    yield from overlay_daemon(tmp_path_factory, busybox_tar)


MiB = 1024 * 1024


def cgroup_dir(daemon: Daemon, cid: str, controller: str) -> Path:
    return Path("/sys/fs/cgroup") / controller / daemon.cgroup_parent.lstrip("/") / cid


def run_d(daemon: Daemon, *args: str) -> str:
    return daemon.cli("run", "-d", *args).stdout.strip()


def test_memory_limits_in_cgroup_and_inspect(daemon: Daemon) -> None:
    cid = run_d(daemon, "--memory", "64m", "busybox", "sleep", "60")
    try:
        mem = cgroup_dir(daemon, cid, "memory")
        assert int((mem / "memory.limit_in_bytes").read_text()) == 64 * MiB
        # Docker's default swap: as much as the memory
        assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 128 * MiB
        inspect = json.loads(daemon.cli("inspect", cid).stdout)[0]
        assert inspect["HostConfig"]["Memory"] == 64 * MiB
        assert inspect["HostConfig"]["MemorySwap"] == 128 * MiB  # as docker inspect shows
    finally:
        daemon.cli("rm", "-f", cid)
    cid = run_d(daemon, "-m", "32m", "--memory-swap", "48m", "busybox", "sleep", "60")
    try:
        mem = cgroup_dir(daemon, cid, "memory")
        assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 48 * MiB
    finally:
        daemon.cli("rm", "-f", cid)


def test_oom_kill_reported(daemon: Daemon) -> None:
    # a shell that keeps growing a variable until the kernel kills it
    r = daemon.cli(
        "run",
        "--name",
        f"oom-{uuid.uuid4().hex[:6]}",
        "-m",
        "8m",
        "--memory-swap",
        "8m",
        "busybox",
        "sh",
        "-c",
        "x=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; while true; do x=$x$x; done",
        check=False,
    )
    name = r.args[3]
    try:
        assert r.returncode == 137, r
        state = json.loads(daemon.cli("inspect", name).stdout)[0]["State"]
        assert state["OOMKilled"] is True and state["ExitCode"] == 137
    finally:
        daemon.cli("rm", "-f", name)


def test_pids_limit_enforced(daemon: Daemon) -> None:
    r = daemon.cli(
        "run",
        "--rm",
        "--pids-limit",
        "8",
        "busybox",
        "sh",
        "-c",
        "cat /sys/fs/cgroup/pids/pids.max; "
        "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 5 & done 2>/tmp/err; "
        "grep -c 'fork' /tmp/err || true",
        check=False,
    )
    lines = r.stdout.split()
    assert lines[0] == "8"
    assert int(lines[-1]) >= 1  # some forks were refused


def test_cpu_settings(daemon: Daemon) -> None:
    cid = run_d(
        daemon,
        "--cpus",
        "0.5",
        "--cpu-shares",
        "512",
        "--cpuset-cpus",
        "0",
        "busybox",
        "sleep",
        "60",
    )
    try:
        cpu = cgroup_dir(daemon, cid, "cpu")
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"
        assert (cpu / "cpu.shares").read_text().strip() == "512"
        assert (cgroup_dir(daemon, cid, "cpuset") / "cpuset.cpus").read_text().strip() == "0"
        # the container sees its own cgroup at /sys/fs/cgroup (read-only)
        r = daemon.cli("exec", cid, "cat", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us", check=False)
        if r.returncode == 0:
            assert r.stdout.strip() == "50000"
    finally:
        daemon.cli("rm", "-f", cid)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cpus", "5"], "Range of CPUs is from 0.01 to"),
        (["--cpus", "1", "--cpu-quota", "50000"], "Conflicting options: Nano CPUs and CPU Quota"),
        (["--cpuset-cpus", "0-99"], "Requested CPUs are not available"),
        (["--cpuset-cpus", "x"], "Invalid value x for cpuset cpus"),
        (["-m", "64m", "--memory-swap", "32m"], "Minimum memoryswap limit should be larger"),
        (["--memory-swap", "64m"], "You should always set the Memory limit"),
        (["--restart", "sometimes"], "invalid restart policy: unknown policy 'sometimes'"),
        (["--restart", "always", "--rm"], "can't create 'AutoRemove' container with restart"),
    ],
)
def test_bad_resources(daemon: Daemon, flags: list[str], message: str) -> None:
    r = daemon.cli("create", *flags, "busybox", "true", check=False)
    assert r.returncode == 125 and message in r.stderr, r


def test_update_live(daemon: Daemon) -> None:
    cid = run_d(daemon, "-m", "64m", "busybox", "sleep", "60")
    try:
        r = daemon.cli(
            "update",
            "-m",
            "96m",
            "--memory-swap",
            "200m",
            "--cpus",
            "1.5",
            "--pids-limit",
            "20",
            cid,
        )
        assert r.stdout.strip() == cid
        mem = cgroup_dir(daemon, cid, "memory")
        assert int((mem / "memory.limit_in_bytes").read_text()) == 96 * MiB
        assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 200 * MiB
        cpu = cgroup_dir(daemon, cid, "cpu")
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "150000"
        assert (cgroup_dir(daemon, cid, "pids") / "pids.max").read_text().strip() == "20"
        hc = json.loads(daemon.cli("inspect", cid).stdout)[0]["HostConfig"]
        assert (hc["Memory"], hc["MemorySwap"], hc["NanoCpus"], hc["PidsLimit"]) == (
            96 * MiB,
            200 * MiB,
            1_500_000_000,
            20,
        )
        # memory alone: the default swap (twice the memory) follows it
        cid2 = run_d(daemon, "-m", "32m", "busybox", "sleep", "60")
        try:
            daemon.cli("update", "-m", "40m", cid2)
            mem2 = cgroup_dir(daemon, cid2, "memory")
            assert int((mem2 / "memory.limit_in_bytes").read_text()) == 40 * MiB
            assert int((mem2 / "memory.memsw.limit_in_bytes").read_text()) == 80 * MiB
        finally:
            daemon.cli("rm", "-f", cid2)
        r = daemon.cli("update", "--restart", "on-failure:3", cid)
        hc = json.loads(daemon.cli("inspect", cid).stdout)[0]["HostConfig"]
        assert hc["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
        r = daemon.cli("update", "-m", "1k", cid, check=False)
        assert r.returncode != 0 and "Minimum memory limit allowed is 6MB" in r.stderr
    finally:
        daemon.cli("rm", "-f", cid)


def test_stats(daemon: Daemon) -> None:
    cid = run_d(daemon, "-m", "64m", "busybox", "sh", "-c", "while true; do :; done")
    try:
        status, body = daemon.api("GET", f"/containers/{cid}/stats?stream=false")
        assert status == 200
        assert body["id"] == cid and body["name"].startswith("/")
        assert body["memory_stats"]["limit"] == 64 * MiB
        assert body["memory_stats"]["usage"] > 0
        assert body["pids_stats"]["current"] >= 1
        cpu, pre = body["cpu_stats"], body["precpu_stats"]
        assert cpu["cpu_usage"]["total_usage"] > pre["cpu_usage"]["total_usage"] > 0
        assert cpu["system_cpu_usage"] > pre["system_cpu_usage"] > 0
        assert cpu["online_cpus"] >= 1
        # the container's own interfaces (default bridge: eth0), block I/O per device
        assert "eth0" in body["networks"] and "lo" not in body["networks"]
        assert set(body["networks"]["eth0"]) >= {"rx_bytes", "tx_bytes", "rx_packets"}
        assert isinstance(body["blkio_stats"]["io_service_bytes_recursive"], list)
        status, one = daemon.api("GET", f"/containers/{cid}/stats?stream=false&one-shot=true")
        assert status == 200 and one["precpu_stats"]["cpu_usage"]["total_usage"] == 0
        r = daemon.cli("stats", "--no-stream", cid)
        header, row = r.stdout.splitlines()
        assert header.split()[:3] == ["CONTAINER", "ID", "NAME"]
        fields = row.split()
        assert fields[0] == cid[:12]
        assert float(fields[2].rstrip("%")) > 1  # a busy loop (on a machine shared by many)
        assert "64MiB" in row
    finally:
        daemon.cli("rm", "-f", cid)


def test_stats_stream(daemon: Daemon) -> None:
    import http.client
    import socket

    cid = run_d(daemon, "busybox", "sleep", "60")
    try:

        class Conn(http.client.HTTPConnection):
            def connect(conn) -> None:
                conn.sock = socket.socket(socket.AF_UNIX)
                conn.sock.connect(daemon.sock)

        c = Conn("localhost", timeout=60)
        c.request("GET", f"/containers/{cid}/stats")
        resp = c.getresponse()
        first = json.loads(resp.readline())
        second = json.loads(resp.readline())
        assert first["id"] == second["id"] == cid
        assert second["precpu_stats"]["system_cpu_usage"] == first["cpu_stats"]["system_cpu_usage"]
        c.close()
    finally:
        daemon.cli("rm", "-f", cid)


def test_pause_unpause(daemon: Daemon) -> None:
    cid = run_d(daemon, "busybox", "sh", "-c", "while true; do date +%s%N; sleep 0.05; done")
    try:
        daemon.cli("pause", cid)
        state = json.loads(daemon.cli("inspect", cid).stdout)[0]["State"]
        assert state["Paused"] is True and state["Status"] == "paused"
        freezer = cgroup_dir(daemon, cid, "freezer")
        assert (freezer / "freezer.state").read_text().strip() == "FROZEN"
        time.sleep(0.3)  # output written just before the freeze reaches the log
        n = len(daemon.cli("logs", cid).stdout.splitlines())
        time.sleep(0.5)
        assert len(daemon.cli("logs", cid).stdout.splitlines()) == n
        assert "Paused" in daemon.cli("ps").stdout or "paused" in daemon.cli("ps", "-a").stdout
        r = daemon.cli("pause", cid, check=False)
        assert r.returncode == 1 and "is already paused" in r.stderr
        daemon.cli("unpause", cid)
        assert until(lambda: len(daemon.cli("logs", cid).stdout.splitlines()) > n)
        r = daemon.cli("unpause", cid, check=False)
        assert r.returncode == 1 and "is not paused" in r.stderr
        # a paused container can be stopped and removed
        daemon.cli("pause", cid)
        daemon.cli("stop", "-t", "1", cid)
        state = json.loads(daemon.cli("inspect", cid).stdout)[0]["State"]
        assert state["Paused"] is False and state["Running"] is False
    finally:
        daemon.cli("rm", "-f", cid)


def test_top(daemon: Daemon) -> None:
    cid = run_d(daemon, "busybox", "sh", "-c", "sleep 61 & sleep 62")
    try:
        assert until(lambda: "sleep 62" in daemon.cli("top", cid).stdout)
        out = daemon.cli("top", cid).stdout
        assert out.splitlines()[0].split()[:3] == ["UID", "PID", "PPID"]
        assert "sleep 61" in out and "sleep 62" in out
        assert len(out.splitlines()) == 3  # header, two sleeps (sh execs the last one)
        status, body = daemon.api("GET", f"/containers/{cid}/top?ps_args=-o%20pid,comm")
        assert status == 200 and body["Titles"] == ["PID", "COMMAND"]
        assert sorted(p[1] for p in body["Processes"]) == ["sleep", "sleep"]
    finally:
        daemon.cli("rm", "-f", cid)
    status, body = daemon.api("GET", f"/containers/{cid}/top")
    assert status == 404


# --- the v2 code paths, against the machine's cgroup2 hierarchy ----------------------


@pytest.fixture
def v2_cgroup() -> Cgroup:
    hier = Hierarchies.read()
    if not hier.unified:
        pytest.skip("no cgroup2 hierarchy on this machine")
    only_v2 = Hierarchies({}, {}, hier.unified)
    cg = Cgroup(f"/pallet-test-v2-{uuid.uuid4().hex[:8]}", only_v2)
    assert cg.version == 2
    cg.create({})
    yield cg
    cg.destroy()


def test_v2_freeze_stats_kill(v2_cgroup: Cgroup) -> None:
    proc = subprocess.Popen(
        ["sh", "-c", "while true; do :; done"], preexec_fn=lambda: v2_cgroup.add(0)
    )
    try:
        assert until(lambda: v2_cgroup.pids() == [proc.pid])
        v2_cgroup.freeze(True)
        d = Path(v2_cgroup.dirs["unified"])
        assert until(lambda: "frozen 1" in (d / "cgroup.events").read_text())
        v2_cgroup.freeze(False)
        assert until(lambda: "frozen 0" in (d / "cgroup.events").read_text())
        assert until(lambda: (v2_cgroup.stats().get("cpu_usage_ns") or 0) > 0)
        from pallet.lifecycle import Lifecycle

        cpu = Lifecycle._cpu(None, v2_cgroup)  # type: ignore[arg-type]
        assert cpu["cpu_usage"]["total_usage"] > 0
        v2_cgroup.kill_all()
        assert proc.wait() == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert os.path.isdir(v2_cgroup.dirs["unified"])


def test_v2_resource_files(tmp_path: Path) -> None:
    """The v2 writes (memory.max, memory.swap.max, cpu.max, cpu.weight, cpuset, pids.max,
    io.weight) on a hierarchy laid out like cgroup2: this machine's real cgroup2 has no
    memory/cpu/pids controllers to delegate, so the files are plain ones here."""
    root = tmp_path / "cg2"
    cg_dir = root / "pallet" / "c1"
    cg_dir.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "pallet" / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "pallet" / "cgroup.subtree_control").write_text("")
    for name in (
        "memory.max",
        "memory.swap.max",
        "memory.low",
        "cpu.max",
        "cpu.weight",
        "cpuset.cpus",
        "pids.max",
        "io.weight",
        "cgroup.freeze",
    ):
        (cg_dir / name).write_text("")
    cg = Cgroup("/pallet/c1", Hierarchies({}, {}, str(root)))
    cg.create(
        {
            "memory": {"limit": 64 * MiB, "swap": 96 * MiB, "reservation": 32 * MiB},
            "cpu": {"quota": 50000, "period": 100000, "shares": 512, "cpus": "0"},
            "pids": {"limit": 9},
            "blockIO": {"weight": 500},
        }
    )

    def read(name: str) -> str:
        return (cg_dir / name).read_text().strip()

    assert read("memory.max") == str(64 * MiB)
    assert read("memory.swap.max") == str(32 * MiB)  # v2 counts swap alone
    assert read("memory.low") == str(32 * MiB)
    assert read("cpu.max") == "50000 100000"
    assert read("cpu.weight") == "20"  # runc's shares -> weight conversion
    assert read("cpuset.cpus") == "0" and read("pids.max") == "9"
    assert read("io.weight") == "default 4950"  # runc: 1 + (w - 10) * 9999 // 990
    assert set((root / "cgroup.subtree_control").read_text().split()) >= {"+cpu", "+memory"}
    cg.apply({"memory": {"limit": 0, "swap": -1}, "pids": {"limit": -1}})
    assert read("memory.max") == "max" and read("memory.swap.max") == "max"
    assert read("pids.max") == "max"
    cg.freeze(True)
    assert read("cgroup.freeze") == "1"
