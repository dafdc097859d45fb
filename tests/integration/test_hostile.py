"""What RabbitMQ punishes by closing a whole connection must close only the offending client:
its pooled upstream connection, shared with others, stays up."""

from __future__ import annotations

import json
import time
import urllib.request

import pamqp.body
import pamqp.commands as C
import pamqp.frame
import pamqp.header
import pytest
from prometheus_client.parser import text_string_to_metric_families

from amqproxy.protocol.constants import REPLY_NAMES

from ._support import RawAMQP, wait_until

pytestmark = [pytest.mark.integration]


def upstream_ids(proc) -> set[int]:
    with urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/upstreams", timeout=10) as response:
        return {c["id"] for c in json.loads(response.read())["connections"]}


def publish_frames(properties: bytes, body: bytes = b"hello") -> bytes:
    """basic.publish + a content header whose property list is given raw + one body frame."""
    publish = pamqp.frame.marshal(C.Basic.Publish(exchange="", routing_key="nowhere"), 1)
    header_payload = b"\x00\x3c\x00\x00" + len(body).to_bytes(8, "big") + properties
    header = b"\x02\x00\x01" + len(header_payload).to_bytes(4, "big") + header_payload + b"\xce"
    return publish + header + pamqp.frame.marshal(pamqp.body.ContentBody(body), 1)


def raw_method(channel: int, payload: bytes) -> bytes:
    return b"\x01" + channel.to_bytes(2, "big") + len(payload).to_bytes(4, "big") + payload + b"\xce"


# queue.declare(queue="amqproxy-test-nan", arguments={"k": NaN as a double})
NAN_DECLARE = raw_method(
    1,
    b"\x00\x32\x00\x0a\x00\x00\x11amqproxy-test-nan\x00" + b"\x00\x00\x00\x0b\x01kd\x7f\xf8\x00\x00\x00\x00\x00\x00",
)


@pytest.mark.parametrize(
    "frames,code",
    [
        # a content-type property flagged but longer than the frame
        (publish_frames(b"\x80\x00\x09text/"), 501),
        # headers table with an unknown field type
        (publish_frames(b"\x20\x00" + b"\x00\x00\x00\x05\x01aZ\x00\x00"), 501),
        # the continuation bit
        (publish_frames(b"\x00\x01"), 501),
        # NaN in a queue.declare argument table (the broker drops the whole connection)
        (NAN_DECLARE, 501),
        (pamqp.frame.marshal(C.Basic.Recover(requeue=False), 1), 540),
        (pamqp.frame.marshal(C.Basic.Qos(prefetch_size=7), 1), 540),
    ],
    ids=["property-overrun", "property-table-type", "property-continuation", "nan-argument", "recover", "qos-size"],
)
@pytest.mark.proxy_only
def test_hard_errors_close_only_the_offender(proxy_factory, frames, code):
    proc = proxy_factory("--separate-publishers", "false")
    target = proc.target()
    bystander = target.pika()
    by_ch = bystander.channel()
    queue = by_ch.queue_declare("", exclusive=True).method.queue
    before = upstream_ids(proc)
    with RawAMQP(target.host, target.port) as raw:
        raw.handshake()
        raw.send(C.Channel.Open(), 1)
        raw.expect(C.Channel.OpenOk, channel=1)
        raw.send(C.Queue.Declare(queue="", exclusive=True), 1)  # place the channel first
        raw.expect(C.Queue.DeclareOk, channel=1)
        raw.send_bytes(frames)
        close = raw.expect(C.Connection.Close, channel=0)
        assert close.reply_code == code, close
        raw.send(C.Connection.CloseOk())
    by_ch.basic_publish("", queue, b"still fine")
    assert by_ch.basic_get(queue, auto_ack=True)[2] == b"still fine"
    assert upstream_ids(proc) == before  # the shared upstream survived
    assert not [r for r in proc.log_records() if r.get("event") == "upstream_lost"]
    bystander.close()


