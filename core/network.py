"""The network driver contract: networks, endpoints, joining a container's netns.

The daemon creates a container's network namespace through the execution backend
(the process is created, not yet started), then asks the driver of each network the
container is on to create an endpoint and join it to ``/proc/<pid>/ns/net``. IPAM
state and whatever a driver must find again after a restart lives under its
``state_dir``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class Endpoint:
    """What a joined endpoint looks like from inside the container."""

    network_id: str
    endpoint_id: str
    ip_address: str = ""
    ip_prefix_len: int = 0
    gateway: str = ""
    mac_address: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class NetworkDriver(ABC):
    name: ClassVar[str]

    @classmethod
    def probe(cls) -> None:
        """Raise ``PluginSkip`` with the reason if the driver cannot work here."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    @abstractmethod
    def create_network(self, network_id: str, options: dict[str, Any]) -> None: ...

    @abstractmethod
    def delete_network(self, network_id: str) -> None: ...

    @abstractmethod
    def join(self, network_id: str, endpoint_id: str, netns: Path) -> Endpoint:
        """Create an endpoint and put it into the namespace at ``netns``."""

    @abstractmethod
    def leave(self, network_id: str, endpoint_id: str) -> None:
        """Remove the endpoint; it must leave nothing behind (links, rules, leases)."""
