"""The execution backend contract: how a container's process is started.

The core describes every container with an OCI runtime spec (``config.json`` in a
bundle directory, rootfs already mounted at ``<bundle>/rootfs``). A per-container
monitor process (:mod:`pallet.shim`) owns the container's stdio, its log and its exit
status; the backend runs *inside that monitor* and maps onto the OCI runtime
operations: ``create`` sets the process up and leaves it blocked before exec,
``start`` lets it exec, ``kill`` signals it, ``delete`` removes what ``create`` made.
runc/crun implement these as commands; exec_native carries them out itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


@dataclass(frozen=True)
class Stdio:
    """The container-side ends of the container's stdio (file descriptors).

    With ``process.terminal`` the container gets a pty instead: ``console`` is then a
    connected unix socket on which the backend (or the container itself) sends the pty
    master with ``SCM_RIGHTS``, exactly as runc does on its ``--console-socket``;
    ``stdin``/``stdout``/``stderr`` are then only ``/dev/null`` for the runtime itself.
    """

    stdin: int | None
    stdout: int
    stderr: int
    console: int | None = None


class ExecError(Exception):
    """The process could not be created; ``exit_code`` is what Docker reports
    (127: executable not found, 126: not executable, 125: anything else)."""

    def __init__(self, message: str, exit_code: int = 125) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class ExecBackend(ABC):
    """One way of running OCI bundles. Instances live in the monitor process."""

    name: ClassVar[str]

    @classmethod
    def probe(cls) -> None:
        """Raise ``PluginSkip`` with the reason if the backend cannot work here."""

    @abstractmethod
    def create(self, bundle: Path, spec: dict[str, Any], stdio: Stdio) -> int:
        """Set up the container's init process and return its host pid.

        The process must be a child of the caller (the monitor waits for it) and stay
        blocked before exec until :meth:`start`. Raises :class:`ExecError`.
        """

    @abstractmethod
    def start(self, bundle: Path, pid: int) -> None:
        """Let the created process exec the user's program. Raises :class:`ExecError`."""

    def kill(self, bundle: Path, pid: int, signal: int) -> None:
        """Send ``signal`` to the container's init process."""
        import os

        os.kill(pid, signal)

    @abstractmethod
    def delete(self, bundle: Path, spec: dict[str, Any]) -> None:
        """Remove what ``create`` made (cgroups...), after the process is gone."""

    def exec(
        self, bundle: Path, spec: dict[str, Any], pid: int, process: dict[str, Any], stdio: Stdio
    ) -> int:
        """Start one more process (an OCI ``process`` object) in the running container
        whose init is ``pid``, in its namespaces and cgroup, under the same security
        rules as the init. Returns its host pid; the process must end up a child of the
        caller (the monitor is a child subreaper, so a reparented grandchild counts).
        Raises :class:`ExecError` (127/126 for a missing/unusable executable)."""
        raise ExecError(f"the {self.name} runtime cannot run processes in a container", 125)

    def oom_killed(self, bundle: Path, spec: dict[str, Any]) -> bool:
        """Whether the kernel's OOM killer ended the container; asked before delete."""
        return False
