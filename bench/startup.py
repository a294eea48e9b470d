#!/usr/bin/env python3
"""Container start-up latency and daemon memory.

Measures, against a private palletd (its own data root and socket):
  * `pallet run --rm busybox true` from pallet's CLI,
  * `docker run --rm busybox true` from the real docker CLI pointed at pallet,
  * the daemon's idle RSS,
and, when Debian's docker.io is installed (`dockerd` on PATH), the same
`docker run --rm busybox true` against a private dockerd in the same run, reported
as a ratio.

    .venv/bin/python bench/startup.py [-n 20] [--storage-driver overlay]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def wait_socket(path: str, proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited early")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            if b"OK" in s.recv(4096):
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not come up")


def timed(cmd: list[str], env: dict[str, str], n: int) -> list[float]:
    subprocess.run(cmd, env=env, check=True, capture_output=True)  # warm-up
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def report(name: str, samples: list[float]) -> float:
    med = statistics.median(samples)
    p90 = sorted(samples)[int(len(samples) * 0.9) - 1]
    print(f"{name:<48} median {med * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms   (n={len(samples)})")
    return med


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--storage-driver", default="overlay")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="pallet-bench-"))
    tag = uuid.uuid4().hex[:8]
    exec_root = f"/run/pallet-bench-{tag}"
    sock = exec_root + ".sock"
    tar = tmp / "busybox.tar"
    subprocess.run([str(REPO / "scripts/build-busybox-image"), "-o", str(tar)], check=True)
    daemon = subprocess.Popen(
        [
            str(BIN / "palletd"),
            "--config-file",
            "/dev/null",
            "--data-root",
            str(tmp / "data"),
            "--exec-root",
            exec_root,
            "-H",
            f"unix://{sock}",
            "--storage-driver",
            args.storage_driver,
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "palletd.log", "wb"),
    )
    dockerd = None
    try:
        wait_socket(sock, daemon, "palletd")
        env = {
            **os.environ,
            "PALLET_HOST": f"unix://{sock}",
            "DOCKER_HOST": f"unix://{sock}",
            "DOCKER_CONFIG": str(tmp / "docker-config"),
        }
        subprocess.run(
            [str(BIN / "pallet"), "import", "--change", 'CMD ["sh"]', str(tar), "busybox:latest"],
            env=env,
            check=True,
            capture_output=True,
        )
        print(f"storage driver: {args.storage_driver}; runtime: native")
        pallet_med = report(
            "pallet run --rm busybox true",
            timed([str(BIN / "pallet"), "run", "--rm", "busybox", "true"], env, args.n),
        )
        docker = shutil.which("docker")
        docker_on_pallet = None
        if docker:
            docker_on_pallet = report(
                "docker run --rm busybox true  (-> pallet)",
                timed([docker, "run", "--rm", "busybox", "true"], env, args.n),
            )
        time.sleep(1)
        print(f"{'palletd idle RSS':<48} {rss_kib(daemon.pid) / 1024:7.1f} MiB")

        if docker and shutil.which("dockerd"):
            dsock = f"/run/bench-dockerd-{tag}.sock"
            dockerd = subprocess.Popen(
                [
                    "dockerd",
                    "--data-root",
                    str(tmp / "docker"),
                    "--exec-root",
                    f"/run/bench-dockerd-{tag}",
                    "-H",
                    f"unix://{dsock}",
                    "--pidfile",
                    str(tmp / "dockerd.pid"),
                    "--bridge",
                    "none",
                    "--iptables=false",
                    "--ip6tables=false",
                    "--containerd-namespace",
                    f"bench{tag}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(tmp / "dockerd.log", "wb"),
            )
            wait_socket(dsock, dockerd, "dockerd")
            denv = {**env, "DOCKER_HOST": f"unix://{dsock}"}
            subprocess.run(
                [docker, "import", "--change", 'CMD ["sh"]', str(tar), "busybox:latest"],
                env=denv,
                check=True,
                capture_output=True,
            )
            ref = report(
                "docker run --rm busybox true  (-> dockerd)",
                timed(
                    [docker, "run", "--rm", "--network", "none", "busybox", "true"], denv, args.n
                ),
            )
            print(f"ratio pallet CLI / docker reference: {pallet_med / ref:.2f}")
            if docker_on_pallet:
                print(
                    f"ratio docker CLI on pallet / docker reference: {docker_on_pallet / ref:.2f}"
                )
        else:
            print("reference: dockerd not installed (apt-get install docker.io) - no ratio")
    finally:
        for p in (daemon, dockerd):
            if p is not None and p.poll() is None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(exec_root, ignore_errors=True)


if __name__ == "__main__":
    main()
