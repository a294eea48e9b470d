#!/usr/bin/env python3
"""`pallet run --rm busybox true` against Docker, with a breakdown of where the time goes.

Starts, in the same run, a private palletd and (when Debian's docker.io is installed)
a private dockerd, each with busybox imported from the same rootfs tarball, then:

1. end to end, from the CLI, interleaved round by round so that both engines see the
   same machine load: `pallet run --rm --network none --runtime R busybox true` for
   R in native, runc, crun; `docker run --rm --network none busybox true` against
   dockerd (the reference) and against palletd;
2. the floor: the interpreter alone (`python -c pass`) and the CLI's start-up
   (`pallet run --help`: interpreter, click, the run command's module);
3. per runtime, the API sequence of `run` done in-process with pallet's client, each
   request timed: ping (one round trip), create (the rootfs is prepared here), attach,
   wait, start (bundle mount, config.json, monitor launch, backend create + start),
   and the wait's answer (the container runs `true`, exits, is torn down and removed);
4. per runtime, the backend alone at the monitor level (no daemon): a bundle built by
   pallet's spec builder, `ShimClient.launch` (monitor fork from the zygote + backend
   create) and start -> exit (backend start, `true`, exit, backend delete).

Reported as medians and p90, and as ratios to docker's median (the issue's target:
pallet's CLI <= 0.25x docker's).

    .venv/bin/python bench/run.py [-n 15] [--storage-driver overlay] [--runtimes native,runc,crun]
"""

from __future__ import annotations

import argparse
import asyncio
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PALLET = str(BIN / "pallet")
GUARD = 300.0  # seconds: turns a hang into an error


def wait_socket(path: str, proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited early")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            if b"OK" in s.recv(4096):
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not come up")


def once(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, timeout=GUARD)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode()}")
    return dt


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[max(0, int(len(ordered) * 0.9) - 1)]


def line(name: str, samples: list[float], ref: float | None = None) -> float:
    med, p90 = stats(samples)
    ratio = f"   {med / ref:5.2f}x docker" if ref else ""
    print(f"  {name:<46} median {med * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms{ratio}")
    return med


# --- in-process API sequence ----------------------------------------------------------


def api_sequence(host: str, runtime: str) -> dict[str, float]:
    from pallet.client import Client

    client = Client(host)
    out: dict[str, float] = {}
    t = time.perf_counter()
    client.ping()
    out["ping (one round trip)"] = time.perf_counter() - t
    body = {
        "Image": "busybox",
        "Cmd": ["true"],
        "AttachStdout": True,
        "AttachStderr": True,
        "HostConfig": {"AutoRemove": True, "Runtime": runtime, "NetworkMode": "none"},
    }
    t = time.perf_counter()
    cid = client.post("/containers/create", json_body=body)["Id"]
    out["create (rootfs prepare)"] = time.perf_counter() - t
    t = time.perf_counter()
    conn = client.hijack(
        "POST", f"/containers/{cid}/attach", {"stream": 1, "stdout": 1, "stderr": 1}
    )
    out["attach (hijack)"] = time.perf_counter() - t
    t = time.perf_counter()
    wait = client.request("POST", f"/containers/{cid}/wait", {"condition": "removed"})
    out["wait (headers)"] = time.perf_counter() - t
    t = time.perf_counter()
    client.post(f"/containers/{cid}/start")
    out["start (mount, spec, monitor, backend)"] = time.perf_counter() - t
    t = time.perf_counter()
    result = wait.json()
    out["run `true`, exit, teardown, remove"] = time.perf_counter() - t
    conn.close()
    wait.close()
    if result.get("StatusCode") != 0:
        raise SystemExit(f"container exited with {result}")
    return out


# --- the backend alone ------------------------------------------------------------------

BACKENDS = {
    "native": "pallet.plugins.exec_native.libcontainer:NativeBackend",
    "runc": "pallet.plugins.exec_oci.runtime:RuncBackend",
    "crun": "pallet.plugins.exec_oci.runtime:CrunBackend",
}


