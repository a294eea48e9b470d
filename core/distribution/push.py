"""Push: blobs (HEAD check, cross-repository mount, upload), then the manifest.

A layer is pushed as the blob it came from when the content store has it (pulled,
loaded or imported layers), so its digest and the image's diff IDs stay what they were;
a layer pallet has no blob for is written from its snapshot and gzipped, and when that
tar differs from the original the pushed config names the new diff IDs.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

from pallet import archive, mount
from pallet.distribution import manifest as mf
from pallet.distribution.content import Content, LayerBlob
from pallet.distribution.progress import Progress
from pallet.distribution.registry import (
    AuthConfig,
    RegistryError,
    RegistryOptions,
    Repository,
    open_repository,
)
from pallet.errors import NotFound
from pallet.graph import Graph, LayerInfo
from pallet.reference import Reference

log = logging.getLogger(__name__)

CHUNK = 4 << 20


def short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def layer_tar(graph: Graph, info: LayerInfo, out: BinaryIO) -> None:
    """Write layer ``info``'s diff against its parent as a tar (views of both)."""
    drv = graph.driver
    scratch = graph.tmp / f"push-{secrets.token_hex(6)}"
    scratch.mkdir(parents=True)
    made: list[str] = []
    mounted: list[Path] = []
    try:
        upper_key = f"tmp-push-{secrets.token_hex(8)}"
        mounts = drv.view(upper_key, info.chain_id)
        made.append(upper_key)
        upper = scratch / "upper"
        upper.mkdir()
        mount.mount_all(mounts, str(upper))
        mounted.append(upper)
        lower: Path | None = None
        if info.parent is not None:
            lower_key = f"tmp-push-{secrets.token_hex(8)}"
            lmounts = drv.view(lower_key, info.parent)
            made.append(lower_key)
            lower = scratch / "lower"
            lower.mkdir()
            mount.mount_all(lmounts, str(lower))
            mounted.append(lower)
        archive.write_diff(lower, upper, out)
    finally:
        for m in reversed(mounted):
            mount.unmount(str(m))
        for k in reversed(made):
            with contextlib.suppress(NotFound):
                drv.remove(k)
        for d in ("upper", "lower"):
            with contextlib.suppress(OSError):
                (scratch / d).rmdir()
        with contextlib.suppress(OSError):
            scratch.rmdir()


