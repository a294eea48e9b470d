"""The per-container monitor (pallet.shim) and its client, for real processes.

Most tests use ``tests.rootfs:PlainBackend`` (host processes, no isolation) so that they
test the shim alone; a few use the native backend end to end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from pallet.execution import ExecError
from pallet.shim import ExitStatus, ShimClient, read_exit, shim_pid

from tests.rootfs import (
    NATIVE,
    PLAIN,
    alive,
    cgroup_dirs,
    have_busybox,
    kill_leftover_shims,
    make_bundle,
    mounts_under,
    plain_bundle,
    read_log,
)

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")
TIMEOUT = 120  # only to turn a hang into a failure
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture(autouse=True)
def _importable_tests(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # the shim imports the test backend by name: make ``tests`` importable there
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    yield


@pytest.fixture(autouse=True)
def _no_leftover_shims(tmp_path: Path) -> Iterator[None]:
    yield
    assert kill_leftover_shims(tmp_path) == [], "a monitor was still running after the test"


def arun(coro: Awaitable[T]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(guarded())


class Output:
    def __init__(self) -> None:
        self.chunks: list[tuple[int, bytes]] = []

    def __call__(self, stream: int, data: bytes) -> None:
        self.chunks.append((stream, data))

    def get(self, stream: int) -> bytes:
        return b"".join(d for s, d in self.chunks if s == stream)


async def launch(
    bundle: Path, out: Output, stdin: bool = False, backend: str = PLAIN
) -> ShimClient:
    return await ShimClient.launch(bundle, backend, bundle / "log.json", stdin, out)


async def run_plain(bundle: Path, stdin: bytes | None = None) -> tuple[ExitStatus, Output, int]:
    out = Output()
    c = await launch(bundle, out, stdin is not None)
    await c.start()
    if stdin is not None:
        await c.write_stdin(stdin)
        await c.close_stdin()
    st = await c.wait()
    await c.close()
    return st, out, c.pid


def wait_gone(pid: int) -> None:
    """The shim exits right after sending the exit event: give it that moment."""
    import time

    deadline = time.monotonic() + TIMEOUT
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not alive(pid)


# --- output and the json-file log --------------------------------------------------------


def test_output_streams_and_log_format(tmp_path: Path) -> None:
    bundle = plain_bundle(tmp_path, ["sh", "-c", "echo a; echo b >&2; printf 'c\\nd'"])
    st, out, _ = arun(run_plain(bundle))
    assert st.exit_code == 0
    assert out.get(1) == b"a\nc\nd"
    assert out.get(2) == b"b\n"
    raw = (bundle / "log.json").read_text().splitlines()
    log = [json.loads(line) for line in raw]
    assert raw[0].startswith('{"log":"')  # compact, Docker's key order
    assert [list(e) for e in log] == [["log", "stream", "time"]] * len(log)
    assert all(TIME_RE.match(e["time"]) for e in log)
    assert [(e["stream"], e["log"]) for e in log if e["stream"] == "stdout"] == [
        ("stdout", "a\n"),
        ("stdout", "c\n"),
        ("stdout", "d"),  # the final unterminated line, flushed at exit
    ]
    assert [e["log"] for e in log if e["stream"] == "stderr"] == ["b\n"]
    assert TIME_RE.match(st.finished_at)
    assert (bundle / "deleted").read_text() == "yes"


def test_long_lines_are_split_like_docker(tmp_path: Path) -> None:
    # 40000 bytes without a newline, then a newline: 16 KiB, 16 KiB, rest + "\n"
    bundle = plain_bundle(tmp_path, ["sh", "-c", "head -c 40000 /dev/zero | tr '\\0' a; echo"])
    st, out, _ = arun(run_plain(bundle))
    assert st.exit_code == 0
    assert out.get(1) == b"a" * 40000 + b"\n"
    parts = [e["log"] for e in read_log(bundle / "log.json")]
    assert parts == ["a" * 16384, "a" * 16384, "a" * 7232 + "\n"]


def test_log_appends_and_non_utf8(tmp_path: Path) -> None:
    bundle = plain_bundle(tmp_path, ["sh", "-c", "printf 'caf\\303\\251 \\377\\n'"])
    (bundle / "log.json").write_text('{"log":"old\\n","stream":"stdout","time":"x"}\n')
    arun(run_plain(bundle))
    log = read_log(bundle / "log.json")
    assert [e["log"] for e in log] == ["old\n", "café \ufffd\n"]


def test_stdin_and_large_output(tmp_path: Path) -> None:
    data = b"".join(b"line %d\n" % i for i in range(200000))  # ~2 MB through stdin and back
    bundle = plain_bundle(tmp_path, ["cat"])
    st, out, _ = arun(run_plain(bundle, stdin=data))
    assert st.exit_code == 0
    assert out.get(1) == data
    log = read_log(bundle / "log.json")
    assert len(log) == 200000
    assert log[-1]["log"] == "line 199999\n"


def test_without_stdin_container_reads_eof(tmp_path: Path) -> None:
    bundle = plain_bundle(tmp_path, ["sh", "-c", "cat; echo done"])
    _st, out, _ = arun(run_plain(bundle))
    assert out.get(1) == b"done\n"


# --- lifecycle --------------------------------------------------------------------------


def test_exit_code_signal_and_exit_json(tmp_path: Path) -> None:
    bundle = plain_bundle(tmp_path, ["sh", "-c", "kill -KILL $$"])
    st, _, pid = arun(run_plain(bundle))
    assert st.exit_code == 137
    data = json.loads((bundle / "exit.json").read_text())
    assert data == {
        "exit_code": 137,
        "oom_killed": False,
        "finished_at": st.finished_at,
        "pid": pid,
    }
    assert read_exit(bundle) == st
    assert not (bundle / "shim.sock").exists()
    assert not alive(pid)


def test_create_failure(tmp_path: Path) -> None:
    bundle = plain_bundle(tmp_path, ["fail-create"])
    with pytest.raises(ExecError) as info:
        arun(launch(bundle, Output()))
    assert (info.value.message, info.value.exit_code) == ("create failed on purpose", 42)
    st = read_exit(bundle)
    assert st is not None
    assert (st.exit_code, st.error) == (42, "create failed on purpose")
    assert not (bundle / "shim.sock").exists()
    assert not (bundle / "shim.pid").exists()


def test_bad_backend_reference(tmp_path: Path) -> None:
    bundle = plain_bundle(tmp_path, ["true"])
    with pytest.raises(ExecError) as info:
        arun(launch(bundle, Output(), backend="no.such.module:Backend"))
    assert "loading backend no.such.module:Backend" in info.value.message
    assert "No module named" in info.value.message
    assert info.value.exit_code == 125


def test_start_failure(tmp_path: Path) -> None:
    bundle = plain_bundle(tmp_path, ["fail-start"])

    async def go() -> tuple[ExitStatus, ShimClient]:
        c = await launch(bundle, Output())
        with pytest.raises(ExecError) as info:
            await c.start()
        assert (info.value.message, info.value.exit_code) == ("start failed on purpose", 126)
        st = await c.wait()
        await c.close()
        return st, c

    st, _ = arun(go())
    assert st.exit_code == 126
    assert st.error == "start failed on purpose"


def test_kill_before_start(tmp_path: Path) -> None:
    bundle = plain_bundle(tmp_path, ["echo", "never"])

    async def go() -> tuple[ExitStatus, Output]:
        out = Output()
        c = await launch(bundle, out)
        await c.kill(signal.SIGKILL)
        st = await c.wait()
        with pytest.raises(ExecError):
            await c.start()
        await c.close()
        return st, out

    st, out = arun(go())
    assert st.exit_code == 137
    assert out.chunks == []


def test_double_start_is_refused(tmp_path: Path) -> None:
    bundle = plain_bundle(tmp_path, ["sh", "-c", "read x"])

    async def go() -> int:
        c = await launch(bundle, Output(), stdin=True)
        await c.start()
        with pytest.raises(ExecError, match="already started"):
            await c.start()
        await c.close_stdin()
        st = await c.wait()
        await c.close()
        return st.exit_code

    assert arun(go()) == 1  # `read` at EOF


def test_multiple_clients_and_reconnect(tmp_path: Path) -> None:
    bundle = plain_bundle(tmp_path, ["sh", "-c", "echo one; read x; echo two $x; exit 4"])

    async def go() -> None:
        out1, out2 = Output(), Output()
        c1 = await launch(bundle, out1, stdin=True)
        c2 = await ShimClient.connect(bundle, out2)
        assert c2.pid == c1.pid
        assert not c2.started
        await c1.start()
        while out1.get(1) != b"one\n" or out2.get(1) != b"one\n":
            await asyncio.sleep(0.005)
        await c1.close()  # the first client goes away; the container carries on
        out3 = Output()
        c3 = await ShimClient.connect(bundle, out3)
        assert c3.started
        await c3.write_stdin(b"x\n")
        st2, st3 = await asyncio.gather(c2.wait(), c3.wait())
        assert st2 == st3
        assert st2.exit_code == 4
        assert out2.get(1) == b"one\ntwo x\n"
        assert out3.get(1) == b"two x\n"
        await c2.close()
        await c3.close()
        with pytest.raises((FileNotFoundError, ConnectionError)):
            await ShimClient.connect(bundle, Output())

    arun(go())


def test_shim_survives_its_launcher(tmp_path: Path) -> None:
    bundle = plain_bundle(tmp_path, ["sh", "-c", "echo started; read x; echo got $x; exit 9"])
    script = f"""
