"""Where a driver under test gets its root: most drivers take any directory; btrfs
needs a btrfs filesystem (made here on a loop device), devmapper small loop-backed
pools. Third parties add theirs with :func:`register_environment`."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pallet import mount
from pallet.storage import Mount


@dataclass
class DriverEnv:
    """A directory to put driver roots under, and the ``storage-opts`` to give."""

    base: Path
    options: dict[str, str] = field(default_factory=dict)


# name -> a context manager factory given a scratch directory; entered once per session
EnvFactory = Callable[[Path], contextlib.AbstractContextManager[DriverEnv]]
ENVIRONMENTS: dict[str, EnvFactory] = {}


def register_environment(name: str, factory: EnvFactory) -> None:
    """Make drivers named ``name`` run under the environment ``factory`` makes."""
    ENVIRONMENTS[name] = factory


def _run(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {(res.stderr or res.stdout).strip()}")
    return res.stdout


@contextlib.contextmanager
def loop_device(image: Path, size: int) -> Iterator[str]:
    """A loop device over a new sparse file ``image`` of ``size`` bytes, detached and
    the file removed at the end."""
    with open(image, "wb") as f:
        f.truncate(size)
    dev = _run("losetup", "--find", "--show", str(image)).strip()
    try:
        yield dev
    finally:
        with contextlib.suppress(OSError):
            _run("losetup", "-d", dev)
        with contextlib.suppress(FileNotFoundError):
            image.unlink()


@contextlib.contextmanager
def btrfs_filesystem(scratch: Path, size: int = 1 << 30) -> Iterator[Path]:
    """A fresh btrfs filesystem on a loop device, mounted under ``scratch``."""
    scratch.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    with loop_device(scratch / f"btrfs-{tag}.img", size) as dev:
        _run("mkfs.btrfs", "-q", "-f", dev)
        mnt = scratch / f"btrfs-{tag}"
        mnt.mkdir()
        mount.mount_all([Mount("btrfs", dev, ())], str(mnt))
        try:
            yield mnt
        finally:
            mount.unmount_all(str(mnt))
            with contextlib.suppress(OSError):
                mnt.rmdir()


@contextlib.contextmanager
def _btrfs_env(scratch: Path) -> Iterator[DriverEnv]:
    with btrfs_filesystem(scratch) as mnt:
        yield DriverEnv(mnt)


@contextlib.contextmanager
def _devmapper_env(scratch: Path) -> Iterator[DriverEnv]:
    # small loop-backed pools: quick to make a filesystem on, quick to fill up
    scratch.mkdir(parents=True, exist_ok=True)
    yield DriverEnv(
        scratch,
        {
            "dm.loopdatasize": "1GB",
            "dm.loopmetadatasize": "64MB",
            "dm.basesize": "128MB",
            "dm.fs": "ext4",
        },
    )


register_environment("btrfs", _btrfs_env)
register_environment("devmapper", _devmapper_env)


def short_tmp() -> Path:
    """A directory with a short path (as long as the default ``/var/lib/pallet/<drv>``)."""
    return Path(os.path.realpath("/tmp")) / f"pt-{secrets.token_hex(3)}"
