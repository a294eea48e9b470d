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
from typing import Any

_PR_SET_PDEATHSIG = 1


def _report(obj: dict[str, object], status: int) -> None:
    os.write(1, json.dumps(obj).encode() + b"\n")
    sys.exit(status)


def main() -> None:
    target, whiteouts = sys.argv[1], sys.argv[2]
    compressed = sys.argv[3:] == ["--compressed"]
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
    if not compressed:
        size = _unpack(archive, stdin, whiteouts)
        while stdin.read(1 << 20):  # the rest (end-of-archive padding): the caller hashes it
            pass
        _report({"size": size}, 0)
    # --compressed: decompress and hash here too; report the diff ID
    try:
        with archive.decompressed(stdin) as raw:
            hashing: Any = raw  # archive._Hashing: counts and hashes what is read
            head = hashing.read(1)
            size = _unpack(archive, archive._Prefixed(head, hashing), whiteouts) if head else 0
            hashing.drain()
            diff_id = "sha256:" + hashing.hash.hexdigest()
    except PalletError as e:
        _report({"error": e.message, "kind": "invalid"}, 1)
    except OSError as e:
        _report({"error": f"unpacking layer: {e}", "kind": "os", "errno": e.errno}, 1)
    _report({"size": size, "diff_id": diff_id}, 0)


def _unpack(archive: Any, stream: Any, whiteouts: str) -> int:
    from pallet.errors import PalletError

    try:
        return int(archive._unpack_in_process(stream, Path("/"), whiteouts))
    except PalletError as e:
        _report({"error": e.message, "kind": "invalid"}, 1)
    except tarfile.TarError as e:
        _report({"error": f"invalid layer tar: {e}", "kind": "invalid"}, 1)
    except OSError as e:
        _report({"error": f"unpacking layer: {e}", "kind": "os", "errno": e.errno}, 1)
    raise AssertionError("unreachable")


def run_child(reader: Any, target: Path, whiteouts: str, *extra: str) -> dict[str, Any]:
    """Run the chrooted unpacker on ``target``, feed it ``reader``'s bytes through a pipe
    (in the caller's thread: it only copies), and return its report. A failure is
    raised as the child reported it: ``OSError`` for the file system, else
    ``InvalidArgument`` naming what is wrong with the layer."""
    import subprocess

    from pallet.errors import InvalidArgument

    proc = subprocess.Popen(
        [sys.executable, "-m", "pallet.untar", str(target), whiteouts, *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        try:
            while chunk := reader.read(1 << 20):
                proc.stdin.write(chunk)
        except BrokenPipeError:
            pass  # the child stopped reading: its report says why
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        out = proc.stdout.read()
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        proc.stdout.close()
    try:
        report = json.loads(out or b"{}")
    except ValueError:
        report = {}
    if rc == 0 and "size" in report:
        return dict(report)
    msg = report.get("error") or f"layer unpacker exited with status {rc}"
    if report.get("kind") == "os":
        raise OSError(report.get("errno") or 5, msg)
    raise InvalidArgument(msg)


def unpack_compressed(reader: Any, target: Path, whiteouts: str) -> tuple[str, int]:
    """Unpack a compressed layer stream in the child, which decompresses, hashes and
    unpacks, so a layer costs the daemon no CPU; returns (diff ID, size)."""
    report = run_child(reader, target, whiteouts, "--compressed")
    return str(report["diff_id"]), int(report["size"])


if __name__ == "__main__":
    main()
