"""The per-container monitor ("shim"), and the daemon's client for it.

The daemon launches one monitor per container::

    python -m pallet.shim --bundle B --backend module:Class --log PATH [--stdin]

It detaches (setsid + double fork) so that it outlives the daemon, becomes a child
subreaper, loads just the one backend class it was given (no entry points, no pluggy,
no pydantic: it is on the ``pallet run`` hot path), and then:

1. makes pipes for the container's stdio and calls ``backend.create`` (the process is
   set up and blocked before exec); writes ``<bundle>/shim.pid``, listens on
   ``<bundle>/shim.sock`` and tells the launcher (one JSON line on its stdout) that the
   container is created, or why not (``exit.json`` is written then too);
2. serves clients on the socket, all in one thread with ``selectors``;
3. copies the container's stdout/stderr to the json-file log (Docker's format) and to
   every connected client (Docker frames, streams 1 and 2);
4. when the init exits: drains the pipes, finishes the log, asks ``oom_killed`` then
   ``delete``, writes ``<bundle>/exit.json`` (atomically), sends the exit event, exits.

Protocol on the socket: Docker frames (:mod:`pallet.streams`). Stream 0 carries stdin
data to the shim, 1 and 2 output to clients; stream 4 carries one JSON control message
per frame. Client -> shim: ``{"op": "start"}``, ``{"op": "kill", "signal": N}``,
``{"op": "close_stdin"}``, ``{"op": "resize", "height": H, "width": W}`` (a terminal's
size). Shim -> client: ``{"event": "created", "pid": N, "started": bool}`` (on
connect), ``{"event": "started"}`` (to every client, after a start),
``{"event": "error", "message": ..., "exit_code": N}`` (a failed start or exec),
``{"event": "exit", "exit_code": N, "oom_killed": bool, "finished_at": RFC3339Nano}``.

With ``process.terminal`` the container gets a pty (the backend hands the master over a
console socket, as runc does); its output is then one raw stream, sent as stream 1 and
logged as stdout.

Exec: a client sends ``{"op": "exec", "id": ..., "process": {OCI process}, "stdin":
bool}`` as its first control message; the shim asks the backend to start that process
in the container and the connection becomes the process's: it gets
``{"event": "exec_started", "pid": N}`` (or an error event), the process's output
(only), its stdin, ``resize``/``kill``/``close_stdin`` apply to it, and its
``exit`` event ends it. A dropped exec connection leaves the process running.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pallet.execution import ExecError, Stdio
from pallet.streams import HEADER_SIZE, FrameDecoder, frame, parse_header

if TYPE_CHECKING:
    import asyncio

    from pallet.execution import ExecBackend

CONTROL = 4  # the frame stream of control messages
SOCKET_NAME = "shim.sock"
PID_NAME = "shim.pid"
EXIT_NAME = "exit.json"
LOG_NAME = "shim.log"

LOG_LINE_MAX = 16 * 1024  # Docker's copier: longer lines are logged in 16 KiB parts
READ_SIZE = 64 * 1024
HIGH_WATER = 1 << 20  # a client this far behind pauses the container's output
DRAIN_TIMEOUT = 2.0  # after the init exits, how long to wait for the pipes to close
FLUSH_TIMEOUT = 5.0  # how long to try to hand the exit event to clients
LIVENESS_INTERVAL = 1.0  # how often an idle monitor checks that its init is its child

PR_SET_CHILD_SUBREAPER = 36
PR_SET_NAME = 15

_TRACE = bool(os.environ.get("PALLET_SHIM_TRACE"))


def _trace(what: str) -> None:
    """With PALLET_SHIM_TRACE set, wall-clock marks go to the shim log (for profiling)."""
    if _TRACE:
        print(f"shim-trace {time.time():.6f} {what}", file=sys.stderr, flush=True)


def now_rfc3339() -> str:
    """Now in UTC, RFC 3339 with nine fraction digits, as Docker writes times."""
    ns = time.time_ns()
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


def _socket_address(bundle: Path) -> tuple[str, int | None]:
    """The path to bind/connect for the bundle's socket. A unix socket path is limited
    to 107 bytes: for longer bundle paths, go through ``/proc/self/fd/<dirfd>``
    (the returned fd must be closed by the caller once bound/connected)."""
    path = os.path.join(str(bundle), SOCKET_NAME)
    if len(os.fsencode(path)) < 100:
        return path, None
    dirfd = os.open(str(bundle), os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    return f"/proc/self/fd/{dirfd}/{SOCKET_NAME}", dirfd


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- the monitor --------------------------------------------------------------------------


class _Proc:
    """A process the monitor runs: the container's init, or one started by ``exec``."""

    __slots__ = (
        "client",
        "console",
        "drain_deadline",
        "exec_id",
        "exit_code",
        "outputs",
        "pid",
        "stdin_buf",
        "stdin_closing",
        "stdin_fd",
    )

    def __init__(self, exec_id: str = "") -> None:
        self.exec_id = exec_id
        self.pid = 0
        self.outputs: list[_Output] = []
        self.stdin_fd: int | None = None
        self.stdin_buf = bytearray()
        self.stdin_closing = False
        self.console: int | None = None  # the pty master (for writes and resize)
        self.exit_code: int | None = None
        self.drain_deadline: float | None = None
        self.client: _Client | None = None  # an exec's one client

    def drained(self) -> bool:
        return all(o.eof for o in self.outputs)


