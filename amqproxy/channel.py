"""Where the two legs of the proxy meet: one client channel mapped onto one upstream channel.

`Link` is that mapping. A client session (client.py) and an upstream connection (upstream.py)
never import each other: each reaches the other only through a link, typed by the narrow
interfaces here, `ClientLeg` (what an upstream and a channel may call on the client) and
`ChannelSink` (where a channel's frames go: an upstream connection, or the `Gap` that holds
them while a recovery re-establishes the channel).

A channel is closed exactly once on each side: `client_side` and `upstream_side` are the two
states of `protocol.closing`, and `close_event` is the one place they change, through its
transition table; it carries out the table's effects (frames to the broker, releasing the
upstream id, forgetting the client id) and hands back what goes to the client, which the
caller puts in order with the other frames of its read.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from gevent.event import AsyncResult, Event

from .protocol import constants as c
from .protocol.closing import TABLE, ClientSide, CloseEvent, Effect, UpstreamSide, is_closing
from .protocol.codec import encode_method
from .protocol.frames import method_frame
from .protocol.rules import ChannelGuard, Role
from .recovery import ChannelRecord, ConfirmTracker, Topology

CHANNEL_CLOSE_OK = encode_method(c.CHANNEL_CLOSE_OK)  # the payload of a Channel.Close-Ok
# The client side of a channel that was sent a Close (or is over): the broker's frames for it
# are dropped, only the close handshakes matter (spec 1.5.2.5).
_CLIENT_NOT_LISTENING = frozenset({ClientSide.CLOSE_SENT, ClientSide.CROSSED, ClientSide.DONE})


class ChannelSink(Protocol):
    """Where a channel's frames go: an upstream connection, or a recovery's gap."""

    max_body: int  # body frames larger than this are split on the way in

    @property
    def alive(self) -> bool:
        """An open connection to the broker (a gap is not one: what it holds waits)."""

    def send(self, data: bytes | bytearray, received_at: float = 0.0) -> None:
        """Whole frames, already on this sink's channel ids."""

    def send_method(self, channel: int, method: tuple[int, int], **args: Any) -> None:
        """One method frame, encoded here."""

    def release(self, link: Link) -> None:
        """The channel id of `link` is free again (no reply for it can come any more)."""

    def drain(self, link: Link, into: bytearray | None = None) -> None:
        """`link` is done with its channel id, but the broker may still answer a Close on it
        (closes crossed): the id is reopened (channel.open sent, or appended to `into`) and
        freed only after that open-ok and a close of its own."""

    def backed_up(self) -> bool:
        """More is queued than the sink takes: its producer waits before reading more."""

    def wait_for_room(self, timeout: float) -> bool:
        """Block until the backlog is low again (True) or `timeout` passes (False)."""


class BlockingUpstream(Protocol):
    """An upstream connection that told a client it is blocked (connection.blocked)."""

    def forget_blocked(self, client: ClientLeg) -> None:
        """The client is gone: it needs no connection.unblocked any more."""


class ClientLeg(Protocol):
    """A client session as its upstream connections and channels see it."""

    id: str  # for logs and the admin API
    closing: bool  # a Connection.Close is under way: only Close-Ok may still reach it
    max_body: int  # the client's frame_max less the frame overhead: larger bodies are split
    capabilities: frozenset[str]  # from its StartOk (consumer_cancel_notify, connection.blocked...)
    topology: Topology  # what it declared, recorded when the broker accepts it (for recovery)

    def deliver(self, data: bytes | bytearray, received_at: float) -> None:
        """Whole frames for the client, already on its channel ids; never blocks the caller."""

    def forget(self, link: Link) -> None:
        """The client channel id of `link` is free again."""

    def upstream_lost(self, upstream: ChannelSink, node: str, cause: str, links: list[Link]) -> None:
        """`upstream` (to `node`) died with these channels of the client on it."""

    def close_connection(
        self, reply_code: int, text: str, method: tuple[int, int] = (0, 0), kind: str | None = None
    ) -> None:
        """Connection.Close to the client (e.g. the broker's own, when the client's method made
        the broker close a shared upstream connection); never blocks."""

    def upstream_blocked(self, upstream: BlockingUpstream, reason: str) -> bool:
        """The broker blocked `upstream` (connection.blocked); whether the client was told."""

    def upstream_unblocked(self, upstream: BlockingUpstream) -> None:
        """The block of `upstream` is over."""


