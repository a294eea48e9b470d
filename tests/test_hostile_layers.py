"""Hostile layers, end to end: crafted tars pushed to a real registry and pulled, and the
same tars loaded from a docker-archive. Each is refused with a message naming the entry
(or, for what Docker accepts, contained inside the layer): nothing is written outside,
nothing is half-stored, the daemon keeps serving."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.registry import Registry, push_image, start_registry

# Outside every layer: a hostile entry aims here; it must stay absent/empty.
SENTINEL = Path(f"/tmp/pallet-hostile-{uuid.uuid4().hex[:8]}")


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"owned\n",
    link: str = "",
    major: int = 0,
    minor: int = 0,
    pax: dict[str, str] | None = None,
) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mtime = 1_700_000_000
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    ti.linkname = link
    ti.devmajor, ti.devminor = major, minor
    if pax:
        ti.pax_headers = dict(pax)
    body = None
    if kind == tarfile.REGTYPE:
        ti.size = len(data)
        body = data
    return ti, body


def make_tar(
    entries: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, body in entries:
            tf.addfile(ti, io.BytesIO(body) if body is not None else None)
    return buf.getvalue()


def raw_tar_with_name(name: str) -> bytes:
    """A ustar header written by hand (tarfile would normalise some names)."""
    ti = tarfile.TarInfo("placeholder")
    ti.size = 6
    header = bytearray(ti.tobuf(format=tarfile.USTAR_FORMAT))
    header[0:100] = name.encode().ljust(100, b"\0")
    header[148:156] = b" " * 8
    chksum = sum(header[:512])
    header[148:156] = b"%06o\0 " % chksum
    return bytes(header) + b"owned\n".ljust(512, b"\0") + b"\0" * 1024


S = str(SENTINEL)

# name -> (layer tar, expected refusal fragment or None when the layer is accepted but
# must stay inside itself)
CASES: dict[str, tuple[Callable[[], bytes], str | None]] = {
    "dotdot-file": (lambda: make_tar([entry("../escape")]), "'..' leads out of the layer"),
    "dotdot-nested": (lambda: make_tar([entry("a/b/../../../escape")]), "'..' leads out"),
    "dotdot-raw-header": (lambda: raw_tar_with_name("../../escape"), "'..' leads out"),
    "dotdot-pax-path": (
        lambda: make_tar([entry("innocent", pax={"path": "../../escape"})]),
        "'..' leads out",
    ),
    "dotdot-gnu-longname": (
        lambda: make_tar([entry("x/" * 60 + "../" * 61 + "escape")], fmt=tarfile.GNU_FORMAT),
        "'..' leads out",
    ),
    "symlink-relative-out": (
        lambda: make_tar([entry("evil", tarfile.SYMTYPE, link="../../../../../../tmp")]),
        "leads out of the layer",
    ),
    "hardlink-absolute": (
        lambda: make_tar([entry("h", tarfile.LNKTYPE, link="/etc/passwd")]),
        "not an earlier file of this layer",
    ),
    "hardlink-dotdot": (
        lambda: make_tar([entry("h", tarfile.LNKTYPE, link="../../../../etc/passwd")]),
        "'..' leads out",
    ),
    "hardlink-through-symlink": (
        lambda: make_tar(
            [
                entry("etc", tarfile.SYMTYPE, link="/etc"),
                entry("h", tarfile.LNKTYPE, link="etc/passwd"),
            ]
        ),
        "hardlink",
    ),
    "hardlink-to-later-entry": (
        lambda: make_tar([entry("h", tarfile.LNKTYPE, link="later"), entry("later")]),
        "not an earlier file of this layer",
    ),
    "whiteout-dotdot": (lambda: make_tar([entry("a/../../.wh.etc")]), "'..' leads out"),
    "forged-overlay-whiteout": (
        lambda: make_tar([entry("etc/passwd", tarfile.CHRTYPE, major=0, minor=0)]),
        "0/0 character device is an overlay whiteout",
    ),
    "symlink-loop": (
        lambda: make_tar(
            [
                entry("l1", tarfile.SYMTYPE, link="l2"),
                entry("l2", tarfile.SYMTYPE, link="l1"),
                entry("l1/x"),
            ]
        ),
        "",
    ),
    # accepted as Docker accepts them, but contained in the layer:
    "absolute-name": (lambda: make_tar([entry(f"{S}/abs")]), None),
    "write-through-absolute-symlink": (
        lambda: make_tar([entry("evil", tarfile.SYMTYPE, link=S), entry("evil/through")]),
        "is not a directory",
    ),
    "write-through-symlink-resolved-in-layer": (
        lambda: make_tar(
            [
                entry(S.lstrip("/") + "/", tarfile.DIRTYPE),
                entry("evil", tarfile.SYMTYPE, link=S),
                entry("evil/through"),
            ]
        ),
        None,
    ),
    "symlink-to-root-then-file": (
        lambda: make_tar([entry("root", tarfile.SYMTYPE, link="/"), entry(f"root{S}/viaroot")]),
        None,
    ),
}


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("palletd-hostile"), "overlay", [])
    d.start()
    yield d
    d.cleanup()


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = start_registry(tmp_path_factory.mktemp("reg-hostile"))
    yield r
    r.stop()


@pytest.fixture(autouse=True)
def sentinel() -> Iterator[None]:
    SENTINEL.mkdir(exist_ok=True)
    yield
    leaked = sorted(os.listdir(SENTINEL))
    os.rmdir(SENTINEL) if not leaked else None
    assert leaked == [], f"written outside the layer: {leaked}"
    assert not Path("/tmp/escape").exists() and not Path("/escape").exists()


def _stored(pd: Daemon) -> tuple[list[object], int]:
    import sqlite3

    images = pd.api("GET", "/images/json")[1]
    db = sqlite3.connect(Path(pd.data_root) / "image" / "overlay" / "graph.db")
    try:
        layers = db.execute("SELECT COUNT(*) FROM layers").fetchone()[0]
    finally:
        db.close()
    return images, layers


def _in_layers(pd: Daemon, name: str) -> list[Path]:
    return [p for p in (Path(pd.data_root) / "overlay").rglob(name) if p.is_file()]


def _check(pd: Daemon, case: str, error: str, expect: str | None, ref: str) -> None:
    assert pd.api("GET", "/_ping")[0] == 200
    if expect is None:
        assert error == "", error
        inside = {"absolute-name": "abs", "write-through-symlink-resolved-in-layer": "through"}.get(
            case, "viaroot"
        )
        found = _in_layers(pd, inside)
        assert len(found) == 1 and str(SENTINEL).lstrip("/") in str(found[0]), found
        pd.cli("rmi", ref)
    else:
        assert error, f"{case}: accepted"
        assert expect in error, error
        assert "sha256:" in error or "layer" in error
    assert _stored(pd) == ([], 0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_layer_pulled(pd: Daemon, reg: Registry, case: str) -> None:
    make, expect = CASES[case]
    tar = make()
    repo = f"hostile/{case}"
    push_image(reg, repo, "v1", [gzip.compress(tar)])
    ref = f"{reg.host}/{repo}:v1"
    r = pd.cli("pull", ref, check=False)
    error = r.stderr.strip() if r.returncode != 0 else ""
    _check(pd, case, error, expect, ref)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_layer_loaded(pd: Daemon, case: str, tmp_path: Path) -> None:
    make, expect = CASES[case]
    tar = make()
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    cfg_name = hashlib.sha256(config).hexdigest() + ".json"
    ref = f"hostile-load/{case}:v1"
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": [ref], "Layers": ["layer/layer.tar"]}])
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in (
            (cfg_name, config),
            ("layer/layer.tar", tar),
            ("manifest.json", manifest.encode()),
        ):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    r = pd.cli("load", "-i", str(archive), check=False)
    error = r.stderr.strip() if r.returncode != 0 else ""
    _check(pd, case, error, expect, ref)
