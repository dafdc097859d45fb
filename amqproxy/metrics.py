"""Prometheus metrics (prefix amqproxy_). Labels stay bounded: vhost, user, reason, node; never ids.

Counters and gauges are updated on connection and channel lifecycle events, never per frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Info

from . import __version__

if TYPE_CHECKING:
    from .client import ClientSession
    from .server import Proxy

BUILD_INFO = Info("amqproxy_build", "amqproxy version")
BUILD_INFO.info({"version": __version__})

CLIENTS_OPEN = Gauge("amqproxy_client_connections", "Client connections open now", ["vhost", "user"])
CLIENTS_OPENED = Counter("amqproxy_client_connections_opened_total", "Client connections opened", ["vhost", "user"])
CLIENTS_CLOSED = Counter("amqproxy_client_connections_closed_total", "Client connections closed", ["vhost", "user"])
CLIENTS_REFUSED = Counter(
    "amqproxy_client_connections_refused_total", "Client connections refused during the handshake", ["reason"]
)
UPSTREAMS_OPEN = Gauge("amqproxy_upstream_connections", "Upstream connections open now", ["node"])
UPSTREAM_CHANNELS = Gauge("amqproxy_upstream_channels", "Channels open on upstream connections now", ["node"])
UPSTREAM_CONNECT_ATTEMPTS = Counter(
    "amqproxy_upstream_connect_attempts_total",
    "Upstream connection attempts by outcome (success, transient, permanent)",
    ["node", "outcome"],
)
BREAKER_STATE = Gauge(
    "amqproxy_breaker_state", "Circuit breaker state per node: 0 closed, 1 half-open, 2 open", ["node"]
)
BREAKER_TRANSITIONS = Counter(
    "amqproxy_breaker_transitions_total", "Circuit breaker state changes", ["node", "from", "to"]
)
_BREAKER_VALUES = {"closed": 0, "half-open": 1, "open": 2}


class Metrics:
    """The proxy's handle on its metrics; gauges that mirror live state are computed at scrape time."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def client_opened(self, client: ClientSession) -> None:
        labels = (client.vhost or "", client.credentials.username if client.credentials else "")
        CLIENTS_OPENED.labels(*labels).inc()
        CLIENTS_OPEN.labels(*labels).inc()

    def client_closed(self, client: ClientSession) -> None:
        labels = (client.vhost or "", client.credentials.username if client.credentials else "")
        CLIENTS_CLOSED.labels(*labels).inc()
        CLIENTS_OPEN.labels(*labels).dec()

    def client_refused(self, reason: str) -> None:
        CLIENTS_REFUSED.labels(reason).inc()

    def protocol_header_rejected(self) -> None:
        CLIENTS_REFUSED.labels("protocol_header").inc()

    def upstream_connect(self, node: str, outcome: str, seconds: float) -> None:
        UPSTREAM_CONNECT_ATTEMPTS.labels(node, outcome).inc()

    def breaker_change(self, node: str, old: str, new: str) -> None:
        BREAKER_TRANSITIONS.labels(node, old, new).inc()
        BREAKER_STATE.labels(node).set(_BREAKER_VALUES[new])

    def refresh(self) -> None:
        """Recompute the live-state gauges just before a scrape."""
        per_node: dict[str, int] = {}
        channels: dict[str, int] = {}
        for upstream in self.proxy.pool.all_upstreams():
            label = upstream.node.label
            per_node[label] = per_node.get(label, 0) + 1
            channels[label] = channels.get(label, 0) + len(upstream.links)
        for state in self.proxy.pool.nodes.states:
            label = state.node.label
            UPSTREAMS_OPEN.labels(label).set(per_node.get(label, 0))
            UPSTREAM_CHANNELS.labels(label).set(channels.get(label, 0))
            BREAKER_STATE.labels(label).set(_BREAKER_VALUES[state.breaker.state])
