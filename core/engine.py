"""The Engine and its Jobs: every action pallet takes is a named job.

The Engine is a table of job name -> handler, filled through the
``pallet_register_jobs`` hook (the core's own jobs register the same way a plugin's
do). A :class:`Job` carries the name, arguments, environment, its input and output
channels and, when it has run, its result, error and duration. Every API route is
exactly one job, and observers see every job start and finish.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pallet.errors import Conflict, NotFound, PalletError

if TYPE_CHECKING:
    from pallet.plugin_manager import PluginManager

Handler = Callable[["Job"], Awaitable[Any]]


class Channel:
    """A job's output as the caller sees it. The default collects everything in memory;
    the HTTP server passes one that streams to the client.

    ``start`` commits to a streamed response (for HTTP: the headers go out now);
    ``hijack`` takes over the connection as raw byte streams (Docker's attach/exec).
    """

    def __init__(self) -> None:
        self.started: bool = False
        self.status: int = 200
        self.content_type = "application/json"
        self.chunks: list[bytes] = []
        self.headers: list[tuple[str, str]] = []  # extra response headers (add_header)

    async def start(self, status: int = 200, content_type: str = "application/json") -> None:
        self.started = True
        self.status, self.content_type = status, content_type

    async def write(self, data: bytes) -> None:
        if not self.started:
            await self.start()
        self.chunks.append(data)

    async def hijack(
        self, content_type: str = "application/vnd.docker.raw-stream"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise PalletError("this job's caller cannot hand over a raw connection")

    def add_header(self, name: str, value: str) -> None:
        """An extra header for the response (HTTP: sent with the status line)."""
        self.headers.append((name, value))

    def getvalue(self) -> bytes:
        return b"".join(self.chunks)


class Job:
    """One unit of work: ``engine.job("container.create", ...)``, then ``await job.run()``."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        args: tuple[str, ...] = (),
        env: dict[str, Any] | None = None,
        body: Any = None,
        stdin: asyncio.StreamReader | None = None,
        output: Channel | None = None,
    ) -> None:
        self.engine = engine
        self.name = name
        self.args = args
        self.env: dict[str, Any] = env or {}
        self.body = body
        self.stdin = stdin
        self.output = output or Channel()
        self.result: Any = None
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.duration = 0.0

    def arg(self, index: int = 0) -> str:
        return self.args[index]

    def getenv(self, key: str, default: Any = None) -> Any:
        return self.env.get(key, default)

    async def run(self) -> Any:
        """Run the handler; store and return its result. Errors are stored and re-raised."""
        handler = self.engine.handlers.get(self.name)
        if handler is None:
            raise NotFound(f"no such job: {self.name}")
        hook = self.engine.plugins.hook
        self.started_at = time.monotonic()
        hook.pallet_job_started(job=self)
        try:
            self.result = await handler(self)
            return self.result
        except BaseException as e:
            self.error = e
            raise
        finally:
            self.duration = time.monotonic() - self.started_at
            hook.pallet_job_finished(job=self)

    def __repr__(self) -> str:
        return f"<Job {self.name} {' '.join(self.args)}>"


class Engine:
    """The job table. ``daemon`` is whatever object serves the handlers (graph, stores)."""

    def __init__(self, plugins: PluginManager, daemon: Any = None) -> None:
        self.plugins = plugins
        self.daemon = daemon
        self.handlers: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler) -> None:
        if name in self.handlers:
            raise Conflict(f"job {name!r} is already registered")
        self.handlers[name] = handler

    def load_jobs(self) -> None:
        """Fill the table from every registered plugin's ``pallet_register_jobs``."""
        self.plugins.hook.pallet_register_jobs(engine=self)

    def job(self, name: str, *args: str, **kwargs: Any) -> Job:
        return Job(self, name, tuple(args), **kwargs)
