"""The storage driver conformance suite: what "a driver works" means.

A pytest plugin (``-p pallet.testing.conformance``; pallet registers it through the
``pytest11`` entry point, so it is active wherever pallet is installed). In a test
module::

    from pallet.testing.conformance import DriverConformance

    class TestConformance(DriverConformance):
        drivers = ["mydriver"]      # default: every registered storage driver

Each test then runs once per driver, the driver's name in the test ID
(``TestConformance::test_whiteouts_and_opaque_dirs[mydriver]``), so ``-k conformance``
selects the suite and ``-k mydriver`` a driver; ``--pallet-driver NAME`` (repeatable)
narrows the drivers from the command line. A driver that needs a special root (btrfs:
a btrfs filesystem; devmapper: small pools) gets it from
:mod:`pallet.testing.envs`. A driver whose ``probe`` refuses the test root fails the
run with the reason: a conformance run never skips.

Everything mounted is unmounted by the fixtures, whatever happens.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pallet import archive, mount
from pallet.errors import Conflict, InvalidArgument, NotFound, PluginSkip
from pallet.snapshots import snapshot_changes
from pallet.storage import Kind, Mount, StorageDriver
from pallet.testing.envs import ENVIRONMENTS, DriverEnv

# --- plugin -----------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pallet", "pallet storage driver conformance")
    group.addoption(
        "--pallet-driver",
        action="append",
        default=[],
        metavar="NAME",
        help="run the storage driver conformance suite on this driver only (repeatable)",
    )


def registered_drivers() -> list[type[StorageDriver]]:
    """Every storage driver registered through the ``pallet.plugins`` entry points."""
    from pallet.plugin_manager import PluginManager

    pm = PluginManager()
    pm.load_entry_points()
    return sorted(pm.collect("pallet_storage_drivers_v1"), key=lambda c: c.name)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "storage_driver_cls" not in metafunc.fixturenames or not (
        metafunc.cls is not None and issubclass(metafunc.cls, DriverConformance)
    ):
        return
    wanted: list[str] | None = getattr(metafunc.cls, "drivers", None)
    chosen = metafunc.config.getoption("--pallet-driver", default=[]) or []
    classes = registered_drivers()
    if wanted is not None:
        classes = [c for c in classes if c.name in wanted]
        missing = set(wanted) - {c.name for c in classes}
        if missing:
            raise pytest.UsageError(f"storage drivers not registered: {', '.join(missing)}")
    if chosen:
        classes = [c for c in classes if c.name in chosen]
    metafunc.parametrize("storage_driver_cls", classes, ids=[c.name for c in classes])


class DriverEnvs:
    """The session's driver environments, each made on first use (a btrfs filesystem on
    a loop device...) and torn down at the end of the session."""

    def __init__(self, stack: contextlib.ExitStack, scratch: Path) -> None:
        self.stack = stack
        self.scratch = scratch
        self.made: dict[str, DriverEnv] = {}

    def get(self, name: str) -> DriverEnv:
        if name not in self.made:
            where = self.scratch / name
            factory = ENVIRONMENTS.get(name)
            if factory is None:
                where.mkdir(parents=True, exist_ok=True)
                self.made[name] = DriverEnv(where)
            else:
                self.made[name] = self.stack.enter_context(factory(where))
        return self.made[name]


@pytest.fixture(scope="session")
def pallet_driver_envs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DriverEnvs]:
    with contextlib.ExitStack() as stack:
        yield DriverEnvs(stack, tmp_path_factory.mktemp("pallet-envs"))


def driver_env(envs: DriverEnvs, name: str) -> DriverEnv:
    """The environment drivers named ``name`` run in (see :mod:`pallet.testing.envs`)."""
    return envs.get(name)


class DriverFactory:
    """Opens drivers of one class on fresh (or given) roots; closes them at the end."""

    def __init__(self, cls: type[StorageDriver], env: DriverEnv) -> None:
        self.cls = cls
        self.env = env
        self.opened: list[StorageDriver] = []

    def new_root(self) -> Path:
        return self.env.base / f"{self.cls.name}-{secrets.token_hex(4)}"

    def open(self, root: Path | None = None) -> StorageDriver:
        root = root if root is not None else self.new_root()
        opts = self.cls.Options.model_validate(self.env.options)
        try:
            self.cls.probe(root, opts)
        except PluginSkip as e:
            pytest.fail(f"{self.cls.name} cannot run under {root}: {e.reason}")
        d = self.cls(root, opts)
        self.opened.append(d)
        return d

    def close(self, d: StorageDriver) -> None:
        if d in self.opened:
            self.opened.remove(d)
            d.close()

    def close_all(self) -> None:
        while self.opened:
            self.opened.pop().close()


@pytest.fixture
def storage_drivers(
    storage_driver_cls: type[StorageDriver], pallet_driver_envs: DriverEnvs
) -> Iterator[DriverFactory]:
    f = DriverFactory(storage_driver_cls, driver_env(pallet_driver_envs, storage_driver_cls.name))
    try:
        yield f
    finally:
        f.close_all()


@pytest.fixture
def storage_driver(storage_drivers: DriverFactory) -> StorageDriver:
    return storage_drivers.open()


class Mounter:
    """Mounts snapshots under a directory and always unmounts them."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.active: list[str] = []

    @contextlib.contextmanager
    def __call__(self, mounts: list[Mount]) -> Iterator[Path]:
        target = self.base / f"mnt-{secrets.token_hex(4)}"
        target.mkdir(parents=True)
        mount.mount_all(mounts, str(target))
        self.active.append(str(target))
        try:
            yield target
        finally:
            mount.unmount(str(target))
            self.active.remove(str(target))
            target.rmdir()

    def release(self) -> None:
        for t in reversed(self.active):
            mount.unmount(t)


