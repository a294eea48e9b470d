"""Distribution jobs: pull, push, save, load, auth, history, prune.

Long operations run in a worker thread; their progress comes back to the event loop
through a queue and goes out as Docker's jsonmessage stream. The HTTP response starts
with the first progress line, so an error found before it (unknown manifest,
unauthorized, unreachable registry) is an HTTP error status the docker CLI reports as
``Error response from daemon: ...``; a later one is an in-band ``errorDetail``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from pallet import reference
from pallet.errors import Conflict, InvalidArgument, NotFound
from pallet.hookspecs import hookimpl
from pallet.jobs.containers import boolean, filters

if TYPE_CHECKING:
    from pallet.daemon import Daemon
    from pallet.distribution.content import Content
    from pallet.distribution.registry import AuthConfig, RegistryOptions
    from pallet.engine import Engine, Job

_END = object()


class _Stream:
    """Messages from a worker thread to the job's output, in order."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancel = threading.Event()

    def emit(self, msg: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, msg)

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in a thread, forwarding what it emits; returns its result."""

        def work() -> Any:
            try:
                return fn()
            finally:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, _END)

        task = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            while True:
                msg = await self.queue.get()
                if msg is _END:
                    break
                if not self.job.output.started:
                    await self.job.output.start(200, "application/json")
                await self.job.output.write(json.dumps(msg).encode() + b"\r\n")
        except BaseException:
            self.cancel.set()
            with contextlib.suppress(BaseException):
                await task
            raise
        return await task

    async def write(self, msg: dict[str, Any]) -> None:
        if not self.job.output.started:
            await self.job.output.start(200, "application/json")
        await self.job.output.write(json.dumps(msg).encode() + b"\r\n")


class DistributionJobs:
    def __init__(self, daemon: Daemon) -> None:
        from pallet.distribution.content import Content

        self.daemon = daemon
        self.content: Content = Content(daemon.graph)
        self.content.gc(startup=True)

    @hookimpl
    def pallet_register_jobs(self, engine: Engine) -> None:
        engine.register("image.pull", self.pull)
        engine.register("image.push", self.push)
        engine.register("image.save", self.save)
        engine.register("image.load", self.load)
        engine.register("image.history", self.history)
        engine.register("image.prune", self.prune)
        engine.register("system.auth", self.auth)

    # --- helpers -------------------------------------------------------------------

    def options(self) -> RegistryOptions:
        from pallet.distribution.registry import RegistryOptions

        cfg = self.daemon.config
        return RegistryOptions(
            insecure_registries=list(cfg.insecure_registries),
            registry_mirrors=list(cfg.registry_mirrors),
        )

    @staticmethod
    def auth_config(job: Job) -> AuthConfig | None:
        from pallet.distribution.registry import AuthConfig

        headers = job.getenv("_headers") or {}
        return AuthConfig.from_header(headers.get("x-registry-auth"))

    def keep_imported(self, image_id: str, path: str) -> None:
        """Keep an imported tarball as its layer's blob (push and save send it as is)."""
        from pathlib import Path

        from pallet import archive

        layers = self.daemon.graph.image_layers(image_id)
        if len(layers) != 1 or self.content.blobs_of(layers[0].diff_id):
            return
        with open(path, "rb") as f:
            kind = archive.detect_compression(f.read(6))
        media = {
            "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "none": "application/vnd.oci.image.layer.v1.tar",
        }.get(kind, f"application/x-{kind}")
        self.content.add_file(Path(path), layers[0].diff_id, media)

    # --- pull ----------------------------------------------------------------------

    async def pull(self, job: Job) -> None:
        """``POST /images/create?fromImage=NAME&tag=TAG`` (also reached from image.create)."""
        from pallet.distribution.progress import Progress
        from pallet.distribution.pull import Puller

        name = job.getenv("fromImage") or ""
        tag = job.getenv("tag") or ""
        platform = job.getenv("platform") or None
        ref = reference.parse_normalized(name)
        if tag:
            if tag.startswith("sha256:"):
                reference.validate_digest(tag)
                ref = reference.Reference(ref.domain, ref.path, None, tag)
            else:
                ref = reference.Reference(ref.domain, ref.path).with_tag(tag)
        stream = _Stream(job)
        progress = Progress(stream.emit)
        graph = self.daemon.graph
        puller = Puller(
            graph, self.content, self.options(), self.auth_config(job), progress, stream.cancel
        )

        def tags_to_pull() -> list[reference.Reference]:
            if ref.tag is not None or ref.digest is not None:
                return [ref]
            return [ref.with_tag(t) for t in _list_tags(puller, ref)]

        def one(r: reference.Reference) -> None:
            before = None
            with contextlib.suppress(NotFound, InvalidArgument):
                before = graph.resolve(str(r))
            image_id, res, new = puller.pull(r, platform)  # tags it
            graph.add_reference(
                reference.Reference(r.domain, r.path, None, res.manifest_digest), image_id
            )
            progress.status(f"Digest: {res.manifest_digest}")
            if before == image_id and not new:
                progress.status(f"Status: Image is up to date for {r.familiar()}")
            else:
                progress.status(f"Status: Downloaded newer image for {r.familiar()}")

        def run() -> None:
            refs = tags_to_pull()
            for r in refs:
                one(r)

        await stream.run(run)

    # --- push ----------------------------------------------------------------------

    async def push(self, job: Job) -> None:
        """``POST /images/{name}/push?tag=TAG``: every tag of the repository when no tag."""
        from pallet.distribution.progress import Progress
        from pallet.distribution.push import Pusher

        graph = self.daemon.graph
        name = job.arg()
        tag = job.getenv("tag") or ""
        ref = reference.parse_normalized(name)
        if tag:
            ref = reference.Reference(ref.domain, ref.path).with_tag(tag)
        if ref.tag is not None or ref.digest is not None:
            targets = [(ref, graph.resolve(str(ref)))]
        else:
            targets = []
            for row in graph.store.query("SELECT name, image_id FROM refs ORDER BY name"):
                r = reference.parse(row["name"])
                if r.name == ref.name and r.tag is not None:
                    targets.append((r, row["image_id"]))
            if not targets:
                raise NotFound(
                    f"An image does not exist locally with the tag: {ref.familiar_name()}"
                )
        stream = _Stream(job)
        progress = Progress(stream.emit)
        pusher = Pusher(graph, self.content, self.options(), self.auth_config(job), progress)

        def run() -> None:
            progress.status(
                f"The push refers to repository [{ref.name if ref.domain != 'docker.io' else 'docker.io/' + ref.path}]"
            )
            for r, image_id in targets:
                res = pusher.push(r, image_id)
                progress.status(f"{res.tag}: digest: {res.digest} size: {res.size}")
                stream.emit(
                    {
                        "progressDetail": {},
                        "aux": {"Tag": res.tag, "Digest": res.digest, "Size": res.size},
                    }
                )

        await stream.run(run)

    # --- save / load ---------------------------------------------------------------

    async def save(self, job: Job) -> None:
        """``GET /images/get?names=...`` and ``GET /images/{name}/get``: a docker-archive
        (which is also an OCI image layout) as ``application/x-tar``."""
        from pallet import archives

        names = list(job.args) or [v for k, v in job.getenv("_query", []) if k == "names"]
        if not names:
            raise InvalidArgument("no images to save: give names=NAME")
        graph = self.daemon.graph
        plan = await asyncio.to_thread(archives.plan_save, graph, names)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)
        cancel = threading.Event()

        class Out:
            def write(self, data: bytes) -> int:
                if cancel.is_set():
                    raise BrokenPipeError("the client went away")
                asyncio.run_coroutine_threadsafe(queue.put(bytes(data)), loop).result()
                return len(data)

            def flush(self) -> None:
                pass

        def work() -> None:
            try:
                archives.save(graph, self.content, plan, cast(BinaryIO, Out()))
            finally:
                asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

        task = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            await job.output.start(200, "application/x-tar")
            while (data := await queue.get()) is not None:
                await job.output.write(data)
        except BaseException:
            cancel.set()
            while not task.done():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                await asyncio.sleep(0.01)
            raise
        await task

    async def load(self, job: Job) -> None:
        """``POST /images/load``: a docker-archive or OCI layout tar as the body."""
        from pallet import archives

        quiet = boolean(job.getenv("quiet"))
        tmpdir = self.daemon.graph.tmp
        fd, path = tempfile.mkstemp(dir=tmpdir, prefix="load-")
        try:
            with os.fdopen(fd, "wb") as f:
                assert job.stdin is not None
                while chunk := await job.stdin.read():
                    await asyncio.to_thread(f.write, chunk)
            stream = _Stream(job)
            graph = self.daemon.graph

            def run() -> list[str]:
                return archives.load(graph, self.content, path, stream.emit, quiet=quiet)

            await stream.run(run)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # --- auth, history, prune --------------------------------------------------------

    async def auth(self, job: Job) -> dict[str, str]:
        """``POST /auth``: check credentials against the registry's ``/v2/``."""
        from pallet.distribution.registry import AuthConfig, check_login

        body = job.body or {}
        if not isinstance(body, dict):
            raise InvalidArgument("the body must be a JSON AuthConfig")
        conf = AuthConfig.model_validate(body)
        status = await asyncio.to_thread(check_login, conf.serveraddress, self.options(), conf)
        return {"Status": status, "IdentityToken": ""}

    async def history(self, job: Job) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.daemon.graph.history, job.arg())

    async def prune(self, job: Job) -> dict[str, Any]:
        """``POST /images/prune``: dangling images (``dangling=false``: every image no
        container uses), with ``until`` and ``label`` filters."""
        graph, containers = self.daemon.graph, self.daemon.containers
        f = filters(job)
        for k in f:
            if k not in ("dangling", "until", "label", "label!"):
                raise InvalidArgument(f"invalid filter '{k}'")
        dangling_only = True
        if "dangling" in f:
            vals = {v.lower() for v in f["dangling"]}
            if vals - {"true", "false", "1", "0"}:
                raise InvalidArgument(f"invalid filter 'dangling={','.join(f['dangling'])}'")
            dangling_only = vals <= {"true", "1"}

        def run() -> dict[str, Any]:
            list_filters: dict[str, list[str]] = {}
            if dangling_only:
                list_filters["dangling"] = ["true"]
            for k in ("until", "label"):
                if k in f:
                    list_filters[k] = f[k]
            deleted: list[dict[str, str]] = []
            reclaimed = 0
            for img in graph.list_images(all=True, filters=list_filters):
                labels = img.get("Labels") or {}
                if any(_label_match(x, labels) for x in f.get("label!", [])):
                    continue
                if containers.users_of_image(img["Id"]):
                    continue
                try:
                    recs = graph.delete(
                        img["Id"], force=not dangling_only, in_use=containers.users_of_image
                    )
                except (Conflict, NotFound):
                    continue
                deleted.extend(recs)
                reclaimed += int(img.get("Size") or 0)
            self.content.gc()
            return {"ImagesDeleted": deleted or None, "SpaceReclaimed": reclaimed}

        return await asyncio.to_thread(run)


def _label_match(want: str, labels: dict[str, str]) -> bool:
    k, sep, v = want.partition("=")
    return k in labels and (not sep or labels[k] == v)


def _list_tags(puller: Any, ref: reference.Reference) -> list[str]:
    """``GET /v2/<name>/tags/list`` (for a pull of every tag)."""
    from pallet.distribution.registry import open_repository

    repo = open_repository(ref, puller.opts, puller.auth)[-1]
    resp = repo.request("GET", repo.url("tags/list"))
    with resp:
        repo.check(resp, f"listing the tags of {ref.familiar_name()}")
        data = json.loads(resp.read() or b"{}")
    tags = sorted(t for t in (data.get("tags") or []) if isinstance(t, str))
    if not tags:
        raise NotFound(f"repository {ref.familiar_name()} has no tags")
    return tags
