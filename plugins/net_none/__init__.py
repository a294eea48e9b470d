"""The ``none`` network driver (Docker's ``null``): the container keeps only its
loopback interface, which the execution backend already brought up in the new netns."""

from __future__ import annotations

from pallet.hookspecs import hookimpl
from pallet.network import NetworkDriver


class NoneDriver(NetworkDriver):
    """Joins nothing: no address, no route, no rule."""

    name = "null"


@hookimpl
def pallet_network_drivers_v1() -> list[type[NetworkDriver]]:
    return [NoneDriver]
