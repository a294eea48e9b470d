"""Hardening of real containers (exec_native, Docker's defaults): capability sets,
seccomp, no_new_privs, masked and read-only paths, read-only rootfs, privileged,
users and groups, rlimits, devices, tmpfs, --init; bad input refused cleanly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.test_cli_e2e import until


def overlay_daemon(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Iterator[Daemon]:
    """What these modules test does not depend on the storage driver: one daemon
    (overlay) instead of conftest's pair keeps the suite within its time budget."""
    d = Daemon(tmp_path_factory.mktemp("palletd-overlay"), "overlay", [])
    d.start()
    try:
        d.import_busybox(busybox_tar)
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Iterator[Daemon]:
    yield from overlay_daemon(tmp_path_factory, busybox_tar)


def status_fields(daemon: Daemon, *flags: str) -> dict[str, str]:
    r = daemon.cli("run", "--rm", *flags, "busybox", "cat", "/proc/self/status")
    out = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def api_run(daemon: Daemon, host_config: dict, cmd: list[str], user: str = "") -> tuple[int, str]:
    """create + start + wait + logs through the API (flags the CLI may not have)."""
    status, body = daemon.api(
        "POST",
        "/containers/create",
        {"Image": "busybox", "Cmd": cmd, "User": user, "HostConfig": host_config},
    )
    assert status == 201, body
    cid = body["Id"]
    try:
        status, body = daemon.api("POST", f"/containers/{cid}/start")
        assert status == 204, body
        status, body = daemon.api("POST", f"/containers/{cid}/wait")
        code = body["StatusCode"]
        r = daemon.cli("logs", cid)
        return code, r.stdout + r.stderr
    finally:
        daemon.api("DELETE", f"/containers/{cid}?force=1")


def test_default_capabilities(daemon: Daemon) -> None:
    f = status_fields(daemon)
    assert f["CapEff"] == "00000000a80425fb"
    assert f["CapPrm"] == "00000000a80425fb"
    assert f["CapBnd"] == "00000000a80425fb"
    assert f["CapInh"] == "0000000000000000"
    assert f["CapAmb"] == "0000000000000000"
    assert f["NoNewPrivs"] == "0"  # Docker's default
    assert f["Seccomp"] == "2"  # filter mode


def test_cap_add_drop(daemon: Daemon) -> None:
    f = status_fields(daemon, "--cap-add", "NET_ADMIN", "--cap-drop", "chown")
    eff = int(f["CapEff"], 16)
    assert eff & (1 << 12)  # CAP_NET_ADMIN
    assert not eff & 1  # CAP_CHOWN
    assert eff == (0xA80425FB | 1 << 12) & ~1
    f = status_fields(daemon, "--cap-drop", "ALL", "--cap-add", "CAP_KILL")
    assert f["CapEff"] == f"{1 << 5:016x}"


def test_non_root_user_has_no_effective_caps(daemon: Daemon) -> None:
    f = status_fields(daemon, "-u", "1000:1000")
    assert f["CapEff"] == "0000000000000000"
    assert f["CapBnd"] == "00000000a80425fb"
    assert f["Uid"].split()[0] == "1000" and f["Gid"].split()[0] == "1000"


def test_privileged(daemon: Daemon) -> None:
    r = daemon.cli(
        "run",
        "--rm",
        "--privileged",
        "busybox",
        "sh",
        "-c",
        "grep -E '^(CapEff|Seccomp):' /proc/self/status; "
        "echo 1 > /proc/sys/kernel/ns_last_pid && echo procsys-writable; "
        "ls /dev/ | grep -c . ; mount | grep ' /sys ' ",
    )
    lines = r.stdout.splitlines()
    caps = int(lines[0].split()[1], 16)
    assert caps & (1 << 21)  # CAP_SYS_ADMIN
    assert lines[1].split()[1] == "0"  # no seccomp
    assert "procsys-writable" in r.stdout
    assert "(rw," in lines[-1]


def test_seccomp_default_refuses_forbidden_syscalls(daemon: Daemon) -> None:
    # busybox's unshare calls unshare(2); the default profile refuses it (no SYS_ADMIN)
    r = daemon.cli("run", "--rm", "busybox", "unshare", "-n", "true", check=False)
    assert r.returncode != 0
    assert "Operation not permitted" in r.stderr
    # with CAP_SYS_ADMIN the profile allows it
    r = daemon.cli("run", "--rm", "--cap-add", "SYS_ADMIN", "busybox", "unshare", "-n", "true")
    assert r.returncode == 0
    # unconfined: the syscall reaches the kernel, which refuses it for lack of CAP_SYS_ADMIN
    r = daemon.cli(
        "run",
        "--rm",
        "--security-opt",
        "seccomp=unconfined",
        "busybox",
        "grep",
        "Seccomp:",
        "/proc/self/status",
    )
    assert r.stdout.split()[1] == "0"


def test_seccomp_profile_file(daemon: Daemon, tmp_path: Path) -> None:
    # a profile that allows everything but mkdir (docker CLI style: JSON in SecurityOpt)
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}],
    }
    _code, out = api_run(
        daemon,
        {"SecurityOpt": ["seccomp=" + json.dumps(profile)]},
        ["sh", "-c", "mkdir /tmp/x; echo rc=$?; touch /tmp/y && echo touched"],
    )
    assert "rc=1" in out and "touched" in out
    # pallet's CLI reads the file, as docker's does
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    r = daemon.cli(
        "run",
        "--rm",
        "--security-opt",
        f"seccomp={path}",
        "busybox",
        "sh",
        "-c",
        "mkdir /tmp/x || echo refused",
    )
    assert "refused" in r.stdout