@pytest.fixture
def snapshot_mounter(tmp_path: Path) -> Iterator[Mounter]:
    m = Mounter(tmp_path / "mnt")
    try:
        yield m
    finally:
        m.release()
        leftovers = [
            line
            for line in Path("/proc/mounts").read_text().splitlines()
            if str(tmp_path / "mnt") in line
        ]
        assert not leftovers, f"mounts left behind: {leftovers}"


# --- helpers ------------------------------------------------------------------------------


def tar(*entries: dict[str, Any]) -> bytes:
    """A layer tar from entries ``{"name", "type", "data", "mode", "uid", ...}``."""
    buf = io.BytesIO()
    tw = archive.TarWriter(buf)
    for e in entries:
        kind = e.get("type", "file")
        data = e.get("data", b"")
        flag = {
            "file": b"0",
            "link": b"1",
            "symlink": b"2",
            "char": b"3",
            "block": b"4",
            "dir": b"5",
            "fifo": b"6",
        }[kind]
        tw.add(
            e["name"],
            flag,
            mode=e.get("mode", 0o755 if kind == "dir" else 0o644),
            uid=e.get("uid", 0),
            gid=e.get("gid", 0),
            size=len(data) if kind == "file" else 0,
            mtime=e.get("mtime", 1_600_000_000),
            linkname=e.get("target", ""),
            devmajor=e.get("major", 0),
            devminor=e.get("minor", 0),
            xattrs=e.get("xattrs"),
            data=io.BytesIO(data) if kind == "file" else None,
        )
    tw.close()
    return buf.getvalue()


def diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def add_layer(d: StorageDriver, parent: str | None, data: bytes, scratch: Path) -> str:
    """Apply a layer the way the Graph does; returns its chain ID (the snapshot name)."""
    key = f"tmp-{secrets.token_hex(4)}"
    d.prepare(key, parent)
    try:
        res = archive.apply_to_snapshot(d, key, io.BytesIO(data), scratch)
    except BaseException:
        d.remove(key)
        raise
    cid = archive.chain_id(parent, res.diff_id)
    try:
        d.commit(cid, key)
    except BaseException:
        d.remove(key)
        raise
    return cid


def add_chain(d: StorageDriver, layers: list[bytes], scratch: Path) -> str:
    top = None
    for data in layers:
        top = add_layer(d, top, data, scratch)
    assert top is not None
    return top


