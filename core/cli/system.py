"""System commands: info, version."""

from __future__ import annotations

import sys
from typing import Any

import click
from pallet.cli._common import _client, _fail
from pallet.cli.format import _go_str, _render, _template, bytes_size


def _status_table(lines: list[str], title: str, rows: Any, keys: tuple[str, ...]) -> None:
    """pallet's own info sections: one line per plugin or driver, its state and why."""
    if not isinstance(rows, list) or not rows:
        return
    rows = [r for r in rows if isinstance(r, dict)]
    widths = [max(len(str(r.get(k, ""))) for r in rows) for k in keys]
    lines.append(f" {title}:")
    for r in rows:
        cells = "  ".join(str(r.get(k, "")).ljust(w) for k, w in zip(keys, widths, strict=True))
        text = f"  {cells}  {r.get('State', '')}"
        if r.get("Reason"):
            text += f" ({r['Reason']})"
        lines.append(text)


def _kv(lines: list[str], indent: int, key: str, value: Any) -> None:
    if value is None or value == "":
        return
    if isinstance(value, bool):
        value = "true" if value else "false"
    lines.append(f"{' ' * indent}{key}: {value}")


def format_info(info: dict[str, Any], host: str) -> str:
    """``pallet info``: docker's layout, plus pallet's plugins and why some were skipped."""
    from pallet import __version__

    lines = ["Client:", f" Version:    {__version__}", f" Host:       {host}", "", "Server:"]
    _kv(lines, 1, "Containers", info.get("Containers"))
    _kv(lines, 2, "Running", info.get("ContainersRunning"))
    _kv(lines, 2, "Paused", info.get("ContainersPaused"))
    _kv(lines, 2, "Stopped", info.get("ContainersStopped"))
    _kv(lines, 1, "Images", info.get("Images"))
    _kv(lines, 1, "Server Version", info.get("ServerVersion"))
    _kv(lines, 1, "Storage Driver", info.get("Driver"))
    for pair in info.get("DriverStatus") or []:
        if isinstance(pair, list | tuple) and len(pair) == 2:
            lines.append(f"  {pair[0]}: {pair[1]}")
    _kv(lines, 1, "Logging Driver", info.get("LoggingDriver"))
    _kv(lines, 1, "Cgroup Driver", info.get("CgroupDriver"))
    _kv(lines, 1, "Cgroup Version", info.get("CgroupVersion"))
    plugins = info.get("Plugins")
    if isinstance(plugins, dict) and plugins:
        lines.append(" Plugins:")
        for kind in ("Volume", "Network", "Authorization", "Log"):
            if plugins.get(kind):
                lines.append(f"  {kind}: {' '.join(plugins[kind])}")
    _status_table(lines, "Pallet Plugins", info.get("PalletPlugins"), ("Name",))
    _status_table(lines, "Pallet Drivers", info.get("PalletDrivers"), ("Kind", "Name"))
    runtimes = info.get("Runtimes")
    if isinstance(runtimes, dict) and runtimes:
        _kv(lines, 1, "Runtimes", " ".join(sorted(runtimes)))
    _kv(lines, 1, "Default Runtime", info.get("DefaultRuntime"))
    sec = info.get("SecurityOptions")
    if sec:
        lines.append(" Security Options:")
        for opt in sec:
            parts = dict(kv.partition("=")[::2] for kv in str(opt).split(","))
            lines.append(f"  {parts.pop('name', opt)}")
            for k, v in parts.items():
                lines.append(f"   {k.capitalize()}: {v}")
    _kv(lines, 1, "Kernel Version", info.get("KernelVersion"))
    _kv(lines, 1, "Operating System", info.get("OperatingSystem"))
    _kv(lines, 1, "OSType", info.get("OSType"))
    _kv(lines, 1, "Architecture", info.get("Architecture"))
    _kv(lines, 1, "CPUs", info.get("NCPU"))
    if info.get("MemTotal"):
        _kv(lines, 1, "Total Memory", bytes_size(info["MemTotal"]))
    _kv(lines, 1, "Name", info.get("Name"))
    _kv(lines, 1, "ID", info.get("ID"))
    _kv(lines, 1, "Pallet Root Dir", info.get("DockerRootDir"))
    _kv(lines, 1, "Debug Mode", info.get("Debug"))
    _kv(lines, 1, "Experimental", info.get("ExperimentalBuild"))
    registries = (info.get("RegistryConfig") or {}).get("IndexConfigs") or {}
    insecure = [k for k, v in registries.items() if isinstance(v, dict) and not v.get("Secure")]
    insecure += (info.get("RegistryConfig") or {}).get("InsecureRegistryCIDRs") or []
    if insecure:
        lines.append(" Insecure Registries:")
        lines.extend(f"  {r}" for r in insecure)
    mirrors = (info.get("RegistryConfig") or {}).get("Mirrors") or []
    if mirrors:
        lines.append(" Registry Mirrors:")
        lines.extend(f"  {m}" for m in mirrors)
    _kv(lines, 1, "Live Restore Enabled", info.get("LiveRestoreEnabled"))
    for warning in info.get("Warnings") or []:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines) + "\n"


