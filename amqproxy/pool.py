"""Pool: upstream connections keyed by credential set (user, password, vhost).

Channels of different clients share upstream connections; upstream *channels* are never
shared or reused across clients (their state -- confirms, qos, consumers, tx -- makes reuse
unsafe). A credential set's connections are filled in order; a client's further channels go to
the connection its earlier ones are on when there is room, so its exclusive queues stay
reachable. New connections are dialled only under a per-key lock, so a burst of clients does
not open a burst of connections.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from gevent.lock import BoundedSemaphore

from .exclusive import ExclusiveQueues
from .protocol.handshake import Credentials
from .upstream import Upstream, UpstreamError

if TYPE_CHECKING:
    from .channel import Link
    from .client import ClientSession
    from .config import Config

log = logging.getLogger("amqproxy.pool")

# How long a logged-in upstream waits for its client's Connection.Open; RabbitMQ's own
# handshake_timeout is 10 s, so a held connection older than this is no longer worth opening.
HELD_TTL = 5.0

PoolKey = tuple[str, str, str]


class Pool:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pid = os.getpid()
        self.nodes = config.upstream
        self._next_node = 0
        self._ids = itertools.count(1)
        self.upstreams: dict[PoolKey, list[Upstream]] = {}
        self._held: dict[tuple[str, str], list[Upstream]] = {}
        self._locks: dict[object, tuple[BoundedSemaphore, list[int]]] = {}
        self.exclusive = ExclusiveQueues()
        self.closing: set[Upstream] = set()  # sent Connection.Close, awaiting Close-Ok
        # The broker's limits, learnt from the latest Tune; the configured ones until then.
        self.channel_max = config.channel_max
        self.frame_max = config.frame_max

    # ------------------------------------------------------------------ client handshake

    def authenticate(self, credentials: Credentials) -> None:
        """Prove the credentials against the broker (before the client's Tune), or raise UpstreamError.

        A live pooled connection with the same user *and password* proves them; otherwise a new
        upstream login does, and that connection is held for the client's Connection.Open.
        """
        if self._proven(credentials):
            return
        with self._lock((credentials.username, credentials.password)):
            if self._proven(credentials):
                return
            upstream = self._dial(credentials, vhost=None)
            self._held.setdefault((credentials.username, credentials.password), []).append(upstream)

    def _proven(self, credentials: Credentials) -> bool:
        user, password = credentials.username, credentials.password
        if self._held.get((user, password)):
            return True
        return any(
            key[0] == user and key[1] == password and any(u.state == "open" for u in ups)
            for key, ups in self.upstreams.items()
        )

    def open_vhost(self, credentials: Credentials, vhost: str) -> None:
        """Make sure an open upstream exists for (user, password, vhost): proves vhost access."""
        key = (credentials.username, credentials.password, vhost)
        if self._usable(key):
            return
        with self._lock(key):
            if self._usable(key):
                return
            upstream = self._take_held(credentials, vhost)
            if upstream is None:
                upstream = self._dial(credentials, vhost)
            self.upstreams.setdefault(key, []).append(upstream)

    def _usable(self, key: PoolKey) -> bool:
        return any(u.state == "open" for u in self.upstreams.get(key, ()))

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

    def attach(self, client: ClientSession, client_channel: int) -> Link:
        """Map a client channel onto a fresh channel of an upstream connection for its key."""
        key = client.pool_key
        preferred = client.last_upstream
        if preferred is not None and preferred.has_room:
            link = preferred.attach(client, client_channel)
            if link is not None:
                return link
        link = self._attach_existing(key, client, client_channel)
        if link is not None:
            return link
        with self._lock(key):
            link = self._attach_existing(key, client, client_channel)
            if link is not None:
                return link
            assert client.credentials is not None
            upstream = self._dial(client.credentials, key[2])
            self.upstreams.setdefault(key, []).append(upstream)
            link = upstream.attach(client, client_channel)
            assert link is not None
            return link

    def _attach_existing(self, key: PoolKey, client: ClientSession, client_channel: int) -> Link | None:
        for upstream in self.upstreams.get(key, ()):
            if upstream.has_room:
                link = upstream.attach(client, client_channel)
                if link is not None:
                    return link
        return None

    # ------------------------------------------------------------------ dialling

    def _dial(self, credentials: Credentials, vhost: str | None) -> Upstream:
        """Connect to the next node that answers; a refusal by the broker is final, not retried."""
        last_error: UpstreamError | None = None
        for _ in range(len(self.nodes)):
            node = self.nodes[self._next_node % len(self.nodes)]
            self._next_node += 1
            upstream = Upstream(self, node, credentials, next(self._ids))
            try:
                upstream.login(self.config.connect_timeout)
                self.channel_max = upstream.broker_channel_max
                self.frame_max = upstream.frame_max
                if vhost is not None:
                    upstream.open(vhost, self.config.connect_timeout)
                return upstream
            except UpstreamError as exc:
                log.warning(
                    "upstream connection failed",
                    extra={
                        "event": "upstream_connect_failed",
                        "node": node.label,
                        "user": credentials.username,
                        "vhost": vhost,
                        "reason": exc.text,
                        "category": "permanent" if exc.permanent else "transient",
                    },
                )
                if exc.permanent:
                    raise
                last_error = exc
        assert last_error is not None
        raise last_error

    @contextmanager
    def _lock(self, key: object) -> Iterator[None]:
        """Serialise dialling per key; the entry lives only while someone holds or awaits it, so
        keys never pile up (not even for a client trying password after password)."""
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (BoundedSemaphore(), [0])
        lock, users = entry
        users[0] += 1
        try:
            with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    # ------------------------------------------------------------------ bookkeeping

    def forget(self, upstream: Upstream) -> None:
        for key, ups in list(self.upstreams.items()):
            if upstream in ups:
                ups.remove(upstream)
                if not ups:
                    del self.upstreams[key]

    def all_upstreams(self) -> list[Upstream]:
        return [u for ups in self.upstreams.values() for u in ups]

    def reap(self, now: float) -> None:
        """Janitor duty: close connections idle past --idle-timeout, drop stale held logins."""
        idle_timeout = self.config.idle_timeout
        for upstream in self.all_upstreams():
            if upstream.state == "open" and not upstream.links and now - upstream.idle_since > idle_timeout:
                upstream.close("idle timeout")
        for key, held in list(self._held.items()):
            for upstream in list(held):
                if now - upstream.created > HELD_TTL:
                    held.remove(upstream)
                    upstream.abort()
            if not held:
                del self._held[key]

    def tick(self, now: float) -> None:
        for upstream in self.all_upstreams():
            upstream.tick(now)

    def close_all(self, reason: str) -> None:
        for upstream in self.all_upstreams():
            upstream.links.clear()
            upstream.close(reason, grace=2.0)
