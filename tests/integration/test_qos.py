"""6. Prefetch (basic.qos) is honoured, per consumer and channel-global."""

import time

from ._support import pika_drain

SETTLE = 0.5  # how long "no more deliveries arrive" is observed


def _publish(conn, q, n, prefix=""):
    ch = conn.channel()
    ch.queue_declare(q)
    ch.confirm_delivery()
    for i in range(n):
        ch.basic_publish("", q, f"{prefix}{i}".encode())
    ch.close()


def _settle(conn, seconds=SETTLE):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)


def test_prefetch_count_per_consumer(target, names):
    q = names.queue()
    conn = target.pika()
    try:
        _publish(conn, q, 20)
        ch = conn.channel()
        ch.basic_qos(prefetch_count=5)
        got = []
        ch.basic_consume(q, lambda c, m, p, b: got.append((m.delivery_tag, b)))
        assert pika_drain(conn, lambda: len(got) >= 5, timeout=5), len(got)
        _settle(conn)
        assert [b for _, b in got] == [f"{i}".encode() for i in range(5)]
        ch.basic_ack(got[-1][0], multiple=True)
        assert pika_drain(conn, lambda: len(got) >= 10, timeout=5), len(got)
        _settle(conn)
        assert [b for _, b in got] == [f"{i}".encode() for i in range(10)]
        # Acking a single message frees exactly one slot.
        ch.basic_ack(got[5][0])
        assert pika_drain(conn, lambda: len(got) >= 11, timeout=5), len(got)
        _settle(conn)
        assert len(got) == 11
        assert [t for t, _ in got] == list(range(1, 12))
    finally:
        conn.close()


def test_prefetch_global_shared_across_consumers(target, names):
    q1, q2 = names.queue(), names.queue()
    conn = target.pika()
    try:
        _publish(conn, q1, 10, "a")
        _publish(conn, q2, 10, "b")
        ch = conn.channel()
        ch.basic_qos(prefetch_count=5, global_qos=True)
        got = []
        cb = lambda c, m, p, b: got.append((m.delivery_tag, b))  # noqa: E731
        ch.basic_consume(q1, cb)
        ch.basic_consume(q2, cb)
        assert pika_drain(conn, lambda: len(got) >= 5, timeout=5), len(got)
        _settle(conn)
        assert len(got) == 5, got  # 5 for the whole channel, not per consumer
        ch.basic_ack(0, multiple=True)  # delivery_tag 0 + multiple: all so far
        assert pika_drain(conn, lambda: len(got) >= 10, timeout=5), len(got)
        _settle(conn)
        assert len(got) == 10
    finally:
        conn.close()


def test_prefetch_per_consumer_with_two_consumers(target, names):
    """Contrast to the global case: non-global prefetch 5 with two consumers
    on one channel allows 5 each."""
    q1, q2 = names.queue(), names.queue()
    conn = target.pika()
    try:
        _publish(conn, q1, 10, "a")
        _publish(conn, q2, 10, "b")
        ch = conn.channel()
        ch.basic_qos(prefetch_count=5)
        got = []
        cb = lambda c, m, p, b: got.append(b)  # noqa: E731
        ch.basic_consume(q1, cb)
        ch.basic_consume(q2, cb)
        assert pika_drain(conn, lambda: len(got) >= 10, timeout=5), len(got)
        _settle(conn)
        assert sorted(got) == sorted([f"a{i}".encode() for i in range(5)] + [f"b{i}".encode() for i in range(5)])
    finally:
        conn.close()
