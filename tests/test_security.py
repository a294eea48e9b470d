"""Hardening of real containers (exec_native, Docker's defaults): capability sets,
seccomp, no_new_privs, masked and read-only paths, read-only rootfs, privileged,
users and groups, rlimits, devices, tmpfs, --init; bad input refused cleanly."""

from __future__ import annotations

import json
import os
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


# --- the pieces on their own: profile selection, compiler, capability sets ------------


def test_default_profile_selection_by_arch_and_caps() -> None:
    from pallet.seccomp import default_profile, parse_profile, to_oci
    from pallet.spec import DEFAULT_CAPABILITIES

    prof = parse_profile(default_profile(), "default")

    def names(oci: dict) -> set[str]:
        return {n for r in oci["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}

    amd64 = to_oci(prof, DEFAULT_CAPABILITIES, arch="amd64", kernel=(6, 1))
    assert amd64["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert {"arch_prctl", "modify_ldt", "ptrace"} <= names(amd64)
    assert not {"mount", "unshare", "keyctl", "add_key", "reboot"} & names(amd64)
    clone = [r for r in amd64["syscalls"] if r["names"] == ["clone"]]
    assert clone[0]["args"] == [
        {"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
    ]
    clone3 = [r for r in amd64["syscalls"] if r["names"] == ["clone3"]]
    assert clone3[0]["action"] == "SCMP_ACT_ERRNO" and clone3[0]["errnoRet"] == 38

    arm64 = to_oci(prof, DEFAULT_CAPABILITIES, arch="arm64", kernel=(6, 1))
    assert arm64["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert "arch_prctl" not in names(arm64) and "set_tls" in names(arm64)
    # old kernels: no ptrace without CAP_SYS_PTRACE
    assert "ptrace" not in names(to_oci(prof, DEFAULT_CAPABILITIES, arch="amd64", kernel=(4, 4)))

    admin = to_oci(prof, [*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"], arch="amd64", kernel=(6, 1))
    assert {"mount", "unshare", "setns", "clone3"} <= names(admin)
    assert not [r for r in admin["syscalls"] if r["names"] == ["clone"] and r.get("args")]


def test_compiler_multi_arch_and_load_in_child() -> None:
    import os

    from pallet.plugins.exec_native import seccomp

    config = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": [
            "SCMP_ARCH_X86_64",
            "SCMP_ARCH_X86",
            "SCMP_ARCH_AARCH64",
            "SCMP_ARCH_ARM",
        ],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            {"names": ["no_such_syscall_at_all"], "action": "SCMP_ACT_ERRNO"},
        ],
    }
    prog = seccomp.compile_filter(config)
    assert len(prog) % 8 == 0 and len(prog) > 8
    # AUDIT_ARCH_AARCH64 (0xC00000B7) is checked in the program, as is x86_64's (0xC000003E)
    assert (0xC00000B7).to_bytes(4, "little") in prog
    assert (0xC000003E).to_bytes(4, "little") in prog
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").prctl(38, 1, 0, 0, 0)  # no_new_privs
            seccomp.load(prog)
            try:
                os.mkdir("/tmp/pallet-seccomp-never")
            except PermissionError as e:
                code = 0 if e.errno == 13 else 2
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    try:
        seccomp.compile_filter({"defaultAction": "SCMP_ACT_NOPE"})
        raise AssertionError("a bad action compiled")
    except seccomp.SeccompError as e:
        assert "SCMP_ACT_NOPE" in str(e)


def test_capability_arithmetic() -> None:
    from pallet.plugins.exec_native import capabilities as caps
    from pallet.spec import DEFAULT_CAPABILITIES, container_capabilities, normalize_capabilities

    assert caps.mask(caps.numbers(DEFAULT_CAPABILITIES)) == 0xA80425FB
    assert normalize_capabilities(["net_admin", "CAP_KILL", "all"]) == [
        "CAP_NET_ADMIN",
        "CAP_KILL",
        "ALL",
    ]
    assert "CAP_SYS_ADMIN" in container_capabilities(["ALL"], ["CAP_CHOWN"], False)
    assert "CAP_CHOWN" not in container_capabilities(["ALL"], ["CAP_CHOWN"], False)
    assert container_capabilities(["KILL"], ["ALL"], False) == ["CAP_KILL"]
    sets = caps.CapSets.from_spec({"bounding": ["CAP_KILL"], "effective": [], "permitted": []})
    assert sets is not None and sets.bounding == {5}


@pytest.mark.parametrize("runtime", ["native", "runc", "crun"])
def test_same_hardening_on_every_runtime(daemon: Daemon, runtime: str) -> None:
    """One spec for every backend: the capability sets, the seccomp filter, masked and
    read-only paths, memory and pids limits are the same under runc and crun."""
    r = daemon.cli(
        "run",
        "--rm",
        "--runtime",
        runtime,
        "-m",
        "48m",
        "--pids-limit",
        "30",
        "busybox",
        "sh",
        "-c",
        "grep -E '^(CapEff|CapBnd|CapInh|Seccomp):' /proc/self/status; "
        "unshare -n true 2>/dev/null || echo unshare-refused; "
        "echo 1 > /proc/sys/kernel/ns_last_pid 2>/dev/null || echo procsys-ro; "
        "wc -c < /proc/timer_list; "
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max",
    )
    lines = r.stdout.split("\n")
    fields = dict(line.split(":\t") for line in lines[:4])
    assert fields == {
        "CapInh": "0000000000000000",
        "CapEff": "00000000a80425fb",
        "CapBnd": "00000000a80425fb",
        "Seccomp": "2",
    }
    assert lines[4:9] == ["unshare-refused", "procsys-ro", "0", str(48 * 1024 * 1024), "30"]


@pytest.mark.parametrize("runtime", ["native", "runc", "crun"])
def test_privileged_on_every_runtime(daemon: Daemon, runtime: str) -> None:
    """--privileged: every capability the daemon itself may hand on (a sandboxed
    daemon lacks some), no seccomp, the host's devices."""
    own = next(
        line.split()[1]
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("CapBnd:")
    )
    r = daemon.cli(
        "run",
        "--rm",
        "--runtime",
        runtime,
        "--privileged",
        "busybox",
        "sh",
        "-c",
        "grep -E '^(CapEff|Seccomp):' /proc/self/status; test -c /dev/tty0 && echo tty0",
    )
    lines = r.stdout.split("\n")
    assert lines[0].split()[1] == own and lines[1].split()[1] == "0"
    if os.path.exists("/dev/tty0"):
        assert lines[2] == "tty0"


def test_device_cgroup_rule(daemon: Daemon) -> None:
    if not os.path.exists("/dev/loop0"):
        pytest.skip("no /dev/loop0 on this machine")
    script = "mknod /tmp/l b 7 0 && head -c 0 /tmp/l && echo opened"
    r = daemon.cli("run", "--rm", "busybox", "sh", "-c", script, check=False)
    assert "opened" not in r.stdout and "Operation not permitted" in r.stderr
    r = daemon.cli(
        "run", "--rm", "--device-cgroup-rule", "b 7:* rwm", "busybox", "sh", "-c", script
    )
    assert r.stdout == "opened\n"
    r = daemon.cli("create", "--device-cgroup-rule", "x 1:2", "busybox", check=False)
    assert r.returncode == 125 and "invalid device cgroup format 'x 1:2'" in r.stderr
