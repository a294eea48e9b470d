"""Container commands: run, create, start, stop, restart, kill, rm, ps, logs, wait,
inspect."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click
from pallet.cli._common import (
    _binary,
    _client,
    _each,
    _err,
    _fail,
    _filters,
    pump_output,
    split_reference,
    tagged_reference,
)
from pallet.cli.format import (
    _local_time,
    _render,
    _template,
    display_jsonmessages,
    ellipsis,
    format_rows,
    go_quote,
    human_duration,
    human_size,
    short_id,
)

if TYPE_CHECKING:
    from pallet.client import Client, Hijacked, Response

F = TypeVar("F", bound=Callable[..., Any])


def _container_options(f: F) -> F:
    options = [
        click.option("--name", help="Assign a name to the container."),
        click.option(
            "-e", "--env", "env", multiple=True, metavar="LIST", help="Set environment variables."
        ),
        click.option(
            "--env-file",
            "env_files",
            multiple=True,
            type=click.Path(dir_okay=False),
            help="Read in a file of environment variables.",
        ),
        click.option("-w", "--workdir", help="Working directory inside the container."),
        click.option("--entrypoint", help="Overwrite the default ENTRYPOINT of the image."),
        click.option("-i", "--interactive", is_flag=True, help="Keep STDIN open."),
        click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-TTY."),
        click.option("-u", "--user", help="Username or UID (format: <name|uid>[:<group|gid>])."),
        click.option("--runtime", help="Runtime to use for this container."),
        click.option("-h", "--hostname", help="Container host name."),
        click.option(
            "-l", "--label", "labels", multiple=True, metavar="LIST", help="Set metadata."
        ),
        click.option("--network", help="Connect a container to a network."),
        click.option("--privileged", is_flag=True, help="Give extended privileges."),
        click.option("--rm", "auto_remove", is_flag=True, help="Remove the container on exit."),
    ]
    for option in reversed(options):
        f = option(f)
    from pallet.cli.networks import network_options  # -p, -P, --dns, --add-host...
    from pallet.cli.runflags import host_options  # hardening, resources, mounts, restart

    return network_options(host_options(f))


def _parse_env_file(path: str) -> list[str]:
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise click.BadParameter(f"open {path}: {exc.strerror}", param_hint="--env-file") from None
    for n, raw in enumerate(lines, 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, _ = line.partition("=")
        if not key.strip() or (" " in key.strip() and not sep):
            raise click.BadParameter(
                f"variable '{key}' contains whitespaces ({path}:{n})", param_hint="--env-file"
            )
        if sep:
            out.append(line)
        elif key in os.environ:
            out.append(f"{key}={os.environ[key]}")
    return out


def _env_list(env: tuple[str, ...], env_files: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for path in env_files:
        out.extend(_parse_env_file(path))
    for item in env:
        if "=" in item:
            out.append(item)
        elif item in os.environ:
            out.append(f"{item}={os.environ[item]}")
        else:
            out.append(item)
    return out


def _labels(labels: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in labels:
        key, _, value = item.partition("=")
        out[key] = value
    return out


def build_create_body(
    image: str,
    command: tuple[str, ...],
    *,
    detach: bool = False,
    env: tuple[str, ...] = (),
    env_files: tuple[str, ...] = (),
    workdir: str | None = None,
    entrypoint: str | None = None,
    interactive: bool = False,
    tty: bool = False,
    user: str | None = None,
    runtime: str | None = None,
    hostname: str | None = None,
    labels: tuple[str, ...] = (),
    network: str | None = None,
    privileged: bool = False,
    auto_remove: bool = False,
    **_: Any,
) -> dict[str, Any]:
    """The body docker sends to ``POST /containers/create``."""
    from pallet.cli.runflags import host_config_from_flags

    attach = not detach
    host_config: dict[str, Any] = {"AutoRemove": auto_remove}
    more_host_config, more_config = host_config_from_flags(_)
    host_config.update(more_host_config)
    from pallet.cli.networks import network_config_from_flags

    net_host_config, net_config = network_config_from_flags(_, network)
    host_config.update(net_host_config)
    more_config.update(net_config)
    if runtime:
        host_config["Runtime"] = runtime
    if network:
        host_config["NetworkMode"] = network
    if privileged:
        host_config["Privileged"] = True
    body: dict[str, Any] = {
        "Hostname": hostname or "",
        "Domainname": "",
        "User": user or "",
        "AttachStdin": attach and interactive,
        "AttachStdout": attach,
        "AttachStderr": attach,
        "Tty": tty,
        "OpenStdin": interactive,
        "StdinOnce": attach and interactive,
        "Env": _env_list(env, env_files),
        "Cmd": list(command) if command else None,
        "Image": image,
        "WorkingDir": workdir or "",
        "Entrypoint": [entrypoint] if entrypoint is not None else None,
        "Labels": _labels(labels),
        "HostConfig": host_config,
        **more_config,
    }
    return body


_RUN_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


def _run_error(msg: str, cmd: str = "run") -> None:
    _err(f"pallet: {msg}\nSee 'pallet {cmd} --help'.")


def _start_error_status(msg: str) -> int:
    """docker's runStartContainerErr: 127 command not found, 126 cannot execute."""
    if (
        "executable file not found" in msg
        or "no such file or directory" in msg
        or "system cannot find the file specified" in msg
    ):
        return 127
    if "permission denied" in msg or "is a directory" in msg:
        return 126
    return 125


