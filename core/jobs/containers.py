"""Container jobs: one handler per container route of the Docker Engine API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

from pallet import logs, streams
from pallet.errors import InvalidArgument
from pallet.hookspecs import hookimpl
from pallet.logs import rfc3339_to_unix
from pallet.networks import summary_ports
from pallet.units import human_duration

if TYPE_CHECKING:
    from pallet.containers import Container, Containers
    from pallet.engine import Engine, Job


def boolean(value: Any) -> bool:
    """Docker's query booleans: empty, 0, no, false and none are false."""
    if value is None:
        return False
    return str(value).strip().lower() not in ("", "0", "no", "false", "none")


def integer(job: Job, key: str, default: int | None = None) -> int | None:
    value = job.getenv(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(f"invalid value for {key}: {value!r} is not an integer") from None


def filters(job: Job) -> dict[str, list[str]]:
    """The ``filters`` query parameter: JSON ``{"key": ["v", ...]}`` (or the old map form)."""
    raw = job.getenv("filters")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"invalid filter: {e}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("invalid filter: expected a JSON object")
    return {
        k: list(v) if isinstance(v, list) else [k2 for k2, on in v.items() if on]
        for k, v in data.items()
    }


def status_text(c: Container) -> str:
    st = c.state
    now = time.time()
    if st.get("Restarting"):
        ago = human_duration(now - rfc3339_to_unix(st["FinishedAt"]))
        return f"Restarting ({st['ExitCode']}) {ago} ago"
    if st["Running"]:
        up = f"Up {human_duration(now - rfc3339_to_unix(st['StartedAt']))}"
        return up + " (Paused)" if st.get("Paused") else up
    if st["FinishedAt"] and not st["FinishedAt"].startswith("0001"):
        ago = human_duration(now - rfc3339_to_unix(st["FinishedAt"]))
        return f"Exited ({st['ExitCode']}) {ago} ago"
    return "Created"


def summary(c: Container, image_name: str) -> dict[str, Any]:
    args = [c.doc["Path"], *c.doc["Args"]]
    return {
        "Id": c.id,
        "Names": ["/" + c.name],
        "Image": image_name,
        "ImageID": c.doc["Image"],
        "Command": " ".join(args),
        "Created": int(rfc3339_to_unix(c.doc["Created"])),
        "Ports": summary_ports(c.doc),  # published and exposed ports (pallet.networks)
        "Labels": c.config.get("Labels") or {},
        "State": c.state["Status"],
        "Status": status_text(c),
        "HostConfig": {"NetworkMode": c.host_config.get("NetworkMode", "default")},
        "NetworkSettings": {"Networks": c.doc["NetworkSettings"]["Networks"]},
        "Mounts": c.doc["Mounts"],
    }


def _matches(c: Container, f: dict[str, list[str]]) -> bool:
    for key, values in f.items():
        if key == "id":
            if not any(c.id.startswith(v) for v in values):
                return False
        elif key == "name":
            if not any(v.lstrip("/") in c.name for v in values):
                return False
        elif key == "status":
            for v in values:
                if v not in (
                    "created",
                    "restarting",
                    "running",
                    "removing",
                    "paused",
                    "exited",
                    "dead",
                ):
                    raise InvalidArgument(f"invalid filter 'status={v}'")
            if c.state["Status"] not in values:
                return False
        elif key == "exited":
            if c.state["Status"] != "exited" or str(c.state["ExitCode"]) not in values:
                return False
        elif key == "label":
            labels = c.config.get("Labels") or {}
            for v in values:
                k, sep, val = v.partition("=")
                if k not in labels or (sep and labels[k] != val):
                    return False
        elif key == "ancestor":
            if not any(c.config.get("Image") == v or c.doc["Image"].startswith(v) for v in values):
                return False
        elif key == "network":  # by network name or ID (prefix)
            nets = c.doc["NetworkSettings"].get("Networks") or {}
            ids = [str((s or {}).get("NetworkID") or "") for s in nets.values()]
            if not any(v in nets or any(i and i.startswith(v) for i in ids) for v in values):
                return False
        else:
            raise InvalidArgument(f"invalid filter '{key}'")
    return True


class ContainerJobs:
    def __init__(self, containers: Containers) -> None:
        self.containers = containers

    @hookimpl
    def pallet_register_jobs(self, engine: Engine) -> None:
        for name in (
            "create",
            "list",
            "inspect",
            "start",
            "stop",
            "restart",
            "kill",
            "wait",
            "attach",
            "logs",
            "delete",
        ):
            engine.register(f"container.{name}", getattr(self, name))

    async def create(self, job: Job) -> dict[str, Any]:
        c = await self.containers.create(job.body, job.getenv("name") or None)
        return {"Id": c.id, "Warnings": []}

    async def list(self, job: Job) -> list[dict[str, Any]]:
        show_all = boolean(job.getenv("all"))
        limit = integer(job, "limit", -1) or -1
        f = filters(job)
        found = sorted(self.containers.by_id.values(), key=lambda c: c.doc["Created"], reverse=True)
        out = []
        for c in found:
            if not (show_all or c.running or limit > 0 or "status" in f or "exited" in f):
                continue
            if _matches(c, f):
                out.append(summary(c, c.config.get("Image", "")))
            if 0 < limit <= len(out):
                break
        return out

    async def inspect(self, job: Job) -> dict[str, Any]:
        return self.containers.get(job.arg()).doc

    async def start(self, job: Job) -> None:
        await self.containers.start(self.containers.get(job.arg()))

    async def stop(self, job: Job) -> None:
        c = self.containers.get(job.arg())
        await self.containers.stop(c, integer(job, "t"), job.getenv("signal"))

    async def restart(self, job: Job) -> None:
        from pallet.errors import NotModified

        c = self.containers.get(job.arg())
        with contextlib.suppress(NotModified):
            await self.containers.stop(c, integer(job, "t"), job.getenv("signal"))
        await self.containers.start(c)

    async def kill(self, job: Job) -> None:
        await self.containers.kill(self.containers.get(job.arg()), job.getenv("signal"))

    async def delete(self, job: Job) -> None:
        c = self.containers.get(job.arg())
        await self.containers.remove(
            c, force=boolean(job.getenv("force")), volumes=boolean(job.getenv("v"))
        )

    async def wait(self, job: Job) -> dict[str, Any]:
        c = self.containers.get(job.arg())
        condition = job.getenv("condition") or "not-running"

        async def ready() -> None:
            # The docker CLI sends start only after it has these headers.
            await job.output.start(200, "application/json")

        return await self.containers.wait(c, condition, ready)

    @staticmethod
    def _stream_type(c: Container, job: Job) -> str:
        if c.tty:
            return "application/vnd.docker.raw-stream"
        version = job.getenv("_version", "1.44")
        major, minor = (int(x) for x in version.split("."))
        if (major, minor) >= (1, 42):
            return "application/vnd.docker.multiplexed-stream"
        return "application/vnd.docker.raw-stream"

    async def attach(self, job: Job) -> None:
        c = self.containers.get(job.arg())
        want_stdin = boolean(job.getenv("stdin")) and bool(c.config.get("OpenStdin"))
        from pallet.exec import parse_detach_keys

        detach_keys = parse_detach_keys(job.getenv("detachKeys"))
        want = set()
        if boolean(job.getenv("stdout")):
            want.add(streams.STDOUT)
        if boolean(job.getenv("stderr")):
            want.add(streams.STDERR)
        stream = boolean(job.getenv("stream"))
        queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        if stream:
            c.attachers.add(queue)
        try:
            reader, writer = await job.output.hijack(self._stream_type(c, job))

            async def send(stream_id: int, data: bytes) -> None:
                if stream_id in want:
                    writer.write(data if c.tty else streams.frame(stream_id, data))
                    await writer.drain()

            if boolean(job.getenv("logs")):
                entries = logs.select(
                    logs.LogReader(c.doc["LogPath"]).read_new(),
                    stdout=streams.STDOUT in want,
                    stderr=streams.STDERR in want,
                )
                for e in entries:
                    await send(streams.STDOUT if e.stream == "stdout" else streams.STDERR, e.data)
            if not stream:
                return
            stdin_task = None
            if want_stdin:
                stdin_task = asyncio.get_running_loop().create_task(
                    self._pump_stdin(c, reader, queue, detach_keys)
                )
            try:
                if c.state["Status"] == "exited" and not c.running and queue.empty():
                    return
                while (item := await queue.get()) is not None:
                    await send(*item)
            finally:
                if stdin_task is not None:
                    stdin_task.cancel()
        finally:
            c.attachers.discard(queue)
            with contextlib.suppress(Exception):
                if "writer" in locals():
                    writer.close()

    async def _pump_stdin(
        self,
        c: Container,
        reader: Any,
        queue: asyncio.Queue[tuple[int, bytes] | None],
        detach_keys: bytes = b"",
    ) -> None:
        """Client -> container stdin; waits for the container to be started. The
        detach keys (Docker's escape sequence) end the attach, not the container."""
        from pallet.exec import DetachScanner

        scanner = DetachScanner(detach_keys)
        async with c.changed:
            await c.changed.wait_for(lambda: c.shim is not None or c.removed or c.exits > 0)
        while True:
            data = await reader.read(65536)
            shim = c.shim
            if shim is None:
                return
            if not data:
                if c.config.get("StdinOnce"):
                    await shim.close_stdin()
                return
            data, detached = scanner.feed(data)
            if data:
                await shim.write_stdin(data)
            if detached:
                queue.put_nowait(None)
                return

    async def logs(self, job: Job) -> None:
        c = self.containers.get(job.arg())
        stdout, stderr = boolean(job.getenv("stdout")), boolean(job.getenv("stderr"))
        if not (stdout or stderr):
            raise InvalidArgument("Bad parameters: you must choose at least one stream")
        follow = boolean(job.getenv("follow"))
        timestamps = boolean(job.getenv("timestamps"))
        tail_raw = job.getenv("tail") or "all"
        if tail_raw == "all":
            tail = -1
        else:
            try:
                tail = int(tail_raw)
            except ValueError:
                raise InvalidArgument(f"invalid value for tail: {tail_raw!r}") from None
        since = logs.parse_time(job.getenv("since") or "")
        until = logs.parse_time(job.getenv("until") or "")
        await job.output.start(200, self._stream_type(c, job))
        reader = logs.LogReader(c.doc["LogPath"])

        async def emit(entries: list[logs.Entry]) -> None:
            for e in entries:
                data = (e.time.encode() + b" " + e.data) if timestamps else e.data
                sid = streams.STDOUT if e.stream == "stdout" else streams.STDERR
                await job.output.write(data if c.tty else streams.frame(sid, data))

        def pick(entries: list[logs.Entry], tail: int = -1) -> list[logs.Entry]:
            return logs.select(
                entries, stdout=stdout, stderr=stderr, since=since, until=until, tail=tail
            )

        await emit(pick(reader.read_new(), tail))
        if not follow:
            return
        while True:
            async with c.changed:
                running = c.running and not c.removed
                if running:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(c.changed.wait(), 1.0)
            await emit(pick(reader.read_new()))
            if not running or (until and time.time() > until):
                return