@click.command(short_help="Display system-wide information.")
@click.option("-f", "--format", "fmt", help="Format output using a Go template.")
def info(fmt: str | None) -> None:
    """Display system-wide information."""
    client = _client()
    data = client.get("/info") or {}
    if fmt:
        click.echo(_render(_template(fmt), data))
        return
    click.echo(format_info(data, client.host), nl=False)


def format_version(server: dict[str, Any] | None, error: str | None = None) -> str:
    import platform

    from pallet import __version__
    from pallet.client import API_VERSION

    lines = [
        "Client:",
        f" Version:           {__version__}",
        f" API version:       {API_VERSION}",
        f" Python version:    {platform.python_version()}",
        f" OS/Arch:           {sys.platform}/{_arch(platform.machine())}",
    ]
    if server is not None:
        lines += ["", f"Server: {server.get('Platform', {}).get('Name', '') or 'pallet'}"]
        components = server.get("Components") or [
            {"Name": "Engine", "Version": server.get("Version"), "Details": server}
        ]
        for comp in components:
            details = comp.get("Details") or {}
            lines.append(f" {comp.get('Name')}:")
            lines.append(f"  {'Version:':<18} {comp.get('Version', '')}")
            if comp.get("Name") == "Engine":
                api = server.get("ApiVersion") or details.get("ApiVersion", "")
                minimum = server.get("MinAPIVersion") or details.get("MinAPIVersion", "")
                lines.append(f"  {'API version:':<18} {api} (minimum version {minimum})")
                details = {
                    k: v
                    for k, v in details.items()
                    if k not in ("ApiVersion", "MinAPIVersion", "Os", "Arch")
                }
                for key in ("GitCommit", "GoVersion", "BuildTime", "KernelVersion"):
                    value = server.get(key) or details.pop(key, None)
                    details.pop(key, None)
                    if value:
                        label = {
                            "GitCommit": "Git commit",
                            "GoVersion": "Python version",
                            "BuildTime": "Built",
                            "KernelVersion": "Kernel version",
                        }[key]
                        lines.append(f"  {label + ':':<18} {value}")
                os_arch = f"{server.get('Os', '')}/{server.get('Arch', '')}"
                lines.append(f"  {'OS/Arch:':<18} {os_arch}")
                if "Experimental" in server:
                    lines.append(f"  {'Experimental:':<18} {_go_str(server['Experimental'])}")
            for key, value in details.items():
                if isinstance(value, str | int | float | bool):
                    lines.append(f"  {key + ':':<18} {_go_str(value)}")
    out = "\n".join(lines) + "\n"
    return out


def _arch(machine: str) -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


@click.command(short_help="Show the pallet version information.")
@click.option("-f", "--format", "fmt", help="Format output using a Go template.")
def version(fmt: str | None) -> None:
    """Show the pallet version information."""
    from pallet.client import ClientError

    client = _client()
    server: dict[str, Any] | None = None
    error: ClientError | None = None
    try:
        server = client.get("/version")
    except ClientError as exc:
        error = exc
    if fmt:
        import platform

        from pallet import __version__
        from pallet.client import API_VERSION

        data = {
            "Client": {
                "Version": __version__,
                "ApiVersion": API_VERSION,
                "Os": sys.platform,
                "Arch": _arch(platform.machine()),
            },
            "Server": server,
        }
        click.echo(_render(_template(fmt), data))
    else:
        click.echo(format_version(server), nl=False)
    if error is not None:
        _fail(str(error))
