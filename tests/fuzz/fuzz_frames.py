"""Coverage-guided fuzzing (atheris / libFuzzer) of the proxy's socket-free wire code.

Not part of the test suite (pytest does not collect this file); run it on demand:

    pip install atheris
    mkdir -p /tmp/amqproxy-fuzz/corpus
    python tests/fuzz/fuzz_frames.py /tmp/amqproxy-fuzz/corpus -artifact_prefix=/tmp/amqproxy-fuzz/ \
        -max_total_time=300                                  # five minutes; add -jobs=2 for two cores
    python tests/fuzz/fuzz_frames.py /tmp/amqproxy-fuzz/crash-<sha1>   # replay a finding

The first input byte picks a target; the rest is its input:

- the FrameReader on the bytes fed whole and split at input-chosen points: the same frames and
  the same error either way, only ProtocolError(501), at most one partial frame buffered;
- decode_method and decode_table: a result or DecodeError, whatever the nesting;
- the content-header property check and ChannelGuard's content sequencing: only ProtocolError
  with a hard reply code;
- SASL PLAIN / AMQPLAIN response parsing: credentials or AuthError.

Any other exception, or a broken invariant (AssertionError), is a crash: libFuzzer writes the
input to <artifact_prefix>crash-<sha1>. Keep each finding as an explicit example in
tests/unit/test_fuzz_*.py once fixed.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

with atheris.instrument_imports():
    from amqproxy.protocol import constants as c
    from amqproxy.protocol.codec import DecodeError, decode_method, decode_table, malformed_shortstr, method_name
    from amqproxy.protocol.errors import ProtocolError
    from amqproxy.protocol.frames import FrameReader
    from amqproxy.protocol.handshake import AuthError, parse_credentials
    from amqproxy.protocol.rules import ChannelGuard, check_basic_properties

FRAME_MAX = 4096


def read_frames(chunks: list[bytes]) -> tuple[list[tuple[int, int, bytes]], int | None]:
    reader = FrameReader(FRAME_MAX)
    frames = []
    for chunk in chunks:
        reader.feed(chunk)
        for _ in range(reader.pending() // c.FRAME_OVERHEAD + 1):
            try:
                frame = reader.next_frame()
            except ProtocolError as exc:
                assert exc.reply_code == c.FRAME_ERROR and exc.hard, exc
                return frames, exc.reply_code
            if frame is None:
                break
            frame_type, channel, start, end = frame
            frames.append((frame_type, channel, bytes(reader.buffer[start:end])))
        else:
            raise AssertionError("next_frame() did not stop")
        assert reader.pending() < FRAME_MAX, "more than one partial frame buffered"
        reader.compact()
    return frames, None


def fuzz_frames(fdp: atheris.FuzzedDataProvider) -> None:
    cuts = sorted(fdp.ConsumeIntInRange(0, 4096) for _ in range(fdp.ConsumeIntInRange(0, 8)))
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    points = sorted({min(cut, len(data)) for cut in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(points, points[1:], strict=False)]
    assert read_frames([data]) == read_frames(chunks)


def fuzz_method(fdp: atheris.FuzzedDataProvider) -> None:
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        method, args = decode_method(payload)
    except DecodeError:
        return
    assert method_name(method) and isinstance(args, dict)
    malformed_shortstr(method, args)  # never raises


def fuzz_table(fdp: atheris.FuzzedDataProvider) -> None:
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        _, end = decode_table(data, 0)
    except DecodeError:
        return
    assert 4 <= end <= len(data)


def fuzz_properties(fdp: atheris.FuzzedDataProvider) -> None:
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        check_basic_properties(data, 0, len(data))
    except ProtocolError as exc:
        assert exc.reply_code == c.FRAME_ERROR


def fuzz_guard(fdp: atheris.FuzzedDataProvider) -> None:
    guard = ChannelGuard()
    try:
        while fdp.remaining_bytes():
            step = fdp.ConsumeIntInRange(0, 3)
            if step == 0:
                guard.on_method(fdp.PickValueInList([c.BASIC_ACK, c.BASIC_QOS, c.CHANNEL_CLOSE]))
            elif step == 1:
                payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
                guard.on_publish(payload, 0, len(payload))
            elif step == 2:
                payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 60))
                guard.on_header(payload, 0, len(payload))
            else:
                guard.on_body(fdp.ConsumeIntInRange(0, 100))
    except ProtocolError as exc:
        assert exc.hard, exc


def fuzz_sasl(fdp: atheris.FuzzedDataProvider) -> None:
    mechanism = fdp.PickValueInList(["PLAIN", "AMQPLAIN", "EXTERNAL"])
    try:
        parse_credentials(mechanism, fdp.ConsumeBytes(fdp.remaining_bytes()))
    except AuthError as exc:
        assert exc.reply_code in (403, 503)


TARGETS = [fuzz_frames, fuzz_method, fuzz_table, fuzz_properties, fuzz_guard, fuzz_sasl]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    TARGETS[data[0] % len(TARGETS)](atheris.FuzzedDataProvider(data[1:]))


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
