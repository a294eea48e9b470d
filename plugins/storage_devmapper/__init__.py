"""The devmapper storage driver: a thin pool, a thin device per layer, snapshots for
children and containers. Needs a kernel with device-mapper thin provisioning; ``probe``
says why not otherwise."""

from __future__ import annotations

from pallet.hookspecs import hookimpl
from pallet.plugins.storage_devmapper.driver import DevmapperDriver
from pallet.storage import StorageDriver

__all__ = ["DevmapperDriver"]


@hookimpl
def pallet_storage_drivers_v1() -> list[type[StorageDriver]]:
    return [DevmapperDriver]