class _Client:
    __slots__ = ("decoder", "outbuf", "proc", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self.outbuf = bytearray()
        self.proc: _Proc | None = None  # set on an exec's connection


class _Output:
    """One of a process's output pipes (or its pty master) and its log line buffer."""

    __slots__ = ("eof", "fd", "name", "pending", "proc", "stream")

    def __init__(self, fd: int, stream: int, proc: _Proc | None = None) -> None:
        self.fd = fd
        self.stream = stream
        self.proc = proc
        self.name = "stdout" if stream == 1 else "stderr"
        self.pending = bytearray()
        self.eof = False


def _log_entry(data: bytes, name: str, ts: str) -> bytes:
    text = data.decode("utf-8", "replace")
    return (
        json.dumps(
            {"log": text, "stream": name, "time": ts}, ensure_ascii=False, separators=(",", ":")
        )
        + "\n"
    ).encode()


def set_winsize(fd: int, height: int, width: int) -> None:
    """TIOCSWINSZ on a pty (the kernel sends SIGWINCH to its foreground group)."""
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _receive_console(sock: socket.socket) -> int:
    """The pty master the backend sent on the console socket (runc's protocol)."""
    sock.settimeout(30)
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 4)
    except OSError as e:
        raise ExecError(f"receiving the terminal from the runtime: {e}", 125) from None
    if not fds:
        raise ExecError("the runtime did not send a terminal", 125)
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


