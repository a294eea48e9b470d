"""Terminals and exec on every execution backend (native, runc, crun), at the monitor
level: a busybox bundle run through :class:`pallet.shim.ShimClient`.

Checks what the processes themselves see (a real pty of the right size, the
container's namespaces, cgroup, user and environment for an exec'd process), exit
codes (127 for a missing command), and that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pallet.execution import ExecError
from pallet.shim import ShimClient

from tests.rootfs import (
    NATIVE,
    alive,
    cgroup_dirs,
    have_busybox,
    kill_leftover_shims,
    make_bundle,
    mounts_under,
    processes_in_cgroup,
    write_spec,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not have_busybox(), reason="needs /bin/busybox (busybox-static)"),
]

T = TypeVar("T")
TIMEOUT = 120  # a hang guard only

RUNC = "pallet.plugins.exec_oci.runtime:RuncBackend"
CRUN = "pallet.plugins.exec_oci.runtime:CrunBackend"
BACKENDS = {"native": NATIVE, "runc": RUNC, "crun": CRUN}


def _available(name: str) -> bool:
    from pallet.plugins.exec_oci.runtime import find_binary

    return name == "native" or find_binary(name) is not None


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    if not _available(request.param):
        pytest.skip(f"{request.param} is not installed")
    return BACKENDS[request.param]


@pytest.fixture(autouse=True)
def _no_leftover_shims(tmp_path: Path) -> Iterator[None]:
    yield
    assert kill_leftover_shims(tmp_path) == [], "a monitor was still running after the test"


def arun(coro: Awaitable[T]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(guarded())


def assert_clean(tmp: Path, spec: dict[str, Any], pids: list[int]) -> None:
    cg = spec["linux"]["cgroupsPath"]
    assert mounts_under(tmp) == []
    assert cgroup_dirs(cg) == []
    assert processes_in_cgroup(cg) == []
    for pid in pids:
        assert not alive(pid), f"process {pid} is still alive"


class Output:
    def __init__(self) -> None:
        self.chunks: list[tuple[int, bytes]] = []
        self.event = asyncio.Event()

    def __call__(self, stream: int, data: bytes) -> None:
        self.chunks.append((stream, data))
        self.event.set()

    def text(self, stream: int | None = None) -> str:
        return b"".join(d for s, d in self.chunks if stream in (None, s)).decode(errors="replace")

    async def wait_for(self, needle: str) -> None:
        while needle not in self.text():
            self.event.clear()
            await self.event.wait()


def tty_spec(tmp: Path, args: list[str], rows: int = 0, cols: int = 0) -> tuple[Path, dict]:
    bundle, spec = make_bundle(tmp, args, env=["PATH=/bin:/sbin:/usr/bin", "TERM=xterm"])
    spec["process"]["terminal"] = True
    if rows:
        spec["process"]["consoleSize"] = {"height": rows, "width": cols}
    write_spec(bundle, spec)
    return bundle, spec


def test_terminal_size_and_tty(tmp_path: Path, backend: str) -> None:
    """A real pty: stdin is a tty, `stty size` sees the size, output is raw (CRLF)."""
    script = "tty; stty size; test -t 0 && echo in-is-tty; read line; echo got:$line; stty size"

    async def main() -> tuple[int, str, list[int]]:
        bundle, _spec = tty_spec(tmp_path, ["sh", "-c", script], rows=31, cols=97)
        out = Output()
        client = await ShimClient.launch(bundle, backend, bundle / "log.json", True, out)
        try:
            await client.start()
            await out.wait_for("in-is-tty")
            await client.resize(40, 120)
            await client.write_stdin(b"hello\r")
            status = await client.wait()
        finally:
            await client.close()
        assert {s for s, _ in out.chunks} == {1}  # a terminal is one raw stream
        return status.exit_code, out.text(), [client.pid]

    code, text, _pids = arun(main())
    assert code == 0, text
    assert "/dev/pts/" in text
    assert "31 97\r\n" in text
    assert "in-is-tty" in text
    assert "got:hello" in text
    assert text.rstrip().endswith("40 120"), text


def test_exec_in_running_container(tmp_path: Path, backend: str) -> None:
    """exec: same namespaces and cgroup as the init, its own user, env, cwd; output
    only on its own connection; stdin; exit code; a missing command is 127."""

    async def main() -> dict[str, Any]:
        bundle, spec = make_bundle(tmp_path, ["sleep", "600"], env=["PATH=/bin", "A=container"])
        out = Output()
        client = await ShimClient.launch(bundle, backend, bundle / "log.json", False, out)
        res: dict[str, Any] = {"spec": spec, "pids": [client.pid]}
        try:
            await client.start()
            init_ns = {n: os.readlink(f"/proc/{client.pid}/ns/{n}") for n in ("pid", "mnt", "net")}
            process = dict(spec["process"])
            process.update(
                args=["sh", "-c", "id -u; pwd; echo $A $B; cat; cat /proc/self/cgroup; exit 7"],
                env=["PATH=/bin", "A=container", "B=exec"],
                cwd="/tmp",
                user={"uid": 1000, "gid": 1000},
            )
            eout = Output()
            ex = await ShimClient.exec(bundle, "e1", process, True, eout)
            res["pids"].append(ex.pid)
            res["exec_ns"] = {n: os.readlink(f"/proc/{ex.pid}/ns/{n}") for n in init_ns}
            res["init_ns"] = init_ns
            res["exec_cgroup"] = open(f"/proc/{ex.pid}/cgroup").read()
            await ex.write_stdin(b"from-stdin\n")
            await ex.close_stdin()
            st = await ex.wait()
            await ex.close()
            res["exec_code"] = st.exit_code
            res["exec_out"] = eout.text(1)
            # a missing command: ExecError 127, the container carries on
            missing = dict(process, args=["no-such-command"])
            with pytest.raises(ExecError) as info:
                await ShimClient.exec(bundle, "e2", missing, False, Output())
            res["missing"] = (info.value.exit_code, info.value.message)
            # a tty exec
            tout = Output()
            # crun 1.8 ignores consoleSize on exec: the monitor sizes the pty when it
            # gets it, which may be just after the process started
            wait = "sleep 0.3; " if backend == CRUN else ""
            tp = dict(process, args=["sh", "-c", f"{wait}stty size; tty"], terminal=True)
            tp["consoleSize"] = {"height": 12, "width": 34}
            tex = await ShimClient.exec(bundle, "e3", tp, False, tout)
            res["pids"].append(tex.pid)
            st = await tex.wait()
            await tex.close()
            res["tty_code"], res["tty_out"] = st.exit_code, tout.text()
            # a long-running exec dies with the container
            lp = dict(process, args=["sleep", "500"])
            lex = await ShimClient.exec(bundle, "e4", lp, False, Output())
            res["pids"].append(lex.pid)
            await client.kill(9)
            res["long_code"] = (await lex.wait()).exit_code
            await lex.close()
            res["init_code"] = (await client.wait()).exit_code
            res["container_out"] = out.text()
        finally:
            await client.close()
        return res

    res = arun(main())
    assert res["exec_ns"] == res["init_ns"]
    assert res["exec_code"] == 7, res["exec_out"]
    lines = res["exec_out"].splitlines()
    assert lines[:4] == ["1000", "/tmp", "container exec", "from-stdin"], res["exec_out"]
    cg = res["spec"]["linux"]["cgroupsPath"]
    assert f":memory:{cg}" in res["exec_cgroup"] or f"memory:{cg}" in res["exec_cgroup"]
    assert res["missing"][0] == 127, res["missing"]
    assert "no-such-command" in res["missing"][1]
    assert res["tty_code"] == 0
    assert "12 34\r\n" in res["tty_out"] and "/dev/pts/" in res["tty_out"]
    assert res["long_code"] == 137
    assert res["init_code"] == 137
    assert res["container_out"] == ""  # exec output never reaches the container's clients
    assert_clean(tmp_path, res["spec"], res["pids"])


def test_missing_command_at_create(tmp_path: Path, backend: str) -> None:
    async def main() -> ExecError:
        bundle, _spec = make_bundle(tmp_path, ["/no/such/binary"])
        with pytest.raises(ExecError) as info:
            client = await ShimClient.launch(bundle, backend, bundle / "log.json", False, Output())
            try:
                await client.start()
                await client.wait()
            finally:
                await client.close()
        return info.value

    err = arun(main())
    assert err.exit_code == 127, err.message
    assert "/no/such/binary" in err.message
    assert mounts_under(tmp_path) == []
