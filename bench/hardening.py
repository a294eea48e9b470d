#!/usr/bin/env python3
"""What Docker's default hardening costs at container start, and the seccomp compiler.

Against a private palletd (its own roots, socket and cgroup parent), interleaved so that
machine noise hits every variant alike:
  * `pallet run --rm busybox true` (the reference: default capabilities + seccomp),
  * the same with `--security-opt seccomp=unconfined` and with `--privileged`,
  * the same with `-m 64m --pids-limit 100 --cpus 1` (cgroup writes),
  * the same with a named volume (`-v NAME:/data`, created once);
and, in-process, compiling Docker's default profile to BPF with libseccomp (what the
per-daemon cache saves on every start but the first). Medians, and ratios to the
reference.

    .venv/bin/python bench/hardening.py [-n 15] [--storage-driver overlay]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=15, help="runs per variant")
    ap.add_argument("--storage-driver", default="overlay")
    args = ap.parse_args()

    from tests.conftest import Daemon  # a private daemon, as the tests make them

    root = Path(tempfile.mkdtemp(prefix="bench-hardening-"))
    d = Daemon(root, args.storage_driver, [])
    d.start()
    vol = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        tar = root / "busybox.tar"
        subprocess.run(
            [str(REPO / "scripts/build-busybox-image"), "-o", str(tar)],
            check=True,
            capture_output=True,
        )
        d.import_busybox(tar)
        variants = {
            "default (caps + seccomp)": [],
            "seccomp=unconfined": ["--security-opt", "seccomp=unconfined"],
            "--privileged": ["--privileged"],
            "-m 64m --pids-limit 100 --cpus 1": ["-m", "64m", "--pids-limit", "100", "--cpus", "1"],
            "-v NAME:/data": ["-v", f"{vol}:/data"],
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for flags in variants.values():  # warm-up (zygote, caches, the volume)
            d.cli("run", "--rm", *flags, "busybox", "true")
        for _ in range(args.n):
            for name, flags in variants.items():
                t0 = time.perf_counter()
                d.cli("run", "--rm", *flags, "busybox", "true")
                times[name].append(time.perf_counter() - t0)
        ref = statistics.median(times["default (caps + seccomp)"])
        print(f"pallet run --rm busybox true, {args.n} runs each, storage {args.storage_driver}")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:36s} median {med * 1000:7.1f} ms   ratio {med / ref:5.2f}")
        from pallet.plugins.exec_native import seccomp
        from pallet.seccomp import default_profile, parse_profile, to_oci
        from pallet.spec import DEFAULT_CAPABILITIES

        t0 = time.perf_counter()
        oci = to_oci(parse_profile(default_profile(), "default"), DEFAULT_CAPABILITIES)
        t1 = time.perf_counter()
        runs = [0.0] * 10
        for i in range(10):
            s = time.perf_counter()
            prog = seccomp.compile_filter(oci)
            runs[i] = time.perf_counter() - s
        print(
            f"  default profile -> OCI seccomp: {(t1 - t0) * 1000:.2f} ms; -> BPF "
            f"({len(prog) // 8} instructions): median {statistics.median(runs) * 1000:.2f} ms "
            "(cached per daemon after the first container)"
        )
    finally:
        d.cli("volume", "rm", "-f", vol, check=False)
        d.cleanup()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
