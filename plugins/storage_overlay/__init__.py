"""The overlay storage driver: layers shared through overlayfs (Docker's overlay2
layout). Needs root, a kernel with overlayfs and a data root that can hold an upper
directory; ``probe`` says why not otherwise."""

from __future__ import annotations

from pallet.hookspecs import hookimpl
from pallet.plugins.storage_overlay.driver import OverlayDriver
from pallet.storage import StorageDriver

__all__ = ["OverlayDriver"]


@hookimpl
def pallet_storage_drivers_v1() -> list[type[StorageDriver]]:
    return [OverlayDriver]
