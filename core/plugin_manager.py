"""Plugin loading: the ``pallet.plugins`` entry-point group, through pluggy.

Built-in plugins are registered by the same entry points as third-party ones; the core
never imports a plugin module by name. A plugin that raises ``PluginSkip`` at import is
recorded as skipped with its reason; one that fails otherwise is recorded as failed.
Neither stops the daemon.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Literal

import pluggy
from pallet import hookspecs
from pallet.errors import PluginSkip

ENTRY_POINT_GROUP = "pallet.plugins"
DISABLE_ENV = "PALLET_DISABLED_PLUGINS"


@dataclass
class PluginRecord:
    name: str
    state: Literal["loaded", "skipped", "disabled", "failed"]
    module: str
    reason: str = ""


class PluginManager:
    """A pluggy manager that remembers what it loaded, skipped or refused, and why."""

    def __init__(self, disabled: list[str] | None = None) -> None:
        self.hook_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.hook_manager.add_hookspecs(hookspecs)
        env = os.environ.get(DISABLE_ENV, "")
        self.disabled = set(disabled or []) | {n.strip() for n in env.split(",") if n.strip()}
        self.records: dict[str, PluginRecord] = {}

    @property
    def hook(self) -> Any:
        return self.hook_manager.hook

    def register(self, plugin: object, name: str) -> None:
        """Register an already imported plugin object (the core's own job modules)."""
        self.hook_manager.register(plugin, name=name)
        module = getattr(plugin, "__name__", type(plugin).__module__)
        self.records.setdefault(name, PluginRecord(name, "loaded", module))

    def load_entry_points(self) -> None:
        """Import and register every plugin of the entry-point group, except disabled ones."""
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in self.records:
                continue
            if ep.name in self.disabled:
                self.records[ep.name] = PluginRecord(
                    ep.name, "disabled", ep.value, "disabled by configuration"
                )
                continue
            try:
                plugin = ep.load()
            except PluginSkip as e:
                self.records[ep.name] = PluginRecord(ep.name, "skipped", ep.value, e.reason)
                continue
            except Exception as e:  # a broken third-party plugin must not stop the daemon
                self.records[ep.name] = PluginRecord(
                    ep.name, "failed", ep.value, f"{type(e).__name__}: {e}"
                )
                continue
            self.hook_manager.register(plugin, name=ep.name)
            self.records[ep.name] = PluginRecord(ep.name, "loaded", ep.value)

    def plugin_name_of(self, obj: object) -> str | None:
        """The registered plugin name whose module defines ``obj`` (a driver class)."""
        module = getattr(obj, "__module__", "")
        for rec in self.records.values():
            if rec.state == "loaded" and (
                module == rec.module or module.startswith(rec.module.split(":")[0] + ".")
            ):
                return rec.name
        return None

    def collect(self, hook_name: str) -> list[Any]:
        """Call a provider hook and flatten the lists its implementations return."""
        results = getattr(self.hook, hook_name)()
        return [item for sub in results for item in (sub or [])]
