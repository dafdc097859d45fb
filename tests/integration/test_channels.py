"""7. Many channels on one connection; 8. channel errors are contained (the
connection and other clients keep working); connection errors of one client
do not affect other clients."""

import threading
import time

import pika
import pytest


def test_50_channels_one_connection(target, names):
    conn = target.pika()
    try:
        chans = [conn.channel() for _ in range(50)]
        assert len({c.channel_number for c in chans}) == 50
        queues = [names.queue() for _ in range(50)]
        for i, (ch, q) in enumerate(zip(chans, queues, strict=True)):
            ch.queue_declare(q)
            ch.basic_publish("", q, f"channel-{i}".encode(), pika.BasicProperties(message_id=str(i)))
        for i, (ch, q) in enumerate(zip(chans, queues, strict=True)):
            method, props, body = ch.basic_get(q, auto_ack=True)
            assert method is not None, f"channel {i}: message missing"
            assert (body, props.message_id, method.delivery_tag) == (f"channel-{i}".encode(), str(i), 1)
        for ch in chans:
            ch.close()
        assert all(c.is_closed for c in chans)
        assert conn.is_open
    finally:
        conn.close()


class Worker(threading.Thread):
    """A second client that keeps publishing/getting on its own queue."""

    def __init__(self, target, queue):
        super().__init__(daemon=True)
        self.target = target
        self.queue = queue
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.rounds = 0
        self.errors = []
        self.conn_open_at_end = None

    def run(self):
        try:
            conn = self.target.pika()
            try:
                ch = conn.channel()
                ch.queue_declare(self.queue)
                self.ready.set()
                while not self.stop.is_set() or self.rounds < 20:
                    body = f"w{self.rounds}".encode()
                    ch.basic_publish("", self.queue, body)
                    m, _, got = ch.basic_get(self.queue, auto_ack=True)
                    if got != body:
                        self.errors.append(f"round {self.rounds}: got {got!r}, want {body!r}")
                        return
                    self.rounds += 1
                    time.sleep(0.002)
                self.conn_open_at_end = conn.is_open and ch.is_open
            finally:
                if conn.is_open:
                    conn.close()
        except Exception as e:  # noqa: BLE001
            self.errors.append(repr(e))
        finally:
            self.ready.set()


def _check_channel_error(conn, fn, code, text):
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        fn(ch)
    assert (ei.value.reply_code, ei.value.reply_text) == (code, text)
    assert ch.is_closed
    assert conn.is_open


def test_channel_error_contained(target, names):
    q = names.queue()
    missing_q = names.queue("missing")
    missing_x = names.exchange("missing")
    worker = Worker(target, names.queue("worker"))
    worker.start()
    assert worker.ready.wait(10)
    conn = target.pika()
    try:
        for _ in range(3):
            _check_channel_error(
                conn,
                lambda ch: ch.queue_declare(missing_q, passive=True),
                404,
                f"NOT_FOUND - no queue '{missing_q}' in vhost '/'",
            )
            _check_channel_error(
                conn,
                lambda ch: (ch.basic_publish(missing_x, "rk", b"x"), ch.basic_get(q)),
                404,
                f"NOT_FOUND - no exchange '{missing_x}' in vhost '/'",
            )
            _check_channel_error(
                conn,
                lambda ch: ch.exchange_declare(missing_x, passive=True),
                404,
                f"NOT_FOUND - no exchange '{missing_x}' in vhost '/'",
            )
            _check_channel_error(
                conn,
                lambda ch: (ch.queue_declare(q), ch.queue_declare(q, durable=True)),
                406,
                f"PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{q}' in vhost '/': "
                "received 'true' but current is 'false'",
            )
        # A fresh channel on the same connection, even reusing the number of
        # the failed one, works normally.
        ch = conn.channel(channel_number=1)
        ch.queue_declare(q)
        ch.basic_publish("", q, b"after-error")
        m, _, body = ch.basic_get(q, auto_ack=True)
        assert body == b"after-error"
        assert m.delivery_tag == 1
    finally:
        conn.close()
        worker.stop.set()
        worker.join(20)
    assert not worker.is_alive()
    assert worker.errors == []
    assert worker.rounds >= 20
    assert worker.conn_open_at_end is True


@pytest.mark.parametrize(
    "provoke,code,text",
    [
        (
            lambda ch, x: ch.exchange_declare(x, exchange_type="no-such-type"),
            503,
            "COMMAND_INVALID - unknown exchange type 'no-such-type'",
        ),
        (lambda ch, x: ch.basic_qos(prefetch_size=1), 540, "NOT_IMPLEMENTED - prefetch_size!=0 (1)"),
    ],
    ids=["503-bad-exchange-type", "540-prefetch-size"],
)
def test_connection_error_contained(target, names, provoke, code, text):
    """A connection-level error closes that client's connection only; another
    client (sharing the proxy's upstream) is unaffected."""
    x = names.exchange()
    worker = Worker(target, names.queue("worker"))
    worker.start()
    assert worker.ready.wait(10)
    conn = target.pika()
    try:
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as ei:
            provoke(ch, x)
        assert (ei.value.reply_code, ei.value.reply_text) == (code, text)
        assert conn.is_closed
        time.sleep(0.2)  # give a wrongly propagated close time to hit the worker
        # A new connection works.
        again = target.pika()
        try:
            ok = again.channel().queue_declare(worker.queue, passive=True)
            assert ok.method.queue == worker.queue
        finally:
            again.close()
    finally:
        if conn.is_open:
            conn.close()
        worker.stop.set()
        worker.join(20)
    assert worker.errors == []
    assert worker.conn_open_at_end is True
