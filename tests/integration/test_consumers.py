"""Consumers: 13. broker-initiated basic.cancel (consumer_cancel_notify),
client-initiated cancel, consumer tags, redelivery to other consumers."""

import time

import pika

from ._support import pika_drain


def test_pika_consumer_cancel_notify_on_queue_delete(target, names):
    q = names.queue()
    conn = target.pika()
    other = target.pika()
    try:
        ch = conn.channel()
        ch.queue_declare(q)
        cancels = []
        ch.add_on_cancel_callback(lambda frame: cancels.append(frame))
        deliveries = []
        tag = ch.basic_consume(q, lambda c, m, p, b: deliveries.append(b))
        assert tag.startswith("ctag")
        och = other.channel()
        och.confirm_delivery()
        och.basic_publish("", q, b"before-delete")
        assert pika_drain(conn, lambda: deliveries, timeout=5)

        och.queue_delete(q)
        assert pika_drain(conn, lambda: cancels, timeout=5), "no basic.cancel received"
        (frame,) = cancels
        assert isinstance(frame.method, pika.spec.Basic.Cancel)
        assert frame.method.consumer_tag == tag
        assert frame.channel_number == ch.channel_number
        assert ch.is_open
        assert tag not in ch.consumer_tags
        assert deliveries == [b"before-delete"]
        # The channel is still fully usable.
        ch.queue_declare(q)
        tag2 = ch.basic_consume(q, lambda c, m, p, b: deliveries.append(b), auto_ack=True)
        och.basic_publish("", q, b"after-redeclare")
        assert pika_drain(conn, lambda: len(deliveries) == 2, timeout=5)
        assert deliveries[-1] == b"after-redeclare"
        assert tag2 != tag
    finally:
        conn.close()
        other.close()


def test_py_amqp_consumer_cancel_notify_server_generated_tag(target, names):
    q = names.queue()
    conn = target.amqp()
    other = target.pika()
    try:
        ch = conn.channel()
        ch.queue_declare(q)
        cancelled = []
        tag = ch.basic_consume(q, callback=lambda m: None, on_cancel=cancelled.append)
        assert tag.startswith("amq.ctag-")
        other.channel().queue_delete(q)
        deadline = time.monotonic() + 5
        while not cancelled and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
        assert cancelled == [tag]
        assert ch.is_open
    finally:
        conn.close()
        other.close()


def test_client_cancel_stops_deliveries(target, names):
    q = names.queue()
    conn = target.pika()
    try:
        ch = conn.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        got = []
        tag = ch.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True, consumer_tag="my-own-tag")
        assert tag == "my-own-tag"
        ch.basic_publish("", q, b"1")
        assert pika_drain(conn, lambda: got, timeout=5)
        assert ch.basic_cancel(tag) == []
        ch.basic_publish("", q, b"2")
        conn.process_data_events(time_limit=0.3)
        assert got == [b"1"]
        ok = ch.queue_declare(q, passive=True).method
        assert (ok.message_count, ok.consumer_count) == (1, 0)
    finally:
        conn.close()


def test_duplicate_consumer_tag_on_one_channel_is_530(target, names):
    """Reusing a consumer tag on the same channel is a connection error."""
    import amqp

    q = names.queue()
    conn = target.amqp()
    try:
        ch = conn.channel()
        ch.queue_declare(q)
        ch.basic_consume(q, consumer_tag="dup", callback=lambda m: None)
        try:
            ch.basic_consume(q, consumer_tag="dup", callback=lambda m: None)
        except amqp.exceptions.NotAllowed as e:
            assert (e.reply_code, e.reply_text) == (530, "NOT_ALLOWED - attempt to reuse consumer tag 'dup'")
        else:
            raise AssertionError("duplicate consumer tag accepted")
    finally:
        conn.collect()


def test_same_consumer_tag_on_different_channels_and_connections(target, names):
    q = names.queue()
    a = target.pika()
    b = target.pika()
    try:
        got = []
        cb = lambda c, m, p, body: got.append((c.channel_number, m.consumer_tag, body))  # noqa: E731
        a1, a2, b1 = a.channel(), a.channel(), b.channel()
        a1.queue_declare(q)
        for ch in (a1, a2, b1):
            assert ch.basic_consume(q, cb, consumer_tag="dup", auto_ack=True) == "dup"
        assert a1.queue_declare(q, passive=True).method.consumer_count == 3
        a1.confirm_delivery()
        for i in range(6):
            a1.basic_publish("", q, str(i).encode())

        def drained():
            a.process_data_events(0.02)
            b.process_data_events(0.02)
            return len(got) == 6

        deadline = time.monotonic() + 5
        while not drained() and time.monotonic() < deadline:
            pass
        assert sorted(body for _, _, body in got) == [str(i).encode() for i in range(6)]
        assert {tag for _, tag, _ in got} == {"dup"}
    finally:
        a.close()
        b.close()


def test_unacked_delivery_goes_to_other_consumer_on_cancel(target, names):
    q = names.queue()
    a = target.pika()
    b = target.pika()
    try:
        ach = a.channel()
        ach.queue_declare(q)
        ach.basic_qos(prefetch_count=1)
        got_a = []
        ach.basic_consume(q, lambda c, m, p, body: got_a.append((m, body)))
        bch = b.channel()
        bch.confirm_delivery()
        bch.basic_publish("", q, b"hot-potato")
        assert pika_drain(a, lambda: got_a, timeout=5)
        got_b = []
        bch.basic_consume(q, lambda c, m, p, body: got_b.append((m, body)), auto_ack=True)
        a.close()  # unacked -> requeued -> delivered to B
        assert pika_drain(b, lambda: got_b, timeout=5)
        m, body = got_b[0]
        assert (body, m.redelivered) == (b"hot-potato", True)
    finally:
        for c in (a, b):
            if c.is_open:
                c.close()
