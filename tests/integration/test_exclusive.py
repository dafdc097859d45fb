"""11. Exclusive queues belong to the declaring client connection.

Through the proxy, client connections share upstream connections, so the
broker cannot tell them apart: the proxy has to enforce exclusivity (405
RESOURCE_LOCKED for other clients) and delete the queue when its owner
disconnects.  The same scenario runs directly against the broker, where this
is the broker's own behaviour."""

import time
import uuid

import pika
import pytest

from ._support import wait_until


def locked_text(q: str) -> str:
    return (
        f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{q}' in vhost '/'. "
        "It could be originally declared on another connection or the exclusive property "
        "value does not match that of the original declaration."
    )


# operation name -> callable(channel, queue, exchange)
LOCKED_OPS = {
    "basic_consume": lambda ch, q, x: ch.basic_consume(q, lambda *a: None),
    "basic_consume_exclusive": lambda ch, q, x: ch.basic_consume(q, lambda *a: None, exclusive=True),
    "basic_get": lambda ch, q, x: ch.basic_get(q),
    "queue_declare_passive": lambda ch, q, x: ch.queue_declare(q, passive=True),
    "queue_declare_exclusive": lambda ch, q, x: ch.queue_declare(q, exclusive=True),
    "queue_declare_plain": lambda ch, q, x: ch.queue_declare(q),
    "queue_bind": lambda ch, q, x: ch.queue_bind(q, x, "other-key"),
    "queue_unbind": lambda ch, q, x: ch.queue_unbind(q, x, "key"),  # existing binding
    "queue_delete": lambda ch, q, x: ch.queue_delete(q),
    "queue_purge": lambda ch, q, x: ch.queue_purge(q),
}


def _run_locked_ops(b_conn, q, x):
    results = {}
    for name, op in LOCKED_OPS.items():
        ch = b_conn.channel()
        try:
            op(ch, q, x)
            results[name] = "ok"
        except pika.exceptions.ChannelClosedByBroker as e:
            results[name] = (e.reply_code, e.reply_text)
        assert b_conn.is_open, f"{name}: connection closed"
    return results


def _exclusive_scenario(a_conn, b_conn, names):
    q = names.queue("excl")
    x = names.exchange()
    ach = a_conn.channel()
    ach.exchange_declare(x, "direct")
    ok = ach.queue_declare(q, exclusive=True)
    assert ok.method.queue == q
    ach.queue_bind(q, x, "key")
    ach.confirm_delivery()
    ach.basic_publish("", q, b"from-a")

    results = _run_locked_ops(b_conn, q, x)
    assert results == {name: (405, locked_text(q)) for name in LOCKED_OPS}

    # What the broker does allow other connections to do: publish to it.
    bch = b_conn.channel()
    bch.confirm_delivery()
    bch.basic_publish("", q, b"from-b")
    bch.basic_publish(x, "key", b"from-b-via-exchange")
    assert bch.is_open

    # The owner still has full access and saw no interference.
    bodies = [ach.basic_get(q, auto_ack=True)[2] for _ in range(3)]
    assert bodies == [b"from-a", b"from-b", b"from-b-via-exchange"]
    assert ach.basic_get(q) == (None, None, None)
    assert ach.queue_declare(q, passive=True).method.queue == q
    return q


