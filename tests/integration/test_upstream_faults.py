"""Faults of the broker node under the proxy, on a RabbitMQ node of the module's own
(`own_broker`; the shared broker is never stopped, killed or paused).

With `--upstream-failure close` (the recovery mode has tests of its own, test_recovery.py), an
upstream connection that dies must close the clients with channels on it with
320 CONNECTION_FORCED and a text naming the cause, within a few seconds -- never leave them
hanging -- and once the node is back, new clients through the same proxy must work (the proxy
dials a new upstream connection). While the node is down, a client connecting through the
proxy is refused with 320 naming the upstream problem, within --connect-timeout.

The watched clients use their channels (publish, consume, declare), so that each channel
really lives on an upstream connection whatever the proxy's placement policy.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import amqp
import amqp.exceptions
import pamqp.commands as C
import pika
import pika.exceptions
import pytest

from ._support import RawAMQP

pytestmark = [pytest.mark.integration, pytest.mark.proxy_only]

FAULT_BOUND = 5.0  # s: clients must see their connection end within this after the fault
RECOVERY_BOUND = 10.0  # s: once the node is back, a new client must get through within this
# The node's breaker opens during each outage and its open period doubles when a probe fails (a
# node still booting fails it): 5 s, then 10 s +/- 20 %, past RECOVERY_BOUND. Capped at 4 s
# (4.8 s with jitter), a new client gets through within the bound however the probes fall.
BREAKER = ("--breaker-open-max", "4")
CONNECT_TIMEOUT = 3  # --connect-timeout of the proxies that see the node down
REFUSAL_MARGIN = 2.0
POLL = 0.02
PROXIED = ("pika-publisher", "pika-consumer", "py-amqp", "raw")


@dataclass
class Outcome:
    """How a client's connection ended: kind 'close' (Connection.Close received, with code and
    text), 'tcp' (socket closed without a Close) or 'none' (still open at the deadline)."""

    kind: str
    code: int | None = None
    text: str = ""
    after: float = 0.0  # seconds since the fault

    def __repr__(self):
        return f"<{self.kind} {self.code} {self.text!r} after {self.after:.2f}s>"


class Watched:
    """Clients with a channel in use, each polled until its connection ends."""

    def __init__(self):
        self.polls: dict[str, object] = {}
        self.closers: list = []

    def pika(self, name: str, target, role: str = "declare") -> None:
        conn = target.pika()
        self.closers.append(conn.close)
        ch = conn.channel()
        if role == "publish":
            ch.confirm_delivery()
            ch.basic_publish("", "amqproxy-test-nowhere", b"routed nowhere")
        else:
            queue = ch.queue_declare("", exclusive=True).method.queue
            if role == "consume":
                ch.basic_consume(queue, lambda *args: None)

        def poll():
            try:
                conn.process_data_events(time_limit=POLL)
            except pika.exceptions.ConnectionClosedByBroker as e:
                return "close", e.reply_code, e.reply_text
            except pika.exceptions.AMQPConnectionError as e:  # StreamLostError: no Close
                return "tcp", None, repr(e)
            return None

        self.polls[name] = poll

    def amqp(self, name: str, target) -> None:
        conn = target.amqp()
        self.closers.append(conn.collect)
        conn.channel().queue_declare("", exclusive=True)

        def poll():
            try:
                conn.drain_events(timeout=POLL)
            except TimeoutError:
                return None
            except amqp.exceptions.AMQPError as e:
                return "close", e.reply_code, e.reply_text
            except (OSError, amqp.exceptions.RecoverableConnectionError) as e:
                return "tcp", None, repr(e)
            return None

        self.polls[name] = poll

    def raw(self, name: str, target) -> None:
        raw = RawAMQP(target.host, target.port)
        self.closers.append(raw.close)
        _start, _tune, reply = raw.handshake()
        assert isinstance(reply, C.Connection.OpenOk), reply
        raw.send(C.Channel.Open(), 1)
        raw.expect(C.Channel.OpenOk, 1)
        raw.send(C.Queue.Declare(queue="", exclusive=True), 1)
        raw.expect(C.Queue.DeclareOk, 1)

        def poll():
            raw.sock.settimeout(POLL)
            try:
                _ch, frame = raw.recv_frame()
            except TimeoutError:
                return None
            except (EOFError, OSError) as e:
                return "tcp", None, repr(e)
            if isinstance(frame, C.Connection.Close):
                try:
                    raw.send(C.Connection.CloseOk())
                except OSError:
                    pass
                return "close", frame.reply_code, frame.reply_text
            return None  # anything else (a heartbeat) leaves it open

        self.polls[name] = poll

    def proxied(self, target) -> None:
        """A publishing and a consuming pika client, a py-amqp and a raw pamqp client."""
        self.pika("pika-publisher", target, role="publish")
        self.pika("pika-consumer", target, role="consume")
        self.amqp("py-amqp", target)
        self.raw("raw", target)

    def await_all(self, since: float, timeout: float = FAULT_BOUND + 5) -> dict[str, Outcome]:
        """Poll every client until each connection ended, or `timeout` after `since`."""
        results: dict[str, Outcome] = {}
        pending = dict(self.polls)
        while pending and time.monotonic() - since < timeout:
            for name, poll in list(pending.items()):
                got = poll()
                if got is not None:
                    results[name] = Outcome(*got, after=time.monotonic() - since)
                    del pending[name]
        for name in pending:
            results[name] = Outcome("none", after=time.monotonic() - since)
        return results

    def close(self) -> None:
        for close in self.closers:
            try:
                close()
            except Exception:
                pass


@pytest.fixture
def watched():
    w = Watched()
    yield w
    w.close()


def _assert_forced_320(outcomes: dict[str, Outcome], *fragments: str, bound: float = FAULT_BOUND) -> None:
    for name in PROXIED:
        out = outcomes[name]
        assert out.kind == "close" and out.code == 320, f"{name}: {out!r} (all: {outcomes})"
        assert out.text.startswith("CONNECTION_FORCED - upstream connection lost: "), f"{name}: {out!r}"
        for fragment in fragments:
            assert fragment in out.text, f"{name}: {fragment!r} not in {out.text!r}"
        assert out.after < bound, f"{name}: closed only after {out.after:.2f}s (all: {outcomes})"


def _roundtrip(target, body: bytes = b"after recovery") -> None:
    conn = target.pika()
    try:
        ch = conn.channel()
        queue = ch.queue_declare("", exclusive=True).method.queue
        ch.confirm_delivery()
        ch.basic_publish("", queue, body)
        assert ch.basic_get(queue, auto_ack=True)[2] == body
    finally:
        if conn.is_open:
            conn.close()


def _recovers(target, within: float = RECOVERY_BOUND) -> float:
    """A new client through the proxy works again (retried within the bound); returns how long
    it took to get through."""
    started = time.monotonic()
    while True:
        try:
            _roundtrip(target)
            return time.monotonic() - started
        except pika.exceptions.AMQPConnectionError as e:
            if time.monotonic() - started > within:
                raise AssertionError(f"no new client got through within {within}s after recovery: {e!r}") from e
            time.sleep(0.2)


def _refusals(target, budget: float, clients=("pika", "py-amqp", "raw")) -> dict[str, tuple]:
    """Connect the given clients (pika, py-amqp, raw; one after the other) while the node is
    down: what each observes, and how long its refusal took (each must take less than `budget`)."""
    seen = {}
    if "pika" in clients:
        started = time.monotonic()
        with pytest.raises(pika.exceptions.AMQPConnectionError) as err:
            target.pika()
        seen["pika"] = (type(err.value).__name__, str(err.value), time.monotonic() - started)

    if "py-amqp" in clients:
        started = time.monotonic()
        with pytest.raises(amqp.exceptions.ConnectionForced) as err:
            target.amqp()
        e = err.value
        seen["py-amqp"] = (e.reply_code, e.reply_text, e.method_name, time.monotonic() - started)

    started = time.monotonic()
    with RawAMQP(target.host, target.port, timeout=budget + 5) as raw:
        _start, tune, reply = raw.handshake()
        assert tune is None, f"raw client got Tune while the node is down: {tune!r}"
        assert isinstance(reply, C.Connection.Close), reply
        seen["raw"] = (
            reply.reply_code,
            reply.reply_text,
            (reply.class_id, reply.method_id),
            time.monotonic() - started,
        )
    for name, observed in seen.items():
        assert observed[-1] < budget, f"{name} refused only after {observed[-1]:.2f}s: {seen}"
    return seen


def _assert_refused_with_320(seen: dict[str, tuple]) -> None:
    """pika calls any close during its login stage ProbableAuthenticationError; the close itself
    is Connection.Close 320 naming the upstream problem, answering Start-Ok (class 10 method 11)."""
    prefix = "CONNECTION_FORCED - upstream unavailable: "
    code, text, method, _ = seen["raw"]
    assert (code, method) == (320, (10, 11)) and text.startswith(prefix) and text != prefix, seen
    if "py-amqp" in seen:
        code, text, method, _ = seen["py-amqp"]
        assert (code, method) == (320, "Connection.start_ok") and text.startswith(prefix) and text != prefix, seen
    assert seen["pika"][0] == "ProbableAuthenticationError", seen
    assert seen["pika"][1][: len("ConnectionClosedByBroker: (320) '")] in (
        "ConnectionClosedByBroker: (320) '",
        'ConnectionClosedByBroker: (320) "',  # pika's repr() quoting of a text with a quote in it
    ), seen
    assert seen["pika"][1][len("ConnectionClosedByBroker: (320) '") :].startswith(prefix), seen


# --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_stop_app_closes_clients_with_320_then_new_clients_work(own_broker, proxy_factory, watched):
    """rabbitmqctl stop_app: the broker closes every connection with 320 "broker forced
    connection closure with reason 'shutdown'"; each proxied client with a channel in use gets
    320 naming that, like a direct client; after start_app a new client through the same proxy
    works (over a newly dialled upstream connection)."""
    proc = proxy_factory("--upstream", own_broker.upstream_url, "--upstream-failure", "close", *BREAKER)
    watched.proxied(proc.target())
    watched.pika("direct", own_broker.target())

    started = time.monotonic()
    own_broker.stop_app()
    outcomes = watched.await_all(started)

    broker_text = "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
    direct = outcomes["direct"]
    assert (direct.kind, direct.code, direct.text) == ("close", 320, broker_text), outcomes
    _assert_forced_320(outcomes, broker_text)

    own_broker.start_app()
    _recovers(proc.target())


@pytest.mark.timeout(90)
def test_kill9_closes_clients_with_320_and_refuses_new_ones_until_restart(own_broker, proxy_factory, watched):
    """kill -9 of the node: a direct client just loses its socket; each proxied client with a
    channel in use gets 320 naming the lost upstream, within the bound. While the node is dead a
    new client is refused with 320 within --connect-timeout; after the restart new clients work."""
    proc = proxy_factory(
        "--upstream",
        own_broker.upstream_url,
        "--connect-timeout",
        str(CONNECT_TIMEOUT),
        "--upstream-failure",
        "close",
        *BREAKER,
    )
    watched.proxied(proc.target())
    watched.pika("direct", own_broker.target())

    started = time.monotonic()
    own_broker.kill9()
    outcomes = watched.await_all(started)

    assert outcomes["direct"].kind == "tcp" and outcomes["direct"].after < FAULT_BOUND, outcomes
    _assert_forced_320(outcomes, f"127.0.0.1:{own_broker.port}")

    _assert_refused_with_320(_refusals(proc.target(), budget=CONNECT_TIMEOUT + REFUSAL_MARGIN))

    own_broker.restart()
    _recovers(proc.target())


@pytest.mark.timeout(60)
def test_hung_node_is_detected_by_missed_upstream_heartbeats(own_broker, proxy_factory, watched):
    """SIGSTOP of the node (its sockets stay open, nothing answers): with --upstream-heartbeat 2
    the proxy gives up on the upstream after 2 x 2 s without a frame and closes each client with
    a channel on it with 320 "missed heartbeats" (< 10 s); after SIGCONT new clients work."""
    proc = proxy_factory(
        "--upstream", own_broker.upstream_url, "--upstream-heartbeat", "2", "--upstream-failure", "close", *BREAKER
    )
    watched.proxied(proc.target())
    try:
        started = time.monotonic()
        own_broker.pause()
        outcomes = watched.await_all(started, timeout=15)
    finally:
        own_broker.resume()

    _assert_forced_320(outcomes, "missed heartbeats", bound=10)
    _recovers(proc.target())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("outage", ["app stopped", "node paused"])
def test_new_client_is_refused_quickly_while_the_node_is_down(own_broker, proxy_factory, outage):
    """With --connect-timeout 3 and the node down (app stopped: the port refuses; paused: TCP
    is accepted by the kernel but the node never speaks), a client connecting through the proxy
    gets the AMQP Connection.Start and then, in place of Connection.Tune, Connection.Close 320
    "CONNECTION_FORCED - upstream unavailable: <cause>", within --connect-timeout + margin.
    After recovery, new clients work."""
    proc = proxy_factory("--upstream", own_broker.upstream_url, "--connect-timeout", str(CONNECT_TIMEOUT), *BREAKER)
    try:
        if outage == "app stopped":
            _roundtrip(proc.target())  # a pooled upstream exists; the broker closes it on stop_app
            own_broker.stop_app()
            seen = _refusals(proc.target(), budget=CONNECT_TIMEOUT + REFUSAL_MARGIN)
        else:
            own_broker.pause()
            # each refusal takes --connect-timeout here: py-amqp (same as pika) is left out
            seen = _refusals(proc.target(), budget=CONNECT_TIMEOUT + REFUSAL_MARGIN, clients=("pika", "raw"))
    finally:
        own_broker.ensure_healthy()
    _assert_refused_with_320(seen)
    _recovers(proc.target())


@pytest.mark.timeout(60)
def test_concurrent_clients_are_each_refused_within_connect_timeout(own_broker, proxy_factory):
    """Three clients connecting at once while the node hangs (paused) are each refused with 320
    within --connect-timeout + margin -- not one after the other, the last after 3 x
    --connect-timeout (a burst of short-lived clients is exactly what the proxy is for)."""
    proc = proxy_factory("--upstream", own_broker.upstream_url, "--connect-timeout", str(CONNECT_TIMEOUT), *BREAKER)
    target = proc.target()
    seen: dict[int, tuple] = {}

    def connect(i: int) -> None:
        started = time.monotonic()
        try:
            with RawAMQP(target.host, target.port, timeout=30) as raw:
                _start, _tune, reply = raw.handshake()
                seen[i] = (type(reply).__name__, getattr(reply, "reply_code", None), time.monotonic() - started)
        except Exception as e:
            seen[i] = (repr(e), None, time.monotonic() - started)

    threads = [threading.Thread(target=connect, args=(i,), daemon=True) for i in range(3)]
    try:
        own_broker.pause()
        for t in threads:
            t.start()
        for t in threads:
            t.join(3 * CONNECT_TIMEOUT + 10)
    finally:
        own_broker.resume()
    assert len(seen) == 3, seen
    assert all(kind == "Close" and code == 320 for kind, code, _ in seen.values()), seen
    took = sorted(round(after, 2) for _, _, after in seen.values())
    assert took[-1] < CONNECT_TIMEOUT + REFUSAL_MARGIN, f"refusal times {took} (connect timeout {CONNECT_TIMEOUT}s)"
    _recovers(target)


@pytest.mark.timeout(60)
def test_new_client_is_not_left_hanging_on_a_stale_pooled_upstream(own_broker, proxy_factory):
    """The node hangs (paused) while the proxy holds an idle pooled upstream connection to it
    (used a moment ago, so nothing looks wrong yet). A new client must still get a clear answer
    within --connect-timeout + margin -- refused, or closed with 320 at its first channel
    operation -- and not sit on the hung upstream until missed heartbeats (2 x 30 s by default)
    end it: client libraries rarely bound a channel RPC (pika's BlockingChannel does not), so
    the client's own connect timeout, which would have protected it directly, never fires.

    With --upstream-check-interval 0 every new channel's channel.open is a round trip first, so
    the hung node is found at the client's first channel operation. (By default a connection
    heard from within 10 s pipelines it, and the silence watchdog ends the hung connection
    within --upstream-silence-timeout instead: test_silence.)"""
    proc = proxy_factory(
        "--upstream",
        own_broker.upstream_url,
        "--connect-timeout",
        str(CONNECT_TIMEOUT),
        "--upstream-check-interval",
        "0",
        *BREAKER,
    )
    target = proc.target()
    _roundtrip(target)  # leaves an idle pooled upstream connection
    budget = CONNECT_TIMEOUT + REFUSAL_MARGIN
    steps: list[str] = []
    try:
        own_broker.pause()
        started = time.monotonic()
        with RawAMQP(target.host, target.port, timeout=budget) as raw:
            try:
                _start, _tune, reply = raw.handshake()
                steps.append(type(reply).__name__)
                if isinstance(reply, C.Connection.OpenOk):
                    raw.sock.settimeout(max(0.1, budget - (time.monotonic() - started)))
                    raw.send(C.Channel.Open(), 1)
                    raw.send(C.Queue.Declare(queue="", exclusive=True), 1)
                    while not isinstance(reply, C.Connection.Close):
                        _ch, reply = raw.recv_frame()
                        steps.append(type(reply).__name__)
            except TimeoutError:
                steps.append(f"no answer within {budget}s")
            except (EOFError, OSError) as e:
                steps.append(f"socket closed: {e!r}")
        took = time.monotonic() - started
    finally:
        own_broker.resume()
    assert steps[-1] == "Close" and reply.reply_code == 320, f"{steps} after {took:.2f}s"
    assert took < budget, f"{steps} after {took:.2f}s"
    _recovers(target)
