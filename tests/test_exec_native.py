"""The native execution backend, for real: busybox containers run through the shim.

Each test builds a busybox rootfs, writes a Docker-like OCI spec, runs it through
:class:`pallet.shim.ShimClient` with ``NativeBackend`` and checks what the container
saw, and that nothing (mounts, cgroups, processes) is left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pallet.execution import ExecError
from pallet.shim import ExitStatus, ShimClient, read_exit

from tests.rootfs import (
    NATIVE,
    alive,
    cgroup_dirs,
    have_busybox,
    kill_leftover_shims,
    make_bundle,
    mounts_under,
    processes_in_cgroup,
    read_log,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not have_busybox(), reason="needs /bin/busybox (busybox-static)"),
]

T = TypeVar("T")
TIMEOUT = 120  # only to turn a hang into a failure; never a performance limit


@pytest.fixture(autouse=True)
def _no_leftover_shims(tmp_path: Path) -> Iterator[None]:
    yield
    assert kill_leftover_shims(tmp_path) == [], "a monitor was still running after the test"


def arun(coro: Awaitable[T]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(guarded())


@dataclass
class Result:
    status: ExitStatus
    bundle: Path
    spec: dict[str, Any]
    pid: int
    chunks: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        return b"".join(d for s, d in self.chunks if s == 1).decode()

    @property
    def stderr(self) -> str:
        return b"".join(d for s, d in self.chunks if s == 2).decode()

    @property
    def log(self) -> list[dict[str, Any]]:
        return read_log(self.bundle / "log.json")


def assert_clean(tmp: Path, spec: dict[str, Any], pids: list[int]) -> None:
    cg = spec["linux"]["cgroupsPath"]
    assert mounts_under(tmp) == []
    assert cgroup_dirs(cg) == []
    assert processes_in_cgroup(cg) == []
    for pid in pids:
        assert not alive(pid), f"process {pid} is still alive"


async def _run(
    tmp: Path,
    args: list[str],
    *,
    stdin: bytes | None = None,
    during: Callable[[ShimClient, Result], Awaitable[None]] | None = None,
    **kw: Any,
) -> Result:
    bundle, spec = make_bundle(tmp, args, **kw)
    chunks: list[tuple[int, bytes]] = []
    client = await ShimClient.launch(
        bundle, NATIVE, bundle / "log.json", stdin is not None, lambda s, d: chunks.append((s, d))
    )
    result = Result(ExitStatus(-1, False, ""), bundle, spec, client.pid, chunks)
    try:
        await client.start()
        if stdin is not None and during is None:
            await client.write_stdin(stdin)
            await client.close_stdin()
        if during is not None:
            await during(client, result)
        result.status = await client.wait()
    finally:
        await client.close()
    return result


def run(tmp: Path, args: list[str], **kw: Any) -> Result:
    result = arun(_run(tmp, args, **kw))
    assert_clean(tmp, result.spec, [result.pid])
    return result


def sh(tmp: Path, script: str, **kw: Any) -> Result:
    return run(tmp, ["sh", "-c", script], **kw)


# --- process basics -------------------------------------------------------------------


def test_stdout_stderr_and_log(tmp_path: Path) -> None:
    r = sh(tmp_path, "echo out1; echo err1 >&2; echo out2")
    assert r.status.exit_code == 0
    assert r.stdout == "out1\nout2\n"
    assert r.stderr == "err1\n"
    log = r.log
    assert [(e["stream"], e["log"]) for e in log if e["stream"] == "stdout"] == [
        ("stdout", "out1\n"),
        ("stdout", "out2\n"),
    ]
    assert [e["log"] for e in log if e["stream"] == "stderr"] == ["err1\n"]
    assert all(list(e) == ["log", "stream", "time"] for e in log)


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_code(tmp_path: Path, code: int) -> None:
    assert sh(tmp_path, f"exit {code}").status.exit_code == code


def test_signal_exit_is_128_plus_signal(tmp_path: Path) -> None:
    # pid 1 of a pid namespace ignores signals it has no handler for, so this runs the
    # shell in the host pid namespace, where `kill -TERM $$` kills it as usual.
    bundle_kw: dict[str, Any] = {}
    r = arun(_run_no_pidns(tmp_path, ["sh", "-c", "kill -TERM $$; sleep 5"], **bundle_kw))
    assert r.status.exit_code == 128 + signal.SIGTERM
    assert_clean(tmp_path, r.spec, [r.pid])


async def _run_no_pidns(tmp: Path, args: list[str], **kw: Any) -> Result:
    from tests.rootfs import write_spec

    bundle, spec = make_bundle(tmp, args, **kw)
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "pid"]
    write_spec(bundle, spec)
    chunks: list[tuple[int, bytes]] = []
    client = await ShimClient.launch(
        bundle, NATIVE, bundle / "log.json", False, lambda s, d: chunks.append((s, d))
    )
    try:
        await client.start()
        status = await client.wait()
    finally:
        await client.close()
    return Result(status, bundle, spec, client.pid, chunks)


def test_env(tmp_path: Path) -> None:
    env = ["PATH=/bin:/usr/bin", "FOO=bar baz", "EMPTY=", "HOME=/root"]
    r = run(tmp_path, ["env"], env=env)
    assert sorted(r.stdout.splitlines()) == sorted(env)


def test_cwd(tmp_path: Path) -> None:
    assert sh(tmp_path, "pwd", cwd="/tmp").stdout == "/tmp\n"


def test_missing_cwd_is_created(tmp_path: Path) -> None:
    r = sh(tmp_path, "pwd; ls -ld . | cut -c1-10", cwd="/does/not/exist")
    assert r.stdout == "/does/not/exist\ndrwxr-xr-x\n"


def test_pid_1_and_only_own_processes(tmp_path: Path) -> None:
    r = sh(tmp_path, "echo $$; ps -o pid,comm; true")
    lines = r.stdout.splitlines()
    assert lines[0] == "1"
    procs = [line.split() for line in lines[2:]]
    assert ["1", "sh"] in procs
    assert {p[1] for p in procs} <= {"sh", "ps"}
    assert len(procs) <= 2


def test_hostname(tmp_path: Path) -> None:
    assert run(tmp_path, ["hostname"], hostname="box-1").stdout == "box-1\n"


def test_user_and_groups(tmp_path: Path) -> None:
    r = run(tmp_path, ["id"], uid=1000, gid=1000, additional_gids=[2000])
    assert r.stdout == "uid=1000(user) gid=1000(user) groups=2000(extra)\n"
    assert run(tmp_path, ["id", "-u"]).stdout == "0\n"


def test_non_root_cannot_write_root_dirs(tmp_path: Path) -> None:
    r = sh(tmp_path, "touch /etc/x 2>/dev/null && echo yes || echo no", uid=1000, gid=1000)
    assert r.stdout == "no\n"


def test_network_namespace_has_only_lo_up(tmp_path: Path) -> None:
    r = sh(tmp_path, "ip -o link; ip -o addr show lo | grep -c 127.0.0.1")
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("1: lo: <LOOPBACK,UP,LOWER_UP>")
    assert lines[1] == "1"


def test_mounts_inside(tmp_path: Path) -> None:
    r = sh(
        tmp_path,
        "ls /dev | sort | tr '\\n' ' '; echo; "
        "test -c /dev/null && echo null-ok; "
        "readlink /dev/fd; readlink /dev/ptmx; "
        "grep -E ' (/proc|/dev|/dev/pts|/dev/shm|/dev/mqueue|/sys) ' /proc/mounts | cut -d' ' -f2,3; "
        "touch /sys/x 2>/dev/null || echo sys-ro; "
        "echo hi > /dev/shm/x && cat /dev/shm/x",
    )
    lines = r.stdout.splitlines()
    devs = set(lines[0].split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "mqueue",
            "fd", "stdin", "stdout", "stderr", "ptmx"} <= devs  # fmt: skip
    assert "null-ok" in lines
    assert "/proc/self/fd" in lines and "pts/ptmx" in lines
    mounts = set(lines[lines.index("pts/ptmx") + 1 :])
    assert {"/proc proc", "/dev tmpfs", "/dev/pts devpts", "/dev/shm tmpfs",
            "/dev/mqueue mqueue", "/sys sysfs"} <= mounts  # fmt: skip
    assert "sys-ro" in lines
    assert lines[-1] == "hi"


def test_masked_and_readonly_paths(tmp_path: Path) -> None:
    r = sh(
        tmp_path,
        "cat /proc/timer_list | wc -c; ls /sys/firmware | wc -l; "
        "echo 1 > /proc/sys/kernel/domainname 2>/dev/null || echo sys-ro",
    )
    assert r.stdout.split() == ["0", "0", "sys-ro"]


def test_readonly_rootfs(tmp_path: Path) -> None:
    r = sh(tmp_path, "touch /x 2>/dev/null || echo ro; touch /dev/shm/y && echo shm-rw",
           readonly=True)  # fmt: skip
    assert r.stdout == "ro\nshm-rw\n"


def test_bind_mount_ro_and_rw(tmp_path: Path) -> None:
    src = tmp_path / "data"
    src.mkdir()
    (src / "f").write_text("host\n")
    bundle, spec = make_bundle(
        tmp_path, ["sh", "-c", "cat /data/f /ro/f; echo c > /data/g; touch /ro/h || echo ro"]
    )
    spec["mounts"] += [
        {"destination": "/data", "type": "bind", "source": str(src), "options": ["rbind"]},
        {"destination": "/ro", "type": "bind", "source": str(src), "options": ["rbind", "ro"]},
    ]
    from tests.rootfs import write_spec

    write_spec(bundle, spec)
    chunks: list[tuple[int, bytes]] = []

    async def go() -> ExitStatus:
        c = await ShimClient.launch(bundle, NATIVE, bundle / "log.json", False,
                                    lambda s, d: chunks.append((s, d)))  # fmt: skip
        await c.start()
        st = await c.wait()
        await c.close()
        return st

    assert arun(go()).exit_code == 0
    out = b"".join(d for s, d in chunks if s == 1).decode()
    assert out == "host\nhost\nro\n"
    assert (src / "g").read_text() == "c\n"
    assert not (src / "h").exists()
    assert mounts_under(tmp_path) == []


def test_capabilities_and_no_new_privs(tmp_path: Path) -> None:
    r = sh(tmp_path, "grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status")
    fields = dict(line.split(":\t") for line in r.stdout.splitlines())
    assert fields["CapBnd"] == "00000000a80425fb"  # Docker's 14 default capabilities
    assert fields["CapEff"] == "00000000a80425fb"
    assert fields["NoNewPrivs"] == "1"


def test_rlimits(tmp_path: Path) -> None:
    bundle_kw: dict[str, Any] = {}
    r = arun(_run_rlimit(tmp_path, **bundle_kw))
    assert r.stdout == "1024\n4096\n"


async def _run_rlimit(tmp: Path) -> Result:
    from tests.rootfs import write_spec

    bundle, spec = make_bundle(tmp, ["sh", "-c", "ulimit -n; ulimit -Hn"])
    spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}]
    write_spec(bundle, spec)
    chunks: list[tuple[int, bytes]] = []
    c = await ShimClient.launch(bundle, NATIVE, bundle / "log.json", False,
                                lambda s, d: chunks.append((s, d)))  # fmt: skip
    await c.start()
    st = await c.wait()
    await c.close()
    return Result(st, bundle, spec, c.pid, chunks)


def test_default_signal_dispositions(tmp_path: Path) -> None:
    # Python ignores SIGPIPE; the container must not inherit that.
    r = run(tmp_path, ["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"])
    fields = dict(line.split(":\t") for line in r.stdout.splitlines())
    assert int(fields["SigIgn"], 16) == 0
    assert int(fields["SigBlk"], 16) == 0


def test_stdin(tmp_path: Path) -> None:
    r = run(tmp_path, ["sh", "-c", "cat; echo end"], stdin=b"line1\nline2\n")
    assert r.stdout == "line1\nline2\nend\n"


def test_no_stdin_is_dev_null(tmp_path: Path) -> None:
    assert sh(tmp_path, "cat; echo eof").stdout == "eof\n"


# --- cgroups ----------------------------------------------------------------------------


def test_cgroups_applied_while_running_and_removed_after(tmp_path: Path) -> None:
    limit = 64 * 1024 * 1024
    resources = {
        "memory": {"limit": limit, "swap": limit},
        "pids": {"limit": 50},
        "cpu": {"shares": 512, "quota": 50000, "period": 100000},
    }
    seen: dict[str, str] = {}

    async def during(client: ShimClient, result: Result) -> None:
        from pallet.cgroups import Cgroup

        while "ready" not in result.stdout:
            await asyncio.sleep(0.01)
        cg = Cgroup(result.spec["linux"]["cgroupsPath"])
        assert cg.exists()
        for ctrl, name in [
            ("memory", "memory.limit_in_bytes"),
            ("memory", "memory.memsw.limit_in_bytes"),
            ("pids", "pids.max"),
            ("cpu", "cpu.shares"),
            ("cpu", "cpu.cfs_quota_us"),
        ]:
            d = cg.dir_for(ctrl)
            assert d is not None
            path = os.path.join(d, name)
            if os.path.exists(path):
                seen[name] = Path(path).read_text().strip()
        seen["procs"] = " ".join(str(p) for p in cg.pids())
        await client.write_stdin(b"go\n")
        await client.close_stdin()

    r = run(
        tmp_path,
        ["sh", "-c", "echo ready; read x; cat /sys/fs/cgroup/memory/memory.limit_in_bytes"],
        stdin=b"",
        during=during,
        resources=resources,
    )
    assert r.status.exit_code == 0
    assert seen["memory.limit_in_bytes"] == str(limit)
    assert seen.get("memory.memsw.limit_in_bytes", str(limit)) == str(limit)
    assert seen["pids.max"] == "50"
    assert seen["cpu.shares"] == "512"
    assert seen["cpu.cfs_quota_us"] == "50000"
    assert seen["procs"] == str(r.pid)
    # the container sees its own cgroup at /sys/fs/cgroup
    assert r.stdout.splitlines()[-1] == str(limit)


def test_pids_limit_enforced(tmp_path: Path) -> None:
    r = sh(
        tmp_path,
        "i=0; while [ $i -lt 30 ]; do sleep 60 & i=$((i+1)); done; echo spawned",
        resources={"pids": {"limit": 10}},
    )
    assert "can't fork" in r.stderr or "Resource temporarily unavailable" in r.stderr


def test_oom_killed(tmp_path: Path) -> None:
    limit = 16 * 1024 * 1024
    r = sh(
        tmp_path,
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        resources={"memory": {"limit": limit, "swap": limit}},
    )
    assert r.status.oom_killed
    assert r.status.exit_code == 137 or "survived" not in r.stdout


def test_relative_cgroups_path(tmp_path: Path) -> None:
    rel = f"pallet-test-rel-{uuid.uuid4().hex[:8]}"
    r = sh(tmp_path, "cat /proc/self/cgroup | grep memory", cgroups_path=rel)
    own = next(
        line.split(":", 2)[2]
        for line in Path("/proc/self/cgroup").read_text().splitlines()
        if line.split(":")[1] == "memory"
    )
    # within its cgroup namespace-less view the container sees the full host path
    assert r.stdout.strip().endswith(os.path.join(own, rel))


# --- lifecycle and errors ----------------------------------------------------------------


def test_kill_before_start(tmp_path: Path) -> None:
    bundle, spec = make_bundle(tmp_path, ["sh", "-c", "echo never"])

    async def go() -> tuple[ExitStatus, int, ExecError | None]:
        out: list[bytes] = []
        c = await ShimClient.launch(bundle, NATIVE, bundle / "log.json", False,
                                    lambda s, d: out.append(d))  # fmt: skip
        await c.kill(signal.SIGKILL)
        st = await c.wait()
        err = None
        try:
            await c.start()
        except ExecError as e:
            err = e
        await c.close()
        assert out == []
        return st, c.pid, err

    st, pid, err = arun(go())
    assert st.exit_code == 137
    assert err is not None
    assert_clean(tmp_path, spec, [pid])


def test_kill_after_start(tmp_path: Path) -> None:
    async def during(client: ShimClient, result: Result) -> None:
        await client.kill(signal.SIGKILL)

    r = run(tmp_path, ["sleep", "1000"], during=during)
    assert r.status.exit_code == 137


def test_term_with_handler(tmp_path: Path) -> None:
    async def during(client: ShimClient, result: Result) -> None:
        while "ready" not in result.stdout:
            await asyncio.sleep(0.01)
        await client.kill(signal.SIGTERM)

    r = sh(tmp_path, "trap 'echo term; exit 42' TERM; echo ready; while :; do sleep 0.1; done",
           during=during)  # fmt: skip
    assert r.status.exit_code == 42
    assert r.stdout == "ready\nterm\n"


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["nosuchcmd"], 127, 'exec: "nosuchcmd": executable file not found in $PATH'),
        (["/bin/nope"], 127, 'exec: "/bin/nope": stat /bin/nope: no such file or directory'),
        (["/etc/passwd"], 126, 'exec: "/etc/passwd": permission denied'),
        (["/etc"], 126, 'exec: "/etc": is a directory'),
    ],
)
def test_exec_errors(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    bundle, spec = make_bundle(tmp_path, args)

    async def go() -> None:
        await ShimClient.launch(bundle, NATIVE, bundle / "log.json", False, lambda s, d: None)

    with pytest.raises(ExecError) as info:
        arun(go())
    assert info.value.exit_code == code
    assert info.value.message == message
    st = read_exit(bundle)
    assert st is not None and st.exit_code == code and st.error == message
    assert not (bundle / "shim.sock").exists()
    assert_clean(tmp_path, spec, [])


def test_setup_error_names_the_step(tmp_path: Path) -> None:
    bundle, spec = make_bundle(tmp_path, ["true"])
    spec["mounts"].append(
        {"destination": "/x", "type": "bind", "source": "/does/not/exist", "options": ["rbind"]}
    )
    from tests.rootfs import write_spec

    write_spec(bundle, spec)

    async def go() -> None:
        await ShimClient.launch(bundle, NATIVE, bundle / "log.json", False, lambda s, d: None)

    with pytest.raises(ExecError) as info:
        arun(go())
    assert info.value.exit_code == 125
    assert '"/does/not/exist" on "/x"' in info.value.message
    assert "No such file or directory" in info.value.message
    assert_clean(tmp_path, spec, [])


def test_exit_json(tmp_path: Path) -> None:
    r = sh(tmp_path, "exit 7")
    data = json.loads((r.bundle / "exit.json").read_text())
    assert data["exit_code"] == 7
    assert data["oom_killed"] is False
    assert data["pid"] == r.pid
    assert data["finished_at"] == r.status.finished_at
    assert not (r.bundle / "shim.sock").exists()
    assert not (r.bundle / "shim.pid").exists()


def test_probe_and_hook() -> None:
    from pallet.plugins import exec_native
    from pallet.plugins.exec_native.libcontainer import NativeBackend

    assert exec_native.pallet_exec_backends_v1() == [NativeBackend]
    assert NativeBackend.name == "native"
    NativeBackend.probe()


# --- the backend on its own, and its helpers ----------------------------------------------


def test_backend_directly_without_shim(tmp_path: Path) -> None:
    """create/start/delete called in-process: the caller becomes the init's parent (the
    backend makes it a subreaper) and modules needed after pivot_root are preloaded."""
    from pallet.execution import Stdio
    from pallet.plugins.exec_native.libcontainer import NativeBackend

    bundle, spec = make_bundle(tmp_path, ["sh", "-c", "echo direct; exit 6"])
    backend = NativeBackend()
    r, w = os.pipe()
    try:
        pid = backend.create(bundle, spec, Stdio(None, w, w))
        os.close(w)
        w = -1
        backend.start(bundle, pid)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 6
        assert os.read(r, 100) == b"direct\n"
        assert not backend.oom_killed(bundle, spec)
        backend.delete(bundle, spec)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert_clean(tmp_path, spec, [pid])


@pytest.mark.parametrize("zygote", ["1", "0"])
def test_with_and_without_zygote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zygote: str
) -> None:
    monkeypatch.setenv("PALLET_SHIM_ZYGOTE", zygote)
    r = sh(tmp_path, "echo $$ ok")
    assert r.stdout == "1 ok\n"


def test_secure_join_stays_inside(tmp_path: Path) -> None:
    from pallet.plugins.exec_native.libcontainer import secure_join

    root = tmp_path / "root"
    (root / "a/b").mkdir(parents=True)
    (root / "abs").symlink_to("/etc")
    (root / "rel").symlink_to("../../../../etc")
    (root / "a/up").symlink_to("..")
    (root / "loop").symlink_to("loop")
    r = str(root)
    assert secure_join(r, "/abs/passwd") == f"{r}/etc/passwd"
    assert secure_join(r, "/rel") == f"{r}/etc"
    assert secure_join(r, "/../../x") == f"{r}/x"
    assert secure_join(r, "/a/up/a/b/new/dir") == f"{r}/a/b/new/dir"
    assert secure_join(r, "/") == r
    with pytest.raises(OSError):
        secure_join(r, "/loop")


def test_parse_mount_options() -> None:
    from pallet import linux
    from pallet.plugins.exec_native.libcontainer import parse_mount_options

    flags, data, prop = parse_mount_options(
        ["rbind", "ro", "nosuid", "rw", "rprivate", "mode=755", "size=1k"]
    )
    assert flags == linux.MS_BIND | linux.MS_REC | linux.MS_NOSUID
    assert data == "mode=755,size=1k"
    assert prop == [linux.MS_PRIVATE | linux.MS_REC]


def test_cgroup_v2_layout(tmp_path: Path) -> None:
    """The v2 code path on the machine's cgroup2 hierarchy (controller-less when the
    host is hybrid): create, join, list, kill, remove."""
    import subprocess

    from pallet.cgroups import UNIFIED, Cgroup, Hierarchies, hierarchies

    unified = hierarchies().unified
    if unified is None:
        pytest.skip("no cgroup2 hierarchy")
    cg = Cgroup(f"/pallet-test-v2-{uuid.uuid4().hex[:8]}/sub", Hierarchies({}, {}, unified))
    assert cg.version == 2 and list(cg.dirs) == [UNIFIED]
    cg.create({})
    try:
        proc = subprocess.Popen(["sleep", "1000"])
        cg.add(proc.pid)
        assert cg.pids() == [proc.pid]
        cg.kill_all()
        assert proc.wait() == -signal.SIGKILL
    finally:
        cg.destroy()
        os.rmdir(os.path.dirname(cg.dirs[UNIFIED]))
    assert not cg.exists()


def test_cgroup_rejects_escaping_paths() -> None:
    from pallet.cgroups import Cgroup

    with pytest.raises(ValueError):
        Cgroup("/../..")
    with pytest.raises(ValueError):
        Cgroup("")
