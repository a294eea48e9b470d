"""Image archives: ``docker save`` / ``docker load``.

What :func:`save` writes is at once a *docker-archive* (``manifest.json`` with
``Config``, ``RepoTags``, ``Layers``, as ``docker save`` writes) and an *OCI image
layout* (``oci-layout``, ``index.json``, ``blobs/sha256/...``), the way Docker 25 does:
layers are the uncompressed tars whose digests are the image's diff IDs, so skopeo,
umoci and docker read it as either format.

:func:`load` reads either format (and a gzip/bzip2/xz-compressed tar of it). Nothing in
the archive is extracted by name onto the disk: members are looked up by the paths the
manifests name, every blob is verified against its digest (OCI) or its diff ID
(docker-archive), layers go through the Graph's lease (all or nothing), and tags are
set only once an image is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

from pallet import archive, reference
from pallet.errors import InvalidArgument, NotFound
from pallet.reference import Reference

if TYPE_CHECKING:
    from pallet.distribution.content import Content
    from pallet.graph import Graph, LayerInfo

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MAX_JSON = 16 * 1024 * 1024
_CHUNK = 1 << 20

Emit = Callable[[dict[str, Any]], None]


# --- save ------------------------------------------------------------------------------


@dataclass
class _SaveImage:
    image_id: str
    refs: list[Reference] = field(default_factory=list)


def plan_save(graph: Graph, names: list[str]) -> list[_SaveImage]:
    """Resolve the names first, so an unknown one fails before any byte is sent."""
    out: dict[str, _SaveImage] = {}
    for name in names:
        parsed = reference.parse_any(name)
        if isinstance(parsed, Reference) and parsed.tag is None and parsed.digest is None:
            tagged = [
                (reference.parse(r["name"]), r["image_id"])
                for r in graph.store.query("SELECT name, image_id FROM refs ORDER BY name")
            ]
            hits = [(r, i) for r, i in tagged if r.name == parsed.name and r.tag is not None]
            if hits:
                for r, i in hits:
                    out.setdefault(i, _SaveImage(i)).refs.append(r)
                continue
        image_id = graph.resolve(name)
        img = out.setdefault(image_id, _SaveImage(image_id))
        if isinstance(parsed, Reference):
            tagged_ref = parsed.with_default_tag()
            if tagged_ref.tag is not None and tagged_ref not in img.refs:
                img.refs.append(Reference(tagged_ref.domain, tagged_ref.path, tagged_ref.tag))
    return list(out.values())


class _TarOut:
    def __init__(self, out: IO[bytes] | BinaryIO) -> None:
        self.tf = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)
        self.seen: set[str] = set()
        self.mtime = int(time.time())

    def dir(self, name: str) -> None:
        if name in self.seen:
            return
        self.seen.add(name)
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.DIRTYPE
        ti.mode = 0o755
        ti.mtime = self.mtime
        self.tf.addfile(ti)

    def file(
        self, name: str, data: bytes | None = None, src: IO[bytes] | None = None, size: int = 0
    ) -> None:
        if name in self.seen:
            return
        self.seen.add(name)
        ti = tarfile.TarInfo(name)
        ti.mode = 0o444
        ti.mtime = self.mtime
        if data is not None:
            import io

            ti.size = len(data)
            self.tf.addfile(ti, io.BytesIO(data))
        else:
            ti.size = size
            self.tf.addfile(ti, src)

    def close(self) -> None:
        self.tf.close()


def _layer_file(graph: Graph, content: Content, info: LayerInfo) -> tuple[Any, str, int]:
    """An open temporary file with layer ``info``'s uncompressed tar, its sha256, size."""
    tmp = content.tmp_path("save-")
    f = open(tmp, "w+b")
    tmp.unlink()  # anonymous: gone when closed, whatever happens
    h = hashlib.sha256()
    size = 0
    blobs = content.blobs_of(info.diff_id)
    if blobs:
        with open(content.path(blobs[0].digest), "rb") as src, archive.decompressed(src) as raw:
            while chunk := raw.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                f.write(chunk)
    else:
        from pallet.distribution.push import layer_tar

        class W:
            def write(self, data: bytes) -> int:
                nonlocal size
                h.update(data)
                size += len(data)
                return f.write(data)

            def flush(self) -> None:
                pass

        layer_tar(graph, info, cast(BinaryIO, W()))
    f.seek(0)
    return f, "sha256:" + h.hexdigest(), size


