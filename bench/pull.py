#!/usr/bin/env python3
"""Pull + unpack speed: pallet vs Docker, from a registry on loopback, same run.

Builds a 5-layer image of files already on the machine (about 9,000 files, about
125 MB of gzip) with umoci, copies it with skopeo into a private Debian
``docker-registry`` on 127.0.0.1, then times, for each of ``-n`` rounds (default 3):

  * ``pallet pull`` against a private palletd (its own data root and socket),
  * ``docker pull`` against a private dockerd from Debian's docker.io (its own data
    root, exec root, socket and containerd namespace), the reference,

removing the image (and with it every layer) between rounds. Reports the medians
and the ratio pallet / docker (target: <= 0.4).

    .venv/bin/python bench/pull.py [-n 3] [--storage-driver overlay] [--compare-sequential]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
SOURCES = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/share/locale",
    "/usr/share/doc",
    "/usr/bin",
    "/usr/lib/gcc",
    "/usr/lib/python3",
    "/usr/share/man",
    "/usr/share/i18n",
    "/usr/lib",
]
TARGET_FILES = 9000
TARGET_RAW = 350 * 1000 * 1000  # about 125 MB once gzipped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_socket(path: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode}")
        with contextlib.suppress(OSError):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                if b"OK" in s.recv(4096):
                    return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not answer on {path}")


def pick_files() -> list[Path]:
    """Regular files from SOURCES: ~8,800 small ones (< 200 kB, in path order), then
    large ones (1-8 MB) until ~350 MB in all."""
    files: list[Path] = []
    seen: set[str] = set()
    total = 0
    big: list[tuple[str, int]] = []
    for src in SOURCES:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for f in sorted(filenames):
                p = os.path.join(dirpath, f)
                if p in seen or os.path.islink(p) or not os.path.isfile(p):
                    continue
                seen.add(p)
                size = os.path.getsize(p)
                if size < 200_000 and len(files) < TARGET_FILES - 200:
                    files.append(Path(p))
                    total += size
                elif 1_000_000 < size < 8_000_000:
                    big.append((p, size))
    for p, size in big:
        if total >= TARGET_RAW or len(files) >= TARGET_FILES:
            break
        files.append(Path(p))
        total += size
    return files


def build_layers(tmp: Path) -> list[Path]:
    files = pick_files()
    per = (len(files) + 4) // 5
    layers = []
    for i in range(5):
        chunk = files[i * per : (i + 1) * per]
        path = tmp / f"layer{i}.tar"
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
            for p in chunk:
                tf.add(str(p), arcname=str(p).lstrip("/"), recursive=False)
        layers.append(path)
    print(
        f"image: {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.0f} MB raw, 5 layers"
    )
    return layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--storage-driver", default="overlay")
    ap.add_argument("-v", "--verbose", action="store_true", help="per-layer timings from palletd")
    ap.add_argument(
        "--compare-sequential",
        action="store_true",
        help="also time a palletd that unpacks layers one after the other",
    )
    args = ap.parse_args()
    for tool in ("docker-registry", "skopeo", "umoci", "dockerd", "docker"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (scripts/install)")
    tag = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix="bench-pull-", dir="/var/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    run_dirs: list[str] = []
    try:
        # --- the image, in a registry on loopback
        layers = build_layers(tmp)
        layout = tmp / "layout"
        subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
        subprocess.run(["umoci", "new", "--image", f"{layout}:bench"], check=True)
        for layer in layers:
            subprocess.run(
                ["umoci", "raw", "add-layer", "--image", f"{layout}:bench", str(layer)], check=True
            )
            layer.unlink()
        subprocess.run(
            ["umoci", "config", "--image", f"{layout}:bench", "--config.cmd", "sh"], check=True
        )
        port = free_port()
        rcfg = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(tmp / "registry")}},
            "http": {"addr": f"127.0.0.1:{port}"},
        }
        (tmp / "registry.yml").write_text(json.dumps(rcfg))
        reg = subprocess.Popen(
            ["docker-registry", "serve", str(tmp / "registry.yml")],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "registry.log", "wb"),
        )
        procs.append(reg)
        for _ in range(600):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.1)
        ref = f"127.0.0.1:{port}/bench/image:v1"
        subprocess.run(
            [
                "skopeo",
                "copy",
                "-q",
                "--dest-tls-verify=false",
                "--format",
                "v2s2",
                f"oci:{layout}:bench",
                f"docker://{ref}",
            ],
            check=True,
        )
        shutil.rmtree(layout)
        man = json.loads(
            subprocess.run(
                ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                check=True,
                capture_output=True,
            ).stdout
        )
        gz = sum(layer["size"] for layer in man["layers"])
        print(f"registry: {ref}, {len(man['layers'])} layers, {gz / 1e6:.0f} MB gzip")

        # --- pallet (and, with --compare-sequential, a second palletd that unpacks the
        # layers one after the other: PALLET_PULL_SEQUENTIAL=1)
        def start_palletd(name: str, extra_env: dict[str, str]) -> dict[str, str]:
            psock = f"/run/bench-pull-{name}-{tag}.sock"
            (tmp / f"{name}.json").write_text("{}")
            palletd = subprocess.Popen(
                [str(BIN / "palletd"), "--data-root", str(tmp / name), "--exec-root", f"/run/bench-pull-{name}-{tag}",
                 "-H", f"unix://{psock}", "--storage-driver", args.storage_driver, "--cgroup-parent", f"/bench-pull-{name}-{tag}",
                 "--config-file", str(tmp / f"{name}.json")],
                stdout=subprocess.DEVNULL,
                stderr=open(tmp / f"{name}.log", "ab"),
                env={**os.environ, **extra_env},
            )  # fmt: skip
            procs.append(palletd)
            run_dirs.append(f"/run/bench-pull-{name}-{tag}")
            wait_socket(psock, palletd, "palletd")
            return {
                **os.environ,
                "PALLET_HOST": f"unix://{psock}",
                "BENCH_DAEMON_PID": str(palletd.pid),
            }

        penv = start_palletd("pallet", {})
        senv = (
            start_palletd("pallet-seq", {"PALLET_PULL_SEQUENTIAL": "1"})
            if args.compare_sequential
            else None
        )

        # --- docker
        dsock = f"/run/bench-pull-dockerd-{tag}.sock"
        dockerd = subprocess.Popen(
            ["dockerd", "--data-root", str(tmp / "docker"), "--exec-root", f"/run/bench-pull-dockerd-{tag}",
             "-H", f"unix://{dsock}", "--pidfile", str(tmp / "dockerd.pid"), "--bridge", "none",
             "--iptables=false", "--ip6tables=false", "--containerd-namespace", f"benchpull{tag}",
             "--insecure-registry", f"127.0.0.1:{port}", "--storage-driver", "overlay2"],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "dockerd.log", "wb"),
        )  # fmt: skip
        procs.append(dockerd)
        wait_socket(dsock, dockerd, "dockerd")
        denv = {
            **os.environ,
            "DOCKER_HOST": f"unix://{dsock}",
            "DOCKER_CONFIG": str(tmp / "docker-config"),
            "BENCH_DAEMON_PID": str(dockerd.pid),
        }

        def cpu(pid: str) -> float:
            """CPU seconds of a daemon and of its children it has waited for."""
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")

        def timed(cmd: list[str], env: dict[str, str], rm: list[str]) -> float:
            subprocess.run(["sync"], check=True)
            c0 = cpu(env["BENCH_DAEMON_PID"])
            t0 = time.monotonic()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            dt = time.monotonic() - t0
            used = cpu(env["BENCH_DAEMON_PID"]) - c0
            if r.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr}")
            if args.verbose:
                print(
                    f"  {cmd[0].rsplit('/', 1)[-1]}: {dt:.2f} s, daemon CPU {used:.2f} s",
                    flush=True,
                )
            subprocess.run(rm, env=env, check=True, capture_output=True)
            return dt

        pallet_t: list[float] = []
        seq_t: list[float] = []
        docker_t: list[float] = []
        pallet = str(BIN / "pallet")
        seen: dict[str, int] = {}  # how much of each daemon log was shown
        for i in range(args.n):
            pallet_t.append(timed([pallet, "pull", "-q", ref], penv, [pallet, "rmi", ref]))
            docker_t.append(timed(["docker", "pull", "-q", ref], denv, ["docker", "rmi", ref]))
            line = f"round {i + 1}: pallet {pallet_t[-1]:.2f} s, docker {docker_t[-1]:.2f} s"
            if senv is not None:
                seq_t.append(timed([pallet, "pull", "-q", ref], senv, [pallet, "rmi", ref]))
                line += f", pallet sequential unpack {seq_t[-1]:.2f} s"
            print(line, flush=True)
            if args.verbose:
                for name in ("pallet", "pallet-seq"):
                    logf = tmp / f"{name}.log"
                    if logf.exists():
                        text = logf.read_bytes()
                        new, seen[name] = text[seen.get(name, 0) :], len(text)
                        lines = new.decode(errors="replace").splitlines()
                        keep = [x for x in lines if "pallet.distribution" in x and "layer " in x]
                        print(f"  {name}:", *keep, sep="\n    ")
        pm, dm = statistics.median(pallet_t), statistics.median(docker_t)
        print(f"pallet pull  median {pm:.2f} s  ({', '.join(f'{t:.2f}' for t in pallet_t)})")
        print(f"docker pull  median {dm:.2f} s  ({', '.join(f'{t:.2f}' for t in docker_t)})")
        print(f"ratio pallet / docker: {pm / dm:.2f}  (target <= 0.40)")
        if seq_t:
            sm = statistics.median(seq_t)
            print(f"pallet pull, sequential unpack  median {sm:.2f} s, ratio {sm / dm:.2f}")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(60)
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for m in sorted(
            (
                line.split()[4]
                for line in open("/proc/self/mountinfo")
                if str(tmp) in line.split()[4]
            ),
            key=len,
            reverse=True,
        ):
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        for d in [*run_dirs, f"/run/bench-pull-dockerd-{tag}"]:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