def _pull(client: Client, ref: str, out: IO[str]) -> None:
    name, tag = split_reference(ref)
    if "@" in ref:
        params = {"fromImage": ref}
    else:
        params = {"fromImage": name, "tag": tag or "latest"}
    display_jsonmessages(client.stream_json("POST", "/images/create", params), out)


def _create(client: Client, body: dict[str, Any], name: str | None, cmd: str) -> str:
    """Create the container, pulling the image once if the daemon does not have it.
    Errors are reported docker-style and end the process with status 125."""
    from pallet.client import APIError, ClientError

    params = {"name": name} if name else None
    try:
        try:
            resp = client.post("/containers/create", params, body)
        except APIError as exc:
            if exc.status != 404 or "No such image" not in exc.message:
                raise
            _err(f"Unable to find image '{tagged_reference(body['Image'])}' locally")
            _pull(client, body["Image"], sys.stderr)
            resp = client.post("/containers/create", params, body)
    except ClientError as exc:
        _run_error(str(exc), cmd)
        sys.exit(125)
    for warning in (resp or {}).get("Warnings") or []:
        _err(f"WARNING: {warning}")
    return str(resp["Id"])


def _stdin_pump(conn: Hijacked) -> None:
    """Copy our stdin to the attach connection; half-close it when stdin ends."""
    read: Callable[[int], bytes]
    try:
        fd = sys.stdin.fileno()

        def read(n: int) -> bytes:
            return os.read(fd, n)

    except (AttributeError, ValueError, OSError):
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is None:
            conn.close_write()
            return
        read = getattr(buffer, "read1", None) or buffer.read
    try:
        while True:
            data = read(65536)
            if not data:
                break
            conn.sendall(data)
    except OSError:
        pass
    finally:
        conn.close_write()


class _SignalProxy:
    """docker's --sig-proxy: signals the CLI gets are sent to the container."""

    def __init__(self, client: Client, cid: str) -> None:
        import signal

        self.client = client
        self.cid = cid
        self.saved: dict[int, Any] = {}
        self.interrupts = 0
        for name in _RUN_SIGNALS:
            num = getattr(signal, name, None)
            if num is None:
                continue
            try:
                self.saved[num] = signal.signal(num, self._handle)
            except (ValueError, OSError):  # not the main thread
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        import signal
        import threading

        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= 3:
                _err("got 3 interrupts, exiting without waiting for the container")
                os._exit(130)
        name = signal.Signals(signum).name

        def send() -> None:
            try:
                self.client.post(f"/containers/{self.cid}/kill", {"signal": name})
            except Exception:
                pass

        threading.Thread(target=send, daemon=True).start()

    def restore(self) -> None:
        import signal

        for num, handler in self.saved.items():
            try:
                signal.signal(num, handler)
            except (ValueError, OSError, TypeError):
                pass


