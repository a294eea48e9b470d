"""Lifecycle jobs: pause, unpause, update, stats, top, rename and the archive routes
(``docker cp`` both ways). The logic is in :mod:`pallet.lifecycle`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pallet.api import UpdateConfig, parse_body
from pallet.errors import InvalidArgument, NotFound
from pallet.hookspecs import hookimpl
from pallet.jobs.containers import boolean
from pallet.lifecycle import find_container_path, not_found

if TYPE_CHECKING:
    from pallet.containers import Container, Containers
    from pallet.engine import Engine, Job
    from pallet.lifecycle import Lifecycle

# Go's os.FileMode type bits (what docker cp's stat header carries)
_GO_DIR = 1 << 31
_GO_SYMLINK = 1 << 27
_GO_DEVICE = 1 << 26
_GO_PIPE = 1 << 25
_GO_SOCKET = 1 << 24
_GO_SETUID = 1 << 23
_GO_SETGID = 1 << 22
_GO_CHARDEV = 1 << 21
_GO_STICKY = 1 << 20


def go_mode(st: os.stat_result) -> int:
    mode = stat.S_IMODE(st.st_mode) & 0o777
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFDIR:
        mode |= _GO_DIR
    elif fmt == stat.S_IFLNK:
        mode |= _GO_SYMLINK
    elif fmt == stat.S_IFBLK:
        mode |= _GO_DEVICE
    elif fmt == stat.S_IFCHR:
        mode |= _GO_DEVICE | _GO_CHARDEV
    elif fmt == stat.S_IFIFO:
        mode |= _GO_PIPE
    elif fmt == stat.S_IFSOCK:
        mode |= _GO_SOCKET
    if st.st_mode & stat.S_ISUID:
        mode |= _GO_SETUID
    if st.st_mode & stat.S_ISGID:
        mode |= _GO_SETGID
    if st.st_mode & stat.S_ISVTX:
        mode |= _GO_STICKY
    return mode


def _rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e9):09d}Z"


class LifecycleJobs:
    def __init__(self, containers: Containers, lifecycle: Lifecycle) -> None:
        self.containers = containers
        self.lifecycle = lifecycle

    @hookimpl
    def pallet_register_jobs(self, engine: Engine) -> None:
        for name in (
            "pause",
            "unpause",
            "update",
            "stats",
            "top",
            "rename",
            "archive_get",
            "archive_head",
            "archive_put",
        ):
            engine.register(f"container.{name}", getattr(self, name))

    async def pause(self, job: Job) -> None:
        await self.lifecycle.pause(self.containers.get(job.arg()))

    async def unpause(self, job: Job) -> None:
        await self.lifecycle.unpause(self.containers.get(job.arg()))

    async def update(self, job: Job) -> dict[str, Any]:
        c = self.containers.get(job.arg())
        upd: UpdateConfig = parse_body(UpdateConfig, job.body, "update config")
        return await self.lifecycle.update(c, upd)

    async def stats(self, job: Job) -> Any:
        c = self.containers.get(job.arg())
        stream = job.getenv("stream") is None or boolean(job.getenv("stream"))
        one_shot = boolean(job.getenv("one-shot"))
        if one_shot and stream:
            raise InvalidArgument("cannot have stream=true and one-shot=true")
        if not stream:
            out: list[dict[str, Any]] = []

            async def keep(obj: dict[str, Any]) -> None:
                out.append(obj)

            await self.lifecycle.stats(c, keep, False, one_shot)
            return out[0]
        await job.output.start(200, "application/json")

        async def emit(obj: dict[str, Any]) -> None:
            await job.output.write(json.dumps(obj).encode() + b"\n")

        await self.lifecycle.stats(c, emit, True, False)
        return None

    async def top(self, job: Job) -> dict[str, Any]:
        c = self.containers.get(job.arg())
        return await self.lifecycle.top(c, job.getenv("ps_args") or "-ef")

    async def rename(self, job: Job) -> None:
        c = self.containers.get(job.arg())
        await self.lifecycle.rename(c, job.getenv("name") or "")

    # --- archive (docker cp) --------------------------------------------------------------

    @contextlib.contextmanager
    def _root(self, c: Container) -> Iterator[Path]:
        """The container's root filesystem on the host: the running one, or the
        container's snapshot mounted for the time of the copy."""
        from pallet.mount import mount_all, unmount_all

        running_root = self.containers.bundle_dir(c.id) / "rootfs"
        if c.running and os.path.ismount(running_root):
            yield running_root
            return
        tmp = self.containers.daemon.config.exec_root / "archive" / secrets.token_hex(8)
        tmp.mkdir(parents=True)
        try:
            mount_all(self.containers.daemon.graph.rootfs_mounts(c.id), str(tmp))
            yield tmp
        finally:
            with contextlib.suppress(OSError):
                unmount_all(str(tmp))
            with contextlib.suppress(OSError):
                tmp.rmdir()

    @staticmethod
    def _mount_for(c: Container, path: str) -> tuple[str, str] | None:
        """(host dir, rest of the path) when ``path`` is inside a bind or volume."""
        best: tuple[str, str] | None = None
        best_len = -1
        for m in c.doc.get("Mounts") or []:
            dst = str(m.get("Destination") or "")
            src = str(m.get("Source") or "")
            if not src or m.get("Type") not in ("bind", "volume"):
                continue
            if (path == dst or path.startswith(dst.rstrip("/") + "/")) and len(dst) > best_len:
                best, best_len = (src, path[len(dst) :].lstrip("/")), len(dst)
        return best

    @contextlib.contextmanager
    def _open_parent(self, c: Container, path: str) -> Iterator[tuple[int, str]]:
        """An fd of the directory holding ``path`` (resolved inside the container's
        root or mount, never outside) and the last component."""
        from pallet.archive import open_dir_in_root

        with self._root(c) as root:
            mount = self._mount_for(c, path)
            base_dir, rel = (mount[0], mount[1]) if mount else (str(root), path.lstrip("/"))
            parent, _, name = rel.rpartition("/")
            root_fd = os.open(base_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                try:
                    fd = open_dir_in_root(root_fd, parent)
                except (FileNotFoundError, NotADirectoryError):
                    raise not_found(c, path) from None
                try:
                    yield fd, name
                finally:
                    os.close(fd)
            finally:
                os.close(root_fd)

    @contextlib.contextmanager
    def _open_dir(self, c: Container, path: str) -> Iterator[int]:
        """An fd of directory ``path``, every symlink on the way (the last one too)
        resolved inside the container's root or mount, never the host's."""
        from pallet.archive import open_dir_in_root

        with self._root(c) as root:
            mount = self._mount_for(c, path)
            base_dir, rel = (mount[0], mount[1]) if mount else (str(root), path.lstrip("/"))
            root_fd = os.open(base_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                try:
                    fd = open_dir_in_root(root_fd, rel)
                except FileNotFoundError:
                    raise not_found(c, path) from None
                except NotADirectoryError:
                    raise InvalidArgument("extraction point is not a directory") from None
                try:
                    yield fd
                finally:
                    os.close(fd)
            finally:
                os.close(root_fd)

    def _stat(self, c: Container, path: str) -> dict[str, Any]:
        with self._open_parent(c, path) as (fd, name):
            try:
                st = os.lstat(name or ".", dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError):
                raise not_found(c, path) from None
            link = ""
            if stat.S_ISLNK(st.st_mode):
                link = os.readlink(name, dir_fd=fd)
            return {
                "name": name or "/",
                "size": st.st_size,
                "mode": go_mode(st),
                "mtime": _rfc3339(st.st_mtime),
                "linkTarget": link,
            }

    @staticmethod
    def _stat_header(info: dict[str, Any]) -> str:
        return base64.b64encode(json.dumps(info).encode()).decode()

    async def archive_head(self, job: Job) -> bytes:
        c = self.containers.get(job.arg())
        path = find_container_path(c, job.getenv("path") or "")
        info = await asyncio.to_thread(self._stat, c, path)
        job.output.add_header("X-Docker-Container-Path-Stat", self._stat_header(info))
        return b""

    async def archive_get(self, job: Job) -> None:
        """``GET .../archive?path=``: a tar of the path, its stat in a header."""
        c = self.containers.get(job.arg())
        path = find_container_path(c, job.getenv("path") or "")
        info = await asyncio.to_thread(self._stat, c, path)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=16)

        class _Out:
            def write(self, data: bytes) -> int:
                asyncio.run_coroutine_threadsafe(queue.put(bytes(data)), loop).result()
                return len(data)

            def flush(self) -> None:
                pass

        def produce() -> None:
            try:
                with self._open_parent(c, path) as (fd, name):
                    src = (
                        f"/proc/{os.getpid()}/fd/{fd}/{name}"
                        if name
                        else f"/proc/{os.getpid()}/fd/{fd}"
                    )
                    arcname = name or "."
                    with tarfile.open(fileobj=_Out(), mode="w|", format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
                        tf.add(src, arcname=arcname, recursive=True)
                asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()
            except BaseException as e:  # handed to the event loop
                asyncio.run_coroutine_threadsafe(queue.put(e), loop).result()

        job.output.add_header("X-Docker-Container-Path-Stat", self._stat_header(info))
        await job.output.start(200, "application/x-tar")
        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            await job.output.write(item)

    async def archive_put(self, job: Job) -> bytes:
        """``PUT .../archive?path=``: extract the uploaded tar into a directory."""
        from pallet.archive import apply_layer

        c = self.containers.get(job.arg())
        path = find_container_path(c, job.getenv("path") or "")
        no_overwrite = boolean(job.getenv("noOverwriteDirNonDir"))
        if c.host_config.get("ReadonlyRootfs") and self._mount_for(c, path) is None:
            raise InvalidArgument("container rootfs is marked read-only")
        loop = asyncio.get_running_loop()
        assert job.stdin is not None  # a stream_body route
        reader: Any = job.stdin

        class _In:
            """The request body as a blocking reader (for the untar in a thread)."""

            def __init__(self) -> None:
                self.buf = b""

            def read(self, n: int = -1) -> bytes:
                if not self.buf:
                    self.buf = asyncio.run_coroutine_threadsafe(reader.read(), loop).result()
                    if not self.buf:
                        return b""
                if n < 0 or n >= len(self.buf):
                    data, self.buf = self.buf, b""
                else:
                    data, self.buf = self.buf[:n], self.buf[n:]
                return data

        def extract() -> None:
            with self._open_dir(c, path) as target_fd:
                target = Path(f"/proc/{os.getpid()}/fd/{target_fd}")
                apply_layer(_In(), target, "delete")

        _ = no_overwrite  # the untar replaces entries like docker cp does without the flag
        try:
            await asyncio.to_thread(extract)
        except NotFound:
            raise
        self.containers.event("extract-to-dir", c)
        return b""  # 200 with an empty body, as dockerd answers
