"""Exec: extra processes in running containers (``docker exec``), and the pieces of the
interactive side shared with attach (detach keys, terminal sizes).

An exec instance is created (``POST /containers/{id}/exec``), started once
(``POST /exec/{id}/start``: the connection is hijacked like attach, or not at all with
``Detach``), resized, and inspected (``GET /exec/{id}/json``: ``Running``,
``ExitCode``, ``Pid``). The process itself is started by the container's monitor
through the container's execution backend (:meth:`pallet.shim.ShimClient.exec`), with
the container's own security settings (capabilities, rlimits, no_new_privs...) and
the exec's command, environment, user and working directory. Instances live in the
daemon's memory as long as their container, as in Docker.

This module is imported by the CLI too (detach keys): no pydantic at the top.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pallet.errors import Conflict, InvalidArgument, NotFound

if TYPE_CHECKING:
    from pallet.containers import Container, Containers
    from pallet.jobs.exec import ExecCreate, ExecStart
    from pallet.shim import ShimClient

DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"


# --- detach keys ----------------------------------------------------------------------


def parse_detach_keys(keys: str | None) -> bytes:
    """Docker's ``--detach-keys`` syntax (``ctrl-p,ctrl-q``, ``a,ctrl-@``...) -> bytes.
    Raises InvalidArgument with Docker's message."""
    text = DEFAULT_DETACH_KEYS if keys is None or keys == "" else keys
    out = bytearray()
    for part in text.split(","):
        key = part.strip()
        if len(key) > 1 and key.lower().startswith("ctrl-") and len(key) == 6:
            c = key[5].lower()
            if "a" <= c <= "z":
                out.append(ord(c) - ord("a") + 1)
                continue
            specials = {"@": 0, "[": 27, "\\": 28, "]": 29, "^": 30, "_": 31}
            if c in specials:
                out.append(specials[c])
                continue
        elif len(key) == 1 and ord(key) < 128:
            out.append(ord(key))
            continue
        raise InvalidArgument(f"Invalid detach keys ({text}) provided")
    return bytes(out)


class DetachScanner:
    """Docker's escape proxy: passes input through, holding back bytes that could be
    the start of the detach sequence; ``feed`` returns (bytes to forward, detached)."""

    def __init__(self, keys: bytes) -> None:
        self.keys = keys
        self.held = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        if not self.keys:
            return data, False
        out = bytearray()
        for b in data:
            self.held.append(b)
            if self.keys.startswith(bytes(self.held)):
                if len(self.held) == len(self.keys):
                    self.held.clear()
                    return bytes(out), True
                continue
            out += self.held  # not the sequence after all: let it through
            self.held.clear()
        return bytes(out), False


def terminal_size(h: str | None, w: str | None) -> tuple[int, int]:
    """The ``h`` and ``w`` query parameters of a resize, checked as Docker does."""
    try:
        height, width = int(h or "0"), int(w or "0")
    except ValueError:
        raise InvalidArgument(f"invalid terminal size: h={h!r} w={w!r}") from None
    if not 0 <= height <= 65535 or not 0 <= width <= 65535:
        raise InvalidArgument(f"invalid terminal size: h={height} w={width}")
    return height, width


# --- the exec instances ---------------------------------------------------------------