def save(graph: Graph, content: Content, plan: list[_SaveImage], out: IO[bytes] | BinaryIO) -> None:
    """Write the images of ``plan`` as one docker-archive / OCI layout tar to ``out``."""
    t = _TarOut(out)
    t.dir("blobs/")
    t.dir("blobs/sha256/")
    t.file("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
    docker_manifest: list[dict[str, Any]] = []
    index: list[dict[str, Any]] = []
    for img in plan:
        config = graph.image_config(img.image_id)
        config_raw = graph.read_blob(img.image_id)
        layer_paths: list[str] = []
        layer_descs: list[dict[str, Any]] = []
        diff_ids: list[str] = []
        for info in graph.image_layers(img.image_id):
            f, digest, size = _layer_file(graph, content, info)
            try:
                path = f"blobs/sha256/{digest.split(':', 1)[1]}"
                t.file(path, src=f, size=size)
            finally:
                f.close()
            layer_paths.append(path)
            layer_descs.append({"mediaType": OCI_LAYER, "digest": digest, "size": size})
            diff_ids.append(digest)
        if diff_ids != list((config.get("rootfs") or {}).get("diff_ids") or []):
            config.setdefault("rootfs", {"type": "layers"})["diff_ids"] = diff_ids
            config_raw = json.dumps(config, separators=(",", ":")).encode()
        config_digest = "sha256:" + hashlib.sha256(config_raw).hexdigest()
        config_path = f"blobs/sha256/{config_digest.split(':', 1)[1]}"
        t.file(config_path, config_raw)
        man = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_raw)},
            "layers": layer_descs,
        }
        man_raw = json.dumps(man, separators=(",", ":")).encode()
        man_digest = "sha256:" + hashlib.sha256(man_raw).hexdigest()
        t.file(f"blobs/sha256/{man_digest.split(':', 1)[1]}", man_raw)
        desc = {"mediaType": OCI_MANIFEST, "digest": man_digest, "size": len(man_raw)}
        if img.refs:
            for r in img.refs:
                index.append(
                    {
                        **desc,
                        "annotations": {
                            "io.containerd.image.name": str(r),
                            "org.opencontainers.image.ref.name": r.tag or "",
                        },
                    }
                )
        else:
            index.append(desc)
        docker_manifest.append(
            {
                "Config": config_path,
                "RepoTags": [r.familiar() for r in img.refs] or None,
                "Layers": layer_paths,
            }
        )
    t.file(
        "index.json",
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index}).encode(),
    )
    t.file("manifest.json", json.dumps(docker_manifest).encode())
    t.close()


# --- load ------------------------------------------------------------------------------


class _Archive:
    def __init__(self, path: str) -> None:
        try:
            self.tf = tarfile.open(path, mode="r:*")
            members = self.tf.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise InvalidArgument(f"invalid image archive: {e}") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            name = posixpath.normpath(m.name.lstrip("/"))
            if m.isreg() or m.islnk() or m.issym():
                self.members[name] = m

    def close(self) -> None:
        self.tf.close()

    def has(self, name: str) -> bool:
        return posixpath.normpath(name) in self.members

    def open(self, name: str) -> IO[bytes]:
        key = posixpath.normpath(name.lstrip("/"))
        m = self.members.get(key)
        if m is None or key.startswith("../"):
            raise InvalidArgument(f"invalid image archive: {name!r} is not in the archive")
        for _ in range(8):
            if m.issym() or m.islnk():
                target = (
                    m.linkname if m.islnk() else posixpath.join(posixpath.dirname(key), m.linkname)
                )
                key = posixpath.normpath(target.lstrip("/"))
                nm = self.members.get(key)
                if nm is None:
                    raise InvalidArgument(
                        f"invalid image archive: {name!r} links to a missing file"
                    )
                m = nm
            else:
                break
        f = self.tf.extractfile(m)
        if f is None:
            raise InvalidArgument(f"invalid image archive: {name!r} is not a file")
        return f

    def read_json(self, name: str) -> Any:
        with self.open(name) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise InvalidArgument(f"invalid image archive: {name} is too large")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"invalid image archive: {name}: {e}") from None

    def blob(self, digest: str) -> str:
        alg, _, hexpart = digest.partition(":")
        if not reference.IDENTIFIER_RE.match(hexpart) or alg != "sha256":
            raise InvalidArgument(f"invalid image archive: unsupported digest {digest!r}")
        return f"blobs/{alg}/{hexpart}"


@dataclass
class _LoadImage:
    config_raw: bytes
    layers: list[tuple[str, str | None]]  # (member path, digest to verify or None)
    names: list[str]


def _plan_docker(a: _Archive) -> list[_LoadImage]:
    data = a.read_json("manifest.json")
    if not isinstance(data, list):
        raise InvalidArgument("invalid image archive: manifest.json is not a list")
    out = []
    for entry in data:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise InvalidArgument("invalid image archive: a manifest.json entry has no Config")
        with a.open(entry["Config"]) as f:
            config_raw = f.read(MAX_JSON)
        layers = entry.get("Layers") or []
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise InvalidArgument("invalid image archive: Layers must be a list of paths")
        tags = [t for t in (entry.get("RepoTags") or []) if isinstance(t, str)]
        out.append(_LoadImage(config_raw, [(p, None) for p in layers], tags))
    return out


