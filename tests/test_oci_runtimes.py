"""The exec_oci plugin in a real daemon: runc and crun registered, ``runtimes`` from
the config (as Docker's daemon.json), ``default-runtime``, ``--runtime`` per container,
and the faults: an unknown runtime, a runtime binary that crashes (before or after it
made things), a reserved or missing one. Nothing may be left behind: no cgroup, no
mount, no process, no runtime state."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import PALLETD, Daemon, _cgroups_of, mounts_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

RUNC = "/usr/sbin/runc"
CRASH_AT_ONCE = "#!/bin/sh\necho 'segfault in the runtime' >&2\nkill -SEGV $$\n"
# Lets runc create the container (cgroup, state, a waiting init), then crashes.
CRASH_AFTER_CREATE = f"""#!/bin/sh
for a in "$@"; do
  if [ "$a" = create ]; then "{RUNC}" "$@"; kill -SEGV $$; fi
done
exec "{RUNC}" "$@"
"""


def _script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, busybox_tar: Path) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("palletd-oci")
    bins = tmp_path_factory.mktemp("runtimes")
    daemon = Daemon(tmp, "overlay", ["--default-runtime", "runc"])
    config = {
        "runtimes": {
            "my-runc": {"path": "runc", "runtimeArgs": ["--debug"]},
            "crashy": {"path": _script(bins / "crashy", CRASH_AT_ONCE)},
            "crashy-late": {"path": _script(bins / "crashy-late", CRASH_AFTER_CREATE)},
            "gone": {"path": str(bins / "no-such-runtime")},
        }
    }
    (tmp / "daemon.json").write_text(json.dumps(config))
    daemon.start()
    try:
        daemon.import_busybox(busybox_tar)
        yield daemon
    finally:
        daemon.cleanup()


def run(d: Daemon, *args: str, check: bool = True) -> Any:
    return d.cli("run", "--network", "none", *args, check=check)


def assert_nothing_left(d: Daemon) -> None:
    assert mounts_under(d.exec_root) == [], "mounts left"
    assert _cgroups_of(d.cgroup_parent) == [], "cgroups left"
    containers = d.exec_root / "containers"
    assert not containers.exists() or list(containers.iterdir()) == [], "bundles left"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(d.exec_root) not in ps, "processes left"


def test_runtimes_listed(d: Daemon) -> None:
    _, info = d.api("GET", "/info")
    assert {"native", "runc", "crun", "my-runc", "crashy", "crashy-late"} <= set(info["Runtimes"])
    assert info["DefaultRuntime"] == "runc"
    assert "gone" not in info["Runtimes"]  # its binary is missing: reported, not offered
    reports = {r["Name"]: r for r in info["PalletDrivers"] if r["Kind"] == "runtime"}
    assert reports["gone"]["State"] == "skipped"
    assert "no-such-runtime: no such executable" in reports["gone"]["Reason"]
    assert reports["crun"]["State"] == reports["runc"]["State"] == "available"


@pytest.mark.parametrize("runtime", [None, "runc", "crun", "my-runc", "native"])
def test_run_on_each_runtime(d: Daemon, runtime: str | None) -> None:
    name = f"oci-{uuid.uuid4().hex[:8]}"
    flags = ["--runtime", runtime] if runtime else []
    r = run(d, "--name", name, *flags, "busybox", "sh", "-c", "echo hi; cat /proc/1/cmdline")
    assert r.stdout.startswith("hi\n")
    _, info = d.api("GET", f"/containers/{name}/json")
    assert info["HostConfig"]["Runtime"] == (runtime or "runc")
    assert info["State"]["ExitCode"] == 0
    d.cli("rm", name)
    assert run(d, *flags, "--rm", "busybox", "sh", "-c", "exit 3", check=False).returncode == 3
    r = run(d, *flags, "--rm", "busybox", "no-such-command", check=False)
    assert r.returncode == 127, r.stderr
    assert_nothing_left(d)


def test_runtime_state_lives_in_the_bundle(d: Daemon) -> None:
    """runc keeps its state under the container's bundle, gone with it."""
    cid = d.cli("run", "-d", "--network", "none", "--runtime", "runc", "busybox", "sleep", "60")
    cid_s = cid.stdout.strip()
    bundle = d.exec_root / "containers" / cid_s
    assert (bundle / "oci" / cid_s / "state.json").exists()
    r = subprocess.run(
        [RUNC, "--root", str(bundle / "oci"), "state", cid_s], capture_output=True, text=True
    )
    assert json.loads(r.stdout)["status"] == "running"
    d.cli("rm", "-f", cid_s)
    assert not bundle.exists()
    assert_nothing_left(d)


def test_unknown_runtime(d: Daemon) -> None:
    r = run(d, "--runtime", "nope", "busybox", "true", check=False)
    assert r.returncode == 125
    assert "unknown or invalid runtime name: nope" in r.stderr
    r = run(d, "--runtime", "gone", "busybox", "true", check=False)
    assert "unknown or invalid runtime name: gone" in r.stderr
    _, found = d.api("GET", "/containers/json?all=1")
    assert found == []
    assert_nothing_left(d)


@pytest.mark.parametrize("runtime", ["crashy", "crashy-late"])
def test_runtime_that_crashes(d: Daemon, runtime: str) -> None:
    name = f"crash-{uuid.uuid4().hex[:8]}"
    r = run(d, "--name", name, "--runtime", runtime, "busybox", "sleep", "60", check=False)
    assert r.returncode == 125, r.stderr
    assert "failed to create task for container" in r.stderr
    if runtime == "crashy":
        assert "segfault in the runtime" in r.stderr or "signal 11" in r.stderr
    else:
        assert "signal 11" in r.stderr
    _, info = d.api("GET", f"/containers/{name}/json")
    assert info["State"]["Running"] is False and info["State"]["ExitCode"] == 125
    d.cli("rm", name)
    assert_nothing_left(d)
    # the daemon carries on
    assert run(d, "--rm", "busybox", "echo", "ok").stdout == "ok\n"


def test_reserved_runtime_name(tmp_path: Path) -> None:
    (tmp_path / "daemon.json").write_text(json.dumps({"runtimes": {"runc": {"path": RUNC}}}))
    r = subprocess.run(
        [
            PALLETD,
            "--config-file",
            str(tmp_path / "daemon.json"),
            "--data-root",
            str(tmp_path / "data"),
            "--exec-root",
            f"/run/pallet-test-{uuid.uuid4().hex[:8]}",
            "-H",
            f"unix://{tmp_path}/s.sock",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "runtime name 'runc' is reserved" in r.stderr
