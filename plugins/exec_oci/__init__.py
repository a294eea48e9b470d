"""exec_oci: containers run by an OCI runtime binary (``runc``, ``crun``, or any runtime
with runc's command line configured under ``runtimes`` in the daemon config).

``runc`` and ``crun`` are registered when their binaries are on ``PATH`` (else
skipped, with the reason in ``pallet info``). This module stays cheap to import; the
work is in :mod:`.runtime`, which is loaded in the container monitor.
"""

from __future__ import annotations

from typing import Any

from pallet.hookspecs import hookimpl


@hookimpl
def pallet_exec_backends_v1() -> list[Any]:
    from pallet.plugins.exec_oci.runtime import CrunBackend, RuncBackend

    return [RuncBackend, CrunBackend]


@hookimpl
def pallet_oci_runtime_class_v1() -> Any:
    from pallet.plugins.exec_oci.runtime import OCIRuntime

    return OCIRuntime
