"""2-4. Message content: properties/headers byte-exact and in order,
publisher confirms, large bodies (also to clients with a small frame_max)."""

import datetime
import os
import random

import aio_pika
import pamqp.commands
import pika
import pytest

from ._support import run_async, sha256, small_frame_amqp_connection_class

N_MESSAGES = 100


def _headers(i: int) -> dict:
    return {
        "index": i,
        "negative": -i - 1,
        "big": 2**40 + i,
        "flag": i % 2 == 0,
        "text": f"héllo ✓ {i}",
        "nested": {
            "level": 2,
            "inner": {"deep": "yes", "n": i * 3},
            "list": [1, "two", True, False, {"k": "v"}, [i, i + 1]],
        },
        "array": [i, "s", False, -7],
        "empty_table": {},
        "empty_array": [],
    }


def _pika_props(i: int) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/x-amqproxy-test",
        content_encoding="binary",
        headers=_headers(i),
        delivery_mode=2 if i % 2 else 1,
        priority=i % 10,
        correlation_id=f"corr-{i}",
        reply_to=f"reply-queue-{i}",
        expiration="600000",
        message_id=f"msg-{i:04d}",
        timestamp=1_700_000_000 + i,
        type="amqproxy.test",
        user_id="guest",
        app_id="amqproxy-tests",
    )


def _body(rng: random.Random, i: int) -> bytes:
    # Lengths vary, and the first body is empty (no body frame at all).
    return rng.randbytes((i * 997) % 5000)


PROP_NAMES = (
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)


def test_pika_publish_consume_properties_in_order(target, names):
    q = names.queue()
    rng = random.Random(1234)
    sent = [(_pika_props(i), _body(rng, i)) for i in range(N_MESSAGES)]
    conn = target.pika()
    try:
        pub = conn.channel()
        pub.queue_declare(q)
        for props, body in sent:
            pub.basic_publish("", q, body, props)

        ch = conn.channel()
        received = []
        for method, props, body in ch.consume(q, inactivity_timeout=5):
            assert method is not None, f"only {len(received)} of {N_MESSAGES} messages arrived"
            received.append((method, props, body))
            if len(received) == N_MESSAGES:
                break
        ch.cancel()
        for i, ((method, props, body), (sprops, sbody)) in enumerate(zip(received, sent, strict=True)):
            assert method.delivery_tag == i + 1
            assert method.redelivered is False
            assert method.exchange == ""
            assert method.routing_key == q
            assert len(body) == len(sbody) and body == sbody, f"body {i} differs"
            for name in PROP_NAMES:
                assert getattr(props, name) == getattr(sprops, name), (i, name)
        ch.basic_ack(delivery_tag=N_MESSAGES, multiple=True)
        assert ch.queue_declare(q, passive=True).method.message_count == 0
    finally:
        conn.close()


def test_aio_pika_publish_consume_properties_in_order(target, names):
    q = names.queue()
    rng = random.Random(99)
    ts = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    sent = []
    for i in range(N_MESSAGES):
        sent.append(
            aio_pika.Message(
                body=_body(rng, i),
                content_type="text/plain",
                content_encoding="utf-8",
                headers=_headers(i),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT if i % 2 else aio_pika.DeliveryMode.NOT_PERSISTENT,
                priority=i % 10,
                correlation_id=f"corr-{i}",
                reply_to="rq",
                expiration=600,
                message_id=f"m{i}",
                timestamp=ts + datetime.timedelta(seconds=i),
                type="t",
                user_id="guest",
                app_id="aio",
            )
        )

    async def main():
        conn = await aio_pika.connect(target.url(), timeout=10)
        async with conn:
            ch = await conn.channel()
            queue = await ch.declare_queue(q)
            for m in sent:
                await ch.default_exchange.publish(m, routing_key=q)
            got = []
            async with queue.iterator() as it:
                async for msg in it:
                    got.append(msg)
                    if len(got) == N_MESSAGES:
                        break
            await got[-1].ack(multiple=True)
            return [
                (
                    m.body,
                    m.delivery_tag,
                    m.redelivered,
                    m.content_type,
                    m.content_encoding,
                    m.headers,
                    m.delivery_mode,
                    m.priority,
                    m.correlation_id,
                    m.reply_to,
                    m.expiration,
                    m.message_id,
                    m.timestamp,
                    m.type,
                    m.user_id,
                    m.app_id,
                )
                for m in got
            ]

    got = run_async(main(), timeout=30)
    assert len(got) == N_MESSAGES
    for i, (g, m) in enumerate(zip(got, sent, strict=True)):
        (body, tag, redelivered, *props) = g
        assert body == m.body, i
        assert tag == i + 1
        assert redelivered is False
        assert props == [
            m.content_type,
            m.content_encoding,
            m.headers,
            m.delivery_mode,
            m.priority,
            m.correlation_id,
            m.reply_to,
            m.expiration,
            m.message_id,
            m.timestamp,
            m.type,
            m.user_id,
            m.app_id,
        ], i


