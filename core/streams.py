"""Docker's multiplexed stream framing, shared by the server, the client and the shim.

A frame is an 8-byte header ``[stream, 0, 0, 0, uint32 big-endian length]`` then the
payload. Streams: 0 stdin, 1 stdout, 2 stderr (Docker also uses 3 for system errors
in exec). With a TTY there is no framing at all: the bytes are raw.
"""

from __future__ import annotations

import struct

STDIN, STDOUT, STDERR, SYSTEMERR = 0, 1, 2, 3
_HEADER = struct.Struct(">BxxxL")
HEADER_SIZE = _HEADER.size


def frame(stream: int, data: bytes) -> bytes:
    return _HEADER.pack(stream, len(data)) + data


def parse_header(header: bytes) -> tuple[int, int]:
    """(stream, length) from an 8-byte header."""
    return _HEADER.unpack(header)


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes, get complete ``(stream, payload)`` frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER_SIZE:
            stream, length = _HEADER.unpack_from(self._buf)
            if len(self._buf) < HEADER_SIZE + length:
                break
            out.append((stream, bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])))
            del self._buf[: HEADER_SIZE + length]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
