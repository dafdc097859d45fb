"""Prometheus metrics (prefix amqproxy_), served at /metrics.

Two kinds:
- Event counters and histograms, updated where the event happens (a connection opens, a
  handshake completes, a breaker trips), never per frame.
- Live-state gauges (connections, channels, pools, breakers) and the frame/byte counters,
  computed at scrape time by `LiveStateCollector` from the proxy's own structures and from plain
  integer arrays that the forwarding loops bump -- the hot path makes no Prometheus calls.
Labels stay bounded: vhost, user, node, direction, frame type and fixed reason words; never
connection ids, queue names, free text or passwords.
"""

from __future__ import annotations

import functools
import os
import platform
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import gevent
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .accel import implementation
from .recent import FAILURE, RECOVERY, RecentEvents

# Buckets from 10 microseconds to 10 seconds: the proxy's own latency lives at the low end.
LATENCY_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

FRAME_TYPE_NAMES = {1: "method", 2: "header", 3: "body", 8: "heartbeat"}
CLIENT_TO_UPSTREAM = "client_to_upstream"
UPSTREAM_TO_CLIENT = "upstream_to_client"

# Bumped by the forwarding loops: index = frame type. Read at scrape time.
FRAMES = {CLIENT_TO_UPSTREAM: [0] * 9, UPSTREAM_TO_CLIENT: [0] * 9}
BYTES = {CLIENT_TO_UPSTREAM: [0] * 9, UPSTREAM_TO_CLIENT: [0] * 9}

BUILD_INFO = Info("amqproxy_build", "amqproxy version and build")


@functools.cache
def build_labels() -> dict[str, str]:
    """The build info's labels. Not at import: `implementation()` imports the data path's
    modules, which import this one."""
    return {
        "version": __version__,
        "python": platform.python_version(),
        "gevent": gevent.__version__,
        "implementation": implementation(),  # cython: the compiled data path; python: its sources; or mixed
    }


