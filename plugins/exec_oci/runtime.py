"""The OCI runtime backends: the container's bundle handed to a runtime binary.

Runs inside the container's monitor (:mod:`pallet.shim`), which is a child subreaper:
``<runtime> create`` forks the container's init and exits, so the init is reparented
to the monitor, which waits for it like for a native container. Operations::

    create  <rt> [args] --root R --log L --log-format json create --bundle B
                 --pid-file P [--console-socket S] ID
    start   <rt> ... start ID
    kill    kill(2) on the init (what ``<rt> kill`` does, without a process start)
    exec    <rt> ... exec --process F --detach --pid-file P [--console-socket S] ID
    delete  <rt> ... delete --force ID

``R`` (the runtime's state) lives in the bundle, so it goes with the bundle. Without
a terminal the runtime's stdio is the container's (runc's pass-through mode), so
errors are read from the runtime's JSON log ``L``. With a terminal the runtime sends
the pty master on a console socket; it is passed on to the monitor unchanged.

crun refuses a "hybrid" cgroup host whose v2 hierarchy has any controller available
(``/sys/fs/cgroup/unified/cgroup.controllers`` not empty, e.g. ``hugetlb`` left to v2
by the kernel): on such hosts crun is run in a private mount namespace where that
hierarchy is hidden, so it sees, and uses, the v1 controllers alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pallet.errors import PluginSkip
from pallet.execution import ExecBackend, ExecError, Stdio

STATE_DIR = "oci"  # in the bundle: the runtime's --root
UNIFIED = "/sys/fs/cgroup/unified"
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def find_binary(name: str) -> str | None:
    """``name`` as an executable path: absolute as is, else looked up in PATH (and the
    sbin directories, which a daemon's PATH may lack)."""
    if "/" in name:
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    path = os.environ.get("PATH", "")
    return shutil.which(name, path=f"{path}:{SEARCH_PATH}" if path else SEARCH_PATH)


def exit_code_for(message: str, command: str) -> int:
    """Docker's exit code for a failed create/exec (moby's translateContainerdStartErr):
    127 when the command is not found, 126 when it cannot be run, else 125."""
    low = message.lower()
    if command and command.lower() in low:
        if "executable file not found" in low or "no such file or directory" in low:
            return 127
        if "permission denied" in low or "is a directory" in low or "not a directory" in low:
            return 126
    return 125


def _hide_unified_v2() -> None:  # pragma: no cover - runs between fork and exec
    """preexec_fn: a private mount namespace in which the cgroup v2 hierarchy of a
    hybrid host is covered by an empty tmpfs (see the module docs)."""
    from pallet import linux

    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_SLAVE | linux.MS_REC)
    linux.mount("tmpfs", UNIFIED, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=4k")


def _needs_hybrid_workaround() -> bool:
    """A hybrid host (tmpfs at /sys/fs/cgroup) whose v2 hierarchy has controllers."""
    try:
        with open(os.path.join(UNIFIED, "cgroup.controllers")) as f:
            controllers = f.read().strip()
    except OSError:
        return False
    return bool(controllers) and _fs_type("/sys/fs/cgroup") == "tmpfs"


def _fs_type(path: str) -> str:
    best, kind = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4]
            sep = fields.index("-")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fields[sep + 1]
    return kind


