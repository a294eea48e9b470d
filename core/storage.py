"""The storage driver contract, modelled on containerd's snapshotter.

A *snapshot* is a directory tree identified by a key. Committed snapshots are
read-only layers, named by the Graph with the layer's chain ID; active snapshots are
writable (a container's rootfs, or a layer being applied). A driver never hides
mounts: ``prepare``/``view``/``mounts`` return :class:`Mount` *descriptions* that the
caller mounts (and unmounts) where it wants.

Layer diffs (tar streams with OCI whiteouts) are applied and computed by the core
(:mod:`pallet.archive`); a driver that can take a diff straight into a directory says
so through :meth:`StorageDriver.apply_target`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict


class Kind(enum.StrEnum):
    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


@dataclass(frozen=True)
class Mount:
    """How to mount a snapshot: the arguments of mount(2), as containerd's Mount."""

    type: str  # "bind", "overlay", "btrfs", "ext4", ...
    source: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Info:
    key: str
    kind: Kind
    parent: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    size: int  # bytes used by this snapshot alone (not its parents)
    inodes: int


WhiteoutFormat = Literal["delete", "overlay"]


class NoOptions(BaseModel):
    """``storage-opts`` model for a driver that takes none."""

    model_config = ConfigDict(extra="forbid")


class StorageDriver(ABC):
    """A snapshotter. Keys are free-form strings chosen by the caller.

    Errors: an unknown key raises ``NotFound``; an existing key given to
    ``prepare``/``view``/``commit`` raises ``Conflict``; removing a snapshot that has
    children raises ``Conflict``. Every method is synchronous and may block; the core
    calls them off the event loop.
    """

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    @classmethod
    def probe(cls, root: Path, options: BaseModel) -> None:
        """Raise ``PluginSkip`` with the reason if the driver cannot work with ``root``."""

    def __init__(self, root: Path, options: BaseModel) -> None:
        self.root = root
        self.options = options

    @abstractmethod
    def prepare(self, key: str, parent: str | None) -> list[Mount]:
        """Create an active (writable) snapshot ``key`` on top of committed ``parent``."""

    @abstractmethod
    def view(self, key: str, parent: str | None) -> list[Mount]:
        """Create a read-only view ``key`` of committed ``parent``."""

    @abstractmethod
    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an existing active snapshot or view."""

    @abstractmethod
    def commit(self, name: str, key: str) -> None:
        """Turn active snapshot ``key`` into committed snapshot ``name``; ``key`` is gone."""

    @abstractmethod
    def remove(self, key: str) -> None:
        """Remove a snapshot of any kind. ``Conflict`` while it has children."""

    @abstractmethod
    def stat(self, key: str) -> Info:
        """What the driver knows of snapshot ``key``."""

    @abstractmethod
    def usage(self, key: str) -> Usage:
        """Space used by ``key`` itself, not counting its parents."""

    @abstractmethod
    def walk(self) -> Iterator[Info]:
        """Every snapshot, in no particular order."""

    def apply_target(self, key: str) -> tuple[Path, WhiteoutFormat] | None:
        """Where a layer diff for active snapshot ``key`` may be unpacked directly.

        Returns a directory and how deletions must be written there ("overlay": a 0/0
        character device and the ``trusted.overlay.opaque`` xattr; "delete": remove the
        path), or None when the caller must mount the snapshot and apply there.
        """
        return None

    def status(self) -> list[tuple[str, str]]:
        """Lines for ``pallet info`` (``DriverStatus``): ``("Backing Filesystem", "extfs")``."""
        return []

    def cleanup(self) -> None:
        """Forget temporary state left by a crash; called once at daemon start."""

    def close(self) -> None:
        """Release what the driver holds; called once at daemon stop."""
