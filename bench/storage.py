#!/usr/bin/env python3
"""Storage drivers: time to apply the bench image's layers, and to prepare + mount a
container rootfs on it, per driver, against vfs (the plain-copy reference) in the same
run, reported as ratios.

The bench image is generated (deterministic): a busybox rootfs layer, a layer of 3000
small files in 30 directories, a layer with two 16 MiB files, a layer that deletes and
rewrites part of the small ones (whiteouts), and 4 small config-like layers: 8 layers.

On the host: overlay, btrfs (on a loop device made here) and vfs. devmapper needs
device-mapper, so it runs in the QEMU guest (tests/qemu/guest.py) together with its own
vfs reference (on the guest's tmpfs); the guest's boot time is reported too.

    .venv/bin/python bench/storage.py [-n 5] [--no-guest] [--drivers overlay,btrfs,vfs]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def bench_layers() -> list[bytes]:
    from pallet.testing.conformance import tar

    rnd = random.Random(4)
    layers: list[bytes] = []
    # 1: a busybox rootfs
    entries: list[dict[str, object]] = [
        {"name": d + "/", "type": "dir"} for d in ("bin", "etc", "usr", "usr/bin", "tmp", "var")
    ]
    entries.append(
        {"name": "bin/busybox", "data": Path("/bin/busybox").read_bytes(), "mode": 0o755}
    )
    for applet in ("sh", "ls", "cat", "echo", "mkdir", "rm", "cp", "mv", "tar", "sed", "awk"):
        entries.append({"name": f"bin/{applet}", "type": "link", "target": "bin/busybox"})
    entries.append({"name": "etc/passwd", "data": b"root:x:0:0:root:/root:/bin/sh\n"})
    layers.append(tar(*entries))  # type: ignore[arg-type]
    # 2: many small files
    entries = [{"name": "usr/share/", "type": "dir"}]
    for d in range(30):
        entries.append({"name": f"usr/share/d{d:02d}/", "type": "dir"})
        for f in range(100):
            size = rnd.randint(200, 4000)
            entries.append({"name": f"usr/share/d{d:02d}/f{f:03d}", "data": rnd.randbytes(size)})
    layers.append(tar(*entries))  # type: ignore[arg-type]
    # 3: big files
    layers.append(
        tar(
            {"name": "opt/", "type": "dir"},
            {"name": "opt/big1", "data": rnd.randbytes(16 << 20)},
            {"name": "opt/big2", "data": rnd.randbytes(16 << 20)},
        )
    )
    # 4: deletions and rewrites
    entries = []
    for d in range(0, 30, 3):
        entries.append({"name": f"usr/share/.wh.d{d:02d}"})
    for d in range(1, 30, 3):
        entries.append({"name": f"usr/share/d{d:02d}/", "type": "dir"})
        entries.append({"name": f"usr/share/d{d:02d}/.wh..wh..opq"})
        entries.append({"name": f"usr/share/d{d:02d}/new", "data": b"rewritten"})
    layers.append(tar(*entries))  # type: ignore[arg-type]
    # 5-8: small config layers
    for i in range(4):
        layers.append(
            tar({"name": "etc/", "type": "dir"}, {"name": f"etc/conf{i}", "data": b"x" * 100})
        )
    return layers


@contextlib.contextmanager
def driver_root(name: str, scratch: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    from pallet.testing.envs import ENVIRONMENTS

    factory = ENVIRONMENTS.get(name)
    if factory is None:
        d = scratch / name
        d.mkdir(parents=True)
        yield d, {}
        return
    with factory(scratch / f"env-{name}") as env:
        opts = dict(env.options)
        if name == "devmapper":
            opts["dm.loopdatasize"] = "2GB"
            opts["dm.basesize"] = "512MB"
        yield env.base / f"{name}-{secrets.token_hex(3)}", opts


def measure(name: str, layers: list[bytes], reps: int, scratch: Path) -> dict[str, float]:
    from pallet import archive, mount
    from pallet.plugin_manager import PluginManager

    pm = PluginManager()
    pm.load_entry_points()
    cls = next(c for c in pm.collect("pallet_storage_drivers_v1") if c.name == name)
    applies: list[float] = []
    prepares: list[float] = []
    with driver_root(name, scratch) as (root, options):
        opts = cls.Options.model_validate(options)
        cls.probe(root, opts)
        for rep in range(reps):
            d = cls(root / f"r{rep}", opts)
            try:
                t0 = time.perf_counter()
                top = None
                for data in layers:
                    key = f"tmp-{secrets.token_hex(4)}"
                    d.prepare(key, top)
                    res = archive.apply_to_snapshot(d, key, io.BytesIO(data), scratch)
                    cid = archive.chain_id(top, res.diff_id)
                    d.commit(cid, key)
                    top = cid
                applies.append(time.perf_counter() - t0)
                mnt = scratch / f"mnt-{rep}"
                mnt.mkdir()
                for i in range(5):
                    t0 = time.perf_counter()
                    mounts = d.prepare(f"ctr{i}", top)
                    mount.mount_all(mounts, str(mnt))
                    prepares.append(time.perf_counter() - t0)
                    assert (mnt / "opt/big1").stat().st_size == 16 << 20
                    mount.unmount(str(mnt))
                mnt.rmdir()
            finally:
                d.close()
            shutil.rmtree(root / f"r{rep}", ignore_errors=True)
    return {"apply": statistics.median(applies), "prepare_mount": statistics.median(prepares)}


def report(results: dict[str, dict[str, float]], ref: str, where: str) -> None:
    print(f"\n{where} (median; ratio = driver / {ref})")
    print(f"{'driver':<10} {'apply 8 layers':>16} {'ratio':>7} {'prepare+mount':>15} {'ratio':>7}")
    r = results[ref]
    for name, m in results.items():
        print(
            f"{name:<10} {m['apply'] * 1000:>13.0f} ms {m['apply'] / r['apply']:>7.2f}"
            f" {m['prepare_mount'] * 1000:>12.1f} ms {m['prepare_mount'] / r['prepare_mount']:>7.2f}"
        )


def run_local(drivers: list[str], reps: int) -> dict[str, dict[str, float]]:
    layers = bench_layers()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pallet-bench-", dir="/var/tmp") as tmp:
        for name in drivers:
            scratch = Path(tmp) / name
            scratch.mkdir()
            results[name] = measure(name, layers, reps, scratch)
    return results


def run_guest(reps: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from tests.qemu import guest

    why = guest.missing()
    if why:
        print(f"\nguest: skipped ({why})")
        return
    script = (
        # in-process unpack for both drivers: a Python child per layer costs seconds
        # under TCG and would drown what is measured
        f"cd {REPO} && PYTHONDONTWRITEBYTECODE=1 PALLET_UNPACK_IN_PROCESS=1 "
        f"{sys.executable} bench/storage.py "
        f"--in-guest -n {reps} --drivers devmapper,vfs > /mnt/bench.json"
    )
    with tempfile.TemporaryDirectory(prefix="pallet-bench-guest-") as tmp:
        res = guest.run_in_guest(script, Path(tmp))
        data = (Path(tmp) / "exchange" / "bench.json").read_text() if res.status == 0 else ""
    if not data:
        print(f"\nguest run failed ({res.status}):\n{res.output[-3000:]}\n{res.console[-2000:]}")
        return
    report(json.loads(data), "vfs", "QEMU guest (TCG, stock Debian kernel, tmpfs)")
    print(
        f"guest boot: {res.boot_seconds:.1f} s to the command (guest uptime); whole run {res.wall_seconds:.0f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=3, help="repetitions (fresh driver root each)")
    ap.add_argument("--drivers", default="overlay,btrfs,vfs")
    ap.add_argument("--no-guest", action="store_true", help="skip devmapper in the QEMU guest")
    ap.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/storage.py: needs root")
    drivers = [d for d in args.drivers.split(",") if d]
    if "vfs" not in drivers:
        drivers.append("vfs")
    results = run_local(drivers, args.n)
    if args.in_guest:
        print(json.dumps(results))
        return
    report(
        results,
        "vfs",
        f"host ({subprocess.run(['uname', '-r'], capture_output=True, text=True).stdout.strip()})",
    )
    if not args.no_guest:
        run_guest(args.n)


if __name__ == "__main__":
    main()
