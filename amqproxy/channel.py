"""Link: one client channel mapped onto one upstream channel, and its close bookkeeping.

A channel is closed exactly once on each side. Each side (client, upstream) keeps four flags:
Close sent, Close received, Close-Ok sent, Close-Ok received. A side is finished when every
Close it sent was answered and every Close it received was answered; only then is that side's
channel id released (the upstream id after the broker's Close-Ok, never earlier, so a reused id
can never receive a stale reply). Both peers may close at once; RabbitMQ answers a Close on a
closing channel with Close-Ok, so the rule holds then too.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from gevent.event import AsyncResult

from .protocol.rules import ChannelGuard

if TYPE_CHECKING:
    from .client import ClientSession
    from .upstream import Upstream


class Link(ChannelGuard):
    __slots__ = (
        "client",
        "client_channel",
        "upstream",
        "upstream_channel",
        "c_close_sent",
        "c_close_received",
        "c_close_ok_sent",
        "c_close_ok_received",
        "u_close_sent",
        "u_close_received",
        "u_close_ok_sent",
        "u_close_ok_received",
        "pending_declares",
        "pending_deletes",
        "content",
        "closing",
        "waiter",
    )

    def __init__(
        self, client: ClientSession | None, client_channel: int, upstream: Upstream | None, upstream_channel: int
    ) -> None:
        super().__init__()
        self.client = client
        self.client_channel = client_channel
        self.upstream = upstream
        self.upstream_channel = upstream_channel
        self.c_close_sent = self.c_close_received = self.c_close_ok_sent = self.c_close_ok_received = False
        self.u_close_sent = self.u_close_received = self.u_close_ok_sent = self.u_close_ok_received = False
        # Replies the proxy must read (spec: synchronous replies come in request order per channel).
        # Per queue.declare awaiting -ok: (exclusive?, name reserved for this client at send time).
        self.pending_declares: deque[tuple[bool, str | None]] = deque()
        self.pending_deletes: deque[str] = deque()  # queue names per queue.delete awaiting -ok
        # A publish being received from the client (method, header, bodies), remapped, held
        # until complete so that the upstream never sees a partial message.
        self.content = bytearray()
        self.closing = False  # any Close sent or received on either side: only closes matter now
        self.waiter: AsyncResult | None = None  # set by the proxy's own round trips (health checks)

    def client_side_done(self) -> bool:
        if not (self.c_close_sent or self.c_close_received):
            return self.client is None
        return (not self.c_close_received or self.c_close_ok_sent) and (
            not self.c_close_sent or self.c_close_ok_received
        )

    def upstream_side_done(self) -> bool:
        if not (self.u_close_sent or self.u_close_received):
            return False
        return (not self.u_close_sent or self.u_close_ok_received) and (
            not self.u_close_received or self.u_close_ok_sent
        )

    def __repr__(self) -> str:
        return f"Link(c{self.client_channel}->u{self.upstream_channel}{' closing' if self.closing else ''})"

    def begin_close(self) -> None:
        """The channel is closing: forget sequencing state and any half-received message."""
        self.closing = True
        self.reset()
        self.content.clear()
