"""pallet.graph: the image store, on every storage driver that works here."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pallet import archive, mount
from pallet.errors import Conflict, InvalidArgument, NotFound, PluginSkip
from pallet.graph import Graph, apply_changes, canonical_json, format_time, parse_time
from pallet.plugin_manager import PluginManager
from pallet.reference import parse_tagged
from pallet.storage import Kind, StorageDriver
from pallet.testing.conformance import DriverEnvs, driver_env
from pallet.testing.envs import ENVIRONMENTS, DriverEnv

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the graph's drivers need root")


def registered_drivers() -> list[type[StorageDriver]]:
    pm = PluginManager()
    pm.load_entry_points()
    return sorted(pm.collect("pallet_storage_drivers_v1"), key=lambda c: c.name)


# devmapper needs device-mapper: the Graph runs on it in the QEMU guest's daemon scenario
# (tests/test_devmapper_guest.py)
DRIVERS = [d for d in registered_drivers() if d.name != "devmapper"]


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def busybox_layer(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A busybox rootfs made from the host's /bin/busybox, tarred by GNU tar."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed")
    root = tmp_path_factory.mktemp("busybox") / "rootfs"
    for d in ("bin", "etc", "tmp", "root", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy2(busybox, root / "bin/busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for name in applets.stdout.split():
        if name != "busybox" and not (root / "bin" / name).exists():
            os.symlink("busybox", root / "bin" / name)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    out = subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", "-", "."],
        capture_output=True,
        check=True,
    )
    return out.stdout


def tar(*entries: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    tw = archive.TarWriter(buf)
    for name, data in entries:
        if name.endswith("/"):
            tw.add(name, b"5", mode=0o755, mtime=1_600_000_000)
        else:
            tw.add(
                name, b"0", mode=0o644, size=len(data), mtime=1_600_000_000, data=io.BytesIO(data)
            )
    tw.close()
    return buf.getvalue()


class Recorder:
    """Stands in for the pluggy hook relay: records the observer calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def pallet_image_event(self, *, action: str, image_id: str, ref: str | None) -> None:
        self.calls.append(("image", action, image_id, ref or ""))

    def pallet_layer_event(self, *, action: str, chain_id: str) -> None:
        self.calls.append(("layer", action, chain_id))


@pytest.fixture(params=DRIVERS, ids=[d.name for d in DRIVERS])
def driver_cls(request: pytest.FixtureRequest) -> type[StorageDriver]:
    return request.param  # type: ignore[no-any-return]


class Env:
    """A graph on a driver under tmp_path, re-openable like a daemon restart."""

    def __init__(self, cls: type[StorageDriver], tmp: Path, env: DriverEnv | None = None) -> None:
        self.cls = cls
        self.tmp = tmp
        # btrfs: the driver root on a btrfs filesystem (pallet.testing.envs)
        self.driver_root = (env.base / tmp.name if env else tmp) / "driver"
        self.options = env.options if env else {}
        self.hook = Recorder()
        self.driver: StorageDriver
        self.graph: Graph
        self.mounts: list[str] = []
        self.open()

    def open(self) -> None:
        opts = self.cls.Options.model_validate(self.options)
        try:
            self.cls.probe(self.driver_root, opts)
        except PluginSkip as e:
            pytest.skip(e.reason)
        self.driver = self.cls(self.driver_root, opts)
        self.graph = Graph(self.tmp / "graph", self.driver, self.hook)

    def close(self) -> None:
        self.graph.close()
        self.driver.close()

    def restart(self) -> None:
        self.close()
        self.open()
        self.driver.cleanup()
        self.graph.cleanup()

    @contextlib.contextmanager
    def mounted(self, container_id: str) -> Iterator[Path]:
        target = self.tmp / f"mnt-{secrets.token_hex(4)}"
        target.mkdir()
        mount.mount_all(self.graph.rootfs_mounts(container_id), str(target))
        self.mounts.append(str(target))
        try:
            yield target
        finally:
            mount.unmount(str(target))
            self.mounts.remove(str(target))
            target.rmdir()


