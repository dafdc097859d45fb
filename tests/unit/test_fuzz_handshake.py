"""Property-based tests of the client handshake: its pure parts, and the real
`ClientSession._handshake` driven over a gevent socket pair with a stub pool (no broker).

Whatever bytes a client sends (then closes), the handshake ends within --handshake-timeout with
a completed login, a refusal (a plain close, or a Connection.Close with a valid hard code), and
never another exception; what the proxy wrote is well-formed AMQP. The timeout bounds the whole
handshake: a client sending its header a byte at a time does not extend it.
"""

from __future__ import annotations

import struct
import time

import gevent
import gevent.socket
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from amqproxy.client import ClientSession
from amqproxy.client_handshake import Refused
from amqproxy.config import Config
from amqproxy.protocol import constants as c
from amqproxy.protocol.codec import decode_method, encode_method, encode_table
from amqproxy.protocol.errors import ProtocolError
from amqproxy.protocol.frames import FrameReader, method_frame
from amqproxy.protocol.handshake import AuthError, client_capabilities, negotiate, parse_credentials
from amqproxy.server import Proxy
from amqproxy.upstream_handshake import UpstreamError

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)

# ---------------------------------------------------------------------------- pure parts


@given(text, text, text)
def test_plain_response_round_trip(authzid, user, password):
    response = f"{authzid}\0{user}\0{password}".encode()
    if "\0" in authzid + user + password:
        with pytest.raises(AuthError) as err:
            parse_credentials("PLAIN", response)
        assert err.value.reply_code == 403
        return
    credentials = parse_credentials("PLAIN", response)
    assert (credentials.username, credentials.password, credentials.mechanism) == (user, password, "PLAIN")


@given(text, text, st.dictionaries(text, st.integers(0, 10), max_size=3))
def test_amqplain_response_round_trip(user, password, extra):
    table = {**extra, "LOGIN": user, "PASSWORD": password}
    credentials = parse_credentials("AMQPLAIN", encode_table(table)[4:])
    assert (credentials.username, credentials.password, credentials.mechanism) == (user, password, "AMQPLAIN")


@given(st.sampled_from(["PLAIN", "AMQPLAIN", "EXTERNAL", "", "plain", "\udcff"]), st.binary(max_size=200))
@example("AMQPLAIN", b"\x05LOGINS\x00\x00\x00\x01u")  # no PASSWORD
@example("AMQPLAIN", b"\x05LOGINF" + b"\x00\x00\x00\x00")  # LOGIN is a table
def test_any_sasl_response_gives_credentials_or_an_auth_error(mechanism, response):
    try:
        credentials = parse_credentials(mechanism, response)
    except AuthError as exc:
        assert exc.reply_code in (403, 503)
        assert exc.text.startswith(("ACCESS_REFUSED - ", "COMMAND_INVALID - "))
        return
    assert mechanism in ("PLAIN", "AMQPLAIN")
    assert isinstance(credentials.username, str) and isinstance(credentials.password, str)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_negotiate_is_the_smaller_non_zero_limit(ours, theirs):
    got = negotiate(ours, theirs)
    assert got == negotiate(theirs, ours)
    assert got == (max(ours, theirs) if 0 in (ours, theirs) else min(ours, theirs))


@given(
    st.dictionaries(
        st.sampled_from(["capabilities", "product", ""]),
        st.one_of(st.booleans(), st.integers(), text, st.dictionaries(text, st.one_of(st.booleans(), st.integers()))),
    )
)
def test_client_capabilities_never_fail(properties):
    caps = client_capabilities(properties)
    assert all(properties["capabilities"][cap] is True for cap in caps)


# ---------------------------------------------------------------------------- the real handshake

HANDSHAKE_TIMEOUT = 1.0
BOUND = HANDSHAKE_TIMEOUT + 4.0  # + the close-ok wait of a refusal (3 s) + slack


_PROXY = None


def stub_authenticate(credentials, deadline):
    if (credentials.username, credentials.password) != ("guest", "guest"):
        raise UpstreamError("ACCESS_REFUSED - Login was refused", 403, permanent=True)


def stub_open_vhost(credentials, vhost, deadline):
    if vhost != "/":
        raise UpstreamError(f"NOT_ALLOWED - vhost '{vhost}' not found", 530, permanent=True)


def real_proxy() -> Proxy:
    """One real (never started) Proxy for the module; its pool logs in against nothing: the stubs
    accept guest/guest on "/". Its metrics are the process-wide Prometheus counters."""
    global _PROXY
    if _PROXY is None:
        _PROXY = Proxy(Config(handshake_timeout=HANDSHAKE_TIMEOUT))
        _PROXY.pool.authenticate = stub_authenticate
        _PROXY.pool.open_vhost = stub_open_vhost
    return _PROXY