import asyncio, os, sys
from pathlib import Path
from pallet.shim import ShimClient
async def main():
    c = await ShimClient.launch(Path({str(bundle)!r}), {PLAIN!r}, Path({str(bundle)!r}) / "log.json",
                                True, lambda s, d: None)
    await c.start()
    print(c.pid, flush=True)
    os._exit(0)  # die without closing anything, like a crashed daemon
asyncio.run(main())
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    launcher = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=TIMEOUT
    )
    assert launcher.returncode == 0, launcher.stderr
    init_pid = int(launcher.stdout)
    spid = shim_pid(bundle)
    # The launcher is gone and the shim lives on. (Its parent may be this test process:
    # backend tests that run in-process make it a child subreaper.)
    assert spid is not None and alive(spid)

    async def go() -> ExitStatus:
        out = Output()
        c = await ShimClient.connect(bundle, out)
        assert c.pid == init_pid
        assert c.started
        await c.write_stdin(b"back\n")
        st = await c.wait()
        await c.close()
        assert out.get(1) == b"got back\n"
        return st

    st = arun(go())
    assert st.exit_code == 9
    wait_gone(spid)
    log = [e["log"] for e in read_log(bundle / "log.json")]
    assert log == ["started\n", "got back\n"]


def test_wait_after_shim_died_reads_exit_json(tmp_path: Path) -> None:
    bundle = plain_bundle(tmp_path, ["sh", "-c", "read x; exit 5"])

    async def go() -> None:
        c = await launch(bundle, Output(), stdin=True)
        await c.start()
        spid = shim_pid(bundle)
        assert spid is not None
        os.kill(spid, signal.SIGKILL)  # a crashed monitor: no exit event, no exit.json
        st = await c.wait()
        assert st.exit_code == 255
        assert "without an exit status" in st.error
        await c.close()
        os.kill(c.pid, signal.SIGKILL)  # the orphaned container process

    arun(go())


