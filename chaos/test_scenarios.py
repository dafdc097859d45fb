"""Chaos scenarios: each injects faults on the upstream leg (Toxiproxy between the
proxy and its RabbitMQ node), on the broker node itself, or on the client leg, while
publishers and consumers run through the proxy, and checks the invariants in chaos.harness.

Marked `chaos`; those also marked `chaos_smoke` run in the default test command."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import aio_pika
import aio_pika.exceptions
import pika
import pika.exceptions
import pytest

from chaos.harness import CONNECT_TIMEOUT, MARGIN, UPSTREAM_HEARTBEAT, confirmed_roundtrip, drain
from chaos.workload import Endpoint

# Recover mode: a client's publish waits while its channel is re-established (node restart,
# then the proxy's backoff); the recovery timeout (30 s) is the proxy's own bound on it.
RECOVERY_STALL_BOUND = 30 + MARGIN

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


@pytest.mark.chaos_smoke
def test_upstream_blip_with_publishers_and_consumers(chaos):
    """reset_peer for a second: clients on the reset upstreams get 320 and republish, nothing
    confirmed is lost, and new clients get through at once."""
    run = chaos("upstream blip (reset_peer)")
    route = run.routes[0]
    with run.fault("reset_peer 1 s"):
        route.add_toxic(type="reset_peer", attributes={"timeout": 0})
        time.sleep(1)
        route.destroy_toxic("reset_peer_downstream")
    run.finish(client_errors=True)


@pytest.mark.chaos_smoke
def test_upstream_down_longer_than_the_connect_timeout(chaos):
    """The route is disabled (connections closed, connects refused) for longer than
    --connect-timeout: a new client is refused with 320 within the connect timeout (+ margin)
    instead of hanging, and the proxy recovers once the route is back."""
    run = chaos("upstream down > connect timeout")
    route = run.routes[0]
    outage = 2 * CONNECT_TIMEOUT + 1
    with run.fault(f"proxy disabled {outage:.0f} s"):
        route.disable()
        down_at = time.monotonic()
        kind, code, text = run.new_client_refused()
        run.expect((kind, code) == ("close", 320), f"new client during the outage saw {kind} {code} {text!r}")
        time.sleep(max(0.0, down_at + outage - time.monotonic()))
        route.enable()
    run.finish(client_errors=True)


def test_slow_upstream_keeps_heartbeats_healthy(chaos):
    """500 ms (+-100 ms) latency from the broker for 8 s, longer than the heartbeat timeout
    (2 x 3 s): frames arrive late but well within it, so no upstream is declared dead and no
    client sees an error."""
    run = chaos("slow upstream (latency 500 ms)")
    route = run.routes[0]
    with run.fault("latency 500+-100 ms downstream 8 s"):
        route.add_toxic(type="latency", attributes={"latency": 500, "jitter": 100})
        time.sleep(8)
        route.destroy_toxic("latency_downstream")
    run.expect(
        run.probe.metric("amqproxy_upstream_connections_closed_total", reason="heartbeat_timeout") == 0,
        "an upstream was declared dead (heartbeat_timeout) under latency alone",
    )
    run.finish(client_errors=False)


def test_bandwidth_starved_upstream_with_a_slow_consumer(chaos):
    """20 KB/s each way for 6 s, three fast publishers beside a slow consumer: backpressure,
    not errors; nothing confirmed is lost."""
    run = chaos("bandwidth-starved upstream, slow consumer", publishers=3, consumers=1, consumer_delay=0.01)
    route = run.routes[0]
    with run.fault("bandwidth 20 KB/s both ways 6 s"):
        route.add_toxic(type="bandwidth", attributes={"rate": 20})
        route.add_toxic(type="bandwidth", stream="upstream", attributes={"rate": 20})
        time.sleep(6)
        route.destroy_toxic("bandwidth_downstream")
        route.destroy_toxic("bandwidth_upstream")
    run.finish(client_errors=False)


def test_half_open_upstream_is_detected_by_heartbeats(chaos):
    """timeout toxic (0: drop every byte, never close) both ways: the upstream sockets stay
    open and silent. The workload's clients only use channels they already have, so only
    missed heartbeats can end those upstreams: the proxy's own ("missed heartbeats") or the
    broker's, whose close Toxiproxy passes on ("connection closed by the broker"), whichever
    fires first (both after 2 x 3 s). Clients get 320 no sooner than one heartbeat interval
    and within the bound; after that a new client, which needs a new upstream, is refused
    within the connect timeout."""
    run = chaos("half-open upstream (timeout toxic)")
    route = run.routes[0]
    with run.fault("timeout 0 both ways until detected"):
        started = time.monotonic()
        route.add_toxic(type="timeout", attributes={"timeout": 0})
        route.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 0})
        deadline = started + 2 * UPSTREAM_HEARTBEAT + MARGIN
        while not run.ledger.errors_between(started, time.monotonic()) and time.monotonic() < deadline:
            time.sleep(0.2)
        detected = run.ledger.errors_between(started, time.monotonic())
        kind, code, text = run.new_client_refused()
        run.expect((kind, code) == ("close", 320), f"new client during the half-open outage saw {kind} {code} {text!r}")
        route.destroy_toxic("timeout_downstream")
        route.destroy_toxic("timeout_upstream")
    run.expect(bool(detected), "the half-open upstream was never detected")
    for e in detected:
        run.expect(
            e.code == 320 and ("missed heartbeats" in e.text or "closed by the broker" in e.text),
            f"not ended by heartbeats: {e}",
        )
        run.expect(e.at - started >= UPSTREAM_HEARTBEAT, f"ended before a heartbeat could be missed: {e}")
    run.finish(client_errors=True)


def test_flapping_node_trips_and_resets_its_breaker(chaos):
    """The route goes down 1.5 s / up 0.7 s, four times: the node's breaker opens (clients are
    refused fast meanwhile) and closes again once the node stays up."""
    run = chaos("flapping node (breaker)")
    route = run.routes[0]
    with run.fault("proxy disabled 1.5 s / enabled 0.7 s x4"):
        for _ in range(4):
            route.disable()
            time.sleep(1.5)
            route.enable()
            time.sleep(0.7)
    run.expect(
        run.probe.metric("amqproxy_breaker_transitions_total", to="open") >= 1,
        "the breaker never opened while the node flapped",
    )
    run.finish(client_errors=True)


def test_one_of_two_nodes_down_fails_over(chaos):
    """Two nodes (two routes); node 0 down for 6 s: clients on it get 320, but every new client
    meanwhile gets through on node 1."""
    run = chaos("one of two nodes down (failover)", nodes=2)
    node0 = run.routes[0]
    with run.fault("node 0 proxy disabled 6 s"):
        node0.disable()
        until = time.monotonic() + 6
        attempts = failures = 0
        while time.monotonic() < until:
            attempts += 1
            try:
                confirmed_roundtrip(run.proxy.host, run.proxy.port)
            except (pika.exceptions.AMQPError, OSError) as e:
                failures += 1
                run.violation(f"a new client failed while node 1 was up: {e!r}")
            time.sleep(0.3)
        node0.enable()
    run.expect(attempts >= 5 and failures == 0, f"{failures} of {attempts} new clients failed during failover")
    run.finish(client_errors=None)


def test_memory_alarm_blocks_publishers_then_releases_them(chaos, own_broker):
    """A memory alarm on the node for 4 s: publishers are told (connection.blocked) and wait,
    consumers carry on; after the alarm every confirmed message is there. Blocking is the
    designed behaviour, so publishes may last as long as the alarm."""
    run = chaos("broker memory alarm")
    blocked_upstreams = set()
    with run.fault("memory alarm 4 s"):
        own_broker.set_memory_alarm(True)
        until = time.monotonic() + 4
        while time.monotonic() < until:
            blocked_upstreams |= {
                (c["id"], c["role"], c["clients"]) for c in run.probe.upstreams()["connections"] if c["blocked"]
            }
            time.sleep(0.2)
        own_broker.set_memory_alarm(False)
    run.expect(bool(blocked_upstreams), "no upstream connection was blocked by the alarm")
    run.expect(
        run.ledger.blocked_seen > 0,
        f"no publisher was told connection.blocked (blocked upstreams: {sorted(blocked_upstreams)})",
    )
    run.finish(client_errors=False, stall_bound=None)


def test_client_leg_faults_do_not_affect_other_clients(chaos, toxi):
    """Clients that reach the proxy through their own route vanish mid-publish (limit_data cuts
    them inside a frame) or read too slowly (2 KB/s, and the client never drains its socket);
    the proxy drops them (the slow one as a slow client), leaks nothing, and the workload's
    clients beside them see no error."""
    run = chaos("client-leg faults", proxy_args=("--client-buffer", "262144"))
    leg = toxi.route("chaos-client-leg", f"{run.proxy.host}:{run.proxy.port}")
    host, port = leg.listen.rsplit(":", 1)
    victims = Endpoint(host, int(port), run.queue + "-victim")
    try:
        with run.fault("limit_data 50 KB x3 (vanishing publishers); bandwidth 2 KB/s (slow reader)"):
            leg.add_toxic(type="limit_data", stream="upstream", attributes={"bytes": 50_000})
            for _ in range(3):
                _publish_until_cut(victims)
            leg.destroy_toxic("limit_data_upstream")
            _slow_reader(run, victims, leg)
    finally:
        leg.destroy()
    run.expect(
        run.probe.metric("amqproxy_client_connections_closed_total", reason="slow_client") >= 1,
        "the slow reader was not disconnected as a slow client",
    )
    run.finish(client_errors=False)


def _publish_until_cut(endpoint):
    conn = pika.BlockingConnection(endpoint.params("chaos-victim-publisher"))
    ch = conn.channel()
    with pytest.raises((pika.exceptions.AMQPError, OSError)):
        for _ in range(1000):
            ch.basic_publish("", endpoint.queue, b"v" * 10_000)
            conn.process_data_events(0)


def _slow_reader(run, endpoint, leg):
    """A consumer of 10 MB that reads at 2 KB/s until the proxy drops it (more than its
    --client-buffer, the fault proxy's buffer and the kernel's socket buffers)."""
    with run.direct() as ch:
        ch.queue_declare(endpoint.queue, auto_delete=False)
        for _ in range(400):
            ch.basic_publish("", endpoint.queue, b"s" * 25_000)
    leg.add_toxic(type="bandwidth", attributes={"rate": 2})
    conn = pika.BlockingConnection(endpoint.params("chaos-victim-reader"))
    try:
        conn.channel().basic_consume(endpoint.queue, lambda *a: None)
        before = run.probe.metric("amqproxy_client_connections_closed_total", reason="slow_client")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if run.probe.metric("amqproxy_client_connections_closed_total", reason="slow_client") > before:
                break
            time.sleep(0.2)
    finally:
        leg.destroy_toxic("bandwidth_downstream")
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            conn.close()
        with contextlib.suppress(pika.exceptions.AMQPError, OSError), run.direct() as ch:
            ch.queue_delete(endpoint.queue)


# -- faults of the broker node itself --------------------------------------------------


def test_broker_stop_app_then_start_app(chaos, own_broker):
    run = chaos("broker stop_app/start_app")
    with run.fault("rabbitmqctl stop_app 4 s"):
        own_broker.stop_app()
        time.sleep(4)
        own_broker.start_app()
    run.finish(client_errors=True)


def test_broker_kill9_and_restart(chaos, own_broker):
    run = chaos("broker kill -9 and restart")
    with run.fault("kill -9, restart"):
        own_broker.kill9()
        kind, code, text = run.new_client_refused()
        run.expect((kind, code) == ("close", 320), f"new client while the node is dead saw {kind} {code} {text!r}")
        own_broker.restart()
    run.finish(client_errors=True)


@pytest.mark.parametrize("fault", ["kill -9 and restart", "stop_app 5 s/start_app"])
def test_broker_restart_is_invisible_to_clients_without_recovery(chaos, own_broker, fault):
    """--upstream-failure recover: publishers with confirms and consumers with manual acks
    that have NO reconnect logic ride through a broker restart. No client may see an error; every
    confirmed message is consumed (redeliveries allowed); publishes in flight at the loss are
    nacked by the proxy and published again by the client."""
    run = chaos(f"broker {fault}, recover mode, clients without recovery", upstream_failure="recover", reconnect=False)
    with run.fault(fault):
        if fault == "kill -9 and restart":
            own_broker.kill9()
            own_broker.restart()
        else:
            own_broker.stop_app()
            time.sleep(5)
            own_broker.start_app()
    # The only thing a client may see is basic.nack for publishes in flight at the loss (it
    # publishes them again); no connection or channel error. A publish waits for its channel's
    # recovery: the restart, not a hang, bounds it.
    run.finish(client_errors=False, stall_bound=RECOVERY_STALL_BOUND, tolerated=("nack",))


CONTROL_WINDOW = 100  # publishes awaiting their confirm at once: many are in flight at the fault


@pytest.mark.parametrize("fault", ["kill -9 and restart", "stop_app 5 s/start_app"])
def test_control_the_broker_alone_keeps_every_message_it_confirmed(own_broker, fault):
    """The control of the loss soak: the same node faults with no proxy in between. A publisher
    with CONTROL_WINDOW confirms outstanding (aio-pika) publishes persistent messages to a
    durable queue until the fault ends its connection; after the restart every message the
    broker confirmed is in the queue. A loss through the proxy that this control does not show
    is the proxy's; one the control shows too is the broker's."""
    target = own_broker.target()

    def start_app_after_5_s() -> None:
        time.sleep(5)  # stopped for 5 s, as in the soak
        own_broker.start_app()

    # The fault, and what brings the node back afterwards.
    break_node, restore_node = {
        "kill -9 and restart": (own_broker.kill9, own_broker.restart),
        "stop_app 5 s/start_app": (own_broker.stop_app, start_app_after_5_s),
    }[fault]
    queue = f"chaos-control-{uuid.uuid4().hex[:8]}"

    async def publish_until_the_fault() -> tuple[set[int], int]:
        conn = await aio_pika.connect(target.url())
        channel = await conn.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)
        confirmed: set[int] = set()

        async def publish(n: int) -> None:
            with contextlib.suppress(aio_pika.exceptions.AMQPError, ConnectionError, asyncio.CancelledError):
                message = aio_pika.Message(str(n).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                await channel.default_exchange.publish(message, routing_key=queue)
                confirmed.add(n)  # the broker's basic.ack, not a nack or a lost connection

        fault_task = asyncio.create_task(asyncio.to_thread(fault_now))
        await asyncio.sleep(0)
        published, in_flight = 0, set()
        while not conn.is_closed and not fault_task.done():
            while len(in_flight) < CONTROL_WINDOW:
                in_flight.add(asyncio.create_task(publish(published)))
                published += 1
            _done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED, timeout=1)
        if in_flight:
            await asyncio.wait(in_flight, timeout=10)
        await fault_task
        with contextlib.suppress(aio_pika.exceptions.AMQPError, ConnectionError):
            await conn.close()
        return confirmed, published

    def fault_now() -> None:
        time.sleep(2)  # publishing at full speed meanwhile
        break_node()

    confirmed, published = asyncio.run(publish_until_the_fault())
    restore_node()
    conn = target.pika()
    try:
        ch = conn.channel()
        kept = {int(message) for message in drain(ch, queue)}
        ch.queue_delete(queue)
    finally:
        conn.close()
    assert confirmed, "the broker confirmed nothing before the fault"
    assert len(confirmed) < published, "the fault left no publish unconfirmed: it came after the publisher"
    lost = sorted(confirmed - kept)
    assert not lost, f"the broker lost {len(lost)} of {len(confirmed)} messages it confirmed: {lost[:10]}"


# Blackholes at the proxy's defaults for liveness (heartbeat 5 s, silence timeout 8 s), in
# recover mode with clients that have no recovery of their own.
SILENCE = 8.0  # --upstream-silence-timeout default
BLACKHOLE = ("--upstream-heartbeat", "5")
# A client waits out the silence (found within SILENCE + 1 s tick), then the recovery: on a
# healthy node at once, on the only node once it is reachable again.
BLACKHOLE_STALL_BOUND = SILENCE + 1 + MARGIN


@pytest.mark.parametrize("nodes", [1, 2], ids=["blackhole of the only node", "blackhole of one of two nodes"])
def test_blackhole_recover_mode_clients_without_recovery(chaos, nodes):
    """The timeout toxic (0: hold every byte, never close) on both streams of the publishers'
    node for 12 s. The watchdog finds the silent upstreams a client waits on (publishers: confirms
    due) within SILENCE + 1 s; idle ones (consumers) go by missed heartbeats (2 x 5 s). With two
    nodes the channels are recovered on node 1 at once; with one, once the route is back (the
    waiting dials probe it every 0.25 s). Clients see no error but basic.nack for the publishes
    in flight at the loss; nothing confirmed is lost."""
    label = "blackhole of the only node" if nodes == 1 else "blackhole of one of two nodes"
    run = chaos(
        f"{label}, recover mode, clients without recovery",
        nodes=nodes,
        upstream_failure="recover",
        reconnect=False,
        proxy_args=BLACKHOLE,
    )
    # The node under the publishers (round-robin may have put every connection on one node).
    publishing = {c["node"] for c in run.probe.upstreams()["connections"] if c["role"] == "publish"}
    route = next((r for r in run.routes if r.listen in publishing), run.routes[0])
    with run.fault("timeout 0 both ways 12 s"):
        started = time.monotonic()
        route.add_toxic(type="timeout", attributes={"timeout": 0})
        route.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 0})
        detected = run.detected(started, SILENCE + 1 + MARGIN)
        time.sleep(max(0.0, started + 12 - time.monotonic()))
        route.destroy_toxic("timeout_downstream")
        route.destroy_toxic("timeout_upstream")
    run.expect(detected is not None, "no silent upstream was found by the watchdog")
    run.expect(
        detected is None or detected <= SILENCE + 1 + MARGIN,
        f"found after {detected} s (bound {SILENCE + 1} s + margin)",
    )
    # One node: a republish is held until the route is back (12 s), then a probe (0.25 s) gets in.
    stall = BLACKHOLE_STALL_BOUND if nodes == 2 else 12 + 1 + MARGIN
    run.finish(client_errors=False, stall_bound=stall, tolerated=("nack",))


def test_hung_broker_is_detected_by_heartbeats(chaos, own_broker):
    """SIGSTOP for 10 s: the node's sockets stay open and silent; missed heartbeats end the
    upstreams and clients get 320 within the bound; after SIGCONT everything recovers."""
    run = chaos("hung broker (SIGSTOP)")
    with run.fault("SIGSTOP 10 s, SIGCONT"):
        own_broker.pause()
        try:
            time.sleep(10)
        finally:
            own_broker.resume()
    run.finish(client_errors=True)


def test_broker_closes_all_connections_behind_a_slow_close(chaos, own_broker):
    """rabbitmqctl close_all_connections while slow_close holds every TCP close back for 5 s:
    the broker's Connection.Close is what ends an upstream, so clients get 320 well before the
    sockets close (within 3 s)."""
    run = chaos("close_all_connections (slow_close)")
    route = run.routes[0]
    with run.fault("slow_close 5 s; rabbitmqctl close_all_connections"):
        route.add_toxic(type="slow_close", attributes={"delay": 5000})
        own_broker.ctl("close_all_connections", "chaos suite")
        time.sleep(5)
        route.destroy_toxic("slow_close_downstream")
    run.expect(
        all(e.code == 320 and "chaos suite" in e.text for e in run.ledger.errors if e.kind == "close"),
        f"clients did not get the broker's 320: {run.ledger.errors[:3]}",
    )
    run.finish(client_errors=True, stall_bound=3.0)


def test_rss_does_not_grow_across_repeated_blips(chaos):
    """Five reset_peer blips on one proxy: RSS after the last is within 10 MB of RSS after the
    second (the first warms caches and pools)."""
    run = chaos("repeated blips (RSS)")
    route = run.routes[0]
    rss = []
    with run.fault("reset_peer 0.5 s x5"):
        for _ in range(5):
            route.add_toxic(type="reset_peer", attributes={"timeout": 0})
            time.sleep(0.5)
            route.destroy_toxic("reset_peer_downstream")
            time.sleep(3)
            rss.append(run.probe.rss_kb())
    run.expect(rss[-1] - rss[1] <= 10_240, f"RSS grew across blips (kB): {rss}")
    run.finish(client_errors=True)
