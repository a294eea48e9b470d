"""``pallet stats``, ``update``, ``pause``, ``unpause``, ``top``, ``rename``, ``cp``:
docker's commands, output and exit statuses."""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import Any

import click
from pallet.cli._common import _client, _each, _fail
from pallet.cli.runflags import parse_restart, ram_in_bytes


@click.command(short_help="Pause all processes within one or more containers.")
@click.argument("containers", nargs=-1, required=True)
def pause(containers: tuple[str, ...]) -> None:
    """Pause all processes within one or more containers."""
    client = _client()

    def do(name: str) -> None:
        client.post(f"/containers/{name}/pause")
        click.echo(name)

    _each(containers, do)


@click.command(short_help="Unpause all processes within one or more containers.")
@click.argument("containers", nargs=-1, required=True)
def unpause(containers: tuple[str, ...]) -> None:
    """Unpause all processes within one or more containers."""
    client = _client()

    def do(name: str) -> None:
        client.post(f"/containers/{name}/unpause")
        click.echo(name)

    _each(containers, do)


@click.command(short_help="Rename a container.")
@click.argument("container")
@click.argument("new_name")
def rename(container: str, new_name: str) -> None:
    """Rename a container."""
    _each(
        [container], lambda name: _client().post(f"/containers/{name}/rename", {"name": new_name})
    )


@click.command(short_help="Display the running processes of a container.")
@click.argument("container")
@click.argument("ps_args", nargs=-1)
def top(container: str, ps_args: tuple[str, ...]) -> None:
    """Display the running processes of a container."""
    from pallet.cli.format import tabwrite

    def do(name: str) -> None:
        params = {"ps_args": " ".join(ps_args)} if ps_args else None
        body = _client().get(f"/containers/{name}/top", params)
        lines = ["\t".join(body["Titles"])]
        lines += ["\t".join(p) for p in body["Processes"]]
        click.echo(tabwrite(lines, minwidth=1, padding=3), nl=False)

    _each([container], do)


@click.command(short_help="Update configuration of one or more containers.")
@click.option("--blkio-weight", type=int, help="Block IO (relative weight), between 10 and 1000.")
@click.option("--cpu-period", type=int, help="Limit CPU CFS period.")
@click.option("--cpu-quota", type=int, help="Limit CPU CFS quota.")
@click.option("-c", "--cpu-shares", type=int, help="CPU shares (relative weight).")
@click.option("--cpus", help="Number of CPUs.")
@click.option("--cpuset-cpus", help="CPUs in which to allow execution (0-3, 0,1).")
@click.option("--cpuset-mems", help="MEMs in which to allow execution (0-3, 0,1).")
@click.option("-m", "--memory", help="Memory limit.")
@click.option("--memory-reservation", help="Memory soft limit.")
@click.option("--memory-swap", help="Swap limit equal to memory plus swap: -1 for unlimited.")
@click.option("--pids-limit", type=int, help="Tune container pids limit (-1 for unlimited).")
@click.option("--restart", help="Restart policy to apply when a container exits.")
@click.argument("containers", nargs=-1, required=True)
def update(containers: tuple[str, ...], **opts: Any) -> None:
    """Update configuration of one or more containers."""
    body: dict[str, Any] = {}
    for flag, key in (
        ("memory", "Memory"),
        ("memory_swap", "MemorySwap"),
        ("memory_reservation", "MemoryReservation"),
    ):
        if opts.get(flag):
            body[key] = ram_in_bytes(opts[flag], "--" + flag.replace("_", "-"))
    for flag, key in (
        ("blkio_weight", "BlkioWeight"),
        ("cpu_period", "CpuPeriod"),
        ("cpu_quota", "CpuQuota"),
        ("cpu_shares", "CpuShares"),
        ("cpuset_cpus", "CpusetCpus"),
        ("cpuset_mems", "CpusetMems"),
        ("pids_limit", "PidsLimit"),
    ):
        if opts.get(flag) is not None:
            body[key] = opts[flag]
    if opts.get("cpus"):
        try:
            body["NanoCpus"] = round(float(opts["cpus"]) * 1e9)
        except ValueError:
            raise click.BadParameter(
                f'invalid argument "{opts["cpus"]}"', param_hint="--cpus"
            ) from None
    if opts.get("restart"):
        body["RestartPolicy"] = parse_restart(opts["restart"])
    if not body:
        _fail("pallet: you must provide one or more flags when using this command", 125)
    client = _client()

    def do(name: str) -> None:
        client.call("POST", f"/containers/{name}/update", json_body=body)
        click.echo(name)

    _each(containers, do)


