"""Property-based tests of the frame layer: FrameReader, body splitting, ChannelGuard sequencing.

For any byte stream, however it is split into reads, the reader yields frames or raises a
ProtocolError with a hard reply code; it never raises anything else, never loops, never holds more
than one frame's worth of unread bytes, and sees the same frames whatever the split.
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from amqproxy.protocol import constants as c
from amqproxy.protocol.errors import ProtocolError
from amqproxy.protocol.frames import FRAME_HEADER_STRUCT, FrameReader, append_split_body
from amqproxy.protocol.rules import EXPECT_BODY, EXPECT_HEADER, EXPECT_METHOD, ChannelGuard

FRAME_TYPES = (c.FRAME_METHOD, c.FRAME_HEADER, c.FRAME_BODY, c.FRAME_HEARTBEAT)
SMALL_FRAME_MAX = 512  # small enough for hypothesis to reach the limit often


def encode_frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return FRAME_HEADER_STRUCT.pack(frame_type, channel, len(payload)) + payload + c.FRAME_END_BYTE


frames_st = st.lists(
    st.tuples(
        st.sampled_from(FRAME_TYPES),
        st.integers(0, 65535),
        st.binary(max_size=SMALL_FRAME_MAX - c.FRAME_OVERHEAD),
    ),
    max_size=12,
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (taken modulo its length, duplicates allowed)."""
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def read_all(chunks: list[bytes], frame_max: int) -> tuple[list[tuple[int, int, bytes]], int | None]:
    """Feed the chunks one by one, draining after each: (frames, reply code of the error or None).

    Checks the reader's invariants on the way: every call consumes at least a frame's overhead
    (so the drain terminates) and at most one partial frame stays buffered."""
    reader = FrameReader(frame_max)
    frames: list[tuple[int, int, bytes]] = []
    fed = 0
    for chunk in chunks:
        reader.feed(chunk)
        fed += len(chunk)
        for _ in range(fed // c.FRAME_OVERHEAD + 1):  # a bound on the frames this much data holds
            try:
                frame = reader.next_frame()
            except ProtocolError as exc:
                assert exc.hard and exc.reply_code == c.FRAME_ERROR, exc
                assert exc.text.startswith("FRAME_ERROR - ") and len(exc.text) <= 255
                return frames, exc.reply_code
            if frame is None:
                break
            frame_type, channel, start, end = frame
            assert frame_type in FRAME_TYPES
            assert reader.buffer[end] == c.FRAME_END
            assert end - start + c.FRAME_OVERHEAD <= frame_max
            frames.append((frame_type, channel, bytes(reader.buffer[start:end])))
        else:
            raise AssertionError("next_frame() returned more frames than the data can hold")
        # Unbounded buffering would show here: only an incomplete frame that fits may wait.
        assert reader.pending() < frame_max
        reader.compact()
        assert reader.pos == 0 and len(reader.buffer) == reader.pending()
    return frames, None


@given(frames_st, st.lists(st.integers(0, 10_000), max_size=20))
@example([(c.FRAME_BODY, 1, b"x" * (SMALL_FRAME_MAX - c.FRAME_OVERHEAD))], [])  # exactly frame_max
def test_a_valid_stream_yields_the_same_frames_however_it_is_split(frames, cuts):
    stream = b"".join(encode_frame(*frame) for frame in frames)
    assert read_all([stream], SMALL_FRAME_MAX) == (frames, None)
    assert read_all(split(stream, cuts), SMALL_FRAME_MAX) == (frames, None)
    assert read_all([bytes([b]) for b in stream], SMALL_FRAME_MAX) == (frames, None)


@given(st.binary(max_size=2048), st.lists(st.integers(0, 10_000), max_size=20))
@example(b"\x01\x00\x01\x00\x00\x01\xf9", [])  # one byte over frame_max, refused from its header
@example(FRAME_HEADER_STRUCT.pack(9, 0, 0) + b"\xce", [])  # unknown frame type
@example(encode_frame(1, 1, b"\x00\x14\x00\x0a")[:-1] + b"\x00", [3])  # wrong frame end
def test_arbitrary_bytes_give_frames_or_a_501_whatever_the_split(data, cuts):
    whole = read_all([data], SMALL_FRAME_MAX)
    assert read_all(split(data, cuts), SMALL_FRAME_MAX) == whole
    # What was accepted re-encodes to a prefix of the input: nothing invented, nothing skipped.
    prefix = b"".join(encode_frame(*frame) for frame in whole[0])
    assert data.startswith(prefix)


@given(frames_st, st.integers(0, 400), st.binary(min_size=1, max_size=64), st.lists(st.integers(0, 5000), max_size=8))
def test_a_corrupted_valid_stream_keeps_its_frames_up_to_the_corruption(frames, where, garbage, cuts):
    stream = b"".join(encode_frame(*frame) for frame in frames)
    where = where % (len(stream) + 1)
    mutated = stream[:where] + garbage + stream[where:]
    got, error = read_all(split(mutated, cuts), SMALL_FRAME_MAX)
    intact = 0  # frames wholly before the corruption
    offset = 0
    for frame in frames:
        offset += len(encode_frame(*frame))
        if offset > where:
            break
        intact += 1
    assert got[:intact] == frames[:intact]
    assert error in (None, c.FRAME_ERROR)


@given(st.binary(max_size=5000), st.integers(1, 4096 - c.FRAME_OVERHEAD), st.integers(0, 65535))
def test_split_body_reassembles_to_the_data(data, max_payload, channel):
    out = bytearray()
    append_split_body(out, channel, memoryview(data), max_payload)
    frames, error = read_all([bytes(out)], max_payload + c.FRAME_OVERHEAD)
    assert error is None
    assert all(t == c.FRAME_BODY and ch == channel and 0 < len(p) <= max_payload for t, ch, p in frames)
    assert b"".join(p for _, _, p in frames) == data
    assert len(frames) == -(-len(data) // max_payload)  # as few frames as the limit allows


# ---------------------------------------------------------------------------- ChannelGuard

VALID_CODES = {c.FRAME_ERROR, c.UNEXPECTED_FRAME, c.CHANNEL_ERROR, c.NOT_IMPLEMENTED}


def publish_payload(exchange: bytes, routing_key: bytes, bits: int) -> bytes:
    return (
        b"\x00\x3c\x00\x28\x00\x00"
        + bytes([len(exchange)])
        + exchange
        + bytes([len(routing_key)])
        + routing_key
        + bytes([bits])
    )


shortstr_bytes = st.binary(max_size=20)
guard_event = st.one_of(
    st.tuples(st.just("method"), st.sampled_from([c.BASIC_ACK, c.BASIC_QOS, c.QUEUE_DECLARE, c.CHANNEL_CLOSE])),
    st.tuples(st.just("publish"), st.builds(publish_payload, shortstr_bytes, shortstr_bytes, st.integers(0, 3))),
    st.tuples(st.just("publish-raw"), st.binary(max_size=40)),
    st.tuples(
        st.just("header"),
        st.builds(
            lambda cls, weight, size, props: (
                cls.to_bytes(2, "big") + weight.to_bytes(2, "big") + size.to_bytes(8, "big") + props
            ),
            st.sampled_from([60, 60, 60, 50]),
            st.sampled_from([0, 0, 0, 1]),
            st.integers(0, 40),
            st.one_of(st.just(b"\x00\x00"), st.binary(max_size=24)),
        ),
    ),
    st.tuples(st.just("body"), st.integers(0, 50)),
)


@given(st.lists(guard_event, max_size=30))
def test_channel_guard_raises_only_protocol_errors_and_keeps_its_state_consistent(events):
    guard = ChannelGuard()
    for kind, value in events:
        before = (guard.expect, guard.body_remaining)
        try:
            if kind == "method":
                guard.on_method(value)
            elif kind in ("publish", "publish-raw"):
                guard.on_publish(value, 0, len(value))
            elif kind == "header":
                guard.on_header(value, 0, len(value))
            else:
                guard.on_body(value)
        except ProtocolError as exc:
            assert exc.reply_code in VALID_CODES and exc.hard, exc
            if exc.reply_code == c.UNEXPECTED_FRAME:
                # RabbitMQ's command assembler names the method whose content was interrupted.
                assert exc.method == (c.BASIC_PUBLISH if before[0] != EXPECT_METHOD else (0, 0)), (kind, before)
            return  # a hard error ends the connection: nothing follows
        assert guard.expect in (EXPECT_METHOD, EXPECT_HEADER, EXPECT_BODY)
        assert (guard.body_remaining > 0) == (guard.expect == EXPECT_BODY)
        if kind == "method":
            assert before[0] == EXPECT_METHOD
        elif kind == "header":
            assert before[0] == EXPECT_HEADER
        elif kind == "body":
            assert before[0] == EXPECT_BODY and guard.body_remaining == before[1] - value


def test_content_sequence_errors_carry_rabbitmqs_text_and_the_publish():
    """The texts and method ids of rabbit_command_assembler, as the broker sends them."""
    publish = publish_payload(b"", b"q", 0)
    header = b"\x00\x3c\x00\x00" + (5).to_bytes(8, "big") + b"\x00\x00"

    def error_after(steps, last):
        guard = ChannelGuard()
        for step in steps:
            step(guard)
        try:
            last(guard)
        except ProtocolError as exc:
            return exc.reply_code, exc.text, exc.method
        raise AssertionError("no error")

    pub = lambda g: g.on_publish(publish, 0, len(publish))  # noqa: E731
    hdr = lambda g: g.on_header(header, 0, len(header))  # noqa: E731
    want_header = "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead"
    want_body = "UNEXPECTED_FRAME - expected content body, got non content body frame instead"
    want_method = "UNEXPECTED_FRAME - expected method frame, got non method frame instead"
    assert error_after([pub], lambda g: g.on_method(c.BASIC_QOS)) == (505, want_header, c.BASIC_PUBLISH)
    assert error_after([pub], lambda g: g.on_body(5)) == (505, want_header, c.BASIC_PUBLISH)
    assert error_after([pub, hdr], lambda g: g.on_method(c.BASIC_QOS)) == (505, want_body, c.BASIC_PUBLISH)
    assert error_after([pub, hdr], hdr) == (505, want_body, c.BASIC_PUBLISH)
    assert error_after([], hdr) == (505, want_method, (0, 0))
    assert error_after([], lambda g: g.on_body(1)) == (505, want_method, (0, 0))
    weighted = b"\x00\x3c\x00\x01" + header[4:]
    assert error_after([pub], lambda g: g.on_header(weighted, 0, len(weighted))) == (505, want_header, c.BASIC_PUBLISH)
    queue_class = b"\x00\x32" + header[2:]
    assert error_after([pub], lambda g: g.on_header(queue_class, 0, len(queue_class))) == (
        505,
        "UNEXPECTED_FRAME - expected content header for class 60, got one for class 50 instead",
        c.BASIC_PUBLISH,
    )
