"""Outages that cost clients no more than they must, through the real proxy at its defaults.

Silent upstreams: the bytes stop flowing but the TCP connection stays up (a blackhole: the
fault proxy's `timeout` toxic with timeout 0 on both streams, between the proxy and a RabbitMQ
node of this module's own). The watchdog ends a connection the proxy waits on once nothing was
read from it for --upstream-silence-timeout (8 s), whatever the clients' heartbeats; a busy
broker (a pause, a memory alarm) is not silent, since it still writes heartbeats.

Breakers: a client that waits for a node that is down gets in within --breaker-probe-interval
(0.25 s) of its return, however long the outage and whatever the breaker's open period.

The timing bounds are what the mechanism guarantees plus a stated margin:
- the watchdog looks on the janitor's 1 s tick and, when the timeout falls before the next tick
  and the proxy is waiting already, schedules its check for that very moment: it fires SILENCE
  after the last byte read when the wait began a tick earlier (the blackholes here: a confirm is
  always due), else by SILENCE + TICK;
- LOAD: 1 s for a loaded 2-core machine (scheduling of the proxy, the test's polling threads and
  the broker, which share the cores with other test runs);
- a recovery onto a healthy node costs a dial and a replay round trip on loopback (RECOVERY_WORK).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import urllib.request
import uuid

import pika
import pika.exceptions
import pytest

from chaos import toxiproxy_endpoint
from chaos.harness import Toxi

pytestmark = [pytest.mark.integration, pytest.mark.proxy_only, pytest.mark.timeout(120)]

SILENCE = 8.0  # --upstream-silence-timeout default
TICK = 1.0  # the janitor's interval: the watchdog's granularity
LOAD = 1.0  # margin for a loaded 2-core machine
RECOVERY_WORK = 1.0  # dial + replay on a healthy node over loopback
PROBE_INTERVAL = 0.25  # --breaker-probe-interval default
BACK_BOUND = 1.0  # the bound: a waiting client gets in within 1 s of the node's return


@pytest.fixture(scope="module")
def toxi():
    with toxiproxy_endpoint() as url:
        yield Toxi(url)


@pytest.fixture
def routes(toxi, own_broker):
    """routes(n) -> n fault-proxy routes to the module's own node (each a node to the proxy)."""
    made = []

    def make(n: int = 1):
        for i in range(n):
            made.append(toxi.route(f"silence-{uuid.uuid4().hex[:8]}-{i}", f"{own_broker.host}:{own_broker.port}"))
        return made[-n:]

    yield make
    for route in made:
        with contextlib.suppress(Exception):
            route.destroy()


def blackhole(route) -> None:
    route.add_toxic(type="timeout", attributes={"timeout": 0})
    route.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 0})


def lift(route) -> None:
    route.destroy_toxic("timeout_downstream")
    route.destroy_toxic("timeout_upstream")