def backend_alone(tmp: Path, rootfs: Path, runtime: str, cgroup_parent: str) -> dict[str, float]:
    from pallet.containers import HOST_CONFIG_DEFAULTS
    from pallet.shim import ShimClient
    from pallet.spec import build_spec

    bundle = tmp / f"b-{uuid.uuid4().hex[:10]}"
    bundle.mkdir()
    spec = build_spec(
        container_id=bundle.name,
        cgroup_parent=cgroup_parent,
        args=["true"],
        env=[],
        cwd="/",
        user="",
        hostname="bench",
        tty=False,
        rootfs=rootfs,
        host_config={**HOST_CONFIG_DEFAULTS, "Runtime": runtime, "NetworkMode": "none"},
        extra_mounts=[],
    )
    (bundle / "config.json").write_text(spec.model_dump_json(exclude_none=True))
    out: dict[str, float] = {}

    async def go() -> None:
        t = time.perf_counter()
        client = await ShimClient.launch(
            bundle, BACKENDS[runtime], bundle / "log.json", False, lambda s, d: None
        )
        out["monitor launch + backend create"] = time.perf_counter() - t
        t = time.perf_counter()
        await client.start()
        out["backend start"] = time.perf_counter() - t
        t = time.perf_counter()
        st = await client.wait()
        out["`true` runs, exits, backend delete"] = time.perf_counter() - t
        await client.close()
        if st.exit_code != 0:
            raise SystemExit(f"{runtime}: exit {st.exit_code}: {st.error}")

    async def guarded() -> None:
        await asyncio.wait_for(go(), GUARD)  # a hang guard, never a speed limit

    asyncio.run(guarded())
    shutil.rmtree(bundle, ignore_errors=True)
    return out


# --- main -----------------------------------------------------------------------------


