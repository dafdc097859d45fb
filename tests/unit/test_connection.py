"""The client side's channel 0 (protocol.connection), driven with bytes alone: no socket, no
broker, no session. The session's decisions are made here by the test."""

from __future__ import annotations

import pytest

from amqproxy.protocol import constants as c
from amqproxy.protocol.codec import decode_method, encode_method, encode_table
from amqproxy.protocol.connection import (
    Authenticate,
    ClientClosed,
    ClientConnection,
    ConnectionState,
    Ended,
    OpenVhost,
    Refuse,
    SecretUpdated,
    Send,
)
from amqproxy.protocol.errors import ProtocolError
from amqproxy.protocol.frames import HEARTBEAT_FRAME, FrameReader, method_frame

CAPS = {"capabilities": {"authentication_failure_close": True}}


def frame(method, **args) -> bytes:
    return method_frame(0, encode_method(method, **args))


def start_ok(user="guest", password="guest", mechanism="PLAIN", properties=CAPS) -> bytes:
    response = f"\0{user}\0{password}".encode()
    if mechanism == "AMQPLAIN":
        response = encode_table({"LOGIN": user, "PASSWORD": password})[4:]
    return frame(c.CONNECTION_START_OK, client_properties=properties, mechanism=mechanism, response=response, locale="")


def tune_ok(channel_max=100, frame_max=8192, heartbeat=30) -> bytes:
    return frame(c.CONNECTION_TUNE_OK, channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat)


OPEN = frame(c.CONNECTION_OPEN, virtual_host="/")
CLOSE = frame(c.CONNECTION_CLOSE, reply_code=200, reply_text="bye", class_id=0, method_id=0)
CLOSE_OK = frame(c.CONNECTION_CLOSE_OK)


def methods(data: bytes) -> list[tuple[tuple[int, int], dict]]:
    """The method frames in what the core asked to send."""
    reader = FrameReader(1 << 20)
    reader.feed(data)
    out = []
    while (f := reader.next_frame()) is not None:
        out.append(decode_method(bytes(reader.buffer[f[2] : f[3]])))
    return out


def actions(core: ClientConnection, data: bytes = b"") -> list:
    if data:
        core.receive_data(data)
    out = []
    while (action := core.next_action()) is not None:
        out.append(action)
        if isinstance(action, Authenticate | OpenVhost | Refuse | Ended):
            break
    return out


def test_a_whole_handshake_in_one_read():
    core = ClientConnection(client_heartbeat=60)
    sent, authenticate = actions(core, c.PROTOCOL_HEADER + start_ok() + tune_ok() + OPEN)
    assert methods(sent.data)[0][0] == c.CONNECTION_START
    assert isinstance(authenticate, Authenticate) and authenticate.credentials.username == "guest"
    assert core.state is ConnectionState.AUTHENTICATING and core.capabilities == {"authentication_failure_close"}
    tune = core.authenticated(2047, 131072)
    assert methods(tune.data) == [(c.CONNECTION_TUNE, {"channel_max": 2047, "frame_max": 131072, "heartbeat": 60})]
    assert actions(core) == [OpenVhost("/")]  # the pipelined TuneOk and Open were waiting
    assert (core.channel_max, core.frame_max, core.max_body, core.heartbeat) == (100, 8192, 8184, 30)
    assert core.reader.max_frame_size == 8192
    assert methods(core.opened().data) == [(c.CONNECTION_OPEN_OK, {"known_hosts": ""})]
    assert core.state is ConnectionState.RUNNING


def test_bytes_one_at_a_time_and_heartbeats_are_fine():
    core = ClientConnection(client_heartbeat=0)
    stream = c.PROTOCOL_HEADER + HEARTBEAT_FRAME + start_ok(mechanism="AMQPLAIN")
    got = []
    for byte in stream:
        got += actions(core, bytes([byte]))
    assert [type(a) for a in got] == [Send, Authenticate]
    assert got[1].credentials.mechanism == "AMQPLAIN"


def test_an_unsupported_header_gets_ours_and_the_end():
    core = ClientConnection(0)
    assert actions(core, b"AMQP\x01\x01\x08\x00") == [
        Send(c.PROTOCOL_HEADER),
        Ended("unsupported protocol header", "protocol_header"),
    ]
    http = ClientConnection(0)
    assert actions(http, b"GE")[0] == Send(c.PROTOCOL_HEADER)  # not "AMQP": refused before 8 bytes


def test_the_legacy_0_9_1_header_is_accepted():
    core = ClientConnection(0)
    assert isinstance(actions(core, c.LEGACY_0_9_1_HEADER)[0], Send)
    assert core.state is ConnectionState.START_SENT


