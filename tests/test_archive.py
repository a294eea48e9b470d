"""pallet.archive: applying layer tars (safely), writing tars and diffs."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pallet import archive
from pallet.errors import InvalidArgument

# --- helpers -------------------------------------------------------------------------


def tar_bytes(*entries: dict[str, Any]) -> bytes:
    """A layer tar built with pallet's own writer. Entry keys: name, type (file, dir,
    symlink, link, char, block, fifo), data, mode, uid, gid, mtime, target, xattrs,
    major, minor."""
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
        default_mode = 0o755 if kind == "dir" else 0o777 if kind == "symlink" else 0o644
        tw.add(
            e["name"],
            flag,
            mode=e.get("mode", default_mode),
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


def apply(data: bytes, target: Path, whiteouts: archive.WhiteoutFormat = "delete") -> Any:
    return archive.apply_layer(io.BytesIO(data), target, whiteouts)


def snapshot_tree(root: Path) -> dict[str, tuple[int, int, int, int, str]]:
    """path -> (type+mode, uid, gid, size, symlink target or content hash)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            extra = ""
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, extra)
    return out


@pytest.fixture(params=["openat2", "manual"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the kernel's RESOLVE_IN_ROOT and with the hand-made walk."""
    if request.param == "manual":
        monkeypatch.setattr(archive, "_have_openat2", False)
    return str(request.param)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(target, outside): the layer goes into target; outside must never change."""
    target = tmp_path / "target"
    outside = tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("untouched")
    before = snapshot_tree(tmp_path / "outside")
    siblings = sorted(p.name for p in tmp_path.iterdir())
    yield target, outside
    assert snapshot_tree(outside) == before, "something was written outside the target"
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings


# --- decompression and diff IDs --------------------------------------------------------

LAYER = [
    {"name": "etc/", "type": "dir"},
    {"name": "etc/hostname", "data": b"pallet\n"},
    {"name": "bin/", "type": "dir"},
    {"name": "bin/tool", "data": b"\x7fELF" + b"x" * 5000, "mode": 0o755},
]


@pytest.mark.parametrize("compression", ["none", "gzip", "bzip2", "xz", "zstd"])
def test_compressions_give_the_uncompressed_diff_id(tmp_path: Path, compression: str) -> None:
    raw = tar_bytes(*LAYER)
    data = {
        "none": lambda b: b,
        "gzip": gzip.compress,
        "bzip2": bz2.compress,
        "xz": lzma.compress,
        "zstd": lambda b: (
            subprocess.run(["zstd", "-q", "-c"], input=b, capture_output=True, check=True).stdout
        ),
    }[compression](raw)
    assert archive.detect_compression(data[:6]) == compression
    res = apply(data, tmp_path)
    assert res.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert res.size == 7 + 5004
    assert (tmp_path / "etc/hostname").read_bytes() == b"pallet\n"


def test_trailing_bytes_after_end_of_archive_are_hashed(tmp_path: Path) -> None:
    raw = tar_bytes(*LAYER) + b"\0" * 8192  # what Go's tar writer pads with
    assert apply(raw, tmp_path).diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_empty_layers(tmp_path: Path) -> None:
    assert apply(b"", tmp_path).diff_id == "sha256:" + hashlib.sha256(b"").hexdigest()
    empty_tar = b"\0" * 1024
    assert apply(empty_tar, tmp_path).size == 0
    assert list(tmp_path.iterdir()) == []


def test_garbage_and_truncated_input_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        apply(b"this is not a tar archive at all" * 40, tmp_path)
    raw = tar_bytes({"name": "big", "data": b"x" * 100_000})
    with pytest.raises(InvalidArgument):
        apply(raw[:20_000], tmp_path)
    with pytest.raises(InvalidArgument):
        apply(gzip.compress(raw)[:-100], tmp_path)


# --- what gets written -----------------------------------------------------------------


def test_all_entry_types_and_metadata(tmp_path: Path, resolver: str) -> None:
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep
    raw = tar_bytes(
        {"name": "d/", "type": "dir", "mode": 0o750, "uid": 12, "gid": 34, "mtime": 1_000_000},
        {"name": "d/f", "data": b"hello", "mode": 0o4755, "uid": 1000, "gid": 1001},
        {"name": "d/cap", "data": b"x", "xattrs": {"security.capability": cap}},
        {"name": "d/x", "data": b"y", "xattrs": {"user.k": b"v\x00\xff", "trusted.t": b"1"}},
        {"name": "d/hard", "type": "link", "target": "d/f"},
        {"name": "d/sym", "type": "symlink", "target": "f", "uid": 5, "gid": 6},
        {"name": "d/abs", "type": "symlink", "target": "/etc/passwd"},
        {"name": "dev/null", "type": "char", "major": 1, "minor": 3, "mode": 0o666},
        {"name": "dev/loop9", "type": "block", "major": 7, "minor": 9, "mode": 0o660},
        {"name": "dev/fifo", "type": "fifo", "mode": 0o600},
        {"name": "dev/", "type": "dir", "mode": 0o755, "mtime": 2_000_000},
        {"name": "trusted-overlay", "data": b"", "xattrs": {"trusted.overlay.opaque": b"y"}},
    )
    apply(raw, tmp_path)
    d = tmp_path / "d"
    st = d.lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 12, 34)
    assert st.st_mtime == 1_000_000, "a dir's mtime is set after its children are written"
    f = (d / "f").lstat()
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid) == (0o4755, 1000, 1001)
    assert f.st_mtime == 1_600_000_000
    assert (d / "f").read_bytes() == b"hello"
    assert os.getxattr(d / "cap", "security.capability") == cap
    assert os.getxattr(d / "x", "user.k") == b"v\x00\xff"
    assert os.getxattr(d / "x", "trusted.t") == b"1"
    assert (d / "hard").lstat().st_ino == f.st_ino and f.st_nlink == 2
    assert os.readlink(d / "sym") == "f"
    s = (d / "sym").lstat()
    assert (s.st_uid, s.st_gid) == (5, 6)
    assert os.readlink(d / "abs") == "/etc/passwd"
    null = (tmp_path / "dev/null").lstat()
    assert (
        stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    )
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK((tmp_path / "dev/loop9").lstat().st_mode)
    assert stat.S_ISFIFO((tmp_path / "dev/fifo").lstat().st_mode)
    assert (tmp_path / "dev").lstat().st_mtime == 2_000_000
    assert "trusted.overlay.opaque" not in os.listxattr(tmp_path / "trusted-overlay")


def test_missing_parents_created_and_entries_replaced(tmp_path: Path, resolver: str) -> None:
    (tmp_path / "was-dir").mkdir()
    (tmp_path / "was-dir/child").write_text("lower")
    (tmp_path / "was-file").write_text("lower")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep/lower").write_text("lower")
    raw = tar_bytes(
        {"name": "deep/er/file", "data": b"1"},
        {"name": "was-dir", "data": b"now a file"},
        {"name": "was-file/", "type": "dir"},
        {"name": "was-file/inner", "data": b"2"},
        {"name": "keep/", "type": "dir", "mode": 0o700},
    )
    apply(raw, tmp_path)
    assert (tmp_path / "deep/er/file").read_text() == "1"
    assert stat.S_IMODE((tmp_path / "deep/er").stat().st_mode) == 0o755
    assert (tmp_path / "was-dir").read_text() == "now a file"
    assert (tmp_path / "was-file/inner").read_text() == "2"
    assert (tmp_path / "keep/lower").read_text() == "lower", "dirs merge"
    assert stat.S_IMODE((tmp_path / "keep").stat().st_mode) == 0o700


# --- whiteouts -------------------------------------------------------------------------


def lower_tree(root: Path) -> None:
    (root / "gone").write_text("x")
    (root / "gonedir/sub").mkdir(parents=True)
    (root / "gonedir/sub/f").write_text("x")
    (root / "opq").mkdir()
    (root / "opq/lower1").write_text("x")
    (root / "opq/lowerdir").mkdir()
    (root / "kept").write_text("x")


WHITEOUT_LAYER = [
    {"name": ".wh.gone"},
    {"name": ".wh.gonedir"},
    {"name": "opq/", "type": "dir"},
    {"name": "opq/.wh..wh..opq"},
    {"name": "opq/new", "data": b"n"},
    {"name": ".wh.never-existed"},
    {"name": ".wh..wh.plnk/123", "data": b"aufs metadata is skipped"},
]


def test_whiteouts_delete_format(tmp_path: Path, resolver: str) -> None:
    lower_tree(tmp_path)
    apply(tar_bytes(*WHITEOUT_LAYER), tmp_path, "delete")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "opq"]
    assert sorted(p.name for p in (tmp_path / "opq").iterdir()) == ["new"]


def test_opaque_marker_after_new_entries_keeps_them(tmp_path: Path) -> None:
    lower_tree(tmp_path)
    raw = tar_bytes(
        {"name": "opq/", "type": "dir"},
        {"name": "opq/first", "data": b"1"},
        {"name": "opq/.wh..wh..opq"},
    )
    apply(raw, tmp_path, "delete")
    assert sorted(p.name for p in (tmp_path / "opq").iterdir()) == ["first"]


def test_whiteouts_overlay_format(tmp_path: Path, resolver: str) -> None:
    apply(tar_bytes(*WHITEOUT_LAYER), tmp_path, "overlay")
    for name in ("gone", "gonedir", "never-existed"):
        st = (tmp_path / name).lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, name
    assert os.getxattr(tmp_path / "opq", "trusted.overlay.opaque") == b"y"
    assert (tmp_path / "opq/new").read_text() == "n"
    assert not (tmp_path / ".wh..wh.plnk").exists()
    assert not list(tmp_path.glob("**/.wh.*"))


def test_invalid_whiteout_names(tmp_path: Path) -> None:
    for bad in (".wh.", "a/.wh..", ".wh..wh.x/../../y"):
        with pytest.raises(InvalidArgument):
            apply(tar_bytes({"name": bad}), tmp_path)


# --- hostile archives -------------------------------------------------------------------


@pytest.mark.parametrize("whiteouts", ["delete", "overlay"])
@pytest.mark.parametrize(
    "name",
    ["../evil", "a/../../evil", "./../evil", "a/b/../../../evil", "..", "../outside/secret"],
)
def test_dotdot_refused(
    sandbox: tuple[Path, Path], name: str, whiteouts: str, resolver: str
) -> None:
    target, _ = sandbox
    with pytest.raises(InvalidArgument, match="invalid layer entry"):
        apply(tar_bytes({"name": name, "data": b"pwned"}), target, whiteouts)  # type: ignore[arg-type]
    assert not (target.parent / "evil").exists()


def test_dotdot_whiteout_refused(sandbox: tuple[Path, Path]) -> None:
    target, _ = sandbox
    with pytest.raises(InvalidArgument):
        apply(tar_bytes({"name": "../outside/.wh.secret"}), target)


def test_absolute_names_made_relative(sandbox: tuple[Path, Path], resolver: str) -> None:
    target, outside = sandbox
    apply(tar_bytes({"name": str(outside / "secret"), "data": b"pwned"}), target)
    inside = target / str(outside / "secret").lstrip("/")
    assert inside.read_bytes() == b"pwned"


def test_relative_symlink_escape_refused(sandbox: tuple[Path, Path], resolver: str) -> None:
    target, _ = sandbox
    for link, dest in (("esc", "../outside"), ("a/b/esc", "../../../outside"), ("x", "..")):
        with pytest.raises(InvalidArgument, match="leads out of the layer"):
            apply(tar_bytes({"name": link, "type": "symlink", "target": dest}), target)


@pytest.mark.parametrize("whiteouts", ["delete", "overlay"])
def test_write_through_absolute_symlink_stays_inside(
    sandbox: tuple[Path, Path], whiteouts: str, resolver: str
) -> None:
    target, outside = sandbox
    # the symlink names the real outside dir; inside the layer that path does not exist
    raw = tar_bytes(
        {"name": "esc", "type": "symlink", "target": str(outside)},
        {"name": "esc/secret", "data": b"pwned"},
    )
    with pytest.raises(InvalidArgument, match="esc"):
        apply(raw, target, whiteouts)  # type: ignore[arg-type]
    # when the path exists inside the layer, the write lands there (chroot semantics)
    raw = tar_bytes(
        {"name": str(outside).lstrip("/") + "/", "type": "dir"},
        {"name": "esc", "type": "symlink", "target": str(outside)},
        {"name": "esc/secret", "data": b"contained"},
    )
    apply(raw, target, whiteouts)  # type: ignore[arg-type]
    assert (target / str(outside).lstrip("/") / "secret").read_bytes() == b"contained"


def test_symlink_to_root_then_dotdot_chain(sandbox: tuple[Path, Path], resolver: str) -> None:
    target, outside = sandbox
    raw = tar_bytes(
        {"name": "root", "type": "symlink", "target": "/"},
        {"name": "up", "type": "symlink", "target": "/../../../../../"},
        {"name": "root/up/" + str(outside).lstrip("/") + "/secret", "data": b"contained"},
    )
    apply(raw, target)  # "/.." is "/": the missing dirs are made inside the target
    assert (target / str(outside).lstrip("/") / "secret").read_bytes() == b"contained"


def test_lower_layer_symlink_is_resolved_inside(sandbox: tuple[Path, Path], resolver: str) -> None:
    target, outside = sandbox
    os.symlink(str(outside), target / "planted")  # as if a lower layer had it
    os.symlink("../../..", target / "planted-rel")
    # the symlink's target does not exist inside: refused, whatever the entry is
    for name in ("planted/secret", "planted/.wh.secret", "planted/.wh..wh..opq"):
        with pytest.raises(InvalidArgument, match="planted"):
            apply(tar_bytes({"name": name, "data": b"pwned"}), target)
    # "../../.." from the root is the root: the write is contained
    apply(tar_bytes({"name": "planted-rel/outside/secret", "data": b"contained"}), target)
    assert (target / "outside/secret").read_bytes() == b"contained"


def test_entry_replaces_a_symlink_instead_of_following_it(
    sandbox: tuple[Path, Path], resolver: str
) -> None:
    target, outside = sandbox
    raw = tar_bytes(
        {"name": "secret", "type": "symlink", "target": str(outside / "secret")},
        {"name": "secret", "data": b"regular now"},
        {"name": "d", "type": "symlink", "target": str(outside)},
        {"name": "d/", "type": "dir"},
    )
    apply(raw, target)
    assert (target / "secret").read_bytes() == b"regular now"
    assert (target / "d").is_dir() and not (target / "d").is_symlink()


@pytest.mark.parametrize(
    "linkname",
    [
        "../outside/secret",
        "/etc/passwd",  # absolute: not an entry of this layer
        "nonexistent",
        "dir/../../outside/secret",
    ],
)
def test_hardlink_outside_refused(sandbox: tuple[Path, Path], linkname: str, resolver: str) -> None:
    target, outside = sandbox
    raw = tar_bytes(
        {"name": "dir/", "type": "dir"}, {"name": "h", "type": "link", "target": linkname}
    )
    with pytest.raises(InvalidArgument):
        apply(raw, target)
    assert (outside / "secret").stat().st_nlink == 1


def test_hardlink_to_lower_layer_file_refused(tmp_path: Path) -> None:
    (tmp_path / "lower").write_text("x")
    with pytest.raises(InvalidArgument, match="not an earlier file of this layer"):
        apply(tar_bytes({"name": "h", "type": "link", "target": "lower"}), tmp_path)


def test_hardlink_through_symlinked_dir_refused(sandbox: tuple[Path, Path], resolver: str) -> None:
    target, outside = sandbox
    raw = tar_bytes(
        {"name": "d", "type": "symlink", "target": str(outside)},
        {"name": "h", "type": "link", "target": "d/secret"},
    )
    with pytest.raises(InvalidArgument):
        apply(raw, target)
    assert (outside / "secret").stat().st_nlink == 1


def test_hardlink_to_symlink_links_the_symlink(sandbox: tuple[Path, Path], resolver: str) -> None:
    target, outside = sandbox
    raw = tar_bytes(
        {"name": "s", "type": "symlink", "target": str(outside / "secret")},
        {"name": "h", "type": "link", "target": "s"},
    )
    apply(raw, target)
    assert os.readlink(target / "h") == str(outside / "secret")
    assert (outside / "secret").stat().st_nlink == 1


def test_hardlink_to_a_directory_refused(tmp_path: Path) -> None:
    raw = tar_bytes({"name": "d/", "type": "dir"}, {"name": "h", "type": "link", "target": "d"})
    with pytest.raises(InvalidArgument):
        apply(raw, tmp_path)


# --- writing tars -----------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "dir/sub").mkdir(parents=True)
    (root / "dir/file").write_bytes(b"content" * 100)
    os.chown(root / "dir/file", 1000, 1000)
    os.chmod(root / "dir/file", 0o640)
    os.link(root / "dir/file", root / "dir/hardlink")
    os.symlink("file", root / "dir/link")
    os.symlink("/abs/target", root / "abslink")
    os.mknod(root / "dir/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(root / "dir/fifo")
    os.setxattr(root / "dir/file", "user.bin", b"\x00\x01\xff")
    os.setxattr(root / "dir/sub", "trusted.dirattr", b"d")
    (root / ("long/" * 30)).mkdir(parents=True)
    (root / ("long/" * 30) / ("n" * 150)).write_text("long name")
    (root / "ünïcode").write_text("u")
    os.utime(root / "dir/sub", (1_234_567, 1_234_567))


def test_write_tar_roundtrip(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    make_tree(src)
    buf = io.BytesIO()
    archive.write_tar(src, buf)
    data = buf.getvalue()
    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert "dir/" in [n + "/" for n in names] or "dir" in names
    apply(data, dst)
    assert snapshot_tree(dst) == snapshot_tree(src)
    assert (dst / "dir/hardlink").stat().st_ino == (dst / "dir/file").stat().st_ino
    assert os.getxattr(dst / "dir/file", "user.bin") == b"\x00\x01\xff"
    assert (dst / "dir/sub").stat().st_mtime == 1_234_567
    # GNU tar reads it too
    out = subprocess.run(["tar", "-tvf", "-"], input=data, capture_output=True, check=True)
    assert b"n" * 150 in out.stdout


def test_overlay_upper_becomes_an_oci_diff(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "opq").mkdir(parents=True)
    os.setxattr(upper / "opq", "trusted.overlay.opaque", b"y")
    (upper / "opq/new").write_text("n")
    os.mknod(upper / "deleted", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(upper / "realdev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    (upper / "changed").write_text("c")
    os.setxattr(upper / "changed", "trusted.overlay.origin", b"whatever")
    buf = io.BytesIO()
    archive.write_tar(upper, buf, whiteouts="overlay")
    tf = tarfile.open(fileobj=io.BytesIO(buf.getvalue()))
    members = {m.name: m for m in tf.getmembers()}
    assert set(members) == {
        "opq",
        "opq/.wh..wh..opq",
        "opq/new",
        ".wh.deleted",
        "realdev",
        "changed",
    }
    assert members[".wh.deleted"].isreg() and members[".wh.deleted"].size == 0
    assert members["realdev"].ischr()
    assert not any(
        k.startswith("SCHILY.xattr.trusted.overlay") for k in members["changed"].pax_headers
    )
    assert not any(k.startswith("SCHILY.xattr.trusted.overlay") for k in members["opq"].pax_headers)
    # and back: applied in overlay format it is the same upper again
    again = tmp_path / "again"
    again.mkdir()
    apply(buf.getvalue(), again, "overlay")
    assert os.getxattr(again / "opq", "trusted.overlay.opaque") == b"y"
    assert (again / "deleted").lstat().st_rdev == 0


def test_compare_diff_reproduces_upper(tmp_path: Path) -> None:
    lower, upper, result = tmp_path / "lower", tmp_path / "upper", tmp_path / "result"
    lower.mkdir()
    make_tree(lower)
    subprocess.run(["cp", "-a", f"{lower}/.", str(upper)], check=True)
    (upper / "dir/file").write_bytes(b"changed")
    os.unlink(upper / "dir/link")
    shutil.rmtree(upper / "long")
    (upper / "dir/sub/added").write_text("a")
    (upper / "newdir/x").mkdir(parents=True)
    os.unlink(upper / "abslink")
    (upper / "abslink").mkdir()  # a symlink replaced by a dir
    os.unlink(upper / "dir/fifo")
    (upper / "dir/fifo").write_text("file now")
    os.chmod(upper / "ünïcode", 0o600)
    kinds = dict(archive.changes(lower, upper))
    assert kinds["dir/link"] == 2 and kinds["long"] == 2 and kinds["newdir"] == 1
    assert kinds["dir/file"] == 0 and kinds["dir"] == 0 and kinds["ünïcode"] == 0
    assert "long/long" not in kinds, "only the top of a deleted tree is listed"
    buf = io.BytesIO()
    archive.write_diff(lower, upper, buf)
    subprocess.run(["cp", "-a", f"{lower}/.", str(result)], check=True)
    apply(buf.getvalue(), result, "delete")
    assert snapshot_tree(result) == snapshot_tree(upper)


def test_chain_id() -> None:
    d1 = "sha256:" + "a" * 64
    d2 = "sha256:" + "b" * 64
    assert archive.chain_id(None, d1) == d1
    expect = "sha256:" + hashlib.sha256(f"{d1} {d2}".encode()).hexdigest()
    assert archive.chain_id(d1, d2) == expect
