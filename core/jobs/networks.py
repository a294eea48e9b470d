"""Network jobs: one handler per network route of the Docker Engine API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pallet.hookspecs import hookimpl
from pallet.jobs.containers import filters

if TYPE_CHECKING:
    from pallet.engine import Engine, Job
    from pallet.networks import Networks


class NetworkJobs:
    def __init__(self, networks: Networks) -> None:
        self.networks = networks

    @hookimpl
    def pallet_register_jobs(self, engine: Engine) -> None:
        for name in ("list", "inspect", "create", "delete", "connect", "disconnect", "prune"):
            engine.register(f"network.{name}", getattr(self, name))

    async def list(self, job: Job) -> list[dict[str, Any]]:
        return self.networks.list_networks(filters(job))

    async def inspect(self, job: Job) -> dict[str, Any]:
        return self.networks.inspect(self.networks.get(job.arg()))

    async def create(self, job: Job) -> dict[str, str]:
        return await self.networks.create_network(job.body)

    async def delete(self, job: Job) -> None:
        await self.networks.remove_network(job.arg())

    async def connect(self, job: Job) -> None:
        await self.networks.connect(job.arg(), job.body)

    async def disconnect(self, job: Job) -> None:
        await self.networks.disconnect(job.arg(), job.body)

    async def prune(self, job: Job) -> dict[str, Any]:
        return await self.networks.prune(filters(job))
