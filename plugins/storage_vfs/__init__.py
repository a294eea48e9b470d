"""The vfs storage driver: every snapshot a full copy of its parent. Works on any
filesystem; slow and space-hungry, but the reference for what a driver must do."""

from __future__ import annotations

from pallet.hookspecs import hookimpl
from pallet.plugins.storage_vfs.driver import VfsDriver
from pallet.storage import StorageDriver

__all__ = ["VfsDriver"]


@hookimpl
def pallet_storage_drivers_v1() -> list[type[StorageDriver]]:
    return [VfsDriver]