# --- stats ------------------------------------------------------------------------------


def _cpu_percent(s: dict[str, Any]) -> float:
    cpu, pre = s.get("cpu_stats") or {}, s.get("precpu_stats") or {}
    cpu_delta = (cpu.get("cpu_usage") or {}).get("total_usage", 0) - (
        pre.get("cpu_usage") or {}
    ).get("total_usage", 0)
    sys_delta = cpu.get("system_cpu_usage", 0) - pre.get("system_cpu_usage", 0)
    online = cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or [1])
    if cpu_delta > 0 and sys_delta > 0:
        return cpu_delta / sys_delta * online * 100.0
    return 0.0


def _mem_usage(mem: dict[str, Any]) -> int:
    usage = int(mem.get("usage") or 0)
    stats = mem.get("stats") or {}
    for key in ("total_inactive_file", "inactive_file"):  # v1, then v2 (docker's rule)
        if key in stats and stats[key] < usage:
            return usage - int(stats[key])
    return usage


def stats_row(s: dict[str, Any], name: str) -> list[str]:
    from pallet.cli.format import bytes_size, human_size

    mem = s.get("memory_stats") or {}
    usage, limit = _mem_usage(mem), int(mem.get("limit") or 0)
    net_rx = sum(int(n.get("rx_bytes", 0)) for n in (s.get("networks") or {}).values())
    net_tx = sum(int(n.get("tx_bytes", 0)) for n in (s.get("networks") or {}).values())
    blk = (s.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
    rd = sum(int(e.get("value", 0)) for e in blk if str(e.get("op", "")).lower() == "read")
    wr = sum(int(e.get("value", 0)) for e in blk if str(e.get("op", "")).lower() == "write")
    return [
        str(s.get("id", ""))[:12],
        name,
        f"{_cpu_percent(s):.2f}%",
        f"{bytes_size(usage)} / {bytes_size(limit)}",
        f"{(usage / limit * 100.0) if limit else 0.0:.2f}%",
        f"{human_size(net_rx)} / {human_size(net_tx)}",
        f"{human_size(rd)} / {human_size(wr)}",
        str((s.get("pids_stats") or {}).get("current", 0)),
    ]


STATS_HEADER = [
    "CONTAINER ID",
    "NAME",
    "CPU %",
    "MEM USAGE / LIMIT",
    "MEM %",
    "NET I/O",
    "BLOCK I/O",
    "PIDS",
]


@click.command(short_help="Display a live stream of container resource usage statistics.")
@click.option("-a", "--all", "all_", is_flag=True, help="Show all containers.")
@click.option(
    "--no-stream", is_flag=True, help="Disable streaming stats and only pull the first result."
)
@click.option("--no-trunc", is_flag=True, help="Do not truncate output.")
@click.option("--format", "fmt", help="Format output using a Go template ('json' for JSON lines).")
@click.argument("containers", nargs=-1)
def stats(
    all_: bool, no_stream: bool, no_trunc: bool, fmt: str | None, containers: tuple[str, ...]
) -> None:
    """Display a live stream of container(s) resource usage statistics."""
    import threading
    import time

    from pallet.cli.format import tabwrite

    client = _client()
    names = list(containers)
    if not names:
        found = client.get("/containers/json", {"all": "1" if all_ else None})
        names = [c["Id"] for c in found]
    latest: dict[str, dict[str, Any]] = {}
    errors: list[str] = []

    def one(ref: str) -> None:
        try:
            if no_stream:
                latest[ref] = client.get(f"/containers/{ref}/stats", {"stream": "false"})
                return
            for obj in client.stream_json("GET", f"/containers/{ref}/stats", {"stream": "true"}):
                latest[ref] = obj
        except Exception as exc:  # reported below, as docker does
            errors.append(str(exc))

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()

    def render() -> str:
        rows = []
        for ref in names:
            s = latest.get(ref)
            if s is None:
                continue
            name = str(s.get("name", "")).lstrip("/")
            row = stats_row(s, name)
            if no_trunc:
                row[0] = str(s.get("id", ""))
            if fmt == "json" or fmt == "{{json .}}":
                keys = ["ID", "Name", "CPUPerc", "MemUsage", "MemPerc", "NetIO", "BlockIO", "PIDs"]
                d = dict(zip(keys, row, strict=True))
                d["Container"] = ref
                rows.append(json.dumps(d))
            else:
                rows.append("\t".join(row))
        if fmt in ("json", "{{json .}}"):
            return "".join(r + "\n" for r in rows)
        return tabwrite(["\t".join(STATS_HEADER), *rows], minwidth=1, padding=3)

    if no_stream:
        for t in threads:
            t.join()
        if errors and not latest:
            _fail(
                f"Error response from daemon: {errors[0]}".replace(
                    "Error response from daemon: Error response from daemon: ",
                    "Error response from daemon: ",
                )
            )
        for e in errors:
            click.echo(e, err=True)
        click.echo(render(), nl=False)
        return
    try:
        while any(t.is_alive() for t in threads) or not threads:
            time.sleep(1.0)
            sys.stdout.write("\x1b[2J\x1b[H" + render())
            sys.stdout.flush()
            if not threads:
                return
    except KeyboardInterrupt:
        return


# --- cp ---------------------------------------------------------------------------------


def _split_target(arg: str) -> tuple[str | None, str]:
    """``container:path`` or a local path (``./a:b`` and ``/a:b`` are local)."""
    if arg.startswith(("/", ".")) or ":" not in arg:
        return None, arg
    name, _, path = arg.partition(":")
    return name, path


@click.command(short_help="Copy files/folders between a container and the host.")
@click.option("-a", "--archive", is_flag=True, help="Archive mode (copy all uid/gid information).")
@click.option("-L", "--follow-link", is_flag=True, help="Always follow symbol link in SRC_PATH.")
@click.option("-q", "--quiet", is_flag=True, help="Suppress progress output during copy.")
@click.argument("src")
@click.argument("dest")
def cp(archive: bool, follow_link: bool, quiet: bool, src: str, dest: str) -> None:
    """Copy files/folders between a container and the local filesystem."""
    src_ctr, src_path = _split_target(src)
    dst_ctr, dst_path = _split_target(dest)
    if src_ctr and dst_ctr:
        _fail("pallet: copying between containers is not supported", 125)
    if not src_ctr and not dst_ctr:
        _fail("pallet: must specify at least one container source", 125)
    client = _client()
    try:
        if src_ctr:
            n = _copy_from(client, src_ctr, src_path, dst_path, archive)
            where = dst_path
        else:
            assert dst_ctr is not None
            n = _copy_to(client, src_path, dst_ctr, dst_path, archive)
            where = f"{dst_ctr}:{dst_path}"
    except Exception as exc:
        from pallet.cli._common import _is_client_error

        if not _is_client_error(exc):
            raise
        _fail(
            f"Error response from daemon: {exc}".replace(
                "Error response from daemon: Error response from daemon: ",
                "Error response from daemon: ",
            )
        )
    if not quiet and dest != "-":
        from pallet.cli.format import human_size

        click.echo(f"Successfully copied {human_size(n)} to {where}", err=True)


def _copy_from(client: Any, ctr: str, path: str, dest: str, archive: bool = False) -> int:
    import shutil
    import tarfile
    import tempfile

    with client.request("GET", f"/containers/{ctr}/archive", {"path": path}) as resp:
        if dest == "-":
            total = 0
            out = sys.stdout.buffer
            for chunk in resp.iter_raw():
                out.write(chunk)
                total += len(chunk)
            out.flush()
            return total
        stat_raw = resp.headers.get("x-docker-container-path-stat", "")
        info = json.loads(base64.b64decode(stat_raw)) if stat_raw else {}
        is_dir = bool(int(info.get("mode", 0)) & (1 << 31))
        if dest.endswith("/") and not os.path.isdir(dest):
            raise click.ClickException(f'"{dest}": no such directory')
        parent = dest if os.path.isdir(dest) else os.path.dirname(os.path.abspath(dest))
        if not os.path.isdir(parent):
            _fail(f"pallet: no such directory: {parent}", 1)
        total = 0
        with tempfile.TemporaryDirectory(dir=parent, prefix=".pallet-cp-") as tmp:

            class _Counting:
                def __init__(self) -> None:
                    self.it = resp.iter_raw()
                    self.buf = b""

                def read(self, n: int = -1) -> bytes:
                    nonlocal total
                    while n < 0 or len(self.buf) < n:
                        chunk = next(self.it, b"")
                        if not chunk:
                            break
                        total += len(chunk)
                        self.buf += chunk
                    if n < 0:
                        data, self.buf = self.buf, b""
                    else:
                        data, self.buf = self.buf[:n], self.buf[n:]
                    return data

            with tarfile.open(fileobj=_Counting(), mode="r|") as tf:  # type: ignore[call-overload]
                links: set[str] = set()
                for member in tf:
                    _check_member(member)
                    parts = member.name.rstrip("/").split("/")
                    if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
                        raise click.ClickException(
                            f"refusing archive entry below a symbolic link: {member.name}"
                        )
                    if member.issym():
                        links.add(member.name.rstrip("/"))
                    if not archive:  # owned by the caller, as docker cp without -a
                        member.uid, member.gid = os.getuid(), os.getgid()
                        member.uname = member.gname = ""
                    tf.extract(member, tmp, set_attrs=True)
            entries = os.listdir(tmp)
            if len(entries) != 1:
                raise click.ClickException("unexpected archive from the daemon")
            got = os.path.join(tmp, entries[0])
            if os.path.isdir(dest):
                target = os.path.join(dest, entries[0]) if entries[0] != "." else dest
                if entries[0] == "." or (is_dir and os.path.isdir(target)):
                    _merge(got, target)
                else:
                    if os.path.lexists(target) and not os.path.isdir(target):
                        os.unlink(target)
                    shutil.move(got, target)
            else:
                if os.path.lexists(dest):
                    os.unlink(dest)
                shutil.move(got, dest)
        return total


def _check_member(member: Any) -> None:
    """Refuse entries that would land outside the destination (absolute, ``..``, links
    leaving the tree): what tarfile's "data" filter does on newer Pythons."""
    name = member.name
    parts = name.split("/")
    if name.startswith("/") or ".." in parts:
        raise click.ClickException(f"refusing archive entry outside the destination: {name}")
    if member.issym() or member.islnk():
        target = member.linkname
        if member.islnk() and (target.startswith("/") or ".." in target.split("/")):
            raise click.ClickException(f"refusing hard link outside the destination: {name}")
    if member.isdev():
        raise click.ClickException(f"refusing device node in archive: {name}")


def _merge(src: str, dst: str) -> None:
    import shutil

    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s) and not os.path.islink(s) and os.path.isdir(d):
            _merge(s, d)
        else:
            if os.path.lexists(d):
                if os.path.isdir(d) and not os.path.islink(d):
                    shutil.rmtree(d)
                else:
                    os.unlink(d)
            shutil.move(s, d)