@pytest.mark.proxy_only
def test_exclusive_queue_of_a_client_that_vanished_mid_declare_is_deleted(proxy_factory, broker):
    """The declare-ok arrives after its client is gone: the queue must not outlive it."""
    proc = proxy_factory()
    target = proc.target()
    names = [f"amqproxy-test-vanish-{i}-{time.monotonic_ns()}" for i in range(5)]
    for name in names:
        with RawAMQP(target.host, target.port) as raw:
            raw.handshake()
            raw.send(C.Channel.Open(), 1)
            raw.expect(C.Channel.OpenOk, channel=1)
            raw.send(C.Queue.Declare(queue=name, exclusive=True), 1)
        # the socket closes before the declare-ok can be read
    listed = lambda: {q for q in broker.ctl("-q", "list_queues", "name").split() if q in names}  # noqa: E731
    wait_until(lambda: not listed(), timeout=5, interval=0.2, msg="exclusive queues outlived their clients")


@pytest.mark.proxy_only
def test_exclusive_queue_survives_an_idle_upstream_reap(proxy_factory):
    """A client keeps its exclusive queue while its channels are closed and the connection
    they used goes idle past --idle-timeout."""
    proc = proxy_factory("--idle-timeout", "1")
    conn = proc.target().pika()
    ch = conn.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.close()
    time.sleep(2.5)  # intrinsic: past the idle timeout
    ch = conn.channel()
    assert ch.queue_declare(queue, passive=True).method.queue == queue
    conn.close()


def test_nowait_cancel_frees_the_consumer_tag(target, names):
    queue = names.queue()
    with RawAMQP(target.host, target.port) as raw:
        raw.handshake()
        raw.send(C.Channel.Open(), 1)
        raw.expect(C.Channel.OpenOk, channel=1)
        raw.send(C.Queue.Declare(queue=queue), 1)
        raw.expect(C.Queue.DeclareOk, channel=1)
        raw.send(C.Basic.Consume(queue=queue, consumer_tag="t1"), 1)
        raw.expect(C.Basic.ConsumeOk, channel=1)
        raw.send(C.Basic.Cancel(consumer_tag="t1", nowait=True), 1)
        raw.send(C.Basic.Consume(queue=queue, consumer_tag="t1"), 1)  # the broker allows the reuse
        assert raw.expect(C.Basic.ConsumeOk, channel=1).consumer_tag == "t1"


def test_close_pipelined_after_tx_commit(target):
    with RawAMQP(target.host, target.port) as raw:
        raw.handshake()
        raw.send(C.Channel.Open(), 1)
        raw.expect(C.Channel.OpenOk, channel=1)
        raw.send(C.Tx.Select(), 1)
        raw.expect(C.Tx.SelectOk, channel=1)
        raw.send_bytes(
            pamqp.frame.marshal(C.Tx.Commit(), 1)
            + pamqp.frame.marshal(C.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0), 1)
        )
        raw.expect(C.Tx.CommitOk, channel=1)
        raw.expect(C.Channel.CloseOk, channel=1)


# ---------------------------------------------------------------------------- bad input
#
# Every kind of broken client gets the close RabbitMQ would give it (501-505 after the handshake,
# a plain close or a 501 before it), within a bounded time; the proxy counts it in /metrics, and a
# well-behaved client on the same upstream connection notices nothing.

CLOSE_BOUND = 2.0  # seconds from the bad bytes to the proxy's Connection.Close (or EOF)


def frame(frame_type: int, channel: int, payload: bytes, end: bytes = b"\xce") -> bytes:
    return bytes([frame_type]) + channel.to_bytes(2, "big") + len(payload).to_bytes(4, "big") + payload + end


def marshal(method, channel: int = 1) -> bytes:
    return pamqp.frame.marshal(method, channel)


def content_header(body_size: int = 5, class_id: int = 60, weight: int = 0, channel: int = 1) -> bytes:
    payload = class_id.to_bytes(2, "big") + weight.to_bytes(2, "big") + body_size.to_bytes(8, "big") + b"\x00\x00"
    return frame(2, channel, payload)


PUBLISH = marshal(C.Basic.Publish(exchange="", routing_key="amqproxy-test-nowhere"))
BODY = marshal(pamqp.body.ContentBody(b"hello"))

