"""The layer unpacker child: ``python -m pallet.untar TARGET WHITEOUTS``.

Reads an uncompressed layer tar on stdin, chroots into ``TARGET`` and writes the
entries there with :mod:`pallet.archive`'s unpacker (which refuses hostile entries);
reports ``{"size": N}`` or ``{"error": ..., "kind": ...}`` as one JSON line on stdout.
Docker's ``chrootarchive`` does the same: the chroot is the second wall of the
tar-slip defence, and the work is off the daemon's event loop and GIL.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import tarfile
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _report(obj: dict[str, object], status: int) -> None:
    os.write(1, json.dumps(obj).encode() + b"\n")
    sys.exit(status)


def main() -> None:
    target, whiteouts = sys.argv[1], sys.argv[2]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the daemon
    if whiteouts not in ("delete", "overlay"):
        _report({"error": f"unknown whiteout format {whiteouts!r}", "kind": "invalid"}, 2)

    from pallet import archive
    from pallet.errors import PalletError

    proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    os.chroot(target)
    os.chdir("/")
    archive._host_proc = proc_fd
    stdin = sys.stdin.buffer
    try:
        size = archive._unpack_in_process(stdin, Path("/"), whiteouts)
    except PalletError as e:
        _report({"error": e.message, "kind": "invalid"}, 1)
    except tarfile.TarError as e:
        _report({"error": f"invalid layer tar: {e}", "kind": "invalid"}, 1)
    except OSError as e:
        _report({"error": f"unpacking layer: {e}", "kind": "os", "errno": e.errno}, 1)
    while stdin.read(1 << 20):  # the rest (end-of-archive padding): the caller hashes it all
        pass
    _report({"size": size}, 0)


if __name__ == "__main__":
    main()
