"""``pallet``: the command line, a client of the daemon's Docker Engine API.

Verbs, flags, output tables, messages and exit statuses follow the docker CLI's, so
that scripts written for one work with the other.

This package is on the path of every command, so it loads lazily: the root group knows
its commands from the ``COMMANDS`` table and imports only the module of the command
being run (``pallet run`` never imports the image or system commands). ``pallet
--help`` lists commands from the table, without importing any command module. Modules
import click and nothing heavy at the top; the HTTP client, threading, signal handling
and the like are imported inside the commands that need them.

Adding commands:

- one module per command group, ``core/cli/<group>.py`` (say ``network.py``); define
  each command with ``@click.command(short_help="...")`` (``@click.group`` for a
  ``pallet network ...`` family), sharing what ``_common`` (client, ``_err``/``_fail``,
  ``_each``, ``_filters``) and ``format`` (tables, sizes, Go templates, jsonmessages)
  offer;
- one line per top-level command in ``COMMANDS``: ``"name": ("pallet.cli.<group>:<function>",
  "Short help.")``, the short help being the command's own ``short_help``
  (tests/test_cli.py checks that the two agree).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click
from pallet.cli._common import _fail, _is_client_error, _State

# name -> ("module:function", short help shown by `pallet --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    # containers
    "run": ("pallet.cli.containers:run", "Create and run a new container from an image."),
    "create": ("pallet.cli.containers:create", "Create a new container."),
    "start": ("pallet.cli.containers:start", "Start one or more stopped containers."),
    "stop": ("pallet.cli.containers:stop", "Stop one or more running containers."),
    "restart": ("pallet.cli.containers:restart", "Restart one or more containers."),
    "kill": ("pallet.cli.containers:kill", "Kill one or more running containers."),
    "rm": ("pallet.cli.containers:rm", "Remove one or more containers."),
    "ps": ("pallet.cli.containers:ps", "List containers."),
    "logs": ("pallet.cli.containers:logs", "Fetch the logs of a container."),
    "wait": (
        "pallet.cli.containers:wait",
        "Block until containers stop, then print their exit codes.",
    ),
    "inspect": ("pallet.cli.containers:inspect", "Return low-level information on objects."),
    "exec": ("pallet.cli.exec:exec_", "Execute a command in a running container."),
    "attach": ("pallet.cli.exec:attach", "Attach local standard streams to a running container."),
    # lifecycle (pallet.cli.lifecycle)
    "stats": (
        "pallet.cli.lifecycle:stats",
        "Display a live stream of container resource usage statistics.",
    ),
    "update": ("pallet.cli.lifecycle:update", "Update configuration of one or more containers."),
    "pause": ("pallet.cli.lifecycle:pause", "Pause all processes within one or more containers."),
    "unpause": (
        "pallet.cli.lifecycle:unpause",
        "Unpause all processes within one or more containers.",
    ),
    "top": ("pallet.cli.lifecycle:top", "Display the running processes of a container."),
    "rename": ("pallet.cli.lifecycle:rename", "Rename a container."),
    "cp": ("pallet.cli.lifecycle:cp", "Copy files/folders between a container and the host."),
    "volume": ("pallet.cli.volumes:volume", "Manage volumes."),
    # images
    "images": ("pallet.cli.images:images", "List images."),
    "import": (
        "pallet.cli.images:import_",
        "Import the contents from a tarball to create an image.",
    ),
    "tag": ("pallet.cli.images:tag", "Create a tag TARGET_IMAGE that refers to SOURCE_IMAGE."),
    "rmi": ("pallet.cli.images:rmi", "Remove one or more images."),
    "pull": ("pallet.cli.distribution:pull", "Download an image from a registry."),
    "push": ("pallet.cli.distribution:push", "Upload an image to a registry."),
    "login": ("pallet.cli.distribution:login", "Log in to a registry."),
    "logout": ("pallet.cli.distribution:logout", "Log out from a registry."),
    "save": (
        "pallet.cli.distribution:save",
        "Save images to a tar archive (STDOUT by default).",
    ),
    "load": ("pallet.cli.distribution:load", "Load an image from a tar archive or STDIN."),
    "history": ("pallet.cli.distribution:history", "Show the history of an image."),
    "image": ("pallet.cli.distribution:image", "Manage images."),
    # networks
    "network": ("pallet.cli.networks:network", "Manage networks."),
    "port": (
        "pallet.cli.networks:port",
        "List port mappings or a specific mapping for the container.",
    ),
    # storage (graph operations on containers)
    "diff": ("pallet.cli.storage:diff", "Inspect changes on a container's filesystem."),
    "commit": ("pallet.cli.storage:commit", "Create a new image from a container's changes."),
    "export": ("pallet.cli.storage:export", "Export a container's filesystem as a tar archive."),
    # system
    "info": ("pallet.cli.system:info", "Display system-wide information."),
    "version": ("pallet.cli.system:version", "Show the pallet version information."),
}


def load_command(name: str) -> click.Command:
    """Import the module of command ``name`` (from ``COMMANDS``) and return the command."""
    target = COMMANDS[name][0]
    module_name, _, attr = target.partition(":")
    # __import__, not importlib.import_module: the same import, but `-X importtime`
    # reports it (importlib's pure-Python path is invisible to it)
    __import__(module_name)
    command = getattr(sys.modules[module_name], attr)
    if not isinstance(command, click.Command):
        raise TypeError(f"{target} is not a click command")
    return command


class PalletGroup(click.Group):
    """The top-level group: docker's exit statuses (125 for bad usage, 1 for a daemon
    error) and messages on stderr; subcommands come from ``COMMANDS``, imported only
    when invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = self.commands.get(cmd_name)
        if command is None and cmd_name in COMMANDS:
            command = load_command(cmd_name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the table's short help: no command module is imported."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.commands.get(name)
            if command is not None:
                if command.hidden:
                    continue
                rows.append((name, command.get_short_help_str()))
            else:
                rows.append((name, COMMANDS[name][1]))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> NoReturn:
        try:
            rv = super().main(
                args, prog_name or "pallet", complete_var, standalone_mode=False, **extra
            )
        except click.UsageError as exc:
            exc.show()
            sys.exit(125)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            sys.exit(130)
        # (a reader that went away, `pallet ps | head`, is click's: quiet exit 1)
        except Exception as exc:
            if _is_client_error(exc):
                _fail(str(exc))
            raise
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(
    cls=PalletGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["--help"], "max_content_width": 100},
)
@click.option(
    "-H",
    "--host",
    envvar="PALLET_HOST",
    metavar="HOST",
    help="Daemon socket to connect to (unix:///run/pallet.sock, tcp://host:port).",
)
@click.version_option(
    None, "-v", "--version", package_name="pallet", message="pallet version %(version)s"
)
@click.pass_context
def cli(ctx: click.Context, host: str | None) -> None:
    """A container engine built the way Docker was.

    pallet talks to the pallet daemon (palletd) through the Docker Engine API.
    """
    ctx.obj = _State(host)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def main() -> None:
    """Console-script entry point."""
    cli.main()
