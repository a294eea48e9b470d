"""Image jobs: list, inspect, create (import; pull comes with the registry work), tag, delete."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

from pallet.errors import InvalidArgument
from pallet.hookspecs import hookimpl
from pallet.jobs.containers import boolean, filters

if TYPE_CHECKING:
    from pallet.daemon import Daemon
    from pallet.engine import Engine, Job


class ImageJobs:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @hookimpl
    def pallet_register_jobs(self, engine: Engine) -> None:
        engine.register("image.list", self.list_images)
        engine.register("image.inspect", self.inspect)
        engine.register("image.create", self.create)
        engine.register("image.tag", self.tag)
        engine.register("image.delete", self.delete)

    async def list_images(self, job: Job) -> list[dict[str, Any]]:
        graph = self.daemon.graph
        return await asyncio.to_thread(graph.list_images, boolean(job.getenv("all")), filters(job))

    async def inspect(self, job: Job) -> dict[str, Any]:
        return await asyncio.to_thread(self.daemon.graph.inspect, job.arg())

    async def create(self, job: Job) -> None:
        src = job.getenv("fromSrc")
        if job.getenv("fromImage"):
            return await job.engine.handlers["image.pull"](job)  # pallet.jobs.distribution
        if not src:
            raise InvalidArgument("either fromImage or fromSrc must be given")
        if src != "-":
            raise InvalidArgument(
                f"fromSrc={src!r}: importing from a URL is not supported; send the tarball "
                "as the request body with fromSrc=-"
            )
        repo, tag = job.getenv("repo") or None, job.getenv("tag") or None
        ref = None
        if repo:
            ref = f"{repo}:{tag}" if tag else repo
        changes = [v for k, v in job.getenv("_query", []) if k == "changes"]
        message = job.getenv("message") or ""
        # The body is spooled to disk so the import (blocking, in a thread) reads a file.
        tmpdir = self.daemon.config.data_root / "tmp"
        tmpdir.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=tmpdir, prefix="import-")
        try:
            with os.fdopen(fd, "wb") as f:
                assert job.stdin is not None
                while chunk := await job.stdin.read():
                    await asyncio.to_thread(f.write, chunk)

            def run() -> str:
                with open(path, "rb") as src_file:
                    return self.daemon.graph.import_image(
                        src_file, ref, changes=changes, message=message
                    )

            image_id = await asyncio.to_thread(run)
            keep = getattr(job.engine.handlers.get("image.pull"), "__self__", None)
            if keep is not None:  # the original tar, for push/save (pallet.jobs.distribution)
                await asyncio.to_thread(keep.keep_imported, image_id, path)
        finally:
            os.unlink(path)
        await job.output.start(200, "application/json")
        await job.output.write(json.dumps({"status": image_id}).encode() + b"\r\n")

    async def tag(self, job: Job) -> None:
        repo = job.getenv("repo") or ""
        if not repo:
            raise InvalidArgument("repository name must be given (repo)")
        await asyncio.to_thread(self.daemon.graph.tag, job.arg(), repo, job.getenv("tag") or None)

    async def delete(self, job: Job) -> list[dict[str, Any]]:
        graph, containers = self.daemon.graph, self.daemon.containers
        records = await asyncio.to_thread(
            graph.delete,
            job.arg(),
            force=boolean(job.getenv("force")),
            noprune=boolean(job.getenv("noprune")),
            in_use=containers.users_of_image,
        )
        dist = getattr(job.engine.handlers.get("image.pull"), "__self__", None)
        if dist is not None:  # the blobs of layers now gone (pallet.jobs.distribution)
            await asyncio.to_thread(dist.content.gc)
        return records
