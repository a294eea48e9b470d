"""Linux capability sets for the native runtime: bounding, effective, permitted,
inheritable and ambient, set the way runc does it.

Order (runc's ``finalizeNamespace``), all in the container init before ``execve``:

1. :func:`drop_bounding` — drop every capability not in the bounding set;
2. :func:`keep_caps` — ``PR_SET_KEEPCAPS`` so that switching to a non-root uid does
   not empty the permitted set;
3. the caller switches user (setgroups/setgid/setuid);
4. :func:`apply_sets` — ``capset(2)`` effective/permitted/inheritable, then raise the
   ambient ones (``PR_CAP_AMBIENT``), which the kernel only allows for capabilities that
   are both permitted and inheritable.

A root process keeps after ``execve`` what its bounding set allows; a non-root one only
what it has in its ambient set (Docker sets none: ``-u 1000`` runs with CapEff 0).

Imported by :mod:`.libcontainer` at its top: after pivot_root nothing can be imported.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass, field

from pallet.capabilities import CAP_NUMBERS, CAPABILITIES

PR_CAPBSET_DROP = 24
PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc.capset.argtypes = [ctypes.POINTER(_Header), ctypes.POINTER(_Data * 2)]
_libc.capget.argtypes = [ctypes.POINTER(_Header), ctypes.POINTER(_Data * 2)]


def last_cap() -> int:
    """The highest capability number the running kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(CAPABILITIES) - 1


def numbers(names: list[str], what: str = "capability") -> set[int]:
    """Capability names (``CAP_CHOWN``) -> numbers; ValueError names an unknown one."""
    out = set()
    for name in names:
        if name not in CAP_NUMBERS:
            raise ValueError(f"unknown {what} {name!r}")
        out.add(CAP_NUMBERS[name])
    return out


def mask(caps: set[int]) -> int:
    """A set of capability numbers as the 64-bit mask /proc/<pid>/status shows."""
    value = 0
    for c in caps:
        value |= 1 << c
    return value


@dataclass
class CapSets:
    """The five sets, as capability numbers; ``None`` for bounding means "leave it"."""

    bounding: set[int] | None = None
    effective: set[int] = field(default_factory=set)
    permitted: set[int] = field(default_factory=set)
    inheritable: set[int] = field(default_factory=set)
    ambient: set[int] = field(default_factory=set)

    @classmethod
    def from_spec(cls, caps: dict[str, list[str]] | None) -> CapSets | None:
        """OCI ``process.capabilities`` -> sets; None when the spec says nothing (then
        the process keeps what it has, as runc does)."""
        if caps is None:
            return None
        return cls(
            bounding=numbers(caps["bounding"]) if caps.get("bounding") is not None else None,
            effective=numbers(caps.get("effective") or []),
            permitted=numbers(caps.get("permitted") or []),
            inheritable=numbers(caps.get("inheritable") or []),
            ambient=numbers(caps.get("ambient") or []),
        )


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    ret: int = _libc.prctl(option, arg2, arg3, 0, 0)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def drop_bounding(sets: CapSets) -> None:
    """Drop from the bounding set every capability the spec does not keep there."""
    if sets.bounding is None:
        return
    for cap in range(last_cap() + 1):
        if cap in sets.bounding:
            continue
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: the kernel does not know it
                raise


def keep_caps(on: bool = True) -> None:
    """``PR_SET_KEEPCAPS``: keep permitted capabilities across setuid to non-root."""
    _prctl(PR_SET_KEEPCAPS, 1 if on else 0)


def capset(effective: set[int], permitted: set[int], inheritable: set[int]) -> None:
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        lo, hi = 32 * i, 32 * (i + 1)
        data[i].effective = sum(1 << (c - lo) for c in effective if lo <= c < hi)
        data[i].permitted = sum(1 << (c - lo) for c in permitted if lo <= c < hi)
        data[i].inheritable = sum(1 << (c - lo) for c in inheritable if lo <= c < hi)
    if _libc.capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def capget(pid: int = 0) -> tuple[int, int, int]:
    """(effective, permitted, inheritable) masks of ``pid`` (0: the caller)."""
    header = _Header(_LINUX_CAPABILITY_VERSION_3, pid)
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(header), ctypes.byref(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    eff, prm, inh = (
        int(getattr(data[0], k)) | (int(getattr(data[1], k)) << 32)
        for k in ("effective", "permitted", "inheritable")
    )
    return eff, prm, inh


def apply_sets(sets: CapSets) -> None:
    """Set effective/permitted/inheritable (dropping what the kernel does not know) and
    the ambient set. Call after the user switch."""
    # Only what the kernel knows and this process holds (a sandboxed daemon may lack
    # some: --privileged then gets what there is rather than failing).
    held = capget()[1]
    known = {c for c in range(last_cap() + 1) if held >> c & 1}
    capset(sets.effective & known, sets.permitted & known, sets.inheritable & known)
    try:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as e:
        if e.errno != errno.EINVAL:  # kernels before 4.3 have no ambient set
            raise
        return
    for cap in sorted(sets.ambient & known):
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)
