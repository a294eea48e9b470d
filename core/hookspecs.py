"""Hook specifications: everything a pallet plugin can provide or observe.

A plugin is a module (or object) registered under the ``pallet.plugins`` entry-point
group whose functions are marked with :data:`hookimpl` and named like the specs below.
Built-in drivers register through the same entry-point group as third-party ones.

Provider hooks return *classes*; the daemon decides which to instantiate, after asking
the class's ``probe`` whether it can work on this host. A plugin that cannot work here
raises :class:`pallet.errors.PluginSkip` (at import, or from ``probe``); the daemon
records the reason and shows it in ``pallet info``.

Hooks whose contract may change carry a version suffix (``_v1``). A new contract gets a
new hook; the old one stays until no built-in plugin uses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pallet.engine import Engine, Job
    from pallet.execution import ExecBackend
    from pallet.network import NetworkDriver
    from pallet.storage import StorageDriver

PROJECT = "pallet"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- providers ---------------------------------------------------------------------


@hookspec
def pallet_register_jobs(engine: Engine) -> None:
    """Add job handlers to the engine with ``engine.register(name, handler)``.

    Called once, when the engine is created, for every registered plugin, the core's
    own job modules included. ``engine.daemon`` gives handlers the daemon's services
    (graph, containers, drivers). Registering a name twice is an error.
    """


@hookspec
def pallet_storage_drivers_v1() -> list[type[StorageDriver]]:
    """Return storage driver classes (see :class:`pallet.storage.StorageDriver`).

    Called once at daemon start. Each class has a unique ``name`` (the value of
    ``storage-driver`` in the config), an ``Options`` pydantic model that validates
    ``storage-opts``, and a ``probe`` classmethod that raises ``PluginSkip`` when the
    driver cannot work under the given data root.
    """


@hookspec
def pallet_exec_backends_v1() -> list[type[ExecBackend]]:
    """Return execution backend classes (see :class:`pallet.execution.ExecBackend`).

    Called once at daemon start. Each class has a unique ``name`` (a runtime name for
    ``--runtime`` and ``default-runtime``) and a ``probe`` classmethod.
    """


@hookspec(firstresult=True)
def pallet_oci_runtime_class_v1() -> type[ExecBackend] | None:
    """Return the backend class that drives an OCI runtime binary with runc's command
    line (``create --bundle``, ``start``, ``exec --process``, ``delete``).

    Called once at daemon start when the config has ``runtimes``: each entry
    ``{"name": {"path": ..., "runtimeArgs": [...]}}`` becomes a runtime of that name,
    run by this class. ``cls.probe_binary(path)`` returns the binary's absolute path or
    raises ``PluginSkip``; the monitor instantiates ``cls(path=..., runtime_args=[...],
    name=...)``. firstresult: the first plugin that provides one wins.
    """


@hookspec
def pallet_network_drivers_v1() -> list[type[NetworkDriver]]:
    """Return network driver classes (see :class:`pallet.network.NetworkDriver`).

    Called once at daemon start. ``name`` is the value of ``--network`` / the driver of
    ``network create``.
    """


# --- observers ---------------------------------------------------------------------
# Observers must not raise and must not block: they run on the daemon's event loop.


@hookspec
def pallet_job_started(job: Job) -> None:
    """Called just before a job's handler runs."""


@hookspec
def pallet_job_finished(job: Job) -> None:
    """Called after a job's handler returned or raised; ``job.error`` says which,
    ``job.duration`` how long it took."""


@hookspec
def pallet_image_event(action: str, image_id: str, ref: str | None) -> None:
    """An image changed. ``action``: ``import``, ``pull``, ``tag``, ``untag``,
    ``delete``, ``commit``, ``load``. ``ref``: the reference involved, if any."""


@hookspec
def pallet_layer_event(action: str, chain_id: str) -> None:
    """A layer was ``add``-ed to or ``remove``-d from the graph."""


@hookspec
def pallet_container_event(action: str, container_id: str, attributes: dict[str, Any]) -> None:
    """A container changed state. ``action`` is Docker's event action: ``create``,
    ``start``, ``die``, ``stop``, ``kill``, ``destroy``, ``rename``... For ``die``,
    ``attributes["exitCode"]`` holds the exit status."""
