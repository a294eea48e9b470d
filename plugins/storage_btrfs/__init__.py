"""The btrfs storage driver: a subvolume per layer, snapshots for children and
containers. Selectable only when the data root is on btrfs; ``probe`` says why not
otherwise."""

from __future__ import annotations

from pallet.hookspecs import hookimpl
from pallet.plugins.storage_btrfs.driver import BtrfsDriver
from pallet.storage import StorageDriver

__all__ = ["BtrfsDriver"]


@hookimpl
def pallet_storage_drivers_v1() -> list[type[StorageDriver]]:
    return [BtrfsDriver]
