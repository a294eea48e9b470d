"""Engine and Job: the job table, running jobs, observers, errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pallet.engine import Engine, Job
from pallet.errors import Conflict, NotFound
from pallet.hookspecs import hookimpl
from pallet.plugin_manager import PluginManager


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []

    @hookimpl
    def pallet_register_jobs(self, engine: Engine) -> None:
        async def echo(job: Job) -> Any:
            await job.output.write(b"streamed ")
            return {"args": list(job.args), "env": job.getenv("x")}

        async def fail(job: Job) -> None:
            raise Conflict("no way")

        engine.register("test.echo", echo)
        engine.register("test.fail", fail)

    @hookimpl
    def pallet_job_started(self, job: Job) -> None:
        self.events.append(("started", job.name, None))

    @hookimpl
    def pallet_job_finished(self, job: Job) -> None:
        self.events.append(("finished", job.name, job.error))


def make_engine() -> tuple[Engine, Recorder]:
    pm = PluginManager()
    rec = Recorder()
    pm.register(rec, "recorder")
    engine = Engine(pm)
    engine.load_jobs()
    return engine, rec


def test_job_runs_handler_and_observers_see_it() -> None:
    engine, rec = make_engine()
    job = engine.job("test.echo", "a", "b", env={"x": 1})
    result = asyncio.run(job.run())
    assert result == {"args": ["a", "b"], "env": 1}
    assert job.result == result
    assert job.output.getvalue() == b"streamed "
    assert job.error is None and job.duration >= 0
    assert rec.events == [("started", "test.echo", None), ("finished", "test.echo", None)]


def test_job_error_is_recorded_and_raised() -> None:
    engine, rec = make_engine()
    job = engine.job("test.fail")
    with pytest.raises(Conflict, match="no way"):
        asyncio.run(job.run())
    assert isinstance(job.error, Conflict)
    assert rec.events[-1][0] == "finished" and isinstance(rec.events[-1][2], Conflict)


def test_unknown_job_and_duplicate_registration() -> None:
    engine, _ = make_engine()
    with pytest.raises(NotFound, match="no such job: nope"):
        asyncio.run(engine.job("nope").run())
    with pytest.raises(Conflict, match="already registered"):
        engine.register("test.echo", lambda job: None)  # type: ignore[arg-type,return-value]


def test_entry_point_plugins_load_and_disable(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = PluginManager()
    pm.load_entry_points()
    states = {r.name: r.state for r in pm.records.values()}
    assert states["storage_vfs"] == "loaded"
    assert states["exec_native"] == "loaded"
    assert states["storage_devmapper"] == "loaded"
    monkeypatch.setenv("PALLET_DISABLED_PLUGINS", "storage_vfs, exec_native")
    pm2 = PluginManager()
    pm2.load_entry_points()
    assert pm2.records["storage_vfs"].state == "disabled"
    assert pm2.records["exec_native"].state == "disabled"
    names = [cls.name for cls in pm2.collect("pallet_storage_drivers_v1")]
    assert "vfs" not in names
