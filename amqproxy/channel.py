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
from typing import TYPE_CHECKING, Any

from gevent.event import AsyncResult, Event

from .protocol import constants as c
from .protocol.codec import encode_method
from .protocol.frames import method_frame
from .protocol.rules import ChannelGuard
from .recovery import ChannelRecord, ConfirmTracker

CHANNEL_CLOSE_OK = encode_method(c.CHANNEL_CLOSE_OK)  # the payload of a Channel.Close-Ok

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
        "open_pending",
        # recovery (see recovery.py); hot-path counters are plain attributes
        "record",
        "role",
        "delivered",
        "tag_offset",
        "confirm",
        "published",
        "confirms",
        "confirm_offset",
        "swallow_qos_ok",
        "body_due",
        "replay",
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
        self.open_pending = False  # a pipelined upstream channel.open awaits its open-ok (watchdog)
        self.record = ChannelRecord()  # settings, consumers, unanswered requests (control path only)
        self.role: str | None = None  # publish / consume: where it was placed, and is placed again
        self.delivered = 0  # deliveries to the client: the last delivery tag it saw
        self.tag_offset = 0  # client tag = broker tag + offset; non-zero only after a recovery
        self.confirm = False  # confirm.select sent: publishes are counted
        self.published = 0  # publishes since confirm.select: the client's last sequence number
        self.confirms: ConfirmTracker | None = None  # confirms seen (confirm channels, from a first loss)
        self.confirm_offset = 0  # client sequence number = broker's + offset, after a recovery
        self.body_due = 0  # body bytes of a delivery still due to the client (mid-message if > 0)
        self.swallow_qos_ok = 0  # replayed basic.qos whose qos-ok is the proxy's, not the client's
        self.replay: Replay | None = None  # set on a recovery's stand-in link while it replays

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


class Replay:
    """A recovery's stand-in link replaying a channel's setup: how many basic.qos-ok the proxy
    waits for, and the broker's Close if it refused something."""

    __slots__ = ("remaining", "error")

    def __init__(self, remaining: int) -> None:
        self.remaining = remaining
        self.error = ""


class Gap:
    """Where a recovering channel's frames go until its new upstream channel is ready: they are
    held (in the client's own channel id) and forwarded afterwards. Duck-types the parts of
    `Upstream` (and of its outbox) that the client's forwarding loop uses, so that the hot path
    has no recovery branch: past `limit` bytes the client is not read until the gap ends."""

    __slots__ = ("held", "resend", "high_watermark", "max_body", "state", "outbox", "_room")

    def __init__(self, limit: int, max_body: int, resend: list[bytes]) -> None:
        self.held = bytearray()
        # Requests the lost upstream never answered (payloads): sent again before `held`, whose
        # own requests are not among them.
        self.resend = resend
        self.high_watermark = limit
        self.max_body = max_body
        self.state = "recovering"
        self.outbox = self  # the forwarding loop checks `upstream.outbox.buffered` for backpressure
        self._room = Event()

    @property
    def buffered(self) -> int:
        return len(self.held)

    def send(self, data: bytes | bytearray, received_at: float = 0.0) -> None:
        self.held += data

    def send_method(self, channel: int, method: tuple[int, int], **args: Any) -> None:
        self.held += method_frame(channel, encode_method(method, **args))

    def release(self, link: Link) -> None:
        pass

    def close_channel(self, link: Link, reply_code: int = 200, text: str = "") -> None:
        link.begin_close()
        if not link.u_close_sent and not link.u_close_received:
            link.u_close_sent = True
            self.send_method(link.client_channel, c.CHANNEL_CLOSE, reply_code=reply_code, reply_text=text)

    def wait_for_room(self, timeout: float) -> bool:
        return self._room.wait(timeout)

    def end(self) -> None:
        """The gap is over (recovered or failed): a client waiting for room reads on."""
        self.state = "closed"
        self._room.set()