# (id, bytes sent on an open channel 1, reply code, exact text or None (framing texts differ from
# RabbitMQ's Erlang terms), (class, method) of the close, frames_failed reason)
BAD_INPUT = [
    ("frame-type", frame(9, 0, b""), 501, None, (0, 0), "frame_error"),
    ("frame-end", frame(1, 1, b"\x00\x3c\x00\x0a\x00\x00\x00\x00\x00", end=b"\x00"), 501, None, (0, 0), "frame_error"),
    ("frame-max", b"\x03\x00\x01\x00\x10\x00\x00", 501, None, (0, 0), "frame_error"),  # 1 MiB body frame
    ("garbage", b"\xde\xad\xbe\xef" * 8, 501, None, (0, 0), "frame_error"),
    (
        "unopened-channel",
        marshal(C.Basic.Qos(), 7),
        504,
        "CHANNEL_ERROR - expected 'channel.open'",
        (60, 10),
        "channel_error",
    ),
    (
        "second-open",
        marshal(C.Channel.Open()),
        504,
        "CHANNEL_ERROR - second 'channel.open' seen",
        (20, 10),
        "channel_error",
    ),
    (
        "header-first",
        content_header(),
        505,
        "UNEXPECTED_FRAME - expected method frame, got non method frame instead",
        (0, 0),
        "unexpected_frame",
    ),
    (
        "body-first",
        BODY,
        505,
        "UNEXPECTED_FRAME - expected method frame, got non method frame instead",
        (0, 0),
        "unexpected_frame",
    ),
    (
        "body-on-unopened",
        marshal(pamqp.body.ContentBody(b"hello"), 9),
        505,
        "UNEXPECTED_FRAME - expected method frame, got non method frame instead",
        (0, 0),
        "unexpected_frame",
    ),
    (
        "publish-then-body",
        PUBLISH + BODY,
        505,
        "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead",
        (60, 40),
        "unexpected_frame",
    ),
    (
        "publish-then-method",
        PUBLISH + marshal(C.Basic.Qos()),
        505,
        "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead",
        (60, 40),
        "unexpected_frame",
    ),
    (
        "header-then-method",
        PUBLISH + content_header() + marshal(C.Basic.Qos()),
        505,
        "UNEXPECTED_FRAME - expected content body, got non content body frame instead",
        (60, 40),
        "unexpected_frame",
    ),
    (
        "two-headers",
        PUBLISH + content_header() + content_header(),
        505,
        "UNEXPECTED_FRAME - expected content body, got non content body frame instead",
        (60, 40),
        "unexpected_frame",
    ),
    (
        "header-of-class-50",
        PUBLISH + content_header(class_id=50),
        505,
        "UNEXPECTED_FRAME - expected content header for class 60, got one for class 50 instead",
        (60, 40),
        "unexpected_frame",
    ),
    (
        "header-weight",
        PUBLISH + content_header(weight=1),
        505,
        "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead",
        (60, 40),
        "unexpected_frame",
    ),
    (
        "body-after-empty-message",
        PUBLISH + content_header(body_size=0) + BODY,
        505,
        "UNEXPECTED_FRAME - expected method frame, got non method frame instead",
        (0, 0),
        "unexpected_frame",
    ),
    (
        "method-on-channel-0",
        marshal(C.Basic.Qos(), 0),
        504,
        "CHANNEL_ERROR - unexpected method in connection state running",
        (60, 10),
        "channel_error",
    ),
    (
        "trailing-bytes",
        frame(1, 1, marshal(C.Basic.Qos())[7:-1] + b"\x00"),
        501,
        None,
        (60, 10),
        "frame_error",
    ),
]