class Link(ChannelGuard):
    __slots__ = (
        "client",
        "client_channel",
        "upstream",
        "upstream_channel",
        "client_side",
        "upstream_side",
        "closing",
        "pending_declares",
        "pending_deletes",
        "content",
        "waiter",
        "cleaned",
        "open_pending",
        "draining",
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
        self, client: ClientLeg | None, client_channel: int, upstream: ChannelSink | None, upstream_channel: int
    ) -> None:
        super().__init__()
        self.client = client
        self.client_channel = client_channel
        self.upstream = upstream
        self.upstream_channel = upstream_channel
        # A link without a client (the proxy's own: a stand-in, a cleanup) has no client side.
        self.client_side = ClientSide.OPEN if client is not None else ClientSide.DONE
        self.upstream_side = UpstreamSide.OPEN if upstream is not None else UpstreamSide.NONE
        # Derived from the two sides (kept as a plain attribute: the loops read it per frame).
        self.closing = is_closing(self.client_side, self.upstream_side)
        # Replies the proxy must read (spec: synchronous replies come in request order per channel).
        # Per queue.declare awaiting -ok: (exclusive?, name reserved for this client at send time).
        self.pending_declares: deque[tuple[bool, str | None]] = deque()
        self.pending_deletes: deque[str] = deque()  # queue names per queue.delete awaiting -ok
        # A publish being received from the client (method, header, bodies), remapped, held
        # until complete so that the upstream never sees a partial message.
        self.content = bytearray()
        self.waiter: AsyncResult | None = None  # set by the proxy's own round trips (health checks)
        # A cleanup channel's (Upstream.delete_queues): True at the broker's Close-Ok, which
        # follows the queue.delete sent before the Close on the same channel.
        self.cleaned: AsyncResult | None = None
        self.open_pending = False  # a pipelined upstream channel.open awaits its open-ok (watchdog)
        self.draining = False  # the proxy's own: reopened an id after crossing closes (Upstream.drain)
        self.record = ChannelRecord()  # settings, consumers, unanswered requests (control path only)
        self.role: Role | None = None  # where it was placed, and is placed again
        self.delivered = 0  # deliveries to the client: the last delivery tag it saw
        self.tag_offset = 0  # client tag = broker tag + offset; non-zero only after a recovery
        self.confirm = False  # confirm.select sent: publishes are counted
        self.published = 0  # publishes since confirm.select: the client's last sequence number
        self.confirms: ConfirmTracker | None = None  # confirms seen (confirm channels, from a first loss)
        self.confirm_offset = 0  # client sequence number = broker's + offset, after a recovery
        self.body_due = 0  # body bytes of a delivery still due to the client (mid-message if > 0)
        self.swallow_qos_ok = 0  # replayed basic.qos whose qos-ok is the proxy's, not the client's
        self.replay: Replay | None = None  # set on a recovery's stand-in link while it replays

    def __repr__(self) -> str:
        return f"Link(c{self.client_channel}->u{self.upstream_channel}{' closing' if self.closing else ''})"

    @property
    def client_not_listening(self) -> bool:
        """The client was sent a Close (or its side is over): the broker's frames are dropped."""
        return self.client_side in _CLIENT_NOT_LISTENING

    def placed(self, upstream: ChannelSink, upstream_channel: int) -> None:
        """The channel now has a fresh upstream channel."""
        self.upstream = upstream
        self.upstream_channel = upstream_channel
        self.upstream_side = UpstreamSide.OPEN

    def hold_in(self, gap: Gap) -> None:
        """A recovery holds the channel's frames (in the client's own channel id) until it moves."""
        self.upstream = gap
        self.upstream_channel = self.client_channel

    def moved_to(self, upstream: ChannelSink, upstream_channel: int) -> None:
        """Recovered onto a fresh upstream channel; the close state carries over (a Close held
        in the gap goes out on the new channel)."""
        self.upstream = upstream
        self.upstream_channel = upstream_channel

    def unplace(self) -> None:
        """The channel leaves its upstream channel (to get a fresh one elsewhere)."""
        self.upstream = None
        self.upstream_channel = 0
        self.upstream_side = UpstreamSide.NONE

    def close_event(
        self,
        event: CloseEvent,
        reply_code: int = 200,
        text: str = "",
        method: tuple[int, int] = (0, 0),
        into: bytearray | None = None,
    ) -> tuple[bytes, bool]:
        """Apply one close event (protocol.closing). Frames to the broker are sent (or appended
        to `into`, a batch the caller writes) and ids freed here; returns (frames of ours for the
        client, whether to forward the frame that caused the event). `reply_code`, `text` and
        `method` are those of a Close the proxy sends."""
        was_closing = self.closing
        self.client_side, self.upstream_side, effects = TABLE[(self.client_side, self.upstream_side, event)]
        self.closing = closing = is_closing(self.client_side, self.upstream_side)
        if closing and not was_closing:
            # Closing from now on: forget sequencing state and any half-received message.
            self.reset()
            self.content.clear()
        to_client = b""
        forward = False
        upstream = self.upstream
        for effect in effects:
            if effect is Effect.CLIENT_CLOSE:
                to_client += method_frame(
                    self.client_channel,
                    encode_method(
                        c.CHANNEL_CLOSE, reply_code=reply_code, reply_text=text, class_id=method[0], method_id=method[1]
                    ),
                )
            elif effect is Effect.CLIENT_CLOSE_OK:
                to_client += method_frame(self.client_channel, CHANNEL_CLOSE_OK)
            elif effect is Effect.FORWARD_TO_CLIENT or effect is Effect.FORWARD_UPSTREAM:
                forward = True
            elif upstream is None:
                continue
            elif effect is Effect.UPSTREAM_CLOSE or effect is Effect.UPSTREAM_CLOSE_OK:
                payload = (
                    encode_method(c.CHANNEL_CLOSE, reply_code=reply_code, reply_text=text)
                    if effect is Effect.UPSTREAM_CLOSE
                    else CHANNEL_CLOSE_OK
                )
                if into is not None:
                    into += method_frame(self.upstream_channel, payload)
                else:
                    upstream.send(method_frame(self.upstream_channel, payload))
            elif effect is Effect.RELEASE:
                upstream.release(self)
            elif effect is Effect.DRAIN:
                upstream.drain(self, into)
        if event is CloseEvent.UPSTREAM_GONE:
            self.upstream = None
        if Effect.FORGET in effects and self.client is not None:
            self.client.forget(self)
        return to_client, forward

    def close_upstream(self, reply_code: int = 200, text: str = "closed by amqproxy") -> None:
        """The proxy closes the upstream side (Close, or Close-Ok if the broker closed first)."""
        self.close_event(CloseEvent.UPSTREAM_CLOSE, reply_code, text)


