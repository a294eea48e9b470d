"""exec_native: pallet's own libcontainer, the execution backend named ``native``.

It carries out an OCI bundle itself (namespaces, mounts, pivot_root, cgroups v1/v2,
rlimits, user switch, capability bounding set, no_new_privs) instead of calling runc.
This module stays cheap to import; the work is in :mod:`.libcontainer`.
"""

from __future__ import annotations

from typing import Any

from pallet.hookspecs import hookimpl


@hookimpl
def pallet_exec_backends_v1() -> list[Any]:
    from pallet.plugins.exec_native.libcontainer import NativeBackend

    return [NativeBackend]
