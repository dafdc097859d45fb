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

from .config import Node
from .recent import FAILURE, RECOVERY, RecentEvents

log = logging.getLogger("amqproxy.nodes")

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
    """closed -> open (after failures) -> half-open (after the open period; one probe) -> closed/open."""

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
        self._events: deque[tuple[float, bool]] = deque()
        self._on_change = on_change
        self._clock = clock
        self._rng = rng

    def allows_attempt(self) -> bool:
        """May a new connection be tried now? Half-open lets exactly one probe through."""
        if self.state == OPEN and self._clock() >= self.open_until:
            self._move(HALF_OPEN)
        if self.state == CLOSED:
            return True
        if self.state == HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._record(True)
        self.consecutive_failures = 0
        if self.state != CLOSED:
            self.trips = 0
            self._probe_in_flight = False
            self._move(CLOSED)

    def record_failure(self, may_open: bool = True) -> None:
        """A transient failure. `may_open` is False when the open-breaker cap forbids a trip."""
        self._record(False)
        self.consecutive_failures += 1
        if self.state == HALF_OPEN:
            self._probe_in_flight = False
            self._trip()
        elif self.state == CLOSED and may_open and self._should_trip():
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

    def candidates(self) -> list[NodeState]:
        """Nodes to try for a new connection, best first; nodes whose breaker is open are left out."""
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
        return [s for s in ordered if s.breaker.allows_attempt()]

    def may_open_another(self) -> bool:
        """The cap on open breakers: never take every node out for lack of a better one."""
        live = [s for s in self.states if not s.retired]
        limit = max(1, int(len(live) * self.max_open_percent / 100))
        return sum(1 for s in live if s.breaker.state != CLOSED) < limit

    def record_failure(self, state: NodeState, error: str) -> None:
        self.recent.add(FAILURE, state.node.label, error)
        state.last_error = error
        state.last_error_at = self._clock()
        state.breaker.record_failure(may_open=state.breaker.state != CLOSED or self.may_open_another())

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