class Replay:
    """A recovery's stand-in link replaying a channel's setup: how many basic.qos-ok the proxy
    waits for, and the broker's Close if it refused something."""

    __slots__ = ("remaining", "error")

    def __init__(self, remaining: int) -> None:
        self.remaining = remaining
        self.error = ""


class Gap:
    """Where a recovering channel's frames go until its new upstream channel is ready: they are
    held (in the client's own channel id) and forwarded afterwards. A `ChannelSink` like an
    upstream connection, so that the hot path has no recovery branch: past `limit` bytes it is
    backed up, and the client is not read until the gap ends."""

    __slots__ = ("held", "resend", "limit", "max_body", "_room")
    alive = False  # not a connection: nothing held is written anywhere until the gap ends

    def __init__(self, limit: int, max_body: int, resend: list[bytes]) -> None:
        self.held = bytearray()
        # Requests the lost upstream never answered (payloads): sent again before `held`, whose
        # own requests are not among them.
        self.resend = resend
        self.limit = limit
        self.max_body = max_body
        self._room = Event()

    def backed_up(self) -> bool:
        return len(self.held) > self.limit

    def send(self, data: bytes | bytearray, received_at: float = 0.0) -> None:
        self.held += data

    def send_method(self, channel: int, method: tuple[int, int], **args: Any) -> None:
        self.held += method_frame(channel, encode_method(method, **args))

    def release(self, link: Link) -> None:
        pass

    def drain(self, link: Link, into: bytearray | None = None) -> None:
        pass  # a gap has no channel ids: the broker never closes a channel held in one

    def wait_for_room(self, timeout: float) -> bool:
        return self._room.wait(timeout)

    def end(self) -> None:
        """The gap is over (recovered or failed): a client waiting for room reads on."""
        self._room.set()
