"""Quorum queues through the proxy behave as on the cluster directly: declared with
x-queue-type, published with confirms, consumed with manual acks and a prefetch, redelivery
counted in x-delivery-count, a delivery limit dead-letters, a length limit nacks publishes, a
single active consumer takes over, and what RabbitMQ refuses is refused the same way.

Each test runs against `direct` (the cluster's first node) and `proxy` (a proxy in front of all
three nodes) and asserts the same outcome for both."""

from __future__ import annotations

import time

import pika
import pika.exceptions
import pytest

from tests.integration._support import pika_drain, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

QUORUM = {"x-queue-type": "quorum"}
SETTLE = 0.5  # s during which "no more deliveries" is observed


def declare(ch, queue: str, **arguments) -> pika.frame.Method:
    return ch.queue_declare(queue, durable=True, arguments={**QUORUM, **arguments})


def settle(conn, seconds: float = SETTLE) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)


@pytest.mark.cluster_smoke
def test_publish_with_confirms_consume_with_acks_and_prefetch(target, queues):
    q = queues("qq")
    conn = target.pika()
    try:
        ch = conn.channel()
        assert declare(ch, q).method.message_count == 0
        ch.confirm_delivery()
        for i in range(30):
            ch.basic_publish("", q, f"m{i}".encode(), pika.BasicProperties(delivery_mode=2), mandatory=True)
        assert ch.queue_declare(q, passive=True).method.message_count == 30

        consumer = conn.channel()
        consumer.basic_qos(prefetch_count=5)
        got: list[tuple[int, bytes, bool]] = []
        consumer.basic_consume(q, lambda _c, m, _p, b: got.append((m.delivery_tag, b, m.redelivered)))
        assert pika_drain(conn, lambda: len(got) >= 5, timeout=10), got
        settle(conn)
        assert len(got) == 5, "prefetch 5: five deliveries until an ack"
        for acked in (5, 10, 15, 20, 25, 30):
            consumer.basic_ack(got[acked - 1][0], multiple=True)
            if acked < 30:
                assert pika_drain(conn, lambda n=acked: len(got) >= n + 5, timeout=10), got
                settle(conn, 0.2)
                assert len(got) == acked + 5
        assert [b for _, b, _ in got] == [f"m{i}".encode() for i in range(30)]
        assert [t for t, _, _ in got] == list(range(1, 31))
        assert not any(r for _, _, r in got)
        wait_until(lambda: ch.queue_declare(q, passive=True).method.message_count == 0, 10, msg="all acked")
    finally:
        conn.close()


def test_redelivery_is_counted_in_x_delivery_count(target, queues):
    q = queues("qq-redeliver")
    conn = target.pika()
    try:
        ch = conn.channel()
        declare(ch, q)
        ch.confirm_delivery()
        ch.basic_publish("", q, b"again", pika.BasicProperties(delivery_mode=2))
        ch.basic_qos(prefetch_count=1)
        seen: list[tuple[bool, object]] = []

        def on_message(channel, method, props, _body):
            seen.append((method.redelivered, (props.headers or {}).get("x-delivery-count")))
            if len(seen) < 4:
                channel.basic_nack(method.delivery_tag, requeue=True)
            else:
                channel.basic_ack(method.delivery_tag)

        ch.basic_consume(q, on_message)
        assert pika_drain(conn, lambda: len(seen) >= 4, timeout=15), seen
        settle(conn)
        assert seen == [(False, None), (True, 1), (True, 2), (True, 3)]
    finally:
        conn.close()


def test_delivery_limit_dead_letters_the_message(target, queues):
    q, dlq = queues("qq-limited"), queues("qq-dead")
    conn = target.pika()
    try:
        ch = conn.channel()
        declare(ch, dlq)
        declare(ch, q, **{"x-delivery-limit": 2, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dlq})
        ch.confirm_delivery()
        ch.basic_publish("", q, b"poison", pika.BasicProperties(delivery_mode=2))
        ch.basic_qos(prefetch_count=1)
        attempts = []

        def on_message(channel, method, _props, body):
            attempts.append(body)
            channel.basic_reject(method.delivery_tag, requeue=True)

        ch.basic_consume(q, on_message)
        wait_until(
            lambda: conn.process_data_events(0.05) or ch.queue_declare(dlq, passive=True).method.message_count == 1,
            15,
            msg="dead-lettered after the delivery limit",
        )
        settle(conn)
        assert attempts == [b"poison"] * 3  # the first delivery and two redeliveries
        assert ch.queue_declare(q, passive=True).method.message_count == 0
        method, _props, body = ch.basic_get(dlq, auto_ack=True)
        assert body == b"poison"
    finally:
        conn.close()


