"""Pull: resolve a reference to a manifest, then download, verify and unpack its layers.

The pipeline (Docker's ``distribution/xfer`` in spirit):

- the manifest (and, for a manifest list / OCI index, the platform's manifest) is
  fetched and verified against the digest when the reference names one;
- the image config is fetched and verified; its ``rootfs.diff_ids`` must pair with the
  manifest's layers; layers whose chain the Graph has already are "Already exists";
- up to :data:`MAX_CONCURRENT_DOWNLOADS` blobs download at once into spool files,
  sha256 and size checked while they stream;
- the layers are applied in order, each one *while its spool is still being written*:
  the applier reads the spool behind the downloader, decompresses, hashes (the diff ID)
  and unpacks in a child process (:mod:`pallet.archive`). A digest mismatch found at the
  end of the download makes the applier's read fail, so the half-applied snapshot is
  removed; a diff ID mismatch is caught by the Graph.
- everything hangs off one Graph lease: a failure (or a daemon killed mid-pull) leaves
  no layer, no image and no tag; the verified blobs are kept in the content store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pallet import archive, reference
from pallet.distribution import manifest as mf
from pallet.distribution.content import Content
from pallet.distribution.progress import Progress
from pallet.distribution.registry import (
    AuthConfig,
    RegistryError,
    RegistryOptions,
    Repository,
    Unreachable,
    open_repository,
)
from pallet.errors import InvalidArgument, NotFound, PalletError
from pallet.graph import Graph, Lease, parse_platform
from pallet.reference import Reference

log = logging.getLogger(__name__)

MAX_CONCURRENT_DOWNLOADS = 3
READ = 1 << 20


class Cancelled(PalletError):
    status = 499


def short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


# --- spools: a download being written and read at the same time -----------------------


class Spool:
    """A blob downloading into a file, readable while it grows."""

    def __init__(self, path: Path, digest: str, size: int, cancel: threading.Event) -> None:
        self.path = path
        self.digest = digest
        self.size = size
        self.cancel = cancel
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.written = 0
        self.done = False
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        with self.cond:
            self.written += len(data)
            self.cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self.cond:
            if not self.done:
                os.close(self.fd)
            self.done = True
            self.error = error
            self.cond.notify_all()

    def wait(self) -> None:
        with self.cond:
            while not self.done:
                self.cond.wait(0.5)
                if self.cancel.is_set():
                    raise Cancelled("pull cancelled")
        if self.error is not None:
            raise self.error

    def reader(self, on_read: Callable[[int], None] | None = None) -> SpoolReader:
        return SpoolReader(self, on_read)


class SpoolReader:
    """Reads a :class:`Spool` from the start, waiting for the writer; raises the
    download's error (a digest mismatch, a broken connection) instead of ending."""

    def __init__(self, spool: Spool, on_read: Callable[[int], None] | None) -> None:
        self.spool = spool
        self.fd = os.open(spool.path, os.O_RDONLY | os.O_CLOEXEC)
        self.pos = 0
        self.on_read = on_read

    def read(self, n: int = -1) -> bytes:
        sp = self.spool
        with sp.cond:
            while self.pos >= sp.written and not sp.done:
                sp.cond.wait(0.5)
                if sp.cancel.is_set():
                    raise Cancelled("pull cancelled")
            avail = sp.written - self.pos
            if avail <= 0:
                if sp.error is not None:
                    raise sp.error
                return b""
        want = avail if n < 0 else min(n, avail)
        data = os.pread(self.fd, min(want, 8 * READ), self.pos)
        self.pos += len(data)
        if self.on_read is not None:
            self.on_read(self.pos)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


# --- the puller -------------------------------------------------------------------------


@dataclass
class Resolved:
    repo: Repository
    manifest_digest: str  # what "Digest:" shows (the index digest for a list)
    manifest: mf.ImageManifest
    config_raw: bytes
    config: dict[str, Any]
    platform_digest: str = ""  # the platform manifest's digest (when from an index)
    raw: dict[str, bytes] = field(default_factory=dict)  # digest -> manifest bytes


