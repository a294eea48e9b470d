"""Layer tar streams, generic over storage drivers.

Applying (``docker import``, pull, load)::

    result = apply_layer(stream, target, "overlay")   # or "delete"
    result.diff_id, result.size

reads a layer tar (plain, gzip, bzip2, xz or zstd, recognised by magic bytes), hashes
the *uncompressed* stream (the diff ID) and writes its entries under ``target``. OCI
whiteouts become what the driver asked for: ``"delete"`` removes the path (a complete
tree such as a vfs snapshot), ``"overlay"`` writes overlayfs whiteouts (a 0/0
character device, ``trusted.overlay.opaque=y``) into an upper directory.

Hostile archives are refused with :class:`~pallet.errors.InvalidArgument` naming the
entry: ``..`` components, symlinks whose relative target climbs out of the layer,
hardlinks to anything but an earlier entry of the same layer. Absolute names are made
relative, as Docker does. Every path is resolved inside ``target`` (``openat2`` with
``RESOLVE_IN_ROOT``, or the same walk done by hand): a symlink is followed as if
``target`` were ``/``, so nothing is ever written outside it.

The unpacking itself happens in :func:`_unpack` (in-process for now); that is the one
place to change to run it in a chrooted child process. Hashing and decompression stay
in the caller.

Producing tars (``docker export``, commit, save): :func:`write_tar` writes a directory
as a PAX tar; with ``whiteouts="overlay"`` an overlay upper directory becomes an OCI
layer diff (0/0 devices -> ``.wh.NAME``, opaque directories -> ``.wh..wh..opq``).
:func:`write_diff` compares two trees (for drivers without an upper directory), and
:func:`diff_snapshot` picks the right one for a driver's active snapshot.
"""

from __future__ import annotations

import bz2
import contextlib
import ctypes
import errno
import gzip
import hashlib
import logging
import lzma
import os
import posixpath
import secrets
import shutil
import stat
import subprocess
import tarfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Protocol, cast

from pallet import mount
from pallet.errors import InvalidArgument, NotFound
from pallet.storage import Mount, WhiteoutFormat

if TYPE_CHECKING:
    from pallet.storage import StorageDriver

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTR_PREFIX = "trusted.overlay."
# xattrs never taken from, nor written into, a layer tar: overlayfs' own bookkeeping
# (a layer must not forge redirects or whiteouts) and the host's security label.
_SKIP_XATTRS = ("trusted.overlay.", "security.selinux")

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ApplyResult:
    diff_id: str  # "sha256:<hex>" of the uncompressed tar stream
    size: int  # bytes of regular-file content the layer holds


class _Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


# --- decompression -----------------------------------------------------------------


class _Prefixed:
    """A reader that returns ``prefix`` and then the rest of ``src``."""

    def __init__(self, prefix: bytes, src: _Reader) -> None:
        self._prefix = prefix
        self._src = src

    def read(self, n: int = -1) -> bytes:
        if self._prefix:
            if n < 0:
                out, self._prefix = self._prefix + self._src.read(), b""
                return out
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        return self._src.read(n)

    def readable(self) -> bool:
        return True