def _attach_wait_start(
    client: Client,
    cid: str,
    *,
    stdin: bool,
    tty: bool,
    auto_remove: bool,
    sig_proxy: bool,
    cmd: str,
) -> int:
    """docker's sequence: attach (hijacked) -> wait (headers now, body at exit) -> start
    -> copy streams -> exit status from wait."""
    from pallet.client import APIError, ClientError

    params = {"stream": 1, "stdin": 1 if stdin else None, "stdout": 1, "stderr": 1}
    try:
        conn = client.hijack("POST", f"/containers/{cid}/attach", params)
    except ClientError as exc:
        _run_error(str(exc), cmd)
        return 125
    wait_resp: Response | None = None
    wait_error: str | None = None
    try:
        wait_resp = client.request(
            "POST",
            f"/containers/{cid}/wait",
            {"condition": "removed" if auto_remove else "next-exit"},
        )
    except ClientError as exc:
        wait_error = str(exc)
    try:
        with conn:
            try:
                client.post(f"/containers/{cid}/start")
            except ClientError as exc:
                conn.close()
                _run_error(str(exc), cmd)
                if auto_remove and wait_resp is not None:
                    # the daemon removes it; give it a moment, as docker waits for that
                    try:
                        wait_resp.sock.settimeout(10)
                        wait_resp.read()
                    except (OSError, ClientError):
                        pass
                msg = exc.message if isinstance(exc, APIError) else str(exc)
                return _start_error_status(msg)
            proxy = _SignalProxy(client, cid) if sig_proxy and not tty else None
            session = None
            if tty:  # raw mode, size tracking, detach keys: see pallet.cli.exec
                from pallet.cli.exec import TerminalSession, stream_session

                session = TerminalSession(client, f"/containers/{cid}/resize", raw=stdin)
                session.track_size()
            try:
                if session is not None:
                    if stream_session(conn, tty=True, stdin=stdin, detach_keys=b"\x10\x11"):
                        return 0  # ctrl-p ctrl-q: detached, the container runs on
                elif stdin:
                    import threading

                    threading.Thread(target=_stdin_pump, args=(conn,), daemon=True).start()
                if session is None:
                    pump_output(conn, tty)
            finally:
                if session is not None:
                    session.close()
                if proxy is not None:
                    proxy.restore()
        if wait_resp is None:
            _err(f"Error waiting for container: {wait_error}")
            return 125
        try:
            result = wait_resp.json() or {}
        except (OSError, ClientError) as exc:
            _err(f"Error waiting for container: {exc}")
            return 125
        error = result.get("Error") or {}
        if error.get("Message"):
            _err(f"Error waiting for container: {error['Message']}")
            return 125
        return int(result.get("StatusCode", 125))
    finally:
        if wait_resp is not None:
            wait_resp.close()


@click.command(
    context_settings={"allow_interspersed_args": False, "help_option_names": ["--help"]},
    short_help="Create and run a new container from an image.",
)
@_container_options
@click.option("-d", "--detach", is_flag=True, help="Run in the background, print the ID.")
@click.option(
    "--sig-proxy/--no-sig-proxy",
    default=True,
    help="Proxy received signals to the process (non-TTY mode only).",
)
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(image: str, command: tuple[str, ...], **opts: Any) -> None:
    """Create and run a new container from an image."""
    client = _client()
    body = build_create_body(image, command, **opts)
    if opts["tty"]:  # the size the process starts with, as docker sends it
        from pallet.cli.exec import terminal_size

        size = terminal_size()
        if size:
            body.setdefault("HostConfig", {})["ConsoleSize"] = list(size)
    cid = _create(client, body, opts.get("name"), "run")
    if opts["detach"]:
        from pallet.client import ClientError

        try:
            client.post(f"/containers/{cid}/start")
        except ClientError as exc:
            _run_error(str(exc))
            msg = getattr(exc, "message", str(exc))
            sys.exit(_start_error_status(msg))
        click.echo(cid)
        return
    code = _attach_wait_start(
        client,
        cid,
        stdin=opts["interactive"],
        tty=opts["tty"],
        auto_remove=opts["auto_remove"],
        sig_proxy=opts["sig_proxy"],
        cmd="run",
    )
    sys.exit(code)


