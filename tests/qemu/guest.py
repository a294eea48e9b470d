"""A QEMU guest that runs one command with the host's root filesystem.

Debian's stock kernel (``linux-image-amd64``: device-mapper, dm-thin as modules) boots
under ``qemu-system-x86_64 -accel tcg`` with a tiny initramfs (busybox-static plus the
virtio and 9p modules) that mounts the host's ``/`` read-only over 9p, puts tmpfs on
``/tmp``, ``/run``, ``/var/tmp`` and ``/dev/shm``, mounts a second, read-write 9p share
(the *exchange* directory) on ``/mnt``, chroots, loads the dm and loop modules, starts
``systemd-udevd`` (or ``/dev/mapper`` links never appear), runs ``/mnt/cmd.sh`` with its
output in ``/mnt/output`` and its status in ``/mnt/status``, and powers off.

Used by tests/test_devmapper_guest.py (one boot per group of tests) and bench/storage.py.
"""

from __future__ import annotations

import glob
import gzip
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod /lib/$m.ko 2>/dev/null; done
mkdir -p /host
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /host \
  || { echo "GUEST: cannot mount the host root"; poweroff -f; }
# The new root is a tmpfs of bind mounts of the host's top-level directories (a mount
# on a directory of the 9p share itself may vanish when 9p revalidates it).
mount -t tmpfs -o mode=0755 tmpfs /newroot
for e in /host/* /host/.[!.]*; do
  n=${e#/host/}
  [ -e "$e" ] || [ -L "$e" ] || continue
  if [ -L "$e" ]; then ln -s "$(readlink "$e")" "/newroot/$n"; continue; fi
  if [ -d "$e" ]; then
    mkdir "/newroot/$n"
    case "$n" in proc|sys|dev|tmp|run|mnt) continue;; esac
    mount --bind "$e" "/newroot/$n"
  fi
done
mkdir -p /newroot/var/tmp
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
mount -t tmpfs -o mode=1777 tmpfs /newroot/var/tmp
# The checkout (and its venv) may live under a directory the tmpfs mounts just hid
# (CI clones anywhere, /tmp included): bind those paths back from the host.
for p in $(cat /keep); do
  case "$p" in /tmp/*|/run/*|/var/tmp/*) mkdir -p "/newroot$p"; mount --bind "/host$p" "/newroot$p";; esac
done
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 exchange /newroot/mnt \
  || { echo "GUEST: cannot mount the exchange share"; poweroff -f; }
echo "GUEST: up $(cat /newroot/proc/uptime)"
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin chroot /newroot /bin/sh -c '
  for m in loop dm_mod dm_thin_pool dm_snapshot ext4 xfs overlay bridge veth; do modprobe $m; done
  mkdir -p /run/udev; /lib/systemd/systemd-udevd --daemon >/dev/null 2>&1
  echo "$(cut -d" " -f1 /proc/uptime)" > /mnt/booted
  cd /mnt; /bin/sh /mnt/cmd.sh > /mnt/output 2>&1; echo $? > /mnt/status
  udevadm control --exit >/dev/null 2>&1; sync'
echo "GUEST: done"
poweroff -f
"""

MODULES = ["virtio_pci", "virtio_blk", "9pnet_virtio", "9p", "loop"]
# Host paths the guest must see even under its tmpfs mounts: this checkout and the venv.
KEEP = sorted({str(Path(__file__).resolve().parents[2]), sys.prefix})


def kernel_version() -> str | None:
    """The newest kernel in /boot with modules, the guest's."""
    found = sorted(
        p[len("/boot/vmlinuz-") :]
        for p in glob.glob("/boot/vmlinuz-*")
        if os.path.isdir(f"/lib/modules/{p[len('/boot/vmlinuz-') :]}/kernel")
    )
    return found[-1] if found else None


def missing() -> str | None:
    """Why a guest cannot boot here, or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (Debian package qemu-system-x86)"
    if kernel_version() is None:
        return "no kernel in /boot with modules (Debian package linux-image-amd64)"
    if not os.path.exists("/bin/busybox"):
        return "busybox-static is not installed"
    return None


def _deps(version: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    paths: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for line in Path(f"/lib/modules/{version}/modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        name = os.path.basename(mod).split(".ko")[0].replace("-", "_")
        paths[name] = mod
        deps[name] = [os.path.basename(d).split(".ko")[0].replace("-", "_") for d in rest.split()]
    return paths, deps


def build_initramfs(version: str, out: Path) -> None:
    """A gzipped newc cpio: busybox, the init script, the modules 9p needs in order."""
    paths, deps = _deps(version)
    order: list[str] = []

    def add(name: str) -> None:
        if name in order or name not in paths:
            return
        for d in deps[name]:
            add(d)
        order.append(name)

    for m in MODULES:
        add(m)
    stage = out.with_suffix(".d")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "bin").mkdir(parents=True)
    (stage / "lib").mkdir()
    shutil.copy2("/bin/busybox", stage / "bin/busybox")
    (stage / "init").write_text(INIT)
    (stage / "init").chmod(0o755)
    (stage / "keep").write_text("\n".join(KEEP) + "\n")
    for name in order:
        src = f"/lib/modules/{version}/{paths[name]}"
        data = Path(src).read_bytes()
        if src.endswith(".xz"):
            import lzma

            data = lzma.decompress(data)
        elif src.endswith(".zst"):
            data = subprocess.run(["zstd", "-dc", src], capture_output=True, check=True).stdout
        (stage / "lib" / f"{name}.ko").write_bytes(data)
    (stage / "modules.order").write_text("\n".join(order) + "\n")
    files = subprocess.run(
        ["find", ".", "-mindepth", "1"], cwd=stage, capture_output=True, text=True, check=True
    ).stdout
    cpio = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        cwd=stage,
        input=files.encode(),
        capture_output=True,
        check=True,
    ).stdout
    out.write_bytes(gzip.compress(cpio, 6))
    shutil.rmtree(stage, ignore_errors=True)


@dataclass
class GuestResult:
    status: int | None  # the command's exit status; None if it never finished
    output: str
    console: str
    boot_seconds: float | None  # kernel start to the command about to run (guest uptime)
    wall_seconds: float


class GuestRun:
    """A guest booted with :meth:`start`, running in the background until :meth:`wait`."""

    def __init__(self, script: str, workdir: Path, memory: str = "1G", cpus: int = 2) -> None:
        import hashlib

        version = kernel_version()
        if version is None:
            raise RuntimeError(missing() or "no guest kernel")
        workdir.mkdir(parents=True, exist_ok=True)
        tag = hashlib.sha256(
            (version + INIT + " ".join(MODULES) + " ".join(KEEP)).encode()
        ).hexdigest()[:12]
        initrd = workdir / f"initramfs-{tag}.gz"
        if not initrd.exists():
            build_initramfs(version, initrd)
        self.exchange = workdir / "exchange"
        self.exchange.mkdir(exist_ok=True)
        (self.exchange / "cmd.sh").write_text(script)
        for f in ("status", "output", "booted"):
            (self.exchange / f).unlink(missing_ok=True)
        self.console = workdir / "console.log"
        self.argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            memory,
            "-smp",
            str(cpus),
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            f"file:{self.console}",
            "-kernel",
            f"/boot/vmlinuz-{version}",
            "-initrd",
            str(initrd),
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3",
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,id=hostroot",
            "-virtfs",
            f"local,path={self.exchange},mount_tag=exchange,security_model=passthrough,id=exchange",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> GuestRun:
        self.started = time.monotonic()
        with open(self.console.with_suffix(".err"), "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait(self) -> GuestResult:
        assert self.proc is not None, "start() first"
        try:
            rc = self.proc.wait()
        except BaseException:
            self.kill()
            raise
        wall = time.monotonic() - self.started

        def read(name: str) -> str:
            try:
                return (self.exchange / name).read_text()
            except FileNotFoundError:
                return ""

        status_text = read("status").strip()
        booted = read("booted").strip()
        cons = self.console.read_text(errors="replace") if self.console.exists() else ""
        if rc != 0:
            err = self.console.with_suffix(".err")
            cons += f"\nqemu exited {rc}: {err.read_text(errors='replace') if err.exists() else ''}"
        return GuestResult(
            status=int(status_text) if status_text else None,
            output=read("output"),
            console=cons,
            boot_seconds=float(booted) if booted else None,
            wall_seconds=wall,
        )


def run_in_guest(script: str, workdir: Path, memory: str = "1G", cpus: int = 2) -> GuestResult:
    """Boot, run ``script`` (sh) in the guest with the host's root, power off. Files the
    script writes under ``/mnt`` land in ``workdir/exchange``."""
    return GuestRun(script, workdir, memory, cpus).start().wait()
