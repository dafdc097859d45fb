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
