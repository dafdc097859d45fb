"""5. basic.get, nack/reject/ack semantics and delivery tags; 12. transactions."""

import pika
import pytest

from ._support import wait_until


@pytest.fixture
def chan(target, names):
    conn = target.pika()
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q)
    ch.confirm_delivery()  # publishes are routed before we basic.get
    yield conn, ch, q
    if conn.is_open:
        conn.close()


def test_basic_get_empty_queue(chan):
    _, ch, q = chan
    assert ch.basic_get(q) == (None, None, None)


def test_basic_get_fields(chan):
    _, ch, q = chan
    for i in range(3):
        ch.basic_publish("", q, f"m{i}".encode())
    method, props, body = ch.basic_get(q)
    assert body == b"m0"
    assert method.delivery_tag == 1
    assert method.redelivered is False
    assert method.exchange == ""
    assert method.routing_key == q
    assert method.message_count == 2  # messages left after this one
    ch.basic_ack(method.delivery_tag)


def test_nack_requeue_comes_back_redelivered(chan):
    _, ch, q = chan
    ch.basic_publish("", q, b"first")
    ch.basic_publish("", q, b"second")
    m1, _, b1 = ch.basic_get(q)
    assert (b1, m1.redelivered, m1.delivery_tag) == (b"first", False, 1)
    ch.basic_nack(m1.delivery_tag, requeue=True)
    m2, _, b2 = ch.basic_get(q)
    # Requeued to its original position, i.e. ahead of "second".
    assert (b2, m2.redelivered, m2.delivery_tag) == (b"first", True, 2)
    ch.basic_ack(m2.delivery_tag)
    m3, _, b3 = ch.basic_get(q)
    assert (b3, m3.redelivered, m3.delivery_tag) == (b"second", False, 3)
    ch.basic_ack(m3.delivery_tag)
    assert ch.basic_get(q) == (None, None, None)


def test_reject_without_requeue_drops(chan):
    _, ch, q = chan
    ch.basic_publish("", q, b"doomed")
    m, _, body = ch.basic_get(q)
    assert body == b"doomed"
    ch.basic_reject(m.delivery_tag, requeue=False)
    assert ch.basic_get(q) == (None, None, None)
    assert ch.queue_declare(q, passive=True).method.message_count == 0


def test_reject_with_requeue(chan):
    _, ch, q = chan
    ch.basic_publish("", q, b"again")
    m, _, _ = ch.basic_get(q)
    ch.basic_reject(m.delivery_tag, requeue=True)
    m2, _, body = ch.basic_get(q, auto_ack=True)
    assert (body, m2.redelivered) == (b"again", True)


def test_ack_multiple(target, chan):
    conn, ch, q = chan
    for i in range(5):
        ch.basic_publish("", q, f"{i}".encode())
    tags = []
    for i in range(5):
        m, _, body = ch.basic_get(q)
        assert body == f"{i}".encode()
        tags.append(m.delivery_tag)
    assert tags == [1, 2, 3, 4, 5]
    ch.basic_ack(3, multiple=True)  # acks 1..3
    ch.close()
    # 4 and 5 were unacked: they are requeued when the channel closes.
    ch2 = conn.channel()
    wait_until(
        lambda: ch2.queue_declare(q, passive=True).method.message_count == 2,
        timeout=5,
        msg="unacked messages not requeued after channel close",
    )
    got = [ch2.basic_get(q, auto_ack=True) for _ in range(2)]
    assert [(b, m.redelivered) for m, _, b in got] == [(b"3", True), (b"4", True)]


def test_nack_multiple_requeue(chan):
    _, ch, q = chan
    for i in range(3):
        ch.basic_publish("", q, f"{i}".encode())
    tags = [ch.basic_get(q)[0].delivery_tag for _ in range(3)]
    ch.basic_nack(tags[-1], multiple=True, requeue=True)
    got = [ch.basic_get(q, auto_ack=True) for _ in range(3)]
    assert [(b, m.redelivered) for m, _, b in got] == [
        (b"0", True),
        (b"1", True),
        (b"2", True),
    ]


