"""Docker's jsonmessage progress lines (``pkg/jsonmessage``, ``pkg/progress``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Emit = Callable[[dict[str, Any]], None]


def human_size(n: float) -> str:
    """``units.HumanSizeWithPrecision(n, 3)``: decimal units, 3 significant digits."""
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n /= 1000.0
        i += 1
    return f"{n:.3g}{units[i]}"


def progress_bar(current: int, total: int, width: int = 50) -> str:
    """The ``progress`` string of a JSONProgress: ``[====>   ]  1.2MB/3.4MB``."""
    if total <= 0:
        return f"{human_size(current):>8}"
    pct = min(1.0, current / total)
    filled = int(pct * width)
    bar = "=" * filled
    if filled < width:
        bar += ">" + " " * (width - filled - 1)
    return f"[{bar}] {human_size(current):>8}/{human_size(total)}"


class Progress:
    """Sends jsonmessages through ``emit``; rate-limits per-id byte counters."""

    INTERVAL = 0.1

    def __init__(self, emit: Emit | None) -> None:
        self._emit = emit
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def status(self, status: str, id: str | None = None, detail: bool = True) -> None:
        if self._emit is None:
            return
        msg: dict[str, Any] = {"status": status}
        if id is not None:
            if detail:
                msg["progressDetail"] = {}
            msg["id"] = id
        with self._lock:
            self._emit(msg)

    def update(self, action: str, id: str, current: int, total: int, force: bool = False) -> None:
        if self._emit is None:
            return
        now = time.monotonic()
        key = (action, id)
        with self._lock:
            if not force and now - self._last.get(key, 0.0) < self.INTERVAL:
                return
            self._last[key] = now
            detail: dict[str, int] = {"current": current}
            if total > 0:
                detail["total"] = total
            self._emit(
                {
                    "status": action,
                    "progressDetail": detail,
                    "progress": progress_bar(current, total),
                    "id": id,
                }
            )