def _stat_path(client: Any, ctr: str, path: str) -> tuple[dict[str, Any], bool]:
    """The container path's stat (``HEAD .../archive``), and whether it exists."""
    from pallet.client import APIError

    try:
        with client.request("HEAD", f"/containers/{ctr}/archive", {"path": path}) as resp:
            raw = resp.headers.get("x-docker-container-path-stat", "")
    except APIError as exc:
        if exc.status != 404:
            raise
        return {}, False
    return (json.loads(base64.b64decode(raw)) if raw else {}), True


def _copy_to(client: Any, src: str, ctr: str, path: str, archive: bool) -> int:
    import io
    import tarfile

    if src == "-":
        data = sys.stdin.buffer.read()
        client.call("PUT", f"/containers/{ctr}/archive", {"path": path}, body=data)
        return len(data)
    if not os.path.lexists(src):
        _fail(f"pallet: lstat {os.path.abspath(src)}: no such file or directory", 1)
    # Where does it go: into an existing directory, or as a new name in its parent?
    info, exists = _stat_path(client, ctr, path)
    for _ in range(16):  # a symlink: docker's CLI copies into what it points to
        if not (exists and int(info.get("mode", 0)) & (1 << 27)):
            break
        target = str(info.get("linkTarget") or "")
        if not target.startswith("/"):
            target = os.path.join(os.path.dirname(path.rstrip("/")) or "/", target)
        path = target + ("/" if path.endswith("/") else "")
        info, exists = _stat_path(client, ctr, path)
    copy_contents = src.endswith("/.")
    base = os.path.basename(os.path.normpath(src))
    if exists and int(info.get("mode", 0)) & (1 << 31):
        target_dir, name = path, ("." if copy_contents else base)
    else:
        if path.endswith("/"):
            _fail(
                f"pallet: Error response from daemon: Could not find the file {path} in container {ctr}",
                1,
            )
        target_dir = os.path.dirname(path.rstrip("/")) or "/"
        name = os.path.basename(path.rstrip("/"))
        if exists and os.path.isdir(src):
            _fail("pallet: cannot copy directory to a file", 1)
    buf = io.BytesIO()

    def owner(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        if not archive:
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
        return ti

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(src, arcname=name, recursive=True, filter=owner)
    data = buf.getvalue()
    client.call("PUT", f"/containers/{ctr}/archive", {"path": target_dir}, body=data)
    return len(data)
