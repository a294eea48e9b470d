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
            else:
                linux.mount(m.source, target, m.type, flags, data or None)
            done += 1
    except OSError:
        for _ in range(done):
            unmount(target)
        raise


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
