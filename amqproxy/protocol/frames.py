"""Frame-level reading and writing: the only code that knows the 7-byte header and the frame end.

`FrameReader` owns a reusable receive buffer and hands out frames as offsets into it, so the hot
path can copy a frame once (into the destination's batch) with its channel id rewritten.
"""

from __future__ import annotations

import struct

from .constants import (
    FRAME_BODY,
    FRAME_END,
    FRAME_END_BYTE,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    FRAME_OVERHEAD,
)
from .errors import ProtocolError

FRAME_HEADER_STRUCT = struct.Struct(">BHI")
VALID_FRAME_TYPES = frozenset((FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT))

HEARTBEAT_FRAME = FRAME_HEADER_STRUCT.pack(FRAME_HEARTBEAT, 0, 0) + FRAME_END_BYTE


FrameError = ProtocolError  # framing violations are always hard (501)


class FrameReader:
    """Incremental frame splitter over one growing buffer.

    Usage: ``feed(data)`` then call ``next_frame()`` until it returns None, then ``compact()``.
    A frame is returned as (type, channel, payload_start, payload_end) into ``buffer``;
    the raw frame spans ``payload_start - 7`` to ``payload_end + 1``.

    The forwarding loops scan ``buffer`` from ``pos`` inline (a method call per frame is a
    large share of their cost) and call ``next_frame()`` only to raise the precise error.
    """

    __slots__ = ("buffer", "pos", "max_frame_size")

    def __init__(self, max_frame_size: int) -> None:
        self.buffer = bytearray()
        self.pos = 0
        self.max_frame_size = max_frame_size

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def pending(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self.buffer) - self.pos

    def next_frame(self) -> tuple[int, int, int, int] | None:
        buf = self.buffer
        pos = self.pos
        if len(buf) - pos < FRAME_HEADER_SIZE:
            return None
        frame_type, channel, size = FRAME_HEADER_STRUCT.unpack_from(buf, pos)
        if frame_type not in VALID_FRAME_TYPES:
            raise FrameError(501, f"unknown frame type {frame_type}")
        if size + FRAME_OVERHEAD > self.max_frame_size:
            raise FrameError(
                501,
                f"frame size {size + FRAME_OVERHEAD} exceeds the negotiated frame_max {self.max_frame_size}",
            )
        end = pos + FRAME_HEADER_SIZE + size
        if len(buf) <= end:
            return None
        if buf[end] != FRAME_END:
            raise FrameError(501, f"bad frame end octet {buf[end]:#04x}")
        self.pos = end + 1
        return frame_type, channel, pos + FRAME_HEADER_SIZE, end

    def unshare(self) -> None:
        """Give the reader a private copy of its buffer.

        After an error raised mid-frame, memoryview slices held by the traceback still export the
        old buffer, which then cannot be resized; the copy can.
        """
        self.buffer = bytearray(self.buffer)

    def compact(self) -> None:
        """Drop consumed bytes; cheap when everything was consumed (the common case)."""
        if self.pos:
            if self.pos == len(self.buffer):
                self.buffer.clear()
            else:
                del self.buffer[: self.pos]
            self.pos = 0


def method_frame(channel: int, payload: bytes) -> bytes:
    return FRAME_HEADER_STRUCT.pack(FRAME_METHOD, channel, len(payload)) + payload + FRAME_END_BYTE


def append_split_body(out: bytearray, channel: int, data: memoryview, max_payload: int) -> None:
    """Append body payload `data` to `out` as body frames of at most `max_payload` bytes each."""
    pack = FRAME_HEADER_STRUCT.pack
    for offset in range(0, len(data), max_payload):
        chunk = data[offset : offset + max_payload]
        out += pack(FRAME_BODY, channel, len(chunk))
        out += chunk
        out += FRAME_END_BYTE
