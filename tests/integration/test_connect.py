"""1. Connect / open a channel / close with pika, py-amqp and aio-pika."""

import aio_pika
import pika

from ._support import run_async, wait_until


def test_pika_connect_close(target, names):
    conn = target.pika()
    try:
        assert conn.is_open
        # The capabilities a client relies on must be advertised by the server side.
        assert conn.publisher_confirms_supported
        assert conn.basic_nack_supported
        assert conn.consumer_cancel_notify_supported
        assert conn.exchange_exchange_bindings_supported
        ch = conn.channel()
        assert ch.is_open
        q = names.queue()
        ok = ch.queue_declare(q)
        assert ok.method.queue == q
        assert ok.method.message_count == 0
        assert ok.method.consumer_count == 0
        ch.close()
        assert ch.is_closed
    finally:
        conn.close()
    assert conn.is_closed


def test_pika_server_named_queue(target):
    conn = target.pika()
    try:
        ch = conn.channel()
        ok = ch.queue_declare("", exclusive=True)
        assert ok.method.queue.startswith("amq.gen-")
        # The name is usable on this connection.
        ch.basic_publish("", ok.method.queue, b"hello")
        method, _, body = ch.basic_get(ok.method.queue, auto_ack=True)
        assert body == b"hello"
        assert method.routing_key == ok.method.queue
    finally:
        conn.close()


def test_pika_many_connections_sequentially_each_clean(target):
    for _ in range(5):
        conn = target.pika()
        ch = conn.channel()
        ch.close()
        conn.close()
        assert conn.is_closed


def test_py_amqp_connect_close(target, names):
    conn = target.amqp()
    try:
        assert conn.connected
        caps = conn.server_capabilities
        assert caps.get("publisher_confirms") is True
        assert caps.get("consumer_cancel_notify") is True
        assert 4096 <= conn.frame_max <= 131072
        ch = conn.channel()
        assert ch.is_open
        q = names.queue()
        declared, count, consumers = ch.queue_declare(q)
        assert (declared, count, consumers) == (q, 0, 0)
        ch.close()
        assert not ch.is_open
    finally:
        conn.close()
    assert not conn.connected


def test_aio_pika_connect_close(target, names):
    q = names.queue()

    async def main():
        conn = await aio_pika.connect(target.url(), timeout=10)
        try:
            assert not conn.is_closed
            ch = await conn.channel()
            queue = await ch.declare_queue(q)
            assert queue.name == q
            await ch.close()
            assert ch.is_closed
        finally:
            await conn.close()
        assert conn.is_closed

    run_async(main())


def test_pika_close_with_open_channels(target, names):
    """Closing a connection that still has channels (and a consumer) open."""
    q = names.queue()
    conn = target.pika()
    chans = [conn.channel() for _ in range(3)]
    chans[0].queue_declare(q)
    chans[1].basic_consume(q, lambda *a: None)
    conn.close()
    assert conn.is_closed
    # The consumer went away with the connection (through the proxy the
    # upstream connection stays, so the proxy must cancel it upstream).
    check = target.pika()
    try:
        ch = check.channel()
        wait_until(
            lambda: ch.queue_declare(q, passive=True).method.consumer_count == 0,
            timeout=5,
            msg="consumer of the closed client still registered",
        )
    finally:
        check.close()


def test_pika_connection_params_roundtrip(target):
    """channel_max negotiation: a client asking for few channels gets them."""
    conn = target.pika(channel_max=16)
    try:
        chans = [conn.channel() for _ in range(16)]
        assert all(c.is_open for c in chans)
        assert max(c.channel_number for c in chans) == 16
        try:
            conn.channel()
        except pika.exceptions.NoFreeChannels:
            pass
        else:
            raise AssertionError("expected NoFreeChannels beyond channel_max=16")
    finally:
        conn.close()