@pytest.fixture
def env(
    driver_cls: type[StorageDriver], tmp_path: Path, pallet_driver_envs: DriverEnvs
) -> Iterator[Env]:
    special = driver_cls.name in ENVIRONMENTS
    e = Env(
        driver_cls, tmp_path, driver_env(pallet_driver_envs, driver_cls.name) if special else None
    )
    try:
        yield e
        check_consistency(e.graph)
    finally:
        for m in e.mounts:
            mount.unmount(m)
        e.close()
        left = [
            line for line in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in line
        ]
        assert not left, f"mounts left behind: {left}"


def check_consistency(g: Graph) -> None:
    """Rows, reference counts, driver snapshots and blobs all agree."""
    layers = {r["chain_id"]: r for r in g.store.query("SELECT * FROM layers")}
    expected: Counter[str] = Counter()
    for r in g.store.query("SELECT chain_id FROM image_layers"):
        expected[r["chain_id"]] += 1
    rootfs = {r["container_id"]: r["chain_id"] for r in g.store.query("SELECT * FROM rootfs")}
    for top in rootfs.values():
        cur = top
        while cur is not None:
            expected[cur] += 1
            cur = layers[cur]["parent"]
    assert {k: r["refs"] for k, r in layers.items()} == dict(expected)
    snaps = {i.key: i for i in g.driver.walk()}
    assert {k for k, i in snaps.items() if i.kind == Kind.COMMITTED} == set(layers)
    assert {k for k, i in snaps.items() if i.kind != Kind.COMMITTED} == set(rootfs)
    for k, r in layers.items():
        assert snaps[k].parent == r["parent"]
    images = {r["id"] for r in g.store.query("SELECT id FROM images")}
    assert {"sha256:" + p.name for p in g.blobs.iterdir()} == images
    assert not g._pending and not g._pins
    assert list(g.tmp.iterdir()) == []


def diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- import, resolve, inspect, list -----------------------------------------------------


