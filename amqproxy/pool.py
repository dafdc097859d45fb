"""Pool: upstream connections keyed by credential set (user, password, vhost), over several nodes.

Channels of different clients share upstream connections; upstream *channels* are never shared
or reused across clients (their state -- confirms, qos, consumers, tx -- makes reuse unsafe).

Placement: a channel's role (publishing or consuming) is known at its first method; with
--separate-publishers, publishing and consuming channels go to different connections, because
RabbitMQ applies flow control per connection. Among the connections that fit, --channel-placement
fills one first or spreads by fewest channels; a client's channels of one role stay on the
connection its earlier ones use while it has room.

Dialling: new connections go to nodes ordered by --node-strategy, skipping nodes whose circuit
breaker is open; transient failures are retried with exponential backoff and jitter until the
caller's deadline; permanent ones (403, unknown vhost) fail at once. Dialling is serialised per
key, so a burst of clients does not open a burst of connections.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import gevent
from gevent.event import AsyncResult

from .channel import ClientLeg
from .exclusive import ExclusiveQueues
from .nodes import OPEN, BackoffPolicy, BreakerPolicy, NodeSet
from .protocol.handshake import Credentials
from .protocol.rules import Role
from .upstream import Upstream
from .upstream_handshake import UpstreamError, UpstreamState

if TYPE_CHECKING:
    from .channel import Link
    from .config import Config
    from .metrics import Metrics
    from .nodes import Node

log = logging.getLogger("amqproxy.pool")

# How long a logged-in upstream waits for its client's Connection.Open; RabbitMQ's own
# handshake_timeout is 10 s, so a held connection older than this is no longer worth opening.
HELD_TTL = 5.0
# The round trip that verifies a connection silent for longer than --upstream-check-interval.
VERIFY_TIMEOUT = 3.0

PoolKey = tuple[str, str, str]
# Ways an upstream is found dead by silence (nothing read), rather than told so.
SILENCE_KINDS = frozenset({"silence_timeout", "heartbeat_timeout", "health_check"})


class ChannelOwner(ClientLeg, Protocol):
    """A client as the pool sees it when it places one of its channels (read only)."""

    @property
    def pool_key(self) -> PoolKey:
        """(user, password, vhost): the pool its channels go to."""

    @property
    def credentials(self) -> Credentials | None: ...

    @property
    def preferred(self) -> Mapping[Role, Upstream]:
        """Role -> the upstream its channels of that role use."""


class Pool:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.pid = os.getpid()
        self.nodes = NodeSet(
            config.upstream,
            config.node_strategy,
            _breaker_policy(config),
            config.breaker_max_open_percent,
            on_breaker_change=self._breaker_changed,
            recent=metrics.recent if metrics is not None else None,
        )
        self.backoff = BackoffPolicy(config.backoff_initial, config.backoff_max, config.backoff_multiplier)
        self._ids = itertools.count(1)
        self.upstreams: dict[PoolKey, list[Upstream]] = {}
        self._held: dict[tuple[str, str], list[Upstream]] = {}
        self._flights: dict[tuple[str, ...], AsyncResult] = {}  # dials in progress, by purpose and key
        self._credentials: dict[PoolKey, Credentials] = {}  # keys seen, for background dialling
        self._replenishing: set[PoolKey] = set()
        self.exclusive: ExclusiveQueues[ClientLeg, Upstream] = ExclusiveQueues()
        self.closing: set[Upstream] = set()  # sent Connection.Close, awaiting Close-Ok
        self.stopping = False
        # The broker's limits, learnt from the latest Tune; the configured ones until then.
        self.channel_max = config.channel_max
        self.frame_max = config.frame_max

    # ------------------------------------------------------------------ client handshake

    def authenticate(self, credentials: Credentials, deadline: float) -> None:
        """Prove the credentials against the broker (before the client's Tune), or raise UpstreamError.

        A live pooled connection with the same user *and password* proves them; otherwise a new
        upstream login does, and that connection is held for the client's Connection.Open.
        """
        if self._proven(credentials):
            return

        def login() -> None:
            if not self._proven(credentials):
                upstream = self._dial(credentials, None, deadline)
                self._held.setdefault((credentials.username, credentials.password), []).append(upstream)

        self._once(("login", credentials.username, credentials.password), login)

    def _proven(self, credentials: Credentials) -> bool:
        user, password = credentials.username, credentials.password
        if self._held.get((user, password)):
            return True
        return any(
            key[0] == user and key[1] == password and any(u.alive for u in ups) for key, ups in self.upstreams.items()
        )

    def open_vhost(self, credentials: Credentials, vhost: str, deadline: float) -> None:
        """Make sure an open upstream exists for (user, password, vhost): proves vhost access."""
        key = (credentials.username, credentials.password, vhost)
        if not self._usable(key):

            def open_one() -> None:
                if not self._usable(key):
                    self._check_capacity(key)
                    upstream = self._take_held(credentials, vhost) or self._dial(credentials, vhost, deadline)
                    self.upstreams.setdefault(key, []).append(upstream)

            self._once(("open", *key), open_one)
        self._credentials[key] = credentials  # proven: worth re-dialling in the background

    def _wants_more(self, key: PoolKey) -> bool:
        """No open connection, or fewer idle ones than --min-idle-upstreams."""
        ups = [u for u in self.upstreams.get(key, ()) if u.alive]
        if not ups:
            return True
        return sum(1 for u in ups if not u.links) < self.config.min_idle_upstreams

    def _usable(self, key: PoolKey) -> bool:
        return any(u.alive for u in self.upstreams.get(key, ()))

    def _take_held(self, credentials: Credentials, vhost: str) -> Upstream | None:
        held = self._held.get((credentials.username, credentials.password))
        while held:
            upstream = held.pop()
            if time.monotonic() - upstream.created > HELD_TTL:
                upstream.abort()
                continue
            try:
                upstream.open(vhost, self.config.connect_timeout)
                return upstream
            except UpstreamError as exc:
                if exc.permanent:
                    raise
                # The held connection went stale; fall back to a fresh one.
        return None

    # ------------------------------------------------------------------ channels

    def place(
        self, client: ChannelOwner, link: Link, role: Role, deadline: float | None = None
    ) -> tuple[Upstream, bool]:
        """Give a client channel a fresh channel on an upstream connection suited to its role.

        Returns the upstream, and whether the upstream channel.open was already sent and
        answered (a connection silent for longer than --upstream-check-interval must answer it
        before the client's method goes out); otherwise the caller pipelines channel.open before
        the method."""
        if not self.config.separate_publishers:
            role = Role.ANY
        key = client.pool_key
        if deadline is None:
            deadline = time.monotonic() + self.config.connect_timeout
        while True:
            upstream = self._choose(key, client, role)
            if upstream is None:
                self._once(("dial", *key, role), lambda: self._dial_for(key, client, role, deadline))
                continue
            # A blocked connection (memory alarm) is alive but not reading: never verify it then.
            verify = (
                upstream.blocked_reason is None
                and time.monotonic() - upstream.last_recv > self.config.upstream_check_interval
            )
            if upstream.attach(link, role):
                if not verify:
                    link.open_pending = True  # the caller pipelines channel.open; the watchdog covers it
                    return upstream, False
                timeout = min(VERIFY_TIMEOUT, self.config.connect_timeout)
                if upstream.open_channel(link, timeout):
                    return upstream, True
                recover = self.config.upstream_failure == "recover"
                if upstream.state is not UpstreamState.CLOSED:
                    if recover:
                        upstream.release(link)  # this caller places the link again, below
                    upstream.fail(
                        f"health check failed: no answer from {upstream.node.label} to channel.open within "
                        f"{timeout:g} s",
                        kind="health_check",
                    )
                    if not recover:
                        raise UpstreamError(f"{upstream.node.label} did not answer within {timeout:g} s")
                # It died while answering (a node going down, or silent): try the next connection.
                upstream.release(link)
                if time.monotonic() > deadline:
                    raise UpstreamError(f"connection to {upstream.node.label} lost: {upstream.close_cause}")
                continue
            if time.monotonic() > deadline:
                raise UpstreamError(f"no healthy upstream connection for vhost '{key[2]}' within the connect timeout")

    def _dial_for(self, key: PoolKey, client: ChannelOwner, role: Role, deadline: float) -> None:
        """No pooled connection fits a new channel: dial one (one dial per key and role at a time;
        clients arriving meanwhile share its outcome)."""
        if self._choose(key, client, role) is not None:
            return
        log.debug(
            "no pooled connection fits; dialling",
            extra={
                "event": "pool_dial",
                "vhost": key[2],
                "role": role,
                "connections": [
                    {"id": u.id, "state": u.state.value, "role": u.role, "channels": len(u.links)}
                    for u in self.upstreams.get(key, ())
                ],
            },
        )
        self._check_capacity(key)
        assert client.credentials is not None
        # With --upstream-failure recover a connected client's channel waits out an outage (up to
        # the deadline) rather than fail its whole connection at once, breakers all open or not.
        patient = self.config.upstream_failure == "recover"
        upstream = self._dial(client.credentials, key[2], deadline, patient)
        self.upstreams.setdefault(key, []).append(upstream)

    def _choose(self, key: PoolKey, client: ChannelOwner, role: Role) -> Upstream | None:
        now = time.monotonic()
        pinned = self.exclusive.pinned(client)
        if pinned is not None and pinned.has_room:
            # Exclusive queues live on the connection that declared them; correctness beats roles.
            return pinned
        preferred = client.preferred.get(role)
        if preferred is not None and preferred.accepts(role, now):
            return preferred
        fitting = [u for u in self.upstreams.get(key, ()) if u.accepts(role, now)]
        if not fitting:
            return None
        if self.config.channel_placement == "spread":
            return min(fitting, key=lambda u: len(u.links))
        # fill: the busiest connection that still has room, so the others can go idle
        return max(fitting, key=lambda u: len(u.links))

    def _check_capacity(self, key: PoolKey) -> None:
        cfg = self.config
        if cfg.max_upstreams_per_credential and len(self.upstreams.get(key, ())) >= cfg.max_upstreams_per_credential:
            raise UpstreamError(
                f"RESOURCE_ERROR - upstream connection limit reached for user '{key[0]}' on vhost '{key[2]}' "
                f"(--max-upstreams-per-credential {cfg.max_upstreams_per_credential})",
                reply_code=506,
                permanent=True,
            )
        if cfg.max_upstreams and self.total_upstreams() >= cfg.max_upstreams:
            raise UpstreamError(
                f"RESOURCE_ERROR - upstream connection limit reached (--max-upstreams {cfg.max_upstreams})",
                reply_code=506,
                permanent=True,
            )

    # ------------------------------------------------------------------ dialling

    def _dial(
        self, credentials: Credentials, vhost: str | None, deadline: float | None, patient: bool = False
    ) -> Upstream:
        """Connect to the first node that answers, retrying with backoff until `deadline`.

        A broker refusal (403, unknown vhost) is final. With every breaker open, fail at once
        (--breaker-all-open fail-fast) or keep trying until the deadline (queue).
        """
        delays = self.backoff.delays()
        last_error: UpstreamError | None = None
        first = True
        probe_interval = self.config.breaker_probe_interval
        while True:
            # A request that waits (after its first round, or a recovery) probes failing nodes
            # once per probe interval, open breaker or not, when no healthy node is left
            # (NodeSet.candidates): the node's return ends its wait within that interval.
            waiting = patient or not first
            candidates = self.nodes.candidates(waiting)
            # Fail fast only for a *new* request: one already waiting out an outage keeps waiting.
            fail_fast = first and not patient and self.config.breaker_all_open == "fail-fast"
            first = False
            if not candidates and fail_fast and self.nodes.all_open():
                raise UpstreamError(
                    "every upstream node's circuit breaker is open"
                    + (f" (last error: {last_error.text})" if last_error else self._last_node_error()),
                    breaker_open=True,
                )
            for node_state in candidates:
                if self.stopping:
                    raise UpstreamError("proxy shutting down")
                timeout = self.config.connect_timeout
                if deadline is not None:  # a dial never outlives its caller's deadline
                    timeout = max(0.1, min(timeout, deadline - time.monotonic()))
                try:
                    return self._connect(node_state.node, credentials, vhost, timeout)
                except UpstreamError as exc:
                    if exc.permanent:
                        raise
                    last_error = exc
            # Backoff paces a request's first attempts; once it waits, the breakers' probe
            # interval does (per node, whoever probes), so a node's return is seen at once.
            delay = min(next(delays), probe_interval)
            if deadline is not None and time.monotonic() + delay > deadline:
                if last_error is None:
                    raise UpstreamError("no upstream node available" + self._last_node_error())
                raise last_error
            gevent.sleep(delay)

    def _last_node_error(self) -> str:
        errors = [f"{s.node.label}: {s.last_error}" for s in self.nodes.states if s.last_error]
        return f" ({'; '.join(errors)})" if errors else ""

    def _connect(
        self, node: Node, credentials: Credentials, vhost: str | None, timeout: float | None = None
    ) -> Upstream:
        node_state = self.nodes.state_of(node)
        upstream = Upstream(self, node, credentials, next(self._ids))
        started = time.monotonic()
        if timeout is None:
            timeout = self.config.connect_timeout
        try:
            upstream.login(timeout)
            self.channel_max = upstream.broker_channel_max
            self.frame_max = upstream.frame_max
            if vhost is not None:
                upstream.open(vhost, max(0.1, timeout - (time.monotonic() - started)))
        except BaseException as exc:
            if not isinstance(exc, UpstreamError):
                node_state.breaker.probe_abandoned()  # e.g. the waiting client's greenlet was killed
                upstream.abort()
                raise
            category = "permanent" if exc.permanent else "transient"
            log.warning(
                "upstream connection failed",
                extra={
                    "event": "upstream_connect_failed",
                    "node": node.label,
                    "user": credentials.username,
                    "vhost": vhost,
                    "reason": exc.text,
                    "category": category,
                },
            )
            if self.metrics is not None:
                self.metrics.upstream_connect(node.label, category, time.monotonic() - started)
                # An unproven vhost name is the client's free text: keep it out of the labels.
                self.metrics.error("upstream_connect", category, vhost if not exc.permanent else "")
            if exc.permanent:
                # The node answered: it is up, whatever it thinks of these credentials.
                self.nodes.record_success(node_state)
            else:
                self.nodes.record_failure(node_state, exc.text)
            raise
        self.nodes.record_success(node_state)
        node_state.connections += 1
        upstream.counted = True
        if self.metrics is not None:
            self.metrics.upstream_connect(node.label, "success", time.monotonic() - started)
        return upstream

    def _once(self, key: tuple[str, ...], work: Callable[[], None]) -> None:
        """Single flight: while `work` runs for `key`, other callers wait for it and share its
        outcome (its exception included) instead of dialling again, so a burst of clients during
        an outage is answered together, not one connect timeout after another."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.get()
            return
        flight = self._flights[key] = AsyncResult()
        try:
            work()
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        else:
            flight.set(None)
        finally:
            del self._flights[key]

    def _breaker_changed(self, node: Node, old: str, new: str) -> None:
        if self.metrics is not None:
            self.metrics.breaker_change(node.label, old, new)

    # ------------------------------------------------------------------ upstream lifecycle events

    def forget(self, upstream: Upstream) -> None:
        for key, ups in list(self.upstreams.items()):
            if upstream in ups:
                ups.remove(upstream)
                if not ups:
                    del self.upstreams[key]

    def upstream_gone(self, upstream: Upstream, unexpected: bool, wanted: bool) -> None:
        """Bookkeeping once an upstream is closed; an unexpected loss counts against its node and,
        when its credential set is still wanted, capacity is re-established in the background."""
        self.forget(upstream)
        if upstream.counted:
            upstream.counted = False
            self.nodes.state_of(upstream.node).connections -= 1
        if unexpected and upstream.vhost is not None:
            # A node found silent is sure to fail the next client too: its breaker opens at
            # once (cap permitting), so the others go to another node without trying it first.
            self.nodes.record_failure(
                self.nodes.state_of(upstream.node), upstream.close_cause, trip=upstream.fail_kind in SILENCE_KINDS
            )
            key = upstream.key
            if key in self._credentials and (wanted or self.config.min_idle_upstreams):
                self._replenish(key)

    def _replenish(self, key: PoolKey) -> None:
        if key in self._replenishing or self.stopping:
            return
        self._replenishing.add(key)
        # A closure, not spawn(f, key): greenlet listings (/debug/greenlets) show spawn arguments,
        # and the key holds the password.
        gevent.spawn(lambda: self._replenish_loop(key))

    def _replenish_loop(self, key: PoolKey) -> None:
        """Dial replacements with backoff while the credential set has no open connection, or
        fewer idle ones than --min-idle-upstreams."""
        try:
            credentials = self._credentials[key]
            while not self.stopping and self._wants_more(key):
                dialled: list[Upstream] = []

                def redial(dialled: list[Upstream] = dialled) -> None:
                    if self._wants_more(key):
                        deadline = time.monotonic() + self.config.idle_timeout
                        dialled.append(self._dial(credentials, key[2], deadline))
                        self.upstreams.setdefault(key, []).append(dialled[-1])

                try:
                    self._once(("open", *key), redial)
                except UpstreamError as exc:
                    if exc.permanent or not self.config.min_idle_upstreams:
                        return  # _dial backed off until its deadline; nobody needs the key now
                    continue
                if dialled:
                    log.info(
                        "upstream capacity re-established",
                        extra={"event": "upstream_replenished", "vhost": key[2], "node": dialled[0].node.label},
                    )
                elif not self.config.min_idle_upstreams:
                    return
        finally:
            self._replenishing.discard(key)

    # ------------------------------------------------------------------ janitor duties

    def all_upstreams(self) -> list[Upstream]:
        return [u for ups in self.upstreams.values() for u in ups]

    def total_upstreams(self) -> int:
        return sum(len(ups) for ups in self.upstreams.values())

    def reap(self, now: float) -> None:
        """Close connections idle past --idle-timeout (above --min-idle-upstreams) or past
        --upstream-max-age once empty; drop stale held logins; keep --min-idle-upstreams warm."""
        cfg = self.config
        for key, ups in list(self.upstreams.items()):
            # Idle: no channels, and no live client's exclusive queues (they die with the connection).
            idle = [u for u in ups if u.alive and not u.links and not self.exclusive.owners_on(u)]
            keep = cfg.min_idle_upstreams
            for upstream in idle:
                if self.nodes.state_of(upstream.node).retired:
                    upstream.close("node removed from the configuration", "retired")
                elif cfg.upstream_max_age and now - upstream.created > cfg.upstream_max_age:
                    upstream.close("maximum age reached", "max_age")
                elif now - upstream.idle_since > cfg.idle_timeout and len(idle) > keep:
                    idle.remove(upstream)
                    upstream.close("idle timeout", "idle_timeout")
            if keep and len([u for u in self.upstreams.get(key, ()) if not u.links]) < keep:
                self._replenish(key)
        self._probe_open_nodes(now)
        for login, held in list(self._held.items()):
            for upstream in list(held):
                if now - upstream.created > HELD_TTL:
                    held.remove(upstream)
                    upstream.abort()
            if not held:
                del self._held[login]

    def _probe_open_nodes(self, now: float) -> None:
        """A node whose breaker opened while no client needs it any more (its clients moved to
        another node) would stay open, its state unknown, until a client came for it: once the
        open period is over, the janitor dials it itself (half-open probe) with a credential set
        in use; the connection joins the pool, the idle timeout closes it."""
        if self.stopping or not self._credentials:
            return
        key = next(reversed(self._credentials))  # the latest credential set proven
        credentials = self._credentials[key]
        for state in self.nodes.states:
            breaker = state.breaker
            if state.retired or breaker.state != OPEN or now < breaker.open_until:
                continue
            if not breaker.allows_attempt():  # half-open now; this dial is its one probe
                continue
            node = state.node

            def probe(node: Node = node) -> None:
                try:
                    upstream = self._connect(node, credentials, key[2])
                except UpstreamError:
                    return  # recorded against the node by _connect
                self.upstreams.setdefault(key, []).append(upstream)

            gevent.spawn(probe)  # a closure: greenlet listings must not show the credentials

    def tick(self, now: float) -> None:
        for upstream in self.all_upstreams():
            upstream.tick(now)

    def close_all(self, reason: str) -> None:
        self.stopping = True
        for upstream in self.all_upstreams():
            upstream.links.clear()
            upstream.close(reason, "shutdown", grace=2.0)

    def reconfigure(self, config: Config) -> None:
        """A reloaded configuration: new settings for new work; removed nodes retire gracefully."""
        self.config = config
        self.backoff = BackoffPolicy(config.backoff_initial, config.backoff_max, config.backoff_multiplier)
        added, retired = self.nodes.reconfigure(
            config.upstream, config.node_strategy, _breaker_policy(config), config.breaker_max_open_percent
        )
        if added or retired:
            log.warning(
                "upstream nodes changed",
                extra={
                    "event": "nodes_changed",
                    "added": [n.label for n in added],
                    "retired": [n.label for n in retired],
                },
            )

    def ready(self) -> bool:
        return not self.stopping and self.nodes.usable()


def _breaker_policy(config: Config) -> BreakerPolicy:
    return BreakerPolicy(
        failures=config.breaker_failures,
        failure_ratio=config.breaker_failure_ratio,
        window=config.breaker_window,
        min_requests=config.breaker_min_requests,
        open_time=config.breaker_open_time,
        open_time_max=config.breaker_open_max,
        probe_interval=config.breaker_probe_interval,
        probe_timeout=config.connect_timeout + 5.0,
    )
