"""One chaos scenario run: the topology, the fault window, and the invariants every scenario must keep.

Topology: workload clients -> amqproxy -> Toxiproxy route(s) -> an OwnBroker node (never the
shared broker). A run measures a baseline of the proxy (gauges, fds, greenlets) once it is
quiet, starts the workload, lets the scenario inject faults inside `fault()`, then `finish()`
checks, and counts, every invariant:

- no silent loss: every confirmed id is consumed (by the workload, or drained afterwards);
  no publish is left without an outcome the client saw;
- clear failure: no client call blocked longer than the bound;
- recovery: a new client gets a confirmed publish through within the bound after the fault
  cleared, throughput comes back to half its pre-fault level or more, breakers close;
- no leaks: client/channel/upstream gauges, fds and greenlets return to the baseline.

A violation fails the scenario; every run, passed or failed, adds a row to the summary."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import toxiproxy
import toxiproxy.exceptions

from chaos.report import ScenarioResult
from chaos.workload import Endpoint, Ledger, Workload, describe

# amqproxy.server.IDLE_HANDLER_NAME (tests/unit/test_handler_greenlets.py keeps them equal): the
# proxy runs as a black box here, possibly another checkout's.
IDLE_HANDLER_NAME = "client handler (idle)"

CONNECT_TIMEOUT = 3.0  # --connect-timeout
UPSTREAM_HEARTBEAT = 3  # --upstream-heartbeat: a silent upstream is dead after 2 x this
BACKOFF_MAX = 2.0  # --backoff-max
BREAKER_OPEN_MAX = 4.0  # --breaker-open-max
MARGIN = 8.0  # s added to every bound: a 2-core machine shared with other test runs
STALL_BOUND = max(CONNECT_TIMEOUT, 2 * UPSTREAM_HEARTBEAT) + MARGIN
RECOVERY_BOUND = BACKOFF_MAX + MARGIN
DRAIN_BOUND = 20.0  # s the consumers get to consume every confirmed message before they stop
QUIET_BOUND = 20.0  # s for the proxy's gauges to settle after the workload stopped
WARMUP = 3.0  # s of workload before the fault (the pre-fault throughput window)
RATE_WINDOW = 3.0  # s over which throughput is measured, before the fault and after recovery
THROUGHPUT_FLOOR = 0.5  # post-recovery throughput must reach this share of the pre-fault one

PROXY_ARGS = (
    "--connect-timeout",
    str(CONNECT_TIMEOUT),
    "--upstream-heartbeat",
    str(UPSTREAM_HEARTBEAT),
    "--idle-timeout",
    "1",
    "--backoff-initial",
    "0.1",
    "--backoff-max",
    str(BACKOFF_MAX),
    "--breaker-failures",
    "3",
    "--breaker-open-time",
    "1",
    "--breaker-open-max",
    str(BREAKER_OPEN_MAX),
)


class Toxi:
    """A toxiproxy-python client bound to one API URL (the library keeps it in class state)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.server = toxiproxy.Toxiproxy()
        self.server.update_api_consumer(host, int(port))

    def route(self, name: str, upstream: str) -> toxiproxy.Proxy:
        existing = self.server.get_proxy(name)
        if existing is not None:
            existing.destroy()
        return self.server.create(upstream=upstream, name=name, listen="127.0.0.1:0")


class ProxyProbe:
    """What the proxy process shows about itself: admin API, /proc."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self.base = f"http://{proxy.host}:{proxy.http_port}"

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.base + path, timeout=5) as resp:
            return resp.read()

    def totals(self) -> dict[str, int]:
        return json.loads(self.get("/stats"))["totals"]

    def upstreams(self) -> dict[str, Any]:
        return json.loads(self.get("/upstreams"))

    def breakers(self) -> dict[str, str]:
        return {n["node"]: n["breaker"] for n in self.upstreams()["nodes"]}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample over the series matching the given labels."""
        total = 0.0
        for line in self.get("/metrics").decode().splitlines():
            m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proxy.pid}/fd"))

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proxy.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))  # type: ignore[union-attr]

    def greenlets(self) -> int:
        """Live greenlets (finished ones still listed are garbage awaiting collection), but for
        the handler greenlets that wait for the next client (a bounded pool, not a leak)."""
        dump = self.get("/debug/greenlets").decode(errors="replace")
        return sum(
            1
            for line in dump.splitlines()
            if "+--- <Greenlet" in line and not line.endswith("; finished") and IDLE_HANDLER_NAME not in line
        )

    def snapshot(self) -> dict[str, int]:
        totals = self.totals()
        return {
            "clients": totals["clients"] + totals["handshaking_clients"],
            "client_channels": totals["client_channels"],
            "upstream_connections": totals["upstream_connections"],
            "upstream_channels": totals["upstream_channels"],
            "fds": self.fds(),
            "greenlets": self.greenlets(),
        }


