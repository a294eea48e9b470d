"""Test helpers for execution backends: a busybox rootfs, an OCI bundle with Docker's
default spec, and checks that nothing was left behind (mounts, cgroups, processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

BUSYBOX = "/bin/busybox"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NATIVE = "pallet.plugins.exec_native.libcontainer:NativeBackend"

_TEMPLATE: Path | None = None


def have_busybox() -> bool:
    return os.path.exists(BUSYBOX)


def _applets() -> list[str]:
    out = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True, check=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def make_rootfs(dest: Path) -> Path:
    """A busybox rootfs at ``dest``: /bin/busybox, applet symlinks, /etc/passwd+group."""
    global _TEMPLATE
    if _TEMPLATE is None:
        tpl = Path(f"/tmp/pallet-test-rootfs-{os.getpid()}")
        if tpl.exists():
            shutil.rmtree(tpl)
        (tpl / "bin").mkdir(parents=True)
        shutil.copy2(BUSYBOX, tpl / "bin/busybox")
        for applet in _applets():
            link = tpl / applet.lstrip("/")
            if link.name == "busybox" or link.exists() or link.is_symlink():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
        for d in ("etc", "tmp", "root", "home/user", "proc", "sys", "dev", "var"):
            (tpl / d).mkdir(parents=True, exist_ok=True)
        os.chmod(tpl / "tmp", 0o1777)
        os.chown(tpl / "home/user", 1000, 1000)
        (tpl / "etc/passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        )
        (tpl / "etc/group").write_text(
            "root:x:0:\ntty:x:5:\nuser:x:1000:\nextra:x:2000:user\nnogroup:x:65534:\n"
        )
        (tpl / "etc/hostname").write_text("host\n")
        _TEMPLATE = tpl
        import atexit

        atexit.register(shutil.rmtree, tpl, True)
    shutil.copytree(_TEMPLATE, dest, symlinks=True)
    return dest


def default_spec(
    args: list[str],
    *,
    rootfs: str = "rootfs",
    cgroups_path: str | None = None,
    env: list[str] | None = None,
    cwd: str = "/",
    hostname: str = "pallet-test",
    uid: int = 0,
    gid: int = 0,
    additional_gids: list[int] | None = None,
    resources: dict[str, Any] | None = None,
    readonly: bool = False,
) -> dict[str, Any]:
    """An OCI spec like the one Docker writes for ``docker run``."""
    caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, "additionalGids": additional_gids or []},
            "args": args,
            "env": env if env is not None else [f"PATH={DEFAULT_PATH}", f"HOSTNAME={hostname}"],
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576}],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": readonly},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                         "gid=5"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["ro", "nosuid", "noexec", "nodev"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "cgroupsPath": cgroups_path or f"/pallet-test-{uuid.uuid4().hex[:12]}",
            "resources": resources or {},
            "maskedPaths": [
                "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    }  # fmt: skip


def make_bundle(tmp: Path, args: list[str], **kw: Any) -> tuple[Path, dict[str, Any]]:
    """A bundle dir (config.json + rootfs/) under ``tmp``; returns (bundle, spec)."""
    bundle = tmp / f"b-{uuid.uuid4().hex[:8]}"
    bundle.mkdir()
    make_rootfs(bundle / "rootfs")
    spec = default_spec(args, **kw)
    write_spec(bundle, spec)
    return bundle, spec


def write_spec(bundle: Path, spec: dict[str, Any]) -> None:
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))


def mounts_under(path: Path) -> list[str]:
    """Mount points (in the host's namespace) at or below ``path``."""
    prefix = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


def cgroup_dirs(cgroups_path: str) -> list[str]:
    """Existing directories of ``cgroups_path`` in any hierarchy."""
    from pallet.cgroups import Cgroup

    return [d for d in Cgroup(cgroups_path).dirs.values() if os.path.isdir(d)]


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def processes_in_cgroup(cgroups_path: str) -> list[int]:
    """Live processes whose cgroup (in any hierarchy) is ``cgroups_path`` or below."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cgroup") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            path = line.split(":", 2)[-1]
            if path == cgroups_path or path.startswith(cgroups_path + "/"):
                found.append(int(entry))
                break
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# --- a minimal backend without isolation, to test the shim on its own ------------------

from pallet.execution import ExecBackend, ExecError, Stdio  # noqa: E402

PLAIN = "tests.rootfs:PlainBackend"


class PlainBackend(ExecBackend):
    """Runs ``process.args`` on the host, no namespaces. ``fail-create`` and
    ``fail-start`` as args[0] make those steps fail (exit codes 42 and 126)."""

    name = "plain"

    def __init__(self) -> None:
        self._sync: dict[int, tuple[int, list[str]]] = {}

    def create(self, bundle: Path, spec: dict[str, Any], stdio: Stdio) -> int:
        import signal

        args = [str(a) for a in spec["process"]["args"]]
        if args[0] == "fail-create":
            raise ExecError("create failed on purpose", 42)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.close(w)
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                os.dup2(stdio.stdin if stdio.stdin is not None else os.open("/dev/null", 0), 0)
                os.dup2(stdio.stdout, 1)
                os.dup2(stdio.stderr, 2)
                if os.read(r, 1) != b"x" or args[0] == "fail-start":
                    os._exit(126)
                os.execvp(args[0], args)
            finally:
                os._exit(127)
        os.close(r)
        self._sync[pid] = (w, args)
        return pid

    def start(self, bundle: Path, pid: int) -> None:
        w, args = self._sync.pop(pid)
        os.write(w, b"x")
        os.close(w)
        if args[0] == "fail-start":
            raise ExecError("start failed on purpose", 126)

    def delete(self, bundle: Path, spec: dict[str, Any]) -> None:
        for w, _ in self._sync.values():
            os.close(w)
        self._sync.clear()
        (bundle / "deleted").write_text("yes")


def plain_bundle(tmp: Path, args: list[str]) -> Path:
    """A bundle for :class:`PlainBackend` (no rootfs needed)."""
    bundle = tmp / f"p-{uuid.uuid4().hex[:8]}"
    bundle.mkdir()
    write_spec(bundle, {"ociVersion": "1.0.2", "process": {"args": args}})
    return bundle


def kill_leftover_shims(root: Path) -> list[int]:
    """After a (failed) test: SIGKILL the container of every monitor still running for
    a bundle under ``root`` and let the monitor clean up; returns the monitors' pids."""
    import asyncio
    import signal

    from pallet.shim import ShimClient, shim_pid

    found = []
    for pidfile in root.rglob("shim.pid"):
        bundle = pidfile.parent
        pid = shim_pid(bundle)
        if pid is None:
            continue
        found.append(pid)

        async def stop(bundle: Path = bundle) -> None:
            client = await ShimClient.connect(bundle, lambda s, d: None)
            await client.kill(signal.SIGKILL)
            await asyncio.wait_for(client.wait(), 60)
            await client.close()

        try:
            asyncio.run(stop())
        except Exception:
            os.kill(pid, signal.SIGKILL)
    return found
