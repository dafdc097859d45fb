"""Streams through the proxy, over AMQP 0-9-1, behave as on the cluster directly: declared with
x-queue-type stream, published with confirms, consumed (with a prefetch and manual acks, as
streams require) from an `x-stream-offset` of first, next, a numeric offset or a timestamp,
each delivery carrying its offset; what a stream refuses is refused the same way.

Each test runs against `direct` (the cluster's first node) and `proxy` (a proxy in front of all
three nodes) and asserts the same outcome for both."""

from __future__ import annotations

import datetime
import time

import pika
import pika.exceptions
import pytest

from tests.integration._support import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

STREAM = {"x-queue-type": "stream"}
QUIET = 1.5  # s without a delivery after which a stream reader is taken to have sent everything
# Chunks carry a timestamp in ms; a new chunk starts after this pause, so a timestamp taken in
# it separates the batches before and after it.
CHUNK_GAP = 1.2


def publish(ch, queue: str, bodies: list[str]) -> None:
    for body in bodies:
        ch.basic_publish("", queue, body.encode(), pika.BasicProperties(delivery_mode=2))


def read(conn, queue: str, offset, expect: int | None = None) -> list[tuple[bytes, int]]:
    """Consume `queue` from `offset` until `expect` deliveries arrived (or until QUIET passes
    without one); returns (body, x-stream-offset) per delivery, each acked."""
    ch = conn.channel()
    ch.basic_qos(prefetch_count=100)
    got: list[tuple[bytes, int]] = []

    def on_message(channel, method, props, body):
        got.append((body, (props.headers or {}).get("x-stream-offset")))
        channel.basic_ack(method.delivery_tag)

    tag = ch.basic_consume(queue, on_message, arguments={"x-stream-offset": offset})
    last, last_at = 0, time.monotonic()
    while time.monotonic() - last_at < QUIET and (expect is None or len(got) < expect):
        conn.process_data_events(time_limit=0.05)
        if len(got) != last:
            last, last_at = len(got), time.monotonic()
    ch.basic_cancel(tag)
    ch.close()
    return got


@pytest.mark.cluster_smoke
def test_stream_is_read_from_first_next_an_offset_and_a_timestamp(target, queues):
    s = queues("stream")
    conn = target.pika()
    try:
        ch = conn.channel()
        ch.queue_declare(s, durable=True, arguments=STREAM)
        ch.confirm_delivery()
        publish(ch, s, [f"a{i}" for i in range(5)])
        time.sleep(CHUNK_GAP)
        since = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(seconds=1)
        time.sleep(max(0.0, since.timestamp() - time.time()) + CHUNK_GAP / 2)
        publish(ch, s, [f"b{i}" for i in range(5)])
        bodies = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
        everything = [(body.encode(), offset) for offset, body in enumerate(bodies)]

        assert read(conn, s, "first", expect=10) == everything
        assert read(conn, s, 3, expect=7) == everything[3:]
        assert read(conn, s, since, expect=5) == everything[5:]

        # "next": only what is published after the consumer attached.
        reader = conn.channel()
        reader.basic_qos(prefetch_count=100)
        fresh: list[bytes] = []
        reader.basic_consume(
            s,
            lambda c, m, _p, b: (fresh.append(b), c.basic_ack(m.delivery_tag)),
            arguments={"x-stream-offset": "next"},
        )
        conn.process_data_events(time_limit=QUIET)
        assert fresh == []
        publish(ch, s, ["c0", "c1"])
        wait_until(lambda: conn.process_data_events(0.05) or len(fresh) >= 2, 10, msg=str(fresh))
        conn.process_data_events(time_limit=0.3)
        assert fresh == [b"c0", b"c1"]
    finally:
        conn.close()


def test_stream_consumer_needs_a_prefetch(target, queues):
    s = queues("stream-noqos")
    conn = target.pika()
    try:
        conn.channel().queue_declare(s, durable=True, arguments=STREAM)
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            ch.basic_consume(s, lambda *_: None)
        assert (err.value.reply_code, err.value.reply_text) == (
            406,
            f"PRECONDITION_FAILED - consumer prefetch count is not set for 'queue '{s}' in vhost '/''",
        )
        conn.channel().queue_declare(s, passive=True)  # only the channel was closed
    finally:
        conn.close()


def test_stream_refuses_a_declare_it_cannot_honour(target, queues):
    s = queues("stream-exclusive")
    conn = target.pika()
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            conn.channel().queue_declare(s, durable=True, exclusive=True, arguments=STREAM)
        assert (err.value.reply_code, err.value.reply_text) == (
            406,
            f"PRECONDITION_FAILED - invalid property 'exclusive-owner' for queue '{s}' in vhost '/'",
        )
    finally:
        conn.close()
