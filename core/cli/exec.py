"""``pallet exec`` and ``pallet attach``, and the interactive terminal session that
``pallet run -it`` shares with them: raw mode on the local terminal, the remote
terminal resized to ours (now and on SIGWINCH), and docker's detach keys
(``ctrl-p,ctrl-q`` by default) recognised on our side as well as the daemon's."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import click
from pallet.cli._common import _client, _err, pump_output

if TYPE_CHECKING:
    from pallet.client import Client, Hijacked


def terminal_size(fd: int | None = None) -> tuple[int, int] | None:
    """(rows, columns) of our terminal, or None when there is none."""
    for candidate in (fd, 1, 0, 2):
        if candidate is None:
            continue
        try:
            size = os.get_terminal_size(candidate)
        except OSError:
            continue
        if size.lines and size.columns:
            return size.lines, size.columns
    return None


class TerminalSession:
    """Local side of a remote TTY: raw mode (when our stdin is a terminal and is
    attached) and size tracking through ``resize_path``; ``close`` restores."""

    def __init__(self, client: Client, resize_path: str, raw: bool) -> None:
        self.client = client
        self.resize_path = resize_path
        self.saved: list[Any] | None = None
        self.old_handler: Any = None
        if raw and sys.stdin.isatty():
            import termios
            import tty

            fd = sys.stdin.fileno()
            self.saved = termios.tcgetattr(fd)
            tty.setraw(fd, termios.TCSANOW)

    def track_size(self) -> None:
        """Resize the remote terminal now and whenever ours changes."""
        import signal

        self.resize()
        try:
            self.old_handler = signal.signal(signal.SIGWINCH, self._on_winch)
        except (ValueError, OSError):  # not the main thread
            self.old_handler = None

    def _on_winch(self, signum: int, frame: Any) -> None:
        import threading

        threading.Thread(target=self.resize, daemon=True).start()

    def resize(self) -> None:
        size = terminal_size()
        if size is None:
            return
        try:
            self.client.post(self.resize_path, {"h": size[0], "w": size[1]})
        except Exception:
            pass  # the process may be gone already

    def close(self) -> None:
        import signal

        if self.old_handler is not None:
            try:
                signal.signal(signal.SIGWINCH, self.old_handler)
            except (ValueError, OSError, TypeError):
                pass
            self.old_handler = None
        if self.saved is not None:
            import termios

            try:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self.saved)
            except (termios.error, OSError):
                pass
            self.saved = None


def stream_session(conn: Hijacked, *, tty: bool, stdin: bool, detach_keys: bytes) -> bool:
    """Copy our stdin to ``conn`` (watching for the detach keys) and its output to our
    stdout/stderr until it ends. Returns True if the user detached."""
    import threading

    from pallet.exec import DetachScanner

    state = {"detached": False}

    def pump_stdin() -> None:
        scanner = DetachScanner(detach_keys if tty else b"")
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, ValueError, OSError):
            conn.close_write()
            return
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                data, detached = scanner.feed(data)
                if data:
                    conn.sendall(data)
                if detached:
                    state["detached"] = True
                    import socket

                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
        except OSError:
            pass
        conn.close_write()

    if stdin:
        threading.Thread(target=pump_stdin, daemon=True).start()
    pump_output(conn, tty)
    return state["detached"]


def _detach_keys(value: str | None) -> bytes:
    from pallet.errors import InvalidArgument
    from pallet.exec import parse_detach_keys

    try:
        return parse_detach_keys(value)
    except InvalidArgument as e:
        _err(str(e))
        sys.exit(125)


@click.command(
    "exec",
    context_settings={"allow_interspersed_args": False, "help_option_names": ["--help"]},
    short_help="Execute a command in a running container.",
)
@click.option("-d", "--detach", is_flag=True, help="Detached mode: run command in the background.")
@click.option("--detach-keys", help="Override the key sequence for detaching a container.")
@click.option("-e", "--env", multiple=True, help="Set environment variables.")
@click.option("--env-file", multiple=True, help="Read in a file of environment variables.")
@click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open even if not attached.")
@click.option("--privileged", is_flag=True, help="Give extended privileges to the command.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY.")
@click.option("-u", "--user", help="Username or UID (format: <name|uid>[:<group|gid>]).")
@click.option("-w", "--workdir", help="Working directory inside the container.")
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(container: str, command: tuple[str, ...], **opts: Any) -> None:
    """Execute a command in a running container."""
    from pallet.client import APIError, ClientError

    keys = _detach_keys(opts["detach_keys"])
    env = list(opts["env"])
    for path in opts["env_file"]:
        env += _read_env_file(path)
    env = [e if "=" in e else f"{e}={os.environ.get(e, '')}" for e in env if e]
    tty, interactive, detach = opts["tty"], opts["interactive"], opts["detach"]
    body: dict[str, Any] = {
        "User": opts["user"] or "",
        "Privileged": opts["privileged"],
        "Tty": tty,
        "AttachStdin": interactive and not detach,
        "AttachStdout": not detach,
        "AttachStderr": not detach,
        "DetachKeys": opts["detach_keys"] or "",
        "Env": env or None,
        "WorkingDir": opts["workdir"] or "",
        "Cmd": list(command),
    }
    size = terminal_size() if tty else None
    if size:
        body["ConsoleSize"] = list(size)
    client = _client()
    try:
        eid = client.post(f"/containers/{container}/exec", json_body=body)["Id"]
    except ClientError as exc:
        _err(f"Error response from daemon: {getattr(exc, 'message', exc)}")
        sys.exit(1)
    start: dict[str, Any] = {"Detach": detach, "Tty": tty}
    if size:
        start["ConsoleSize"] = list(size)
    if detach:
        try:
            client.post(f"/exec/{eid}/start", json_body=start)
        except ClientError as exc:
            _err(f"Error response from daemon: {getattr(exc, 'message', exc)}")
            sys.exit(1)
        return
    try:
        conn = client.hijack("POST", f"/exec/{eid}/start", json_body=start)
    except APIError as exc:
        _err(f"Error response from daemon: {exc.message}")
        sys.exit(1)
    except ClientError as exc:
        _err(str(exc))
        sys.exit(1)
    session = TerminalSession(client, f"/exec/{eid}/resize", raw=tty and interactive)
    detached = False
    try:
        with conn:
            if tty:
                session.track_size()
            detached = stream_session(conn, tty=tty, stdin=interactive, detach_keys=keys)
    finally:
        session.close()
    if detached:
        return
    try:
        info = client.get(f"/exec/{eid}/json")
    except ClientError as exc:
        _err(str(exc))
        sys.exit(1)
    code = info.get("ExitCode")
    sys.exit(int(code) if code is not None else 0)


def _read_env_file(path: str) -> list[str]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        _err(f"open {path}: {e.strerror.lower() if e.strerror else e}")
        sys.exit(125)
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@click.command(short_help="Attach local standard streams to a running container.")
@click.option("--detach-keys", help="Override the key sequence for detaching a container.")
@click.option("--no-stdin", is_flag=True, help="Do not attach STDIN.")
@click.option(
    "--sig-proxy/--no-sig-proxy",
    default=True,
    help="Proxy all received signals to the process.",
)
@click.argument("container")
def attach(container: str, detach_keys: str | None, no_stdin: bool, sig_proxy: bool) -> None:
    """Attach local standard input, output, and error streams to a running container."""
    from pallet.client import APIError, ClientError

    keys = _detach_keys(detach_keys)
    client = _client()
    try:
        info = client.get(f"/containers/{container}/json")
    except ClientError as exc:
        _err(f"Error response from daemon: {getattr(exc, 'message', exc)}")
        sys.exit(1)
    cid = info["Id"]
    state = info.get("State") or {}
    if not state.get("Running"):
        _err("You cannot attach to a stopped container, start it first")
        sys.exit(1)
    if state.get("Paused"):
        _err("You cannot attach to a paused container, unpause it first")
        sys.exit(1)
    config = info.get("Config") or {}
    tty = bool(config.get("Tty"))
    stdin = not no_stdin and bool(config.get("OpenStdin"))
    params: dict[str, Any] = {"stream": 1, "stdout": 1, "stderr": 1, "stdin": 1 if stdin else None}
    if detach_keys:
        params["detachKeys"] = detach_keys
    try:
        conn = client.hijack("POST", f"/containers/{cid}/attach", params)
    except APIError as exc:
        _err(f"Error response from daemon: {exc.message}")
        sys.exit(1)
    except ClientError as exc:
        _err(str(exc))
        sys.exit(1)
    proxy = None
    if sig_proxy and not tty:
        from pallet.cli.containers import _SignalProxy

        proxy = _SignalProxy(client, cid)
    session = TerminalSession(client, f"/containers/{cid}/resize", raw=tty and stdin)
    try:
        with conn:
            if tty:
                session.track_size()
            detached = stream_session(conn, tty=tty, stdin=stdin, detach_keys=keys)
    finally:
        session.close()
        if proxy is not None:
            proxy.restore()
    if detached:  # as docker attach reports it
        _err("read escape sequence")
        sys.exit(1)
    try:
        result = client.post(f"/containers/{cid}/wait", {"condition": "not-running"}) or {}
    except ClientError:
        return
    sys.exit(int(result.get("StatusCode", 0)))