def shortstr(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


# Invalid UTF-8 in a short string of a method the broker decodes: RabbitMQ closes the whole
# connection (501). Forwarded, it once closed the shared upstream under every client on it.
MALFORMED = "FRAME_ERROR - Malformed UTF-8 in shortstr"
BAD_UTF8 = b"amqproxy-test-\xff"
NO_TABLE = b"\x00\x00\x00\x00"
BAD_INPUT += [
    (f"utf8-{name}", frame(1, 1, payload), 501, MALFORMED, (0, 0), "frame_error")
    for name, payload in [
        ("queue-declare", b"\x00\x32\x00\x0a\x00\x00" + shortstr(BAD_UTF8) + b"\x00" + NO_TABLE),
        (
            "queue-bind",
            b"\x00\x32\x00\x14\x00\x00"
            + shortstr(b"q")
            + shortstr(b"amq.direct")
            + shortstr(BAD_UTF8)
            + b"\x00"
            + NO_TABLE,
        ),
        ("exchange-type", b"\x00\x28\x00\x0a\x00\x00" + shortstr(b"x") + shortstr(b"dir\xe9ct") + b"\x01" + NO_TABLE),
        ("consumer-tag", b"\x00\x3c\x00\x14\x00\x00" + shortstr(b"") + shortstr(BAD_UTF8) + b"\x00" + NO_TABLE),
        ("basic-cancel", b"\x00\x3c\x00\x1e" + shortstr(BAD_UTF8) + b"\x00"),
        ("channel-close", b"\x00\x14\x00\x28\x00\xc8" + shortstr(BAD_UTF8) + b"\x00\x00\x00\x00"),
    ]
]
BAD_INPUT_IDS = [case[0] for case in BAD_INPUT]


def test_publish_with_invalid_utf8_routing_key_is_accepted(target):
    """RabbitMQ does not check basic.publish's short strings: neither may the proxy."""
    with RawAMQP(target.host, target.port) as raw:
        open_placed_channel(raw)
        raw.send(C.Confirm.Select(), 1)
        raw.expect(C.Confirm.SelectOk, channel=1)
        publish = frame(1, 1, b"\x00\x3c\x00\x28\x00\x00" + shortstr(b"") + shortstr(BAD_UTF8) + b"\x00")
        raw.send_bytes(publish + content_header(body_size=5) + BODY)
        assert raw.expect(C.Basic.Ack, channel=1).delivery_tag == 1


def close_of(raw: RawAMQP, timeout: float = 5.0):
    """Skip frames until Connection.Close (answered with Close-Ok): (code, text, (class, method));
    or 'eof' / 'reset' / 'timeout'."""
    raw.sock.settimeout(timeout)
    try:
        while True:
            channel, received = raw.recv_frame()
            if isinstance(received, C.Connection.Close):
                assert channel == 0
                try:
                    raw.send(C.Connection.CloseOk())
                except OSError:
                    pass
                return received.reply_code, received.reply_text, (received.class_id, received.method_id)
    except EOFError:
        return "eof"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"


def open_placed_channel(raw: RawAMQP) -> None:
    """Handshake, channel 1 open and placed on an upstream (a consuming channel, like the bystander's)."""
    raw.handshake()
    raw.send(C.Channel.Open(), 1)
    raw.expect(C.Channel.OpenOk, channel=1)
    raw.send(C.Queue.Declare(queue="", exclusive=True), 1)
    raw.expect(C.Queue.DeclareOk, channel=1)


@pytest.mark.parametrize("case", BAD_INPUT, ids=BAD_INPUT_IDS)
def test_bad_input_gets_rabbitmqs_close(target, case):
    """The broker is the reference: same reply code, same (class, method), same text except for
    framing errors (RabbitMQ prints Erlang terms there); within CLOSE_BOUND."""
    _id, data, code, text, method, _reason = case
    with RawAMQP(target.host, target.port) as raw:
        open_placed_channel(raw)
        started = time.monotonic()
        raw.send_bytes(data)
        close = close_of(raw)
        elapsed = time.monotonic() - started
    assert close != "timeout" and close[0] == code, close
    assert close[2] == method, close
    assert close[1].startswith(REPLY_NAMES[code] + " - ")
    if text is not None:
        assert close[1] == text
    assert elapsed < CLOSE_BOUND, elapsed


def scrape(proc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/metrics", timeout=10) as response:
        body = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def metric(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def healthz_clients(proc) -> int:
    with urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/healthz", timeout=10) as response:
        return json.loads(response.read())["clients"]


def busy_upstream_ids(proc) -> set[int]:
    with urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/upstreams", timeout=10) as response:
        return {c["id"] for c in json.loads(response.read())["connections"] if c["channels"]}


class Bystander:
    """A well-behaved pika client with a channel on the same upstream as the offender: it must
    notice nothing (its queue, its messages, its upstream connection stay)."""

    def __init__(self, proc):
        self.proc = proc
        self.log_offset = proc.log_size()
        self.conn = proc.target().pika()
        self.ch = self.conn.channel()
        self.queue = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.confirm_delivery()
        # The connections carrying channels now (the bystander's among them) must all survive;
        # idle ones may be reaped meanwhile on a shared proxy.
        self.upstreams = busy_upstream_ids(proc)
        assert self.upstreams
        self.sent = 0

    def check(self):
        body = f"bystander {self.sent}".encode()
        self.sent += 1
        self.ch.basic_publish("", self.queue, body)  # confirmed: raises if nacked or closed
        assert self.ch.basic_get(self.queue, auto_ack=True)[2] == body
        assert self.upstreams <= upstream_ids(self.proc)
        with open(self.proc.log_path, "rb") as log:
            log.seek(self.log_offset)
            lines = log.read().decode(errors="replace").splitlines()
        events = [json.loads(line).get("event") for line in lines if line.startswith("{")]
        assert "upstream_lost" not in events and "client_internal_error" not in events

    def close(self):
        self.conn.close()


@pytest.mark.proxy_only
def test_bad_input_closes_only_the_offender_and_is_counted(proxy_factory):
    proc = proxy_factory("--separate-publishers", "false")
    bystander = Bystander(proc)
    baseline = healthz_clients(proc)
    for case_id, data, code, _text, _method, reason in BAD_INPUT:
        before = scrape(proc)
        with RawAMQP(proc.host, proc.port) as raw:
            open_placed_channel(raw)
            started = time.monotonic()
            raw.send_bytes(data)
            close = close_of(raw)
            assert time.monotonic() - started < CLOSE_BOUND, case_id
            assert close[0] == code, (case_id, close)
            # The proxy closes the socket after the Close-Ok.
            assert raw.read_until_closed(timeout=CLOSE_BOUND)[1] in ("eof", "reset"), case_id
        bystander.check()
        wait_until(lambda: healthz_clients(proc) == baseline, timeout=5, msg=f"{case_id}: session leaked")
        after = scrape(proc)
        counted = {
            "frames_failed": metric(
                after, "amqproxy_frames_failed_total", direction="client_to_upstream", reason=reason
            )
            - metric(before, "amqproxy_frames_failed_total", direction="client_to_upstream", reason=reason),
            "closed": metric(
                after, "amqproxy_client_connections_closed_total", vhost="/", user="guest", reason="protocol_error"
            )
            - metric(
                before, "amqproxy_client_connections_closed_total", vhost="/", user="guest", reason="protocol_error"
            ),
        }
        assert counted == {"frames_failed": 1, "closed": 1}, case_id
    bystander.close()


def refused(samples, reason: str) -> float:
    return metric(samples, "amqproxy_client_connections_refused_total", reason=reason)


@pytest.mark.parametrize(
    "data,reply,reason",
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "header", "protocol_header"),  # a TLS ClientHello
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "header", "protocol_header"),
        (b"AMQP\x00\x00\x09\x01" + b"\xff" * 64, 501, "protocol_error"),  # header, then garbage
        (b"AMQP\x00\x00\x09\x01" + frame(1, 0, b"\x00\x0a\x00\x0b", end=b"\x00"), 501, "protocol_error"),
        (b"AMQP\x00\x00\x09\x01" + b"\x01\x00\x00\x7f\xff\xff\xff", 501, "protocol_error"),  # 2 GiB frame
        (b"AMQP\x00\x00\x09\x01" + marshal(C.Connection.StartOk(), 1), 505, "protocol_error"),
        (b"AMQP\x00\x00\x09\x01" + marshal(C.Connection.Open(), 0), 503, "protocol_error"),
    ],
    ids=["tls-hello", "http", "garbage", "frame-end", "frame-max", "channel-1", "open-before-start-ok"],
)
@pytest.mark.proxy_only
def test_bad_input_before_the_handshake_is_closed_at_once_and_counted(proxy, data, reply, reason):
    """Before Connection.OpenOk: a wrong protocol header gets ours and a plain close (spec 4.2.2);
    broken frames get a Connection.Close with the frame's error (RabbitMQ closes silently after 3 s
    instead). Either way at once, counted as a refused connection."""
    bystander = Bystander(proxy)
    baseline = healthz_clients(proxy)
    before = scrape(proxy)
    with RawAMQP(proxy.host, proxy.port) as raw:
        started = time.monotonic()
        raw.send_bytes(data)
        if reply == "header":
            received, how = raw.read_until_closed(timeout=CLOSE_BOUND)
            assert (received, how) in ((b"AMQP\x00\x00\x09\x01", "eof"), (b"AMQP\x00\x00\x09\x01", "reset"))
        else:
            raw.expect(C.Connection.Start, channel=0)
            close = close_of(raw)
            assert close != "timeout" and close[0] == reply, close
        assert time.monotonic() - started < CLOSE_BOUND
    wait_until(lambda: healthz_clients(proxy) == baseline, timeout=5, msg="session leaked")
    assert refused(scrape(proxy), reason) == refused(before, reason) + 1
    bystander.check()
    bystander.close()


