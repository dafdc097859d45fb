"""Methods that quorum queues and streams refuse with a *connection* error, not a channel error.

On its own connection a client that does one of these gets the broker's Connection.Close. Behind
the proxy its channels share an upstream connection with other clients, so the broker closes
that shared connection: the client that did it must get the same Connection.Close (code and
text) and must not be recovered (a recovery would replay the method into the next upstream
connection, which the broker would close again, forever); every other client on it is recovered
as after any upstream loss and sees no error.
"""

from __future__ import annotations

import pika
import pika.exceptions
import pytest

from tests.integration._support import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

QUORUM = {"x-queue-type": "quorum"}
STREAM = {"x-queue-type": "stream"}
LOOP_WATCH = 3.0  # s after the error during which no further upstream connection may be lost to it


def _global_qos_consume(conn, ch, q):
    ch.basic_qos(prefetch_count=5, global_qos=True)
    ch.basic_consume(q, lambda *_: None)


def _auto_ack_consume(conn, ch, q):
    ch.basic_qos(prefetch_count=10)
    ch.basic_consume(q, lambda *_: None, auto_ack=True)


def _get(conn, ch, q):
    ch.basic_get(q)


def _reject(conn, ch, q):
    ch.basic_qos(prefetch_count=10)
    tags: list[int] = []
    ch.basic_consume(q, lambda _c, m, _p, _b: tags.append(m.delivery_tag), arguments={"x-stream-offset": "first"})
    wait_until(lambda: conn.process_data_events(0.05) or tags, 10, msg="a delivery from the stream")
    ch.basic_reject(tags[0], requeue=True)


def _bad_offset(conn, ch, q):
    ch.basic_qos(prefetch_count=10)
    ch.basic_consume(q, lambda *_: None, arguments={"x-stream-offset": "bogus"})


CASES = {
    "quorum-global-qos-consume": (
        QUORUM,
        _global_qos_consume,
        540,
        "NOT_IMPLEMENTED - queue '{q}' in vhost '/' does not support global qos",
    ),
    "stream-auto-ack-consume": (
        STREAM,
        _auto_ack_consume,
        540,
        "NOT_IMPLEMENTED - automatic acknowledgement not supported by stream queues queue '{q}' in vhost '/'",
    ),
    "stream-basic-get": (
        STREAM,
        _get,
        540,
        "NOT_IMPLEMENTED - basic.get not supported by stream queues queue '{q}' in vhost '/'",
    ),
    "stream-reject": (
        STREAM,
        _reject,
        540,
        "NOT_IMPLEMENTED - basic.nack and basic.reject not supported by stream queues queue '{q}' in vhost '/'",
    ),
    "stream-invalid-offset": (STREAM, _bad_offset, 541, "INTERNAL_ERROR"),
}


class Bystander:
    """A client consuming a quorum queue with manual acks on the proxy, beside the offender."""

    def __init__(self, target, queue: str) -> None:
        self.queue = queue
        self.conn = target.pika()
        self.got: list[bytes] = []
        ch = self.conn.channel()
        ch.queue_declare(queue, durable=True, arguments=QUORUM)
        ch.basic_qos(prefetch_count=10)
        ch.basic_consume(queue, lambda c, m, _p, b: (self.got.append(b), c.basic_ack(m.delivery_tag)))
        self.conn.process_data_events(0.2)

    def roundtrip(self, target, body: bytes) -> None:
        """A message published now (by another client) reaches the bystander's consumer."""
        publisher = target.pika()
        try:
            ch = publisher.channel()
            ch.confirm_delivery()
            ch.basic_publish("", self.queue, body, pika.BasicProperties(delivery_mode=2))
        finally:
            publisher.close()
        wait_until(lambda: self.conn.process_data_events(0.05) or body in self.got, 15, msg=f"{body!r} consumed")


@pytest.mark.parametrize("case", list(CASES))
def test_the_client_that_did_it_alone_gets_the_connection_error(target, queues, case):
    arguments, action, code, text = CASES[case]
    q, bq = queues("refused"), queues("bystander")
    setup = target.pika()
    try:
        ch = setup.channel()
        ch.queue_declare(q, durable=True, arguments=arguments)
        ch.confirm_delivery()
        ch.basic_publish("", q, b"one", pika.BasicProperties(delivery_mode=2))
    finally:
        setup.close()
    bystander = Bystander(target, bq) if target.is_proxy else None
    offender = target.pika()
    try:
        if bystander is not None:
            # The offender's channel shares the bystander's upstream connection (fill placement).
            declare = offender.channel()
            declare.queue_declare(q, passive=True)
            connections = target.proxy.admin_json("/connections")["connections"]
            ids = [set(c["upstream_ids"]) for c in connections if c["channels"]]
            assert len(ids) == 2 and ids[0] & ids[1], f"not on one upstream connection: {connections}"
            declare.close()
            lost_before = _lost(target.proxy)
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as err:
            action(offender, offender.channel(), q)
            offender.process_data_events(time_limit=10)
        assert (err.value.reply_code, err.value.reply_text) == (code, text.format(q=q))
        if bystander is not None:
            bystander.roundtrip(target, b"after the error")
            bystander.conn.process_data_events(LOOP_WATCH)
            assert _lost(target.proxy) == lost_before + 1, "the refusal was replayed into another upstream connection"
            assert bystander.conn.is_open
    finally:
        for conn in (offender, bystander.conn if bystander else None):
            try:
                if conn is not None and conn.is_open:
                    conn.close()
            except pika.exceptions.AMQPError:
                pass


def _lost(proxy) -> int:
    """Upstream connections the proxy has lost so far (its log)."""
    return sum(1 for r in proxy.log_records() if r.get("event") == "upstream_lost")