def _plan_oci(a: _Archive) -> list[_LoadImage]:
    from pallet.graph import host_platform

    index = a.read_json("index.json")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise InvalidArgument("invalid image archive: index.json has no manifests")
    out: list[_LoadImage] = []

    def verified(digest: str) -> bytes:
        with a.open(a.blob(digest)) as f:
            raw = f.read(MAX_JSON)
        if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
            raise InvalidArgument(f"invalid image archive: blob {digest} does not match its digest")
        return raw

    def add(desc: dict[str, Any], names: list[str], depth: int = 0) -> None:
        mt = desc.get("mediaType")
        raw = verified(str(desc.get("digest")))
        obj = json.loads(raw)
        mt = mt or obj.get("mediaType")
        if mt in (OCI_INDEX, DOCKER_LIST) or "manifests" in obj:
            if depth > 2:
                raise InvalidArgument("invalid image archive: indexes nested too deep")
            os_, arch, _v = host_platform()
            for d in obj.get("manifests") or []:
                p = d.get("platform") or {}
                if not p or (p.get("os") == os_ and p.get("architecture") == arch):
                    add(d, names, depth + 1)
                    return
            raise NotFound(f"no matching manifest for {os_}/{arch} in the archive")
        cfg = obj.get("config") or {}
        config_raw = verified(str(cfg.get("digest")))
        layers: list[tuple[str, str | None]] = []
        for ld in obj.get("layers") or []:
            digest = str(ld.get("digest"))
            layers.append((a.blob(digest), digest))
        out.append(_LoadImage(config_raw, layers, names))

    for desc in index["manifests"]:
        if not isinstance(desc, dict):
            raise InvalidArgument("invalid image archive: index.json entry is not an object")
        ann = desc.get("annotations") or {}
        names = []
        full = ann.get("io.containerd.image.name")
        short_name = ann.get("org.opencontainers.image.ref.name") or ""
        if full:
            names.append(full)
        elif short_name and ("/" in short_name or ":" in short_name):
            names.append(short_name)
        add(desc, names)
    return out


class _HashingFile:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data


def load(graph: Graph, content: Content, path: str, emit: Emit, quiet: bool = False) -> list[str]:
    """Load every image of the archive at ``path``; returns the image IDs."""
    a = _Archive(path)
    try:
        if a.has("manifest.json"):
            plan = _plan_docker(a)
        elif a.has("index.json"):
            plan = _plan_oci(a)
        else:
            raise InvalidArgument(
                "invalid image archive: it has neither manifest.json (docker-archive) "
                "nor index.json (OCI image layout)"
            )
        ids = []
        for img in plan:
            ids.append(_load_one(graph, content, a, img, emit))
        return ids
    finally:
        a.close()


def _load_one(graph: Graph, content: Content, a: _Archive, img: _LoadImage, emit: Emit) -> str:
    try:
        cfg = json.loads(img.config_raw)
        diff_ids = list((cfg.get("rootfs") or {}).get("diff_ids") or [])
    except (ValueError, AttributeError) as e:
        raise InvalidArgument(f"invalid image archive: image config: {e}") from None
    if len(diff_ids) != len(img.layers):
        raise InvalidArgument("invalid image archive: layers don't match the image configuration")
    refs = []
    for n in img.names:
        r = reference.parse_normalized(n)
        if r.digest is None:
            refs.append(r.with_default_tag())
    with graph.lease() as lease:
        parent: str | None = None
        for (member, digest), diff_id in zip(img.layers, diff_ids, strict=True):
            cid = archive.chain_id(parent, diff_id)
            if lease.use_layer(cid) is not None:
                parent = cid
                continue
            tmp = content.tmp_path("load-")
            try:
                h = hashlib.sha256()
                with a.open(member) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        h.update(chunk)
                        dst.write(chunk)
                blob_digest = "sha256:" + h.hexdigest()
                if digest is not None and blob_digest != digest:
                    raise InvalidArgument(
                        f"invalid image archive: layer {digest} does not match its digest"
                    )
                with open(tmp, "rb") as f:
                    try:
                        info = lease.add_layer(f, parent, expected_diff_id=diff_id)
                    except InvalidArgument as e:
                        raise InvalidArgument(f"layer {member}: {e.message}") from None
                with open(tmp, "rb") as f:
                    kind = archive.detect_compression(f.read(6))
                media = {
                    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
                    "none": OCI_LAYER,
                }.get(kind, f"application/x-{kind}")
                content.keep(tmp, blob_digest, info.diff_id, media, tmp.stat().st_size)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            parent = info.chain_id
        image_id = lease.create_image(img.config_raw, action="load")
    for r in refs:
        with contextlib.suppress(NotFound):
            old = graph.resolve(str(r))
            if old != image_id:
                emit(
                    {
                        "stream": f"The image {r.familiar()} already exists, renaming the old "
                        f"one with ID {old} to empty string\n"
                    }
                )
        graph.add_reference(r, image_id)
        emit({"stream": f"Loaded image: {r.familiar()}\n"})
    if not refs:
        emit({"stream": f"Loaded image ID: {image_id}\n"})
    return image_id