HANDSHAKE_TIMEOUT = 1.0


@pytest.mark.parametrize(
    "pieces",
    [
        [],  # connects and never speaks
        [bytes([b]) for b in b"AMQP\x00\x00\x09\x01"],  # slowloris: the header a byte at a time
        [b"AMQP\x00\x00\x09\x01"] + [bytes([b]) for b in marshal(C.Connection.StartOk(), 0)],  # ... or StartOk
    ],
    ids=["silent", "header-byte-by-byte", "start-ok-byte-by-byte"],
)
@pytest.mark.proxy_only
def test_handshake_timeout_bounds_the_whole_handshake(proxy_factory, pieces):
    """--handshake-timeout is a deadline for the whole handshake, not an idle timeout reset by
    each byte: a client trickling a byte every 0.3 s is closed (plain close) after 1 s."""
    proc = proxy_factory("--handshake-timeout", str(HANDSHAKE_TIMEOUT))
    bystander = Bystander(proc)
    baseline = healthz_clients(proc)
    before = scrape(proc)
    with RawAMQP(proc.host, proc.port) as raw:
        started = time.monotonic()
        how = None
        for piece in pieces:
            try:
                raw.send_bytes(piece)
            except (BrokenPipeError, ConnectionResetError):
                how = "reset"
                break
            received, how = raw.read_until_closed(timeout=0.3)
            if how != "timeout":
                break
        else:
            received, how = raw.read_until_closed(timeout=HANDSHAKE_TIMEOUT + CLOSE_BOUND)
        elapsed = time.monotonic() - started
    assert how in ("eof", "reset"), how
    assert HANDSHAKE_TIMEOUT - 0.1 <= elapsed < HANDSHAKE_TIMEOUT + 1.0, elapsed
    wait_until(lambda: healthz_clients(proc) == baseline, timeout=5, msg="session leaked")
    assert refused(scrape(proc), "handshake_timeout") == refused(before, "handshake_timeout") + 1
    bystander.check()
    bystander.close()


