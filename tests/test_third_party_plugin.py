"""A third-party plugin package, installed from tests/plugins into this venv, is found
through its entry point, adds a job, observes jobs, and is listed by `pallet info`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def hello_installed() -> Iterator[None]:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "install", "--no-deps", str(HERE / "plugins/pallet_hello")],
        check=True,
    )
    try:
        yield
    finally:
        subprocess.run([*pip, "uninstall", "-y", "pallet-hello"], check=True)


CHECK = """
import asyncio, json
from pallet.engine import Engine
from pallet.plugin_manager import PluginManager
pm = PluginManager()
pm.load_entry_points()
engine = Engine(pm)
engine.load_jobs()
job = engine.job("hello.greet", env={"name": "pallet"})
result = asyncio.run(job.run())
import pallet_hello
print(json.dumps({"state": pm.records["hello"].state, "result": result, "seen": pallet_hello.seen}))
"""


def test_plugin_discovered_and_its_job_runs(hello_installed: None) -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], check=True, capture_output=True, text=True)
    data = json.loads(out.stdout)
    assert data == {"state": "loaded", "result": {"hello": "pallet"}, "seen": ["hello.greet"]}


def test_pallet_info_lists_plugin(hello_installed: None, make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(storage_driver="vfs")
    out = d.cli("info").stdout
    assert "hello" in out and "loaded" in out
    _, info = d.api("GET", "/info")
    plugins = {p["Name"]: p for p in info["PalletPlugins"]}
    assert plugins["hello"]["State"] == "loaded"
    assert (
        plugins["hello_skip"]["State"] == "skipped"
        and plugins["hello_skip"]["Reason"] == "needs the hello hardware"
    )
    assert "hello_skip" in out and "needs the hello hardware" in out
    # A driver whose probe fails here is reported with its reason, the daemon runs on.
    drivers = {(d["Kind"], d["Name"]): d for d in info["PalletDrivers"]}
    assert drivers[("storage", "vfs")]["State"] == "selected"
    devmapper = drivers[("storage", "devmapper")]
    assert devmapper["State"] == "skipped" and "device-mapper" in devmapper["Reason"]
    assert "Pallet Drivers:" in out and "device-mapper" in out