def refused_total(reason: str) -> float:
    return REGISTRY.get_sample_value("amqproxy_client_connections_refused_total", {"reason": reason}) or 0.0


def opened_total() -> float:
    return REGISTRY.get_sample_value("amqproxy_client_connections_opened_total", {"vhost": "/", "user": "guest"}) or 0.0


def drive_handshake(client_bytes, pace: float = 0.0, full: bool = False):
    """Run ClientSession._handshake against `client_bytes` (sent in the given pieces, `pace`
    seconds apart, then the write side closed). Returns (outcome, seconds, proxy output, number
    of clients opened). `full` runs the whole session (its outcome: ("run", close reason))."""
    proxy = real_proxy()
    opened_before = opened_total()
    ours, theirs = gevent.socket.socketpair()
    session = ClientSession(proxy, ours, ("127.0.0.1", 40000), proxy.sessions.discard)
    received = bytearray()

    def client():
        for piece in client_bytes:
            theirs.sendall(piece)
            if pace:
                gevent.sleep(pace)
        theirs.shutdown(1)  # SHUT_WR: the client sent all it will

    def reader():
        while chunk := theirs.recv(65536):
            received.extend(chunk)

    writer = gevent.spawn(client)
    drain = gevent.spawn(reader)
    started = time.monotonic()
    try:
        with gevent.Timeout(BOUND + 5, AssertionError("the handshake did not end")):
            try:
                if full:
                    session.run()
                    outcome = ("run", session.close_reason)
                else:
                    session._handshake()
                    outcome = ("open",)
            except Refused as exc:
                outcome = ("refused", str(exc))
            except ProtocolError as exc:
                outcome = ("protocol_error", exc.reply_code, exc.text)
    finally:
        elapsed = time.monotonic() - started
        writer.kill()
        session.outbox.close_when_drained()
        session.outbox.join(1)
        session.outbox.kill()
        ours.close()
        drain.join(2)
        drain.kill()
        theirs.close()
    return outcome, elapsed, bytes(received), opened_total() - opened_before


def proxy_frames(output: bytes) -> list[tuple[int, int, tuple[int, int] | None, dict]]:
    """Parse what the proxy wrote: optionally its protocol header, then whole frames only."""
    if output.startswith(c.PROTOCOL_HEADER):
        assert output == c.PROTOCOL_HEADER, "nothing follows a protocol header reply"
        return []
    reader = FrameReader(c.PRE_TUNE_FRAME_MAX)
    reader.feed(output)
    frames = []
    while (frame := reader.next_frame()) is not None:
        frame_type, channel, start, end = frame
        assert frame_type == c.FRAME_METHOD and channel == 0
        method, args = decode_method(bytes(reader.buffer[start:end]))
        frames.append((frame_type, channel, method, args))
    assert reader.pending() == 0, "the proxy wrote a partial frame"
    return frames


def start_ok(user="guest", password="guest", mechanism="PLAIN", properties=None):
    response = f"\0{user}\0{password}".encode() if mechanism == "PLAIN" else b""
    return method_frame(
        0,
        encode_method(
            c.CONNECTION_START_OK,
            client_properties=properties or {"capabilities": {"authentication_failure_close": True}},
            mechanism=mechanism,
            response=response,
            locale="en_US",
        ),
    )


def deep_start_ok(depth: int = 3000) -> bytes:
    """A StartOk whose client properties nest `depth` tables deep (once a RecursionError: 541)."""
    table = b"\x00\x00\x00\x00"
    for _ in range(depth):
        body = b"\x01kF" + table
        table = len(body).to_bytes(4, "big") + body
    response = b"\0guest\0guest"
    payload = b"\x00\x0a\x00\x0b" + table + b"\x05PLAIN" + len(response).to_bytes(4, "big") + response + b"\x05en_US"
    return method_frame(0, payload)


VALID_HANDSHAKE = (
    c.PROTOCOL_HEADER
    + start_ok()
    + method_frame(0, encode_method(c.CONNECTION_TUNE_OK, channel_max=2047, frame_max=131072, heartbeat=0))
    + method_frame(0, encode_method(c.CONNECTION_OPEN, virtual_host="/"))
)
HARD_CODES = {c.ACCESS_REFUSED, c.FRAME_ERROR, c.COMMAND_INVALID, c.UNEXPECTED_FRAME, c.NOT_ALLOWED, 530}


def check_outcome(outcome, elapsed, output, opened):
    assert elapsed < BOUND, (outcome, elapsed)
    frames = proxy_frames(output)
    methods = [method for _, _, method, _ in frames]
    if outcome[0] == "open":
        assert methods == [c.CONNECTION_START, c.CONNECTION_TUNE, c.CONNECTION_OPEN_OK]
        assert opened == 1
    elif outcome[0] == "protocol_error":
        _, code, reply_text = outcome
        assert code in HARD_CODES and reply_text.startswith(c.REPLY_NAMES[code] + " - ")
        assert c.CONNECTION_START in methods or not output
    else:
        assert opened == 0
        if methods and methods[-1] == c.CONNECTION_CLOSE:
            assert frames[-1][3]["reply_code"] in HARD_CODES | {c.CONNECTION_FORCED}