@click.command(
    context_settings={"allow_interspersed_args": False, "help_option_names": ["--help"]},
)
@_container_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def create(image: str, command: tuple[str, ...], **opts: Any) -> None:
    """Create a new container."""
    client = _client()
    body = build_create_body(image, command, **opts)
    click.echo(_create(client, body, opts.get("name"), "create"))


@click.command(short_help="Start one or more stopped containers.")
@click.option("-a", "--attach", is_flag=True, help="Attach STDOUT/STDERR and forward signals.")
@click.option("-i", "--interactive", is_flag=True, help="Attach container's STDIN.")
@click.argument("containers", nargs=-1, required=True)
def start(attach: bool, interactive: bool, containers: tuple[str, ...]) -> None:
    """Start one or more stopped containers."""
    client = _client()
    if attach or interactive:
        if len(containers) > 1:
            _fail("Error: you cannot start and attach multiple containers at once")
        info = client.get(f"/containers/{containers[0]}/json")
        config = info.get("Config") or {}
        host_config = info.get("HostConfig") or {}
        code = _attach_wait_start(
            client,
            info.get("Id") or containers[0],
            stdin=interactive and bool(config.get("OpenStdin")),
            tty=bool(config.get("Tty")),
            auto_remove=bool(host_config.get("AutoRemove")),
            sig_proxy=True,
            cmd="start",
        )
        sys.exit(code)

    def do(name: str) -> None:
        client.post(f"/containers/{name}/start")
        click.echo(name)

    _each(containers, do, "failed to start containers")


@click.command(short_help="Stop one or more running containers.")
@click.option(
    "-t", "--time", "--timeout", "timeout", type=int, help="Seconds to wait before killing it."
)
@click.option("-s", "--signal", "sig", help="Signal to send to the container.")
@click.argument("containers", nargs=-1, required=True)
def stop(timeout: int | None, sig: str | None, containers: tuple[str, ...]) -> None:
    """Stop one or more running containers."""
    client = _client()

    def do(name: str) -> None:
        client.post(f"/containers/{name}/stop", {"t": timeout, "signal": sig})
        click.echo(name)

    _each(containers, do)


@click.command(short_help="Restart one or more containers.")
@click.option(
    "-t", "--time", "--timeout", "timeout", type=int, help="Seconds to wait before killing it."
)
@click.option("-s", "--signal", "sig", help="Signal to send to the container.")
@click.argument("containers", nargs=-1, required=True)
def restart(timeout: int | None, sig: str | None, containers: tuple[str, ...]) -> None:
    """Restart one or more containers."""
    client = _client()

    def do(name: str) -> None:
        client.post(f"/containers/{name}/restart", {"t": timeout, "signal": sig})
        click.echo(name)

    _each(containers, do)


@click.command(short_help="Kill one or more running containers.")
@click.option("-s", "--signal", "sig", help="Signal to send to the container.")
@click.argument("containers", nargs=-1, required=True)
def kill(sig: str | None, containers: tuple[str, ...]) -> None:
    """Kill one or more running containers."""
    client = _client()

    def do(name: str) -> None:
        client.post(f"/containers/{name}/kill", {"signal": sig})
        click.echo(name)

    _each(containers, do)


@click.command(short_help="Remove one or more containers.")
@click.option("-f", "--force", is_flag=True, help="Force the removal of a running container.")
@click.option("-v", "--volumes", is_flag=True, help="Remove anonymous volumes too.")
@click.argument("containers", nargs=-1, required=True)
def rm(force: bool, volumes: bool, containers: tuple[str, ...]) -> None:
    """Remove one or more containers."""
    client = _client()

    def do(name: str) -> None:
        client.delete(f"/containers/{name}", {"force": force or None, "v": volumes or None})
        click.echo(name)

    _each(containers, do)


def _ports(ports: list[dict[str, Any]] | None) -> str:
    out = []
    seen = set()
    for p in sorted(
        ports or [],
        key=lambda p: (p.get("Type", ""), p.get("PrivatePort", 0), p.get("IP", "")),
    ):
        private = f"{p.get('PrivatePort')}/{p.get('Type', 'tcp')}"
        if p.get("PublicPort"):
            ip = p.get("IP") or ""
            if ":" in ip:
                ip = f"[{ip}]"
            text = f"{ip}:{p['PublicPort']}->{private}"
        else:
            text = private
        if text not in seen:
            seen.add(text)
            out.append(text)
    return ", ".join(out)


