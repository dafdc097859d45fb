"""18. Protocol-level behaviour with a hand-driven client: protocol header
negotiation, Connection.Start contents, frame_max honoured towards the client,
connection errors for protocol violations."""

import os
import time

import pamqp.body
import pamqp.commands as C
import pamqp.header
import pytest

from ._support import RawAMQP

AMQP_0_9_1 = b"AMQP\x00\x00\x09\x01"


@pytest.mark.parametrize(
    "header",
    [
        b"AMQP\x00\x00\x08\x00",  # AMQP 0-8 in the 0-9-1 style (not 0-9-1)
        b"AMQP\x00\x00\x09\x00",  # 0-9
        b"AMQP\x00\x01\x00\x00",  # 1.0
        b"GET / HTTP/1.1\r\n\r\n",
    ],
    ids=["0-8-0", "0-9-0", "1-0-0", "http"],
)
def test_bad_protocol_header(target, header):
    with RawAMQP(target.host, target.port) as raw:
        raw.send_bytes(header)
        t0 = time.monotonic()
        data, how = raw.read_until_closed(timeout=5)
    assert data == AMQP_0_9_1
    # The broker closes with a RST, a FIN is just as good.
    assert how in ("eof", "reset"), how
    assert time.monotonic() - t0 < 5


def test_connection_start(target):
    with RawAMQP(target.host, target.port) as raw:
        raw.send_bytes(AMQP_0_9_1)
        start = raw.expect(C.Connection.Start, channel=0)
    assert (start.version_major, start.version_minor) == (0, 9)
    assert "PLAIN" in start.mechanisms.split()
    assert "en_US" in start.locales.split()
    caps = start.server_properties["capabilities"]
    for cap in (
        "publisher_confirms",
        "basic.nack",
        "consumer_cancel_notify",
        "exchange_exchange_bindings",
        "authentication_failure_close",
    ):
        assert caps.get(cap) is True, cap


def test_legacy_0_9_1_header_is_accepted(target):
    """Old clients announce 0-9-1 as AMQP 1 1 0 9; RabbitMQ answers with a 0-9 Connection.Start."""
    with RawAMQP(target.host, target.port) as raw:
        raw.send_bytes(b"AMQP\x01\x01\x00\x09")
        start = raw.expect(C.Connection.Start, channel=0)
    assert (start.version_major, start.version_minor) == (0, 9)


def test_protocol_header_in_pieces(target):
    """The 8 header bytes may arrive one by one."""
    with RawAMQP(target.host, target.port) as raw:
        for b in AMQP_0_9_1:
            raw.send_bytes(bytes([b]))
            time.sleep(0.01)
        raw.expect(C.Connection.Start, channel=0)


def test_raw_handshake_and_close(target):
    with RawAMQP(target.host, target.port) as raw:
        _, tune, reply = raw.handshake(frame_max=8192)
        assert isinstance(reply, C.Connection.OpenOk)
        assert tune.frame_max == 0 or tune.frame_max >= 8192
        raw.send(C.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0))
        raw.expect(C.Connection.CloseOk, channel=0)
        # Nothing follows CloseOk (RabbitMQ leaves closing the socket to the
        # client; closing it from the server side is fine too).
        data, how = raw.read_until_closed(timeout=0.5)
    assert data == b""
    assert how in ("timeout", "eof"), how


def _publish_raw(raw, ch, queue, body, frame_max):
    raw.send(C.Basic.Publish(exchange="", routing_key=queue), ch)
    raw.send(pamqp.header.ContentHeader(0, len(body), C.Basic.Properties(message_id="raw")), ch)
    step = frame_max - 8
    for i in range(0, len(body), step):
        raw.send(pamqp.body.ContentBody(body[i : i + step]), ch)


