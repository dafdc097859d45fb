"""Isolation between clients that share the proxy: what one suffers, the others never notice."""

from __future__ import annotations

import os
import time

import pamqp.body
import pamqp.commands as C
import pamqp.frame
import pamqp.header
import pika
import pika.exceptions
import pytest

from ._support import RawAMQP, wait_until

pytestmark = [pytest.mark.integration]


def _roundtrip(conn, queue: str, count: int = 20) -> None:
    ch = conn.channel()
    ch.queue_declare(queue, auto_delete=True)
    ch.confirm_delivery()
    for i in range(count):
        ch.basic_publish("", queue, str(i).encode())
    got = [ch.basic_get(queue, auto_ack=True)[2] for _ in range(count)]
    assert got == [str(i).encode() for i in range(count)]
    ch.close()


@pytest.mark.proxy_only
def test_lost_upstream_closes_only_its_clients_with_320(proxy_factory, broker, temp_vhost, names):
    """rabbitmqctl close_connection on one pooled upstream (--upstream-failure close): its client
    gets 320 naming the cause, a client on another upstream (other vhost) carries on, and a new
    client gets a new upstream."""
    proc = proxy_factory("--upstream-failure", "close")
    target = proc.target()
    victim = target.pika()
    bystander = target.pika(virtual_host=temp_vhost)
    victim_ch = victim.channel()
    bystander_ch = bystander.channel()
    # Upstream channels open at a channel's first method: give both channels one.
    victim_ch.queue_declare(names.queue())
    bystander_ch.queue_declare(names.queue(vhost=temp_vhost))
    assert {u["vhost"] for u in broker.proxy_upstreams(proc)} == {"/", temp_vhost}
    # close_connection wants the pid as the plain-text listing prints it: <rabbit@host.N.N.N>
    rows = [
        line.split("\t")
        for line in broker.ctl("-q", "list_connections", "pid", "vhost", "client_properties").splitlines()
    ]
    (pid,) = [row[0] for row in rows[1:] if row[1] == "/" and f'"{proc.connection_name_prefix}' in row[2]]

    broker.ctl("close_connection", pid, "maintenance drill")
    started = time.monotonic()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as err:
        while time.monotonic() - started < 10:
            victim.process_data_events(time_limit=0.2)
    assert err.value.reply_code == 320
    assert "upstream connection lost" in err.value.reply_text
    assert "maintenance drill" in err.value.reply_text
    assert time.monotonic() - started < 5
    assert not victim_ch.is_open

    _roundtrip(bystander, names.queue(vhost=temp_vhost))
    assert bystander_ch.is_open
    bystander.close()

    fresh = target.pika()
    _roundtrip(fresh, names.queue())
    fresh.close()


@pytest.mark.proxy_only
def test_slow_consumer_does_not_stall_clients_on_the_same_upstream(proxy_factory, broker, names):
    """A consumer that stops reading its socket while the broker pushes it megabytes: another
    client on the same upstream connection keeps publishing and getting at full speed."""
    # One upstream for everyone (the fast client publishes: with separate publishers its
    # channel would move to a publishing connection, away from the slow consumer).
    proc = proxy_factory("--client-buffer", str(256 * 1024 * 1024), "--separate-publishers", "false")
    target = proc.target()
    queue = names.queue("slow")
    body = os.urandom(256 * 1024)

    loader = target.pika()
    ch = loader.channel()
    ch.queue_declare(queue)
    for _ in range(120):  # 30 MiB waiting for the slow consumer
        ch.basic_publish("", queue, body)
    loader.close()

    slow = target.pika(heartbeat=0)
    slow_ch = slow.channel()
    slow_ch.basic_consume(queue, lambda *a: None, auto_ack=True)
    # From here on the slow client never reads: its socket buffers fill, the proxy buffers the rest.

    fast = target.pika()
    assert len(broker.proxy_upstreams(proc)) == 1  # all three clients share one upstream
    started = time.monotonic()
    _roundtrip(fast, names.queue("fast"), count=200)
    elapsed = time.monotonic() - started
    fast.close()
    assert elapsed < 5, f"a fast client took {elapsed:.1f}s next to a slow consumer"
    slow.close()