def _read_exact(src: _Reader, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = src.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


class _Subprocess:
    """Decompress through an external program (zstd), fed by a thread."""

    def __init__(self, argv: list[str], src: _Reader) -> None:
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except FileNotFoundError:
            raise InvalidArgument(
                f"layer is {argv[0]}-compressed but {argv[0]} is not installed"
            ) from None
        self._argv0 = argv[0]
        self._src = src
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._feed, daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        assert self._proc.stdin is not None
        try:
            while chunk := self._src.read(_CHUNK):
                self._proc.stdin.write(chunk)
        except BrokenPipeError:
            pass
        except BaseException as e:  # reported by read()
            self._error = e
        finally:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()

    def read(self, n: int = -1) -> bytes:
        assert self._proc.stdout is not None
        data = self._proc.stdout.read(n)
        if not data:
            self._thread.join()
            rc = self._proc.wait()
            if self._error is not None:
                raise self._error
            if rc != 0:
                raise InvalidArgument(
                    f"decompressing layer failed ({self._argv0} exit status {rc})"
                )
        return data

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        assert self._proc.stdout is not None
        self._proc.stdout.close()
        self._thread.join(timeout=5)


def detect_compression(head: bytes) -> str:
    """``"gzip"``, ``"bzip2"``, ``"xz"``, ``"zstd"`` or ``"none"`` from the first bytes."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


class _Source:
    """The caller's stream; remembers a failure of its own so that it is reported as
    what it is (a client going away), not as corrupt data."""

    def __init__(self, stream: _Reader) -> None:
        self._stream = stream
        self.error: BaseException | None = None

    def read(self, n: int = -1) -> bytes:
        try:
            return self._stream.read(n)
        except BaseException as e:
            self.error = e
            raise

    def readable(self) -> bool:
        return True


@contextlib.contextmanager
def _decompressor(src: _Source) -> Iterator[_Reader]:
    head = _read_exact(src, 6)
    pre = _Prefixed(head, src)
    kind = detect_compression(head)
    if kind == "none":
        yield pre
    elif kind == "gzip":
        with gzip.GzipFile(fileobj=cast(Any, pre), mode="rb") as g:
            yield g
    elif kind == "bzip2":
        with bz2.BZ2File(cast(Any, pre), mode="rb") as b:
            yield b
    elif kind == "xz":
        with lzma.LZMAFile(cast(Any, pre), mode="rb") as x:
            yield x
    else:
        z = _Subprocess(["zstd", "-dcq"], pre)
        try:
            yield z
        finally:
            z.close()


@contextlib.contextmanager
def decompressed(stream: _Reader) -> Iterator[_Reader]:
    """The uncompressed bytes of ``stream``, whatever its compression."""
    src = _Source(stream)
    with _decompressor(src) as raw:
        yield _Hashing(raw, src)


class _Hashing:
    """Hashes (sha256) and counts what is read through it; decompression errors become
    ``InvalidArgument``, the source's own errors pass unchanged."""

    def __init__(self, src: _Reader, source: _Source) -> None:
        self._src = src
        self._source = source
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._src.read(n)
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
            if self._source.error is not None:
                raise self._source.error from None
            if isinstance(e, OSError) and e.errno is not None:
                raise
            raise InvalidArgument(f"invalid compressed layer: {e}") from e
        self.hash.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


# --- openat2 / in-root path resolution ----------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_OPENAT2 = 437  # the same number on every architecture (a post-5.x syscall)
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_MAX_SYMLINKS = 40


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


# None: not tried yet; False: the kernel lacks openat2 (or a test turned it off).
_have_openat2: bool | None = None


def _openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def _open_manual(root_fd: int, rel: str) -> int:
    """Open directory ``rel`` under ``root_fd`` following symlinks as if root_fd were
    ``/`` (what openat2's RESOLVE_IN_ROOT does), without crossing mount points."""
    root_dev = os.fstat(root_fd).st_dev
    stack: list[int] = []
    cur = os.dup(root_fd)
    parts = [p for p in rel.split("/")][::-1]  # a stack: next component last
    hops = 0
    try:
        while parts:
            p = parts.pop()
            if p in ("", "."):
                continue
            if p == "..":
                if stack:
                    os.close(cur)
                    cur = stack.pop()
                continue
            fd = os.open(p, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                os.close(fd)
                hops += 1
                if hops > _MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
                target = os.readlink(p, dir_fd=cur)
                if target.startswith("/"):
                    for f in stack:
                        os.close(f)
                    stack.clear()
                    os.close(cur)
                    cur = os.dup(root_fd)
                parts.extend(target.split("/")[::-1])
                continue
            if st.st_dev != root_dev:
                os.close(fd)
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), rel)
            if not stat.S_ISDIR(st.st_mode):
                os.close(fd)
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
            stack.append(cur)
            cur = fd
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
    finally:
        os.close(cur)
        for f in stack:
            os.close(f)


def open_dir_in_root(root_fd: int, rel: str) -> int:
    """An O_RDONLY fd of directory ``rel`` resolved inside ``root_fd``."""
    global _have_openat2
    if not rel:
        return os.dup(root_fd)
    if _have_openat2 is not False:
        try:
            fd = _openat2(
                root_fd,
                rel,
                os.O_RDONLY | os.O_DIRECTORY,
                _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV,
            )
            _have_openat2 = True
            return fd
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM) or _have_openat2:
                raise
            _have_openat2 = False  # ENOSYS, or EPERM from a seccomp filter
    return _open_manual(root_fd, rel)


# --- names ---------------------------------------------------------------------------


def clean_name(name: str, what: str = "entry") -> str:
    """A tar member name as a relative path inside the layer ("" for the root).

    Leading ``/`` and ``./`` are dropped (Docker makes absolute names relative); any
    ``..`` component is refused.
    """
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            raise InvalidArgument(f"invalid layer {what} {name!r}: '..' leads out of the layer")
        parts.append(p)
    return "/".join(parts)


def _split(rel: str) -> tuple[str, str]:
    i = rel.rfind("/")
    return (rel[:i], rel[i + 1 :]) if i >= 0 else ("", rel)


def _time_ns(ti: tarfile.TarInfo, key: str, default: float) -> int:
    raw = ti.pax_headers.get(key)
    if raw is not None:
        sec, _, frac = raw.partition(".")
        try:
            neg = sec.startswith("-")
            ns = abs(int(sec)) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
            return -ns if neg else ns
        except ValueError:
            pass
    return int(default * 1_000_000_000)