_PS_HEADERS = {
    "ID": "CONTAINER ID",
    "Image": "IMAGE",
    "Command": "COMMAND",
    "CreatedAt": "CREATED AT",
    "RunningFor": "CREATED",
    "Ports": "PORTS",
    "State": "STATE",
    "Status": "STATUS",
    "Size": "SIZE",
    "Names": "NAMES",
    "Labels": "LABELS",
    "Mounts": "MOUNTS",
    "Networks": "NETWORKS",
}
_PS_TABLE = (
    "table {{.ID}}\t{{.Image}}\t{{.Command}}\t{{.RunningFor}}\t{{.Status}}\t{{.Ports}}\t{{.Names}}"
)


def _container_row(c: dict[str, Any], trunc: bool, now: float) -> dict[str, Any]:
    command = c.get("Command") or ""
    created = c.get("Created") or 0
    names = [n[1:] if n.startswith("/") else n for n in c.get("Names") or []]
    image = c.get("Image") or ""
    if trunc and image.startswith("sha256:"):
        image = short_id(image)
    status = c.get("Status") or str(c.get("State") or "").capitalize()
    networks = ((c.get("NetworkSettings") or {}).get("Networks") or {}).keys()
    mounts = [m.get("Name") or m.get("Source") or "" for m in c.get("Mounts") or []]
    labels = c.get("Labels") or {}
    size = ""
    if "SizeRw" in c or "SizeRootFs" in c:
        size = human_size(c.get("SizeRw") or 0)
        if c.get("SizeRootFs"):
            size += f" (virtual {human_size(c['SizeRootFs'])})"
    return {
        "ID": short_id(c.get("Id") or "", trunc),
        "Image": image,
        "Command": go_quote(ellipsis(command, 20) if trunc else command),
        "CreatedAt": _local_time(created) if created else "",
        "RunningFor": human_duration(now - created) + " ago" if created else "",
        "Ports": _ports(c.get("Ports")),
        "State": c.get("State") or "",
        "Status": status,
        "Size": size,
        "Names": ",".join(names),
        "Labels": ",".join(f"{k}={v}" for k, v in labels.items()),
        "Mounts": ",".join(mounts),
        "Networks": ",".join(networks),
    }


@click.command(short_help="List containers.")
@click.option("-a", "--all", "all_", is_flag=True, help="Show all containers.")
@click.option("-q", "--quiet", is_flag=True, help="Only display container IDs.")
@click.option("--no-trunc", is_flag=True, help="Don't truncate output.")
@click.option("-f", "--filter", "filters", multiple=True, help="Filter output (name=value).")
@click.option("-n", "--last", type=int, default=-1, help="Show n last created containers.")
@click.option("-l", "--latest", is_flag=True, help="Show the latest created container.")
@click.option("-s", "--size", is_flag=True, help="Display total file sizes.")
@click.option("--format", "fmt", help="Format output using a Go template (or 'table ...').")
def ps(
    all_: bool,
    quiet: bool,
    no_trunc: bool,
    filters: tuple[str, ...],
    last: int,
    latest: bool,
    size: bool,
    fmt: str | None,
) -> None:
    """List containers."""
    limit = 1 if latest else last
    params: dict[str, Any] = {
        "all": 1 if all_ or limit > 0 else None,
        "limit": limit if limit > 0 else None,
        "size": 1 if size else None,
        "filters": _filters(filters),
    }
    containers = _client().get("/containers/json", params) or []
    now = time.time()
    rows = [_container_row(c, not no_trunc, now) for c in containers]
    if quiet:
        fmt = "{{.ID}}"
    elif not fmt or fmt == "table":
        fmt = _PS_TABLE + ("\t{{.Size}}" if size else "")
    click.echo(format_rows(fmt, rows, _PS_HEADERS), nl=False)