@pytest.mark.proxy_only
def test_slow_consumer_past_client_buffer_is_disconnected(proxy_factory, names):
    """The proxy never buffers without bound for a client that does not read."""
    proc = proxy_factory("--client-buffer", str(4 * 1024 * 1024))
    target = proc.target()
    queue = names.queue("overflow")
    loader = target.pika()
    ch = loader.channel()
    ch.queue_declare(queue)
    body = os.urandom(256 * 1024)
    for _ in range(80):  # 20 MiB > socket buffers + 4 MiB
        ch.basic_publish("", queue, body)

    slow = target.pika(heartbeat=0)
    slow.channel().basic_consume(queue, lambda *a: None, auto_ack=True)
    wait_until(
        lambda: any(r.get("event") == "client_abort" for r in proc.log_records()),
        timeout=10,
        interval=0.2,
        msg="slow client not disconnected",
    )
    record = next(r for r in proc.log_records() if r.get("event") == "client_abort")
    assert "slow client" in record["reason"]
    _roundtrip(loader, names.queue("after"))  # others unaffected
    loader.close()


def _publish_frames(queue: str, body: bytes, channel: int = 1) -> list[bytes]:
    return [
        pamqp.frame.marshal(C.Basic.Publish(exchange="", routing_key=queue), channel),
        pamqp.frame.marshal(pamqp.header.ContentHeader(0, len(body), C.Basic.Properties()), channel),
        pamqp.frame.marshal(pamqp.body.ContentBody(body), channel),
    ]


@pytest.mark.targets("direct", "proxy")
def test_publish_then_close_in_one_write_is_delivered(target, broker, names):
    """The PHP-style client: publish and Connection.Close in the same write. Nothing is lost."""
    queue = names.queue()
    setup = broker.pika_connection()
    setup.channel().queue_declare(queue)
    setup.close()
    for i in range(20):
        with RawAMQP(target.host, target.port) as raw:
            raw.handshake()
            raw.send(C.Channel.Open(), 1)
            raw.expect(C.Channel.OpenOk, channel=1)
            close = pamqp.frame.marshal(
                C.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0), 0
            )
            raw.send_bytes(b"".join(_publish_frames(queue, b"msg-%d" % i)) + close)
            raw.expect(C.Connection.CloseOk, channel=0)
    wait_until(lambda: broker.queue_message_count(queue) == 20, timeout=5, msg="messages lost")


@pytest.mark.proxy_only
def test_client_leaving_mid_message_does_not_break_the_shared_upstream(proxy_factory, broker, names):
    """A client that vanishes between a message's frames: the partial message is not published
    (as with the broker) and the upstream connection it shared stays up for everyone else."""
    proc = proxy_factory()
    target = proc.target()
    queue = names.queue()
    bystander = target.pika()
    bystander_ch = bystander.channel()
    bystander_ch.queue_declare(queue)

    def publish(frames: list[bytes]) -> None:
        with RawAMQP(target.host, target.port) as raw:
            raw.handshake()
            raw.send(C.Channel.Open(), 1)
            raw.expect(C.Channel.OpenOk, channel=1)
            raw.send_bytes(b"".join(frames))

    other = names.queue("other")
    bystander_ch.queue_declare(other)
    publish(_publish_frames(other, b"complete"))  # a publishing upstream now exists too
    wait_until(lambda: broker.queue_message_count(other) == 1, timeout=5, msg="first message lost")
    before = sorted(u["name"] for u in broker.proxy_upstreams(proc))
    for _ in range(5):
        publish_frame, header, body = _publish_frames(queue, b"x" * 5000)
        publish([publish_frame, header, body[:100]])  # then the socket closes mid-message
    time.sleep(0.3)  # intrinsic: give the proxy time to act on the departures
    assert sorted(u["name"] for u in broker.proxy_upstreams(proc)) == before
    assert bystander_ch.is_open
    _roundtrip(bystander, names.queue("after"))
    assert broker.queue_message_count(queue) == 0
    assert not any(r.get("event") == "upstream_lost" for r in proc.log_records())
    bystander.close()