def start_dockerd(tmp: Path, tag: str, tar: Path, env: dict[str, str]) -> Any:
    docker, dockerd = shutil.which("docker"), shutil.which("dockerd")
    if not docker or not dockerd:
        return None, None
    dsock = f"/run/bench-dockerd-{tag}.sock"
    proc = subprocess.Popen(
        [
            dockerd,
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
            "--containerd-plugins-namespace",
            f"bench{tag}p",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "dockerd.log", "wb"),
    )
    wait_socket(dsock, proc, "dockerd")
    denv = {**env, "DOCKER_HOST": f"unix://{dsock}"}
    subprocess.run(
        [docker, "import", "--change", 'CMD ["sh"]', str(tar), "busybox:latest"],
        env=denv,
        check=True,
        capture_output=True,
    )
    return proc, denv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=15, help="rounds (default 15)")
    ap.add_argument("--storage-driver", default="overlay")
    ap.add_argument("--runtimes", default="native,runc,crun")
    args = ap.parse_args()
    runtimes = [r for r in args.runtimes.split(",") if r]

    tmp = Path(tempfile.mkdtemp(prefix="pallet-bench-"))
    tag = uuid.uuid4().hex[:8]
    exec_root = f"/run/pallet-bench-{tag}"
    sock = exec_root + ".sock"
    cgroup_parent = f"/pallet-bench-{tag}"
    tar = tmp / "busybox.tar"
    subprocess.run([str(REPO / "scripts/build-busybox-image"), "-o", str(tar)], check=True)
    rootfs = tmp / "rootfs"
    rootfs.mkdir()
    with tarfile.open(tar) as tf:
        tf.extractall(rootfs)  # our own tarball, from scripts/build-busybox-image
    (tmp / "daemon.json").write_text("{}")
    daemon = subprocess.Popen(
        [
            str(BIN / "palletd"),
            "--config-file",
            str(tmp / "daemon.json"),
            "--data-root",
            str(tmp / "data"),
            "--exec-root",
            exec_root,
            "-H",
            f"unix://{sock}",
            "--storage-driver",
            args.storage_driver,
            "--cgroup-parent",
            cgroup_parent,
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
        env.pop("DOCKER_CONTEXT", None)
        subprocess.run(
            [PALLET, "import", "--change", 'CMD ["sh"]', str(tar), "busybox:latest"],
            env=env,
            check=True,
            capture_output=True,
        )
        dockerd, denv = start_dockerd(tmp, tag, tar, env)
        docker = shutil.which("docker")

        commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        if dockerd is not None and docker:
            commands["docker run --rm busybox true -> dockerd"] = (
                [docker, "run", "--rm", "--network", "none", "busybox", "true"],
                denv,
            )
        for rt in runtimes:
            commands[f"pallet run --rm busybox true   [{rt}]"] = (
                [PALLET, "run", "--rm", "--network", "none", "--runtime", rt, "busybox", "true"],
                env,
            )
        if docker:
            commands["docker run --rm busybox true -> palletd"] = (
                [docker, "run", "--rm", "--network", "none", "busybox", "true"],
                env,
            )
        commands["floor: python -c pass"] = ([sys.executable, "-c", "pass"], env)
        commands["CLI start: pallet run --help"] = ([PALLET, "run", "--help"], env)

        for cmd, e in commands.values():  # warm-up: caches, the zygote, dockerd's lazies
            once(cmd, e)
        samples: dict[str, list[float]] = {k: [] for k in commands}
        api: dict[str, dict[str, list[float]]] = {rt: {} for rt in runtimes}
        alone: dict[str, dict[str, list[float]]] = {rt: {} for rt in runtimes}
        from pallet.shim import ShimClient

        ShimClient.warm_up(list(BACKENDS.values()))
        for rt in runtimes:  # warm-up of the in-process paths
            api_sequence(f"unix://{sock}", rt)
            backend_alone(tmp, rootfs, rt, cgroup_parent)
        for _ in range(args.n):
            for name, (cmd, e) in commands.items():
                samples[name].append(once(cmd, e))
            for rt in runtimes:
                for k, v in api_sequence(f"unix://{sock}", rt).items():
                    api[rt].setdefault(k, []).append(v)
                for k, v in backend_alone(tmp, rootfs, rt, cgroup_parent).items():
                    alone[rt].setdefault(k, []).append(v)

        ref_name = "docker run --rm busybox true -> dockerd"
        ref = stats(samples[ref_name])[0] if ref_name in samples else None
        print(f"\nstorage driver: {args.storage_driver}; {args.n} rounds, interleaved")
        print("end to end, from the CLI:")
        for name in commands:
            line(name, samples[name], ref)
        for rt in runtimes:
            print(f"\nbreakdown [{rt}] - the run sequence through the API, in-process:")
            total = 0.0
            for k, v in api[rt].items():
                total += line(k, v)
            print(f"  {'sum of the medians':<46} {total * 1000:14.1f} ms")
            print(f"backend [{rt}] alone, at the monitor level (no daemon):")
            for k, v in alone[rt].items():
                line(k, v)
        time.sleep(1)
        print(f"\npalletd idle RSS after the runs: {rss_kib(daemon.pid) / 1024:.1f} MiB")
        if ref is None:
            print("\nreference: dockerd not installed (apt-get install docker.io): no ratio")
        else:
            print(f"\ndocker reference median: {ref * 1000:.1f} ms")
            for rt in runtimes:
                med = stats(samples[f"pallet run --rm busybox true   [{rt}]"])[0]
                print(f"ratio pallet CLI [{rt}] / docker: {med / ref:.2f}  (target <= 0.25)")
        print(json.dumps({k: stats(v)[0] for k, v in samples.items()}), file=sys.stderr)
    finally:
        for p in (daemon, dockerd):
            if p is not None and p.poll() is None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(60)
        from pallet.shim import _ZygoteClient

        _ZygoteClient.shutdown()  # the bench's own zygote (monitor-level runs)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(exec_root, ignore_errors=True)
        for base in Path("/sys/fs/cgroup").glob("*"):
            with contextlib.suppress(OSError):
                (base / cgroup_parent.lstrip("/")).rmdir()
        with contextlib.suppress(OSError):
            Path("/sys/fs/cgroup", cgroup_parent.lstrip("/")).rmdir()


if __name__ == "__main__":
    main()
