"""devmapper for real: the conformance suite and devmapper's own tests run in a QEMU
guest (Debian's stock kernel, TCG) with the host's root shared read-only over 9p; the
guest boots once for the whole group. Each guest test is reported here as its own test
(``test_conformance_in_guest[devmapper-<name>]``) and must have passed, not skipped."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from pallet.testing.conformance import DriverConformance

from tests.qemu import guest

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    # the guest runs ~15 tests and a daemon under TCG: beyond the suite's hang guard
    pytest.mark.timeout(3600),
]

REPO = Path(__file__).resolve().parent.parent
CONFORMANCE = sorted(n for n in dir(DriverConformance) if n.startswith("test_"))
OWN = [
    "test_devmapper_devices_and_persisted_ids",
    "test_devmapper_restart_after_a_crash",
    "test_devmapper_full_pool_is_a_clear_error",
    "test_devmapper_daemon_run_diff_commit_export",
]

# Layers are unpacked in the test process (PALLET_UNPACK_IN_PROCESS): a Python child per
# layer costs seconds under TCG; the host's tests cover the chrooted child unpacker.
SCRIPT = f"""
cd {REPO}
export PYTHONDONTWRITEBYTECODE=1 PALLET_UNPACK_IN_PROCESS=1
{REPO}/.venv/bin/pytest -p no:cacheprovider -v -o addopts="" --timeout=900 --basetemp=/tmp/pt \\
  --junitxml=/mnt/junit.xml --durations=10 tests/qemu/guest_devmapper_tests.py
"""


_EARLY: dict[str, Any] = {}


def start_early() -> None:
    """Boot the guest now, in the background (tests/conftest.py calls this once the
    session is collected and this module's tests are selected): it runs while the rest
    of the suite does, and :func:`guest_run` only waits for it."""
    if _EARLY or guest.missing() is not None:
        return
    import atexit
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="pallet-guest-"))
    run = guest.GuestRun(SCRIPT, work).start()
    _EARLY.update(run=run, work=work)

    def stop() -> None:  # the session ended without the fixture (deselected, -x...)
        run.kill()
        shutil.rmtree(work, ignore_errors=True)

    atexit.register(stop)


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    why = guest.missing()
    assert why is None, f"the devmapper guest cannot boot: {why} (scripts/install installs it)"
    if _EARLY:
        run, work = _EARLY["run"], _EARLY["work"]
    else:
        work = tmp_path_factory.mktemp("guest")
        run = guest.GuestRun(SCRIPT, work).start()
    res = run.wait()
    print(res.output[-6000:])  # the guest's pytest report, shown with -s or on failure
    outcomes: dict[str, str] = {}
    junit = work / "exchange" / "junit.xml"
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = case.get("name", "")
            kinds = {child.tag for child in case}
            outcome = "passed"
            for k in ("failure", "error", "skipped"):
                if k in kinds:
                    outcome = k
            text = "".join((child.text or "") + child.get("message", "") for child in case)
            outcomes[name] = outcome if outcome == "passed" else f"{outcome}: {text[-3000:]}"
    return {"result": res, "outcomes": outcomes}


def _outcome(run: dict[str, Any], name: str) -> str:
    res = run["result"]
    got: str | None = run["outcomes"].get(name)
    assert got is not None, (
        f"{name} did not run in the guest (status {res.status}):\n{res.output[-4000:]}\n"
        f"console:\n{res.console[-3000:]}"
    )
    return got


@pytest.mark.parametrize("name", CONFORMANCE, ids=[f"devmapper-{n}" for n in CONFORMANCE])
def test_conformance_in_guest(guest_run: dict[str, Any], name: str) -> None:
    assert _outcome(guest_run, f"{name}[devmapper]") == "passed"


@pytest.mark.parametrize("name", OWN)
def test_devmapper_in_guest(guest_run: dict[str, Any], name: str) -> None:
    assert _outcome(guest_run, name) == "passed"


def test_guest_boot_time(guest_run: dict[str, Any]) -> None:
    res = guest_run["result"]
    assert res.boot_seconds is not None, res.console[-2000:]
    print(f"guest boot: {res.boot_seconds:.1f}s to the command; whole run {res.wall_seconds:.0f}s")