class Monitor:
    """The shim's state and event loop (one per container, single-threaded)."""

    def __init__(self, bundle: Path, backend: ExecBackend, log_path: str, stdin: bool) -> None:
        self.bundle = bundle
        self.backend = backend
        self.log_path = log_path
        self.open_stdin = stdin
        self.spec: dict[str, Any] = {}
        self.init = _Proc()
        self.execs: dict[int, _Proc] = {}  # pid -> exec'd process
        self.started = False
        self.start_error: ExecError | None = None
        self.finished_at = ""
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, _Client] = {}
        self.paused = False
        self.log_fd = -1
        self.listener: socket.socket | None = None
        self.wake_r = -1

    # the init's fields, under their historical names
    @property
    def pid(self) -> int:
        return self.init.pid

    @property
    def exit_code(self) -> int | None:
        return self.init.exit_code

    @property
    def outputs(self) -> list[_Output]:
        return [o for p in (self.init, *self.execs.values()) for o in p.outputs]

    # --- setup ------------------------------------------------------------------------

    def create(self) -> None:
        """Create the container. Raises ExecError."""
        with open(self.bundle / "config.json", "rb") as f:
            self.spec = json.load(f)
        self.log_fd = os.open(
            self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
        )
        process = self.spec.get("process") or {}

        def call(stdio: Stdio) -> int:
            return self.backend.create(self.bundle, self.spec, stdio)

        self._spawn(self.init, call, bool(process.get("terminal")), self.open_stdin)
        size = process.get("consoleSize") or {}
        if self.init.console is not None and size.get("height") and size.get("width"):
            with contextlib.suppress(OSError):
                set_winsize(self.init.console, int(size["height"]), int(size["width"]))

    def _spawn(
        self, proc: _Proc, call: Callable[[Stdio], int], terminal: bool, want_stdin: bool
    ) -> None:
        """Make the stdio (pipes, or a console socket for a pty), run ``call`` (the
        backend's create or exec) and register the process's outputs. Raises ExecError."""
        mine: list[int] = []  # our ends, closed on failure
        theirs: list[int] = []  # the process's ends, closed once it has them
        console_sock: socket.socket | None = None
        try:
            if terminal:
                console_sock, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
                theirs += [peer.detach(), null]
                stdio = Stdio(None, null, null, console=theirs[0])
            else:
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                mine += [out_r, err_r]
                theirs += [out_w, err_w]
                in_r: int | None = None
                if want_stdin:
                    in_r, in_w = os.pipe()
                    mine.append(in_w)
                    theirs.append(in_r)
                stdio = Stdio(in_r, out_w, err_w)
            try:
                proc.pid = call(stdio)
            except ExecError:
                raise
            except Exception as e:
                raise ExecError(f"{type(e).__name__}: {e}", 125) from e
            finally:
                for fd in theirs:  # the process holds its own copies now
                    os.close(fd)
                theirs = []
            if console_sock is not None:
                try:
                    master = _receive_console(console_sock)
                except ExecError:
                    self._kill_quietly(proc.pid)
                    raise
                mine.append(master)
                os.set_blocking(master, False)
                proc.console = os.dup(master)
                mine.append(proc.console)
                os.set_blocking(proc.console, False)
                if want_stdin:
                    proc.stdin_fd = proc.console
                proc.outputs.append(_Output(master, 1, proc))
            else:
                proc.outputs.append(_Output(mine[0], 1, proc))
                proc.outputs.append(_Output(mine[1], 2, proc))
                if want_stdin:
                    proc.stdin_fd = mine[2]
                    os.set_blocking(proc.stdin_fd, False)
        except BaseException:
            for fd in mine + theirs:
                with contextlib.suppress(OSError):
                    os.close(fd)
            proc.outputs = []
            proc.stdin_fd = proc.console = None
            raise
        finally:
            if console_sock is not None:
                console_sock.close()
        for out in proc.outputs:
            os.set_blocking(out.fd, False)
            if not self.paused:
                self.sel.register(out.fd, selectors.EVENT_READ, out)

    def _kill_quietly(self, pid: int) -> None:
        if pid > 0:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def listen(self) -> None:
        path = os.path.join(str(self.bundle), SOCKET_NAME)
        _unlink(path)
        address, dirfd = _socket_address(self.bundle)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address)
        finally:
            if dirfd is not None:
                os.close(dirfd)
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, "accept")

    def watch_children(self) -> None:
        """SIGCHLD wakes the loop through a pipe; the loop reaps."""
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "signal")

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        while True:
            self.reap()
            now = time.monotonic()
            for proc in list(self.execs.values()):
                if proc.exit_code is not None and (
                    proc.drained() or now >= (proc.drain_deadline or now)
                ):
                    self.finish_exec(proc)
            init = self.init
            if init.exit_code is not None:
                if init.drain_deadline is None:
                    init.drain_deadline = now + DRAIN_TIMEOUT
                if init.drained() or now >= init.drain_deadline:
                    break
            deadlines = [
                p.drain_deadline
                for p in (init, *self.execs.values())
                if p.drain_deadline is not None
            ]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            if timeout is None and self.started:
                timeout = LIVENESS_INTERVAL  # see check_init
            events = self.sel.select(timeout)
            if not events:
                self.check_init()
            for key, mask in events:
                data = key.data
                if isinstance(data, _Output):
                    self.read_output(data)
                elif isinstance(data, _Client):
                    if mask & selectors.EVENT_READ:
                        self.read_client(data)
                    if mask & selectors.EVENT_WRITE and data.sock.fileno() in self.clients:
                        self.flush_client(data)
                elif isinstance(data, _Proc):
                    self.flush_stdin(data)
                elif data == "accept":
                    self.accept()
                elif data == "signal":
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
        self.finish()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            if pid == self.init.pid and self.init.exit_code is None:
                _trace("exited")
                self.finished_at = now_rfc3339()
                self.init.exit_code = code
            elif pid in self.execs and self.execs[pid].exit_code is None:
                proc = self.execs[pid]
                proc.exit_code = code
                proc.drain_deadline = time.monotonic() + DRAIN_TIMEOUT
            else:
                _trace(f"reaped {pid} (status {status})")

    def check_init(self) -> None:
        """A safety net: the init must be our child (we are its subreaper); if it is
        not, its exit would never be seen. Record what can be known instead of hanging."""
        pid = self.init.pid
        if pid <= 0 or self.init.exit_code is not None:
            return
        try:  # WNOWAIT: look, do not reap (reap() does that, with the status)
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            alive = os.path.exists(f"/proc/{pid}")
            print(
                f"shim: the container init {pid} is not our child (alive: {alive})",
                file=sys.stderr,
                flush=True,
            )
            if not alive:
                self.finished_at = now_rfc3339()
                self.init.exit_code = 255
                self.start_error = self.start_error or ExecError(
                    "the container's exit status was lost (its init was not the monitor's child)",
                    255,
                )

    # --- output -------------------------------------------------------------------------

    def read_output(self, out: _Output) -> None:
        try:
            data = os.read(out.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:  # EIO: a pty whose other side is all closed
            data = b""
        if not data:
            self.close_output(out)
            return
        self.deliver(out, data)

    def deliver(self, out: _Output, data: bytes) -> None:
        if out.proc is None or out.proc is self.init:
            self.broadcast(frame(out.stream, data))
            self.log(out, data)
        elif out.proc.client is not None:
            self.queue(out.proc.client, frame(out.stream, data))

    def close_output(self, out: _Output) -> None:
        if out.eof:
            return
        out.eof = True
        if out.fd in self.sel.get_map():
            self.sel.unregister(out.fd)
        os.close(out.fd)
        if out.pending:  # the final unterminated line
            self.write_log([_log_entry(bytes(out.pending), out.name, now_rfc3339())])
            out.pending.clear()

    def drain(self, proc: _Proc) -> None:
        """Whatever is readable now from ``proc``'s outputs, then close them."""
        for out in proc.outputs:
            while not out.eof:
                try:
                    data = os.read(out.fd, READ_SIZE)
                except BlockingIOError:
                    self.close_output(out)
                    break
                except OSError:
                    data = b""
                if not data:
                    self.close_output(out)
                    break
                self.deliver(out, data)

    def log(self, out: _Output, data: bytes) -> None:
        ts = now_rfc3339()
        buf = out.pending
        buf += data
        entries = []
        start = 0
        # Docker's copier has a 16 KiB buffer: a line whose newline is not within it is
        # logged in 16 KiB parts (without "\n"), however the bytes arrived.
        while True:
            nl = buf.find(b"\n", start, start + LOG_LINE_MAX)
            if nl >= 0:
                entries.append(_log_entry(bytes(buf[start : nl + 1]), out.name, ts))
                start = nl + 1
            elif len(buf) - start >= LOG_LINE_MAX:
                entries.append(_log_entry(bytes(buf[start : start + LOG_LINE_MAX]), out.name, ts))
                start += LOG_LINE_MAX
            else:
                break
        del buf[:start]
        if entries:
            self.write_log(entries)

    def write_log(self, entries: list[bytes]) -> None:
        data = b"".join(entries)
        try:
            while data:
                n = os.write(self.log_fd, data)
                data = data[n:]
        except OSError as e:
            print(f"shim: writing log {self.log_path}: {e}", file=sys.stderr)

    # --- clients ------------------------------------------------------------------------

    def accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            client = _Client(sock)
            self.clients[sock.fileno()] = client
            self.sel.register(sock, selectors.EVENT_READ, client)
            self.send(client, {"event": "created", "pid": self.pid, "started": self.started})

    def send(self, client: _Client, msg: dict[str, Any]) -> None:
        self.queue(client, frame(CONTROL, json.dumps(msg).encode()))

    def broadcast(self, data: bytes) -> None:
        """To the container's clients (an exec's connection only gets its own output)."""
        for client in list(self.clients.values()):
            if client.proc is None:
                self.queue(client, data)

    def queue(self, client: _Client, data: bytes) -> None:
        if client.sock.fileno() not in self.clients:
            return
        was_empty = not client.outbuf
        client.outbuf += data
        if was_empty:
            self.flush_client(client)
        if len(client.outbuf) > HIGH_WATER and not self.paused:
            self.pause(True)

    def flush_client(self, client: _Client) -> None:
        try:
            while client.outbuf:
                n = client.sock.send(client.outbuf)
                del client.outbuf[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.drop(client)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outbuf else 0)
        self.sel.modify(client.sock, events, client)
        if self.paused and all(len(c.outbuf) <= HIGH_WATER // 2 for c in self.clients.values()):
            self.pause(False)

    def pause(self, paused: bool) -> None:
        """Back-pressure: stop reading the processes' output while a client lags."""
        self.paused = paused
        for out in self.outputs:
            if out.eof:
                continue
            if paused:
                if out.fd in self.sel.get_map():
                    self.sel.unregister(out.fd)
            elif out.fd not in self.sel.get_map():
                self.sel.register(out.fd, selectors.EVENT_READ, out)

    def drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if self.clients.pop(fd, None) is None:
            return
        try:
            self.sel.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        if client.proc is not None and client.proc.client is client:
            client.proc.client = None  # a detached exec runs on, its output is dropped
        if self.paused and all(len(c.outbuf) <= HIGH_WATER // 2 for c in self.clients.values()):
            self.pause(False)

    def read_client(self, client: _Client) -> None:
        try:
            data = client.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop(client)
            return
        for stream, payload in client.decoder.feed(data):
            if stream == 0:
                self.write_stdin(client.proc or self.init, payload)
            elif stream == CONTROL:
                try:
                    msg = json.loads(payload)
                except ValueError:
                    continue
                self.control(client, msg)

    def control(self, client: _Client, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        proc = client.proc or self.init
        if op == "start":
            self.start(client)
        elif op == "kill":
            self.kill(proc, int(msg.get("signal", 15)))
        elif op == "close_stdin":
            if proc.console is not None and proc.stdin_fd is not None:
                self.write_stdin(proc, b"\x04")  # a terminal has no EOF but ^D
            else:
                proc.stdin_closing = True
                self.flush_stdin(proc)
        elif op == "resize":
            if proc.console is not None and proc.exit_code is None:
                try:
                    set_winsize(proc.console, int(msg.get("height", 0)), int(msg.get("width", 0)))
                except (OSError, ValueError, OverflowError) as e:
                    print(f"shim: resize: {e}", file=sys.stderr)
        elif op == "exec":
            self.exec(client, msg)

    def kill(self, proc: _Proc, sig: int) -> None:
        if proc.exit_code is not None or proc.pid <= 0:
            return
        try:
            if proc is self.init:
                self.backend.kill(self.bundle, proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        except Exception as e:
            print(f"shim: kill: {e}", file=sys.stderr)

    def start(self, client: _Client) -> None:
        if self.started or self.start_error is not None:
            self.send(
                client, {"event": "error", "message": "container already started", "exit_code": 125}
            )
            return
        if self.exit_code is not None:
            self.send(
                client,
                {"event": "error", "message": "container has exited", "exit_code": self.exit_code},
            )
            return
        _trace("start")
        try:
            self.backend.start(self.bundle, self.pid)
        except ExecError as e:
            self.start_error = e
            self.send(client, {"event": "error", "message": e.message, "exit_code": e.exit_code})
            return
        except Exception as e:
            self.start_error = ExecError(f"{type(e).__name__}: {e}", 125)
            self.send(
                client, {"event": "error", "message": self.start_error.message, "exit_code": 125}
            )
            return
        self.started = True
        _trace("started")
        for c in list(self.clients.values()):
            if c.proc is None:
                self.send(c, {"event": "started"})

    # --- exec -----------------------------------------------------------------------------

    def exec(self, client: _Client, msg: dict[str, Any]) -> None:
        """``{"op": "exec", "id": ..., "process": {OCI process}, "stdin": bool}``: this
        connection becomes the new process's: its stdin, output, resize and exit."""

        def error(message: str, code: int = 125) -> None:
            self.send(client, {"event": "error", "message": message, "exit_code": code})

        if client.proc is not None:
            return error("this connection already runs a process")
        if not self.started or self.init.exit_code is not None:
            return error(f"container {self.bundle.name} is not running", 409)
        process = msg.get("process")
        if not isinstance(process, dict) or not process.get("args"):
            return error("exec: no command given (process.args is empty)")
        proc = _Proc(str(msg.get("id") or ""))

        def call(stdio: Stdio) -> int:
            return self.backend.exec(self.bundle, self.spec, self.init.pid, process, stdio)

        try:
            self._spawn(proc, call, bool(process.get("terminal")), bool(msg.get("stdin")))
        except ExecError as e:
            return error(e.message, e.exit_code)
        proc.client = client
        client.proc = proc
        self.execs[proc.pid] = proc
        size = process.get("consoleSize") or {}
        if proc.console is not None and size.get("height") and size.get("width"):
            with contextlib.suppress(OSError):
                set_winsize(proc.console, int(size["height"]), int(size["width"]))
        self.send(client, {"event": "exec_started", "pid": proc.pid})

    def finish_exec(self, proc: _Proc) -> None:
        self.drain(proc)
        self.close_stdin_fds(proc)
        self.execs.pop(proc.pid, None)
        if proc.client is not None:
            self.send(
                proc.client,
                {
                    "event": "exit",
                    "exit_code": proc.exit_code if proc.exit_code is not None else 137,
                    "oom_killed": False,
                    "finished_at": now_rfc3339(),
                },
            )

    def close_stdin_fds(self, proc: _Proc) -> None:
        for fd in {proc.stdin_fd, proc.console} - {None}:
            assert fd is not None
            if fd in self.sel.get_map():
                self.sel.unregister(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        proc.stdin_fd = proc.console = None

    # --- stdin --------------------------------------------------------------------------

    def write_stdin(self, proc: _Proc, data: bytes) -> None:
        if proc.stdin_fd is None or proc.stdin_closing:
            return
        was_empty = not proc.stdin_buf
        proc.stdin_buf += data
        if was_empty:
            self.flush_stdin(proc)

    def flush_stdin(self, proc: _Proc) -> None:
        fd = proc.stdin_fd
        if fd is None:
            return
        try:
            while proc.stdin_buf:
                n = os.write(fd, proc.stdin_buf)
                del proc.stdin_buf[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the process closed its stdin: drop what it will never read
            proc.stdin_buf.clear()
        registered = fd in self.sel.get_map()
        if proc.stdin_buf and not registered:
            self.sel.register(fd, selectors.EVENT_WRITE, proc)
        elif not proc.stdin_buf:
            if registered:
                self.sel.unregister(fd)
            if proc.stdin_closing:
                os.close(fd)
                proc.stdin_fd = None

    # --- the end ------------------------------------------------------------------------

    def finish(self) -> None:
        self.paused = False
        self.drain(self.init)
        self.close_stdin_fds(self.init)
        os.close(self.log_fd)
        # The init is gone, so are the processes of its pid namespace.
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while any(p.exit_code is None for p in self.execs.values()):
            self.reap()
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        for proc in list(self.execs.values()):
            self.finish_exec(proc)
        oom = False
        try:
            oom = bool(self.backend.oom_killed(self.bundle, self.spec))
        except Exception as e:
            print(f"shim: oom_killed: {e}", file=sys.stderr)
        try:
            self.backend.delete(self.bundle, self.spec)
        except Exception as e:
            print(f"shim: delete: {e}", file=sys.stderr)
        status: dict[str, Any] = {
            "exit_code": self.exit_code,
            "oom_killed": oom,
            "finished_at": self.finished_at,
        }
        if self.start_error is not None:
            status["error"] = self.start_error.message
        try:
            _write_atomic(
                os.path.join(str(self.bundle), EXIT_NAME),
                json.dumps({**status, "pid": self.pid}).encode(),
            )
        except OSError as e:  # the bundle is gone: the clients still get the event
            print(f"shim: writing exit.json: {e}", file=sys.stderr)
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
        _unlink(os.path.join(str(self.bundle), SOCKET_NAME))
        _unlink(os.path.join(str(self.bundle), PID_NAME))
        for c in list(self.clients.values()):
            if c.proc is None:
                self.send(c, {"event": "exit", **status})
        self.flush_all()

    def flush_all(self) -> None:
        deadline = time.monotonic() + FLUSH_TIMEOUT
        for c in list(self.clients.values()):
            try:
                c.sock.setblocking(True)
                while c.outbuf:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    c.sock.settimeout(left)
                    n = c.sock.send(c.outbuf)
                    del c.outbuf[:n]
            except OSError:
                pass
            self.drop(c)


def _load_backend_class(ref: str) -> Any:
    """``module:Class`` (anything after ``?`` is the instance's options) -> the class."""
    import importlib

    module, _, qualname = ref.partition("?")[0].partition(":")
    if not module or not qualname:
        raise ExecError(f"invalid backend reference {ref!r} (want module:Class)", 125)
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _load_backend(ref: str) -> ExecBackend:
    """An instance of the backend ``ref`` names: ``module:Class`` or
    ``module:Class?{JSON}``, the JSON object being the constructor's keyword arguments
    (how a runtime configured in ``runtimes`` gets its path and arguments)."""
    _, sep, options = ref.partition("?")
    kwargs = json.loads(options) if sep else {}
    if not isinstance(kwargs, dict):
        raise ExecError(f"invalid backend options in {ref!r}", 125)
    backend: ExecBackend = _load_backend_class(ref)(**kwargs)
    return backend


def _parse_args(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"stdin": False}
    it = iter(argv)
    for arg in it:
        if arg == "--stdin":
            opts["stdin"] = True
        elif arg in ("--bundle", "--backend", "--log"):
            try:
                opts[arg[2:]] = next(it)
            except StopIteration:
                raise SystemExit(f"shim: {arg} needs a value") from None
        else:
            raise SystemExit(f"shim: unknown argument {arg!r}")
    for name in ("bundle", "backend", "log"):
        if name not in opts:
            raise SystemExit(f"shim: --{name} is required")
    return opts


def _prctl(option: int, arg: int | bytes) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def _set_subreaper() -> None:
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _set_name(name: bytes) -> None:
    """The process name ps shows (``comm``): monitors forked from the zygote would
    otherwise look like the zygote."""
    try:
        _prctl(PR_SET_NAME, name)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m pallet.shim``. Its stdout is the launcher's status
    pipe: one JSON line (``{"pid": N}`` or ``{"error": ..., "exit_code": N}``)."""
    _trace("main")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--zygote"] and len(argv) == 2:
        _zygote(int(argv[1]))
    opts = _parse_args(argv)
    bundle = Path(os.path.abspath(opts["bundle"]))
    # Detach: a new session, and a second fork so that the monitor is no child of the
    # daemon (it is reparented to init, or to the nearest subreaper) and survives it.
    try:
        os.setsid()
    except PermissionError:
        pass
    if os.fork() != 0:
        os._exit(0)
    os.chdir("/")
    status_fd = os.dup(1)  # close-on-exec copy; fds 0 and 1 become /dev/null
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    _write_atomic(str(bundle / PID_NAME), str(os.getpid()).encode())
    _unlink(str(bundle / EXIT_NAME))
    code = 0
    try:
        code = _serve(bundle, opts, status_fd)
    except BaseException as e:
        import traceback

        traceback.print_exc()
        _unlink(str(bundle / PID_NAME))
        _report(status_fd, {"error": f"shim: {type(e).__name__}: {e}", "exit_code": 125})
        code = 1
    sys.stderr.flush()
    os._exit(code)


def _report(fd: int, msg: dict[str, Any]) -> None:
    if fd < 0:
        return
    try:
        os.write(fd, (json.dumps(msg) + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def _serve(bundle: Path, opts: dict[str, Any], status_fd: int) -> int:
    _set_subreaper()
    _set_name(b"pallet-shim")
    monitor: Monitor | None = None
    try:
        try:
            backend = _load_backend(opts["backend"])
        except ExecError:
            raise
        except Exception as e:
            raise ExecError(f"shim: loading backend {opts['backend']}: {e}", 125) from e
        _trace("backend loaded")
        monitor = Monitor(bundle, backend, opts["log"], opts["stdin"])
        monitor.watch_children()
        try:
            monitor.create()
        except (OSError, ValueError) as e:  # unreadable config.json, unwritable log...
            raise ExecError(f"shim: {e}", 125) from e
    except ExecError as e:
        status = {
            "exit_code": e.exit_code,
            "oom_killed": False,
            "finished_at": now_rfc3339(),
            "error": e.message,
            "pid": 0,
        }
        _write_atomic(str(bundle / EXIT_NAME), json.dumps(status).encode())
        _unlink(str(bundle / PID_NAME))
        _report(status_fd, {"error": e.message, "exit_code": e.exit_code})
        return 0
    _trace("created")
    monitor.listen()
    _report(status_fd, {"pid": monitor.pid})
    monitor.run()
    _trace("finished")
    return 0


# --- the zygote: monitors forked from a warm interpreter ----------------------------------
#
# Starting a monitor with ``python -m pallet.shim`` costs an interpreter start plus the
# imports of the shim and the backend (tens of milliseconds): most of ``pallet run``'s
# budget. So the daemon keeps one pre-started "zygote" (``--zygote FD``) that has all of
# that loaded and forks a monitor per request; the forked process runs the same
# ``main`` as the command line does (setsid + fork, detached from the daemon). A request
# is one SOCK_SEQPACKET message with the monitor's argv, carrying two fds: the status
# pipe (the monitor's stdout) and its log (stderr). The zygote exits when the daemon's
# end of the socket closes.


def _zygote(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    os.chdir("/")
    _set_name(b"pallet-zygote")
    loaded: set[str] = set()
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 4)
        except OSError:
            break
        if not msg:
            break
        try:
            req = json.loads(msg)
            argv = [str(a) for a in req.get("argv") or []]
            refs = [str(r) for r in req.get("preload") or []]
        except (ValueError, TypeError, AttributeError):
            argv, refs = [], []
        if "--backend" in argv[:-1]:
            refs.append(argv[argv.index("--backend") + 1])
        for ref in refs:
            if ref not in loaded:
                loaded.add(ref)
                try:  # warm: later monitors fork with the backend module imported
                    _load_backend_class(ref)
                except Exception:
                    pass  # the monitor reports the error itself
        if not argv:
            for f in fds:
                os.close(f)
            continue
        pid = os.fork()
        if pid == 0:
            try:
                sock.close()
                if len(fds) == 2:
                    os.dup2(fds[0], 1)
                    os.dup2(fds[1], 2)
                for f in fds:
                    os.close(f)
                main(argv)
            finally:
                os._exit(1)
        for f in fds:
            os.close(f)
        try:
            os.waitpid(pid, 0)  # it exits as soon as it has forked the monitor
        except ChildProcessError:
            pass
    os._exit(0)


class _ZygoteClient:
    """The daemon's handle on its zygote (one per daemon process, started lazily)."""

    _lock: Any = None
    _instance: _ZygoteClient | None = None

    def __init__(self) -> None:
        import subprocess

        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pallet.shim", "--zygote", str(child.fileno())],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                cwd="/",
            )
        finally:
            child.close()
        self.sock = parent
        self.env = dict(os.environ)  # a monitor gets the environment a spawn would give

    @classmethod
    def spawn(cls, argv: list[str], status_w: int, errlog: int) -> bool:
        """Ask the zygote for a monitor; False if there is no working zygote."""
        return cls._send({"argv": argv}, [status_w, errlog])

    @classmethod
    def _send(cls, msg: dict[str, Any], fds: list[int]) -> bool:
        import threading

        if cls._lock is None:
            cls._lock = threading.Lock()
        with cls._lock:
            for _ in range(2):
                inst = cls._instance
                if inst is not None and (inst.proc.poll() is not None or inst.env != os.environ):
                    inst.close()
                    inst = cls._instance = None
                if inst is None:
                    try:
                        inst = cls._instance = cls()
                    except OSError:
                        return False
                try:
                    socket.send_fds(inst.sock, [json.dumps(msg).encode()], fds)
                    return True
                except OSError:
                    inst.close()
                    cls._instance = None
            return False

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except Exception:
            self.proc.kill()

    @classmethod
    def shutdown(cls) -> None:
        """Stop the zygote (monitors it made live on)."""
        if cls._instance is not None:
            cls._instance.close()
            cls._instance = None


def use_zygote() -> bool:
    """Whether launches go through the zygote (``PALLET_SHIM_ZYGOTE=0`` turns it off)."""
    return os.environ.get("PALLET_SHIM_ZYGOTE", "1") != "0"


# --- the daemon's client -----------------------------------------------------------------


@dataclass
class ExitStatus:
    exit_code: int
    oom_killed: bool
    finished_at: str
    error: str = ""


def read_exit(bundle: Path) -> ExitStatus | None:
    """The exit status the monitor left in ``<bundle>/exit.json``, if any."""
    try:
        with open(os.path.join(str(bundle), EXIT_NAME), "rb") as f:
            data = json.load(f)
        return ExitStatus(
            exit_code=int(data["exit_code"]),
            oom_killed=bool(data.get("oom_killed", False)),
            finished_at=str(data.get("finished_at", "")),
            error=str(data.get("error", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shim_pid(bundle: Path) -> int | None:
    """The monitor's pid from ``<bundle>/shim.pid`` if that process is alive."""
    try:
        with open(os.path.join(str(bundle), PID_NAME)) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return None
        with open(f"/proc/{pid}/cmdline", "rb") as f:  # not some process that reused it
            return pid if b"pallet.shim" in f.read() else None
    except (OSError, ValueError, IndexError):
        return None


OutputCallback = Callable[[int, bytes], None]


class ShimClient:
    """The daemon's (asyncio) end of one container monitor."""

    pid: int

    def __init__(
        self,
        bundle: Path,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_output: OutputCallback,
    ) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        self.bundle = Path(bundle)
        self.pid = 0
        self.started = False
        self._reader = reader
        self._writer = writer
        self._on_output = on_output
        self._closing = False
        self._created: asyncio.Future[int] = loop.create_future()
        self._exit: asyncio.Future[ExitStatus] = loop.create_future()
        self._start: asyncio.Future[None] | None = None
        self._exec = False  # this connection runs an exec'd process
        self._task = loop.create_task(self._read_loop())

    @classmethod
    async def launch(
        cls,
        bundle: Path,
        backend: str,
        log_path: Path,
        stdin: bool,
        on_output: OutputCallback,
    ) -> ShimClient:
        """Spawn the detached monitor, wait until the process is created, connect.
        Raises ExecError (message, exit_code) if create failed."""

        bundle = Path(bundle)
        args = [
            sys.executable,
            "-m",
            "pallet.shim",
            "--bundle",
            str(bundle),
            "--backend",
            backend,
            "--log",
            str(log_path),
        ]
        if stdin:
            args.append("--stdin")
        errlog = os.open(
            str(bundle / LOG_NAME), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
        )
        status_r, status_w = os.pipe()
        try:
            if use_zygote() and _ZygoteClient.spawn(args[3:], status_w, errlog):
                first = None
            else:
                import subprocess

                first = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=status_w, stderr=errlog, cwd="/"
                )
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(errlog)
            os.close(status_w)
        try:
            line = await _read_line(status_r)
        finally:
            os.close(status_r)
            if first is not None:
                try:  # the first process exits as soon as it has forked the monitor
                    first.wait(timeout=10)
                except Exception:
                    pass
        try:
            msg = json.loads(line) if line.strip() else {}
        except ValueError:
            msg = {}
        if "error" in msg:
            raise ExecError(str(msg["error"]), int(msg.get("exit_code", 125)))
        if "pid" not in msg:
            raise ExecError(f"shim failed to start: {_tail(bundle / LOG_NAME)}", 125)
        return await cls.connect(bundle, on_output)

    @classmethod
    async def connect(cls, bundle: Path, on_output: OutputCallback) -> ShimClient:
        """Attach to a running monitor (after a daemon restart, or a second client).
        Raises FileNotFoundError/ConnectionError if the monitor is gone."""
        import asyncio

        bundle = Path(bundle)
        if not (bundle / SOCKET_NAME).exists():
            raise FileNotFoundError(f"no shim socket in {bundle}")
        address, dirfd = _socket_address(bundle)
        try:
            reader, writer = await asyncio.open_unix_connection(address)
        finally:
            if dirfd is not None:
                os.close(dirfd)
        client = cls(bundle, reader, writer, on_output)
        try:
            client.pid = await client._created
        except BaseException:
            await client.close()
            raise
        return client

    @staticmethod
    def warm_up(backends: list[str]) -> None:
        """Start the zygote now and have it import ``backends`` ("module:Class"), so
        that the first ``launch`` is as fast as the next ones. Call at daemon start;
        non-blocking, harmless when the zygote is turned off or cannot start."""
        if use_zygote():
            _ZygoteClient._send({"preload": list(backends)}, [])

    # --- operations ---------------------------------------------------------------------

    async def start(self) -> None:
        """Let the container exec. Raises ExecError with Docker's exit code."""
        import asyncio

        if self._exit.done():
            st = self._exit.result()
            raise ExecError(st.error or "container has exited", st.exit_code)
        self._start = asyncio.get_running_loop().create_future()
        await self._control({"op": "start"})
        await self._start

    @classmethod
    async def exec(
        cls,
        bundle: Path,
        exec_id: str,
        process: dict[str, Any],
        stdin: bool,
        on_output: OutputCallback,
    ) -> ShimClient:
        """Start ``process`` (OCI process object) in the running container through its
        monitor. The returned client is that process's own: ``pid``, ``write_stdin``,
        ``close_stdin``, ``resize``, ``kill``, and ``wait`` for its exit status.
        Raises ExecError (Docker's exit code), or FileNotFoundError/ConnectionError if
        the monitor is gone."""
        import asyncio

        client = await cls.connect(bundle, on_output)
        client._exec = True
        client._start = asyncio.get_running_loop().create_future()
        try:
            await client._control(
                {"op": "exec", "id": exec_id, "process": process, "stdin": bool(stdin)}
            )
            await client._start
        except BaseException:
            await client.close()
            raise
        return client

    async def resize(self, height: int, width: int) -> None:
        """Set the terminal's size (the container's, or this exec's)."""
        await self._control({"op": "resize", "height": int(height), "width": int(width)})

    async def write_stdin(self, data: bytes) -> None:
        for i in range(0, len(data), 1 << 20):
            self._writer.write(frame(0, data[i : i + (1 << 20)]))
        await self._writer.drain()

    async def close_stdin(self) -> None:
        await self._control({"op": "close_stdin"})

    async def kill(self, signal: int) -> None:
        await self._control({"op": "kill", "signal": int(signal)})

    async def wait(self) -> ExitStatus:
        """The exit status, when the container's init has exited."""
        import asyncio

        return await asyncio.shield(self._exit)

    async def close(self) -> None:
        """Disconnect (the container and its monitor carry on)."""
        import asyncio

        self._closing = True
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (OSError, asyncio.CancelledError):
            pass
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    # --- internals ----------------------------------------------------------------------

    async def _control(self, msg: dict[str, Any]) -> None:
        if self._writer.is_closing():
            raise ConnectionError("shim connection is closed")
        self._writer.write(frame(CONTROL, json.dumps(msg).encode()))
        await self._writer.drain()

    async def _read_loop(self) -> None:
        import asyncio

        reader = self._reader
        try:
            while True:
                header = await reader.readexactly(HEADER_SIZE)
                stream, length = parse_header(header)
                payload = await reader.readexactly(length) if length else b""
                if stream in (1, 2):
                    try:
                        self._on_output(stream, payload)
                    except Exception:
                        import logging

                        logging.getLogger("pallet.shim").exception("on_output failed")
                elif stream == CONTROL:
                    self._event(json.loads(payload))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError):
            pass
        finally:
            self._closed()

    def _event(self, msg: dict[str, Any]) -> None:
        event = msg.get("event")
        if event == "created":
            self.pid = int(msg.get("pid", 0))
            self.started = bool(msg.get("started", False))
            if not self._created.done():
                self._created.set_result(self.pid)
        elif event == "exec_started":
            self.pid = int(msg.get("pid", 0))
            if self._start is not None and not self._start.done():
                self._start.set_result(None)
        elif event == "started":
            self.started = True
            if self._start is not None and not self._start.done():
                self._start.set_result(None)
        elif event == "error":
            if self._start is not None and not self._start.done():
                self._start.set_exception(
                    ExecError(str(msg.get("message", "")), int(msg.get("exit_code", 125)))
                )
        elif event == "exit":
            st = ExitStatus(
                exit_code=int(msg.get("exit_code", 0)),
                oom_killed=bool(msg.get("oom_killed", False)),
                finished_at=str(msg.get("finished_at", "")),
                error=str(msg.get("error", "")),
            )
            self._set_exit(st)

    def _set_exit(self, st: ExitStatus) -> None:
        if not self._exit.done():
            self._exit.set_result(st)
        if self._start is not None and not self._start.done():
            self._start.set_exception(
                ExecError(st.error or "container exited before it started", st.exit_code)
            )

    def _closed(self) -> None:
        if not self._created.done():
            self._created.set_exception(ConnectionError("shim closed the connection"))
        if self._closing:
            for fut in (self._exit, self._start):
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectionError("shim client closed"))
                    fut.exception()  # nobody may be waiting: mark it retrieved
            return
        st = None if self._exec else read_exit(self.bundle)
        if st is None:
            st = ExitStatus(255, False, now_rfc3339(), "shim exited without an exit status")
        self._set_exit(st)


async def _read_line(fd: int) -> bytes:
    """One line (or everything up to EOF) from a pipe, without blocking the loop. The
    monitor's children hold the pipe open until they exec, so EOF cannot be awaited."""
    import asyncio

    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = bytearray()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        buf.extend(chunk)
        if (not chunk or b"\n" in buf) and not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return bytes(buf).split(b"\n", 1)[0]


def _tail(path: Path, size: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace").strip() or "(no output)"
    except OSError:
        return "(no log)"


if __name__ == "__main__":
    main()
