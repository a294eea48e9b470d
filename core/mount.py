"""Mounting and unmounting the :class:`pallet.storage.Mount` descriptions drivers return."""

from __future__ import annotations

import os
from collections.abc import Sequence

from pallet import linux
from pallet.storage import Mount

_FLAGS = {
    "ro": linux.MS_RDONLY,
    "rw": 0,
    "nosuid": linux.MS_NOSUID,
    "nodev": linux.MS_NODEV,
    "noexec": linux.MS_NOEXEC,
    "bind": linux.MS_BIND,
    "rbind": linux.MS_BIND | linux.MS_REC,
}


def split_options(options: Sequence[str]) -> tuple[int, str]:
    """mount(8)-style options -> (flags, data string)."""
    flags, data = 0, []
    for opt in options:
        if opt in _FLAGS:
            flags |= _FLAGS[opt]
        else:
            data.append(opt)
    return flags, ",".join(data)


def mount_all(mounts: Sequence[Mount], target: str) -> None:
    """Mount ``mounts`` on ``target`` in order; on failure, undo what was mounted."""
    done = 0
    try:
        for m in mounts:
            flags, data = split_options(m.options)
            if m.type == "bind":
                flags |= linux.MS_BIND
                linux.mount(m.source, target, None, flags & ~linux.MS_RDONLY, None)
                if flags & linux.MS_RDONLY:  # read-only bind needs a remount
                    linux.mount(
                        None, target, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY
                    )
            elif m.type == "overlay" and len(data) >= PAGE_SIZE:
                mount_overlay_long(target, flags, data)
            else:
                linux.mount(m.source, target, m.type, flags, data or None)
            done += 1
    except OSError:
        for _ in range(done):
            unmount(target)
        raise


# --- overlay mounts whose options do not fit a page ------------------------------------
#
# mount(2) takes one page of options, so a deep chain of lower directories does not fit.
# Two ways around it, as containerd's mount code does: the new mount API, where
# ``lowerdir+`` adds one layer per fsconfig(2) call (Linux 6.5+; no length limit up to
# overlayfs' 500 layers), else lower directories relative to their common parent, mounted
# by a forked child that chdir()s there first (the daemon's threads keep their cwd).

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT, _SYS_MOVE_MOUNT = 430, 431, 432, 429  # x86_64
_FSCONFIG_SET_FLAG, _FSCONFIG_SET_STRING, _FSCONFIG_SET_FD, _FSCONFIG_CMD_CREATE = 0, 1, 5, 6
_MOUNT_ATTR = {
    linux.MS_RDONLY: 0x1,
    linux.MS_NOSUID: 0x2,
    linux.MS_NODEV: 0x4,
    linux.MS_NOEXEC: 0x8,
}
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_AT_FDCWD = -100
_lowerdir_plus: bool | None = None


def _sys(nr: int, *args: object) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(ctypes.c_long(nr), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _fsconfig(fd: int, key: str, value: str | None) -> None:
    import ctypes

    if value is None:
        _sys(_SYS_FSCONFIG, fd, _FSCONFIG_SET_FLAG, key.encode(), None, 0)
    elif len(value.encode()) > 255 and value.startswith("/"):
        # fsconfig(2) takes strings up to 256 bytes: a longer path goes as an open fd
        dfd = os.open(value, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _sys(_SYS_FSCONFIG, fd, _FSCONFIG_SET_FD, key.encode(), None, dfd)
        finally:
            os.close(dfd)
    else:
        _sys(
            _SYS_FSCONFIG,
            fd,
            _FSCONFIG_SET_STRING,
            key.encode(),
            ctypes.c_char_p(value.encode()),
            0,
        )


def supports_lowerdir_plus() -> bool:
    """Whether overlayfs takes ``lowerdir+`` through fsconfig(2) on this kernel."""
    global _lowerdir_plus
    if _lowerdir_plus is None:
        try:
            fd = _sys(_SYS_FSOPEN, b"overlay", 1)  # FSOPEN_CLOEXEC
        except OSError:
            _lowerdir_plus = False
            return False
        try:
            _fsconfig(fd, "lowerdir+", "/")
            _lowerdir_plus = True
        except OSError:
            _lowerdir_plus = False
        finally:
            os.close(fd)
    return _lowerdir_plus


def _overlay_options(data: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for opt in data.split(","):
        key, eq, value = opt.partition("=")
        out.append((key, value if eq else None))
    return out


def mount_overlay_long(target: str, flags: int, data: str) -> None:
    """Mount overlayfs with option ``data`` longer than a page on ``target``."""
    opts = _overlay_options(data)
    if supports_lowerdir_plus():
        try:
            _mount_new_api(target, flags, opts)
            return
        except OSError:
            pass  # paths the kernel takes neither as strings nor as fds: try relative ones
    _mount_relative(target, flags, opts)


def _mount_new_api(target: str, flags: int, opts: list[tuple[str, str | None]]) -> None:
    fd = _sys(_SYS_FSOPEN, b"overlay", 1)
    try:
        _fsconfig(fd, "source", "overlay")
        for key, value in opts:
            if key == "lowerdir" and value is not None:
                for layer in value.split(":"):
                    _fsconfig(fd, "lowerdir+", layer)
            else:
                _fsconfig(fd, key, value)
        _sys(_SYS_FSCONFIG, fd, _FSCONFIG_CMD_CREATE, None, None, 0)
        attrs = 0
        for flag, attr in _MOUNT_ATTR.items():
            if flags & flag:
                attrs |= attr
        mfd = _sys(_SYS_FSMOUNT, fd, 1, attrs)  # FSMOUNT_CLOEXEC
    finally:
        os.close(fd)
    try:
        _sys(_SYS_MOVE_MOUNT, mfd, b"", _AT_FDCWD, target.encode(), _MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(mfd)


def _mount_relative(target: str, flags: int, opts: list[tuple[str, str | None]]) -> None:
    """Lower directories relative to their common parent, mounted by a forked child
    that chdir()s there first."""
    lowers = next(v for k, v in opts if k == "lowerdir" and v is not None).split(":")
    base = os.path.commonpath([os.path.dirname(x) for x in lowers])
    rel = [os.path.relpath(x, base) for x in lowers]
    short = ",".join(
        "lowerdir=" + ":".join(rel) if k == "lowerdir" else (k if v is None else f"{k}={v}")
        for k, v in opts
    )
    if len(short) >= PAGE_SIZE:
        raise OSError(7, f"overlay mount options too long even relative to {base}")  # E2BIG
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.chdir(base)
            linux.mount("overlay", target, "overlay", flags, short)
        except OSError as e:
            code = e.errno or 1
        os.write(w, bytes([code]))
        os._exit(0)
    os.close(w)
    try:
        res = os.read(r, 1)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not res or res[0]:
        err = res[0] if res else 5
        raise OSError(err, f"mount overlay on {target}: {os.strerror(err)}")


def unmount(target: str) -> None:
    """Unmount ``target`` (lazily if busy); a target that is not mounted is fine."""
    try:
        linux.umount(target)
    except OSError as e:
        import errno

        if e.errno == errno.EINVAL:  # not a mount point
            return
        if e.errno == errno.EBUSY:
            linux.umount(target, linux.MNT_DETACH)
            return
        raise


def is_mountpoint(path: str) -> bool:
    """Whether ``path`` is a mount point, bind mounts of the same filesystem included
    (``os.path.ismount`` misses those), read from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ", 5)[4].replace("\\040", " ")
            if point == target:
                return True
    return False


def unmount_all(target: str) -> None:
    """Unmount every mount stacked on ``target``."""
    while is_mountpoint(target):
        unmount(target)
