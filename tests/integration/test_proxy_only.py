"""Tests that only make sense through the proxy: upstream pooling and reuse,
its admin endpoint, options, logs and lifecycle.  Each test that counts
upstream connections starts its own proxy instance, so that the count is
not disturbed by other tests."""

import json
import re
import signal
import socket
import time

import pika
import pytest

from ._support import RawAMQP, wait_until

pytestmark = pytest.mark.proxy_only

UPSTREAM_NAME = re.compile(r"amqproxy\[(\d+)\] upstream (\d+)")


def test_healthz(proxy):
    assert proxy.healthz() == 200


def test_200_sequential_connections_reuse_one_upstream(proxy_factory, broker, names):
    proc = proxy_factory()
    target = proc.target()
    q = names.queue()
    setup = broker.pika_connection()
    setup.channel().queue_declare(q)
    setup.close()

    t0 = time.monotonic()
    for i in range(200):
        conn = target.pika()
        ch = conn.channel()
        ch.basic_publish("", q, f"cycle-{i}".encode())
        conn.close()
    elapsed = time.monotonic() - t0

    wait_until(
        lambda: broker.queue_message_count(q) == 200,
        timeout=5,
        msg="not all 200 messages arrived",
    )
    ups = broker.proxy_upstreams(proc)
    assert len(ups) == 1, [u["client_properties"].get("connection_name") for u in ups]
    (up,) = ups
    m = UPSTREAM_NAME.fullmatch(up["client_properties"]["connection_name"])
    assert m and int(m.group(1)) == proc.pid
    assert (up["user"], up["vhost"]) == ("guest", "/")
    # Sanity bound: reusing the upstream keeps a connect cycle cheap.
    assert elapsed < 60, elapsed
    # Messages are all there and in order.
    check = broker.pika_connection()
    try:
        ch = check.channel()
        bodies = [ch.basic_get(q, auto_ack=True)[2] for _ in range(200)]
        assert bodies == [f"cycle-{i}".encode() for i in range(200)]
    finally:
        check.close()


def test_pool_keyed_by_user_password_vhost(proxy_factory, broker, temp_user, temp_vhost):
    proc = proxy_factory()
    target = proc.target()
    user, password = temp_user
    conns = [
        target.pika(),
        target.pika(),  # same key: shares the first upstream
        target.pika(user=user, password=password),
        target.pika(virtual_host=temp_vhost),
    ]
    try:
        for c in conns:
            c.channel()
        ups = broker.proxy_upstreams(proc)
        keys = sorted((u["user"], u["vhost"]) for u in ups)
        assert keys == sorted([("guest", "/"), (user, "/"), ("guest", temp_vhost)])
        numbers = sorted(int(UPSTREAM_NAME.fullmatch(u["client_properties"]["connection_name"]).group(2)) for u in ups)
        assert len(set(numbers)) == 3
    finally:
        for c in conns:
            if c.is_open:
                c.close()


def test_failed_logins_leave_no_upstream_behind(proxy_factory, broker):
    proc = proxy_factory()
    target = proc.target()
    for pw in ("bad-1", "bad-2", "bad-3"):
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            target.pika(password=pw)
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError):
        target.pika(virtual_host="amqproxy-no-such-vhost")
    wait_until(lambda: broker.proxy_upstreams(proc) == [], timeout=6, interval=0.5, msg="upstreams left open")
    # And the proxy still serves good logins.
    conn = target.pika()
    conn.channel()
    conn.close()


def test_max_channels_per_upstream_spills_to_new_upstream(proxy_factory, broker, names):
    proc = proxy_factory("--max-channels-per-upstream", "4")
    target = proc.target()
    conns = [target.pika() for _ in range(3)]
    try:
        # 10 channels in all (4 + 4 + 2), at most 4 per upstream: 3 upstreams.
        # (An upstream channel is opened at a channel's first method, so each channel declares
        # its queue before the upstreams are counted.)
        chans = [c.channel() for c in conns[:2] for _ in range(4)] + [conns[2].channel() for _ in range(2)]
        queues = [names.queue() for _ in chans]
        for ch, q in zip(chans, queues, strict=True):
            ch.queue_declare(q)
        ups = broker.proxy_upstreams(proc)
        assert len(ups) == 3, len(ups)
        # All channels work.
        for i, (ch, q) in enumerate(zip(chans, queues, strict=True)):
            ch.basic_publish("", q, str(i).encode())
            assert ch.basic_get(q, auto_ack=True)[2] == str(i).encode()
    finally:
        for c in conns:
            c.close()


def test_idle_upstream_closed_after_idle_timeout(proxy_factory, broker):
    proc = proxy_factory("--idle-timeout", "1")
    target = proc.target()
    conn = target.pika()
    ch = conn.channel()
    # A channel lives upstream from its first method on; before that the upstream is idle and
    # may already be gone by the time rabbitmqctl answers.
    ch.queue_declare("", exclusive=True)
    assert len(broker.proxy_upstreams(proc)) == 1
    ch.close()
    conn.close()
    wait_until(lambda: broker.proxy_upstreams(proc) == [], timeout=8, interval=0.5, msg="idle upstream kept")
    # A new client gets a new upstream transparently.
    conn = target.pika()
    try:
        ch = conn.channel()
        assert ch.queue_declare("", exclusive=True).method.queue.startswith("amq.gen-")
        (up,) = broker.proxy_upstreams(proc)
        # upstream numbering goes on: this is upstream 2 of this proxy
        assert UPSTREAM_NAME.fullmatch(up["client_properties"]["connection_name"]).group(2) == "2"
    finally:
        conn.close()


