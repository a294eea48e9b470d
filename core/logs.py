"""Reading Docker's json-file logs (the shim writes them; see :mod:`pallet.shim`).

One JSON object per line: ``{"log": "hi\\n", "stream": "stdout", "time": "...Z"}``.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from pallet.errors import InvalidArgument


@dataclass(frozen=True)
class Entry:
    stream: str
    data: bytes
    time: str  # RFC 3339 with nanoseconds, as written


def parse_time(value: str) -> float:
    """Docker's ``since``/``until``: unix seconds (``1700000000.5``) or RFC 3339."""
    if not value:
        return 0.0
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return rfc3339_to_unix(value)
    except ValueError:
        raise InvalidArgument(
            f"invalid time value {value!r}: expected unix seconds or RFC 3339"
        ) from None


def rfc3339_to_unix(value: str) -> float:
    """Parse RFC 3339 with up to nanosecond precision."""
    value = value.strip()
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    main, frac = value, ""
    if "." in value:
        head, rest = value.split(".", 1)
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        main, frac = head + rest, digits
    ts = datetime.fromisoformat(main).timestamp()
    return ts + (float("0." + frac) if frac else 0.0)


def now_rfc3339() -> str:
    """Now, as Docker writes times: RFC 3339, UTC, nanosecond digits."""
    import time

    ns = time.time_ns()
    secs, rem = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{rem:09d}Z"


def parse_line(line: bytes) -> Entry | None:
    try:
        obj = json.loads(line)
        return Entry(obj.get("stream", "stdout"), obj.get("log", "").encode(), obj.get("time", ""))
    except (json.JSONDecodeError, AttributeError):
        return None  # a torn last line after a crash: skip it


class LogReader:
    """Reads a json-file log from the start, then incrementally as it grows."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self._partial = b""

    def read_new(self) -> list[Entry]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # incomplete until its newline arrives
        return [e for e in (parse_line(line) for line in lines if line) if e is not None]


def select(
    entries: Iterator[Entry] | list[Entry],
    *,
    stdout: bool,
    stderr: bool,
    since: float = 0.0,
    until: float = 0.0,
    tail: int = -1,
) -> list[Entry]:
    """Filter entries as ``GET /containers/{id}/logs`` does; ``tail`` < 0 means all."""
    streams = {"stdout"} if stdout else set()
    if stderr:
        streams.add("stderr")
    keep: deque[Entry] = deque(maxlen=tail if tail >= 0 else None)
    for e in entries:
        if e.stream not in streams:
            continue
        if since or until:
            t = rfc3339_to_unix(e.time) if e.time else 0.0
            if since and t < since:
                continue
            if until and t > until:
                continue
        keep.append(e)
    return list(keep)