def test_a_valid_handshake_opens():
    outcome, elapsed, output, opened = drive_handshake([VALID_HANDSHAKE])
    assert outcome == ("open",)
    check_outcome(outcome, elapsed, output, opened)


@given(st.binary(max_size=300))
@example(b"")
@example(b"AMQP\x00\x00\x09")  # a header cut short
@example(b"GET / HTTP/1.1\r\n\r\n")
@example(b"AMQP\x00\x00\x09\x01" + b"\x08\x00\x00\x00\x00\x00\x00\xce")  # a heartbeat before StartOk
def test_arbitrary_client_bytes_end_the_handshake_cleanly(data):
    check_outcome(*drive_handshake([data]))


@st.composite
def mutated_handshakes(draw):
    """A valid handshake byte stream with a few bytes flipped, inserted or removed, split into reads."""
    data = bytearray(VALID_HANDSHAKE)
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip" and where < len(data):
            data[where] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif where < len(data):
            del data[where : where + draw(st.integers(1, 8))]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=6))) | {0, len(data)})
    return [bytes(data[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]


@given(mutated_handshakes())
def test_mutated_handshakes_end_cleanly(pieces):
    check_outcome(*drive_handshake(pieces))


@pytest.mark.parametrize(
    "stream,expected",
    [
        (c.PROTOCOL_HEADER + b"\x01\x00\x00\x00\x00\x00\x05\x00\x0a", ("refused",)),  # truncated, then EOF
        (c.PROTOCOL_HEADER + start_ok()[:-1] + b"\x00", ("protocol_error", 501)),  # wrong frame end
        (c.PROTOCOL_HEADER + struct.pack(">BHI", 9, 0, 0) + b"\xce", ("protocol_error", 501)),
        (c.PROTOCOL_HEADER + struct.pack(">BHI", 1, 0, 10**6), ("protocol_error", 501)),  # beyond frame_max
        (c.PROTOCOL_HEADER + method_frame(1, encode_method(c.CONNECTION_START_OK)), ("protocol_error", 505)),
        (c.PROTOCOL_HEADER + method_frame(0, encode_method(c.CONNECTION_OPEN)), ("protocol_error", 503)),
        (c.PROTOCOL_HEADER + start_ok(mechanism="EXTERNAL"), ("refused",)),
        (c.PROTOCOL_HEADER + start_ok(password="wrong"), ("refused",)),
        (b"AMQP\x00\x00\x08\x00", ("refused",)),
        (c.PROTOCOL_HEADER + deep_start_ok(), ("protocol_error", 501)),
    ],
    ids=[
        "truncated",
        "frame-end",
        "frame-type",
        "frame-max",
        "channel-1",
        "open-first",
        "mechanism",
        "password",
        "0-8",
        "deep-table",
    ],
)
def test_handshake_refusals(stream, expected):
    header_refusals = refused_total("protocol_header")
    outcome, elapsed, output, opened = drive_handshake([stream])
    if stream.startswith(b"AMQP\x00\x00\x08"):
        assert refused_total("protocol_header") == header_refusals + 1
        assert output == c.PROTOCOL_HEADER  # spec 4.2.2: our header, then close
    assert outcome[: len(expected)] == expected, outcome
    check_outcome(outcome, elapsed, output, opened)


@pytest.mark.parametrize("what", ["header", "start_ok"])
def test_handshake_timeout_bounds_a_client_that_trickles_bytes(what):
    """Slowloris: a byte every 0.2 s never finishes; --handshake-timeout (1 s) ends it on time,
    however many bytes arrived meanwhile (the deadline is fixed, not reset per read)."""
    prefix = b"" if what == "header" else c.PROTOCOL_HEADER
    body = c.PROTOCOL_HEADER if what == "header" else start_ok()
    pieces = ([prefix] if prefix else []) + [bytes([b]) for b in body[:-1]]
    timeouts = refused_total("handshake_timeout")
    outcome, elapsed, output, opened = drive_handshake(pieces, pace=0.2, full=True)
    assert outcome == ("run", "handshake timeout")
    assert HANDSHAKE_TIMEOUT - 0.05 <= elapsed < HANDSHAKE_TIMEOUT + 0.5, elapsed
    assert refused_total("handshake_timeout") == timeouts + 1
    # A plain close: nothing but Connection.Start (once the header was complete) was written.
    assert [method for _, _, method, _ in proxy_frames(output)] == ([c.CONNECTION_START] if prefix else [])
