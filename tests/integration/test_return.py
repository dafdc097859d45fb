"""10. Mandatory publishes to unroutable keys come back as basic.return 312."""

import asyncio

import aio_pika
import aio_pika.exceptions
import amqp
import pika
import pytest

from ._support import pika_drain, run_async


def test_pika_mandatory_unroutable_with_confirms(target, names):
    missing = names.queue("unroutable")
    conn = target.pika()
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        props = pika.BasicProperties(message_id="ret-1", headers={"h": 1})
        with pytest.raises(pika.exceptions.UnroutableError) as ei:
            ch.basic_publish("", missing, b"returned body", props, mandatory=True)
        (msg,) = ei.value.messages
        assert msg.method.reply_code == 312
        assert msg.method.reply_text == "NO_ROUTE"
        assert msg.method.exchange == ""
        assert msg.method.routing_key == missing
        assert msg.properties.message_id == "ret-1"
        assert msg.properties.headers == {"h": 1}
        assert msg.body == b"returned body"
        # The channel stays usable; non-mandatory unroutable is silently dropped.
        ch.basic_publish("", missing, b"dropped")
        assert ch.is_open
    finally:
        conn.close()


def test_pika_return_callback_without_confirms(target, names):
    missing = names.queue("unroutable")
    x = names.exchange()
    conn = target.pika()
    try:
        ch = conn.channel()
        ch.exchange_declare(x, "direct")
        returned = []
        ch.add_on_return_callback(lambda c, m, p, b: returned.append((m, p, b)))
        ch.basic_publish(x, "no-binding", b"via exchange", mandatory=True)
        ch.basic_publish("", missing, b"via default", mandatory=True)
        assert pika_drain(conn, lambda: len(returned) == 2, timeout=5), returned
        got = [(m.reply_code, m.reply_text, m.exchange, m.routing_key, b) for m, _, b in returned]
        assert got == [
            (312, "NO_ROUTE", x, "no-binding", b"via exchange"),
            (312, "NO_ROUTE", "", missing, b"via default"),
        ]
    finally:
        conn.close()


def test_py_amqp_basic_return(target, names):
    missing = names.queue("unroutable")
    conn = target.amqp()
    try:
        ch = conn.channel()
        returned = []
        ch.events["basic_return"].add(
            lambda exc, exchange, routing_key, message: returned.append(
                (
                    exc.reply_code,
                    exc.reply_text,
                    exchange,
                    routing_key,
                    message.body,
                    message.properties.get("correlation_id"),
                )
            )
        )
        ch.basic_publish(
            amqp.Message(b"py-amqp returned", correlation_id="c-1"),
            exchange="",
            routing_key=missing,
            mandatory=True,
        )
        while not returned:
            conn.drain_events(timeout=5)
        assert returned == [(312, "NO_ROUTE", "", missing, b"py-amqp returned", "c-1")]
    finally:
        conn.close()


def test_aio_pika_return(target, names):
    missing = names.queue("unroutable")

    async def main():
        conn = await aio_pika.connect(target.url(), timeout=10)
        async with conn:
            ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
            with pytest.raises(aio_pika.exceptions.DeliveryError) as ei:
                await ch.default_exchange.publish(
                    aio_pika.Message(b"aio returned", message_id="a-1"),
                    routing_key=missing,
                    mandatory=True,
                )
            returned = ei.value.message
            frame = ei.value.frame
            # aiormq dispatches returns only on confirming channels.
            ch2 = await conn.channel(publisher_confirms=True, on_return_raises=False)
            callbacks = []
            fut = asyncio.get_running_loop().create_future()
            ch2.return_callbacks.add(lambda _ch, m: (callbacks.append(m), fut.done() or fut.set_result(None)))
            await ch2.default_exchange.publish(aio_pika.Message(b"aio cb"), routing_key=missing, mandatory=True)
            await asyncio.wait_for(fut, 5)
            return returned, frame, callbacks

    returned, frame, callbacks = run_async(main())
    assert (frame.reply_code, frame.reply_text, frame.exchange, frame.routing_key) == (
        312,
        "NO_ROUTE",
        "",
        missing,
    )
    assert (returned.body, returned.header.properties.message_id) == (b"aio returned", "a-1")
    assert [m.body for m in callbacks] == [b"aio cb"]
    assert callbacks[0].routing_key == missing