def test_ack_unknown_delivery_tag_closes_channel_406(chan):
    conn, ch, q = chan
    ch.basic_ack(99)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        ch.basic_get(q)
    assert (ei.value.reply_code, ei.value.reply_text) == (
        406,
        "PRECONDITION_FAILED - unknown delivery tag 99",
    )
    # Connection survives a channel error.
    assert conn.channel().basic_get(q) == (None, None, None)


def test_double_ack_closes_channel_406(chan):
    conn, ch, q = chan
    ch.basic_publish("", q, b"x")
    m, _, _ = ch.basic_get(q)
    ch.basic_ack(m.delivery_tag)
    ch.basic_ack(m.delivery_tag)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
        ch.basic_get(q)
    assert (ei.value.reply_code, ei.value.reply_text) == (
        406,
        "PRECONDITION_FAILED - unknown delivery tag 1",
    )


def test_unacked_messages_requeued_when_client_disconnects(target, names):
    """Through the proxy the upstream channel may outlive the client: unacked
    deliveries of a vanished client must still return to the queue."""
    q = names.queue()
    conn = target.pika()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.confirm_delivery()
    for i in range(3):
        ch.basic_publish("", q, f"{i}".encode())
    for _ in range(3):
        assert ch.basic_get(q)[0] is not None
    conn.close()
    other = target.pika()
    try:
        och = other.channel()
        wait_until(
            lambda: och.queue_declare(q, passive=True).method.message_count == 3,
            timeout=5,
            msg="unacked messages not requeued after client disconnect",
        )
        m, _, body = och.basic_get(q, auto_ack=True)
        assert (body, m.redelivered) == (b"0", True)
    finally:
        other.close()


# -- 12. transactions --------------------------------------------------------


def test_tx_rollback_and_commit(target, names):
    q = names.queue()
    conn = target.pika()
    try:
        setup = conn.channel()
        setup.queue_declare(q)
        ch = conn.channel()
        ch.tx_select()
        ch.basic_publish("", q, b"rolled-back")
        ch.tx_rollback()
        assert setup.queue_declare(q, passive=True).method.message_count == 0
        ch.basic_publish("", q, b"committed-1")
        ch.basic_publish("", q, b"committed-2")
        # Not visible before commit.
        assert setup.queue_declare(q, passive=True).method.message_count == 0
        ch.tx_commit()
        assert setup.queue_declare(q, passive=True).method.message_count == 2
        bodies = [setup.basic_get(q, auto_ack=True)[2] for _ in range(2)]
        assert bodies == [b"committed-1", b"committed-2"]
    finally:
        conn.close()


def test_tx_commit_without_select_is_406(target):
    conn = target.pika()
    try:
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as ei:
            ch.tx_commit()
        assert (ei.value.reply_code, ei.value.reply_text) == (
            406,
            "PRECONDITION_FAILED - channel is not transactional",
        )
    finally:
        conn.close()


def test_tx_acks_are_transactional(target, names):
    q = names.queue()
    conn = target.pika()
    try:
        ch = conn.channel()
        ch.queue_declare(q)
        ch.confirm_delivery()
        ch.basic_publish("", q, b"m")
        tx = conn.channel()
        tx.tx_select()
        m, _, _ = tx.basic_get(q)
        tx.basic_ack(m.delivery_tag)
        tx.tx_rollback()  # the ack is discarded; the message stays unacked
        tx.close()  # ... and is requeued on close
        wait_until(
            lambda: ch.queue_declare(q, passive=True).method.message_count == 1,
            timeout=5,
            msg="rolled-back ack did not leave the message in the queue",
        )
        tx = conn.channel()
        tx.tx_select()
        m, _, body = tx.basic_get(q)
        assert (body, m.redelivered) == (b"m", True)
        tx.basic_ack(m.delivery_tag)
        tx.tx_commit()
        tx.close()
        assert ch.queue_declare(q, passive=True).method.message_count == 0
    finally:
        conn.close()
