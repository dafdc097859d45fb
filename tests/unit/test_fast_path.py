"""The forwarding loops' fast path (protocol/content.py) against their general path.

`message_run` is unit-tested directly; then both loops run over generated streams (valid and
broken publishes, interleaved channels, remapped channel ids, bodies to split, reads cut
anywhere) twice, once with the fast path and once with it disabled, and must forward the same
bytes, count the same and fail with the same error. The sockets and the peers on the other
side are minimal stand-ins: what is under test is pure frame handling.
"""

from __future__ import annotations

import struct
from collections import defaultdict

import pamqp.body
import pamqp.commands as pc
import pamqp.frame
import pamqp.header
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import amqproxy.client as client_module
import amqproxy.upstream as upstream_module
from amqproxy.channel import Link
from amqproxy.client import ClientSession
from amqproxy.metrics import CLIENT_TO_UPSTREAM, FRAMES, UPSTREAM_TO_CLIENT
from amqproxy.protocol import constants as c
from amqproxy.protocol.connection import ClientConnection
from amqproxy.protocol.content import DELIVER, PUBLISH, Run, append_frames, message_run, properties_valid
from amqproxy.protocol.errors import ProtocolError
from amqproxy.protocol.frames import FrameReader
from amqproxy.protocol.rules import Role
from amqproxy.upstream import Upstream
from amqproxy.upstream_handshake import UpstreamState

FRAME = struct.Struct(">BHI")


def frame(frame_type: int, channel: int, payload: bytes, end: bytes = b"\xce") -> bytes:
    return FRAME.pack(frame_type, channel, len(payload)) + payload + end


def method_payload(method: object) -> bytes:
    return pamqp.frame.marshal(method, 1)[7:-1]


def header_payload(body_size: int, properties: bytes | None = None, class_id: int = 60, weight: int = 0) -> bytes:
    props = b"\x00\x00" if properties is None else properties
    return struct.pack(">HHQ", class_id, weight, body_size) + props


VALID_PROPERTIES = pamqp.frame.marshal(
    pamqp.header.ContentHeader(0, 5, pc.Basic.Properties(content_type="application/json", delivery_mode=2)), 1
)[7 + 12 : -1]
BAD_PROPERTIES = b"\x80\x00\x05ab"  # content-type announced 5 octets, 2 present


