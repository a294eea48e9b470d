"""The storage driver conformance suite: what "a driver works" means.

Parametrised over every driver registered through the ``pallet.plugins`` entry points
that can work on this host (its ``probe`` passes under the test's root); each test
runs once per driver, the driver's name in the test ID. Everything mounted is
unmounted by the fixtures, whatever happens.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pallet import archive, mount
from pallet.errors import Conflict, InvalidArgument, NotFound, PluginSkip
from pallet.plugin_manager import PluginManager
from pallet.storage import Kind, Mount, StorageDriver

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="storage drivers need root")


def registered_drivers() -> list[type[StorageDriver]]:
    pm = PluginManager()
    pm.load_entry_points()
    return sorted(pm.collect("pallet_storage_drivers_v1"), key=lambda c: c.name)


DRIVERS = registered_drivers()


def test_both_builtin_drivers_are_registered() -> None:
    assert {"vfs", "overlay"} <= {d.name for d in DRIVERS}


@pytest.fixture(params=DRIVERS, ids=[d.name for d in DRIVERS])
def driver_cls(request: pytest.FixtureRequest) -> type[StorageDriver]:
    return request.param  # type: ignore[no-any-return]


def open_driver(cls: type[StorageDriver], root: Path) -> StorageDriver:
    opts = cls.Options()
    try:
        cls.probe(root, opts)
    except PluginSkip as e:
        pytest.skip(f"{cls.name}: {e.reason}")
    return cls(root, opts)


@pytest.fixture
def driver(driver_cls: type[StorageDriver], tmp_path: Path) -> Iterator[StorageDriver]:
    d = open_driver(driver_cls, tmp_path / "driver")
    yield d
    d.close()


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
def mounted(tmp_path: Path) -> Iterator[Mounter]:
    m = Mounter(tmp_path / "mnt")
    try:
        yield m
    finally:
        m.release()
        leftovers = [
            line for line in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in line
        ]
        assert not leftovers, f"mounts left behind: {leftovers}"


def tar(*entries: dict[str, Any]) -> bytes:
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
    d.commit(cid, key)
    return cid


def add_chain(d: StorageDriver, layers: list[bytes], scratch: Path) -> str:
    top = None
    for data in layers:
        top = add_layer(d, top, data, scratch)
    assert top is not None
    return top


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
)


def check_base(root: Path) -> None:
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


# --- layers, content ------------------------------------------------------------------


def test_apply_mount_and_read_back(driver: StorageDriver, mounted: Mounter, tmp_path: Path) -> None:
    top = add_layer(driver, None, BASE, tmp_path)
    assert driver.stat(top).kind == Kind.COMMITTED
    with mounted(driver.prepare("ctr", top)) as root:
        check_base(root)
        (root / "bin/tool").write_bytes(b"changed")
        (root / "newfile").write_text("container data")
    with mounted(driver.view("v", top)) as root:
        check_base(root)  # the layer itself is untouched by the container
        assert not (root / "newfile").exists()
    with mounted(driver.mounts("ctr")) as root:
        assert (root / "newfile").read_text() == "container data"
        assert (root / "bin/tool").read_bytes() == b"changed"


def test_apply_through_a_mount(
    driver: StorageDriver, mounted: Mounter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver without apply_target gets layers applied on a mount of the snapshot."""
    monkeypatch.setattr(driver, "apply_target", lambda key: None)
    top = add_chain(
        driver, [BASE, tar({"name": ".wh.etc"}, {"name": "new", "data": b"n"})], tmp_path
    )
    monkeypatch.undo()
    with mounted(driver.view("v", top)) as root:
        assert not (root / "etc").exists() and (root / "new").read_text() == "n"
        assert (root / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("mnt-")]


def test_whiteouts_and_opaque_dirs_across_layers(
    driver: StorageDriver, mounted: Mounter, tmp_path: Path
) -> None:
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
    top = add_chain(driver, [l1, l2, l3, l4], tmp_path)
    with mounted(driver.prepare("ctr", top)) as root:
        assert sorted(os.listdir(root)) == ["a", "b", "c", "d", "e"]
        assert sorted(os.listdir(root / "a")) == ["x", "y"]
        assert (root / "a/x").read_bytes() == b"x3"
        assert sorted(os.listdir(root / "b")) == ["newer"]
        assert (root / "c").is_dir() and (root / "c/inside").read_bytes() == b"i3"
        assert sorted(os.listdir(root / "d")) == ["fresh"], "a deleted dir comes back empty"
        # and a container can delete lower content too
        os.unlink(root / "a/y")
        shutil.rmtree(root / "c")
    with mounted(driver.mounts("ctr")) as root:
        assert sorted(os.listdir(root)) == ["a", "b", "d", "e"]
    # the intermediate layer on its own
    l2_chain = archive.chain_id(archive.chain_id(None, _diff_id(l1)), _diff_id(l2))
    with mounted(driver.view("v2", l2_chain)) as root:
        assert sorted(os.listdir(root)) == ["a", "b", "d", "e"]
        assert sorted(os.listdir(root / "b")) == ["new"]