class _HashWriter:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def blob_for_layer(graph: Graph, content: Content, info: LayerInfo) -> tuple[LayerBlob, str]:
    """A gzip blob of layer ``info`` for a registry, and the diff ID it stands for."""
    for b in content.blobs_of(info.diff_id):
        if b.media_type in (mf.DOCKER_LAYER, mf.OCI_LAYER_GZIP):
            return b, info.diff_id
    for b in content.blobs_of(info.diff_id):  # kept, but not gzip: recompress it exactly
        tmp = content.tmp_path("gz-")
        try:
            with open(content.path(b.digest), "rb") as src, archive.decompressed(src) as raw:
                with open(tmp, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
                    while chunk := raw.read(CHUNK):
                        gz.write(chunk)
            return content.add_file(tmp, info.diff_id, mf.DOCKER_LAYER), info.diff_id
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    tmp = content.tmp_path("gz-")
    try:
        with open(tmp, "wb") as f:
            with gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
                hw = _HashWriter(gz)  # type: ignore[arg-type]
                layer_tar(graph, info, hw)  # type: ignore[arg-type]
        diff_id = "sha256:" + hw.h.hexdigest()
        blob = content.add_file(tmp, diff_id, mf.DOCKER_LAYER)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return blob, diff_id


@dataclass
class PushResult:
    tag: str
    digest: str
    size: int


class Pusher:
    def __init__(
        self,
        graph: Graph,
        content: Content,
        opts: RegistryOptions,
        auth: AuthConfig | None,
        progress: Progress,
    ) -> None:
        self.graph = graph
        self.content = content
        self.opts = opts
        self.auth = auth
        self.progress = progress

    def push(self, ref: Reference, image_id: str) -> PushResult:
        """Push image ``image_id`` as ``ref`` (a tagged reference)."""
        repo = open_repository(ref, self.opts, self.auth, ("pull", "push"), push=True)[0]
        # ask for pull access to the repositories blobs may be mounted from
        layers = self.graph.image_layers(image_id)
        config = self.graph.image_config(image_id)
        config_raw = self.graph.read_blob(image_id)
        blobs: list[tuple[LayerInfo, LayerBlob, str]] = []
        for info in layers:
            self.progress.status("Preparing", short(info.diff_id))
        for info in layers:
            blob, diff_id = blob_for_layer(self.graph, self.content, info)
            blobs.append((info, blob, diff_id))
        sources = set()
        host = repo.endpoint.host
        for _i, b, _d in blobs:
            for r in self.content.repos_of(b.digest):
                rhost, _, rpath = r.partition("/")
                if rhost == host and rpath != repo.path:
                    sources.add(rpath)
        repo.extra_scopes = [f"repository:{p}:pull" for p in sorted(sources)]
        repo.ping()
        for info, blob, _d in blobs:
            self._push_blob(repo, blob, short(info.diff_id))
        new_diff_ids = [d for _i, _b, d in blobs]
        if new_diff_ids != list((config.get("rootfs") or {}).get("diff_ids") or []):
            config.setdefault("rootfs", {"type": "layers"})["diff_ids"] = new_diff_ids
            config_raw = json.dumps(config, separators=(",", ":")).encode()
        config_digest = mf.sha256(config_raw)
        self._upload_small(repo, config_digest, config_raw)
        man = mf.ImageManifest(
            mf.DOCKER_MANIFEST,
            mf.Descriptor(mf.DOCKER_CONFIG, config_digest, len(config_raw)),
            tuple(mf.Descriptor(mf.DOCKER_LAYER, b.digest, b.size) for _i, b, _d in blobs),
        )
        raw = man.to_json()
        digest = mf.sha256(raw)
        tag = ref.tag or ref.digest or "latest"
        resp = repo.request(
            "PUT", repo.url(f"manifests/{tag}"), {"Content-Type": mf.DOCKER_MANIFEST}, raw
        )
        with resp:
            repo.check(resp, f"uploading the manifest of {ref.familiar()}")
            resp.read()
        if config_digest == image_id:
            self.graph.add_reference(Reference(ref.domain, ref.path, None, digest), image_id)
        return PushResult(tag, digest, len(raw))

    def _exists(self, repo: Repository, digest: str) -> bool:
        resp = repo.request("HEAD", repo.url(f"blobs/{digest}"))
        with resp:
            if resp.status == 404:
                return False
            repo.check(resp, f"checking blob {digest}")
            return True

    def _push_blob(self, repo: Repository, blob: LayerBlob, sid: str) -> None:
        where = f"{repo.endpoint.host}/{repo.path}"
        if self._exists(repo, blob.digest):
            self.progress.status("Layer already exists", sid)
            self.content.add_repo(blob.digest, where)
            return
        for r in self.content.repos_of(blob.digest):
            rhost, _, rpath = r.partition("/")
            if rhost != repo.endpoint.host or rpath == repo.path:
                continue
            q = urlencode({"mount": blob.digest, "from": rpath})
            resp = repo.request(
                "POST", repo.url(f"blobs/uploads/?{q}"), {"Content-Length": "0"}, b""
            )
            with resp:
                resp.read()
                if resp.status == 201:
                    self.progress.status(f"Mounted from {rpath}", sid)
                    self.content.add_repo(blob.digest, where)
                    return
                if resp.status == 202 and resp.header("Location"):  # mount refused: upload
                    self._upload(repo, blob, sid, urljoin(resp.url, resp.header("Location") or ""))
                    self.content.add_repo(blob.digest, where)
                    return
        self._upload(repo, blob, sid, None)
        self.content.add_repo(blob.digest, where)

    def _start_upload(self, repo: Repository) -> str:
        resp = repo.request("POST", repo.url("blobs/uploads/"), {"Content-Length": "0"}, b"")
        with resp:
            resp.read()
            if resp.status != 202 or not resp.header("Location"):
                raise RegistryError(f"starting a blob upload to {repo.path}: status {resp.status}")
            return urljoin(resp.url, resp.header("Location") or "")

    def _upload(self, repo: Repository, blob: LayerBlob, sid: str, location: str | None) -> None:
        location = location or self._start_upload(repo)
        sent = 0
        with open(self.content.path(blob.digest), "rb") as f:
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                resp = repo.request(
                    "PATCH",
                    location,
                    {
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{sent}-{sent + len(chunk) - 1}",
                        "Content-Length": str(len(chunk)),
                    },
                    chunk,
                )
                with resp:
                    repo.check(resp, f"uploading layer {blob.digest}")
                    resp.read()
                    location = urljoin(resp.url, resp.header("Location") or location)
                sent += len(chunk)
                self.progress.update("Pushing", sid, sent, blob.size)
        self._finish_upload(repo, location, blob.digest, b"")
        self.progress.status("Pushed", sid)

    def _finish_upload(self, repo: Repository, location: str, digest: str, body: bytes) -> None:
        u = urlsplit(location)
        q = (u.query + "&" if u.query else "") + urlencode({"digest": digest})
        url = urlunsplit((u.scheme, u.netloc, u.path, q, ""))
        resp = repo.request(
            "PUT",
            url,
            {"Content-Type": "application/octet-stream", "Content-Length": str(len(body))},
            body,
        )
        with resp:
            repo.check(resp, f"finishing the upload of {digest}")
            resp.read()

    def _upload_small(self, repo: Repository, digest: str, data: bytes) -> None:
        if self._exists(repo, digest):
            return
        location = self._start_upload(repo)
        self._finish_upload(repo, location, digest, data)