class Puller:
    def __init__(
        self,
        graph: Graph,
        content: Content,
        opts: RegistryOptions,
        auth: AuthConfig | None,
        progress: Progress,
        cancel: threading.Event | None = None,
    ) -> None:
        self.graph = graph
        self.content = content
        self.opts = opts
        self.auth = auth
        self.progress = progress
        self.cancel = cancel or threading.Event()

    # --- manifests ---------------------------------------------------------------------

    def _fetch_manifest(
        self, repo: Repository, ref: Reference, what: str
    ) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of the manifest ``what`` (a tag or a digest)."""
        url = repo.url(f"manifests/{what}")
        resp = repo.request("GET", url, {"Accept": mf.ACCEPT})
        with resp:
            if resp.status == 404:
                body = resp.read()
                from pallet.distribution.registry import _error_text, error_codes

                codes = error_codes(body)
                text = _error_text(body) or "manifest unknown"
                if "NAME_UNKNOWN" in codes:
                    raise NotFound(f"repository {ref.familiar_name()} not found: {text}")
                raise NotFound(f"manifest for {ref.familiar()} not found: {text}")
            repo.check(resp, f"fetching the manifest of {ref.familiar()}")
            raw = resp.read(mf.MAX_MANIFEST + 1)
            if len(raw) > mf.MAX_MANIFEST:
                raise InvalidArgument(f"manifest for {ref.familiar()} is larger than 4 MiB")
            ctype = resp.header("Content-Type")
        digest = mf.sha256(raw)
        if what.startswith("sha256:") and digest != what:
            raise InvalidArgument(f"manifest verification failed for digest {what}")
        return raw, mf.media_type_of(raw, ctype), digest

    def _fetch_blob_small(
        self, repo: Repository, desc: mf.Descriptor, limit: int, what: str
    ) -> bytes:
        resp = repo.request("GET", repo.url(f"blobs/{desc.digest}"))
        with resp:
            repo.check(resp, f"fetching {what} {desc.digest}")
            data = resp.read(limit + 1)
        if len(data) > limit:
            raise InvalidArgument(f"{what} {desc.digest} is larger than {limit} bytes")
        if mf.sha256(data) != desc.digest:
            raise InvalidArgument(f"{what} verification failed for digest {desc.digest}")
        return data

    def resolve(self, ref: Reference, platform: str | None) -> Resolved:
        """Find ``ref``'s manifest on the first endpoint that has it (mirrors first)."""
        os_, arch, variant = parse_platform(platform)
        repos = open_repository(ref, self.opts, self.auth, ("pull",))
        last: PalletError | None = None
        for i, repo in enumerate(repos):
            try:
                return self._resolve_on(repo, ref, os_, arch, variant)
            except (Unreachable, RegistryError, NotFound) as e:
                if not repo.endpoint.mirror or i == len(repos) - 1:
                    raise
                log.info("mirror %s: %s; trying the next endpoint", repo.endpoint.host, e.message)
                last = e
        assert last is not None
        raise last

    def _resolve_on(
        self, repo: Repository, ref: Reference, os_: str, arch: str, variant: str
    ) -> Resolved:
        what = ref.digest or ref.tag or reference.DEFAULT_TAG
        raw, mtype, digest = self._fetch_manifest(repo, ref, what)
        top_digest = digest
        raws = {digest: raw}
        platform_digest = ""
        if mtype in (mf.DOCKER_SCHEMA1, mf.DOCKER_SCHEMA1_SIGNED):
            raise InvalidArgument(
                f"{ref.familiar()}: Docker Image Format v1 and Docker Image manifest version 2, "
                "schema 1 are not supported: the image must be rebuilt and pushed in a newer format"
            )
        if mtype in mf.INDEX_TYPES:
            index = mf.Index.parse(raw, mtype)
            desc = index.select(os_, arch, variant)
            raw, mtype, digest = self._fetch_manifest(repo, ref, desc.digest)
            raws[digest] = raw
            platform_digest = digest
            if mtype in mf.INDEX_TYPES:
                raise InvalidArgument(f"{ref.familiar()}: nested manifest lists are not supported")
        if mtype not in mf.MANIFEST_TYPES:
            raise InvalidArgument(
                f"{ref.familiar()}: unsupported manifest media type {mtype!r} (not a container image)"
            )
        man = mf.ImageManifest.parse(raw, mtype)
        config_raw = self._fetch_blob_small(repo, man.config, mf.MAX_CONFIG, "image config")
        try:
            config = json.loads(config_raw)
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgument(
                f"image config {man.config.digest} is not valid JSON: {e}"
            ) from None
        diff_ids = (config.get("rootfs") or {}).get("diff_ids")
        if not isinstance(diff_ids, list) or len(diff_ids) != len(man.layers):
            raise InvalidArgument(
                f"{ref.familiar()}: layers from manifest don't match image configuration"
            )
        for d in diff_ids:
            if not isinstance(d, str) or not d.startswith("sha256:"):
                raise InvalidArgument(f"image config {man.config.digest}: invalid diff ID {d!r}")
            reference.validate_digest(d)
        return Resolved(repo, top_digest, man, config_raw, config, platform_digest, raws)

    # --- downloads ---------------------------------------------------------------------

    def _download(self, repo: Repository, desc: mf.Descriptor, spool: Spool) -> None:
        sid = short(desc.digest)
        started = time.monotonic()
        try:
            self._download_into(repo, desc, spool, sid)
        except BaseException as e:
            spool.finish(e)
            return
        spool.finish()
        log.info("layer %s downloaded in %.2fs", sid, time.monotonic() - started)

    def _download_into(self, repo: Repository, desc: mf.Descriptor, spool: Spool, sid: str) -> None:
        if self.cancel.is_set():
            raise Cancelled("pull cancelled")
        h = hashlib.sha256()
        got = 0
        attempts = 0
        while True:
            headers = {"Range": f"bytes={got}-"} if got else {}
            urls = [repo.url(f"blobs/{desc.digest}"), *desc.urls]
            resp = repo.request("GET", urls[0], headers)
            try:
                if got and resp.status == 200:  # no range support: start over is impossible
                    raise RegistryError(
                        f"download of layer {desc.digest} was interrupted and the registry "
                        "cannot resume it"
                    )
                repo.check(resp, f"fetching layer {desc.digest}")
                while True:
                    if self.cancel.is_set():
                        raise Cancelled("pull cancelled")
                    data = resp.read1(READ)
                    if not data:
                        break
                    got += len(data)
                    if got > desc.size:
                        raise InvalidArgument(
                            f"filesystem layer verification failed for digest {desc.digest}: "
                            f"more than the {desc.size} bytes the manifest names"
                        )
                    h.update(data)
                    spool.write(data)
                    self.progress.update("Downloading", sid, got, desc.size)
            except (OSError, TimeoutError) as e:
                attempts += 1
                if attempts > 3:
                    raise RegistryError(f"downloading layer {desc.digest}: {e}") from e
                continue
            finally:
                resp.close()
            break
        self.progress.status("Verifying Checksum", sid)
        if got != desc.size:
            raise InvalidArgument(
                f"filesystem layer verification failed for digest {desc.digest}: "
                f"got {got} of {desc.size} bytes"
            )
        if "sha256:" + h.hexdigest() != desc.digest:
            raise InvalidArgument(f"filesystem layer verification failed for digest {desc.digest}")
        self.progress.status("Download complete", sid)

    # --- the whole pull ------------------------------------------------------------------

    def pull(self, ref: Reference, platform: str | None = None) -> tuple[str, Resolved, bool]:
        """Pull ``ref``. Returns (image ID, what was resolved, whether anything was new)."""
        res = self.resolve(ref, platform)
        man, cfg = res.manifest, res.config
        diff_ids: list[str] = list(cfg["rootfs"]["diff_ids"])
        shown = ref.digest or ref.tag or reference.DEFAULT_TAG
        self.progress.status(f"Pulling from {ref.path}", shown, detail=False)
        image_id = mf.sha256(res.config_raw)
        with self.graph.lease() as lease:
            # which layers are here already (the longest present chain)
            present = 0
            chain: str | None = None
            for d in diff_ids:
                cid = archive.chain_id(chain, d)
                if lease.use_layer(cid) is None:
                    break
                chain = cid
                present += 1
            jobs: list[tuple[int, mf.Descriptor]] = []
            seen: set[str] = set()
            queued: set[str] = set()
            for i, desc in enumerate(man.layers):
                sid = short(desc.digest)
                if i < present:
                    if desc.digest not in seen:
                        self.progress.status("Already exists", sid)
                    seen.add(desc.digest)
                    continue
                if desc.digest not in queued:
                    if desc.digest not in seen:
                        self.progress.status("Pulling fs layer", sid)
                    jobs.append((i, desc))
                    queued.add(desc.digest)
                seen.add(desc.digest)
            new = bool(jobs) or not self.graph.exists(image_id)
            if jobs and self._parallel_ok():
                self._fetch_and_apply_parallel(res, lease, jobs, diff_ids, present, chain)
            elif jobs:
                self._fetch_and_apply(res, lease, jobs, diff_ids, present, chain)
            tagged = ref if ref.tag is not None else None  # the "pull" event names it
            return lease.create_image(res.config_raw, ref=tagged, action="pull"), res, new

    # --- parallel unpacking (overlay-style drivers) --------------------------------------

    def _parallel_ok(self) -> bool:
        """Layers can be unpacked ahead, in parallel, when the driver takes a diff as an
        overlay upper directory (independent of the layers below) on the filesystem of
        the content store (so a finished layer is moved in by rename)."""
        if os.environ.get("PALLET_PULL_SEQUENTIAL") == "1":
            return False
        drv = self.graph.driver
        key = f"tmp-probe-{os.urandom(8).hex()}"
        try:
            drv.prepare(key, None)
        except PalletError:
            return False
        try:
            target = drv.apply_target(key)
            return (
                target is not None
                and target[1] == "overlay"
                and os.stat(target[0]).st_dev == os.stat(self.content.tmp).st_dev
            )
        finally:
            with contextlib.suppress(PalletError):
                drv.remove(key)

    def _fetch_and_apply_parallel(
        self,
        res: Resolved,
        lease: Lease,
        jobs: list[tuple[int, mf.Descriptor]],
        diff_ids: list[str],
        start: int,
        parent: str | None,
    ) -> None:
        """Every layer downloads, decompresses, hashes and unpacks at once (each in its
        own chrooted child, into its own scratch directory); then, in order, each
        verified layer is moved into its snapshot and committed."""
        from pallet.untar import unpack_compressed

        man = res.manifest
        spools: dict[str, Spool] = {}
        scratch: dict[str, Path] = {}
        unpacked: dict[str, Future[tuple[str, int]]] = {}
        workers = min(len(jobs), max(2, os.cpu_count() or 2))
        downloads = ThreadPoolExecutor(MAX_CONCURRENT_DOWNLOADS, thread_name_prefix="pull")
        unpackers = ThreadPoolExecutor(workers, thread_name_prefix="unpack")

        t0 = time.monotonic()

        def unpack(desc: mf.Descriptor, sp: Spool, target: Path) -> tuple[str, int]:
            sid = short(desc.digest)

            def on_read(pos: int) -> None:
                self.progress.update("Extracting", sid, pos, desc.size)

            started = time.monotonic()
            reader = sp.reader(on_read)
            try:
                return unpack_compressed(reader, target, "overlay")
            finally:
                reader.close()
                log.info(
                    "layer %s unpacked in %.2fs (started at +%.2fs)",
                    sid,
                    time.monotonic() - started,
                    started - t0,
                )

        try:
            # largest first: the longest unpack starts at once instead of ending the pull
            by_size = sorted(jobs, key=lambda j: -j[1].size)
            for n, (_i, desc) in enumerate(by_size):
                sp = Spool(self.content.tmp_path(), desc.digest, desc.size, self.cancel)
                spools[desc.digest] = sp
                target = self.content.tmp_path("unpack-")
                target.mkdir(mode=0o755)
                os.chmod(target, 0o755)
                scratch[desc.digest] = target
                if n >= MAX_CONCURRENT_DOWNLOADS:
                    self.progress.status("Waiting", short(desc.digest))
                downloads.submit(self._download, res.repo, desc, sp)
                unpacked[desc.digest] = unpackers.submit(unpack, desc, sp, target)
            used: set[str] = set()
            for i in range(start, len(man.layers)):
                desc = man.layers[i]
                sid = short(desc.digest)
                sp = spools[desc.digest]
                cid = archive.chain_id(parent, diff_ids[i])
                if lease.use_layer(cid) is not None:
                    parent = cid
                    continue
                if desc.digest in used:  # the same blob again, elsewhere in the chain
                    with open(self.content.path(desc.digest), "rb") as f:
                        info = self._apply(lease, f, parent, diff_ids[i], desc, None)
                    parent = info.chain_id
                    continue
                try:
                    diff_id, size = unpacked[desc.digest].result()
                except (PalletError, OSError) as e:
                    with contextlib.suppress(Cancelled):
                        sp.wait()  # a download error (verification) is the one to report
                    if isinstance(e, OSError):
                        raise PalletError(f"failed to register layer {desc.digest}: {e}") from None
                    raise InvalidArgument(f"layer {desc.digest}: {e.message}") from None
                sp.wait()  # downloaded completely and verified
                src = scratch[desc.digest]

                def move_in(
                    drv: Any, key: str, src: Path = src, diff_id: str = diff_id, size: int = size
                ) -> archive.ApplyResult:
                    target = drv.apply_target(key)
                    assert target is not None and target[1] == "overlay"
                    _move_tree(src, target[0])
                    return archive.ApplyResult(diff_id, size)

                moving = time.monotonic()
                info = self._apply(lease, None, parent, diff_ids[i], desc, None, move_in)
                log.info(
                    "layer %s committed at +%.2fs (move and commit %.2fs)",
                    sid,
                    time.monotonic() - t0,
                    time.monotonic() - moving,
                )
                used.add(desc.digest)
                self.content.keep(sp.path, desc.digest, info.diff_id, desc.media_type, desc.size)
                self.content.add_repo(desc.digest, f"{res.repo.endpoint.host}/{res.repo.path}")
                self.progress.update("Extracting", sid, desc.size, desc.size, force=True)
                self.progress.status("Pull complete", sid)
                parent = info.chain_id
        except BaseException:
            self.cancel.set()
            raise
        finally:
            downloads.shutdown(wait=True)
            unpackers.shutdown(wait=True)
            for sp in spools.values():
                if not sp.done:
                    sp.finish(Cancelled("pull cancelled"))
                with contextlib.suppress(FileNotFoundError):
                    sp.path.unlink()
            for d in scratch.values():
                shutil.rmtree(d, ignore_errors=True)

    def _apply(
        self,
        lease: Lease,
        stream: Any,
        parent: str | None,
        diff_id: str,
        desc: mf.Descriptor,
        spool: Spool | None,
        apply: Any = None,
    ) -> Any:
        """Apply one layer; errors name the blob (a download error comes first: a
        corrupt blob fails as a verification failure, not as a broken tar)."""
        try:
            return lease.add_layer(stream, parent, expected_diff_id=diff_id, apply=apply)
        except (PalletError, OSError) as e:
            if spool is not None:
                with contextlib.suppress(Cancelled):
                    spool.wait()  # raises the download's own error, if it had one
            if isinstance(e, OSError):
                raise PalletError(f"failed to register layer {desc.digest}: {e}") from None
            if "does not match its diff ID" in e.message:
                raise InvalidArgument(
                    f"layer {desc.digest}: its content does not match diff ID "
                    f"{diff_id} of the image config"
                ) from None
            if isinstance(e, InvalidArgument):
                raise InvalidArgument(f"layer {desc.digest}: {e.message}") from None
            raise

    def _fetch_and_apply(
        self,
        res: Resolved,
        lease: Lease,
        jobs: list[tuple[int, mf.Descriptor]],
        diff_ids: list[str],
        start: int,
        parent: str | None,
    ) -> None:
        man = res.manifest
        spools: dict[str, Spool] = {}
        kept: set[str] = set()
        futures: list[Future[None]] = []
        pool = ThreadPoolExecutor(max_workers=MAX_CONCURRENT_DOWNLOADS, thread_name_prefix="pull")
        try:
            for n, (_i, desc) in enumerate(jobs):
                sp = Spool(self.content.tmp_path(), desc.digest, desc.size, self.cancel)
                spools[desc.digest] = sp
                if n >= MAX_CONCURRENT_DOWNLOADS:
                    self.progress.status("Waiting", short(desc.digest))
                futures.append(pool.submit(self._download, res.repo, desc, sp))
            for i in range(start, len(man.layers)):
                desc = man.layers[i]
                sid = short(desc.digest)
                sp = spools[desc.digest]
                cid = archive.chain_id(parent, diff_ids[i])
                if lease.use_layer(cid) is not None:  # a layer repeated in this image
                    parent = cid
                    continue

                def on_read(pos: int, sid: str = sid, size: int = desc.size) -> None:
                    self.progress.update("Extracting", sid, pos, size)

                if desc.digest in kept:  # the same blob again, at another place in the chain
                    with open(self.content.path(desc.digest), "rb") as f:
                        info = self._apply(lease, f, parent, diff_ids[i], desc, None)
                else:
                    reader = sp.reader(on_read)
                    try:
                        info = self._apply(lease, reader, parent, diff_ids[i], desc, sp)
                    finally:
                        reader.close()
                    sp.wait()  # the download is complete and verified
                    self.content.keep(
                        sp.path, desc.digest, info.diff_id, desc.media_type, desc.size
                    )
                    kept.add(desc.digest)
                    self.content.add_repo(desc.digest, f"{res.repo.endpoint.host}/{res.repo.path}")
                self.progress.update("Extracting", sid, desc.size, desc.size, force=True)
                self.progress.status("Pull complete", sid)
                parent = info.chain_id
        except BaseException:
            self.cancel.set()
            raise
        finally:
            pool.shutdown(wait=True)
            for sp in spools.values():
                if not sp.done:
                    sp.finish(Cancelled("pull cancelled"))
                with contextlib.suppress(FileNotFoundError):
                    sp.path.unlink()


def _move_tree(src: Path, dest: Path) -> None:
    """Move the entries of ``src`` into the empty directory ``dest`` (same filesystem)
    and give ``dest`` the metadata of ``src`` (a layer's own ``./`` entry, an opaque
    root)."""
    for name in os.listdir(src):
        os.rename(src / name, dest / name)
    st = os.lstat(src)
    os.chown(dest, st.st_uid, st.st_gid)
    os.chmod(dest, stat.S_IMODE(st.st_mode))
    for x in os.listxattr(src):
        os.setxattr(dest, x, os.getxattr(src, x))
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