class OCIRuntime(ExecBackend):
    """A runtime binary with runc's command line. Configured runtimes (``runtimes`` in
    the daemon config) are instances with their own ``path`` and ``runtime_args``."""

    name: ClassVar[str] = "oci"
    binary: ClassVar[str] = ""
    hybrid_workaround: ClassVar[bool] = False

    def __init__(
        self, path: str | None = None, runtime_args: list[str] | None = None, name: str = ""
    ) -> None:
        self.runtime = name or self.name
        self.path = path or find_binary(self.binary) or self.binary
        self.runtime_args = list(runtime_args or [])
        self._preexec: Callable[[], None] | None = None
        if self.hybrid_workaround or os.path.basename(self.path) == "crun":
            if _needs_hybrid_workaround():
                self._preexec = _hide_unified_v2

    @classmethod
    def probe(cls) -> None:
        if os.geteuid() != 0:
            raise PluginSkip(f"{cls.binary} needs root")
        if find_binary(cls.binary) is None:
            raise PluginSkip(f"{cls.binary} not found in PATH (install the {cls.binary} package)")

    @classmethod
    def probe_binary(cls, path: str) -> str:
        """The absolute path of a configured runtime's binary; PluginSkip if unusable."""
        found = find_binary(path)
        if found is None:
            raise PluginSkip(f"{path}: no such executable")
        return os.path.abspath(found)

    # --- running the binary ----------------------------------------------------------

    def _argv(self, bundle: Path, log: Path, *args: str) -> list[str]:
        return [
            self.path,
            *self.runtime_args,
            "--root",
            str(bundle / STATE_DIR),
            "--log",
            str(log),
            "--log-format",
            "json",
            *args,
        ]

    def _run(
        self,
        bundle: Path,
        op: str,
        args: list[str],
        stdio: tuple[int, int, int] | None = None,
        command: str = "",
        console: _ConsoleSocket | None = None,
    ) -> None:
        """Run one runtime command; ExecError with the runtime's own message if it fails.
        With ``console``, the pty master is taken (and sized) while the runtime runs."""
        log = bundle / f"{STATE_DIR}-{op}.log"
        with contextlib.suppress(FileNotFoundError):
            log.unlink()
        argv = self._argv(bundle, log, *args)
        try:
            if stdio is not None:
                running = subprocess.Popen(
                    argv,
                    stdin=stdio[0],
                    stdout=stdio[1],
                    stderr=stdio[2],
                    cwd=str(bundle),
                    preexec_fn=self._preexec,
                )
                if console is not None:
                    try:
                        console.receive(running)
                    except BaseException:
                        running.kill()
                        running.wait()
                        raise
                running.wait()
                proc: subprocess.CompletedProcess[bytes] = subprocess.CompletedProcess(
                    argv, running.returncode
                )
                stderr = b""
            else:
                proc = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    cwd=str(bundle),
                    preexec_fn=self._preexec,
                )
                stderr = proc.stderr
        except FileNotFoundError:
            raise ExecError(
                f'{self.runtime}: exec: "{self.path}": stat {self.path}: no such file or directory',
                125,
            ) from None
        except OSError as e:
            raise ExecError(f'{self.runtime}: exec: "{self.path}": {e.strerror}', 125) from None
        if proc.returncode == 0:
            return
        message = _log_error(log) or stderr.decode(errors="replace").strip()
        if not message:
            if proc.returncode < 0:
                message = f"{self.runtime} {op} was killed by signal {-proc.returncode}"
            else:
                message = f"{self.runtime} {op} failed with exit status {proc.returncode}"
        message = _docker_wording(message)
        raise ExecError(message, exit_code_for(message, command))

    # --- OCI operations ----------------------------------------------------------------

    def create(self, bundle: Path, spec: dict[str, Any], stdio: Stdio) -> int:
        bundle = Path(bundle)
        pid_file = bundle / f"{STATE_DIR}.pid"
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
        command = str(((spec.get("process") or {}).get("args") or [""])[0])
        if _clamp_rlimits(spec.get("process") or {}):
            tmp = bundle / "config.json.tmp"
            tmp.write_text(json.dumps(spec))
            tmp.replace(bundle / "config.json")
        args = ["create", "--bundle", str(bundle), "--pid-file", str(pid_file)]
        try:
            size = (spec.get("process") or {}).get("consoleSize")
            with _ConsoleSocket(stdio.console, size) as console:
                if console.path:
                    args += ["--console-socket", console.path]
                null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    stdin = stdio.stdin if stdio.stdin is not None else null
                    self._run(
                        bundle,
                        "create",
                        [*args, bundle.name],
                        (stdin, stdio.stdout, stdio.stderr),
                        command,
                        console,
                    )
                finally:
                    os.close(null)
                pid = _read_pid(pid_file, self.runtime)
                console.forward()
        except ExecError:
            self._force_delete(bundle, spec)
            raise
        return pid

    def start(self, bundle: Path, pid: int) -> None:
        self._run(Path(bundle), "start", ["start", Path(bundle).name])

    def exec(
        self, bundle: Path, spec: dict[str, Any], pid: int, process: dict[str, Any], stdio: Stdio
    ) -> int:
        bundle = Path(bundle)
        fd, process_file = tempfile.mkstemp(prefix=f"{STATE_DIR}-exec-", suffix=".json", dir=bundle)
        pid_file = process_file[: -len(".json")] + ".pid"
        process = json.loads(json.dumps(process))
        _clamp_rlimits(process)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(process, f)
            args = ["exec", "--process", process_file, "--detach", "--pid-file", pid_file]
            with _ConsoleSocket(stdio.console, process.get("consoleSize")) as console:
                if console.path:
                    args += ["--console-socket", console.path]
                null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    stdin = stdio.stdin if stdio.stdin is not None else null
                    self._run(
                        bundle,
                        "exec",
                        [*args, bundle.name],
                        (stdin, stdio.stdout, stdio.stderr),
                        str((process.get("args") or [""])[0]),
                        console,
                    )
                finally:
                    os.close(null)
                exec_pid = _read_pid(Path(pid_file), self.runtime)
                console.forward()
            return exec_pid
        finally:
            for path in (process_file, pid_file):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def delete(self, bundle: Path, spec: dict[str, Any]) -> None:
        self._force_delete(Path(bundle), spec)

    def _force_delete(self, bundle: Path, spec: dict[str, Any]) -> None:
        """``delete --force`` (kills what is left, removes the state and cgroups), and
        make sure no cgroup of the container is left whatever the runtime did."""
        if (bundle / STATE_DIR / bundle.name).exists():
            with contextlib.suppress(ExecError):
                self._run(bundle, "delete", ["delete", "--force", bundle.name])
        path = (spec.get("linux") or {}).get("cgroupsPath")
        if path:
            from pallet.cgroups import Cgroup

            with contextlib.suppress(OSError, ValueError):
                cg = Cgroup(str(path))
                if cg.exists():
                    cg.destroy()

    def oom_killed(self, bundle: Path, spec: dict[str, Any]) -> bool:
        path = (spec.get("linux") or {}).get("cgroupsPath")
        if not path:
            return False
        from pallet.cgroups import Cgroup

        try:
            return Cgroup(str(path)).oom_killed()
        except (OSError, ValueError):
            return False