def _assert_gone(conn, q, timeout=5.0):
    """The queue is gone within `timeout` of its owner's close. The broker deletes an exclusive
    queue as its owner's connection process ends, a moment after the Close-Ok, so a probe may
    still find it (405, or the declare-ok of an open queue) and is repeated until a 404."""

    def gone():
        ch = conn.channel()
        try:
            ch.queue_declare(q, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            return (e.reply_code, e.reply_text) if e.reply_code == 404 else None
        ch.close()
        return None

    assert wait_until(gone, timeout=timeout, msg=f"exclusive queue {q} survived its owner") == (
        404,
        f"NOT_FOUND - no queue '{q}' in vhost '/'",
    )


def test_exclusive_queue_locked_for_other_connections(target, names):
    a = target.pika()
    b = target.pika()
    try:
        q = _exclusive_scenario(a, b, names)
        a.close()
        _assert_gone(b, q)
        # The name is free again: B can now declare it exclusively itself.
        bch = b.channel()
        assert bch.queue_declare(q, exclusive=True).method.queue == q
    finally:
        for c in (a, b):
            if c.is_open:
                c.close()


def test_locked_text_longer_than_a_shortstr_is_cut_as_the_broker_cuts_it(target, names):
    """The 405 text for a queue of 20 "é" is 258 bytes: the broker sends its first 252 and
    "...", and so must the proxy, on that channel only (not a 541 for the whole connection)."""
    q = names.queue("é" * 20)
    a = target.pika()
    b = target.pika()
    try:
        a.channel().queue_declare(q, exclusive=True)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
            b.channel().queue_declare(q, exclusive=True)
        full = locked_text(q).encode()
        assert len(full) > 255
        assert raised.value.reply_code == 405
        assert raised.value.reply_text.encode() == full[:252] + b"..."
        assert b.is_open and b.channel().is_open
    finally:
        for c in (a, b):
            if c.is_open:
                c.close()


def test_exclusive_server_named_queue(target):
    a = target.pika()
    b = target.pika()
    try:
        q = a.channel().queue_declare("", exclusive=True).method.queue
        assert q.startswith("amq.gen-")
        ch = b.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
            ch.basic_get(q)
        assert (ei.value.reply_code, ei.value.reply_text) == (405, locked_text(q))
        a.close()
        _assert_gone(b, q)
    finally:
        for c in (a, b):
            if c.is_open:
                c.close()


def test_exclusive_queue_deleted_when_owner_drops_without_close(target, names):
    """The owner's TCP connection just vanishes (no Connection.Close)."""
    import socket

    a = target.pika()
    b = target.pika()
    try:
        q = names.queue("excl")
        a.channel().queue_declare(q, exclusive=True)
        sock = a._impl._transport._sock
        sock.shutdown(socket.SHUT_RDWR)
        _assert_gone(b, q)
    finally:
        b.close()


def test_exclusive_consumer(target, names):
    """basic.consume(exclusive=True) on a shared queue: 403 for others."""
    q = names.queue()
    a = target.pika()
    b = target.pika()
    try:
        ach = a.channel()
        ach.queue_declare(q)
        ach.basic_consume(q, lambda *x: None, exclusive=True)
        bch = b.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
            bch.basic_consume(q, lambda *x: None)
        assert (ei.value.reply_code, ei.value.reply_text) == (
            403,
            f"ACCESS_REFUSED - queue '{q}' in vhost '/' in exclusive use",
        )
        # A consumer on the same connection but another channel is refused too.
        ach2 = a.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
            ach2.basic_consume(q, lambda *x: None)
        assert ei.value.reply_code == 403
    finally:
        a.close()
        b.close()


@pytest.mark.proxy_only
def test_exclusive_isolation_on_shared_upstream(proxy_factory, broker, names):
    """A and B provably share one upstream connection, yet B is locked out
    of A's exclusive queue, and the queue dies with A (not with the upstream).
    (Publisher/consumer separation is off so that every channel shares the one connection.)"""
    proc = proxy_factory("--separate-publishers", "false")
    target = proc.target()
    a = target.pika()
    b = target.pika()
    try:
        a.channel()
        b.channel()
        ups = broker.proxy_upstreams(proc)
        assert len(ups) == 1, ups
        q = _exclusive_scenario(a, b, names)
        a.close()
        _assert_gone(b, q)
        # The shared upstream survived A's departure.
        assert [u["name"] for u in broker.proxy_upstreams(proc)] == [ups[0]["name"]]
        # A new client C through the same upstream is locked out of B's new
        # exclusive queue of the same name.
        b.channel().queue_declare(q, exclusive=True)
        c = target.pika()
        try:
            ch = c.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
                ch.queue_declare(q, passive=True)
            assert (ei.value.reply_code, ei.value.reply_text) == (405, locked_text(q))
        finally:
            c.close()
    finally:
        for conn in (a, b):
            if conn.is_open:
                conn.close()


@pytest.mark.proxy_only
def test_close_ok_follows_the_deletion_of_the_clients_exclusive_queues(proxy_factory, direct, names):
    """A client that has its Close-Ok finds its exclusive queues gone, as with the broker, even
    when the proxy's queue.delete is slow to reach the broker (a 500 ms latency between the
    proxy and the broker, far longer than a direct probe takes). Before the Close-Ok waited for
    the deletion, a probe on another connection got 405: the queue was still there."""
    from chaos import toxiproxy_endpoint
    from chaos.harness import Toxi

    with toxiproxy_endpoint() as url:
        route = Toxi(url).route(f"exclusive-{uuid.uuid4().hex[:8]}", f"{direct.host}:{direct.port}")
        try:
            proc = proxy_factory("--upstream", f"amqp://{route.listen}")
            a = proc.target().pika()
            q = names.queue("excl-slow")
            a.channel().queue_declare(q, exclusive=True)
            route.add_toxic(type="latency", stream="upstream", attributes={"latency": 500})
            started = time.monotonic()
            a.close()
            closed_in = time.monotonic() - started
            b = direct.pika()
            try:
                with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
                    b.channel().queue_declare(q, passive=True)
                assert (ei.value.reply_code, ei.value.reply_text) == (404, f"NOT_FOUND - no queue '{q}' in vhost '/'")
            finally:
                b.close()
            # The close waited for the deletion (one trip through the latency), no longer than
            # the proxy's bound for it.
            assert 0.5 <= closed_in < 3.0 + 1.0, closed_in
        finally:
            route.destroy()
