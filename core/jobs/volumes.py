"""Volume jobs: ``/volumes`` routes of the Docker Engine API (see :mod:`pallet.volumes`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pallet.api import parse_body
from pallet.hookspecs import hookimpl
from pallet.jobs.containers import boolean, filters
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from pallet.daemon import Daemon
    from pallet.engine import Engine, Job


class VolumeCreate(BaseModel):
    """Body of ``POST /volumes/create``."""

    model_config = ConfigDict(extra="allow")
    Name: str = ""
    Driver: str = "local"
    DriverOpts: dict[str, str] | None = None
    Labels: dict[str, str] | None = None


class VolumeJobs:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @hookimpl
    def pallet_register_jobs(self, engine: Engine) -> None:
        for name in ("list", "create", "inspect", "delete", "prune"):
            engine.register(f"volume.{name}", getattr(self, name))

    async def list(self, job: Job) -> dict[str, Any]:
        return {"Volumes": self.daemon.volumes.list_volumes(filters(job)), "Warnings": None}

    async def create(self, job: Job) -> dict[str, Any]:
        body: VolumeCreate = parse_body(VolumeCreate, job.body, "volume create")
        return await asyncio.to_thread(
            self.daemon.volumes.create, body.Name or None, body.Driver, body.Labels, body.DriverOpts
        )

    async def inspect(self, job: Job) -> dict[str, Any]:
        return self.daemon.volumes.get(job.arg())

    async def delete(self, job: Job) -> None:
        await asyncio.to_thread(self.daemon.volumes.remove, job.arg(), boolean(job.getenv("force")))

    async def prune(self, job: Job) -> dict[str, Any]:
        return await asyncio.to_thread(self.daemon.volumes.prune, filters(job))
