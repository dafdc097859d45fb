"""Broker nodes: circuit breakers, reconnect backoff, and the choice of node for a new connection.

Pure logic with an injectable clock and random source, so breaker and backoff behaviour is unit
tested without sockets. `NodeSet` is the pool's view of the upstream nodes.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .recent import FAILURE, RECOVERY, RecentEvents

log = logging.getLogger("amqproxy.nodes")


@dataclass(frozen=True)
class Node:
    """A broker node to dial. Credentials in the URL are ignored: clients' own are used upstream."""

    host: str
    port: int
    tls: bool
    # PROXY protocol header sent first on every connection to this node ("", "v1", "v2"):
    # needed when the broker's listener has proxy_protocol = true.
    proxy_protocol: str = ""

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"


CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"
BREAKER_STATES = (CLOSED, OPEN, HALF_OPEN)


@dataclass(frozen=True)
class BreakerPolicy:
    failures: int = 5  # consecutive failures that trip the breaker
    failure_ratio: float = 0.5  # ... or this share of failures over the window
    window: float = 30.0  # seconds
    min_requests: int = 10  # attempts in the window before the ratio counts
    open_time: float = 5.0  # first open period; doubles on each repeated trip
    open_time_max: float = 60.0
    jitter: float = 0.2  # +/- share of the open period
    # A request that already waits (a client held through an outage) may probe a failing node
    # this often, open period or not: the breaker then never keeps a waiting client out of a
    # node that is back, and the node still sees at most 1/probe_interval attempts a second.
    probe_interval: float = 0.25
    # A probe that has not reported within this long no longer blocks the next one.
    probe_timeout: float = 15.0


@dataclass(frozen=True)
class BackoffPolicy:
    initial: float = 0.1
    maximum: float = 10.0
    multiplier: float = 2.0

    def delays(self, rng: Callable[[], float] = random.random):
        """Exponential backoff with 'equal jitter': half fixed, half random, capped."""
        delay = self.initial
        while True:
            yield delay / 2 + rng() * delay / 2
            delay = min(self.maximum, delay * self.multiplier)