def fingerprint(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a layer tar carries about the tree under ``root``: type, mode, owner,
    mtime (not of directories, which a diff touches), content, link targets, device
    numbers, xattrs and hardlink groups."""
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            fmt = stat.S_IFMT(st.st_mode)
            content: Any = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            link = None
            if not stat.S_ISDIR(st.st_mode):
                inodes.setdefault(st.st_ino, []).append(rel)
                link = st.st_ino  # replaced below by the inode's group of paths
            xattrs = {
                k: os.getxattr(p, k, follow_symlinks=False)
                for k in sorted(os.listxattr(p, follow_symlinks=False))
                if not k.startswith("trusted.overlay.")
            }
            # whole seconds: what a layer tar keeps
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns // 1_000_000_000
            out[rel] = (
                fmt,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                mtime,
                content,
                st.st_rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0,
                tuple(xattrs.items()),
                link,
            )
    # hardlinks: the paths of the tree sharing an inode (what st_nlink says may count
    # links outside the tree, e.g. in an overlay's lower layer)
    for rel, fp in out.items():
        if fp[-1] is not None:
            group = inodes[fp[-1]]
            out[rel] = (*fp[:-1], tuple(sorted(group)) if len(group) > 1 else None)
    return out


def user_entries(fp: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """A fingerprint without what a filesystem puts at its root (ext4's lost+found)."""
    return {k: v for k, v in fp.items() if k != "lost+found" and not k.startswith("lost+found/")}


def supports_user_xattrs(directory: Path) -> bool:
    """Whether the filesystem of ``directory`` stores ``user.*`` xattrs on files."""
    probe = directory / f".xattr-probe-{secrets.token_hex(4)}"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def without_user_xattrs(fp: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    return {
        k: (*v[:7], tuple((n, x) for n, x in v[7] if not n.startswith("user.")), v[8])
        for k, v in fp.items()
    }


def assert_same_tree(got: dict[str, tuple[Any, ...]], want: dict[str, tuple[Any, ...]]) -> None:
    """Fingerprints equal, or an assertion naming the paths that differ."""
    diff = {
        p: (got.get(p), want.get(p))
        for p in sorted(set(got) | set(want))
        if got.get(p) != want.get(p)
    }
    assert not diff, f"trees differ (got, expected): {diff}"


CAP = bytes.fromhex("0100000200200000000000000000000000000000")
BASE = tar(
    {"name": "bin/", "type": "dir"},
    {"name": "bin/tool", "data": b"#!/bin/sh\necho tool\n", "mode": 0o4755, "uid": 0, "gid": 0},
    {"name": "bin/alias", "type": "symlink", "target": "tool"},
    {"name": "bin/hard", "type": "link", "target": "bin/tool"},
    {"name": "bin/ping", "data": b"ping", "mode": 0o755, "xattrs": {"security.capability": CAP}},
    {"name": "home/", "type": "dir", "mode": 0o755, "mtime": 1_500_000_000},
    {
        "name": "home/user/",
        "type": "dir",
        "mode": 0o700,
        "uid": 1000,
        "gid": 1000,
        "mtime": 1_400_000_000,
    },
    {
        "name": "home/user/.profile",
        "data": b"export X=1\n",
        "mode": 0o600,
        "uid": 1000,
        "gid": 1000,
    },
    {"name": "dev/", "type": "dir"},
    {"name": "dev/null", "type": "char", "major": 1, "minor": 3, "mode": 0o666},
    {"name": "dev/sda", "type": "block", "major": 8, "minor": 0, "mode": 0o660, "gid": 6},
    {"name": "dev/pipe", "type": "fifo", "mode": 0o620},
    {"name": "etc/", "type": "dir"},
    {
        "name": "etc/attrs",
        "data": b"a",
        "xattrs": {"user.note": b"hello", "trusted.t": b"\x00\x01"},
    },
    {"name": "etc/mtab", "type": "symlink", "target": "/proc/mounts"},
    {"name": "etc/big", "data": bytes(range(256)) * 1024, "mode": 0o640},
)


def check_base(root: Path) -> None:
    """``BASE`` reads back bit-exact under ``root``."""
    tool = (root / "bin/tool").lstat()
    assert (stat.S_IMODE(tool.st_mode), tool.st_uid, tool.st_gid) == (0o4755, 0, 0)
    assert tool.st_mtime == 1_600_000_000
    assert (root / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    assert os.readlink(root / "bin/alias") == "tool"
    assert (root / "bin/hard").lstat().st_ino == tool.st_ino
    assert os.getxattr(root / "bin/ping", "security.capability") == CAP
    user = (root / "home/user").lstat()
    assert (stat.S_IMODE(user.st_mode), user.st_uid, user.st_gid) == (0o700, 1000, 1000)
    assert user.st_mtime == 1_400_000_000
    assert (root / "home").lstat().st_mtime == 1_500_000_000
    prof = (root / "home/user/.profile").lstat()
    assert (prof.st_uid, stat.S_IMODE(prof.st_mode)) == (1000, 0o600)
    null = (root / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    sda = (root / "dev/sda").lstat()
    assert stat.S_ISBLK(sda.st_mode) and sda.st_rdev == os.makedev(8, 0) and sda.st_gid == 6
    assert stat.S_ISFIFO((root / "dev/pipe").lstat().st_mode)
    assert os.getxattr(root / "etc/attrs", "user.note") == b"hello"
    assert os.getxattr(root / "etc/attrs", "trusted.t") == b"\x00\x01"
    assert os.readlink(root / "etc/mtab") == "/proc/mounts"
    big = root / "etc/big"
    assert big.read_bytes() == bytes(range(256)) * 1024
    assert stat.S_IMODE(big.lstat().st_mode) == 0o640


# --- the suite ------------------------------------------------------------------------------


class DriverConformance:
    """Subclass in a test module (named ``Test...``) to run the suite."""

    drivers: list[str] | None = None  # driver names; None: every registered driver

    # --- layers, content

    def test_apply_mount_and_read_back(
        self, storage_driver: StorageDriver, snapshot_mounter: Mounter, tmp_path: Path
    ) -> None:
        d, mounted = storage_driver, snapshot_mounter
        top = add_layer(d, None, BASE, tmp_path)
        assert d.stat(top).kind == Kind.COMMITTED
        with mounted(d.prepare("ctr", top)) as root:
            check_base(root)
            (root / "bin/tool").write_bytes(b"changed")
            (root / "newfile").write_text("container data")
        with mounted(d.view("v", top)) as root:
            check_base(root)  # the layer itself is untouched by the container
            assert not (root / "newfile").exists()
        with mounted(d.mounts("ctr")) as root:
            assert (root / "newfile").read_text() == "container data"
            assert (root / "bin/tool").read_bytes() == b"changed"

    def test_apply_through_a_mount(
        self,
        storage_driver: StorageDriver,
        snapshot_mounter: Mounter,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Layers applied on a mount of the snapshot (no fast path) come out the same."""
        d = storage_driver
        monkeypatch.setattr(d, "apply_target", lambda key: None)
        top = add_chain(
            d, [BASE, tar({"name": ".wh.etc"}, {"name": "new", "data": b"n"})], tmp_path
        )
        monkeypatch.undo()
        with snapshot_mounter(d.view("v", top)) as root:
            assert not (root / "etc").exists() and (root / "new").read_text() == "n"
            assert (root / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("mnt-")]

    def test_whiteouts_and_opaque_dirs_across_layers(
        self, storage_driver: StorageDriver, snapshot_mounter: Mounter, tmp_path: Path
    ) -> None:
        d, mounted = storage_driver, snapshot_mounter
        l1 = tar(
            {"name": "a/", "type": "dir"},
            {"name": "a/x", "data": b"x1"},
            {"name": "a/y", "data": b"y1"},
            {"name": "b/", "type": "dir"},
            {"name": "b/old1", "data": b"o"},
            {"name": "b/sub/", "type": "dir"},
            {"name": "b/sub/deep", "data": b"d"},
            {"name": "c", "data": b"c1"},
            {"name": "d/", "type": "dir"},
            {"name": "d/keep", "data": b"k"},
        )
        l2 = tar(
            {"name": ".wh.c"},
            {"name": "a/.wh.x"},
            {"name": "b/", "type": "dir"},
            {"name": "b/.wh..wh..opq"},
            {"name": "b/new", "data": b"n2"},
            {"name": "e", "data": b"e2"},
        )
        l3 = tar(
            {"name": "c/", "type": "dir"},  # c comes back, as a directory
            {"name": "c/inside", "data": b"i3"},
            {"name": "a/x", "data": b"x3"},  # x comes back
            {"name": ".wh.d"},
            {"name": "b/.wh.new"},
            {"name": "b/newer", "data": b"n3"},
        )
        l4 = tar({"name": "d/", "type": "dir"}, {"name": "d/fresh", "data": b"f4"})
        top = add_chain(d, [l1, l2, l3, l4], tmp_path)
        with mounted(d.prepare("ctr", top)) as root:
            assert sorted(user_entries({n: () for n in os.listdir(root)})) == [
                "a",
                "b",
                "c",
                "d",
                "e",
            ]
            assert sorted(os.listdir(root / "a")) == ["x", "y"]
            assert (root / "a/x").read_bytes() == b"x3"
            assert sorted(os.listdir(root / "b")) == ["newer"]
            assert (root / "c").is_dir() and (root / "c/inside").read_bytes() == b"i3"
            assert sorted(os.listdir(root / "d")) == ["fresh"], "a deleted dir comes back empty"
            # and a container can delete lower content too
            os.unlink(root / "a/y")
            shutil.rmtree(root / "c")
        with mounted(d.mounts("ctr")) as root:
            assert sorted(user_entries({n: () for n in os.listdir(root)})) == ["a", "b", "d", "e"]
        # the intermediate layer on its own
        l2_chain = archive.chain_id(archive.chain_id(None, diff_id(l1)), diff_id(l2))
        with mounted(d.view("v2", l2_chain)) as root:
            assert sorted(user_entries({n: () for n in os.listdir(root)})) == ["a", "b", "d", "e"]
            assert sorted(os.listdir(root / "b")) == ["new"]

    def test_deep_chain(
        self, storage_driver: StorageDriver, snapshot_mounter: Mounter, tmp_path: Path
    ) -> None:
        """100 layers stack (overlay: more lower directories than fit a page of mount
        options with absolute paths under a long root)."""
        d = storage_driver
        depth = 100
        top = None
        for i in range(depth):
            top = add_layer(d, top, tar({"name": f"f{i:03d}", "data": str(i).encode()}), tmp_path)
        assert top is not None
        with snapshot_mounter(d.prepare("ctr", top)) as mnt:
            names = sorted(user_entries({n: () for n in os.listdir(mnt)}))
            assert names == [f"f{i:03d}" for i in range(depth)]
            assert (mnt / "f000").read_text() == "0" and (mnt / "f099").read_text() == "99"
            (mnt / "f050").write_text("changed")
        with snapshot_mounter(d.view("v", top)) as mnt:
            assert (mnt / "f050").read_text() == "50"
        with snapshot_mounter(d.mounts("ctr")) as mnt:
            assert (mnt / "f050").read_text() == "changed"

    # --- the snapshot contract

    def test_lifecycle_and_errors(
        self, storage_driver: StorageDriver, snapshot_mounter: Mounter, tmp_path: Path
    ) -> None:
        d, mounted = storage_driver, snapshot_mounter
        base = add_layer(d, None, BASE, tmp_path)
        mounts = d.prepare("active", base)
        assert mounts == d.mounts("active")
        with pytest.raises(Conflict):
            d.prepare("active", base)
        with pytest.raises(Conflict):
            d.view("active", base)
        with pytest.raises(NotFound):
            d.prepare("x", "no-such-parent")
        with pytest.raises(NotFound):
            d.mounts("nope")
        with pytest.raises(NotFound):
            d.stat("nope")
        with pytest.raises(NotFound):
            d.remove("nope")
        with pytest.raises(NotFound):
            d.commit("name", "nope")
        with pytest.raises(InvalidArgument):
            d.prepare("x", "active")  # the parent must be committed
        with pytest.raises(Conflict):
            d.commit(base, "active")  # the name is taken
        info = d.stat("active")
        assert (info.key, info.kind, info.parent) == ("active", Kind.ACTIVE, base)

        with mounted(d.mounts("active")) as root:
            (root / "added").write_bytes(b"z" * 10_000)
        d.commit("layer2", "active")
        with pytest.raises(NotFound):
            d.stat("active")
        assert d.stat("layer2").kind == Kind.COMMITTED
        with pytest.raises(InvalidArgument):
            d.mounts("layer2")
        with pytest.raises(InvalidArgument):
            d.apply_target("layer2")

        d.view("view", "layer2")
        assert d.stat("view").kind == Kind.VIEW
        with pytest.raises(InvalidArgument):
            d.commit("x", "view")
        with mounted(d.mounts("view")) as root:
            assert (root / "added").stat().st_size == 10_000
            with pytest.raises(OSError) as e:
                (root / "write").write_text("no")
            assert e.value.errno == errno.EROFS

        with pytest.raises(Conflict):
            d.remove(base)  # has children
        with pytest.raises(Conflict):
            d.remove("layer2")  # a view stands on it
        assert {(i.key, i.kind, i.parent) for i in d.walk()} == {
            (base, Kind.COMMITTED, None),
            ("layer2", Kind.COMMITTED, base),
            ("view", Kind.VIEW, "layer2"),
        }
        d.remove("view")
        d.remove("layer2")
        d.remove(base)
        assert list(d.walk()) == []

    def test_snapshots_without_parent(
        self, storage_driver: StorageDriver, snapshot_mounter: Mounter
    ) -> None:
        d, mounted = storage_driver, snapshot_mounter
        with mounted(d.prepare("scratch", None)) as root:
            assert user_entries({n: () for n in os.listdir(root)}) == {}
            (root / "f").write_text("1")
        d.commit("one", "scratch")
        with mounted(d.view("v0", None)) as root:
            assert user_entries({n: () for n in os.listdir(root)}) == {}
        with mounted(d.view("v1", "one")) as root:
            assert (root / "f").read_text() == "1"

    def test_usage_counts_own_content(
        self, storage_driver: StorageDriver, snapshot_mounter: Mounter, tmp_path: Path
    ) -> None:
        d = storage_driver
        base = add_layer(
            d,
            None,
            tar({"name": "big", "data": b"b" * 100_000}, {"name": "small", "data": b"s"}),
            tmp_path,
        )
        mounts = d.prepare("ctr", base)
        # a filesystem on a block device (devmapper) adds its metadata and journal blocks,
        # and cannot count inodes without mounting
        block = mounts[0].source.startswith("/dev/")
        slack = 32 << 20 if block else 0
        u = d.usage(base)
        assert 100_000 <= u.size < 1_000_000 + slack, u
        if not block:
            assert u.inodes >= 2
        with snapshot_mounter(mounts) as root:
            (root / "new").write_bytes(os.urandom(50_000))
            os.link(root / "new", root / "new-link")
        u = d.usage("ctr")
        assert u.size >= 50_000, "the container's own data counts"
        if not block:
            assert u.inodes >= 1
        if d.name != "vfs":  # vfs copies the parent; the others share it
            assert u.size < 100_000 + 50_000 + slack, "the parent's data is not counted again"
        with pytest.raises(NotFound):
            d.usage("nope")

    def test_concurrent_prepares_of_one_parent(
        self, storage_driver: StorageDriver, snapshot_mounter: Mounter, tmp_path: Path
    ) -> None:
        driver, mounted = storage_driver, snapshot_mounter
        base = add_layer(driver, None, BASE, tmp_path)
        errors: list[BaseException] = []
        results: dict[str, list[Mount]] = {}
        start = threading.Barrier(6)

        def work(i: int) -> None:
            try:
                start.wait()
                results[f"c{i}"] = driver.prepare(f"c{i}", base)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len({tuple(m) for m in results.values()}) == 6, "each has its own snapshot"
        for key, mounts in results.items():
            with mounted(mounts) as root:
                check_base(root)
                (root / "who").write_text(key)
        for key in results:
            with mounted(driver.mounts(key)) as root:
                assert (root / "who").read_text() == key

        # and racing on the same key: exactly one wins
        won: list[str] = []
        lost: list[BaseException] = []
        start2 = threading.Barrier(4)

        def race() -> None:
            start2.wait()
            try:
                driver.prepare("same", base)
                won.append("x")
            except Conflict as e:
                lost.append(e)

        threads = [threading.Thread(target=race) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(lost) == 3

    def test_reopen_existing_root(
        self, storage_drivers: DriverFactory, snapshot_mounter: Mounter, tmp_path: Path
    ) -> None:
        """A daemon restart: the same root opened again keeps every snapshot."""
        mounted = snapshot_mounter
        root = storage_drivers.new_root()
        d1 = storage_drivers.open(root)
        base = add_layer(d1, None, BASE, tmp_path)
        d1.prepare("ctr", base)
        with mounted(d1.mounts("ctr")) as mnt:
            (mnt / "state").write_text("persisted")
        before = sorted((i.key, i.kind, i.parent) for i in d1.walk())
        storage_drivers.close(d1)

        d2 = storage_drivers.open(root)
        d2.cleanup()
        assert sorted((i.key, i.kind, i.parent) for i in d2.walk()) == before
        with mounted(d2.mounts("ctr")) as mnt:
            assert (mnt / "state").read_text() == "persisted"
            check_base(mnt)
        child = add_layer(d2, base, tar({"name": "more", "data": b"m"}), tmp_path)
        with mounted(d2.view("v", child)) as mnt:
            assert (mnt / "more").read_text() == "m"

    def test_diff_and_commit_apply_identically_elsewhere(
        self, storage_driver: StorageDriver, snapshot_mounter: Mounter, tmp_path: Path
    ) -> None:
        """A container's changes (A/C/D), its diff tar committed as a layer here and
        applied by the plain vfs snapshotter: both give the same tree."""
        # the reference: the plain-copy driver, found as a plugin like any other
        ref_cls = next(c for c in registered_drivers() if c.name == "vfs")

        d, mounted = storage_driver, snapshot_mounter
        base = add_layer(d, None, BASE, tmp_path)
        with mounted(d.prepare("ctr", base)) as root:
            (root / "bin/tool").write_bytes(b"patched")  # C (and bin C)
            os.chmod(root / "bin/tool", 0o4711)
            os.unlink(root / "bin/alias")  # D
            shutil.rmtree(root / "home/user")  # D (a whole directory)
            (root / "new").mkdir()  # A
            (root / "new/file").write_bytes(b"fresh")  # A
            os.symlink("../bin/tool", root / "new/link")  # A
            os.link(root / "new/file", root / "new/hard")  # A (a hardlink)
            os.setxattr(root / "etc/attrs", "user.note", b"changed")  # C by xattr
            os.mkfifo(root / "new/fifo", 0o600)  # A
            os.mknod(root / "new/dev", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # A
            expected = user_entries(fingerprint(root))
        got = {p: k for p, k in snapshot_changes(d, "ctr", tmp_path / "scratch")}
        assert got["/bin/tool"] == 0 and got["/bin"] == 0
        assert got["/bin/alias"] == 2 and got["/home/user"] == 2 and got["/home"] == 0
        assert got["/new"] == 1 and got["/new/file"] == 1 and got["/new/link"] == 1
        assert got["/new/hard"] == 1 and got["/new/fifo"] == 1 and got["/new/dev"] == 1
        assert got["/etc/attrs"] == 0
        assert "/home/user/.profile" not in got, "inside a deleted dir: not listed"
        assert "/dev/null" not in got and "/etc/big" not in got

        buf = io.BytesIO()
        archive.diff_snapshot(d, "ctr", buf, tmp_path / "scratch")
        layer = buf.getvalue()
        committed = add_layer(d, base, layer, tmp_path)
        with mounted(d.view("v", committed)) as root:
            assert_same_tree(user_entries(fingerprint(root)), expected)
        other = ref_cls(tmp_path / "vfs", ref_cls.Options())
        try:
            obase = add_layer(other, None, BASE, tmp_path)
            ocommitted = add_layer(other, obase, layer, tmp_path)
            assert ocommitted == committed, "same content, same chain ID"
            with mounted(other.view("v", ocommitted)) as root:
                want = expected
                if not supports_user_xattrs(tmp_path):  # tmpfs before Linux 6.6
                    want = without_user_xattrs(expected)
                assert_same_tree(fingerprint(root), want)
        finally:
            other.close()
        # committing the container itself keeps its changes, and its parent
        d.commit("ctr-layer", "ctr")
        assert d.stat("ctr-layer").parent == base
        with mounted(d.view("v2", "ctr-layer")) as root:
            assert_same_tree(user_entries(fingerprint(root)), expected)

    def test_remove_with_users_refused(
        self, storage_driver: StorageDriver, snapshot_mounter: Mounter, tmp_path: Path
    ) -> None:
        d = storage_driver
        base = add_layer(d, None, BASE, tmp_path)
        d.prepare("c1", base)
        with pytest.raises(Conflict):
            d.remove(base)
        d.remove("c1")
        d.view("v", base)
        with pytest.raises(Conflict):
            d.remove(base)
        d.remove("v")
        d.remove(base)
        assert list(d.walk()) == []

    def test_status_lines(self, storage_driver: StorageDriver) -> None:
        status = storage_driver.status()
        assert status, "pallet info shows the driver's status lines"
        for k, v in status:
            assert isinstance(k, str) and isinstance(v, str) and k