def test_tune_ok_limits_are_rabbitmqs_530s():
    for tune, text in (
        (tune_ok(frame_max=1024), "NOT_ALLOWED - frame_max=1024 < 4096 min size"),
        (tune_ok(frame_max=262144), "NOT_ALLOWED - frame_max=262144 > 131072 max size"),
        (tune_ok(channel_max=4000), "NOT_ALLOWED - channel_max=4000 > 2047 max channels"),
    ):
        core = ClientConnection(0)
        actions(core, c.PROTOCOL_HEADER + start_ok())
        core.authenticated(2047, 131072)
        with pytest.raises(ProtocolError) as raised:
            actions(core, tune)
        assert (raised.value.reply_code, raised.value.text, raised.value.method) == (530, text, c.CONNECTION_TUNE_OK)


def test_zero_in_tune_ok_takes_what_was_offered():
    core = ClientConnection(0)
    actions(core, c.PROTOCOL_HEADER + start_ok())
    core.authenticated(2047, 131072)
    actions(core, tune_ok(channel_max=0, frame_max=0, heartbeat=0))
    assert (core.channel_max, core.frame_max) == (2047, 131072)


def test_methods_out_of_order_and_on_other_channels():
    core = ClientConnection(0)
    actions(core, c.PROTOCOL_HEADER)
    with pytest.raises(ProtocolError) as raised:
        actions(core, OPEN)
    assert raised.value.reply_code == 503
    assert raised.value.text == "COMMAND_INVALID - expected connection.start-ok, got connection.open"
    other = ClientConnection(0)
    actions(other, c.PROTOCOL_HEADER)
    with pytest.raises(ProtocolError) as raised:
        actions(other, method_frame(1, encode_method(c.CHANNEL_OPEN)))
    assert raised.value.text == "UNEXPECTED_FRAME - expected connection.start-ok on channel 0"


def test_bad_credentials_are_refusals_for_the_session_to_count():
    core = ClientConnection(0)
    (_, refuse) = actions(core, c.PROTOCOL_HEADER + start_ok(mechanism="CRAM-MD5"))
    assert refuse == Refuse(503, "COMMAND_INVALID - unknown authentication mechanism 'CRAM-MD5'", c.CONNECTION_START_OK)
    close = core.refuse(refuse.reply_code, refuse.text, refuse.method)
    assert methods(close.data)[0][1]["reply_code"] == 503 and core.state is ConnectionState.CLOSING


def test_a_refused_login_without_authentication_failure_close_just_ends():
    core = ClientConnection(0)
    actions(core, c.PROTOCOL_HEADER + start_ok(properties={}))
    assert core.refuse(403, "ACCESS_REFUSED - no", c.CONNECTION_START_OK) == Ended("ACCESS_REFUSED - no")
    assert core.state is ConnectionState.CLOSED
    polite = ClientConnection(0)
    actions(polite, c.PROTOCOL_HEADER + start_ok())
    assert isinstance(polite.refuse(403, "ACCESS_REFUSED - no", c.CONNECTION_START_OK), Send)


def test_a_close_during_the_handshake_is_answered():
    core = ClientConnection(0)
    actions(core, c.PROTOCOL_HEADER)
    assert actions(core, CLOSE) == [Send(CLOSE_OK), Ended("client closed during the handshake")]


def test_after_our_close_only_close_ok_or_a_crossing_close_matters():
    core = ClientConnection(0)
    actions(core, c.PROTOCOL_HEADER + start_ok())
    core.close(320, "CONNECTION_FORCED - shutting down")
    assert actions(core, HEARTBEAT_FRAME + OPEN + method_frame(3, b"junk")) == []
    assert actions(core, CLOSE_OK) == [Ended("Close-Ok received")]
    crossing = ClientConnection(0)
    actions(crossing, c.PROTOCOL_HEADER)
    crossing.close(541, "INTERNAL_ERROR")
    assert actions(crossing, CLOSE) == [Send(CLOSE_OK), Ended("the client's Close crossed ours")]
    garbage = ClientConnection(0)
    actions(garbage, c.PROTOCOL_HEADER)
    garbage.close(501, "FRAME_ERROR")
    assert actions(garbage, b"\x09" * 20) == [Ended("unreadable bytes after Connection.Close")]


def test_close_texts_are_cut_to_a_shortstr():
    core = ClientConnection(0)
    close = core.close(405, "é" * 200)
    assert len(methods(close.data)[0][1]["reply_text"].encode()) == 255


def test_channel_0_while_running():
    core = ClientConnection(0)
    assert core.connection_frame(c.FRAME_HEARTBEAT, b"") is None
    assert core.connection_frame(c.FRAME_METHOD, CLOSE[7:-1]) == ClientClosed(200, "bye")
    secret = encode_method(c.CONNECTION_UPDATE_SECRET, new_secret=b"token", reason="refresh")
    assert core.connection_frame(c.FRAME_METHOD, secret) == SecretUpdated()
    with pytest.raises(ProtocolError) as raised:
        core.connection_frame(c.FRAME_METHOD, OPEN[7:-1])
    assert raised.value.text == "CHANNEL_ERROR - unexpected method in connection state running"
    with pytest.raises(ProtocolError) as raised:
        core.connection_frame(c.FRAME_BODY, b"x")
    assert raised.value.reply_code == 505
