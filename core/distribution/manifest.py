"""Manifests: Docker image manifest v2 schema 2, OCI image manifest, Docker manifest
lists and OCI image indexes (with platform selection)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pallet.errors import InvalidArgument, NotFound
from pallet.reference import validate_digest

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"

MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
ACCEPT = ", ".join((DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX))
CONFIG_TYPES = (DOCKER_CONFIG, OCI_CONFIG)
LAYER_TYPES = (
    DOCKER_LAYER,
    DOCKER_FOREIGN_LAYER,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_LAYER_ND,
    OCI_LAYER_ND_GZIP,
)
MAX_MANIFEST = 4 * 1024 * 1024
MAX_CONFIG = 8 * 1024 * 1024


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    platform: dict[str, Any] | None = None

    @classmethod
    def parse(cls, obj: Any, what: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise InvalidArgument(f"invalid manifest: {what} is not an object")
        digest = obj.get("digest")
        size = obj.get("size")
        if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"invalid manifest: {what} needs a digest and a size")
        try:
            validate_digest(digest)
        except InvalidArgument as e:
            raise InvalidArgument(
                f"invalid manifest: {what} digest {digest!r}: {e.message}"
            ) from None
        if not digest.startswith("sha256:"):
            raise InvalidArgument(
                f"invalid manifest: {what}: unsupported digest algorithm {digest}"
            )
        mt = obj.get("mediaType") or ""
        plat = obj.get("platform")
        return cls(
            str(mt),
            digest,
            size,
            tuple(obj.get("urls") or ()),
            plat if isinstance(plat, dict) else None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        if self.platform:
            out["platform"] = self.platform
        return out


def _load(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"error parsing manifest: malformed JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidArgument("error parsing manifest: not a JSON object")
    return obj


def media_type_of(raw: bytes, header: str | None) -> str:
    """The manifest's media type: its ``mediaType`` field, else the Content-Type."""
    obj = _load(raw)
    mt = obj.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    ct = (header or "").split(";")[0].strip()
    if ct and ct not in ("application/json", "text/plain", "application/octet-stream"):
        return ct
    if obj.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1
    if "manifests" in obj:
        return OCI_INDEX
    if "layers" in obj and "config" in obj:
        return OCI_MANIFEST
    return ct or "unknown"


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, raw: bytes, media_type: str) -> ImageManifest:
        obj = _load(raw)
        if obj.get("schemaVersion") != 2:
            raise InvalidArgument(
                f"error parsing manifest: unsupported schemaVersion {obj.get('schemaVersion')!r}"
            )
        config = Descriptor.parse(obj.get("config"), "config")
        if config.media_type and config.media_type not in CONFIG_TYPES:
            raise InvalidArgument(
                f"unsupported media type {config.media_type} for the image config "
                "(not a container image)"
            )
        layers_raw = obj.get("layers")
        if not isinstance(layers_raw, list):
            raise InvalidArgument("error parsing manifest: layers is not a list")
        layers = []
        for i, lr in enumerate(layers_raw):
            d = Descriptor.parse(lr, f"layer {i}")
            if d.media_type not in LAYER_TYPES:
                raise InvalidArgument(
                    f"unsupported media type {d.media_type!r} for layer {d.digest}"
                )
            layers.append(d)
        return cls(media_type, config, tuple(layers))

    def to_json(self) -> bytes:
        obj = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": self.config.to_json(),
            "layers": [d.to_json() for d in self.layers],
        }
        return json.dumps(obj, indent=3).encode()


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, raw: bytes, media_type: str) -> Index:
        obj = _load(raw)
        items = obj.get("manifests")
        if not isinstance(items, list):
            raise InvalidArgument("error parsing manifest list: manifests is not a list")
        return cls(
            media_type, tuple(Descriptor.parse(m, f"manifest {i}") for i, m in enumerate(items))
        )

    def select(self, os_: str, arch: str, variant: str) -> Descriptor:
        """The best entry for a platform, as containerd's platform matcher chooses."""
        best: Descriptor | None = None
        best_score = -1
        for d in self.manifests:
            p = d.platform or {}
            if d.media_type and d.media_type not in (*MANIFEST_TYPES, *INDEX_TYPES):
                continue
            if p.get("os") != os_ or _norm_arch(p.get("architecture", "")) != arch:
                continue
            pv = p.get("variant") or ""
            score = 1
            if variant:
                if pv and pv != variant:
                    # arm: v7 runs v6 and v5 images; arm64 v8 only
                    if not (arch == "arm" and pv < variant):
                        continue
                    score = 0
                else:
                    score = 2 if pv == variant else 1
            if score > best_score:
                best, best_score = d, score
        if best is None:
            plat = f"{os_}/{arch}" + (f"/{variant}" if variant else "")
            raise NotFound(f"no matching manifest for {plat} in the manifest list entries")
        return best


def _norm_arch(a: str) -> str:
    return {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}.get(a, a)