def test_busy_upstream_not_closed_by_idle_timeout(proxy_factory, broker):
    proc = proxy_factory("--idle-timeout", "1")
    conn = proc.target().pika()
    try:
        ch = conn.channel()
        assert ch.queue_declare("", exclusive=True).method.queue.startswith("amq.gen-")
        (before,) = broker.proxy_upstreams(proc)
        conn.sleep(2.5)
        assert ch.is_open and conn.is_open
        (after,) = broker.proxy_upstreams(proc)
        assert after["name"] == before["name"]
        assert ch.queue_declare("", exclusive=True).method.queue.startswith("amq.gen-")
    finally:
        conn.close()


def test_client_heartbeat_option_offered_in_tune(proxy_factory):
    proc = proxy_factory("--client-heartbeat", "2")
    with RawAMQP(proc.host, proc.port) as raw:
        _, tune, reply = raw.handshake(heartbeat=2)
        assert tune.heartbeat == 2
    # pika takes the server's proposal when it does not ask for anything.
    conn = proc.target().pika(heartbeat=None)
    try:
        assert conn._impl.params.heartbeat == 2
    finally:
        conn.close()


def test_frame_max_option(proxy_factory, names):
    import os

    proc = proxy_factory("--frame-max", "4096")
    conn = proc.target().pika()
    try:
        assert conn._impl.params.frame_max == 4096
        ch = conn.channel()
        q = names.queue()
        ch.queue_declare(q)
        body = os.urandom(300_000)
        ch.basic_publish("", q, body)
        assert ch.basic_get(q, auto_ack=True)[2] == body
    finally:
        conn.close()


def test_handshake_timeout_drops_silent_client(proxy_factory):
    proc = proxy_factory("--handshake-timeout", "1")
    with RawAMQP(proc.host, proc.port) as raw:
        t0 = time.monotonic()
        data, how = raw.read_until_closed(timeout=6)
        assert how in ("eof", "reset"), (data, how)
        assert time.monotonic() - t0 < 5
    # Half-done handshake (header sent, no StartOk) too.
    with RawAMQP(proc.host, proc.port) as raw:
        raw.send_bytes(b"AMQP\x00\x00\x09\x01")
        data, how = raw.read_until_closed(timeout=6)
        assert how in ("eof", "reset"), how
    assert proc.alive


def test_abrupt_client_disconnects_do_not_harm_proxy(proxy, names):
    target = proxy.target()
    # 1. half a protocol header
    s = socket.create_connection((proxy.host, proxy.port), timeout=5)
    s.sendall(b"AMQ")
    s.close()
    # 2. handshake done, then half a frame, then gone
    with RawAMQP(proxy.host, proxy.port) as raw:
        raw.handshake()
        raw.send_bytes(b"\x01\x00\x01\x00\x00\x00\x30\x00\x14")
    # 3. mid-consume with unacked messages, dropped without close
    q = names.queue()
    conn = target.pika()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.confirm_delivery()
    for _ in range(10):
        ch.basic_publish("", q, b"x")
    ch.basic_consume(q, lambda *a: None)
    conn.process_data_events(0.2)
    conn._impl._transport._sock.shutdown(socket.SHUT_RDWR)
    # The proxy is alive and healthy, the messages were requeued.
    assert proxy.alive
    assert proxy.healthz() == 200
    check = target.pika()
    try:
        cch = check.channel()
        wait_until(
            lambda: cch.queue_declare(q, passive=True).method.message_count == 10,
            timeout=5,
            msg="unacked messages of a dropped client not requeued",
        )
        assert cch.queue_declare(q, passive=True).method.consumer_count == 0
    finally:
        check.close()


def test_log_lines_are_json(proxy_factory):
    proc = proxy_factory()
    conn = proc.target().pika()
    conn.channel()
    conn.close()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        proc.target().pika(password="nope")
    proc.stop()
    lines = [line for line in proc.log_text().splitlines() if line.strip() and not line.startswith("# ")]
    assert lines, "the proxy logged nothing at info level"
    bad = []
    for line in lines:
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                bad.append(line)
        except ValueError:
            bad.append(line)
    assert bad == []


def test_sigterm_stops_proxy_and_closes_clients(proxy_factory):
    # A short drain: a client that does not leave is closed once it ends.
    proc = proxy_factory("--drain-timeout", "1")
    conn = proc.target().pika()
    ch = conn.channel()
    t0 = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    proc.proc.wait(timeout=15)
    assert time.monotonic() - t0 < 15
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            conn.process_data_events(0.1)
    assert not conn.is_open
    assert not ch.is_open