def _since(value: str | None) -> str | None:
    """docker's timetypes.GetTimestamp: a duration ("10m", "1h30m") back from now, a
    Unix timestamp, or an RFC 3339 date/time."""
    if not value:
        return value
    import re

    try:
        float(value)
        return value
    except ValueError:
        pass
    unit = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", value)
    if parts and "".join(a + b for a, b in parts) == value:
        seconds = sum(float(a) * unit[b] for a, b in parts)
        return f"{time.time() - seconds:.9f}"
    from datetime import datetime

    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"invalid value for time: {value!r} (use a duration such as 10m, a Unix "
            "timestamp or an RFC 3339 date)"
        ) from None
    return f"{dt.timestamp():.9f}"


@click.command(short_help="Fetch the logs of a container.")
@click.option("-f", "--follow", is_flag=True, help="Follow log output.")
@click.option("-n", "--tail", default="all", help="Number of lines to show from the end.")
@click.option("-t", "--timestamps", is_flag=True, help="Show timestamps.")
@click.option("--since", help="Logs since timestamp or relative (e.g. 42m).")
@click.option("--until", help="Logs before timestamp or relative (e.g. 42m).")
@click.argument("container")
def logs(
    follow: bool,
    tail: str,
    timestamps: bool,
    since: str | None,
    until: str | None,
    container: str,
) -> None:
    """Fetch the logs of a container."""
    from pallet.streams import STDOUT, FrameDecoder

    client = _client()
    info = client.get(f"/containers/{container}/json")
    tty = bool((info.get("Config") or {}).get("Tty"))
    params = {
        "stdout": 1,
        "stderr": 1,
        "follow": 1 if follow else None,
        "tail": tail,
        "timestamps": 1 if timestamps else None,
        "since": _since(since),
        "until": _since(until),
    }
    out, err = _binary(sys.stdout), _binary(sys.stderr)
    with client.request("GET", f"/containers/{container}/logs", params) as resp:
        ctype = resp.headers.get("content-type", "")
        raw = tty and "multiplexed" not in ctype
        decoder = FrameDecoder()
        try:
            for data in resp.iter_raw():
                if raw:
                    out.write(data)
                    out.flush()
                    continue
                for stream, payload in decoder.feed(data):
                    target = out if stream == STDOUT else err
                    target.write(payload)
                    target.flush()
        except KeyboardInterrupt:
            sys.exit(130)


@click.command(short_help="Block until containers stop, then print their exit codes.")
@click.argument("containers", nargs=-1, required=True)
def wait(containers: tuple[str, ...]) -> None:
    """Block until one or more containers stop, then print their exit codes."""
    client = _client()

    def do(name: str) -> None:
        result = client.post(f"/containers/{name}/wait") or {}
        error = result.get("Error") or {}
        if error.get("Message"):
            from pallet.client import ClientError

            raise ClientError(error["Message"])
        click.echo(result.get("StatusCode"))

    _each(containers, do)


@click.command(short_help="Return low-level information on objects.")
@click.option("-f", "--format", "fmt", help="Format output using a Go template.")
@click.option(
    "--type", "kind", type=click.Choice(["container", "image"]), help="Only this kind of object."
)
@click.option("-s", "--size", is_flag=True, help="Display total file sizes (containers).")
@click.argument("names", nargs=-1, required=True)
def inspect(fmt: str | None, kind: str | None, size: bool, names: tuple[str, ...]) -> None:
    """Return low-level information on containers and images."""
    from pallet.client import APIError

    client = _client()
    tpl = _template(fmt) if fmt else None
    results: list[Any] = []
    failed = False
    for name in names:
        obj = None
        last_error: APIError | None = None
        routes: list[tuple[str, dict[str, Any] | None]] = []
        if kind in (None, "container"):
            routes.append((f"/containers/{name}/json", {"size": 1 if size else None}))
        if kind in (None, "image"):
            routes.append((f"/images/{name}/json", None))
        for path, params in routes:
            try:
                obj = client.get(path, params)
                break
            except APIError as exc:
                if exc.status != 404:
                    raise
                last_error = exc
        if obj is None:
            failed = True
            if kind is None or last_error is None:
                _err(f"Error: No such object: {name}")
            else:
                _err(f"Error: No such {kind}: {name}")
            continue
        if tpl is not None:
            click.echo(_render(tpl, obj))
        else:
            results.append(obj)
    if tpl is None and (results or not failed):
        import json

        click.echo(json.dumps(results, indent=4, ensure_ascii=False))
    if failed:
        sys.exit(1)
