"""The ``host`` network driver: the container stays in the host's network namespace
(no namespace of its own, the host's interfaces, addresses, routes and ports)."""

from __future__ import annotations

from pallet.hookspecs import hookimpl
from pallet.network import NetworkDriver


class HostDriver(NetworkDriver):
    """Nothing to create or join: the OCI spec simply has no network namespace."""

    name = "host"
    own_namespace = False


@hookimpl
def pallet_network_drivers_v1() -> list[type[NetworkDriver]]:
    return [HostDriver]
