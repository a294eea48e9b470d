#!/usr/bin/env python3
"""What networking costs: the time a container's network setup adds to `run`, and the
throughput of a published port against the same transfer on loopback directly.

Against a private palletd (own data root, socket, default bridge and subnet):

  * `pallet run --rm busybox true` with `--network none` (the reference: a new netns
    with only `lo`), with the default bridge (veth, address, route, rules), and on a
    user-defined network (plus the embedded DNS), interleaved, medians reported and
    the bridge's extra time given as a difference and a ratio;
  * a SIZE MiB file served by busybox httpd, fetched from the host: from the same
    httpd binary running on the host's 127.0.0.1 (the reference), from the
    container's published port on 127.0.0.1 (DNAT + route_localnet), and from the
    container's address on the bridge; throughput ratios against the reference.

Traffic stays on loopback and the daemon's own bridge.

    .venv/bin/python bench/network.py [-n 15] [--size 256]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def wait_socket(path: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit("palletd exited early")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            if b"OK" in s.recv(4096):
                return
        time.sleep(0.05)
    raise SystemExit("palletd did not come up")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch_rate(url: str, size: int, rounds: int = 3) -> float:
    """Best MiB/s of ``rounds`` full downloads."""
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        got = 0
        with urllib.request.urlopen(url, timeout=120) as r:
            while chunk := r.read(1 << 20):
                got += len(chunk)
        dt = time.perf_counter() - t0
        if got != size:
            raise SystemExit(f"{url}: got {got} bytes, expected {size}")
        best = max(best, got / dt / (1 << 20))
    return best


def wait_http(url: str) -> None:
    for _ in range(200):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=5).close()
            return
        time.sleep(0.05)
    raise SystemExit(f"{url} never answered")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=15, help="runs per network mode")
    ap.add_argument("--size", type=int, default=256, help="MiB transferred")
    args = ap.parse_args()

    tag = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix="pallet-bench-net-"))
    sock = f"/run/pbn-{tag}.sock"
    bridge = f"pb{tag}"
    sub = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
    usub = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
    (tmp / "daemon.json").write_text("{}")
    daemon = subprocess.Popen(
        [
            str(BIN / "palletd"),
            "--config-file",
            str(tmp / "daemon.json"),
            "--data-root",
            str(tmp / "data"),
            "--exec-root",
            f"/run/pbn-{tag}",
            "-H",
            f"unix://{sock}",
            "--cgroup-parent",
            f"/pbn-{tag}",
            "--bridge",
            bridge,
            "--bip",
            f"{sub}.1/24",
            "--debug",  # the daemon logs how long each join and release took
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "palletd.log", "wb"),
    )
    env = {**os.environ, "PALLET_HOST": f"unix://{sock}"}
    host_httpd: subprocess.Popen[bytes] | None = None

    def pallet(*a: str) -> str:
        r = subprocess.run([str(BIN / "pallet"), *a], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"pallet {' '.join(a)}: {r.stderr}")
        return r.stdout

    try:
        wait_socket(sock, daemon)
        image = tmp / "busybox.tar"
        subprocess.run(
            [str(REPO / "scripts/build-busybox-image"), "-o", str(image)],
            check=True,
            capture_output=True,
        )
        pallet("import", "--change", 'CMD ["sh"]', str(image), "busybox:latest")
        user_net = f"bench-{tag}"
        pallet("network", "create", "--subnet", f"{usub}.0/24", user_net)

        # --- run latency by network mode (interleaved) -------------------------------
        modes = {"none": ["--network", "none"], "bridge": [], user_net: ["--network", user_net]}
        samples: dict[str, list[float]] = {m: [] for m in modes}
        for flags in modes.values():  # warm-up
            pallet("run", "--rm", *flags, "busybox", "true")
        for _ in range(args.n):
            for mode, flags in modes.items():
                t0 = time.perf_counter()
                pallet("run", "--rm", *flags, "busybox", "true")
                samples[mode].append(time.perf_counter() - t0)
        med = {m: statistics.median(s) for m, s in samples.items()}
        print(f"run --rm busybox true, median of {args.n} (interleaved):")
        for mode in modes:
            label = "user network" if mode == user_net else mode
            print(f"  --network {label:<14} {med[mode] * 1000:8.1f} ms")
        for mode in ("bridge", user_net):
            label = "a user network's" if mode == user_net else "the bridge's"
            extra = (med[mode] - med["none"]) * 1000
            print(
                f"  {label} setup adds {extra:6.1f} ms "
                f"(ratio to none: {med[mode] / med['none']:.2f})"
            )

        # The daemon's own account (less sensitive to a loaded machine than `run`).
        import re

        log = (tmp / "palletd.log").read_text()
        joins = [float(x) for x in re.findall(r"1 endpoint\(s\) joined in ([0-9.]+) ms", log)]
        releases = [float(x) for x in re.findall(r"1 endpoint\(s\) released in ([0-9.]+) ms", log)]
        if joins and releases:
            print(
                f"  in the daemon: join median {statistics.median(joins):.1f} ms, release "
                f"median {statistics.median(releases):.1f} ms ({len(joins)} containers)"
            )

        # --- published-port throughput ---------------------------------------------------
        size = args.size << 20
        www = tmp / "www"
        www.mkdir()
        with open(www / "blob", "wb") as f:
            f.truncate(size)  # sparse: the page cache, not the disk, is measured
        direct_port, pub_port = free_port(), free_port()
        host_httpd = subprocess.Popen(
            ["busybox", "httpd", "-f", "-p", f"127.0.0.1:{direct_port}", "-h", str(www)]
        )
        cid = pallet(
            "run",
            "-d",
            "-p",
            f"127.0.0.1:{pub_port}:80",
            "busybox",
            "sh",
            "-c",
            f"mkdir /www && dd if=/dev/zero of=/www/blob bs=1M count=0 seek={args.size} "
            "2>/dev/null && exec httpd -f -p 80 -h /www",
        ).strip()
        ip = pallet("inspect", "-f", "{{.NetworkSettings.IPAddress}}", cid).strip()
        urls = {
            "loopback, host httpd (reference)": f"http://127.0.0.1:{direct_port}/blob",
            "published port on 127.0.0.1": f"http://127.0.0.1:{pub_port}/blob",
            "container address on the bridge": f"http://{ip}/blob",
        }
        for url in urls.values():
            wait_http(url)
        rates = {name: fetch_rate(url, size) for name, url in urls.items()}
        ref = rates["loopback, host httpd (reference)"]
        print(f"HTTP GET of {args.size} MiB from the host (best of 3):")
        for name, rate in rates.items():
            print(f"  {name:<36} {rate:8.1f} MiB/s  ratio {rate / ref:.2f}")
        pallet("rm", "-f", cid)
        pallet("network", "rm", user_net)
    finally:
        if host_httpd is not None:
            host_httpd.terminate()
            host_httpd.wait()
        with contextlib.suppress(Exception):
            for c in pallet("ps", "-aq").split():
                pallet("rm", "-f", c)
        daemon.terminate()
        daemon.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        shutil.rmtree(f"/run/pbn-{tag}", ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