@pytest.mark.parametrize(
    "data",
    [frame(1, 1, b"\x00\x3c"), frame(1, 1, b""), frame(1, 1, b"\x00\x3c") + marshal(C.Basic.Qos())],
    ids=["2-bytes", "empty", "2-bytes-then-more"],
)
@pytest.mark.proxy_only
def test_short_method_frame_is_501(proxy_factory, data):
    proc = proxy_factory()
    with RawAMQP(proc.host, proc.port) as raw:
        open_placed_channel(raw)
        raw.send_bytes(data)
        close = close_of(raw)
    assert close[0] == 501, close  # RabbitMQ: "FRAME_ERROR - type 1, all octets = <<0,60>>: unknown_frame"
    assert not [r for r in proc.log_records() if r.get("event") == "client_internal_error"]


@pytest.mark.proxy_only
def test_heartbeat_on_a_channel_is_505_like_rabbitmq(proxy):
    with RawAMQP(proxy.host, proxy.port) as raw:
        open_placed_channel(raw)
        raw.send_bytes(frame(8, 1, b""))
        close = close_of(raw)
    assert close[0] == 505, close


@pytest.mark.proxy_only
def test_frames_pipelined_behind_connection_open_are_processed(proxy):
    with RawAMQP(proxy.host, proxy.port, timeout=3) as raw:
        raw.send_bytes(b"AMQP\x00\x00\x09\x01")
        raw.expect(C.Connection.Start, channel=0)
        raw.send(C.Connection.StartOk(mechanism="PLAIN", response="\0guest\0guest", locale="en_US"))
        tune = raw.expect(C.Connection.Tune, channel=0)
        raw.send_bytes(
            marshal(C.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0), 0)
            + marshal(C.Connection.Open(virtual_host="/"), 0)
            + marshal(C.Channel.Open(), 1)
        )
        raw.expect(C.Connection.OpenOk, channel=0)
        try:
            raw.expect(C.Channel.OpenOk, channel=1)  # RabbitMQ answers at once; the timeout is 3 s
        except TimeoutError:
            pytest.fail("channel.open pipelined behind Connection.Open was not answered")