class CircuitBreaker:
    """closed -> open (after failures) -> half-open (after the open period; one probe) -> closed/open.

    The open period only keeps out *new* requests. A waiting request (one that already tried,
    or a recovery) is let through as a probe once per `probe_interval` whenever the node is
    failing (open, half-open, or closed after a failure), one probe at a time: the first probe
    after the node's return closes the breaker, so a waiting client is never kept out longer
    than a probe interval, and a dead node is never dialled faster than that."""

    def __init__(
        self,
        policy: BreakerPolicy,
        on_change: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.state = CLOSED
        self.consecutive_failures = 0
        self.trips = 0  # consecutive trips without a success: grows the open period
        self.open_until = 0.0
        self._probe_in_flight = False
        self._probe_started = float("-inf")
        self._events: deque[tuple[float, bool]] = deque()
        self._on_change = on_change
        self._clock = clock
        self._rng = rng

    def allows_attempt(self, waiting: bool = False) -> bool:
        """May a connection be tried now? A new request (`waiting` False): yes when closed; half-open
        lets exactly one probe through. A waiting request: yes when closed and healthy, else
        as a probe (see the class docstring)."""
        now = self._clock()
        if self.state == OPEN and now >= self.open_until:
            self._move(HALF_OPEN)
        if self.state == CLOSED and (not waiting or not self.consecutive_failures):
            return True
        if self._probe_in_flight and now - self._probe_started < self.policy.probe_timeout:
            return False
        if self.state == HALF_OPEN or (waiting and now - self._probe_started >= self.policy.probe_interval):
            self._probe_in_flight = True
            self._probe_started = now
            return True
        return False

    def probe_abandoned(self) -> None:
        """An attempt ended without a verdict on the node (its caller went away)."""
        self._probe_in_flight = False

    def record_success(self) -> None:
        self._record(True)
        self.consecutive_failures = 0
        self._probe_in_flight = False
        if self.state != CLOSED:
            self.trips = 0
            self._move(CLOSED)

    def record_failure(self, may_open: bool = True, trip: bool = False) -> None:
        """A transient failure. `may_open` is False when the open-breaker cap forbids a trip;
        `trip`: open now, whatever the counts (a node found silent: sure enough to send clients
        elsewhere at once). A failed probe of an open breaker keeps it open as it is."""
        self._record(False)
        self.consecutive_failures += 1
        self._probe_in_flight = False
        if self.state == HALF_OPEN:
            self._trip()
        elif self.state == CLOSED and may_open and (trip or self._should_trip()):
            self._trip()

    def _record(self, ok: bool) -> None:
        now = self._clock()
        self._events.append((now, ok))
        horizon = now - self.policy.window
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()

    def _should_trip(self) -> bool:
        if self.consecutive_failures >= self.policy.failures:
            return True
        if len(self._events) < self.policy.min_requests:
            return False
        failures = sum(1 for _, ok in self._events if not ok)
        return failures / len(self._events) >= self.policy.failure_ratio

    def _trip(self) -> None:
        policy = self.policy
        base = min(policy.open_time_max, policy.open_time * (2**self.trips))
        jitter = base * policy.jitter * (2 * self._rng() - 1)
        self.open_until = self._clock() + max(0.0, base + jitter)
        self.trips += 1
        self._move(OPEN)

    def _move(self, state: str) -> None:
        if state == self.state:
            return
        previous, self.state = self.state, state
        if self._on_change is not None:
            self._on_change(previous, state)


class NodeState:
    """What the pool knows of one broker node."""

    def __init__(self, node: Node, breaker: CircuitBreaker) -> None:
        self.node = node
        self.breaker = breaker
        self.connections = 0
        self.last_error = ""
        self.last_error_at: float | None = None
        self.last_success_at: float | None = None
        self.retired = False  # removed from the configuration: no new connections


class NodeSet:
    """The upstream nodes, their breakers, and the strategy that orders them for a new connection."""

    def __init__(
        self,
        nodes: list[Node],
        strategy: str,
        breaker_policy: BreakerPolicy,
        max_open_percent: float,
        on_breaker_change: Callable[[Node, str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        recent: RecentEvents | None = None,
    ) -> None:
        self.strategy = strategy
        self.recent = recent if recent is not None else RecentEvents()
        self.max_open_percent = max_open_percent
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_breaker_change = on_breaker_change
        self._breaker_policy = breaker_policy
        self._next = 0
        self.states: list[NodeState] = [self._make_state(node) for node in nodes]

    def _make_state(self, node: Node) -> NodeState:
        def changed(old: str, new: str, node: Node = node) -> None:
            log.warning(
                "circuit breaker state change",
                extra={"event": "breaker_state", "node": node.label, "from": old, "to": new},
            )
            if new == OPEN:
                self.recent.add(FAILURE, node.label, "circuit breaker opened: no new connections to this node for now")
            elif new == CLOSED:
                self.recent.add(RECOVERY, node.label, "circuit breaker closed: the node takes new connections again")
            if self._on_breaker_change is not None:
                self._on_breaker_change(node, old, new)

        return NodeState(node, CircuitBreaker(self._breaker_policy, changed, self._clock, self._rng.random))

    def reconfigure(
        self, nodes: list[Node], strategy: str, breaker_policy: BreakerPolicy, max_open_percent: float
    ) -> tuple[list[Node], list[Node]]:
        """Apply a reloaded node list and settings; returns (added, retired) nodes.

        Removed nodes are retired, not dropped: they take no new connections and their
        connections close once empty, so their clients are not cut off."""
        self.strategy = strategy
        self.max_open_percent = max_open_percent
        self._breaker_policy = breaker_policy
        for state in self.states:
            state.breaker.policy = breaker_policy
        known = {state.node: state for state in self.states}
        added = [node for node in nodes if node not in known]
        retired = [state.node for state in self.states if state.node not in nodes and not state.retired]
        for state in self.states:
            state.retired = state.node not in nodes
        self.states.extend(self._make_state(node) for node in added)
        return added, retired

    def state_of(self, node: Node) -> NodeState:
        for state in self.states:
            if state.node == node:
                return state
        raise KeyError(node.label)

    def candidates(self, waiting: bool = False) -> list[NodeState]:
        """Nodes to try for a connection, best first; nodes whose breaker is open are left out.

        `waiting`: the request already waits out a failure. Healthy nodes come alone when there
        are any (clients go to another node at once); only when none is left may it probe the
        failing ones, each at most once per probe interval (`CircuitBreaker.allows_attempt`)."""
        ordered = self._ordered()
        if not waiting:
            return [s for s in ordered if s.breaker.allows_attempt()]
        healthy = [s for s in ordered if s.breaker.state == CLOSED and not s.breaker.consecutive_failures]
        if healthy:
            return healthy
        return [s for s in ordered if s.breaker.allows_attempt(waiting=True)]

    def _ordered(self) -> list[NodeState]:
        live = [s for s in self.states if not s.retired]
        if not live:
            return []
        if self.strategy == "least-connections":
            ordered = sorted(live, key=lambda s: s.connections)
        elif self.strategy == "random":
            ordered = live[:]
            self._rng.shuffle(ordered)
        else:  # round-robin
            start = self._next % len(live)
            self._next += 1
            ordered = live[start:] + live[:start]
        return ordered

    def may_open_another(self) -> bool:
        """The cap on open breakers: never take every node out for lack of a better one."""
        live = [s for s in self.states if not s.retired]
        limit = max(1, int(len(live) * self.max_open_percent / 100))
        return sum(1 for s in live if s.breaker.state != CLOSED) < limit

    def record_failure(self, state: NodeState, error: str, trip: bool = False) -> None:
        self.recent.add(FAILURE, state.node.label, error)
        state.last_error = error
        state.last_error_at = self._clock()
        state.breaker.record_failure(may_open=state.breaker.state != CLOSED or self.may_open_another(), trip=trip)

    def record_success(self, state: NodeState) -> None:
        failures = state.breaker.consecutive_failures
        if failures and state.breaker.state == CLOSED:  # a closing breaker records its own recovery
            plural = "s" if failures > 1 else ""
            self.recent.add(
                RECOVERY, state.node.label, f"the node answers again after {failures} failed attempt{plural}"
            )
        state.last_success_at = self._clock()
        state.breaker.record_success()

    def all_open(self) -> bool:
        live = [s for s in self.states if not s.retired]
        return bool(live) and all(s.breaker.state == OPEN and self._clock() < s.breaker.open_until for s in live)

    def usable(self) -> bool:
        """At least one node a new connection could be tried on now (readiness)."""
        return any(not s.retired for s in self.states) and not self.all_open()