def _xattrs(ti: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for k, v in ti.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            out[k[len("SCHILY.xattr.") :]] = v.encode("utf-8", "surrogateescape")
        elif k.startswith("LIBARCHIVE.xattr."):
            import base64
            import urllib.parse

            name = urllib.parse.unquote(k[len("LIBARCHIVE.xattr.") :])
            with contextlib.suppress(ValueError):
                out.setdefault(name, base64.b64decode(v + "=" * (-len(v) % 4)))
    return {k: v for k, v in out.items() if not k.startswith(_SKIP_XATTRS)}


# --- unpacking -------------------------------------------------------------------------


class _Unpacker:
    """Writes tar members under a root directory fd. Not thread-safe; one per layer."""

    def __init__(self, root: Path, whiteouts: WhiteoutFormat) -> None:
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.whiteouts = whiteouts
        self.written: set[str] = set()  # names this layer created (for opaque dirs)
        self.files: set[str] = set()  # non-directories this layer created (hardlinks)
        self.dirs: list[tuple[str, int, int]] = []  # (name, atime_ns, mtime_ns), set last
        self.size = 0

    def close(self) -> None:
        os.close(self.root_fd)

    # parent directories ------------------------------------------------------------

    def _opendir(self, rel: str, entry: str) -> int:
        """fd of directory ``rel`` (resolved in the root), created 0755 when missing."""
        try:
            return open_dir_in_root(self.root_fd, rel)
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            raise InvalidArgument(
                f"invalid layer entry {entry!r}: {rel!r} is not a directory"
            ) from None
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ELOOP):
                raise InvalidArgument(
                    f"invalid layer entry {entry!r}: cannot resolve {rel!r}: {e.strerror}"
                ) from None
            raise
        parent, base = _split(rel)
        pfd = self._opendir(parent, entry)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(base, 0o755, dir_fd=pfd)
                self.written.add(rel)
            try:
                return os.open(
                    base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd
                )
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise InvalidArgument(
                        f"invalid layer entry {entry!r}: {rel!r} is not a directory"
                    ) from None
                raise
        finally:
            os.close(pfd)

    # helpers -------------------------------------------------------------------------

    @staticmethod
    def _lstat(pfd: int, base: str) -> os.stat_result | None:
        try:
            return os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    @staticmethod
    def _remove(pfd: int, base: str, st: os.stat_result | None = None) -> None:
        if st is None:
            st = _Unpacker._lstat(pfd, base)
            if st is None:
                return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(base, dir_fd=pfd)
        else:
            os.unlink(base, dir_fd=pfd)

    def _xattrs_at(self, pfd: int, base: str, xattrs: dict[str, bytes], entry: str) -> None:
        """xattrs of a symlink or device node, through its /proc/self/fd path (in the
        chrooted unpacker: the host's /proc, reached through a kept fd)."""
        if not xattrs:
            return
        if _host_proc is None:
            self._set_xattrs(f"/proc/self/fd/{pfd}/{base}", xattrs, entry)
            return
        os.fchdir(_host_proc)
        try:
            self._set_xattrs(f"self/fd/{pfd}/{base}", xattrs, entry)
        finally:
            os.chdir("/")

    @staticmethod
    def _set_xattrs(target: int | str, xattrs: dict[str, bytes], entry: str) -> None:
        for k, v in xattrs.items():
            try:
                if isinstance(target, int):
                    os.setxattr(target, k, v)
                else:
                    os.setxattr(target, k, v, follow_symlinks=False)
            except OSError as e:
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    log.warning("xattr %s of %s not supported here, ignored", k, entry)
                elif e.errno == errno.EPERM and k.startswith("user."):
                    log.warning("xattr %s of %s not allowed on this file type, ignored", k, entry)
                else:
                    raise

    # members -------------------------------------------------------------------------

    def apply(self, tf: tarfile.TarFile) -> None:
        while True:
            try:
                ti = tf.next()
            except tarfile.TarError as e:
                raise InvalidArgument(f"invalid layer tar: {e}") from e
            if ti is None:
                break
            cast(Any, tf).members.clear()  # stream mode: don't keep every header in memory
            self._member(tf, ti)
        self._finish_dirs()

    def _member(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        name = clean_name(ti.name)
        parent, base = _split(name)
        if base.startswith(WHITEOUT_META_PREFIX) and base != WHITEOUT_OPAQUE:
            return  # AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): not part of the tree
        if any(p.startswith(WHITEOUT_META_PREFIX) for p in parent.split("/")):
            return
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(name, parent, base, ti)
            return
        if name == "":
            if not ti.isdir():
                raise InvalidArgument(f"invalid layer entry {ti.name!r}: the root must be a dir")
            fd = os.dup(self.root_fd)
            try:
                self._meta_fd(fd, ti, name)
            finally:
                os.close(fd)
            self.dirs.append(("", _time_ns(ti, "atime", ti.mtime), _time_ns(ti, "mtime", ti.mtime)))
            return

        pfd = self._opendir(parent, ti.name)
        try:
            st = self._lstat(pfd, base)
            if st is not None and not (stat.S_ISDIR(st.st_mode) and ti.isdir()):
                self._remove(pfd, base, st)
                st = None
            self._create(pfd, base, name, ti, tf, merge=st is not None)
        finally:
            os.close(pfd)
        self.written.add(name)
        if ti.isdir():
            self.files.discard(name)
        else:
            self.files.add(name)

    def _meta_fd(self, fd: int, ti: tarfile.TarInfo, name: str) -> None:
        os.fchown(fd, ti.uid, ti.gid)
        os.fchmod(fd, ti.mode & 0o7777)
        self._set_xattrs(fd, _xattrs(ti), name)

    def _create(
        self,
        pfd: int,
        base: str,
        name: str,
        ti: tarfile.TarInfo,
        tf: tarfile.TarFile,
        merge: bool,
    ) -> None:
        mtime = _time_ns(ti, "mtime", ti.mtime)
        atime = _time_ns(ti, "atime", ti.mtime)
        if ti.isdir():
            if not merge:
                os.mkdir(base, 0o700, dir_fd=pfd)
            fd = os.open(
                base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd
            )
            try:
                self._meta_fd(fd, ti, name)
            finally:
                os.close(fd)
            self.dirs.append((name, atime, mtime))
        elif ti.isreg():
            fd = os.open(
                base,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=pfd,
            )
            try:
                src = tf.extractfile(ti)
                assert src is not None
                with os.fdopen(fd, "wb", closefd=False) as out:
                    try:
                        shutil.copyfileobj(src, out, _CHUNK)
                    except tarfile.TarError as e:
                        raise InvalidArgument(f"invalid layer tar at {ti.name!r}: {e}") from e
                self._meta_fd(fd, ti, name)
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)
            self.size += ti.size
        elif ti.issym():
            link = ti.linkname
            if not link.startswith("/"):
                joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
                if joined == ".." or joined.startswith("../"):
                    raise InvalidArgument(
                        f"invalid layer entry {ti.name!r}: symlink to {link!r} leads out of the layer"
                    )
            os.symlink(link, base, dir_fd=pfd)
            os.chown(base, ti.uid, ti.gid, dir_fd=pfd, follow_symlinks=False)
            self._xattrs_at(pfd, base, _xattrs(ti), name)
            os.utime(base, ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)
        elif ti.islnk():
            target = clean_name(ti.linkname, "hardlink target")
            if target not in self.files:
                raise InvalidArgument(
                    f"invalid layer entry {ti.name!r}: hardlink to {ti.linkname!r}, which is "
                    "not an earlier file of this layer"
                )
            tparent, tbase = _split(target)
            tfd = self._opendir(tparent, ti.name)
            try:
                os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                raise InvalidArgument(
                    f"invalid layer entry {ti.name!r}: hardlink target {ti.linkname!r} is gone"
                ) from None
            finally:
                os.close(tfd)
        elif ti.ischr() or ti.isblk() or ti.isfifo():
            kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK if ti.isblk() else stat.S_IFIFO
            if kind == stat.S_IFCHR and ti.devmajor == 0 and ti.devminor == 0:
                # overlayfs reads a 0/0 character device as a whiteout: a layer would
                # hide files of the layers below without saying so (OCI: .wh.NAME)
                raise InvalidArgument(
                    f"invalid layer entry {ti.name!r}: a 0/0 character device is an overlay "
                    "whiteout; layers must use .wh. entries"
                )
            dev = os.makedev(ti.devmajor, ti.devminor) if kind != stat.S_IFIFO else 0
            os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
            os.chown(base, ti.uid, ti.gid, dir_fd=pfd, follow_symlinks=False)
            os.chmod(base, ti.mode & 0o7777, dir_fd=pfd)
            self._xattrs_at(pfd, base, _xattrs(ti), name)
            os.utime(base, ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)
        else:
            raise InvalidArgument(
                f"invalid layer entry {ti.name!r}: unsupported tar type {ti.type!r}"
            )

    def _whiteout(self, name: str, parent: str, base: str, ti: tarfile.TarInfo) -> None:
        pfd = self._opendir(parent, ti.name)
        try:
            if base == WHITEOUT_OPAQUE:
                if self.whiteouts == "overlay":
                    os.setxattr(pfd, OVERLAY_OPAQUE_XATTR, b"y")
                else:
                    self._empty_lower(pfd, parent)
                return
            victim = base[len(WHITEOUT_PREFIX) :]
            if victim in ("", ".", "..") or victim.startswith(WHITEOUT_PREFIX):
                raise InvalidArgument(f"invalid layer entry {ti.name!r}: invalid whiteout")
            vname = f"{parent}/{victim}" if parent else victim
            if self.whiteouts == "overlay":
                self._remove(pfd, victim)
                os.mknod(victim, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=pfd)
                os.chown(victim, ti.uid, ti.gid, dir_fd=pfd, follow_symlinks=False)
            else:
                self._remove(pfd, victim)
            self.written.discard(vname)
            self.files.discard(vname)
        finally:
            os.close(pfd)

    def _empty_lower(self, dfd: int, rel: str) -> None:
        """Opaque directory, "delete" format: remove what lower layers put in it."""
        for child in os.listdir(dfd):
            crel = f"{rel}/{child}" if rel else child
            st = self._lstat(dfd, child)
            if st is None:
                continue
            if crel not in self.written:
                self._remove(dfd, child, st)
            elif stat.S_ISDIR(st.st_mode):
                cfd = os.open(
                    child, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd
                )
                try:
                    self._empty_lower(cfd, crel)
                finally:
                    os.close(cfd)

    def _finish_dirs(self) -> None:
        for name, atime, mtime in self.dirs:
            if name == "":
                os.utime(self.root_fd, ns=(atime, mtime))
                continue
            parent, base = _split(name)
            try:
                pfd = open_dir_in_root(self.root_fd, parent)
            except OSError:
                continue  # removed by a later whiteout
            try:
                st = self._lstat(pfd, base)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    os.utime(base, ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(pfd)


def _unpack_in_process(reader: _Reader, target: Path, whiteouts: WhiteoutFormat) -> int:
    """Unpack an uncompressed layer tar under ``target``; returns the content size."""
    u = _Unpacker(target, whiteouts)
    try:
        try:
            tf = tarfile.open(fileobj=reader, mode="r|", bufsize=_CHUNK)  # type: ignore[call-overload]
        except tarfile.ReadError as e:
            if str(e) == "empty file":  # only end-of-archive blocks: an empty layer
                return 0
            raise
        try:
            u.apply(tf)
        finally:
            tf.close()
        return u.size
    finally:
        u.close()


# Set in the chrooted unpacker (pallet.untar): an fd of the host's /proc.
_host_proc: int | None = None


def _unpack_in_child(reader: _Reader, target: Path, whiteouts: WhiteoutFormat) -> int:
    """Unpack in a child process chrooted into ``target`` (:mod:`pallet.untar`), fed the
    uncompressed stream through a pipe: off the daemon's GIL, and a layer's paths cannot
    name anything outside ``target`` even if a check were missed. Returns the size."""
    from pallet.untar import run_child

    return int(run_child(reader, target, whiteouts)["size"])


# The one place that decides where unpacking runs: a chrooted child process reading the
# uncompressed stream from a pipe (PALLET_UNPACK_IN_PROCESS=1: in the caller's thread).
_unpack = (
    _unpack_in_process if os.environ.get("PALLET_UNPACK_IN_PROCESS") == "1" else _unpack_in_child
)


def apply_layer(stream: _Reader, target: Path, whiteouts: WhiteoutFormat) -> ApplyResult:
    """Apply a (possibly compressed) layer tar under ``target``. Blocking.

    On error the target is left partly written: the caller owns it (the Graph writes
    into a temporary snapshot and removes it).
    """
    source = _Source(stream)
    with _decompressor(source) as raw:
        h = _Hashing(raw, source)
        head = _read_exact(h, 1)
        if head:
            src = _Prefixed(head, h)
            try:
                size = _unpack(src, target, whiteouts)
            except tarfile.TarError as e:
                raise InvalidArgument(f"invalid layer tar: {e}") from e
        else:
            size = 0  # an empty stream is an empty layer, as in Docker
        h.drain()
    return ApplyResult("sha256:" + h.hash.hexdigest(), size)


def apply_to_snapshot(
    driver: StorageDriver, key: str, stream: _Reader, scratch: Path
) -> ApplyResult:
    """Apply a layer to active snapshot ``key``: straight into the driver's
    :meth:`~pallet.storage.StorageDriver.apply_target` when it has one, else by mounting
    the snapshot on a temporary directory under ``scratch``."""
    fast = driver.apply_target(key)
    if fast is not None:
        return apply_layer(stream, fast[0], fast[1])
    mnt = scratch / f"mnt-{secrets.token_hex(8)}"
    mnt.mkdir(parents=True)
    try:
        mount.mount_all(driver.mounts(key), str(mnt))
        try:
            return apply_layer(stream, mnt, "delete")
        finally:
            mount.unmount(str(mnt))
    finally:
        mnt.rmdir()


# --- writing tars ----------------------------------------------------------------------

_BLOCK = 512


def _octal(value: int, width: int) -> bytes | None:
    s = b"%0*o" % (width - 1, value)
    return s + b"\0" if len(s) <= width - 1 else None


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    n = len(body)
    length = n + len(str(n))
    if len(str(length)) != len(str(n)):
        length = n + len(str(length))
    return str(length).encode() + body


class TarWriter:
    """A minimal PAX tar writer: exact control over names, xattrs (binary values
    included, which :mod:`tarfile` cannot write) and whiteout entries."""

    def __init__(self, out: IO[bytes] | BinaryIO) -> None:
        self.out = out
        self.count = 0

    def _header(
        self,
        name: str,
        typeflag: bytes,
        *,
        mode: int = 0,
        uid: int = 0,
        gid: int = 0,
        size: int = 0,
        mtime: int = 0,
        linkname: str = "",
        devmajor: int = 0,
        devminor: int = 0,
    ) -> tuple[bytes, list[tuple[str, bytes]]]:
        fields = [
            ("name", name.encode("utf-8", "surrogateescape"), 100),
            ("linkname", linkname.encode("utf-8", "surrogateescape"), 100),
        ]
        pax: list[tuple[str, bytes]] = []
        enc: dict[str, bytes] = {}
        for key, raw, width in fields:
            if len(raw) > width or not raw.isascii():
                pax.append(("path" if key == "name" else "linkpath", raw))
                raw = raw[:width]
            enc[key] = raw.ljust(width, b"\0")
        nums: dict[str, bytes] = {}
        for key, value, width, paxkey in (
            ("mode", mode, 8, ""),
            ("uid", uid, 8, "uid"),
            ("gid", gid, 8, "gid"),
            ("size", size, 12, "size"),
            ("mtime", max(mtime, 0), 12, "mtime"),
            ("devmajor", devmajor, 8, ""),
            ("devminor", devminor, 8, ""),
        ):
            o = _octal(value, width)
            if o is None:
                if not paxkey:
                    raise ValueError(f"{key} {value} does not fit a tar header")
                pax.append((paxkey, str(value).encode()))
                o = _octal(0, width)
                assert o is not None
            nums[key] = o
        return self._pack(enc, nums, typeflag), pax

    @staticmethod
    def _pack(enc: dict[str, bytes], nums: dict[str, bytes], typeflag: bytes) -> bytes:
        hdr = (
            enc["name"]
            + nums["mode"]
            + nums["uid"]
            + nums["gid"]
            + nums["size"]
            + nums["mtime"]
            + b" " * 8
            + typeflag
            + enc["linkname"]
            + b"ustar\x0000"
            + b"\0" * 32
            + b"\0" * 32
            + nums["devmajor"]
            + nums["devminor"]
            + b"\0" * 155
        ).ljust(_BLOCK, b"\0")
        chksum = b"%06o\0 " % sum(hdr)
        return hdr[:148] + chksum + hdr[156:]

    def add(
        self,
        name: str,
        typeflag: bytes,
        *,
        mode: int = 0,
        uid: int = 0,
        gid: int = 0,
        size: int = 0,
        mtime: int = 0,
        linkname: str = "",
        devmajor: int = 0,
        devminor: int = 0,
        xattrs: dict[str, bytes] | None = None,
        data: IO[bytes] | BinaryIO | None = None,
    ) -> None:
        """Write one member; ``data`` supplies ``size`` bytes for a regular file."""
        hdr, pax = self._header(
            name,
            typeflag,
            mode=mode,
            uid=uid,
            gid=gid,
            size=size,
            mtime=mtime,
            linkname=linkname,
            devmajor=devmajor,
            devminor=devminor,
        )
        for k, v in sorted((xattrs or {}).items()):
            pax.append(("SCHILY.xattr." + k, v))
        if pax:
            body = b"".join(_pax_record(k, v) for k, v in pax)
            d, b = posixpath.split(name.rstrip("/"))
            pname = posixpath.join(d, "PaxHeaders.0", b)[:100]
            phdr, _ = self._header(pname, b"x", mode=0o644, size=len(body))
            self.out.write(phdr)
            self._write_padded(body)
        self.out.write(hdr)
        if data is not None and size:
            left = size
            while left:
                chunk = data.read(min(left, _CHUNK))
                if not chunk:
                    raise OSError(errno.EIO, f"{name} shrank while being archived")
                self.out.write(chunk)
                left -= len(chunk)
            pad = -size % _BLOCK
            if pad:
                self.out.write(b"\0" * pad)
        self.count += 1

    def _write_padded(self, body: bytes) -> None:
        self.out.write(body)
        pad = -len(body) % _BLOCK
        if pad:
            self.out.write(b"\0" * pad)

    def close(self) -> None:
        self.out.write(b"\0" * (2 * _BLOCK))


def _read_xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out = {}
    for n in names:
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    return out


class _TreeWriter:
    """Writes files of a tree into a :class:`TarWriter`, tracking hardlinks."""

    def __init__(self, tw: TarWriter, root: Path, overlay: bool) -> None:
        self.tw = tw
        self.root = str(root)
        self.overlay = overlay
        self.inodes: dict[tuple[int, int], str] = {}

    def add(self, rel: str, st: os.stat_result | None = None) -> None:
        path = os.path.join(self.root, rel)
        if st is None:
            st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        common: dict[str, Any] = {
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime": int(st.st_mtime),
        }
        fmt = stat.S_IFMT(st.st_mode)
        parent, base = _split(rel)
        if self.overlay and fmt == stat.S_IFCHR and st.st_rdev == 0:
            wh = f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else WHITEOUT_PREFIX + base
            self.tw.add(wh, b"0", mode=0o600, **common)
            return
        xattrs = {k: v for k, v in _read_xattrs(path).items() if not k.startswith(_SKIP_XATTRS)}
        if fmt == stat.S_IFDIR:
            self.tw.add(rel + "/", b"5", mode=mode, xattrs=xattrs, **common)
            if self.overlay and self._opaque(path):
                self.tw.add(f"{rel}/{WHITEOUT_OPAQUE}", b"0", mode=mode & 0o777, **common)
            return
        if st.st_nlink > 1:
            first = self.inodes.get((st.st_dev, st.st_ino))
            if first is not None:
                self.tw.add(rel, b"1", mode=mode, linkname=first, xattrs=xattrs, **common)
                return
            self.inodes[(st.st_dev, st.st_ino)] = rel
        if fmt == stat.S_IFREG:
            with open(path, "rb") as f:
                self.tw.add(rel, b"0", mode=mode, size=st.st_size, xattrs=xattrs, data=f, **common)
        elif fmt == stat.S_IFLNK:
            self.tw.add(rel, b"2", mode=mode, linkname=os.readlink(path), xattrs=xattrs, **common)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            self.tw.add(
                rel,
                b"3" if fmt == stat.S_IFCHR else b"4",
                mode=mode,
                devmajor=os.major(st.st_rdev),
                devminor=os.minor(st.st_rdev),
                xattrs=xattrs,
                **common,
            )
        elif fmt == stat.S_IFIFO:
            self.tw.add(rel, b"6", mode=mode, xattrs=xattrs, **common)
        # sockets are not archived (as in Docker)

    @staticmethod
    def _opaque(path: str) -> bool:
        try:
            return os.getxattr(path, OVERLAY_OPAQUE_XATTR, follow_symlinks=False) == b"y"
        except OSError:
            return False

    def walk(self, rel: str = "") -> None:
        """Every entry under ``rel`` (not ``rel`` itself), parents before children."""
        path = os.path.join(self.root, rel) if rel else self.root
        for name in sorted(os.listdir(path)):
            crel = f"{rel}/{name}" if rel else name
            st = os.lstat(os.path.join(path, name))
            self.add(crel, st)
            if stat.S_ISDIR(st.st_mode):
                self.walk(crel)


def write_tar(
    root: Path, out: IO[bytes] | BinaryIO, *, whiteouts: WhiteoutFormat | None = None
) -> None:
    """Write the tree under ``root`` as a tar to ``out`` (``docker export``).

    ``whiteouts="overlay"``: ``root`` is an overlay upper directory; its 0/0 character
    devices become ``.wh.NAME`` entries and opaque directories get a ``.wh..wh..opq``
    entry, which makes the tar an OCI layer diff.
    """
    tw = TarWriter(out)
    _TreeWriter(tw, root, whiteouts == "overlay").walk()
    tw.close()


# --- compare-based diff --------------------------------------------------------------


def _differs(a: os.stat_result, b: os.stat_result, pa: str, pb: str) -> bool:
    if (
        a.st_mode != b.st_mode
        or a.st_uid != b.st_uid
        or a.st_gid != b.st_gid
        or a.st_rdev != b.st_rdev
    ):
        return True
    if not stat.S_ISDIR(a.st_mode) and (a.st_mtime_ns != b.st_mtime_ns or a.st_size != b.st_size):
        return True
    if stat.S_ISLNK(a.st_mode) and os.readlink(pa) != os.readlink(pb):
        return True
    return _read_xattrs(pa) != _read_xattrs(pb)


def changes(lower: Path | None, upper: Path) -> list[tuple[str, int]]:
    """What changed from ``lower`` to ``upper``: ``(path, kind)`` with Docker's kinds
    (0 modified, 1 added, 2 deleted), paths relative, parents before children; a
    directory with changes inside is listed as modified (as Docker's ChangesDirs)."""
    out: list[tuple[str, int]] = []

    def listdir(path: str) -> set[str]:
        try:
            return set(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return set()

    def added(rel: str) -> None:
        up = os.path.join(upper, rel)
        for name in sorted(os.listdir(up)):
            crel = f"{rel}/{name}"
            out.append((crel, 1))
            if stat.S_ISDIR(os.lstat(os.path.join(up, name)).st_mode):
                added(crel)

    def walk(rel: str) -> None:
        up = os.path.join(upper, rel)
        lo = os.path.join(lower, rel) if lower is not None else None
        new = listdir(up)
        old = listdir(lo) if lo is not None else set()
        for name in sorted(new | old):
            crel = f"{rel}/{name}" if rel else name
            if name not in new:
                out.append((crel, 2))
                continue
            pu = os.path.join(up, name)
            su = os.lstat(pu)
            if name not in old:
                out.append((crel, 1))
                if stat.S_ISDIR(su.st_mode):
                    added(crel)
                continue
            assert lo is not None
            pl = os.path.join(lo, name)
            sl = os.lstat(pl)
            if stat.S_ISDIR(su.st_mode) and stat.S_ISDIR(sl.st_mode):
                mark = len(out)
                changed = _differs(sl, su, pl, pu)
                walk(crel)
                if changed or len(out) != mark:
                    out.insert(mark, (crel, 0))
            elif _differs(sl, su, pl, pu):
                out.append((crel, 0))
                if stat.S_ISDIR(su.st_mode):  # a file replaced by a directory
                    added(crel)

    walk("")
    return out


def write_diff(lower: Path | None, upper: Path, out: IO[bytes] | BinaryIO) -> None:
    """Write the layer diff that turns ``lower`` (None: empty) into ``upper``."""
    tw = TarWriter(out)
    w = _TreeWriter(tw, upper, overlay=False)
    for rel, kind in changes(lower, upper):
        if kind == 2:
            parent, base = _split(rel)
            st = os.lstat(os.path.join(lower, rel)) if lower is not None else None
            wh = f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else WHITEOUT_PREFIX + base
            tw.add(wh, b"0", mode=0o600, mtime=int(st.st_mtime) if st else 0)
        else:
            w.add(rel)
    tw.close()


def export_snapshot(mounts: list[Mount], out: IO[bytes] | BinaryIO, scratch: Path) -> None:
    """Mount ``mounts`` (a snapshot's) under ``scratch`` and write the tree as a tar."""
    scratch.mkdir(parents=True, exist_ok=True)
    mnt = scratch / f"export-{secrets.token_hex(8)}"
    mnt.mkdir()
    try:
        mount.mount_all(mounts, str(mnt))
        try:
            write_tar(mnt, out)
        finally:
            mount.unmount(str(mnt))
    finally:
        mnt.rmdir()


def diff_snapshot(
    driver: StorageDriver, key: str, out: IO[bytes] | BinaryIO, scratch: Path
) -> None:
    """Write the changes of active snapshot ``key`` against its parent as a layer tar.

    Overlay-style drivers: straight from the upper directory. Others: the snapshot and
    a read-only view of its parent are compared (mounted under ``scratch``).
    """
    fast = driver.apply_target(key)
    if fast is not None and fast[1] == "overlay":
        write_tar(fast[0], out, whiteouts="overlay")
        return
    info = driver.stat(key)
    mounted: list[str] = []
    view_key = None
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        if fast is not None:
            upper = fast[0]
        else:
            upper = scratch / f"diff-{secrets.token_hex(8)}"
            upper.mkdir()
            mounted.append(str(upper))
            mount.mount_all(driver.mounts(key), str(upper))
        lower: Path | None = None
        if info.parent is not None:
            view_key = f"tmp-diff-{secrets.token_hex(8)}"
            mounts = driver.view(view_key, info.parent)
            lower = scratch / view_key
            lower.mkdir()
            mounted.append(str(lower))
            mount.mount_all(mounts, str(lower))
        write_diff(lower, upper, out)
    finally:
        for m in reversed(mounted):
            mount.unmount(m)
            with contextlib.suppress(OSError):
                os.rmdir(m)
        if view_key is not None:
            with contextlib.suppress(NotFound):
                driver.remove(view_key)


def chain_id(parent: str | None, diff_id: str) -> str:
    """chainID(n) = sha256(chainID(n-1) + " " + diffID(n)); chainID(1) = diffID(1)."""
    if parent is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()
