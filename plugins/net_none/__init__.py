"""The ``none`` network driver: the container keeps only its loopback interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pallet.hookspecs import hookimpl
from pallet.network import Endpoint, NetworkDriver


class NoneDriver(NetworkDriver):
    """Joins nothing: the execution backend already brought ``lo`` up in the new netns."""

    name = "null"

    def create_network(self, network_id: str, options: dict[str, Any]) -> None:
        return None

    def delete_network(self, network_id: str) -> None:
        return None

    def join(self, network_id: str, endpoint_id: str, netns: Path) -> Endpoint:
        return Endpoint(network_id=network_id, endpoint_id=endpoint_id)

    def leave(self, network_id: str, endpoint_id: str) -> None:
        return None


@hookimpl
def pallet_network_drivers_v1() -> list[type[NetworkDriver]]:
    return [NoneDriver]