@pytest.mark.proxy_only
def test_truncated_message_then_disconnect_never_reaches_the_upstream(proxy_factory):
    """A client that leaves mid-frame, mid-message: nothing of its message reaches the shared
    upstream (a partial message there would be a 505 for every client on it)."""
    proc = proxy_factory("--separate-publishers", "false")
    bystander = Bystander(proc)
    baseline = healthz_clients(proc)
    for cut in (3, 12):  # inside the body frame's header; inside its payload
        with RawAMQP(proc.host, proc.port) as raw:
            open_placed_channel(raw)
            publish = marshal(C.Basic.Publish(exchange="", routing_key=bystander.queue))
            body = marshal(pamqp.body.ContentBody(b"x" * 100))
            raw.send_bytes(publish + content_header(body_size=100) + body[:cut])
        wait_until(lambda: healthz_clients(proc) == baseline, timeout=5, msg="session leaked")
        bystander.check()  # the queue holds only the bystander's own message
    bystander.close()


@pytest.mark.proxy_only
def test_truncated_frame_then_silence_is_ended_by_heartbeats(proxy_factory):
    """A client that stops mid-frame: with heartbeats negotiated it is dropped after two missed
    intervals (counted), like any silent client; without them it may wait, as with RabbitMQ."""
    proc = proxy_factory()
    bystander = Bystander(proc)
    baseline = healthz_clients(proc)
    before = scrape(proc)
    with RawAMQP(proc.host, proc.port, timeout=10) as raw:
        raw.handshake(heartbeat=1)
        raw.send(C.Channel.Open(), 1)
        raw.expect(C.Channel.OpenOk, channel=1)
        started = time.monotonic()
        raw.send_bytes(marshal(C.Queue.Declare(queue="x"))[:9])
        received, how = raw.read_until_closed(timeout=8)
        elapsed = time.monotonic() - started
    assert how in ("eof", "reset"), how
    assert elapsed < 2 * 1 + 2.5, elapsed  # two intervals, plus the janitor's one-second tick
    wait_until(lambda: healthz_clients(proc) == baseline, timeout=5, msg="session leaked")
    reason = {"vhost": "/", "user": "guest", "reason": "heartbeat_timeout"}
    assert (
        metric(scrape(proc), "amqproxy_client_connections_closed_total", **reason)
        == metric(before, "amqproxy_client_connections_closed_total", **reason) + 1
    )
    bystander.check()
    bystander.close()
