"""Exec jobs (``docker exec``) and terminal resizes: one handler per route."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

from pallet import streams
from pallet.errors import Conflict, InvalidArgument
from pallet.exec import DetachScanner, Execs, terminal_size
from pallet.hookspecs import hookimpl
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

if TYPE_CHECKING:
    from pallet.containers import Containers
    from pallet.engine import Engine, Job
    from pallet.exec import ExecInstance


class ExecCreate(BaseModel):
    """``POST /containers/{id}/exec`` body."""

    model_config = ConfigDict(extra="allow")
    AttachStdin: bool = False
    AttachStdout: bool = False
    AttachStderr: bool = False
    ConsoleSize: list[int] | None = None
    DetachKeys: str = ""
    Tty: bool = False
    Env: list[str] | None = None
    Cmd: list[str] | None = None
    Privileged: bool = False
    User: str = ""
    WorkingDir: str = ""

    @field_validator("Cmd", mode="before")
    @classmethod
    def _cmd(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class ExecStart(BaseModel):
    """``POST /exec/{id}/start`` body."""

    model_config = ConfigDict(extra="allow")
    Detach: bool = False
    Tty: bool = False
    ConsoleSize: list[int] | None = None


def parse_model(model: type[BaseModel], body: Any, what: str) -> Any:
    if body is None or body == b"" or body == "":
        body = {}
    if isinstance(body, bytes | str):
        try:
            body = json.loads(body)
        except ValueError as e:
            raise InvalidArgument(f"invalid {what}: {e}") from None
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise InvalidArgument(f"invalid {what}: {key}: {first['msg']}") from None


class ExecJobs:
    def __init__(self, containers: Containers) -> None:
        self.containers = containers
        self.execs = Execs(containers)

    @hookimpl
    def pallet_register_jobs(self, engine: Engine) -> None:
        engine.register("exec.create", self.create)
        engine.register("exec.start", self.start)
        engine.register("exec.inspect", self.inspect)
        engine.register("exec.resize", self.resize)
        engine.register("container.resize", self.container_resize)

    async def create(self, job: Job) -> dict[str, Any]:
        c = self.containers.get(job.arg())
        e = self.execs.create(c, parse_model(ExecCreate, job.body, "exec config"))
        return {"Id": e.id}

    async def inspect(self, job: Job) -> dict[str, Any]:
        return self.execs.get(job.arg()).inspect()

    async def resize(self, job: Job) -> bytes:
        e = self.execs.get(job.arg())
        height, width = terminal_size(job.getenv("h"), job.getenv("w"))
        await self.execs.resize(e, height, width)
        return b""

    async def container_resize(self, job: Job) -> bytes:
        c = self.containers.get(job.arg())
        height, width = terminal_size(job.getenv("h"), job.getenv("w"))
        if not c.running or c.shim is None:
            raise Conflict(f"Container {c.id} is not running")
        if c.tty:
            await c.shim.resize(height, width)
        return b""

    async def start(self, job: Job) -> bytes | None:
        """Detach: start and answer at once. Otherwise hijack the connection (raw with
        a TTY, multiplexed without), run the process attached: its output to the
        client, the client's input to its stdin (until EOF, or the detach keys)."""
        from pallet.execution import ExecError

        e = self.execs.get(job.arg())
        opts: ExecStart = parse_model(ExecStart, job.body, "exec start config")
        if e.started:
            raise Conflict(f"Error: Exec command {e.id} has already run")
        self.execs.check_running(e.container)
        if opts.Detach:
            try:
                await self.execs.start(e, opts, lambda stream, data: None)
            except ExecError as err:
                raise Conflict(err.message) from None
            return b""
        # Framing follows the start request's Tty (as moby), the pty the create's.
        tty = opts.Tty
        want = set()
        if e.config.AttachStdout:
            want.add(streams.STDOUT)
        if e.config.AttachStderr:
            want.add(streams.STDERR)
        queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        attached = True

        def on_output(stream: int, data: bytes) -> None:
            if attached and stream in want:
                queue.put_nowait((stream, data))

        content_type = (
            "application/vnd.docker.raw-stream"
            if tty
            else "application/vnd.docker.multiplexed-stream"
        )
        reader, writer = await job.output.hijack(content_type)
        tasks: list[asyncio.Task[Any]] = []
        try:
            try:
                await self.execs.start(e, opts, on_output)
            except ExecError as err:
                msg = f"{err.message}\r\n".encode()
                writer.write(msg if tty else streams.frame(streams.STDOUT, msg))
                await writer.drain()
                return None
            loop = asyncio.get_running_loop()

            async def ended() -> None:
                await self.execs.wait(e)
                queue.put_nowait(None)

            tasks.append(loop.create_task(ended()))
            if e.config.AttachStdin:
                tasks.append(loop.create_task(self._pump_stdin(e, reader, queue)))
            while (item := await queue.get()) is not None:
                stream, data = item
                writer.write(data if tty else streams.frame(stream, data))
                await writer.drain()
            return None
        except (ConnectionError, OSError):
            return None
        finally:
            attached = False
            for t in tasks:
                t.cancel()
            with contextlib.suppress(Exception):
                writer.close()

    async def _pump_stdin(
        self, e: ExecInstance, reader: Any, queue: asyncio.Queue[tuple[int, bytes] | None]
    ) -> None:
        scanner = DetachScanner(e.detach_keys)
        while True:
            try:
                data = await reader.read(65536)
            except (ConnectionError, OSError):
                data = b""
            shim = e.shim
            if shim is None:
                return
            if not data:
                with contextlib.suppress(Exception):
                    await shim.close_stdin()
                return
            data, detached = scanner.feed(data)
            if data:
                with contextlib.suppress(Exception):
                    await shim.write_stdin(data)
            if detached:
                queue.put_nowait(None)  # the client detaches; the process runs on
                return