class RuncBackend(OCIRuntime):
    name = "runc"
    binary = "runc"


class CrunBackend(OCIRuntime):
    name = "crun"
    binary = "crun"
    hybrid_workaround = True


# --- helpers ---------------------------------------------------------------------------


def _docker_wording(message: str) -> str:
    """crun says "executable file `x` not found in $PATH: No such file or directory";
    clients (the docker CLI's exit status 127) look for runc's and Docker's wording."""
    import re

    m = re.search(r"executable file `(.*?)` not found in \$PATH", message)
    if m:
        return f'exec: "{m.group(1)}": executable file not found in $PATH'
    return message


def _log_error(path: Path) -> str:
    """The last error the runtime wrote to its JSON log."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            if line.strip():
                return line.strip()
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", "")).strip()
    return ""


CAP_SYS_RESOURCE = 24


def _has_cap(cap: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return False


def _clamp_rlimits(process: dict[str, Any]) -> bool:
    """Raising a hard rlimit needs CAP_SYS_RESOURCE, which a sandboxed daemon may lack
    (the runtime would then fail with EPERM): cap such limits of an OCI process at what
    we have, as the native backend does. Returns whether anything changed."""
    import resource

    rlimits = process.get("rlimits") or []
    if not rlimits or _has_cap(CAP_SYS_RESOURCE):
        return False
    changed = False
    for rl in rlimits:
        kind = getattr(resource, str(rl.get("type")), None)
        if kind is None:
            continue
        cur_hard = resource.getrlimit(kind)[1]
        if cur_hard == resource.RLIM_INFINITY:
            continue
        hard = int(rl.get("hard", 0))
        if hard < 0 or hard > cur_hard:  # RLIM_INFINITY is -1 / 2**64-1 in specs
            rl["hard"] = cur_hard
            rl["soft"] = min(int(rl.get("soft", 0)) % (1 << 64), cur_hard)
            changed = True
    return changed


def _read_pid(path: Path, runtime: str) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        raise ExecError(f"{runtime} did not write the process's pid to {path}", 125) from None


class _ConsoleSocket:
    """A listening unix socket for the runtime's ``--console-socket``. ``receive`` takes
    the pty master while the runtime still runs and sizes it at once (runtimes that do
    not apply ``process.consoleSize`` themselves would otherwise let the process start
    with a 0x0 terminal); ``forward`` passes it on to the monitor's console socket."""

    def __init__(self, target: int | None, size: dict[str, int] | None = None) -> None:
        self.target = target
        self.size = size or {}
        self.path = ""
        self._dir = ""
        self._sock: socket.socket | None = None
        self._msg = b""
        self._fds: list[int] = []

    def __enter__(self) -> _ConsoleSocket:
        if self.target is None:
            return self
        # socket paths are limited to 107 bytes: not in the (deep) bundle
        self._dir = tempfile.mkdtemp(prefix="pallet-console-", dir="/tmp")
        self.path = os.path.join(self._dir, "sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(1)
        return self

    def receive(self, runtime: subprocess.Popen[bytes] | None = None) -> None:
        """Take the master (waiting while ``runtime`` runs); no-op without a terminal."""
        import select

        if self._sock is None or self._fds:
            return
        deadline = time.monotonic() + 60
        while True:
            ready, _, _ = select.select([self._sock], [], [], 0.05)
            if ready:
                break
            if runtime is not None and runtime.poll() is not None:
                ready, _, _ = select.select([self._sock], [], [], 0)
                if not ready:
                    return  # the runtime ended without connecting (it failed)
                break
            if time.monotonic() > deadline:
                raise ExecError("the runtime did not connect to the console socket", 125)
        conn, _ = self._sock.accept()
        with conn:
            conn.settimeout(30)
            self._msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 4)
        self._fds = list(fds)
        if self._fds and self.size.get("height") and self.size.get("width"):
            import fcntl
            import struct
            import termios

            with contextlib.suppress(OSError):
                winsize = struct.pack("HHHH", self.size["height"], self.size["width"], 0, 0)
                fcntl.ioctl(self._fds[0], termios.TIOCSWINSZ, winsize)

    def forward(self) -> None:
        if self._sock is None or self.target is None:
            return
        self.receive()
        if not self._fds:
            raise ExecError("the runtime sent no terminal on the console socket", 125)
        target = socket.socket(fileno=os.dup(self.target))
        with target:
            socket.send_fds(target, [self._msg or b"console"], self._fds[:1])

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        if self._sock is not None:
            self._sock.close()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
