"""Bad input from registries: each a clear error (status and message), nothing stored,
the daemon still serving. Crafted images go into a real registry (raw blob and manifest
uploads); answers a real registry would refuse to store come from a small fake one."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.registry import (
    FakeRegistry,
    Registry,
    push_image,
    push_manifest,
    start_registry,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def layer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("palletd-errors"), "overlay", [])
    d.start()
    yield d
    d.cleanup()


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = start_registry(tmp_path_factory.mktemp("reg-errors"))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeRegistry]:
    f = FakeRegistry()
    yield f
    f.stop()


def pull(pd: Daemon, ref: str) -> tuple[int, str]:
    """POST /images/create; (HTTP status, the error message, in-band or not)."""
    name, _, tag = ref.rpartition(":")
    status, body = pd.api("POST", f"/images/create?fromImage={name}&tag={tag}")
    if isinstance(body, dict):
        return status, str(body.get("message", ""))
    text = body if isinstance(body, str) else json.dumps(body)
    msgs = (
        [json.loads(x) for x in text.splitlines() if x.strip()] if isinstance(body, str) else body
    )
    errs = [m["error"] for m in msgs if isinstance(m, dict) and "error" in m]
    return status, errs[-1] if errs else ""


def assert_clean(pd: Daemon) -> None:
    assert pd.api("GET", "/_ping")[0] == 200
    assert pd.api("GET", "/images/json")[1] == []
    root = Path(pd.data_root) / "image" / "overlay"
    assert list((root / "distribution/blobs/sha256").iterdir()) == []
    assert list((root / "distribution/tmp").iterdir()) == []
    import sqlite3

    db = sqlite3.connect(root / "graph.db")
    try:
        assert db.execute("SELECT COUNT(*) FROM layers").fetchone()[0] == 0
    finally:
        db.close()
    snaps = Path(pd.data_root) / "overlay"
    if snaps.exists():
        assert not [p for p in snaps.rglob("marker") if p.is_file()]


def test_unreachable_registry(pd: Daemon) -> None:
    status, msg = pull(pd, "127.0.0.1:1/nothing/here:v1")
    assert status == 500
    assert "connection refused" in msg, msg
    r = pd.cli("pull", "127.0.0.1:1/nothing/here:v1", check=False)
    assert r.returncode == 1 and "connection refused" in r.stderr
    assert_clean(pd)


def test_unknown_manifest_and_repository(pd: Daemon, reg: Registry) -> None:
    push_image(reg, "errs/known", "v1", [gzip.compress(layer({"marker": b"1"}))])
    status, msg = pull(pd, f"{reg.host}/errs/known:nope")
    assert status == 404
    assert (
        msg
        == f"manifest for {reg.host}/errs/known:nope not found: manifest unknown: manifest unknown"
    )
    status, msg = pull(pd, f"{reg.host}/errs/unknown:v1")
    assert status == 404
    assert "not found" in msg and "unknown" in msg, msg
    assert_clean(pd)


def test_truncated_gzip(pd: Daemon, reg: Registry) -> None:
    full = gzip.compress(layer({"marker": b"x" * 200_000, "b": bytes(range(256)) * 400}))
    raw_diff = "sha256:" + hashlib.sha256(gzip.decompress(full)).hexdigest()
    push_image(reg, "errs/truncated", "v1", [full[: len(full) // 2]], diff_ids=[raw_diff])
    status, msg = pull(pd, f"{reg.host}/errs/truncated:v1")
    assert status == 200  # found after the stream started: in-band
    assert "invalid compressed layer" in msg or "unexpected end" in msg.lower(), msg
    assert "sha256:" in msg  # names the blob
    assert_clean(pd)


def test_corrupt_gzip(pd: Daemon, reg: Registry) -> None:
    full = bytearray(gzip.compress(layer({"marker": bytes(range(256)) * 2000})))
    for i in range(40, 60):
        full[i] ^= 0x5A
    push_image(reg, "errs/corrupt", "v1", [bytes(full)], diff_ids=["sha256:" + "1" * 64])
    _status, msg = pull(pd, f"{reg.host}/errs/corrupt:v1")
    assert "invalid" in msg and "layer" in msg, msg
    assert_clean(pd)


def test_diff_id_mismatch(pd: Daemon, reg: Registry) -> None:
    blob = gzip.compress(layer({"marker": b"content"}))
    push_image(reg, "errs/diffid", "v1", [blob], diff_ids=["sha256:" + "ab" * 32])
    _status, msg = pull(pd, f"{reg.host}/errs/diffid:v1")
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert f"layer {digest}" in msg and "does not match diff ID" in msg, msg
    assert_clean(pd)


def test_layer_count_mismatch(pd: Daemon, reg: Registry) -> None:
    blob = gzip.compress(layer({"marker": b"content"}))
    push_image(reg, "errs/count", "v1", [blob], diff_ids=[])
    status, msg = pull(pd, f"{reg.host}/errs/count:v1")
    assert status == 400
    assert "layers from manifest don't match image configuration" in msg
    assert_clean(pd)


def test_unknown_layer_media_type(pd: Daemon, reg: Registry) -> None:
    blob = gzip.compress(layer({"marker": b"content"}))
    push_image(reg, "errs/mtype", "v1", [blob], layer_media="application/vnd.example.weird")
    status, msg = pull(pd, f"{reg.host}/errs/mtype:v1")
    assert status == 400
    assert "unsupported media type 'application/vnd.example.weird'" in msg, msg
    assert_clean(pd)


def test_manifest_digest_mismatch_and_bad_manifests(pd: Daemon, fake: FakeRegistry) -> None:
    good = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []})
    claimed = "sha256:" + "7" * 64
    fake.routes[f"/v2/fake/img/manifests/{claimed}"] = (
        200,
        {"Content-Type": OCI_MANIFEST},
        good.encode(),
    )
    status, body = pd.api("POST", f"/images/create?fromImage={fake.host}/fake/img&tag={claimed}")
    assert status == 400 and body["message"] == f"manifest verification failed for digest {claimed}"
    fake.routes["/v2/fake/img/manifests/malformed"] = (
        200,
        {"Content-Type": OCI_MANIFEST},
        b'{"schemaVersion": 2, "layers": [',
    )
    status, msg = pull(pd, f"{fake.host}/fake/img:malformed")
    assert status == 400 and msg.startswith("error parsing manifest: malformed JSON"), msg
    fake.routes["/v2/fake/img/manifests/odd"] = (
        200,
        {"Content-Type": "application/vnd.example.manifest+json"},
        b'{"schemaVersion": 2, "mediaType": "application/vnd.example.manifest+json"}',
    )
    status, msg = pull(pd, f"{fake.host}/fake/img:odd")
    assert status == 400
    assert "unsupported manifest media type 'application/vnd.example.manifest+json'" in msg
    fake.routes["/v2/fake/img/manifests/v1"] = (
        200,
        {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"},
        b'{"schemaVersion": 1, "name": "fake/img", "fsLayers": []}',
    )
    status, msg = pull(pd, f"{fake.host}/fake/img:v1")
    assert status == 400 and "schema 1" in msg
    fake.routes["/v2/fake/img/manifests/denied"] = (
        401,
        {"Content-Type": "application/json"},
        b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
    )
    status, msg = pull(pd, f"{fake.host}/fake/img:denied")
    assert status == 401 and "unauthorized: authentication required" in msg, msg
    assert_clean(pd)


def test_platform_selection(pd: Daemon, reg: Registry) -> None:
    """A manifest list: the host's platform is chosen; an absent one is a clear error."""
    blobs = {}
    for arch in ("amd64", "arm64"):
        blob = gzip.compress(layer({"marker": arch.encode()}))
        digest = push_image(reg, "errs/multi", arch, [blob], config={"architecture": arch})
        blobs[arch] = digest
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": blobs[a],
                "size": len(reg.get(f"/v2/errs/multi/manifests/{a}", {"Accept": OCI_MANIFEST})[1]),
                "platform": {"os": "linux", "architecture": a},
            }
            for a in ("arm64", "amd64")
        ],
    }
    push_manifest(
        reg,
        "errs/multi",
        "all",
        json.dumps(index).encode(),
        "application/vnd.oci.image.index.v1+json",
    )
    r = pd.cli("pull", "--platform", "linux/s390x", f"{reg.host}/errs/multi:all", check=False)
    assert r.returncode != 0
    assert "no matching manifest for linux/s390x in the manifest list entries" in r.stderr
    pd.cli("pull", "--platform", "linux/arm64", f"{reg.host}/errs/multi:all")
    cfg = json.loads(pd.cli("inspect", f"{reg.host}/errs/multi:all").stdout)[0]
    assert cfg["Architecture"] == "arm64"
    pd.cli("rmi", f"{reg.host}/errs/multi:all")
    pd.cli("pull", f"{reg.host}/errs/multi:all")
    cfg = json.loads(pd.cli("inspect", f"{reg.host}/errs/multi:all").stdout)[0]
    assert cfg["Architecture"] == "amd64"
    pd.cli("rmi", f"{reg.host}/errs/multi:all")
    assert_clean(pd)


def test_blob_unknown(pd: Daemon, reg: Registry) -> None:
    """A manifest naming a blob the registry lost (deleted from its storage)."""
    blob = gzip.compress(layer({"marker": b"gone"}))
    push_image(reg, "errs/lost", "v1", [blob])
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    import shutil

    shutil.rmtree(reg.blob_path("errs/lost", digest).parent)
    _status, msg = pull(pd, f"{reg.host}/errs/lost:v1")
    assert digest in msg and ("unknown" in msg or "not found" in msg), msg
    assert_clean(pd)