def metric(proc, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for m in re.finditer(rf"^{name}(?:\{{(.*)\}})? (\S+)$", text, re.M):
        if all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def params(host, port, **kw):
    return pika.ConnectionParameters(
        host=host,
        port=port,
        connection_attempts=1,
        socket_timeout=60,
        stack_timeout=90,
        blocked_connection_timeout=None,
        **kw,
    )


class Publisher(threading.Thread):
    """Publishes persistent messages with confirms, one at a time, as fast as they confirm; no
    recovery of its own. Records each call's start and end, the confirmed bodies, its error."""

    def __init__(self, proc, queue: str, pace: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.proc, self.queue, self.pace = proc, queue, pace
        self.calls: list[tuple[float, float]] = []
        self.confirmed: list[str] = []
        self.nacked = 0
        self.error: BaseException | None = None
        self.error_at = 0.0
        self.current: float | None = None  # start of the call in progress
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            conn = pika.BlockingConnection(params(self.proc.host, self.proc.port))
            ch = conn.channel()
            ch.confirm_delivery()
            self.ready.set()
            n = 0
            while not self.stop.is_set():
                body = f"m{n}"
                n += 1
                self.current = started = time.monotonic()
                try:
                    ch.basic_publish("", self.queue, body.encode(), pika.BasicProperties(delivery_mode=2))
                    self.confirmed.append(body)
                except pika.exceptions.NackError:
                    self.nacked += 1
                finally:
                    self.calls.append((started, time.monotonic()))
                    self.current = None
                if self.pace:
                    time.sleep(self.pace)
            conn.close()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.error, self.error_at = exc, time.monotonic()
            self.ready.set()

    def longest_call(self, now: float) -> float:
        calls = [end - start for start, end in self.calls]
        if self.current is not None:
            calls.append(now - self.current)
        return max(calls, default=0.0)

    def confirmed_after(self, moment: float) -> float | None:
        """When the first call that ended after `moment` ended."""
        return next((end for _start, end in self.calls if end > moment), None)


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def declare(own_broker, queue: str) -> None:
    conn = pika.BlockingConnection(params(own_broker.host, own_broker.port))
    try:
        conn.channel().queue_declare(queue, durable=True)
    finally:
        conn.close()


def drain(own_broker, queue: str) -> set[str]:
    conn = pika.BlockingConnection(params(own_broker.host, own_broker.port))
    got = set()
    try:
        ch = conn.channel()
        while True:
            method, _props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return got
            got.add(body.decode())
    finally:
        with contextlib.suppress(Exception):
            ch.queue_delete(queue)
        conn.close()


# -- silence ----------------------------------------------------------------------------


def test_blackhole_of_the_only_node_is_found_by_the_watchdog_and_clients_get_320_naming_it(
    own_broker, routes, proxy_factory
):
    """Defaults but a 3 s --recovery-timeout: a confirm publisher on the only node; the node is
    blackholed. The watchdog (not the heartbeats, 2 x 5 s) ends the upstream SILENCE to
    SILENCE + TICK after the last byte; with no other node the client is held up to the
    recovery timeout, then gets 320 naming the silence. Its longest wait with no answer is
    SILENCE + TICK + recovery timeout (docs/OPERATIONS.md)."""
    recovery = 3.0
    (route,) = routes(1)
    proc = proxy_factory("--upstream", f"amqp://{route.listen}", "--recovery-timeout", str(recovery))
    queue = f"silence-{uuid.uuid4().hex[:8]}"
    declare(own_broker, queue)
    pub = Publisher(proc, queue)
    pub.start()
    assert pub.ready.wait(10) and pub.error is None, pub.error
    assert wait_for(lambda: len(pub.confirmed) > 20, 10)
    blackhole(route)
    at = time.monotonic()
    last_confirm = pub.calls[-1][1] if pub.calls else at
    try:
        found = wait_for(
            lambda: metric(proc, "amqproxy_upstream_connections_closed_total", reason="silence_timeout"), 20
        )
        detected = time.monotonic() - at
        assert found, "the silent upstream was never found by the watchdog"
        assert metric(proc, "amqproxy_upstream_connections_closed_total", reason="heartbeat_timeout") == 0
        # Nothing was read after the last confirm, which came just before the blackhole.
        assert SILENCE - 0.3 <= detected + (at - last_confirm), detected
        assert detected <= SILENCE + LOAD, f"found {detected:.2f} s after the blackhole"
        print(f"only node blackholed: found after {detected:.2f} s")
        pub.join(recovery + TICK + LOAD + 10)
        assert isinstance(pub.error, pika.exceptions.ConnectionClosedByBroker), pub.error
        assert pub.error.reply_code == 320
        assert "silent upstream" in pub.error.reply_text and "not recovered within 3 s" in pub.error.reply_text
        # The confirm due at the loss is answered (basic.nack) at detection; the republish is
        # held until the recovery timeout, then the 320 comes: SILENCE + TICK + recovery after
        # the last byte at most, and no single call waits longer than the longer of the two.
        total = pub.error_at - last_confirm
        bound = SILENCE + TICK + recovery + LOAD
        assert SILENCE + recovery - 0.5 <= total <= bound, (
            f"320 {total:.2f} s after the last byte (bound {bound:.1f} s)"
        )
        assert pub.nacked >= 1, "the publish in flight at the loss was not nacked"
        longest = pub.longest_call(time.monotonic())
        assert longest <= max(SILENCE + TICK, recovery) + LOAD, f"a call waited {longest:.2f} s with no answer"
    finally:
        pub.stop.set()
        lift(route)
    drain(own_broker, queue)


def test_blackhole_of_one_of_two_nodes_recovers_there_with_no_client_error(own_broker, routes, proxy_factory):
    """Two nodes (two routes to the module's node), recover mode (the default): the node under
    the confirm publisher goes silent. The watchdog finds it, its breaker opens at once, the
    publisher's channel is recovered on the other node: the client sees only a stall (at most
    SILENCE + TICK + RECOVERY_WORK + LOAD), no error, and every confirmed message arrives."""
    r0, r1 = routes(2)
    proc = proxy_factory("--upstream", f"amqp://{r0.listen}", "--upstream", f"amqp://{r1.listen}")
    queue = f"silence-{uuid.uuid4().hex[:8]}"
    declare(own_broker, queue)
    pub = Publisher(proc, queue, pace=0.01)
    pub.start()
    assert pub.ready.wait(10) and pub.error is None, pub.error
    assert wait_for(lambda: len(pub.confirmed) > 20, 10)
    publishing = [c for c in proc.admin_json("/upstreams")["connections"] if c["role"] == "publish"]
    assert len(publishing) == 1, publishing
    silent = r0 if publishing[0]["node"] == r0.listen else r1
    blackhole(silent)
    at = time.monotonic()
    try:
        assert wait_for(
            lambda: metric(proc, "amqproxy_upstream_connections_closed_total", reason="silence_timeout"), 20
        ), "the silent node was never found"
        detected = time.monotonic() - at
        assert detected <= SILENCE + LOAD, detected
        assert wait_for(lambda: pub.confirmed_after(at + detected), RECOVERY_WORK + LOAD + 5)
        time.sleep(1.0)
        assert pub.error is None, pub.error
        longest = pub.longest_call(time.monotonic())
        bound = SILENCE + TICK + RECOVERY_WORK + LOAD
        assert longest <= bound, f"a publish waited {longest:.2f} s (bound {bound:.1f} s)"
        breakers = {n["node"]: n["breaker"] for n in proc.admin_json("/upstreams")["nodes"]}
        assert breakers[silent.listen] != "closed", breakers
        now = [c for c in proc.admin_json("/upstreams")["connections"] if c["role"] == "publish"]
        assert [c["node"] for c in now] == [(r1 if silent is r0 else r0).listen], now
    finally:
        pub.stop.set()
        pub.join(10)
        lift(silent)
    assert pub.error is None, pub.error
    got = drain(own_broker, queue)
    lost = set(pub.confirmed) - got
    assert not lost, f"{len(lost)} confirmed messages lost: {sorted(lost)[:5]}"


def test_watchdog_covers_a_pipelined_channel_open(own_broker, routes, proxy_factory):
    """--upstream-check-interval 60 pipelines channel.open on a connection heard from within
    60 s. A new client's channel placed on a connection that has just gone silent waits for an
    open-ok that never comes: the watchdog ends the connection for that wait alone (nothing
    else is outstanding on it) and names it, before the heartbeats (2 x 5 s) could."""
    (route,) = routes(1)
    proc = proxy_factory(
        "--upstream", f"amqp://{route.listen}", "--upstream-check-interval", "60", "--upstream-failure", "close"
    )
    first = pika.BlockingConnection(params(proc.host, proc.port))
    ch = first.channel()
    ch.confirm_delivery()
    ch.basic_publish("", "amqproxy-test-nowhere", b"x")  # a publishing connection, heard from now
    blackhole(route)
    at = time.monotonic()
    try:
        second = pika.BlockingConnection(params(proc.host, proc.port))  # proven by the pooled login
        ch2 = second.channel()
        ch2.basic_publish("", "amqproxy-test-nowhere", b"y")  # placed: channel.open pipelined
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
            second.process_data_events(time_limit=SILENCE + TICK + LOAD + 5)
            while True:
                second.process_data_events(time_limit=1)
        took = time.monotonic() - at
        assert closed.value.reply_code == 320
        assert "silent upstream" in closed.value.reply_text and "channel.open-ok" in closed.value.reply_text, (
            closed.value.reply_text
        )
        assert took <= SILENCE + TICK + LOAD, took
    finally:
        lift(route)
        with contextlib.suppress(Exception):
            first.close()


def test_a_busy_broker_is_not_silent(own_broker, proxy_factory):
    """Defaults, directly on the node, a confirm publisher always waiting for its next confirm:
    a 2 s SIGSTOP (a GC pause), then a memory alarm longer than the silence timeout. The broker
    still writes heartbeats while it blocks the connection, so the watchdog never fires: no
    upstream is closed, the client sees no error, every confirmed message is there."""
    proc = proxy_factory("--upstream", own_broker.upstream_url)
    queue = f"busy-{uuid.uuid4().hex[:8]}"
    declare(own_broker, queue)
    pub = Publisher(proc, queue, pace=0.05)
    pub.start()
    try:
        assert pub.ready.wait(10) and pub.error is None, pub.error
        assert wait_for(lambda: len(pub.confirmed) > 5, 10)
        ids = [c["id"] for c in proc.admin_json("/upstreams")["connections"]]
        own_broker.pause()
        try:
            time.sleep(2.0)
        finally:
            own_broker.resume()
        assert wait_for(lambda: pub.confirmed_after(time.monotonic() - 0.5), 5), "no confirm after the pause"
        own_broker.set_memory_alarm(True)
        alarmed = time.monotonic()
        try:
            time.sleep(SILENCE + 4)
        finally:
            own_broker.set_memory_alarm(False)
        assert wait_for(lambda: pub.confirmed_after(time.monotonic() - 0.5), 10), "no confirm after the alarm"
        blocked = pub.longest_call(time.monotonic())
        assert blocked >= SILENCE, f"the longest publish took {blocked:.1f} s: the alarm did not block it"
        assert pub.error is None, pub.error
        unplanned = {
            r: metric(proc, "amqproxy_upstream_connections_closed_total", reason=r)
            for r in ("lost", "broker_closed", "heartbeat_timeout", "health_check", "silence_timeout")
        }
        assert not any(unplanned.values()), unplanned
        assert [c["id"] for c in proc.admin_json("/upstreams")["connections"]] == ids
        assert time.monotonic() - alarmed > SILENCE + TICK
    finally:
        pub.stop.set()
        pub.join(10)
    assert pub.error is None, pub.error
    assert set(pub.confirmed) <= drain(own_broker, queue)


# -- breakers -----------------------------------------------------------------------------


def amqp_answers(host: str, port: int) -> bool:
    """Does the node answer the protocol header with Connection.Start (a method frame)?"""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"
    except OSError:
        return False


class Newcomer(threading.Thread):
    """A client that connects while the node is down and waits (--connect-timeout 20): connect,
    confirm one publish; records when it got through, or its error."""

    def __init__(self, proc, queue: str) -> None:
        super().__init__(daemon=True)
        self.proc, self.queue = proc, queue
        self.done_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = pika.BlockingConnection(params(self.proc.host, self.proc.port))
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish("", self.queue, b"newcomer", pika.BasicProperties(delivery_mode=2))
            self.done_at = time.monotonic()
            conn.close()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.error = exc


@pytest.mark.parametrize("outage", [3.0, 12.0])
def test_waiting_clients_get_in_within_a_second_of_the_nodes_return(own_broker, proxy_factory, outage):
    """One node, default breaker (5 failures open it for 5 s +- 20 %, doubling): stop_app for
    `outage` s. A connected confirm publisher (recovering) and a client that connects during
    the outage both wait; the breaker opens meanwhile, so every breaker is open. They get in
    within BACK_BOUND of the node answering again: the waiting dials probe the node every
    --breaker-probe-interval, whatever the open period, and the first probe that succeeds
    closes the breaker. The node sees no dial storm: at most one probe per interval."""
    proc = proxy_factory("--upstream", own_broker.upstream_url, "--connect-timeout", "20")
    queue = f"back-{uuid.uuid4().hex[:8]}"
    declare(own_broker, queue)
    pub = Publisher(proc, queue, pace=0.02)
    pub.start()
    newcomer = Newcomer(proc, queue)
    try:
        assert pub.ready.wait(10) and pub.error is None, pub.error
        assert wait_for(lambda: len(pub.confirmed) > 5, 10)
        attempts = metric(proc, "amqproxy_upstream_connect_attempts_total")
        own_broker.stop_app()
        down = time.monotonic()
        newcomer.start()
        opened = wait_for(lambda: proc.admin_json("/upstreams")["nodes"][0]["breaker"] == "open", 5)
        assert opened, proc.admin_json("/upstreams")["nodes"]
        time.sleep(max(0.0, down + outage - time.monotonic()))
        back: list[float] = []

        def poll() -> None:
            while not amqp_answers(own_broker.host, own_broker.port):
                time.sleep(0.02)
            back.append(time.monotonic())

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        own_broker.start_app()
        poller.join(30)
        assert back, "the node never answered"
        up = back[0]
        newcomer.join(BACK_BOUND + 10)
        assert newcomer.error is None, newcomer.error
        assert newcomer.done_at is not None
        resumed = wait_for(lambda: pub.confirmed_after(up), BACK_BOUND + 10)
        assert resumed, "the publisher never got a confirm after the node's return"
        assert pub.error is None, pub.error
        waits = {"recovering publisher": resumed - up, "newcomer": newcomer.done_at - up}
        print(f"outage {outage:g} s: back after {', '.join(f'{k} {v:.3f} s' for k, v in waits.items())}")
        assert all(w <= BACK_BOUND for w in waits.values()), {k: round(v, 3) for k, v in waits.items()}
        dialled = metric(proc, "amqproxy_upstream_connect_attempts_total") - attempts
        limit = 5 + (up - down) / PROBE_INTERVAL + 4  # the failures that open it, then one probe per interval
        assert dialled <= limit, f"{dialled:.0f} dials in {up - down:.1f} s (at most {limit:.0f})"
    finally:
        pub.stop.set()
        pub.join(10)
    drain(own_broker, queue)