def test_no_new_privileges(daemon: Daemon) -> None:
    f = status_fields(daemon, "--security-opt", "no-new-privileges")
    assert f["NoNewPrivs"] == "1"
    assert f["Seccomp"] == "2"


def test_masked_and_readonly_paths(daemon: Daemon) -> None:
    r = daemon.cli(
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "wc -c < /proc/timer_list; ls /sys/firmware | wc -l; "
        "echo 1 > /proc/sys/kernel/ns_last_pid || echo sys-ro; "
        "echo x > /proc/sysrq-trigger || echo sysrq-ro; "
        "touch /sys/kernel/x || echo sysfs-ro",
        check=False,
    )
    lines = r.stdout.split()
    assert lines[0] == "0" and lines[1] == "0"
    assert "sys-ro" in r.stdout and "sysrq-ro" in r.stdout and "sysfs-ro" in r.stdout
    assert "Read-only file system" in r.stderr


def test_read_only_rootfs_and_tmpfs(daemon: Daemon) -> None:
    r = daemon.cli(
        "run",
        "--rm",
        "--read-only",
        "--tmpfs",
        "/run:size=1m,mode=1777",
        "busybox",
        "sh",
        "-c",
        "touch /etc/x || echo root-ro; touch /run/ok && echo run-rw; grep ' /run ' /proc/mounts",
        check=False,
    )
    assert "root-ro" in r.stdout and "run-rw" in r.stdout
    mount_line = r.stdout.strip().splitlines()[-1]
    assert "tmpfs" in mount_line and "size=1024k" in mount_line
    assert "noexec" in mount_line and "nosuid" in mount_line


def test_user_groups_and_ulimits(daemon: Daemon) -> None:
    r = daemon.cli(
        "run",
        "--rm",
        "-u",
        "1000:1000",
        "--group-add",
        "10",
        "--group-add",
        "daemon",
        "--ulimit",
        "nofile=100:200",
        "--ulimit",
        "nproc=50",
        "busybox",
        "sh",
        "-c",
        "id -G; ulimit -n; ulimit -Hn; ulimit -u",
    )
    lines = r.stdout.split("\n")
    assert set(lines[0].split()) == {"1000", "10", "1"}  # busybox: daemon is gid 1
    assert lines[1:4] == ["100", "200", "50"]


def test_device(daemon: Daemon) -> None:
    r = daemon.cli(
        "run",
        "--rm",
        "--device",
        "/dev/null:/dev/mynull:rw",
        "busybox",
        "sh",
        "-c",
        "ls -l /dev/mynull; echo hi > /dev/mynull && echo written",
    )
    assert r.stdout.startswith("c") and "1,   3" in r.stdout and "written" in r.stdout
    # the device cgroup refuses an unlisted node even to root with CAP_MKNOD
    r = daemon.cli(
        "run", "--rm", "busybox", "sh", "-c", "mknod /tmp/sda b 8 0 && cat /tmp/sda", check=False
    )
    assert r.returncode != 0 and "Operation not permitted" in r.stderr


def test_init(daemon: Daemon) -> None:
    r = daemon.cli(
        "run",
        "--rm",
        "--init",
        "busybox",
        "sh",
        "-c",
        "cat /proc/1/cmdline | tr '\\0' ' '; echo; echo $$",
    )
    first, pid = r.stdout.splitlines()
    assert first.startswith("/sbin/docker-init -- sh")
    assert pid != "1"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-u", "nosuchuser"], "unable to find user nosuchuser"),
        (["--group-add", "nosuchgroup"], "Unable to find group nosuchgroup"),
        (["--cap-add", "CAP_NOPE"], "invalid CapAdd: unknown capability: 'CAP_NOPE'"),
        (["--security-opt", "foo=bar"], 'invalid --security-opt 2: "foo=bar"'),
        (["--device", "/dev/nope"], 'adding custom device "/dev/nope"'),
        (["--ulimit", "nofile=20:10"], "ulimit soft limit must be less than or equal"),
        (["--memory", "1k"], "Minimum memory limit allowed is 6MB"),
    ],
)
def test_bad_input(daemon: Daemon, flags: list[str], message: str) -> None:
    before = set(daemon.cli("ps", "-aq").stdout.split())
    r = daemon.cli("run", "--rm", *flags, "busybox", "true", check=False)
    assert r.returncode == 125, r
    assert message in r.stderr
    assert until(lambda: set(daemon.cli("ps", "-aq").stdout.split()) == before)


def test_bad_seccomp_profile_via_api(daemon: Daemon) -> None:
    for opt, message in [
        ('seccomp={"defaultAction": "SCMP_ACT_NOPE"}', "unknown action 'SCMP_ACT_NOPE'"),
        ("seccomp={bad", "Decoding seccomp profile failed"),
        ("apparmor", 'invalid --security-opt 1: "apparmor"'),
    ]:
        status, body = daemon.api(
            "POST", "/containers/create", {"Image": "busybox", "HostConfig": {"SecurityOpt": [opt]}}
        )
        assert status == 400 and message in body["message"], body


def test_bad_seccomp_profile_via_cli(daemon: Daemon, tmp_path: Path) -> None:
    r = daemon.cli("run", "--rm", "--security-opt", "seccomp=/nope.json", "busybox", check=False)
    assert r.returncode == 125 and "opening seccomp profile (/nope.json) failed" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"syscalls": []}')
    r = daemon.cli("run", "--rm", "--security-opt", f"seccomp={bad}", "busybox", check=False)
    assert r.returncode == 125 and "Decoding seccomp profile failed" in r.stderr
