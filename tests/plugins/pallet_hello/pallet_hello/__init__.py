"""A third-party plugin: adds a job and observes every job the engine runs."""

from __future__ import annotations

from typing import Any

from pallet.hookspecs import hookimpl

seen: list[str] = []


async def hello(job: Any) -> dict[str, str]:
    return {"hello": job.getenv("name", "world")}


@hookimpl
def pallet_register_jobs(engine: Any) -> None:
    engine.register("hello.greet", hello)


@hookimpl
def pallet_job_finished(job: Any) -> None:
    seen.append(job.name)
