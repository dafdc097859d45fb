"""Client limits as pure logic: token buckets, keyed connection counters, and the decision
whether a new client connection is admitted (enforced or alarm-only).

Behind a pooling proxy the broker's own per-user and per-vhost connection limits count the
pooled connections, not the clients, so the proxy counts clients itself. Nothing here touches a
socket or sleeps: `ClientSession` asks at three points of the handshake (the address once the
connection is accepted, the user at StartOk, the vhost at Open) and acts on the `Decision`.

Counting sits behind `ConnectionCounters` (try_acquire / release / count) so that it can later
be backed by memory shared between worker processes; today every limit is per proxy process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .protocol import constants as c
from .protocol.errors import reply_text

# Limit names: the option names (metric label `limit`; `--limits-alarm-only` takes them with
# dashes or underscores).
MAX_CONNECTIONS = "max_connections"
MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"
MAX_CONNECTIONS_PER_USER = "max_connections_per_user"
MAX_CONNECTIONS_PER_VHOST = "max_connections_per_vhost"
CONNECTION_RATE_PER_IP = "connection_rate_per_ip"
CONNECTION_RATE_PER_USER = "connection_rate_per_user"
CLIENT_BYTE_RATE = "client_byte_rate"
LIMIT_NAMES = (
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_IP,
    MAX_CONNECTIONS_PER_USER,
    MAX_CONNECTIONS_PER_VHOST,
    CONNECTION_RATE_PER_IP,
    CONNECTION_RATE_PER_USER,
    CLIENT_BYTE_RATE,
)

# Idle token buckets (full again) are forgotten once there are this many, at most once a second.
_BUCKET_PRUNE_SIZE = 1024

Key = tuple[str, str]  # (kind, value): ("all", ""), ("ip", "10.0.0.1"), ("user", "alice"), ("vhost", "/")


def parse_limit_name(value: str) -> str:
    """A limit name for --limits-alarm-only: 'max-connections' or 'max_connections'; 'all'."""
    name = value.strip().lower().replace("-", "_").lstrip("_")
    if name != "all" and name not in LIMIT_NAMES:
        raise ValueError(f"unknown limit; known: all, {', '.join(n.replace('_', '-') for n in LIMIT_NAMES)}")
    return name


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`. `take` admits or not; `debit` always
    takes (the balance may go negative) and says how long to wait until it is paid back."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, amount: float = 1.0) -> bool:
        self._refill(now)
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False

    def debit(self, now: float, amount: float) -> float:
        """Take `amount` regardless; seconds until the balance is back at zero (0 if it is not negative)."""
        self._refill(now)
        self.tokens -= amount
        return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


class ConnectionCounters:
    """Connections held per key. All-or-nothing: `try_acquire` takes every key or none.

    The small interface (try_acquire, release, count) is what a multi-process version backed
    by shared memory has to provide."""

    def __init__(self) -> None:
        self._counts: dict[Hashable, int] = {}

    def try_acquire(self, claims: Sequence[tuple[Hashable, int]]) -> Hashable | None:
        """Acquire one slot of each (key, limit) claim (limit 0 = none); or, if a key is already
        at its limit, acquire nothing and return that key."""
        counts = self._counts
        for key, limit in claims:
            if limit and counts.get(key, 0) >= limit:
                return key
        for key, _limit in claims:
            counts[key] = counts.get(key, 0) + 1
        return None

    def release(self, keys: Iterable[Hashable]) -> None:
        counts = self._counts
        for key in keys:
            left = counts.get(key, 0) - 1
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)

    def count(self, key: Hashable) -> int:
        return self._counts.get(key, 0)


@dataclass(frozen=True)
class Refusal:
    """A limit that refuses (or, alarm-only, would refuse) a connection."""

    limit: str  # one of LIMIT_NAMES
    reply_code: int
    text: str  # "NAME - detail (--option)", what the client gets in Connection.Close


@dataclass
class Decision:
    held: list[Key] = field(default_factory=list)  # slots now held: release them when the connection ends
    refusal: Refusal | None = None  # an enforced limit refuses: nothing was acquired
    alarms: list[Refusal] = field(default_factory=list)  # alarm-only limits that would have refused


def _text(reply_code: int, detail: str) -> str:
    return reply_text(f"{c.REPLY_NAMES[reply_code]} - {detail}")


def _rate(rate: float) -> str:
    return f"{rate:g}/s"


class LimitSettings(Protocol):
    """The settings the limits are configured from (config.Config has them)."""

    @property
    def max_connections(self) -> int: ...
    @property
    def max_connections_per_ip(self) -> int: ...
    @property
    def max_connections_per_user(self) -> int: ...
    @property
    def max_connections_per_vhost(self) -> int: ...
    @property
    def connection_rate_per_ip(self) -> float: ...
    @property
    def connection_rate_per_user(self) -> float: ...
    @property
    def client_byte_rate(self) -> int: ...
    @property
    def limit_refusal_delay(self) -> float: ...
    @property
    def limits_alarm_only(self) -> list[str]: ...


class Limits:
    """The limit checks of new client connections, configured from `Config` (reloadable)."""

    def __init__(self, config: LimitSettings, counters: ConnectionCounters | None = None) -> None:
        self.counters = counters if counters is not None else ConnectionCounters()
        self._ip_buckets: dict[str, TokenBucket] = {}
        self._user_buckets: dict[str, TokenBucket] = {}
        self._pruned_at = 0.0
        self.configure(config)

    def configure(self, config: LimitSettings) -> None:
        """Apply (new) settings. Held slots stay counted; a lowered limit refuses new clients only."""
        self.max_connections = config.max_connections
        self.max_per_ip = config.max_connections_per_ip
        self.max_per_user = config.max_connections_per_user
        self.max_per_vhost = config.max_connections_per_vhost
        self.rate_per_ip = config.connection_rate_per_ip
        self.rate_per_user = config.connection_rate_per_user
        self.client_byte_rate = config.client_byte_rate
        self.refusal_delay = config.limit_refusal_delay
        alarm = set(config.limits_alarm_only)
        self.alarm_only = frozenset(LIMIT_NAMES) if "all" in alarm else frozenset(alarm)
        if not self.rate_per_ip:
            self._ip_buckets.clear()
        if not self.rate_per_user:
            self._user_buckets.clear()
        for buckets, rate in ((self._ip_buckets, self.rate_per_ip), (self._user_buckets, self.rate_per_user)):
            for bucket in buckets.values():
                bucket.rate, bucket.burst = rate, max(1.0, rate)

    # ------------------------------------------------------------------ checks

    def admit_address(self, host: str, now: float | None = None) -> Decision:
        """Right after accept (and the PROXY header): the global and per-address limits."""
        counts = [
            (("all", ""), self.max_connections, MAX_CONNECTIONS, lambda n: self._over_global(n)),
            (("ip", host), self.max_per_ip, MAX_CONNECTIONS_PER_IP, lambda n: self._over_ip(host, n)),
        ]
        rate = (self._ip_buckets, host, self.rate_per_ip, CONNECTION_RATE_PER_IP, lambda: self._ip_rate_refusal(host))
        return self._decide(counts, rate, now)

    def admit_user(self, user: str, now: float | None = None) -> Decision:
        """At StartOk, before any upstream work: the per-user limits."""
        counts = [(("user", user), self.max_per_user, MAX_CONNECTIONS_PER_USER, lambda n: self._over_user(user, n))]
        rate = (
            self._user_buckets,
            user,
            self.rate_per_user,
            CONNECTION_RATE_PER_USER,
            lambda: self._user_rate_refusal(user),
        )
        return self._decide(counts, rate, now)

    def admit_vhost(self, vhost: str, user: str) -> Decision:
        """At Connection.Open, before any upstream work: the per-vhost limit."""
        counts = [
            (
                ("vhost", vhost),
                self.max_per_vhost,
                MAX_CONNECTIONS_PER_VHOST,
                lambda n: self._over_vhost(vhost, user, n),
            )
        ]
        return self._decide(counts, None, None)

    def release(self, held: Iterable[Key]) -> None:
        self.counters.release(held)

    def byte_rate_bucket(self, now: float) -> TokenBucket | None:
        """A new connection's --client-byte-rate bucket (one second of burst), or None when off."""
        rate = self.client_byte_rate
        return TokenBucket(rate, rate, now) if rate else None

    # ------------------------------------------------------------------ internals

    def _decide(
        self,
        counts: list[tuple[Key, int, str, Callable[[int], Refusal]]],
        rate: tuple[dict[str, TokenBucket], str, float, str, Callable[[], Refusal]] | None,
        now: float | None,
    ) -> Decision:
        decision = Decision()
        claims: list[tuple[Hashable, int]] = []
        for key, limit, name, refusal_for in counts:
            # Counted even with no limit set, so that a reload that sets one counts everyone.
            enforced = name not in self.alarm_only
            if limit and not enforced and self.counters.count(key) >= limit:
                decision.alarms.append(refusal_for(limit))
            claims.append((key, limit if enforced else 0))
        refused = self.counters.try_acquire(claims)
        if refused is not None:
            for key, limit, _name, refusal_for in counts:
                if key == refused:
                    decision.refusal = refusal_for(limit)
            return decision
        decision.held = [key for key, _limit, _name, _refusal in counts]
        if rate is not None:
            buckets, subject, per_second, name, refusal_for_rate = rate
            if per_second:
                now = time.monotonic() if now is None else now
                bucket = buckets.get(subject)
                if bucket is None:
                    self._prune(now)
                    bucket = buckets[subject] = TokenBucket(per_second, max(1.0, per_second), now)
                if not bucket.take(now):
                    if name in self.alarm_only:
                        decision.alarms.append(refusal_for_rate())
                    else:
                        self.counters.release(decision.held)
                        decision.held = []
                        decision.refusal = refusal_for_rate()
        return decision

    def _prune(self, now: float) -> None:
        """Forget buckets that are full again (their subject has been quiet): memory stays bounded."""
        if now - self._pruned_at < 1.0:
            return
        for buckets in (self._ip_buckets, self._user_buckets):
            if len(buckets) >= _BUCKET_PRUNE_SIZE:
                self._pruned_at = now
                for subject in [s for s, b in buckets.items() if b.full(now)]:
                    del buckets[subject]

    def _over_global(self, limit: int) -> Refusal:
        return Refusal(
            MAX_CONNECTIONS,
            c.RESOURCE_ERROR,
            _text(c.RESOURCE_ERROR, f"proxy connection limit ({limit}) is reached (--max-connections)"),
        )

    def _over_ip(self, host: str, limit: int) -> Refusal:
        return Refusal(
            MAX_CONNECTIONS_PER_IP,
            c.NOT_ALLOWED,
            _text(
                c.NOT_ALLOWED,
                f"connection refused for address '{host}': address connection limit ({limit}) is reached "
                "(--max-connections-per-ip)",
            ),
        )

    def _over_user(self, user: str, limit: int) -> Refusal:
        # RabbitMQ's own text for a user's max-connections, plus the option that set it.
        return Refusal(
            MAX_CONNECTIONS_PER_USER,
            c.NOT_ALLOWED,
            _text(
                c.NOT_ALLOWED,
                f"Connection refused for user '{user}': user connection limit ({limit}) is reached "
                "(--max-connections-per-user)",
            ),
        )

    def _over_vhost(self, vhost: str, user: str, limit: int) -> Refusal:
        # RabbitMQ's own text for a vhost's max-connections, plus the option that set it.
        return Refusal(
            MAX_CONNECTIONS_PER_VHOST,
            c.NOT_ALLOWED,
            _text(
                c.NOT_ALLOWED,
                f"access to vhost '{vhost}' refused for user '{user}': connection limit ({limit}) is reached "
                "(--max-connections-per-vhost)",
            ),
        )

    def _ip_rate_refusal(self, host: str) -> Refusal:
        return Refusal(
            CONNECTION_RATE_PER_IP,
            c.NOT_ALLOWED,
            _text(
                c.NOT_ALLOWED,
                f"connection refused for address '{host}': connection rate limit ({_rate(self.rate_per_ip)}) "
                "is reached (--connection-rate-per-ip)",
            ),
        )

    def _user_rate_refusal(self, user: str) -> Refusal:
        return Refusal(
            CONNECTION_RATE_PER_USER,
            c.NOT_ALLOWED,
            _text(
                c.NOT_ALLOWED,
                f"Connection refused for user '{user}': connection rate limit ({_rate(self.rate_per_user)}) "
                "is reached (--connection-rate-per-user)",
            ),
        )