def _diff_id(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_deep_chain_mounts(driver_cls: type[StorageDriver], mounted: Mounter) -> None:
    # Overlay lower dirs are named by short links under the root, and mount(2) takes one
    # page of options, so the depth a chain can reach depends on the root's path length:
    # each layer costs len(root) + 12 bytes. This root is as long as the default
    # /var/lib/pallet/overlay (23 characters), where ~109 layers fit.
    root = Path(tempfile.mkdtemp(prefix="pallet-ov", dir="/tmp"))
    assert len(str(root)) <= len("/var/lib/pallet/overlay")
    try:
        d = open_driver(driver_cls, root)
        depth = 100
        top = None
        for i in range(depth):
            top = add_layer(d, top, tar({"name": f"f{i:03d}", "data": str(i).encode()}), root)
        assert top is not None
        with mounted(d.prepare("ctr", top)) as mnt:
            names = sorted(os.listdir(mnt))
            assert names == [f"f{i:03d}" for i in range(depth)]
            assert (mnt / "f000").read_text() == "0" and (mnt / "f099").read_text() == "99"
            (mnt / "f050").write_text("changed")
        with mounted(d.view("v", top)) as mnt:
            assert (mnt / "f050").read_text() == "50"
        d.close()
    finally:
        shutil.rmtree(root)


def test_overlay_too_deep_for_a_page_is_refused(tmp_path: Path) -> None:
    cls = next((c for c in DRIVERS if c.name == "overlay"), None)
    if cls is None:
        pytest.skip("no overlay driver")
    # a long root: each lower dir costs len(root) + 12 bytes of mount options
    root = tmp_path / ("x" * 200) / "d"
    d = open_driver(cls, root)
    top = None
    refused = None
    for i in range(40):
        try:
            top = add_layer(d, top, tar({"name": f"f{i}", "data": b"x"}), tmp_path)
        except InvalidArgument as e:
            refused = e
            break
    assert refused is not None and "max depth exceeded" in refused.message
    with pytest.raises(InvalidArgument, match="max depth exceeded"):
        d.prepare("ctr", top)
    assert "ctr" not in {i.key for i in d.walk()}
    assert not list((root / "tmp").iterdir()), "nothing half made"
    d.close()


# --- the snapshot contract ---------------------------------------------------------------


def test_lifecycle_and_errors(driver: StorageDriver, mounted: Mounter, tmp_path: Path) -> None:
    d = driver
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


def test_snapshots_without_parent(driver: StorageDriver, mounted: Mounter) -> None:
    d = driver
    with mounted(d.prepare("scratch", None)) as root:
        assert os.listdir(root) == []
        (root / "f").write_text("1")
    d.commit("one", "scratch")
    with mounted(d.view("v0", None)) as root:
        assert os.listdir(root) == []
    with mounted(d.view("v1", "one")) as root:
        assert (root / "f").read_text() == "1"


def test_usage_counts_own_content(driver: StorageDriver, mounted: Mounter, tmp_path: Path) -> None:
    d = driver
    base = add_layer(
        d,
        None,
        tar({"name": "big", "data": b"b" * 100_000}, {"name": "small", "data": b"s"}),
        tmp_path,
    )
    u = d.usage(base)
    assert 100_001 <= u.size < 110_000 and u.inodes >= 2
    with mounted(d.prepare("ctr", base)) as root:
        (root / "new").write_bytes(b"n" * 5000)
        os.link(root / "new", root / "new-link")
    u = d.usage("ctr")
    if d.name == "overlay":
        assert 5000 <= u.size < 6000, "only the container's own layer"
    else:
        assert u.size >= 105_000, "vfs copies the parent"
    with pytest.raises(NotFound):
        d.usage("nope")


def test_concurrent_prepares_of_one_parent(
    driver: StorageDriver, mounted: Mounter, tmp_path: Path
) -> None:
    base = add_layer(driver, None, BASE, tmp_path)
    errors: list[BaseException] = []
    results: dict[str, list[Mount]] = {}
    start = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            start.wait()
            results[f"c{i}"] = driver.prepare(f"c{i}", base)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({tuple(m) for m in results.values()}) == 8, "each has its own snapshot"
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
    start2 = threading.Barrier(6)

    def race() -> None:
        start2.wait()
        try:
            driver.prepare("same", base)
            won.append("x")
        except Conflict as e:
            lost.append(e)

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 5


def test_reopen_existing_root(
    driver_cls: type[StorageDriver], mounted: Mounter, tmp_path: Path
) -> None:
    root = tmp_path / "driver"
    d1 = open_driver(driver_cls, root)
    base = add_layer(d1, None, BASE, tmp_path)
    d1.prepare("ctr", base)
    with mounted(d1.mounts("ctr")) as mnt:
        (mnt / "state").write_text("persisted")
    before = sorted((i.key, i.kind, i.parent) for i in d1.walk())
    d1.close()

    d2 = open_driver(driver_cls, root)
    d2.cleanup()
    assert sorted((i.key, i.kind, i.parent) for i in d2.walk()) == before
    with mounted(d2.mounts("ctr")) as mnt:
        assert (mnt / "state").read_text() == "persisted"
        check_base(mnt)
    child = add_layer(d2, base, tar({"name": "more", "data": b"m"}), tmp_path)
    with mounted(d2.view("v", child)) as mnt:
        assert (mnt / "more").read_text() == "m"
    d2.close()


def test_cleanup_removes_half_made_state(
    driver: StorageDriver, mounted: Mounter, tmp_path: Path
) -> None:
    d = driver
    base = add_layer(d, None, BASE, tmp_path)
    root = d.root
    # a crash in the middle of a prepare: a temp dir; after the rename: a dir with no row
    (root / "tmp" / ("a" * 64) / "diff").mkdir(parents=True)
    orphan = secrets.token_hex(32)
    parent_of_dirs = next(p for p in root.rglob("*") if p.is_dir() and len(p.name) == 64).parent
    (parent_of_dirs / orphan / "diff").mkdir(parents=True)
    if d.name == "overlay":
        os.symlink(f"../{orphan}/diff", root / "l" / "ORPHAN00")
    d.cleanup()
    assert list((root / "tmp").iterdir()) == []
    assert not (parent_of_dirs / orphan).exists()
    assert not (root / "l" / "ORPHAN00").exists()
    with mounted(d.view("v", base)) as mnt:
        check_base(mnt)


def test_failed_create_leaves_nothing(
    driver: StorageDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = driver
    base = add_layer(d, None, BASE, tmp_path)
    before = sorted(p.name for p in d.root.iterdir())

    def boom(*a: Any) -> None:
        raise OSError(errno.EIO, "injected failure")

    target: Callable[..., Any] = boom
    monkeypatch.setattr(d, "_placed", target)  # after the rename, inside the transaction
    with pytest.raises(OSError, match="injected"):
        d.prepare("ctr", base)
    monkeypatch.undo()
    assert [i.key for i in d.walk()] == [base]
    assert sorted(p.name for p in d.root.iterdir()) == before
    assert list((d.root / "tmp").iterdir()) == []
    d.prepare("ctr", base)  # and the key is free


def test_driver_status(driver: StorageDriver) -> None:
    status = dict(driver.status())
    if driver.name == "overlay":
        assert status["Backing Filesystem"] in ("extfs", "xfs", "btrfs", "tmpfs")
        assert status["Native Overlay Diff"] == "true"


def test_overlay_layers_are_shared_not_copied(tmp_path: Path, mounted: Mounter) -> None:
    cls = next((c for c in DRIVERS if c.name == "overlay"), None)
    if cls is None:
        pytest.skip("no overlay driver")
    d = open_driver(cls, tmp_path / "d")
    base = add_layer(d, None, tar({"name": "big", "data": b"x" * 1_000_000}), tmp_path)
    mounts = d.prepare("ctr", base)
    assert mounts[0].type == "overlay"
    assert d.usage("ctr").size == 0
    opts = dict(o.split("=", 1) for o in mounts[0].options if "=" in o)
    assert (
        opts["lowerdir"]
        == f"{d.root}/l/"
        + (
            d.root / (d.store.one("SELECT id FROM snapshots WHERE key=?", (base,))["id"]) / "link"
        ).read_text()
    )  # type: ignore[attr-defined]
    meta = d.metadata(base)  # type: ignore[attr-defined]
    assert meta["UpperDir"].endswith("/diff")
    d.close()


def test_overlay_probe_refuses_overlay_root(tmp_path: Path) -> None:
    cls = next((c for c in DRIVERS if c.name == "overlay"), None)
    if cls is None:
        pytest.skip("no overlay driver")
    for sub in ("lower", "upper", "work", "merged"):
        (tmp_path / sub).mkdir()
    mount.mount_all(
        [
            Mount(
                "overlay",
                "overlay",
                (
                    f"lowerdir={tmp_path / 'lower'}",
                    f"upperdir={tmp_path / 'upper'}",
                    f"workdir={tmp_path / 'work'}",
                ),
            )
        ],
        str(tmp_path / "merged"),
    )
    try:
        with pytest.raises(PluginSkip, match="overlayfs"):
            cls.probe(tmp_path / "merged" / "root", cls.Options())
    finally:
        mount.unmount(str(tmp_path / "merged"))
