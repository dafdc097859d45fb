"""FrameReader and body splitting, driven with bytes only."""

import pytest

from amqproxy.protocol import constants as c
from amqproxy.protocol.codec import encode_method
from amqproxy.protocol.errors import ProtocolError
from amqproxy.protocol.frames import (
    FRAME_HEADER_STRUCT,
    HEARTBEAT_FRAME,
    FrameReader,
    append_split_body,
    method_frame,
)


def frames_of(reader):
    out = []
    while (frame := reader.next_frame()) is not None:
        frame_type, channel, start, end = frame
        out.append((frame_type, channel, bytes(reader.buffer[start:end])))
    reader.compact()
    return out


def test_reads_frames_fed_one_byte_at_a_time():
    payload = encode_method(c.CHANNEL_OPEN)
    stream = method_frame(3, payload) + HEARTBEAT_FRAME
    reader = FrameReader(4096)
    seen = []
    for byte in stream:
        reader.feed(bytes([byte]))
        seen += frames_of(reader)
    assert seen == [(c.FRAME_METHOD, 3, payload), (c.FRAME_HEARTBEAT, 0, b"")]
    assert reader.pending() == 0 and len(reader.buffer) == 0


def test_many_frames_in_one_read_and_a_partial_tail():
    one = method_frame(1, encode_method(c.BASIC_ACK, delivery_tag=1))
    reader = FrameReader(4096)
    reader.feed(one * 5 + one[:5])
    assert len(frames_of(reader)) == 5
    assert reader.pending() == 5
    reader.feed(one[5:])
    assert len(frames_of(reader)) == 1


def test_bad_frame_end_is_501():
    frame = bytearray(method_frame(1, encode_method(c.CHANNEL_OPEN)))
    frame[-1] = 0x00
    reader = FrameReader(4096)
    reader.feed(bytes(frame))
    with pytest.raises(ProtocolError) as err:
        reader.next_frame()
    assert err.value.reply_code == 501 and err.value.hard


def test_unknown_frame_type_is_501():
    reader = FrameReader(4096)
    reader.feed(FRAME_HEADER_STRUCT.pack(9, 0, 0) + b"\xce")
    with pytest.raises(ProtocolError) as err:
        reader.next_frame()
    assert err.value.reply_code == 501


def test_frame_larger_than_frame_max_is_refused_from_its_header_alone():
    reader = FrameReader(4096)
    reader.feed(FRAME_HEADER_STRUCT.pack(c.FRAME_BODY, 1, 5000))  # no payload needed to refuse it
    with pytest.raises(ProtocolError) as err:
        reader.next_frame()
    assert err.value.reply_code == 501 and "frame_max" in err.value.text


def test_split_body_respects_the_peer_frame_max():
    data = bytes(range(256)) * 40  # 10240 bytes
    out = bytearray()
    append_split_body(out, 7, memoryview(data), 4088)
    reader = FrameReader(4096)
    reader.feed(bytes(out))
    parts = frames_of(reader)
    assert [len(p[2]) for p in parts] == [4088, 4088, 2064]
    assert all(p[0] == c.FRAME_BODY and p[1] == 7 for p in parts)
    assert b"".join(p[2] for p in parts) == data