class ExecInstance:
    def __init__(self, container: Container, config: ExecCreate) -> None:
        self.id = secrets.token_hex(32)
        self.container = container
        self.config = config
        self.detach_keys = parse_detach_keys(config.DetachKeys or None)
        self.running = False
        self.started = False
        self.exit_code: int | None = None
        self.pid = 0
        self.shim: ShimClient | None = None
        import asyncio

        self.changed = asyncio.Condition()

    def inspect(self) -> dict[str, Any]:
        cmd = self.config.Cmd or []
        return {
            "ID": self.id,
            "Running": self.running,
            "ExitCode": self.exit_code,
            "ProcessConfig": {
                "tty": self.config.Tty,
                "entrypoint": cmd[0] if cmd else "",
                "arguments": cmd[1:],
                "privileged": self.config.Privileged,
                "user": self.config.User,
            },
            "OpenStdin": self.config.AttachStdin,
            "OpenStderr": self.config.AttachStderr,
            "OpenStdout": self.config.AttachStdout,
            "CanRemove": False,
            "ContainerID": self.container.id,
            "DetachKeys": self.config.DetachKeys,
            "Pid": self.pid,
        }

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class Execs:
    """The daemon's exec instances (``docker exec``)."""

    def __init__(self, containers: Containers) -> None:
        self.containers = containers
        self.by_id: dict[str, ExecInstance] = {}

    def get(self, exec_id: str) -> ExecInstance:
        e = self.by_id.get(exec_id)
        if e is None or e.container.removed:
            self.by_id.pop(exec_id, None)
            raise NotFound(f"No such exec instance: {exec_id}")
        return e

    def _prune(self) -> None:
        for eid, e in list(self.by_id.items()):
            if e.container.removed:
                del self.by_id[eid]

    @staticmethod
    def check_running(c: Container) -> None:
        if not c.running or c.shim is None:
            raise Conflict(f"Container {c.id} is not running")
        if c.state.get("Paused"):
            raise Conflict(f"Container {c.id} is paused, unpause the container before exec")
        if c.state.get("Restarting"):
            raise Conflict(f"Container {c.id} is restarting, wait until the container is running")

    def create(self, c: Container, cfg: ExecCreate) -> ExecInstance:
        self._prune()
        if not cfg.Cmd:
            raise InvalidArgument("No exec command specified")
        self.check_running(c)
        e = ExecInstance(c, cfg)
        self.by_id[e.id] = e
        self._update_ids(c)
        self.containers.event("exec_create", c, execID=e.id)
        return e

    def _update_ids(self, c: Container) -> None:
        ids = [e.id for e in self.by_id.values() if e.container is c]
        c.doc["ExecIDs"] = ids or None

    # --- the process --------------------------------------------------------------------

    def process(self, e: ExecInstance, console: list[int] | None) -> dict[str, Any]:
        """The OCI process for ``e``: the container's (capabilities, rlimits,
        no_new_privs...) with the exec's command, env, user, cwd and terminal."""
        from pallet.spec import merge_env, resolve_user

        c = e.container
        bundle = self.containers.bundle_dir(c.id)
        try:
            spec = json.loads((bundle / "config.json").read_text())
        except (OSError, ValueError):
            raise Conflict(f"Container {c.id} is not running") from None
        base: dict[str, Any] = dict(spec.get("process") or {})
        cfg = e.config
        env = [v for v in base.get("env") or [] if not v.startswith("TERM=")]
        if cfg.Tty:
            env.append("TERM=xterm")
        user_text = cfg.User or c.config.get("User") or ""
        rootfs = bundle / "rootfs"
        if cfg.User:
            user, home = resolve_user(rootfs, cfg.User)
            env = [v for v in env if not v.startswith("HOME=")] + [f"HOME={home}"]
            base["user"] = user.model_dump()
        elif user_text:
            user, _home = resolve_user(rootfs, user_text)
            base["user"] = user.model_dump()
        base["env"] = merge_env(env, cfg.Env or [])
        base["args"] = list(cfg.Cmd or [])
        base["cwd"] = cfg.WorkingDir or base.get("cwd") or "/"
        if not base["cwd"].startswith("/"):
            raise InvalidArgument(
                f"the working directory '{base['cwd']}' is invalid, it needs to be an absolute path"
            )
        base["terminal"] = cfg.Tty
        base.pop("consoleSize", None)
        if cfg.Tty and console and len(console) == 2 and all(console):
            base["consoleSize"] = {"height": int(console[0]), "width": int(console[1])}
        if cfg.Privileged:
            from pallet.spec import host_capabilities

            caps = host_capabilities()
            base["capabilities"] = {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            }
        return base

    async def start(
        self,
        e: ExecInstance,
        start: ExecStart,
        on_output: Callable[[int, bytes], None],
    ) -> ShimClient:
        """Start the process (once). Raises Conflict/ExecError; ExecError's exit code
        is recorded as the exec's (127 for a missing command, as Docker)."""
        from pallet.execution import ExecError
        from pallet.shim import ShimClient

        if e.started:
            raise Conflict(f"Error: Exec command {e.id} has already run")
        c = e.container
        self.check_running(c)
        e.started = True
        try:
            process = self.process(e, start.ConsoleSize or e.config.ConsoleSize)
        except InvalidArgument as err:  # a bad user or working directory: Docker's 126
            e.exit_code = 126
            self._update_ids(c)
            await e.notify()
            raise ExecError(err.message, 126) from None
        bundle = self.containers.bundle_dir(c.id)
        try:
            shim = await ShimClient.exec(bundle, e.id, process, e.config.AttachStdin, on_output)
        except ExecError as err:
            e.exit_code = err.exit_code if err.exit_code != 409 else 126
            self._update_ids(c)
            await e.notify()
            if err.exit_code == 409:
                raise Conflict(err.message) from None
            raise ExecError(
                f"OCI runtime exec failed: {err.message}: unknown", e.exit_code
            ) from None
        except (OSError, ConnectionError):
            e.exit_code = 126
            self._update_ids(c)
            await e.notify()
            raise Conflict(f"Container {c.id} is not running") from None
        e.shim = shim
        e.pid = shim.pid
        e.running = True
        self._update_ids(c)
        self.containers.event("exec_start", c, execID=e.id)
        self.containers._spawn(self._watch(e, shim))
        return shim

    async def _watch(self, e: ExecInstance, shim: ShimClient) -> None:
        try:
            status = await shim.wait()
            e.exit_code = status.exit_code
        except Exception:
            e.exit_code = 137 if e.exit_code is None else e.exit_code
        finally:
            e.running = False
            e.shim = None
            with contextlib.suppress(Exception):
                await shim.close()
            self._update_ids(e.container)
            self.containers.event("exec_die", e.container, execID=e.id, exitCode=str(e.exit_code))
            await e.notify()

    async def wait(self, e: ExecInstance) -> None:
        async with e.changed:
            await e.changed.wait_for(lambda: e.started and not e.running)

    async def resize(self, e: ExecInstance, height: int, width: int) -> None:
        if not e.running or e.shim is None:
            raise Conflict(f"Exec {e.id} is not running")
        if e.config.Tty:
            await e.shim.resize(height, width)
