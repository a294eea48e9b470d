"""Graph operations on containers: ``GET /containers/{id}/changes`` (docker diff),
``POST /commit`` (docker commit) and ``GET /containers/{id}/export`` (docker export)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pallet.errors import InvalidArgument, NotFound, PalletError
from pallet.hookspecs import hookimpl

if TYPE_CHECKING:
    from pallet.containers import Container
    from pallet.daemon import Daemon
    from pallet.engine import Engine, Job

_CHUNK = 1 << 16


class StorageJobs:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @hookimpl
    def pallet_register_jobs(self, engine: Engine) -> None:
        engine.register("container.changes", self.changes)
        engine.register("container.commit", self.commit)
        engine.register("container.export", self.export)

    def _scratch(self) -> Path:
        """The graph's scratch directory: what a crash leaves there is cleaned at start."""
        d = self.daemon.graph.tmp
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _mounted_rootfs(self, c: Container) -> Path | None:
        from pallet import mount

        if not c.running:
            return None
        rootfs = self.daemon.containers.bundle_dir(c.id) / "rootfs"
        return rootfs if mount.is_mountpoint(str(rootfs)) else None

    async def changes(self, job: Job) -> list[dict[str, Any]]:
        """``docker diff``: ``[{"Path": "/etc", "Kind": 0}, ...]`` (0 C, 1 A, 2 D)."""
        from pallet.snapshots import snapshot_changes

        c = self.daemon.containers.get(job.arg())
        graph = self.daemon.graph
        graph.rootfs_mounts(c.id)  # NotFound without a rootfs
        found = await asyncio.to_thread(snapshot_changes, graph.driver, c.id, self._scratch())
        return [{"Path": p, "Kind": k} for p, k in found]

    async def export(self, job: Job) -> None:
        """``docker export``: the container's filesystem as a tar, streamed."""
        c = self.daemon.containers.get(job.arg())
        fd, path = tempfile.mkstemp(dir=self._scratch(), prefix="export-")
        os.close(fd)
        try:

            def write() -> None:
                with open(path, "wb") as out:
                    self.daemon.graph.export_rootfs(c.id, out, self._mounted_rootfs(c))

            await asyncio.to_thread(write)
            await job.output.start(200, "application/x-tar")
            with open(path, "rb") as f:
                while chunk := await asyncio.to_thread(f.read, _CHUNK):
                    await job.output.write(chunk)
        finally:
            os.unlink(path)

    async def commit(self, job: Job) -> dict[str, str]:
        """``docker commit``: the container's changes become a layer on its image's."""
        ref = job.getenv("container") or ""
        if not ref:
            raise InvalidArgument("container is required (container=<name or id>)")
        c = self.daemon.containers.get(ref)
        repo = job.getenv("repo") or ""
        tag = job.getenv("tag") or ""
        if tag and not repo:
            raise InvalidArgument("tag requires a repository name (repo)")
        changes = [v for k, v in job.getenv("_query", []) if k == "changes"]
        body = job.body or {}
        if body and not isinstance(body, dict):
            raise InvalidArgument("the request body must be a container config object")
        # as Docker: a running container is frozen while its layer is taken (pause=0: not)
        lifecycle = getattr(self.daemon, "lifecycle", None)
        pause = job.getenv("pause") not in ("0", "false", "False")
        paused = False
        if pause and c.running and not c.state.get("Paused") and lifecycle is not None:
            await lifecycle.pause(c)
            paused = True
        try:
            image_id = await asyncio.to_thread(
                commit_container,
                self.daemon,
                c,
                repo=repo,
                tag=tag,
                comment=job.getenv("comment") or "",
                author=job.getenv("author") or "",
                changes=changes,
                config=body,
            )
        finally:
            if paused and lifecycle is not None:
                with contextlib.suppress(PalletError):
                    await lifecycle.unpause(c)
        return {"Id": image_id}


def commit_container(
    daemon: Daemon,
    c: Container,
    *,
    repo: str = "",
    tag: str = "",
    comment: str = "",
    author: str = "",
    changes: list[str] | tuple[str, ...] = (),
    config: dict[str, Any] | None = None,
) -> str:
    """Blocking: write the container's diff, add it as a layer on its image's top layer
    and store an image whose config is the container's, ``config`` and ``changes`` applied.
    Nothing is stored if any step fails."""
    from pallet import reference
    from pallet.graph import apply_changes, canonical_json, docker_config, format_time

    graph = daemon.graph
    row = graph.store.one("SELECT image_id, chain_id FROM rootfs WHERE container_id = ?", (c.id,))
    if row is None:
        raise NotFound(f"No such container: {c.id}")
    parent_image, top = row["image_id"], row["chain_id"]
    newref = None
    if repo:
        parsed = reference.parse_normalized(f"{repo}:{tag}" if tag else repo)
        if parsed.digest is not None:
            raise InvalidArgument("refusing to create a tag with a digest reference")
        newref = reference.repo_tag_reference(parsed.name, parsed.tag)
    base_cfg = graph.image_config(parent_image)
    run_cfg = dict(c.config)
    for k, v in (config or {}).items():
        if v not in (None, "", [], {}):
            run_cfg[k] = v
    cfg = apply_changes(list(changes), docker_config(run_cfg))
    graph.tmp.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=graph.tmp, prefix="commit-")
    try:
        with os.fdopen(fd, "wb") as out:
            graph.rootfs_diff(c.id, out)
        with graph.lease() as lease:
            if top is not None and lease.use_layer(top) is None:
                raise NotFound(f"layer {top} of container {c.id} is gone")
            with open(path, "rb") as src:
                layer = lease.add_layer(src, top)
            created = format_time(time.time_ns())
            history = list(base_cfg.get("history") or [])
            entry: dict[str, Any] = {"created": created}
            if author:
                entry["author"] = author
            if comment:
                entry["comment"] = comment
            history.append(entry)
            diff_ids = list((base_cfg.get("rootfs") or {}).get("diff_ids") or [])
            img: dict[str, Any] = {
                "architecture": base_cfg.get("architecture", "amd64"),
                "os": base_cfg.get("os", "linux"),
                "config": cfg,
                "container": c.id,
                "container_config": docker_config(c.config),
                "created": created,
                "docker_version": "pallet",
                "history": history,
                "rootfs": {"type": "layers", "diff_ids": [*diff_ids, layer.diff_id]},
            }
            if author:
                img["author"] = author
            if comment:
                img["comment"] = comment
            if base_cfg.get("variant"):
                img["variant"] = base_cfg["variant"]
            return lease.create_image(
                canonical_json(img), ref=newref, parent_image=parent_image, action="commit"
            )
    finally:
        os.unlink(path)