def confirmed_roundtrip(host: str, port: int, timeout: float = 30) -> None:
    """A new client: connect, publish with confirm to its own queue, get the message back."""
    params = pika.ConnectionParameters(
        host=host, port=port, socket_timeout=timeout, stack_timeout=timeout, connection_attempts=1
    )
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        queue = ch.queue_declare("", exclusive=True).method.queue
        ch.confirm_delivery()
        ch.basic_publish("", queue, b"probe")
        if ch.basic_get(queue, auto_ack=True)[2] != b"probe":
            raise AssertionError("probe message not returned")
    finally:
        if conn.is_open:
            conn.close()


def drain(ch: Any, queue: str) -> list[str]:
    """Every message left in `queue`, taken off it (auto-ack), as text."""
    bodies = []
    while True:
        method, _props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body.decode())


class ChaosRun:
    """A scenario's run; see the module docstring."""

    def __init__(
        self,
        scenario: str,
        toxi: Toxi,
        broker: Any,
        proxy_factory: Any,
        results: list[ScenarioResult],
        nodes: int = 1,
        proxy_args: tuple[str, ...] = (),
        publishers: int = 2,
        consumers: int = 2,
        consumer_delay: float = 0.0,
        upstream_failure: str = "close",
        reconnect: bool = True,
    ) -> None:
        """`upstream_failure`: the proxy's --upstream-failure mode (close: clients get 320 and
        reconnect; recover: the proxy recovers their channels). `reconnect` False: the workload
        clients have no recovery of their own, so any error ends them."""
        self.result = ScenarioResult(scenario, faults=[])
        results.append(self.result)
        self.toxi = toxi
        self.broker = broker
        slug = re.sub(r"\W+", "-", scenario).strip("-")[:40]
        self.routes = [toxi.route(f"chaos-{slug}-node{i}", f"{broker.host}:{broker.port}") for i in range(nodes)]
        upstreams = [a for r in self.routes for a in ("--upstream", f"amqp://{r.listen}")]
        try:
            self.proxy = proxy_factory(*PROXY_ARGS, "--upstream-failure", upstream_failure, *upstreams, *proxy_args)
        except BaseException as exc:
            self.result.violations.append(f"the proxy did not start: {exc!r}"[:300])
            raise
        self.probe = ProxyProbe(self.proxy)
        self.queue = f"chaos-{slug}-{uuid.uuid4().hex[:8]}"
        self.endpoint = Endpoint(self.proxy.host, self.proxy.port, self.queue)
        self.workload = Workload(self.endpoint, publishers, consumers, consumer_delay, reconnect)
        self.reconnect = reconnect
        self.ledger: Ledger = self.workload.ledger
        self.finished = self.closed = False
        self.fault_at: float | None = None
        self.cleared_at: float | None = None
        self._longest_seen = (0.0, "")  # longest call in progress seen by the watcher
        self._watch_stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    # -- phases -------------------------------------------------------------
    def start(self) -> ChaosRun:
        self.started = time.monotonic()
        with self.direct() as ch:
            ch.queue_declare(self.queue, durable=True)
        confirmed_roundtrip(self.proxy.host, self.proxy.port)
        self.baseline = self._quiet(lambda snap: snap["upstream_connections"] == 0)
        self.workload.start()
        self._watcher.start()
        time.sleep(WARMUP)
        return self

    @contextlib.contextmanager
    def fault(self, label: str) -> Iterator[None]:
        """The fault window: the body injects the fault and returns once it is cleared."""
        self.result.faults.append(label)
        if self.fault_at is None:
            self.fault_at = time.monotonic()
        yield
        self.cleared_at = time.monotonic()

    def violation(self, text: str) -> None:
        self.result.violations.append(text)

    def expect(self, condition: bool, text: str) -> None:
        if not condition:
            self.violation(text)

    def new_client_refused(self, bound: float = CONNECT_TIMEOUT + MARGIN) -> tuple[str, int | None, str]:
        """During an outage: a new client must fail cleanly (Close or TCP close) within `bound`."""
        started = time.monotonic()
        try:
            confirmed_roundtrip(self.proxy.host, self.proxy.port)
        except (pika.exceptions.AMQPError, OSError) as e:
            took = time.monotonic() - started
            self.expect(took <= bound, f"new client refused only after {took:.1f}s (bound {bound:.0f}s)")
            return describe(e)
        self.violation("a new client got through during the outage")
        return ("none", None, "")

    def detected(self, since: float, bound: float, reasons: tuple[str, ...] = ("silence_timeout",)) -> float | None:
        """Seconds from `since` until the proxy ended an upstream for one of `reasons` (polled
        every 0.1 s; recorded as the scenario's detection time), None if not within `bound`."""
        before = sum(self.probe.metric("amqproxy_upstream_connections_closed_total", reason=r) for r in reasons)
        deadline = since + bound
        while time.monotonic() < deadline:
            now = sum(self.probe.metric("amqproxy_upstream_connections_closed_total", reason=r) for r in reasons)
            if now > before:
                self.result.detection = time.monotonic() - since
                return self.result.detection
            time.sleep(0.1)
        return None

    def finish(
        self,
        client_errors: bool | None = True,
        stall_bound: float | None = STALL_BOUND,
        tolerated: tuple[str, ...] = (),
    ) -> None:
        """Check every invariant; `client_errors` True: the fault must have reached the clients,
        False: none may have seen an error (but those of a `tolerated` kind, e.g. "nack"), None:
        either. `stall_bound` None: blocking calls may last (a memory alarm blocks publishers
        by design)."""
        result, ledger = self.result, self.ledger
        assert self.fault_at is not None and self.cleared_at is not None, "no fault() window"
        self.finished = True
        self._check_recovery()
        # Clients without recovery of their own (recover mode): every confirmed message must
        # reach a running consumer, so consumers drain before they stop.
        stuck = self.workload.stop(timeout=STALL_BOUND + 5, drain=0.0 if self.reconnect else DRAIN_BOUND)
        self.expect(not stuck, f"clients still blocked at the end: {stuck}")
        self._watch_stop.set()
        self._watcher.join()
        self._check_quiet()
        self._check_messages()

        errors = ledger.errors
        result.client_errors = len(errors)
        if client_errors is True:
            self.expect(bool(errors), "the fault never reached a client (no error seen)")
        elif client_errors is False:
            untolerated = [e for e in errors if e.kind not in tolerated]
            self.expect(not untolerated, f"clients saw errors: {untolerated[:3]}")
        for e in errors:  # the proxy ends clients with 320 or a TCP close, never another code
            self.expect(e.kind != "close" or e.code == 320, f"unexpected client error {e}")
        result.longest_stall = max(ledger.longest_stall[0], self._longest_seen[0])
        if stall_bound is not None:
            self.expect(
                result.longest_stall <= stall_bound,
                f"a client call blocked {result.longest_stall:.1f}s (bound {stall_bound:.0f}s): "
                f"{max(ledger.longest_stall, self._longest_seen)[1]}",
            )
        result.duration = time.monotonic() - self.started
        self.close()
        assert not result.violations, f"{result.scenario}: " + "; ".join(result.violations)

    def close(self) -> None:
        """Tear down (also after a scenario that failed before `finish`): clients, routes, queue."""
        if self.closed:
            return
        self.closed = True
        if not self.finished:
            self.violation("aborted before finish(): see the test's failure")
        self.workload.stop(timeout=5)
        self._watch_stop.set()
        for route in self.routes:
            with contextlib.suppress(toxiproxy.exceptions.NotFound):
                route.destroy()
        with contextlib.suppress(pika.exceptions.AMQPError, OSError), self.direct() as ch:
            ch.queue_delete(self.queue)

    # -- invariants ---------------------------------------------------------
    def _watch(self) -> None:
        """Sample calls in progress, so a client hung until the end still counts."""
        while not self._watch_stop.wait(0.2):
            self._longest_seen = max(self._longest_seen, self.ledger.stall_now())

    def _check_recovery(self) -> None:
        assert self.fault_at is not None and self.cleared_at is not None
        deadline = self.cleared_at + RECOVERY_BOUND
        while True:
            try:
                confirmed_roundtrip(self.proxy.host, self.proxy.port)
                self.result.recovery = time.monotonic() - self.cleared_at
                break
            except (pika.exceptions.AMQPError, OSError) as e:
                if time.monotonic() > deadline:
                    self.violation(
                        f"no new client got through within {RECOVERY_BOUND:.0f}s of the fault clearing: {e!r}"
                    )
                    break
                time.sleep(0.2)

        deadline = time.monotonic() + BREAKER_OPEN_MAX + MARGIN
        while any(state != "closed" for state in self.probe.breakers().values()):
            if time.monotonic() > deadline:
                self.violation(f"breakers not closed again: {self.probe.breakers()}")
                break
            time.sleep(0.2)

        # Throughput must come back within the recovery bound: the best 3 s window after the
        # workload's own clients confirm again (they reconnect on their own schedule, and a
        # backlog built during the fault may take a moment to drain).
        before = self.ledger.confirmed_between(self.fault_at - RATE_WINDOW, self.fault_at) / RATE_WINDOW
        deadline = time.monotonic() + RECOVERY_BOUND + RATE_WINDOW
        best = 0.0
        while best < THROUGHPUT_FLOOR * before and time.monotonic() < deadline:
            time.sleep(0.5)
            now = time.monotonic()
            if now - RATE_WINDOW >= self.cleared_at:  # windows after the fault only
                best = max(best, self.ledger.confirmed_between(now - RATE_WINDOW, now) / RATE_WINDOW)
        self.expect(
            best >= THROUGHPUT_FLOOR * before,
            f"throughput after recovery at most {best:.0f}/s < {THROUGHPUT_FLOOR:.0%} of {before:.0f}/s before the fault",
        )

    def _quiet(self, ready: Any) -> dict[str, int]:
        """The proxy's snapshot once no client is left and `ready(snapshot)` holds."""
        deadline = time.monotonic() + QUIET_BOUND
        while True:
            snap = self.probe.snapshot()
            if snap["clients"] == 0 and snap["client_channels"] == 0 and ready(snap):
                return snap
            if time.monotonic() > deadline:
                return snap
            time.sleep(0.2)

    def _check_quiet(self) -> None:
        base = self.baseline
        snap = self._quiet(lambda s: all(s[k] <= base[k] for k in base))
        leaked = {k: (base[k], snap[k]) for k in base if snap[k] > base[k]}
        self.expect(not leaked, f"not back to baseline after {QUIET_BOUND:.0f}s (baseline, now): {leaked}")

    def _check_messages(self) -> None:
        ledger, result = self.ledger, self.result
        stranded: set[str] = set()  # confirmed, yet left in the queue after the consumers drained
        with self.direct() as ch:  # what the workload left in the queue
            for message_id in drain(ch, self.queue):
                if message_id not in ledger.consumed:
                    stranded.add(message_id)
                ledger.consume(message_id)
        confirmed = {m for m, o in ledger.outcome.items() if o == "confirmed"}
        pending = [m for m, o in ledger.outcome.items() if o == "pending"]
        unsettled = [m for m, o in ledger.outcome.items() if o in ("failed", "nacked")]
        lost = confirmed - ledger.consumed
        result.published = ledger.attempts
        result.confirmed = len(confirmed)
        result.consumed = len(confirmed & ledger.consumed)
        result.lost = len(lost)
        self.expect(result.confirmed > 0, "nothing was confirmed")
        if lost:
            # Where each lost id sits: when it was confirmed relative to the fault, and the
            # outcome of its publisher's previous id (a confirm right before the loss points at
            # the broker side, one after the recovery at the proxy's renumbering).
            assert self.fault_at is not None
            where = [
                f"{m} confirmed at fault{ledger.confirmed_at.get(m, float('nan')) - self.fault_at:+.2f}s"
                for m in sorted(lost)[:5]
            ]
            self.violation(f"{len(lost)} confirmed messages never consumed: {'; '.join(where)}")
        stranded &= confirmed
        if stranded and not self.reconnect:
            # The consumers ran until the end and drained: a confirmed message they were never
            # given (held unacked on a consumer's channel, or left behind a dropped delivery).
            self.violation(f"{len(stranded)} confirmed messages reached no consumer, e.g. {sorted(stranded)[:5]}")
        self.expect(not pending, f"{len(pending)} publishes without an outcome the client saw: {pending[:5]}")
        numbering = ledger.numbering_errors
        self.expect(not numbering, f"{len(numbering)} confirms or delivery tags out of sequence: {numbering[:3]}")
        # A failed publish is published again after reconnecting; only the last ones of a
        # stopping publisher may stay unconfirmed (one per publisher at most).
        self.expect(len(unsettled) <= len(self.workload.clients), f"{len(unsettled)} publishes never confirmed")

    # -- helpers ------------------------------------------------------------
    @contextlib.contextmanager
    def direct(self) -> Iterator[Any]:
        """A channel on the broker node itself (not through the proxy or Toxiproxy)."""
        conn = pika.BlockingConnection(
            pika.ConnectionParameters(host=self.broker.host, port=self.broker.port, connection_attempts=3)
        )
        try:
            yield conn.channel()
        finally:
            if conn.is_open:
                conn.close()