def test_import_resolve(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    t0 = time.monotonic()
    image_id = g.import_image(io.BytesIO(busybox_layer), "busybox")
    elapsed = time.monotonic() - t0
    print(f"\nimport of a busybox rootfs on {env.driver.name}: {elapsed * 1000:.1f} ms")
    hexid = image_id.removeprefix("sha256:")
    assert image_id.startswith("sha256:") and len(hexid) == 64
    assert hexid == hashlib.sha256(g.read_blob(image_id)).hexdigest()
    for name in (
        "busybox",
        "busybox:latest",
        "docker.io/library/busybox:latest",
        "library/busybox",
        image_id,
        hexid,
        hexid[:12],
        hexid[:1],
        "sha256:" + hexid[:5],
    ):
        assert g.resolve(name) == image_id, name
    with pytest.raises(NotFound, match=r"^No such image: nope:latest$"):
        g.resolve("nope")
    with pytest.raises(NotFound, match=r"No such image: busybox:1\.0"):
        g.resolve("busybox:1.0")
    with pytest.raises(NotFound, match="No such image: sha256:" + "0" * 64):
        g.resolve("sha256:" + "0" * 64)
    with pytest.raises(InvalidArgument, match="must be lowercase"):
        g.resolve("BusyBox")
    assert g.exists("busybox") and not g.exists("nope")


def test_short_id_must_be_unambiguous(env: Env) -> None:
    g = env.graph
    ids = [g.import_image(io.BytesIO(tar((f"f{i}", b"x"))), None) for i in range(20)]
    by_first = Counter(i[7] for i in ids)
    shared = next(c for c, n in by_first.items() if n > 1)  # 20 ids, 16 hex digits
    with pytest.raises(NotFound):
        g.resolve(shared)
    for i in ids:
        assert g.resolve(i[7:19]) == i


def test_inspect_and_config(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    changes = ['CMD ["sh"]', "ENV PATH=/bin:/sbin", "LABEL org.example=yes", "WORKDIR /root"]
    image_id = g.import_image(
        io.BytesIO(busybox_layer), "me/bb:1", changes=changes, message="hello"
    )
    info = g.inspect("me/bb:1")
    assert list(info) == [
        "Id",
        "RepoTags",
        "RepoDigests",
        "Parent",
        "Comment",
        "Created",
        "Container",
        "ContainerConfig",
        "DockerVersion",
        "Author",
        "Config",
        "Architecture",
        "Os",
        "Size",
        "GraphDriver",
        "RootFS",
        "Metadata",
    ]
    assert info["Id"] == image_id
    assert info["RepoTags"] == ["me/bb:1"] and info["RepoDigests"] == []
    assert info["Parent"] == "" and info["Comment"] == "hello"
    assert abs(parse_time(info["Created"]) - time.time()) < 60
    assert info["Config"]["Cmd"] == ["sh"]
    assert info["Config"]["Env"] == ["PATH=/bin:/sbin"]
    assert info["Config"]["Labels"] == {"org.example": "yes"}
    assert info["Config"]["WorkingDir"] == "/root"
    assert info["Config"]["Entrypoint"] is None and info["Config"]["Hostname"] == ""
    assert info["Os"] == "linux" and info["Architecture"] in (
        "amd64",
        "arm64",
        "386",
        "ppc64le",
        "s390x",
        "riscv64",
    )
    assert info["RootFS"] == {"Type": "layers", "Layers": [diff_id(busybox_layer)]}
    assert info["GraphDriver"]["Name"] == env.driver.name
    if env.driver.name == "overlay":
        assert info["GraphDriver"]["Data"]["UpperDir"].endswith("/diff")
    busybox_size = (Path(shutil.which("busybox") or "")).stat().st_size
    assert busybox_size <= info["Size"] < busybox_size + 100_000
    assert info["Metadata"]["LastTagTime"] != "0001-01-01T00:00:00Z"
    cfg = g.image_config(image_id)
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [diff_id(busybox_layer)]}
    assert cfg["history"] == [{"created": cfg["created"], "comment": "hello"}]
    json.dumps(info)  # all of it is JSON
    assert g.history(image_id) == [
        {
            "Id": image_id,
            "Created": int(parse_time(cfg["created"])),
            "CreatedBy": "",
            "Tags": ["me/bb:1"],
            "Size": info["Size"],
            "Comment": "hello",
        }
    ]
    default = g.inspect(g.import_image(io.BytesIO(busybox_layer), None))
    assert default["Comment"] == "Imported from -" and default["RepoTags"] == []
    assert default["Metadata"]["LastTagTime"] == "0001-01-01T00:00:00Z"


def test_list_images(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    a = g.import_image(io.BytesIO(busybox_layer), "busybox", changes=["LABEL a=1"])
    time.sleep(1.1)  # Created has a one-second resolution in the summary
    b = g.import_image(io.BytesIO(tar(("x", b"x"))), None, changes=["LABEL b=2"])
    images = g.list_images()
    assert [i["Id"] for i in images] == [b, a], "newest first"
    s = images[1]
    assert sorted(s) == sorted(
        [
            "Containers",
            "Created",
            "Id",
            "Labels",
            "ParentId",
            "RepoDigests",
            "RepoTags",
            "SharedSize",
            "Size",
        ]
    )
    assert s["RepoTags"] == ["busybox:latest"] and s["RepoDigests"] == []
    assert s["Containers"] == -1 and s["SharedSize"] == -1 and s["ParentId"] == ""
    assert s["Labels"] == {"a": "1"} and isinstance(s["Created"], int)
    assert images[0]["RepoTags"] == [] and images[0]["Labels"] == {"b": "2"}

    def ids(**filters: Any) -> list[str]:
        return [i["Id"] for i in g.list_images(filters=filters)]

    assert ids(dangling=["true"]) == [b]
    assert ids(dangling=["false"]) == [a]
    assert ids(dangling={"true": True}) == [b], "the old map form"
    assert ids(label=["a"]) == [a] and ids(label=["a=1"]) == [a] and ids(label=["a=2"]) == []
    assert ids(reference=["busybox"]) == [a] and ids(reference=["busy*:lat*"]) == [a]
    assert ids(reference=["other"]) == []
    assert ids(before=["busybox"]) == [] and ids(since=["busybox"]) == [b]
    assert ids(before=[b[7:19]]) == [a]
    assert ids(until=["1h"]) == [] and set(ids(until=[str(int(time.time()) + 10)])) == {a, b}
    with pytest.raises(InvalidArgument, match="invalid filter 'bogus'"):
        g.list_images(filters={"bogus": ["1"]})
    with pytest.raises(InvalidArgument, match="dangling"):
        g.list_images(filters={"dangling": ["maybe"]})


# --- containers -----------------------------------------------------------------------


def test_container_rootfs_runs_busybox(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    image_id = g.import_image(io.BytesIO(busybox_layer), "busybox")
    cid = secrets.token_hex(32)
    t0 = time.monotonic()
    mounts = g.prepare_rootfs(cid, image_id)
    with env.mounted(cid) as root:
        elapsed = time.monotonic() - t0
        print(
            f"\nprepare + mount of a container rootfs on {env.driver.name}: {elapsed * 1000:.1f} ms"
        )
        out = subprocess.run(
            [
                "chroot",
                str(root),
                "/bin/sh",
                "-c",
                "echo hello from $(busybox | head -1 | cut -d' ' -f1)",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.startswith("hello from BusyBox")
        (root / "root/state").write_text("kept")
        os.unlink(root / "bin/ls")
    assert g.rootfs_mounts(cid) == mounts
    with env.mounted(cid) as root:
        assert (root / "root/state").read_text() == "kept" and not (root / "bin/ls").exists()
    with pytest.raises(Conflict):
        g.prepare_rootfs(cid, image_id)
    with pytest.raises(NotFound, match="No such image"):
        g.prepare_rootfs("other", "nope")
    # the container's changes as a layer (what commit will use)
    buf = io.BytesIO()
    g.rootfs_diff(cid, buf)
    import tarfile

    names = set(tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getnames())
    assert {"root/state", "bin/.wh.ls"} <= names and "bin/busybox" not in names
    # docker export: the whole tree, whether mounted by the caller or not
    for where in (None, "mounted"):
        buf = io.BytesIO()
        if where is None:
            g.export_rootfs(cid, buf)
        else:
            with env.mounted(cid) as root:
                g.export_rootfs(cid, buf, mounted=root)
        names = set(tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getnames())
        assert {"bin/busybox", "bin/sh", "root/state", "etc/passwd"} <= names
        assert "bin/ls" not in names and not any(".wh." in n for n in names)
    g.remove_rootfs(cid)
    with pytest.raises(NotFound):
        g.rootfs_mounts(cid)
    with pytest.raises(NotFound):
        g.remove_rootfs(cid)


def test_scratch_image_rootfs(env: Env) -> None:
    g = env.graph
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "created": format_time(time.time_ns()),
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    with g.lease() as lease:
        image_id = lease.create_image(canonical_json(cfg), ref=parse_tagged("empty"))
    g.prepare_rootfs("c", "empty")
    with env.mounted("c") as root:
        assert os.listdir(root) == []
    g.remove_rootfs("c")
    assert g.delete("empty") == [{"Untagged": "empty:latest"}, {"Deleted": image_id}]


# --- tags and deletion ------------------------------------------------------------------


def test_tag_and_untag(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    a = g.import_image(io.BytesIO(busybox_layer), "busybox")
    g.tag("busybox", "me/bb", "v1")
    g.tag(a[7:19], "localhost:5000/bb", None)
    assert g.inspect(a)["RepoTags"] == ["busybox:latest", "localhost:5000/bb:latest", "me/bb:v1"]
    with pytest.raises(InvalidArgument, match="invalid tag format"):
        g.tag("busybox", "me/bb", "bad tag")
    with pytest.raises(InvalidArgument, match="invalid reference format"):
        g.tag("busybox", "Me/BB", "x")
    with pytest.raises(NotFound, match="No such image: nope:latest"):
        g.tag("nope", "me/bb", "v2")
    # a tag moves: the first image keeps its other tags
    b = g.import_image(io.BytesIO(tar(("x", b"x"))), None)
    g.tag(b, "me/bb", "v1")
    assert g.resolve("me/bb:v1") == b
    assert g.inspect(a)["RepoTags"] == ["busybox:latest", "localhost:5000/bb:latest"]
    assert g.delete("me/bb:v1") == [
        {"Untagged": "me/bb:v1"},
        {"Deleted": b},
        {"Deleted": diff_id(tar(("x", b"x")))},
    ]
    assert g.delete("localhost:5000/bb") == [{"Untagged": "localhost:5000/bb:latest"}]
    assert g.resolve("busybox") == a


def test_delete_rules_and_messages(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    a = g.import_image(io.BytesIO(busybox_layer), "busybox")
    g.tag(a, "other", None)
    short = a[7:19]
    layer = diff_id(busybox_layer)
    with pytest.raises(NotFound, match=r"^No such image: nope:latest$"):
        g.delete("nope")
    # by ID, with tags in two repositories
    with pytest.raises(Conflict) as e:
        g.delete(short)
    assert e.value.message == (
        f"conflict: unable to delete {short} (must be forced) - image is referenced in multiple repositories"
    )
    cid = "c" * 64
    running: list[tuple[str, bool]] = [(cid, True)]
    stopped: list[tuple[str, bool]] = [(cid, False)]
    # by ID, a running container: even force does not help
    with pytest.raises(Conflict) as e:
        g.delete(short, force=True, in_use=lambda i: running)
    assert e.value.message == (
        f"conflict: unable to delete {short} (cannot be forced) - image is being used by running container {cid[:12]}"
    )
    # by name, other references remain: only untagged
    assert g.delete("other", in_use=lambda i: running) == [{"Untagged": "other:latest"}]
    # by name, the last reference, a container uses it
    with pytest.raises(Conflict) as e:
        g.delete("busybox", in_use=lambda i: stopped)
    assert e.value.message == (
        f'conflict: unable to remove repository reference "busybox" (must force) - container {cid[:12]} '
        f"is using its referenced image {short}"
    )
    # by ID, a stopped container
    with pytest.raises(Conflict) as e:
        g.delete(a, in_use=lambda i: stopped)
    assert e.value.message == (
        f"conflict: unable to delete {short} (must be forced) - image is being used by stopped container {cid[:12]}"
    )
    assert g.resolve("busybox") == a, "a refused delete changes nothing"
    # force: the image goes; the container's rootfs keeps the layer alive
    g.prepare_rootfs(cid, a)
    records = g.delete(a, force=True, in_use=lambda i: stopped)
    assert records == [{"Untagged": "busybox:latest"}, {"Deleted": a}]
    assert layer in {i.key for i in env.driver.walk()}
    with env.mounted(cid) as root:
        assert (root / "bin/busybox").exists()
    g.remove_rootfs(cid)
    assert list(env.driver.walk()) == []
    assert g.list_images() == []


def test_delete_by_name_untags_then_deletes(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    a = g.import_image(io.BytesIO(busybox_layer), "busybox")
    assert g.delete("docker.io/library/busybox:latest") == [
        {"Untagged": "busybox:latest"},
        {"Deleted": a},
        {"Deleted": diff_id(busybox_layer)},
    ]
    # by ID with a single tag: untag and delete at once
    a = g.import_image(io.BytesIO(busybox_layer), "busybox:1")
    assert g.delete(a[7:15]) == [
        {"Untagged": "busybox:1"},
        {"Deleted": a},
        {"Deleted": diff_id(busybox_layer)},
    ]


def _child_image(g: Graph, parent: str, ref: str, data: bytes) -> str:
    pcfg = g.image_config(parent)
    with g.lease() as lease:
        top = lease.use_layer(g.image_layers(parent)[-1].chain_id)
        assert top is not None
        layer = lease.add_layer(io.BytesIO(data), top.chain_id)
        cfg = dict(pcfg)
        cfg["created"] = format_time(time.time_ns())
        cfg["rootfs"] = {"type": "layers", "diff_ids": [*pcfg["rootfs"]["diff_ids"], layer.diff_id]}
        cfg["history"] = [
            *pcfg.get("history", []),
            {"created": cfg["created"], "created_by": "test"},
        ]
        return lease.create_image(
            canonical_json(cfg), ref=parse_tagged(ref), parent_image=parent, action="commit"
        )


def test_child_images_and_pruning(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    base = g.import_image(io.BytesIO(busybox_layer), "busybox")
    child = _child_image(g, base, "child", tar(("added", b"a")))
    assert g.inspect("child")["Parent"] == base
    assert len(g.inspect("child")["RootFS"]["Layers"]) == 2
    with pytest.raises(Conflict) as e:
        g.delete(base, force=True)
    assert e.value.message == (
        f"conflict: unable to delete {base[7:19]} (cannot be forced) - image has dependent child images"
    )
    # untagging the parent leaves it as an intermediate image: hidden unless all=True
    assert g.delete("busybox") == [{"Untagged": "busybox:latest"}]
    assert [i["Id"] for i in g.list_images()] == [child]
    assert {i["Id"] for i in g.list_images(all=True)} == {child, base}
    # deleting the child prunes the untagged parent, with both images' layers
    records = g.delete("child")
    child_layer = archive.chain_id(diff_id(busybox_layer), diff_id(tar(("added", b"a"))))
    assert records == [
        {"Untagged": "child:latest"},
        {"Deleted": child},
        {"Deleted": child_layer},
        {"Deleted": base},
        {"Deleted": diff_id(busybox_layer)},
    ]
    assert list(env.driver.walk()) == []
    # noprune keeps the parent
    base = g.import_image(io.BytesIO(busybox_layer), None)
    child = _child_image(g, base, "child", tar(("added", b"a")))
    assert g.delete("child", noprune=True) == [
        {"Untagged": "child:latest"},
        {"Deleted": child},
        {"Deleted": child_layer},
    ]
    assert g.resolve(base) == base


# --- sharing, restart, failures ---------------------------------------------------------


def test_shared_layers(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    a = g.import_image(io.BytesIO(busybox_layer), "a")
    b = g.import_image(io.BytesIO(gzip.compress(busybox_layer)), "b", changes=["CMD sh"])
    assert a != b
    layer = diff_id(busybox_layer)
    assert [i.key for i in env.driver.walk()] == [layer], "stored once"
    assert g.store.one("SELECT refs FROM layers WHERE chain_id = ?", (layer,))["refs"] == 2
    assert g.images_using_layer(layer) == sorted([a, b])
    assert g.image_layers(a) == g.image_layers(b)
    assert g.delete("a") == [{"Untagged": "a:latest"}, {"Deleted": a}]
    assert [i.key for i in env.driver.walk()] == [layer]
    g.prepare_rootfs("ctr", b)
    assert g.delete("b", force=True) == [{"Untagged": "b:latest"}, {"Deleted": b}]
    assert layer in {i.key for i in env.driver.walk()}, "the container still uses it"
    events = [c for c in env.hook.calls if c[0] == "layer"]
    assert events == [("layer", "add", layer)]
    g.remove_rootfs("ctr")
    assert list(env.driver.walk()) == []
    assert [c for c in env.hook.calls if c[0] == "layer"][-1] == ("layer", "remove", layer)


def test_events(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    a = g.import_image(io.BytesIO(busybox_layer), "busybox")
    g.tag(a, "me/x", "1")
    g.delete(a, force=True)
    layer = diff_id(busybox_layer)
    assert env.hook.calls == [
        ("layer", "add", layer),
        ("image", "tag", a, "busybox:latest"),
        ("image", "import", a, "busybox:latest"),
        ("image", "tag", a, "me/x:1"),
        ("image", "untag", a, "busybox:latest"),
        ("image", "untag", a, "me/x:1"),
        ("layer", "remove", layer),
        ("image", "delete", a, ""),
    ]


def test_restart_sees_everything(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    a = g.import_image(io.BytesIO(busybox_layer), "busybox", changes=["CMD sh"])
    g.tag(a, "me/bb", "v1")
    g.prepare_rootfs("ctr", a)
    with env.mounted("ctr") as root:
        (root / "root/note").write_text("before restart")
    listing, inspected = g.list_images(), g.inspect(a)
    env.restart()
    g = env.graph
    assert g.list_images() == listing
    assert g.inspect("me/bb:v1") == inspected
    assert g.resolve(a[7:10]) == a
    with env.mounted("ctr") as root:
        assert (root / "root/note").read_text() == "before restart"
    g.remove_rootfs("ctr")
    b = g.import_image(io.BytesIO(busybox_layer), "again")
    assert [i.key for i in env.driver.walk()] == [diff_id(busybox_layer)]
    g.delete(a, force=True)
    g.delete(b)
    assert list(env.driver.walk()) == []


class Flaky(io.RawIOBase):
    """A stream that fails after ``n`` bytes, like a client going away mid-upload."""

    def __init__(self, data: bytes, n: int) -> None:
        self.data, self.n, self.pos = data, n, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.pos >= self.n:
            raise ConnectionResetError("client went away")
        chunk = self.data[self.pos : min(self.pos + len(b), self.n)]
        b[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def state(env: Env) -> tuple[Any, ...]:
    g = env.graph
    tables = tuple(
        tuple(tuple(r) for r in g.store.query(f"SELECT * FROM {t} ORDER BY 1"))
        for t in ("layers", "images", "image_layers", "refs", "rootfs")
    )
    return (
        tables,
        sorted((i.key, i.kind, i.parent) for i in env.driver.walk()),
        sorted(p.name for p in g.blobs.iterdir()),
        sorted(p.name for p in g.tmp.iterdir()),
        sorted(p.name for p in (env.driver.root / "tmp").iterdir()),
        sorted(p.name for p in env.driver.root.iterdir()),
    )


def test_failures_mid_import_leave_nothing(
    env: Env, busybox_layer: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = env.graph
    other = g.import_image(io.BytesIO(tar(("other", b"o"))), "other")
    before = state(env)

    def boom(*a: Any, **k: Any) -> Any:
        raise OSError(5, "disk on fire")

    failures: list[tuple[str, Any, type[BaseException]]] = [
        ("client goes away", lambda: Flaky(busybox_layer, len(busybox_layer) // 2), OSError),
        (
            "truncated tar",
            lambda: io.BytesIO(busybox_layer[: len(busybox_layer) // 2]),
            InvalidArgument,
        ),
        ("corrupt gzip", lambda: io.BytesIO(gzip.compress(busybox_layer)[:5000]), InvalidArgument),
        ("hostile tar", lambda: io.BytesIO(tar(("ok", b"1"), ("../evil", b"x"))), InvalidArgument),
    ]
    for what, stream, exc in failures:
        with pytest.raises(exc):
            g.import_image(stream(), "busybox")
        assert state(env) == before, what
    assert not (env.tmp / "evil").exists()

    # after the layer is committed: the blob write fails, then the transaction
    for target in ("write_blob", "_set_ref"):
        monkeypatch.setattr(g, target, boom)
        with pytest.raises(OSError, match="disk on fire"):
            g.import_image(io.BytesIO(busybox_layer), "busybox")
        monkeypatch.undo()
        assert state(env) == before, target
    # a failure must not take a layer another image uses
    monkeypatch.setattr(g, "_set_ref", boom)
    with pytest.raises(OSError):
        g.import_image(io.BytesIO(tar(("other", b"o"))), "x")
    monkeypatch.undo()
    assert state(env) == before
    # bad --change values are refused before anything is read
    with pytest.raises(InvalidArgument, match="run is not a valid change command"):
        g.import_image(io.BytesIO(busybox_layer), "busybox", changes=["RUN rm -rf /"])
    with pytest.raises(InvalidArgument):
        g.import_image(io.BytesIO(busybox_layer), "Busybox")
    with pytest.raises(InvalidArgument, match="not supported"):
        g.import_image(io.BytesIO(busybox_layer), None, platform="windows/amd64")
    assert state(env) == before
    assert g.resolve("other") == other


def test_cleanup_after_a_crash(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    a = g.import_image(io.BytesIO(busybox_layer), "busybox")
    g.prepare_rootfs("ctr", a)
    before = state(env)
    d = env.driver
    # what a crash at various points leaves: a temporary snapshot being applied, a layer
    # committed in the driver but not yet in the database (and one on top of it), a
    # container rootfs the database never heard of, half-written blobs and scratch files
    d.prepare("tmp-deadbeef", None)
    orphan = archive.chain_id(None, "sha256:" + "1" * 64)
    d.prepare("tmp-x", diff_id(busybox_layer))
    d.commit(orphan, "tmp-x")
    d.prepare("tmp-y", orphan)
    d.prepare("unknown-container", diff_id(busybox_layer))
    (g.blobs / ".tmp-1234").write_bytes(b"half")
    (g.blobs / ("f" * 64)).write_bytes(b"{}")
    (g.tmp / "scratch").write_text("x")
    (g.tmp / "mnt-1234").mkdir()
    env.restart()
    assert state(env) == before
    with env.mounted("ctr") as root:
        assert (root / "bin/busybox").exists()
    env.graph.remove_rootfs("ctr")


def test_concurrent_imports_and_deletes(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    errors: list[BaseException] = []
    ids: list[str] = []

    def importer(i: int) -> None:
        try:
            for j in range(3):
                ids.append(g.import_image(io.BytesIO(busybox_layer), f"img{i}:{j}"))
        except BaseException as e:
            errors.append(e)

    def deleter() -> None:
        try:
            for _ in range(20):
                for img in g.list_images():
                    with contextlib.suppress(NotFound, Conflict):
                        g.delete(img["Id"], force=True)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=importer, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=deleter))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    check_consistency(g)
    for img in g.list_images():
        g.delete(img["Id"], force=True)
    assert list(env.driver.walk()) == []


def test_import_options(env: Env, busybox_layer: bytes) -> None:
    g = env.graph
    a = g.import_image(io.BytesIO(busybox_layer), "x", platform="linux/arm64/v8")
    cfg = g.image_config(a)
    assert (cfg["os"], cfg["architecture"], cfg["variant"]) == ("linux", "arm64", "v8")
    with pytest.raises(InvalidArgument, match="cannot import digest reference"):
        g.import_image(io.BytesIO(busybox_layer), "x@sha256:" + "a" * 64)


def test_apply_changes() -> None:
    cfg = apply_changes(
        [
            'ENTRYPOINT ["/bin/sh", "-c"]',
            "CMD echo $HOME",
            "ENV A=1 B=\"two words\" C='$A'",
            "ENV D $A-x",
            "EXPOSE 80 53/udp 8000-8001",
            'VOLUME ["/data"]',
            "VOLUME /a /b",
            "WORKDIR /srv",
            "WORKDIR app",
            "USER 1000:1000",
            "STOPSIGNAL SIGINT",
            'LABEL "com.example.vendor"="ACME" version=1.0',
            "HEALTHCHECK --interval=5s --timeout=3s --retries=2 CMD wget -q localhost",
            "ONBUILD RUN make",
        ]
    )
    assert cfg["Entrypoint"] == ["/bin/sh", "-c"]
    assert cfg["Cmd"] == ["/bin/sh", "-c", "echo $HOME"]
    assert cfg["Env"] == ["A=1", "B=two words", "C=$A", "D=1-x"]
    assert cfg["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}, "8000/tcp": {}, "8001/tcp": {}}
    assert cfg["Volumes"] == {"/data": {}, "/a": {}, "/b": {}}
    assert cfg["WorkingDir"] == "/srv/app"
    assert cfg["User"] == "1000:1000" and cfg["StopSignal"] == "SIGINT"
    assert cfg["Labels"] == {"com.example.vendor": "ACME", "version": "1.0"}
    assert cfg["Healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q localhost"],
        "Interval": 5_000_000_000,
        "Timeout": 3_000_000_000,
        "Retries": 2,
    }
    assert cfg["OnBuild"] == ["RUN make"]
    assert apply_changes(["HEALTHCHECK NONE"])["Healthcheck"] == {"Test": ["NONE"]}
    assert apply_changes(['HEALTHCHECK CMD ["true"]'])["Healthcheck"] == {"Test": ["CMD", "true"]}
    assert apply_changes(["CMD [not json"])["Cmd"] == ["/bin/sh", "-c", "[not json"]
    for bad in ("RUN x", "FROM busybox", "EXPOSE 99999", "EXPOSE 80/xyz", "ONBUILD FROM x", "ENV"):
        with pytest.raises(InvalidArgument):
            apply_changes([bad])