def publish(channel: int, body: bytes, pieces: int = 1, properties: bytes | None = None) -> bytes:
    out = frame(c.FRAME_METHOD, channel, method_payload(pc.Basic.Publish(exchange="", routing_key="q")))
    out += frame(c.FRAME_HEADER, channel, header_payload(len(body), properties))
    step = max(1, -(-len(body) // pieces))
    for i in range(0, len(body), step):
        out += frame(c.FRAME_BODY, channel, body[i : i + step])
    return out


def deliver(channel: int, tag: int, body: bytes, pieces: int = 1) -> bytes:
    m = pc.Basic.Deliver(consumer_tag="ctag", delivery_tag=tag, redelivered=False, exchange="", routing_key="q")
    out = frame(c.FRAME_METHOD, channel, method_payload(m))
    out += frame(c.FRAME_HEADER, channel, header_payload(len(body)))
    step = max(1, -(-len(body) // pieces))
    for i in range(0, len(body), step):
        out += frame(c.FRAME_BODY, channel, body[i : i + step])
    return out


def scan(data: bytes, channel: int = 1, method: int = PUBLISH, max_frame: int = 131072, max_body: int = 131064):
    run = Run()
    n = message_run(bytearray(data), 0, len(data), channel, method, max_frame, max_body, run)
    return n, run


# ---------------------------------------------------------------- message_run


def test_a_run_of_whole_publishes_is_found_with_its_frame_and_byte_counts() -> None:
    one = publish(1, b"x" * 100, pieces=2)
    n, run = scan(one * 3)
    assert (n, run.end, run.bodies) == (3, len(one) * 3, 6)
    method_frame_size = len(frame(1, 1, method_payload(pc.Basic.Publish(exchange="", routing_key="q"))))
    assert run.method_bytes == 3 * method_frame_size
    assert run.header_bytes == 3 * (7 + 14 + 1)


def test_an_empty_body_is_a_whole_message() -> None:
    assert scan(publish(1, b""))[0] == 1


@pytest.mark.parametrize("cut", range(1, 60))
def test_a_message_cut_by_the_end_of_the_read_is_left_to_the_general_path(cut: int) -> None:
    data = publish(1, b"y" * 30) * 2
    n, run = scan(data[: len(data) - cut])
    assert n == 1 and run.end == len(data) // 2


def test_the_run_stops_at_another_channel_or_method() -> None:
    one = publish(1, b"a")
    assert scan(one + publish(2, b"b"))[0] == 1
    assert scan(one, channel=2)[0] == 0
    assert scan(one, method=DELIVER)[0] == 0
    assert scan(deliver(1, 1, b"z"), method=DELIVER)[0] == 1


PUBLISH_Q = method_payload(pc.Basic.Publish(routing_key="q"))


def message(
    method: bytes = PUBLISH_Q, header: bytes | None = None, bodies: tuple[bytes, ...] = (b"x",), types=(1, 2, 3)
) -> bytes:
    """One publish on channel 1 from its parts (defaults: a valid 1-octet message)."""
    header = header_payload(sum(map(len, bodies))) if header is None else header
    return frame(types[0], 1, method) + frame(types[1], 1, header) + b"".join(frame(types[2], 1, b) for b in bodies)


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(message(header=header_payload(3, BAD_PROPERTIES), bodies=(b"abc",)), id="malformed-properties"),
        pytest.param(message(method=method_payload(pc.Basic.Publish(routing_key="q", immediate=True))), id="immediate"),
        pytest.param(message(method=PUBLISH_Q + b"\x00"), id="publish-layout"),
        pytest.param(message(header=header_payload(1, weight=1)), id="weight"),
        pytest.param(message(header=header_payload(1, class_id=50)), id="class"),
        pytest.param(message(header=header_payload(1), bodies=(b"xx",)), id="body-larger-than-announced"),
        pytest.param(message()[:-1] + b"\x00", id="frame-end"),
        pytest.param(message(types=(1, 3, 2)), id="header-and-body-swapped"),
    ],
)
def test_anything_unusual_stops_the_run_without_raising(broken: bytes) -> None:
    assert scan(message())[0] == 1
    assert scan(publish(1, b"ok") + broken)[0] == 1


def test_bodies_the_destination_cannot_take_whole_and_oversized_frames_stop_the_run() -> None:
    assert scan(publish(1, b"x" * 100), max_body=99)[0] == 0
    assert scan(publish(1, b"x" * 100), max_body=100)[0] == 1
    assert scan(publish(1, b"x" * 100), max_frame=100)[0] == 0


def test_valid_properties_pass_and_the_verdict_is_remembered() -> None:
    assert scan(publish(1, b"x", properties=VALID_PROPERTIES))[0] == 1
    buf = bytearray(b"--" + VALID_PROPERTIES)
    assert properties_valid(buf, 2, len(buf)) is True
    assert properties_valid(bytearray(BAD_PROPERTIES), 0, len(BAD_PROPERTIES)) is False


def test_append_frames_rewrites_every_frame_to_the_destination_channel() -> None:
    out = bytearray(b"keep")
    append_frames(out, memoryview(publish(1, b"x" * 10, pieces=3)), 513)
    assert out == bytearray(b"keep") + publish(513, b"x" * 10, pieces=3)
    append_frames(out, memoryview(publish(513, b"y")), 513)  # same id: verbatim
    assert out == bytearray(b"keep") + publish(513, b"x" * 10, pieces=3) + publish(513, b"y")


# ---------------------------------------------------------------- the client loop, both paths


class _EndOfInput(Exception):
    pass


class _Socket:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(reversed(chunks))

    def recv(self, size: int) -> bytes:
        if not self.chunks:
            raise _EndOfInput
        return self.chunks.pop()


class _Upstream:
    alive = True

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.sent = bytearray()

    def send(self, data: bytes | bytearray, received_at: float = 0.0) -> None:
        self.sent += data

    def backed_up(self) -> bool:
        return False


def run_client(chunks: list[bytes], fast: bool, max_body: int) -> dict:
    with pytest.MonkeyPatch.context() as patch:
        if not fast:
            patch.setattr(client_module, "message_run", lambda *args: 0)
        return _run_client(chunks, max_body)


def _run_client(chunks: list[bytes], max_body: int) -> dict:
    session = ClientSession.__new__(ClientSession)
    session.sock = _Socket(chunks)
    session.core = ClientConnection(0)
    session.core.reader = FrameReader(4096)
    session.channels = {}
    session._batches = defaultdict(bytearray)
    session.closing = False
    session._byte_bucket = None
    session.bytes_in = session.messages_in = 0
    session.last_recv = session._received_at = 0.0
    session.throttled = False
    upstream = _Upstream(max_body)
    for client_channel, upstream_channel in ((1, 1), (2, 9)):  # channel 2 is remapped
        link = Link(session, client_channel, upstream, upstream_channel)  # type: ignore[arg-type]
        link.role = Role.PUBLISH
        session.channels[client_channel] = link
    session.channels[2].confirm = True
    frames_before = list(FRAMES[CLIENT_TO_UPSTREAM])
    error = None
    try:
        session._forward_loop()
    except _EndOfInput:
        pass
    except ProtocolError as exc:
        error = (exc.reply_code, exc.text, exc.method)
    pending = b"".join(bytes(out) for out in session._batches.values())  # flushed at teardown
    return {
        "forwarded": bytes(upstream.sent) + pending,
        "error": error,
        "messages_in": session.messages_in,
        "frames": [a - b for a, b in zip(FRAMES[CLIENT_TO_UPSTREAM], frames_before, strict=True)],
        "links": [(link.expect, bytes(link.content), link.published) for link in session.channels.values()],
    }


def _message(draw, channel: int) -> list[bytes]:
    body = b"b" * draw(st.integers(0, 300))
    pieces = draw(st.integers(1, 3))
    fault = draw(st.sampled_from(["none"] * 6 + ["properties", "bad-properties", "immediate", "weight", "overrun"]))
    properties = {"properties": VALID_PROPERTIES, "bad-properties": BAD_PROPERTIES}.get(fault)
    immediate = fault == "immediate"
    frames = [frame(1, channel, method_payload(pc.Basic.Publish(routing_key="q", immediate=immediate)))]
    frames.append(frame(2, channel, header_payload(len(body), properties, weight=1 if fault == "weight" else 0)))
    step = max(1, -(-len(body) // pieces))
    bodies = [body[i : i + step] for i in range(0, len(body), step)]
    if fault == "overrun":
        bodies.append(b"extra")
    frames += [frame(3, channel, piece) for piece in bodies]
    return frames


@st.composite
def client_streams(draw) -> tuple[bytes, list[int]]:
    """Publishes on channels 1 and 2, their frames interleaved, heartbeats between; cut points."""
    queues: dict[int, list[bytes]] = {1: [], 2: []}
    for _ in range(draw(st.integers(1, 8))):
        channel = draw(st.sampled_from([1, 2]))
        queues[channel] += _message(draw, channel)
    stream = b""
    while queues[1] or queues[2]:
        ready = [ch for ch in (1, 2) if queues[ch]]
        channel = draw(st.sampled_from(ready)) if draw(st.booleans()) else ready[0]
        stream += queues[channel].pop(0)
        if draw(st.integers(0, 9)) == 0:
            stream += frame(c.FRAME_HEARTBEAT, 0, b"")
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=6, unique=True)))
    return stream, cuts


def _chunks(stream: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


@settings(max_examples=300, deadline=None)
@given(client_streams(), st.sampled_from([64, 150, 131064]))
def test_client_loop_fast_path_matches_the_general_path(case, max_body) -> None:
    stream, cuts = case
    chunks = _chunks(stream, cuts)
    assert run_client(chunks, True, max_body) == run_client(chunks, False, max_body)


def test_client_loop_takes_a_whole_run_in_one_step(monkeypatch) -> None:
    """The equivalence above would hold trivially if the fast path never ran."""
    calls = []
    real = client_module.message_run

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setattr(client_module, "message_run", spy)
    result = _run_client([publish(1, b"x" * 50) * 20 + publish(2, b"y" * 50) * 5], 131064)
    assert calls == [20, 5]
    assert result["messages_in"] == 25 and result["links"][1][2] == 5  # confirm channel counts publishes
    assert result["forwarded"] == publish(1, b"x" * 50) * 20 + publish(9, b"y" * 50) * 5


# ---------------------------------------------------------------- the upstream loop, both paths


class _Client:
    closing = False

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.received = bytearray()

    def deliver(self, data: bytes | bytearray, received_at: float) -> None:
        self.received += data


def run_upstream(chunks: list[bytes], fast: bool, max_body: int) -> dict:
    with pytest.MonkeyPatch.context() as patch:
        if not fast:
            patch.setattr(upstream_module, "message_run", lambda *args: 0)
        return _run_upstream(chunks, max_body)


def _run_upstream(chunks: list[bytes], max_body: int) -> dict:
    upstream = Upstream.__new__(Upstream)
    upstream.sock = _Socket(chunks)  # type: ignore[assignment]
    upstream._handshake = FrameReader(4096)
    upstream.frame_max = 4096
    upstream.links = {}
    upstream.last_recv = 0.0
    upstream.state = UpstreamState.OPEN
    clients = [_Client(max_body), _Client(max_body)]
    for (upstream_channel, client_channel), client in zip(((1, 1), (2, 5)), clients, strict=True):
        upstream.links[upstream_channel] = Link(client, client_channel, upstream, upstream_channel)  # type: ignore[arg-type]
    frames_before = list(FRAMES[UPSTREAM_TO_CLIENT])
    with pytest.raises(_EndOfInput):
        upstream._read_loop()
    return {
        "received": [bytes(client.received) for client in clients],
        "frames": [a - b for a, b in zip(FRAMES[UPSTREAM_TO_CLIENT], frames_before, strict=True)],
        "links": [(link.delivered, link.body_due) for link in upstream.links.values()],
    }


@st.composite
def broker_streams(draw) -> tuple[bytes, list[int]]:
    stream = b""
    tags = {1: 0, 2: 0}
    for _ in range(draw(st.integers(1, 10))):
        channel = draw(st.sampled_from([1, 2]))
        tags[channel] += 1
        stream += deliver(channel, tags[channel], b"d" * draw(st.integers(0, 300)), draw(st.integers(1, 3)))
    cuts = sorted(draw(st.lists(st.integers(1, len(stream) - 1), max_size=6, unique=True)))
    return stream, cuts


@settings(max_examples=200, deadline=None)
@given(broker_streams(), st.sampled_from([64, 150, 131064]))
def test_upstream_loop_fast_path_matches_the_general_path(case, max_body) -> None:
    stream, cuts = case
    chunks = _chunks(stream, cuts)
    assert run_upstream(chunks, True, max_body) == run_upstream(chunks, False, max_body)


def test_upstream_loop_remaps_a_whole_run_of_deliveries() -> None:
    data = b"".join(deliver(2, tag, b"z" * 40) for tag in range(1, 11))
    result = run_upstream([data], True, 131064)
    assert result["received"][1] == b"".join(deliver(5, tag, b"z" * 40) for tag in range(1, 11))
    assert result["links"][1] == (10, 0)