CLIENTS_OPENED = Counter(
    "amqproxy_client_connections_opened_total", "Client connections that completed the handshake", ["vhost", "user"]
)
CLIENTS_CLOSED = Counter(
    "amqproxy_client_connections_closed_total",
    "Client connections closed after a completed handshake, by reason",
    ["vhost", "user", "reason"],
)
CLIENTS_REFUSED = Counter(
    "amqproxy_client_connections_refused_total", "Client connections refused before Connection.OpenOk", ["reason"]
)
CHANNELS_OPENED = Counter("amqproxy_channels_opened_total", "Client channels opened", ["vhost", "user"])
CHANNELS_CLOSED = Counter("amqproxy_channels_closed_total", "Client channels closed", ["vhost", "user"])
CHANNELS_MOVED = Counter(
    "amqproxy_channels_moved_total",
    "Client channels placed with the consumers that moved to a publishing upstream connection at their first publish",
    ["vhost"],
)
FRAMES_FAILED = Counter(
    "amqproxy_frames_failed_total",
    "Frames refused by the proxy (the sender was closed), by reason",
    ["direction", "reason"],
)
ERRORS = Counter(
    "amqproxy_errors_total",
    "Errors by type and category (transient errors are worth retrying, permanent ones are not)",
    ["error_type", "category", "vhost"],
)
UPSTREAMS_OPENED = Counter("amqproxy_upstream_connections_opened_total", "Upstream connections opened", ["node"])
UPSTREAMS_CLOSED = Counter(
    "amqproxy_upstream_connections_closed_total", "Upstream connections closed, by reason", ["node", "reason"]
)
UPSTREAM_CONNECT_ATTEMPTS = Counter(
    "amqproxy_upstream_connect_attempts_total",
    "Upstream (re)connect attempts by outcome: success, transient or permanent failure",
    ["node", "outcome"],
)
BREAKER_TRANSITIONS = Counter(
    "amqproxy_breaker_transitions_total", "Circuit breaker state changes", ["node", "from", "to"]
)
RELOADS = Counter(
    "amqproxy_config_reloads_total", "Configuration reloads by result: applied, needs_restart, rejected", ["result"]
)
LIMIT_REFUSALS = Counter(
    "amqproxy_limit_refusals_total",
    "Client connections a limit refused (mode enforced) or would have refused (mode alarm), by limit",
    ["limit", "mode"],
)
ACCESS_DENIED = Counter(
    "amqproxy_access_denied_total",
    "Client connections refused by --allow-cidr/--deny-cidr or --authz-policy, by reason",
    ["reason"],
)
HANDSHAKE_DURATION = Histogram(
    "amqproxy_handshake_duration_seconds",
    "Client connect to Connection.OpenOk",
    ["vhost"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_CONNECT_DURATION = Histogram(
    "amqproxy_upstream_connect_duration_seconds",
    "TCP connect to Connection.OpenOk on an upstream connection",
    ["node"],
    buckets=LATENCY_BUCKETS,
)
FORWARD_LATENCY = Histogram(
    "amqproxy_forwarding_latency_seconds",
    "Time a batch of frames spends inside the proxy, from the read that brought it to its write",
    ["direction"],
    buckets=LATENCY_BUCKETS,
)
RECOVERIES = Counter(
    "amqproxy_recoveries_total",
    "Client recoveries after an upstream loss (--upstream-failure recover), by outcome: recovered, "
    "partial (some channels failed), timeout (320), failed (320: a delivery cut mid-message), client_gone",
    ["outcome"],
)
RECOVERY_CHANNELS = Counter("amqproxy_recovery_channels_recovered_total", "Client channels recovered")
RECOVERY_CHANNELS_FAILED = Counter(
    "amqproxy_recovery_channels_failed_total",
    "Client channels closed because they could not be recovered, by reason",
    ["reason"],
)
RECOVERY_CONSUMERS_CANCELLED = Counter(
    "amqproxy_recovery_consumers_cancelled_total",
    "Consumers on queues lost with their upstream (exclusive, auto-delete, server-named), cancelled",
)
RECOVERY_NACKED = Counter(
    "amqproxy_recovery_publishes_nacked_total", "Publishes outstanding at an upstream loss, nacked to the client"
)
RECOVERY_STALE_ACKS = Counter(
    "amqproxy_recovery_stale_acks_total",
    "Client acks/nacks/rejects for deliveries from before a recovery, dropped (the broker requeued them)",
)
RECOVERY_DURATION = Histogram(
    "amqproxy_recovery_duration_seconds",
    "Upstream loss to the end of a client's recovery",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
FORWARD_LATENCY_C2U = FORWARD_LATENCY.labels(CLIENT_TO_UPSTREAM)
FORWARD_LATENCY_U2C = FORWARD_LATENCY.labels(UPSTREAM_TO_CLIENT)

BREAKER_VALUES = {"closed": 0, "half-open": 1, "open": 2}

# Close reasons of client connections (a fixed vocabulary keeps label cardinality bounded).
CLOSE_REASONS = (
    "client",
    "protocol_error",
    "upstream_lost",
    "heartbeat_timeout",
    "slow_client",
    "shutdown",
    "admin",
    "socket_error",
    "internal_error",
)

# What a client recovery's outcome adds to the recent upstream events (client_gone: nothing).
RECOVERY_EVENTS = {
    "recovered": (RECOVERY, "clients' channels re-established on another upstream connection"),
    "partial": (RECOVERY, "clients recovered, with channels that could not be recovered closed"),
    "timeout": (FAILURE, "clients not recovered within --recovery-timeout: closed with 320"),
    "failed": (FAILURE, "clients closed with 320: a delivery was cut mid-message"),
}


_CHILDREN_CACHED = 1024  # (vhost, user) pairs whose metric children are kept at hand


class LiveSource(Protocol):
    """What the live-state gauges read from the proxy at scrape time, as plain values."""

    def live_clients(self) -> Iterable[tuple[str, str, int]]:
        """(vhost, user, channels) of each client past its handshake."""

    def live_upstreams(self) -> Iterable[tuple[str, str, int, str, str]]:
        """(node, state, channels, vhost, user) of each upstream connection, closing ones included."""

    def live_nodes(self) -> Iterable[tuple[str, str]]:
        """(node, breaker state) of each upstream node."""


class Metrics:
    """The proxy's handle on its event metrics, and on the recent upstream failures and
    recoveries the admin API lists (shared with the pool's NodeSet, which adds the node events)."""

    def __init__(self, source: LiveSource) -> None:
        REGISTRY.register(LiveStateCollector(source))
        BUILD_INFO.info(build_labels())
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self.recent = RecentEvents()

    def client_opened(self, vhost: str, user: str, handshake_seconds: float) -> None:
        opened, handshake, _channels_opened, _channels_closed = self._of(vhost, user)
        opened.inc()
        handshake.observe(handshake_seconds)

    def client_closed(self, vhost: str, user: str, kind: str) -> None:
        CLIENTS_CLOSED.labels(vhost, user, kind).inc()

    def client_refused(self, reason: str) -> None:
        CLIENTS_REFUSED.labels(reason).inc()

    def channel_opened(self, vhost: str | None, user: str) -> None:
        self._of(vhost or "", user)[2].inc()

    def channel_closed(self, vhost: str | None, user: str) -> None:
        self._of(vhost or "", user)[3].inc()

    def _of(self, vhost: str, user: str) -> tuple[Any, Any, Any, Any]:
        """The metric children of one (vhost, user), looked up once: every short-lived client
        counts in all four."""
        key = (vhost, user)
        children = self._children.get(key)
        if children is None:
            if len(self._children) >= _CHILDREN_CACHED:
                self._children.clear()  # bounded: as many credential sets as clients churn through
            children = self._children[key] = (
                CLIENTS_OPENED.labels(vhost, user),
                HANDSHAKE_DURATION.labels(vhost),
                CHANNELS_OPENED.labels(vhost, user),
                CHANNELS_CLOSED.labels(vhost, user),
            )
        return children

    def channel_moved(self, vhost: str | None) -> None:
        CHANNELS_MOVED.labels(vhost or "").inc()

    def frame_failed(self, direction: str, reason: str) -> None:
        FRAMES_FAILED.labels(direction, reason).inc()

    def error(self, error_type: str, category: str, vhost: str | None) -> None:
        ERRORS.labels(error_type, category, vhost or "").inc()

    def upstream_connect(self, node: str, outcome: str, seconds: float) -> None:
        UPSTREAM_CONNECT_ATTEMPTS.labels(node, outcome).inc()
        if outcome == "success":
            UPSTREAMS_OPENED.labels(node).inc()
            UPSTREAM_CONNECT_DURATION.labels(node).observe(seconds)

    def upstream_closed(self, node: str, reason: str) -> None:
        UPSTREAMS_CLOSED.labels(node, reason).inc()

    def breaker_change(self, node: str, old: str, new: str) -> None:
        BREAKER_TRANSITIONS.labels(node, old, new).inc()

    def limit_hit(self, limit: str, enforced: bool) -> None:
        LIMIT_REFUSALS.labels(limit, "enforced" if enforced else "alarm").inc()

    def access_denied(self, reason: str) -> None:
        ACCESS_DENIED.labels(reason).inc()

    def recovery(self, outcome: str, seconds: float, recovered: int, cancelled: int, nacked: int) -> None:
        RECOVERIES.labels(outcome).inc()
        if outcome in RECOVERY_EVENTS:
            self.recent.add(RECOVERY_EVENTS[outcome][0], "", RECOVERY_EVENTS[outcome][1])
        RECOVERY_DURATION.observe(seconds)
        RECOVERY_CHANNELS.inc(recovered)
        RECOVERY_CONSUMERS_CANCELLED.inc(cancelled)
        RECOVERY_NACKED.inc(nacked)

    def recovery_channel_failed(self, reason: str) -> None:
        RECOVERY_CHANNELS_FAILED.labels(reason).inc()

    def stale_ack(self) -> None:
        RECOVERY_STALE_ACKS.inc()


def counter_values(counter: Counter) -> dict[tuple[str, ...], float]:
    """A labelled counter's values in this process, by label values (for the admin JSON)."""
    values: dict[tuple[str, ...], float] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                values[tuple(sample.labels.values())] = sample.value
    return values


class LiveStateCollector(Collector):
    """Gauges read from the proxy's live structures at scrape time, and the hot-path counters."""

    def __init__(self, source: LiveSource) -> None:
        self.source = source

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # names are known only at scrape time; nothing to check at registration

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        source = self.source
        clients = GaugeMetricFamily(
            "amqproxy_client_connections", "Client connections open now", labels=["vhost", "user"]
        )
        channels = GaugeMetricFamily("amqproxy_channels", "Client channels open now", labels=["vhost", "user"])
        client_tally: Tally[tuple[str, str]] = Tally()
        channel_tally: Tally[tuple[str, str]] = Tally()
        for vhost, user, channel_count in source.live_clients():
            key = (vhost, user)
            client_tally[key] += 1
            channel_tally[key] += channel_count
        for key, count in client_tally.items():
            clients.add_metric(list(key), count)
            channels.add_metric(list(key), channel_tally[key])
        yield clients
        yield channels

        upstreams = GaugeMetricFamily(
            "amqproxy_upstream_connections", "Upstream connections now, by node and state", labels=["node", "state"]
        )
        upstream_channels = GaugeMetricFamily(
            "amqproxy_upstream_channels", "Channels open on upstream connections now", labels=["node"]
        )
        breakers = GaugeMetricFamily(
            "amqproxy_breaker_state", "Circuit breaker state per node: 0 closed, 1 half-open, 2 open", labels=["node"]
        )
        pool_upstreams = GaugeMetricFamily(
            "amqproxy_pool_upstream_connections",
            "Upstream connections per credential set: in_use (has channels) or idle",
            labels=["vhost", "user", "state"],
        )
        pool_channels = GaugeMetricFamily(
            "amqproxy_pool_channels", "Upstream channels per credential set", labels=["vhost", "user"]
        )
        by_node: Tally[tuple[str, str]] = Tally()
        node_channels: Tally[str] = Tally()
        per_key: Tally[tuple[str, str, str]] = Tally()
        key_channels: Tally[tuple[str, str]] = Tally()
        for node, state, channel_count, vhost, user in source.live_upstreams():
            by_node[(node, state)] += 1
            node_channels[node] += channel_count
            if state == "open":
                per_key[(vhost, user, "in_use" if channel_count else "idle")] += 1
                key_channels[(vhost, user)] += channel_count
        for label, breaker_state in source.live_nodes():
            for upstream_state in ("open", "closing"):
                upstreams.add_metric([label, upstream_state], by_node[(label, upstream_state)])
            upstream_channels.add_metric([label], node_channels[label])
            breakers.add_metric([label], BREAKER_VALUES[breaker_state])
        for (vhost, user, state_name), count in per_key.items():
            pool_upstreams.add_metric([vhost, user, state_name], count)
        for (vhost, user), count in key_channels.items():
            pool_channels.add_metric([vhost, user], count)
        yield upstreams
        yield upstream_channels
        yield breakers
        yield pool_upstreams
        yield pool_channels

        frames = CounterMetricFamily(
            "amqproxy_proxied_frames",
            "Frames forwarded, by direction and frame type",
            labels=["direction", "frame_type"],
        )
        nbytes = CounterMetricFamily(
            "amqproxy_proxied_bytes",
            "Bytes forwarded (whole frames), by direction and frame type",
            labels=["direction", "frame_type"],
        )
        for direction in (CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT):
            for frame_type, name in FRAME_TYPE_NAMES.items():
                frames.add_metric([direction, name], FRAMES[direction][frame_type])
                nbytes.add_metric([direction, name], BYTES[direction][frame_type])
        yield frames
        yield nbytes


# ---------------------------------------------------------------------------- --workers N
# With several worker processes, prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR,
# set by the supervisor before anything imports prometheus_client) keeps every counter and
# histogram above in per-process files that the supervisor sums at scrape time. The live-state
# gauges have no files of their own, so each worker copies them there once per janitor tick.

WORKER_RESTARTS = Counter("amqproxy_worker_restarts_total", "Worker processes restarted after they died")
# Gauges whose sum over workers would mislead: the worst worker's value is reported instead.
_MAX_OVER_WORKERS = {"amqproxy_breaker_state"}


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class MultiprocessBridge:
    """Copies LiveStateCollector's scrape-time values into multiprocess gauges and counters."""

    def __init__(self, source: LiveSource) -> None:
        self.collector = LiveStateCollector(source)
        self.gauges: dict[str, Gauge] = {}
        self.counters: dict[str, Counter] = {}
        self.last: dict[tuple[str, tuple[str, ...]], float] = {}

    def sync(self) -> None:
        seen: set[tuple[str, tuple[str, ...]]] = set()
        for family in self.collector.collect():
            for sample in family.samples:
                labels = tuple(sample.labels[name] for name in sorted(sample.labels))
                key = (family.name, labels)
                if family.type == "counter":
                    if not sample.name.endswith("_total"):
                        continue  # the _created sample
                    counter = self._counter(family.name, family.documentation, sorted(sample.labels))
                    delta = sample.value - self.last.get(key, 0.0)
                    if delta > 0:
                        (counter.labels(*labels) if labels else counter).inc(delta)
                else:
                    gauge = self._gauge(family.name, family.documentation, sorted(sample.labels))
                    (gauge.labels(*labels) if labels else gauge).set(sample.value)
                self.last[key] = sample.value
                seen.add(key)
        for name, labels in [key for key in self.last if key not in seen]:
            gauge_or_none = self.gauges.get(name)
            if gauge_or_none is not None:  # a label set that went away (a vhost's last client left)
                (gauge_or_none.labels(*labels) if labels else gauge_or_none).set(0)
            del self.last[(name, labels)]

    def _gauge(self, name: str, documentation: str, labels: list[str]) -> Gauge:
        if name not in self.gauges:
            if name in _MAX_OVER_WORKERS:
                gauge = Gauge(name, documentation, labels, registry=None, multiprocess_mode="livemax")
            else:
                gauge = Gauge(name, documentation, labels, registry=None, multiprocess_mode="livesum")
            self.gauges[name] = gauge
        return self.gauges[name]

    def _counter(self, name: str, documentation: str, labels: list[str]) -> Counter:
        if name not in self.counters:
            self.counters[name] = Counter(name, documentation, labels, registry=None)
        return self.counters[name]


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay: totals survive restarts)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def multiprocess_exposition(supervisor_state: dict[str, Any]) -> tuple[bytes, str]:
    """The /metrics text of the whole proxy: every process's files plus the supervisor's view."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(_SupervisorCollector(supervisor_state))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _SupervisorCollector(Collector):
    """What the supervisor knows: the build, its workers, and every process's process_* metrics."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("amqproxy_build", "amqproxy version and build")
        info.add_metric([], build_labels())
        yield info
        # Two metrics, not one with a state label: configured + alive would be a meaningless sum.
        yield GaugeMetricFamily("amqproxy_workers_configured", "Worker processes configured", self.state["workers"])
        yield GaugeMetricFamily("amqproxy_workers_alive", "Worker processes alive", self.state["alive"])
        yield from _process_families(self.state["processes"])


def _process_families(processes: dict[str, int]) -> list[Metric]:
    """prometheus-client's process metrics (CPU, memory, open files) of each process, one series
    per process labelled `worker` (its index, or "supervisor"): the multiprocess registry has no
    process collector, and summed values would hide which worker grows."""
    merged: dict[str, Metric] = {}
    for label, pid in processes.items():
        for family in ProcessCollector(pid=functools.partial(str, pid), registry=None).collect():
            target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                target.add_sample(sample.name, dict(sample.labels, worker=label), sample.value)
    return list(merged.values())