@pytest.mark.parametrize("frame_max", [4096, 10000])
def test_frames_to_client_respect_frame_max(target, names, frame_max):
    q = names.queue()
    body = os.urandom(50_000)
    with RawAMQP(target.host, target.port) as raw:
        _, _, reply = raw.handshake(frame_max=frame_max)
        assert isinstance(reply, C.Connection.OpenOk)
        raw.send(C.Channel.Open(), 1)
        raw.expect(C.Channel.OpenOk, channel=1)
        raw.send(C.Queue.Declare(queue=q), 1)
        raw.expect(C.Queue.DeclareOk, channel=1)
        raw.send(C.Confirm.Select(), 1)
        raw.expect(C.Confirm.SelectOk, channel=1)
        _publish_raw(raw, 1, q, body, frame_max)
        ack = raw.expect(C.Basic.Ack, channel=1)
        assert ack.delivery_tag == 1
        raw.frame_sizes.clear()
        raw.send(C.Basic.Get(queue=q, no_ack=True), 1)
        get_ok = raw.expect(C.Basic.GetOk, channel=1)
        assert get_ok.delivery_tag == 1
        header = raw.expect(pamqp.header.ContentHeader, channel=1)
        assert header.body_size == len(body)
        assert header.properties.message_id == "raw"
        got = b""
        while len(got) < len(body):
            got += raw.expect(pamqp.body.ContentBody, channel=1).value
        assert got == body
        assert max(raw.frame_sizes) <= frame_max, raw.frame_sizes
        # The body was split as densely as allowed.
        assert max(raw.frame_sizes) == frame_max, raw.frame_sizes


def _expect_connection_close(raw):
    """Skip other frames until Connection.Close; answer it; return it."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ch, frame = raw.recv_frame()
        if isinstance(frame, C.Connection.Close):
            assert ch == 0
            raw.send(C.Connection.CloseOk())
            return frame
    raise AssertionError("no Connection.Close")


def test_method_on_unopened_channel_is_504(target):
    with RawAMQP(target.host, target.port) as raw:
        raw.handshake()
        raw.send(C.Queue.Declare(queue="", exclusive=True), 5)
        close = _expect_connection_close(raw)
    assert (close.reply_code, close.reply_text, close.class_id, close.method_id) == (
        504,
        "CHANNEL_ERROR - expected 'channel.open'",
        50,
        10,
    )


def test_second_channel_open_is_504(target):
    with RawAMQP(target.host, target.port) as raw:
        raw.handshake()
        raw.send(C.Channel.Open(), 1)
        raw.expect(C.Channel.OpenOk, channel=1)
        raw.send(C.Channel.Open(), 1)
        close = _expect_connection_close(raw)
    assert (close.reply_code, close.reply_text, close.class_id, close.method_id) == (
        504,
        "CHANNEL_ERROR - second 'channel.open' seen",
        20,
        10,
    )


def test_oversized_frame_from_client_is_501(target):
    with RawAMQP(target.host, target.port) as raw:
        raw.handshake(frame_max=4096)
        raw.send(C.Channel.Open(), 1)
        raw.expect(C.Channel.OpenOk, channel=1)
        raw.send(C.Basic.Publish(exchange="", routing_key="nowhere"), 1)
        raw.send(pamqp.header.ContentHeader(0, 10000, C.Basic.Properties()), 1)
        raw.send(pamqp.body.ContentBody(b"x" * 10000), 1)
        close = _expect_connection_close(raw)
    assert close.reply_code == 501
    assert close.reply_text.startswith("FRAME_ERROR - ")


def test_dead_client_detected_by_missing_heartbeats(target):
    """A client that negotiated heartbeat=1 and then goes silent is dropped
    (the broker does it after ~3 s) and was sent heartbeats meanwhile."""
    with RawAMQP(target.host, target.port) as raw:
        _, _, reply = raw.handshake(heartbeat=1)
        assert isinstance(reply, C.Connection.OpenOk)
        raw.sock.settimeout(12)
        t0 = time.monotonic()
        frames = []
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                frames.append(raw.recv_frame())
        elapsed = time.monotonic() - t0
    assert elapsed < 10, elapsed
    heartbeats = [f for ch, f in frames if type(f).__name__ == "Heartbeat"]
    assert len(heartbeats) >= 1
    assert all(ch == 0 for ch, _ in frames)