def test_user_id_mismatch_is_rejected(target, names):
    """The broker validates user_id against the connection's user: 406."""
    q = names.queue()
    conn = target.pika()
    try:
        ch = conn.channel()
        ch.queue_declare(q)
        ch.basic_publish("", q, b"x", pika.BasicProperties(user_id="someone-else"))
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
            ch.basic_get(q)
        assert ei.value.reply_code == 406
        assert ei.value.reply_text == (
            "PRECONDITION_FAILED - user_id property set to 'someone-else' but authenticated user was 'guest'"
        )
    finally:
        conn.close()


# -- 3. publisher confirms ----------------------------------------------------


def test_pika_publisher_confirms_1000(target, names):
    q = names.queue()
    conn = target.pika()
    try:
        ch = conn.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        for i in range(1000):
            # BlockingChannel raises NackError/UnroutableError unless acked.
            ch.basic_publish("", q, str(i).encode(), mandatory=True)
        assert ch.queue_declare(q, passive=True).method.message_count == 1000
        first = ch.basic_get(q, auto_ack=True)
        assert first[2] == b"0"
    finally:
        conn.close()


def test_aio_pika_publisher_confirms_1000(target, names):
    q = names.queue()

    async def main():
        conn = await aio_pika.connect(target.url(), timeout=10)
        async with conn:
            ch = await conn.channel(publisher_confirms=True)
            await ch.declare_queue(q)
            results = await __import__("asyncio").gather(
                *(ch.default_exchange.publish(aio_pika.Message(str(i).encode()), routing_key=q) for i in range(1000))
            )
            queue = await ch.declare_queue(q, passive=True)
            return results, queue.declaration_result.message_count

    results, count = run_async(main(), timeout=40)
    assert len(results) == 1000
    assert all(isinstance(r, pamqp.commands.Basic.Ack) for r in results), {type(r).__name__ for r in results}
    assert count == 1000


# -- 4. large bodies / frame splitting -------------------------------------------

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def big_bodies():
    return {size: os.urandom(size) for size in (MiB, 5 * MiB)}


def _pika_get(ch, q):
    method, props, body = ch.basic_get(q, auto_ack=True)
    assert method is not None, "queue unexpectedly empty"
    return props, body


@pytest.mark.parametrize("frame_max", [131072, 4096], ids=["frame_max-default", "frame_max-4096"])
def test_pika_large_bodies(target, names, big_bodies, frame_max):
    q = names.queue()
    small = target.pika(frame_max=frame_max)
    normal = target.pika()
    try:
        assert small._impl.params.frame_max == frame_max
        sch = small.channel()
        nch = normal.channel()
        sch.queue_declare(q)
        # Confirms make each publish routed before the other connection gets.
        sch.confirm_delivery()
        nch.confirm_delivery()
        for size, body in big_bodies.items():
            # normal -> small: the server side must split into <= frame_max frames.
            nch.basic_publish("", q, body, pika.BasicProperties(message_id=str(size)))
            props, got = _pika_get(sch, q)
            assert props.message_id == str(size)
            assert len(got) == size and sha256(got) == sha256(body)
            # small -> normal.
            sch.basic_publish("", q, body, pika.BasicProperties(message_id=f"s{size}"))
            props, got = _pika_get(nch, q)
            assert props.message_id == f"s{size}"
            assert len(got) == size and sha256(got) == sha256(body)
    finally:
        small.close()
        normal.close()


def test_py_amqp_large_bodies_small_frame_max(target, names, big_bodies):
    import amqp

    q = names.queue()
    conn = target.amqp(connection_class=small_frame_amqp_connection_class(4096))
    other = target.pika()
    try:
        assert conn.frame_max == 4096
        ch = conn.channel()
        ch.queue_declare(q)
        och = other.channel()
        och.confirm_delivery()
        for size, body in big_bodies.items():
            och.basic_publish("", q, body)
            msg = ch.basic_get(q, no_ack=True)
            assert msg is not None
            assert len(msg.body) == size and sha256(msg.body) == sha256(body)
            # basic_publish_confirm waits for the broker's ack (plain
            # basic_publish does not, even after confirm_select).
            ch.basic_publish_confirm(amqp.Message(body, message_id="amqp"), exchange="", routing_key=q)
            props, got = _pika_get(och, q)
            assert props.message_id == "amqp"
            assert len(got) == size and sha256(got) == sha256(body)
    finally:
        conn.close()
        other.close()


@pytest.mark.parametrize("frame_max", [4096, 131072])
def test_pika_bodies_at_frame_boundaries(target, names, frame_max):
    """Body sizes around multiples of the frame payload (frame_max - 8)."""
    payload = frame_max - 8
    sizes = sorted({0, 1, payload - 1, payload, payload + 1, 2 * payload, 2 * payload + 1, 3 * payload - 1})
    q = names.queue()
    conn = target.pika(frame_max=frame_max)
    try:
        ch = conn.channel()
        ch.queue_declare(q)
        bodies = [os.urandom(s) for s in sizes]
        for b in bodies:
            ch.basic_publish("", q, b)
        for b in bodies:
            _, got = _pika_get(ch, q)
            assert got == b, len(b)
    finally:
        conn.close()
