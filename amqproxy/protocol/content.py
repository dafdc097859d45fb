"""Runs of whole messages in a receive buffer: the forwarding loops' fast path.

A message is a method frame (basic.publish, basic.deliver) followed by its content header and
body frames. A publisher or a busy consumer usually gets many such messages back to back in one
read, all on one channel. `message_run` finds how far such a run goes and checks it in one
pass, so the forwarding loops copy the whole run at once instead of walking their general
per-frame state machine three times per message (where most of the proxy's CPU went).

`message_run` only *recognises*: it never raises. It stops before anything unusual (a frame cut
by the end of the read, another channel or method, a body to split, a malformed publish or
content header) and the caller's general path takes over from there, producing the precise
error or handling the case. The fast path therefore accepts a subset of what the general path
accepts, with the same bytes on the wire; tests/unit/test_fast_path.py holds the two to that.
"""

from __future__ import annotations

import struct

from .constants import BASIC_CLASS, FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_METHOD
from .errors import ProtocolError
from .rules import check_basic_properties

_FRAME = struct.Struct(">BHI")
_METHOD = struct.Struct(">BHII")  # frame header + class id and method id as one number
# frame header + content header prefix: class id, weight, body size, property flags
_CONTENT = struct.Struct(">BHIHHQH")
_CHANNEL = struct.Struct(">H")
_CONTENT_FRAME_MIN = 7 + 14 + 1  # a content header frame without properties

PUBLISH = (60 << 16) | 40  # basic.publish as message_run's `method`
DELIVER = (60 << 16) | 60  # basic.deliver

# Property lists already checked (exact bytes -> valid). Publishers usually repeat the same few
# (content type, delivery mode), so the strict decode runs once per distinct list.
_checked_properties: dict[bytes, bool] = {}
_CHECKED_PROPERTIES_MAX = 1024


class Run:
    """What `message_run` found: buf[start:end] holds `messages` whole messages."""

    __slots__ = ("end", "messages", "bodies", "method_bytes", "header_bytes")

    def __init__(self) -> None:
        self.end = 0
        self.messages = 0
        self.bodies = 0  # body frames
        self.method_bytes = 0  # bytes of the method frames, framing included
        self.header_bytes = 0  # bytes of the content header frames; the rest are body frames

    def count(self, start: int, frames: list[int], nbytes: list[int]) -> None:
        """Add the run that began at `start` to per-frame-type counters (metrics.FRAMES/BYTES)."""
        frames[FRAME_METHOD] += self.messages
        frames[FRAME_HEADER] += self.messages
        frames[FRAME_BODY] += self.bodies
        nbytes[FRAME_METHOD] += self.method_bytes
        nbytes[FRAME_HEADER] += self.header_bytes
        nbytes[FRAME_BODY] += self.end - start - self.method_bytes - self.header_bytes


def message_run(
    buf: bytearray,
    pos: int,
    available: int,
    channel: int,
    method: int,
    max_frame: int,
    max_body: int,
    run: Run,
) -> int:
    """Scan whole messages of `method` (PUBLISH or DELIVER) on `channel` from `pos`.

    Fills `run` and returns the number of messages (0: the general path must take the frame
    at `pos`). `max_frame` is the negotiated frame_max of the sender, `max_body` the largest
    body payload the destination takes without splitting. Publishes are checked as RabbitMQ
    would check them (layout, immediate=false, content class and weight, properties) before
    they may reach a shared upstream; deliveries come from the broker and are only framed.
    """
    unpack_method = _METHOD.unpack_from
    unpack_content = _CONTENT.unpack_from
    unpack_frame = _FRAME.unpack_from
    publish = method == PUBLISH
    max_body = min(max_body, max_frame - 8)  # a bigger body frame is the general path's 501
    messages = bodies = method_bytes = header_bytes = 0
    while pos + _CONTENT_FRAME_MIN + 12 <= available:
        frame_type, frame_channel, size, method_id = unpack_method(buf, pos)
        header_pos = pos + size + 8
        if (
            frame_type != FRAME_METHOD
            or frame_channel != channel
            or method_id != method
            or size < 4
            or size + 8 > max_frame
            or header_pos + _CONTENT_FRAME_MIN > available
            or buf[header_pos - 1] != FRAME_END
        ):
            break
        if publish:
            # class+method (4) ticket (2) exchange (shortstr) routing key (shortstr) bits (1)
            method_end = header_pos - 1
            p = pos + 13
            if p >= method_end:
                break
            p += 1 + buf[p]
            if p >= method_end:
                break
            p += 1 + buf[p]
            if p + 1 != method_end or buf[p] & 0x02:  # immediate=true is a 540
                break
        frame_type, frame_channel, size, class_id, weight, remaining, flags = unpack_content(buf, header_pos)
        end = header_pos + size + 8
        if (
            frame_type != FRAME_HEADER
            or frame_channel != channel
            or size < 14
            or size + 8 > max_frame
            or end > available
            or buf[end - 1] != FRAME_END
            or class_id != BASIC_CLASS
            or weight
        ):
            break
        if publish and (flags or size != 14) and not properties_valid(buf, header_pos + 19, end - 1):
            break
        body_pos = end
        frames = 0
        while remaining:
            if end + 8 > available:
                break
            frame_type, frame_channel, size = unpack_frame(buf, end)
            if frame_type != FRAME_BODY or frame_channel != channel or size > remaining or size > max_body:
                break
            end += size + 8
            if end > available or buf[end - 1] != FRAME_END:
                break
            remaining -= size
            frames += 1
        if remaining:
            break
        messages += 1
        bodies += frames
        method_bytes += header_pos - pos
        header_bytes += body_pos - header_pos
        pos = end
    run.end = pos
    run.messages = messages
    run.bodies = bodies
    run.method_bytes = method_bytes
    run.header_bytes = header_bytes
    return messages


def properties_valid(buf: bytearray, start: int, end: int) -> bool:
    """Would the strict property check (rules.check_basic_properties) accept buf[start:end]?"""
    raw = bytes(buf[start:end])
    known = _checked_properties.get(raw)
    if known is not None:
        return known
    try:
        check_basic_properties(raw, 0, len(raw))
        valid = True
    except ProtocolError:
        valid = False
    if len(_checked_properties) >= _CHECKED_PROPERTIES_MAX:
        _checked_properties.clear()
    _checked_properties[raw] = valid
    return valid


def append_frames(out: bytearray, frames: memoryview, channel: int) -> None:
    """Append whole frames of one channel (a run from `message_run`) to `out`, on `channel`."""
    start = len(out)
    out += frames
    if _CHANNEL.unpack_from(frames, 1)[0] == channel:
        return  # the same id on both legs: verbatim
    end = len(out)
    pack_channel = _CHANNEL.pack_into
    frame = _FRAME.unpack_from
    pos = start
    while pos < end:
        pack_channel(out, pos + 1, channel)
        pos += frame(out, pos)[2] + 8
