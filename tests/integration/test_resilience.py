"""Upstream resilience through the real proxy: outages, failover, breakers, pool sizing and roles.

Broker faults hit a RabbitMQ node of this module's own (`own_broker`), never the shared one;
the shared broker serves only as a healthy second node.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pamqp.body
import pamqp.commands as C
import pamqp.frame
import pamqp.header
import pika
import pika.exceptions
import pytest

from ._support import RawAMQP, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.proxy_only]

SHARED = "amqp://127.0.0.1:5672"


def admin(proc, path: str):
    try:
        with urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def connect(proc, **kw):
    params = dict(
        host=proc.host,
        port=proc.port,
        credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=1,
        socket_timeout=30,
        stack_timeout=60,
        blocked_connection_timeout=30,
    )
    params.update(kw)
    return pika.BlockingConnection(pika.ConnectionParameters(**params))


def roundtrip(conn, payload: bytes = b"ping") -> None:
    ch = conn.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", queue, payload)
    assert ch.basic_get(queue, auto_ack=True)[2] == payload
    ch.close()


def expect_upstream_failure(proc, bound: float) -> pika.exceptions.AMQPError:
    started = time.monotonic()
    with pytest.raises(pika.exceptions.AMQPConnectionError) as err:
        connect(proc)
    elapsed = time.monotonic() - started
    assert elapsed < bound, f"refusal took {elapsed:.1f}s"
    return err.value


def test_clients_connecting_during_a_blip_succeed_once_it_ends(proxy_factory, own_broker):
    proc = proxy_factory("--upstream", own_broker.upstream_url, "--connect-timeout", "30", "--backoff-max", "0.5")
    own_broker.stop_app()
    result: dict[str, object] = {}

    def client() -> None:
        try:
            conn = connect(proc)
            roundtrip(conn, b"after the blip")
            conn.close()
            result["ok"] = True
        except Exception as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(2)  # intrinsic: the outage must outlast the client's connect
    assert thread.is_alive(), f"the client did not wait for the upstream: {result}"
    own_broker.start_app()
    thread.join(40)
    assert result == {"ok": True}


def test_outage_longer_than_connect_timeout_is_a_clear_320(proxy_factory, own_broker):
    proc = proxy_factory("--upstream", own_broker.upstream_url, "--connect-timeout", "3", "--breaker-failures", "1000")
    own_broker.stop_app()
    error = expect_upstream_failure(proc, bound=3 + 3)
    assert "320" in str(error) and "upstream unavailable" in str(error), error
    records = [r for r in proc.log_records() if r.get("event") == "upstream_connect_failed"]
    assert records and all(r["category"] == "transient" for r in records)
    own_broker.start_app()
    wait_until(lambda: _connects(proc), timeout=20, interval=0.5, msg="no recovery after the outage")


def _connects(proc) -> bool:
    try:
        conn = connect(proc)
    except pika.exceptions.AMQPError:
        return False
    roundtrip(conn)
    conn.close()
    return True


def test_permanent_failures_fail_fast_and_are_not_retried(proxy_factory, own_broker):
    proc = proxy_factory("--upstream", own_broker.upstream_url, "--connect-timeout", "10")
    started = time.monotonic()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        connect(proc, credentials=pika.PlainCredentials("guest", "wrong"))
    assert time.monotonic() - started < 2
    records = [r for r in proc.log_records() if r.get("event") == "upstream_connect_failed"]
    assert len(records) == 1 and records[0]["category"] == "permanent"
    assert admin(proc, "/upstreams")[1]["nodes"][0]["breaker"] == "closed"  # the node answered


def test_failover_to_the_second_node(proxy_factory, own_broker):
    proc = proxy_factory("--upstream", own_broker.upstream_url, "--upstream", SHARED, "--connect-timeout", "5")
    own_broker.stop_app()
    for _ in range(5):
        conn = connect(proc)
        roundtrip(conn)
        conn.close()
    status, upstreams = admin(proc, "/upstreams")
    assert {c["node"] for c in upstreams["connections"]} == {"127.0.0.1:5672"}
    own = next(n for n in upstreams["nodes"] if n["node"] != "127.0.0.1:5672")
    assert own["last_error"]


def test_breaker_trips_fails_fast_and_recovers(proxy_factory, own_broker):
    proc = proxy_factory(
        "--upstream",
        own_broker.upstream_url,
        "--breaker-failures",
        "3",
        "--breaker-open-time",
        "2",
        "--connect-timeout",
        "1",
        "--backoff-initial",
        "0.05",
        "--backoff-max",
        "0.1",
    )
    own_broker.stop_app()
    expect_upstream_failure(proc, bound=4)  # enough failed attempts to trip the breaker
    status, upstreams = admin(proc, "/upstreams")
    assert upstreams["nodes"][0]["breaker"] == "open"
    assert admin(proc, "/readyz")[0] == 503
    error = expect_upstream_failure(proc, bound=0.9)  # open: refused at once, no dialling
    assert "circuit breaker" in str(error)

    own_broker.start_app()
    wait_until(lambda: _connects(proc), timeout=20, interval=0.5, msg="breaker never let a probe through")
    assert admin(proc, "/upstreams")[1]["nodes"][0]["breaker"] == "closed"
    assert admin(proc, "/readyz")[0] == 200
    metrics = urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/metrics").read().decode()
    for old, new in (("closed", "open"), ("open", "half-open"), ("half-open", "closed")):
        assert (
            f'amqproxy_breaker_transitions_total{{from="{old}",node="{own_broker.host}:{own_broker.port}",to="{new}"}}'
            in metrics
        )
    states = [r for r in proc.log_records() if r.get("event") == "breaker_state"]
    assert [(r["from"], r["to"]) for r in states][:1] == [("closed", "open")]


def test_hung_upstream_is_evicted_by_the_health_check(proxy_factory, own_broker):
    """A pooled connection silent for longer than --upstream-check-interval must answer a round
    trip before it takes a channel; a hung node (SIGSTOP) fails it and its clients get 320
    (--upstream-failure close)."""
    proc = proxy_factory(
        "--upstream",
        own_broker.upstream_url,
        "--upstream-check-interval",
        "0.5",
        "--upstream-heartbeat",
        "60",
        "--connect-timeout",
        "2",
        "--upstream-failure",
        "close",
    )
    victim = connect(proc)
    victim_ch = victim.channel()
    victim_ch.queue_declare("", exclusive=True)
    newcomer = connect(proc)
    own_broker.pause()
    try:
        time.sleep(0.7)  # intrinsic: let the pooled connection go quiet past the check interval
        started = time.monotonic()
        with pytest.raises(pika.exceptions.AMQPError):
            newcomer.channel().queue_declare("", exclusive=True)
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as err:
            victim.process_data_events(time_limit=10)
        assert err.value.reply_code == 320 and "health check failed" in err.value.reply_text
        assert time.monotonic() - started < 10
    finally:
        own_broker.resume()
    wait_until(lambda: _connects(proc), timeout=20, interval=0.5, msg="no recovery after SIGCONT")


def test_max_age_rotates_connections(proxy_factory, broker):
    proc = proxy_factory("--upstream-max-age", "1.5")
    first = connect(proc)
    first.channel().queue_declare("", exclusive=True)  # holds a channel on the first connection
    (old,) = broker.proxy_upstreams(proc)
    time.sleep(1.7)  # intrinsic: age the connection past --upstream-max-age
    second = connect(proc)
    roundtrip(second)  # the old connection takes no new channels
    names = {u["name"] for u in broker.proxy_upstreams(proc)}
    assert old["name"] in names and len(names) == 2
    first.close()
    second.close()
    wait_until(
        lambda: old["name"] not in {u["name"] for u in broker.proxy_upstreams(proc)},
        timeout=8,
        interval=0.5,
        msg="aged connection never closed",
    )
    metrics = urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/metrics").read().decode()
    assert 'reason="max_age"' in metrics


def test_min_idle_connections_stay_warm_and_are_replaced(proxy_factory, broker):
    proc = proxy_factory("--min-idle-upstreams", "1", "--idle-timeout", "1")
    conn = connect(proc)
    roundtrip(conn)
    conn.close()
    time.sleep(2.5)  # intrinsic: past the idle timeout
    (kept,) = broker.proxy_upstreams(proc)
    pids = [line.split("\t") for line in broker.ctl("-q", "list_connections", "pid", "client_properties").splitlines()]
    (pid,) = [row[0] for row in pids[1:] if kept["client_properties"]["connection_name"] in row[1]]
    broker.ctl("close_connection", pid, "drill")
    replacement = wait_until(
        lambda: [u for u in broker.proxy_upstreams(proc) if u["name"] != kept["name"]],
        timeout=10,
        interval=0.5,
        msg="no replacement dialled",
    )
    assert len(replacement) == 1


def test_connections_are_reused_under_load(proxy_factory):
    proc = proxy_factory()
    errors: list[Exception] = []

    def worker() -> None:
        try:
            for _ in range(5):
                conn = connect(proc)
                ch = conn.channel()
                ch.basic_publish("", "amq.rabbitmq.trace-nonexistent", b"x")
                conn.close()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    metrics = urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/metrics").read().decode()
    opened = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("amqproxy_upstream_connections_opened_total{")
    )
    assert 1 <= opened <= 3, f"150 client connections used {opened} upstream connections"


@pytest.mark.parametrize("separate", ["true", "false"])
def test_publishers_and_consumers_use_separate_connections(proxy_factory, separate):
    proc = proxy_factory("--separate-publishers", separate)
    conn = connect(proc)
    publisher = conn.channel()
    publisher.confirm_delivery()
    consumer = conn.channel()
    queue = consumer.queue_declare("", exclusive=True).method.queue
    publisher.basic_publish("", queue, b"m")
    assert consumer.basic_get(queue, auto_ack=True)[2] == b"m"
    status, upstreams = admin(proc, "/upstreams")
    roles = sorted(c["role"] for c in upstreams["connections"] if c["channels"])
    assert roles == (["consume", "publish"] if separate == "true" else ["any"])
    conn.close()


def _channels_by_role(proc) -> dict[str, int]:
    _status, upstreams = admin(proc, "/upstreams")
    roles: dict[str, int] = {}
    for c in upstreams["connections"]:
        if c["channels"]:
            roles[c["role"]] = roles.get(c["role"], 0) + c["channels"]
    return roles


def test_a_channel_that_declares_then_publishes_moves_to_a_publishing_connection(proxy_factory):
    """The common script pattern (declare the queue, then publish on the same channel): the
    channel starts with the consumers and moves at its first publish, losing nothing, so a
    memory alarm or flow control on the publisher never holds the consumers back."""
    proc = proxy_factory()
    queue = "amqproxy-test-declare-then-publish"
    consumer_conn, publisher_conn = connect(proc), connect(proc)
    try:
        consumer = consumer_conn.channel()
        consumer.queue_declare(queue, auto_delete=True)
        received: list[bytes] = []
        consumer.basic_consume(queue, lambda ch, m, p, body: received.append(body), auto_ack=True)
        publisher = publisher_conn.channel()
        publisher.queue_declare(queue, auto_delete=True)  # first method: placed with the consumers
        assert _channels_by_role(proc) == {"consume": 2}
        for i in range(50):
            publisher.basic_publish("", queue, b"m%d" % i)
        publisher_conn.process_data_events(0)
        wait_until(lambda: consumer_conn.process_data_events(0.05) or len(received) == 50, timeout=10)
        assert received == [b"m%d" % i for i in range(50)]  # nothing lost or reordered by the move
        assert _channels_by_role(proc) == {"consume": 1, "publish": 1}
        publisher.queue_declare(queue, passive=True)  # the moved channel still answers
        metrics = urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/metrics").read().decode()
        assert 'amqproxy_channels_moved_total{vhost="/"} 1.0' in metrics
    finally:
        for conn in (consumer_conn, publisher_conn):
            conn.close()


def test_a_channel_tied_to_its_connection_does_not_move(proxy_factory):
    """The client's exclusive queues, qos, or confirm mode keep a channel where it is."""
    proc = proxy_factory()
    queue = "amqproxy-test-channels-that-stay"
    conns = [connect(proc) for _ in range(4)]
    try:
        reader = conns[0].channel()
        reader.queue_declare(queue, auto_delete=False)

        exclusive = conns[1].channel()
        own = exclusive.queue_declare("", exclusive=True).method.queue
        exclusive.basic_publish("", own, b"exclusive")
        assert exclusive.basic_get(own, auto_ack=True)[2] == b"exclusive"

        with_qos = conns[2].channel()
        with_qos.basic_qos(prefetch_count=5)
        with_qos.basic_publish("", queue, b"qos")

        confirming = conns[3].channel()
        confirming.queue_declare(queue, passive=True)
        confirming.confirm_delivery()
        confirming.basic_publish("", queue, b"confirmed")  # returns once the broker confirmed it

        got = []
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            body = reader.basic_get(queue, auto_ack=True)[2]
            if body is not None:
                got.append(body)
        assert sorted(got) == [b"confirmed", b"qos"]
        assert _channels_by_role(proc) == {"consume": 4}
        reader.queue_delete(queue)
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.parametrize("nowait", [False, True])
def test_a_publish_pipelined_behind_its_queue_declare_is_not_overtaken(proxy_factory, nowait):
    """queue.declare and basic.publish in one write, before the declare-ok (or with a nowait
    declare, which has none): the channel must not move then, or the publish could reach the
    broker on another connection before the queue exists and be dropped."""
    proc = proxy_factory()
    queue = f"amqproxy-test-pipelined-declare-{nowait}"
    with RawAMQP(proc.host, proc.port) as raw:
        assert isinstance(raw.handshake()[2], C.Connection.OpenOk)
        raw.send(C.Channel.Open(), 1)
        raw.expect(C.Channel.OpenOk, 1)
        body = b"pipelined"
        raw.send_bytes(
            pamqp.frame.marshal(C.Queue.Declare(queue=queue, nowait=nowait), 1)
            + pamqp.frame.marshal(C.Basic.Publish(exchange="", routing_key=queue), 1)
            + pamqp.frame.marshal(pamqp.header.ContentHeader(0, len(body), C.Basic.Properties()), 1)
            + pamqp.frame.marshal(pamqp.body.ContentBody(body), 1)
        )
        if not nowait:
            raw.expect(C.Queue.DeclareOk, 1)
        conn = connect(proc)
        try:
            ch = conn.channel()
            got = None
            deadline = time.monotonic() + 5
            while got is None and time.monotonic() < deadline:
                got = ch.basic_get(queue, auto_ack=True)[2]
            assert got == body
            assert _channels_by_role(proc) == {"consume": 2}  # the raw client's channel stayed
            ch.queue_delete(queue)
        finally:
            conn.close()