def test_length_limit_nacks_the_publishes_beyond_it(target, queues):
    """x-overflow reject-publish: a quorum queue refuses publishes once it is over its limit
    (RabbitMQ 3.10 lets the one publish in that makes it over: a length of 4 for a limit of 3)."""
    q = queues("qq-bounded")
    conn = target.pika()
    try:
        ch = conn.channel()
        declare(ch, q, **{"x-max-length": 3, "x-overflow": "reject-publish"})
        ch.confirm_delivery()
        outcomes = []
        for i in range(5):
            try:
                ch.basic_publish("", q, f"m{i}".encode(), pika.BasicProperties(delivery_mode=2))
                outcomes.append("ack")
            except pika.exceptions.NackError:
                outcomes.append("nack")
        assert outcomes == ["ack", "ack", "ack", "ack", "nack"]
        assert ch.queue_declare(q, passive=True).method.message_count == 4
    finally:
        conn.close()


def test_single_active_consumer_takes_over_when_the_active_one_leaves(target, queues):
    q = queues("qq-sac")
    setup = target.pika()
    first = target.pika()
    second = target.pika()
    try:
        ch = setup.channel()
        declare(ch, q, **{"x-single-active-consumer": True})
        ch.confirm_delivery()
        got: dict[str, list[bytes]] = {"first": [], "second": []}
        channels = {}
        for name, conn in (("first", first), ("second", second)):
            c = conn.channel()
            c.basic_qos(prefetch_count=10)

            def on_message(channel, method, _props, body, name=name):
                got[name].append(body)
                channel.basic_ack(method.delivery_tag)

            channels[name] = (c, c.basic_consume(q, on_message))
        for i in range(5):
            ch.basic_publish("", q, f"a{i}".encode(), pika.BasicProperties(delivery_mode=2))
        wait_until(lambda: first.process_data_events(0.05) or len(got["first"]) == 5, 10, msg=str(got))
        second.process_data_events(SETTLE)
        assert got == {"first": [f"a{i}".encode() for i in range(5)], "second": []}

        channels["first"][0].basic_cancel(channels["first"][1])
        for i in range(5):
            ch.basic_publish("", q, f"b{i}".encode(), pika.BasicProperties(delivery_mode=2))
        wait_until(lambda: second.process_data_events(0.05) or len(got["second"]) == 5, 10, msg=str(got))
        first.process_data_events(SETTLE)
        assert got["second"] == [f"b{i}".encode() for i in range(5)]
        assert len(got["first"]) == 5
    finally:
        for conn in (setup, first, second):
            if conn.is_open:
                conn.close()


@pytest.mark.parametrize(
    ("flags", "arguments", "text"),
    [
        ({"durable": False}, {}, "PRECONDITION_FAILED - invalid property 'non-durable' for queue '{q}' in vhost '/'"),
        (
            {"durable": True, "exclusive": True},
            {},
            "PRECONDITION_FAILED - invalid property 'exclusive-owner' for queue '{q}' in vhost '/'",
        ),
        (
            {"durable": True, "auto_delete": True},
            {},
            "PRECONDITION_FAILED - invalid property 'auto-delete' for queue '{q}' in vhost '/'",
        ),
        (
            {"durable": True},
            {"x-max-priority": 5},
            "PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue '{q}' in vhost '/' of queue type "
            "rabbit_quorum_queue",
        ),
    ],
    ids=["non-durable", "exclusive", "auto-delete", "priority"],
)
def test_what_a_quorum_queue_refuses_is_a_channel_error(target, queues, flags, arguments, text):
    q = queues("qq-refused")
    conn = target.pika()
    try:
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            ch.queue_declare(q, arguments={**QUORUM, **arguments}, **flags)
        assert (err.value.reply_code, err.value.reply_text) == (406, text.format(q=q))
        # Only the channel: the connection goes on.
        declare(conn.channel(), q)
    finally:
        conn.close()


@pytest.mark.cluster_smoke
def test_global_qos_consume_is_a_connection_error_for_that_client_alone(target, queues):
    """RabbitMQ refuses a consume on a quorum queue under a global basic.qos with a *connection*
    error (540). Through the proxy the client gets the same 540, and the upstream connection it
    shared is not recovered into the same refusal again: the proxy goes on serving."""
    q = queues("qq-global-qos")
    conn = target.pika()
    try:
        declare(conn.channel(), q)
        ch = conn.channel()
        ch.basic_qos(prefetch_count=5, global_qos=True)
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as err:
            ch.basic_consume(q, lambda *_: None)
            conn.process_data_events(5)
        assert (err.value.reply_code, err.value.reply_text) == (
            540,
            f"NOT_IMPLEMENTED - queue '{q}' in vhost '/' does not support global qos",
        )
    finally:
        if conn.is_open:
            conn.close()
    after = target.pika()
    try:
        ch = after.channel()
        ch.confirm_delivery()
        ch.basic_publish("", q, b"still served", pika.BasicProperties(delivery_mode=2))
        assert wait_until(lambda: ch.basic_get(q, auto_ack=True)[2], 10) == b"still served"
    finally:
        after.close()