def test_connect_without_shim(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        arun(ShimClient.connect(tmp_path, Output()))
    assert read_exit(tmp_path) is None


def test_long_bundle_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    bundle = plain_bundle(deep, ["echo", "deep"])
    assert len(str(bundle / "shim.sock")) > 108
    st, out, _ = arun(run_plain(bundle))
    assert st.exit_code == 0
    assert out.get(1) == b"deep\n"


def test_slow_client_does_not_lose_output(tmp_path: Path) -> None:
    # the client stops reading for a while: the shim pauses the container's output
    bundle = plain_bundle(tmp_path, ["sh", "-c", "head -c 8000000 /dev/zero | tr '\\0' b"])

    class Slow(Output):
        def __call__(self, stream: int, data: bytes) -> None:
            if not self.chunks:
                import time

                time.sleep(1)  # block the loop: nothing is read from the socket meanwhile
            super().__call__(stream, data)

    async def go() -> int:
        out = Slow()
        c = await launch(bundle, out)
        await c.start()
        st = await c.wait()
        await c.close()
        assert st.exit_code == 0
        return len(out.get(1))

    assert arun(go()) == 8000000


# --- with the native backend ---------------------------------------------------------------


@pytest.mark.skipif(not have_busybox(), reason="needs /bin/busybox")
def test_native_reconnect_after_launcher_death_and_cleanup(tmp_path: Path) -> None:
    bundle, spec = make_bundle(tmp_path, ["sleep", "1000"])
    script = f"""
import asyncio, os
from pathlib import Path
from pallet.shim import ShimClient
async def main():
    b = Path({str(bundle)!r})
    c = await ShimClient.launch(b, {NATIVE!r}, b / "log.json", False, lambda s, d: None)
    await c.start()
    print(c.pid, flush=True)
    os._exit(0)
asyncio.run(main())
"""
    launcher = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert launcher.returncode == 0, launcher.stderr
    init_pid = int(launcher.stdout)
    assert alive(init_pid)
    cg = spec["linux"]["cgroupsPath"]
    assert cgroup_dirs(cg)

    async def go() -> ExitStatus:
        c = await ShimClient.connect(bundle, Output())
        assert c.pid == init_pid
        await c.kill(signal.SIGKILL)
        st = await c.wait()
        await c.close()
        return st

    assert arun(go()).exit_code == 137
    assert not alive(init_pid)
    assert cgroup_dirs(cg) == []
    assert mounts_under(tmp_path) == []


@pytest.mark.parametrize("chunk", [1, 1000, 2048, 16384, 65536, 10**9])
def test_log_lines_split_the_same_whatever_the_reads(tmp_path: Path, chunk: int) -> None:
    from pallet.shim import Monitor, _Output

    data = b"short\n" + b"x" * 16383 + b"\n" + b"y" * 16384 + b"\n" + b"z" * 40000 + b"\ntail"
    m = Monitor(tmp_path, None, str(tmp_path / "log.json"), False)  # type: ignore[arg-type]
    m.log_fd = os.open(tmp_path / "log.json", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    out = _Output(-1, 1)
    for i in range(0, len(data), chunk):
        m.log(out, data[i : i + chunk])
    m.write_log([])
    assert bytes(out.pending) == b"tail"
    os.close(m.log_fd)
    parts = [e["log"] for e in read_log(tmp_path / "log.json")]
    assert parts == [
        "short\n",
        "x" * 16383 + "\n",
        "y" * 16384,
        "\n",
        "z" * 16384,
        "z" * 16384,
        "z" * 7232 + "\n",
    ]
    assert "".join(parts) + "tail" == data.decode()


def test_setup_error_is_reported_with_exit_json(tmp_path: Path) -> None:
    bundle = plain_bundle(tmp_path, ["true"])
    (bundle / "config.json").write_text("{not json")
    with pytest.raises(ExecError) as info:
        arun(launch(bundle, Output()))
    assert info.value.exit_code == 125
    assert info.value.message.startswith("shim: ")
    st = read_exit(bundle)
    assert st is not None and st.exit_code == 125


def test_warm_up_then_launch(tmp_path: Path) -> None:
    ShimClient.warm_up([PLAIN, "no.such.module:Backend"])  # a bad one is ignored
    bundle = plain_bundle(tmp_path, ["echo", "warm"])
    st, out, _ = arun(run_plain(bundle))
    assert (st.exit_code, out.get(1)) == (0, b"warm\n")
