"""The channel side of a client session: its channels, and what the upstream leg may ask of it.

`ClientChannels` is the base of `ClientSession` (client.py), which adds the connection itself
(socket, handshake, forwarding loop, lifecycle). Here: channel.open is answered by the proxy
itself; the channel's first method reveals its role and places it on an upstream connection
of that role (`Pool.place`); a channel placed with the consumers that starts publishing moves
to a publishing connection when nothing ties it to its first one; control methods are
decoded and checked (`ChannelGuard.check_control`, exclusive queues) before they may reach a
shared connection; the proxy's own channel errors close both sides (`Link.close_event`). And
the `ClientLeg` callbacks of the upstream leg: a lost upstream (close, or `failover`), blocks.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from .channel import BlockingUpstream, ChannelSink, Link
from .failover import Failover
from .protocol import constants as c
from .protocol.closing import CloseEvent
from .protocol.codec import DecodeError, decode_method, encode_method, method_name
from .protocol.errors import ProtocolError
from .protocol.frames import method_frame
from .protocol.handshake import Credentials
from .protocol.rules import CLIENT_CHANNEL_METHODS, QUEUE_ACCESS_METHODS, Role, role_of
from .recovery import ConfirmTracker, Topology, ack_tag
from .upstream import Upstream
from .upstream_handshake import UpstreamError

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics
    from .outbox import Outbox
    from .pool import Pool

log = logging.getLogger("amqproxy.client")

_ACK_ARGS = struct.Struct(">QB")
_CHANNEL_OPEN = encode_method(c.CHANNEL_OPEN)
_CHANNEL_OPEN_OK = encode_method(c.CHANNEL_OPEN_OK)
_UNBLOCKED = method_frame(0, encode_method(c.CONNECTION_UNBLOCKED))


class ClientChannels:
    """A client's channels (see the module docstring); the connection is the subclass's."""

    # Set by the session (client.py) for its connection.
    id: str
    config: Config
    pool: Pool
    metrics: Metrics
    outbox: Outbox
    closing: bool
    max_body: int
    channel_max: int
    capabilities: frozenset[str]
    credentials: Credentials | None
    vhost: str | None
    pool_key: tuple[str, str, str]
    throttled: bool
    last_recv: float

    def __init__(self) -> None:
        self.channels: dict[int, Link] = {}
        self.topology = Topology()  # what this client declared, for recovery (control path only)
        self.preferred: dict[Role, Upstream] = {}  # role -> the upstream this client's channels use
        self.upstream_ids: set[int] = set()  # every upstream connection its channels used (audit)
        self.blocked_by: set[BlockingUpstream] = set()
        self._batches: defaultdict[ChannelSink, bytearray] = defaultdict(bytearray)  # this read's frames, per upstream
        self._received_at = 0.0  # when the read that brought this batch's frames returned
        self._delivered_before = 0  # deliveries on channels it no longer has (messages_out)

    # The connection's, in client.py.

    def deliver(self, data: bytes | bytearray, received_at: float) -> None:
        raise NotImplementedError

    def close_connection(
        self, reply_code: int, text: str, method: tuple[int, int] = (0, 0), kind: str | None = None
    ) -> None:
        raise NotImplementedError

    def log_extra(self, event: str, **fields: Any) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def username(self) -> str:
        return self.credentials.username if self.credentials is not None else ""

    @property
    def messages_out(self) -> int:
        """Deliveries to the client: each channel counts its own (`Link.delivered`)."""
        return self._delivered_before + sum(link.delivered for link in self.channels.values())

    # ------------------------------------------------------------------ batches of the forwarding loop

    def _flush(self) -> None:
        """Hand this read's frames to their upstreams, in order; wait if an upstream is backed up."""
        batches = self._batches
        if not batches:
            return
        received_at = self._received_at
        for upstream, out in batches.items():
            upstream.send(out, received_at)
        backed_up = [sink for sink in batches if sink.backed_up()]
        batches.clear()
        for sink in backed_up:
            # Backpressure: a publisher faster than its upstream waits here, its socket unread,
            # as RabbitMQ itself stops reading a connection under flow control.
            self.throttled = True
            try:
                while not sink.wait_for_room(1.0) and not self.closing:
                    pass
            finally:
                self.throttled = False
                self.last_recv = time.monotonic()

    # ------------------------------------------------------------------ channels

    def _open_channel(self, channel: int) -> None:
        """channel.open is answered by the proxy; the upstream channel is opened at the first method,
        when the channel's role (publishing or consuming) decides where it goes."""
        if channel > self.channel_max:
            raise ProtocolError(c.CHANNEL_ERROR, f"channel id {channel} out of range (channel_max {self.channel_max})")
        link = Link(self, channel, None, 0)
        self.channels[channel] = link
        self.metrics.channel_opened(self.vhost, self.username)
        self.outbox.put(method_frame(channel, _CHANNEL_OPEN_OK))

    def _place(self, link: Link, method: tuple[int, int]) -> bool:
        """First method on a channel: open its upstream channel; returns whether to forward `method`."""
        if method == c.CHANNEL_CLOSE or method == c.CHANNEL_CLOSE_OK:
            # Nothing upstream to close: a Close is answered here.
            self._on_closing_channel_method(link, method)
            return False
        if method == c.CHANNEL_OPEN:
            raise ProtocolError(c.CHANNEL_ERROR, "second 'channel.open' seen", method)
        self._flush()  # placement may have to dial: what was read before goes first
        self.throttled = True  # not reading the client meanwhile is our doing, not a missed heartbeat
        role = link.role = role_of(method) if self.config.separate_publishers else Role.ANY
        try:
            upstream, opened = self.pool.place(self, link, role)
        except UpstreamError as exc:
            if exc.reply_code:  # e.g. 506 with its own text
                raise ProtocolError(exc.reply_code, exc.text, method) from exc
            raise ProtocolError(c.CONNECTION_FORCED, f"upstream unavailable: {exc.text}", method) from exc
        finally:
            self.throttled = False
            self.last_recv = time.monotonic()
        if self.closing or link.client is None:
            # Closed by another greenlet while we waited: the channel is nobody's now.
            link.client = None
            if opened:
                link.close_upstream(200, "client connection closed")
            else:
                upstream.release(link)
            return False
        self.placed_on(role, upstream)
        if not opened:
            self._batches[upstream] += method_frame(link.upstream_channel, _CHANNEL_OPEN)
        upstream.tell_blocked(self)
        return True

    def _movable(self, link: Link) -> bool:
        """A channel placed with the consumers (its first method was, say, queue.declare) now
        publishes: may it move to a publishing connection? Only if nothing ties it to this one."""
        upstream = link.upstream
        return (
            self.config.separate_publishers
            and self.pool.exclusive.pinned(self) is None  # exclusive queues pin the client (Pool._choose)
            and upstream is not None
            and upstream.alive  # not a recovery's Gap
            and not link.record.pending  # an unanswered request would be overtaken
            and not link.record.unconfirmed  # so would a nowait one
            and not link.record.settings  # no qos or consumers to carry over
            and not link.confirm  # confirm and tx modes belong to the channel (and its numbering)
            and not link.record.tx
            and not link.consumer_tags
            and not link.delivered  # delivery tags are per channel
            and not link.tag_offset
            and not link.closing
        )

    def _move_to_publishers(self, link: Link) -> bool:
        """Give the channel a fresh upstream channel on a publishing connection: RabbitMQ's flow
        control and memory alarm block a connection that publishes, and the consumers placed on
        this one must not be blocked with it. The old upstream channel is closed by a stand-in
        link that no client hears from; everything the client sent before goes out first."""
        old = link.upstream
        assert isinstance(old, Upstream)
        self._flush()
        stand_in = Link(None, link.client_channel, old, link.upstream_channel)
        old.replace_link(link.upstream_channel, stand_in)
        stand_in.close_upstream(200, "channel moved to a publishing connection")
        if old in self.blocked_by and not any(
            other.upstream is old for other in self.channels.values() if other is not link
        ):
            old.forget_blocked(self)
            self.upstream_unblocked(old)
        link.unplace()
        self.metrics.channel_moved(self.vhost)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "channel moved to a publishing connection",
                extra=self.log_extra("channel_moved", channel=link.client_channel, upstream_id=old.id),
            )
        return self._place(link, c.BASIC_PUBLISH)  # False: the client left meanwhile

    def _on_control_method(self, link: Link, method: tuple[int, int], payload: memoryview) -> bool:
        """Check and interpret a control-plane method; returns whether to forward the frame."""
        if method == c.CHANNEL_OPEN:
            raise ProtocolError(c.CHANNEL_ERROR, "second 'channel.open' seen", method)
        link.on_method(method)
        if method not in CLIENT_CHANNEL_METHODS:
            raise ProtocolError(c.COMMAND_INVALID, f"unimplemented method {method_name(method)}", method)
        try:
            method, args = decode_method(payload)
        except DecodeError as exc:
            raise ProtocolError(c.FRAME_ERROR, f"cannot decode {method_name(method)}: {exc}", method) from exc
        link.check_control(method, args)
        if method == c.CHANNEL_CLOSE:
            link.close_event(CloseEvent.CLIENT_CLOSE)  # forwarded: the broker's Close-Ok answers it
            return True
        if method == c.CHANNEL_CLOSE_OK:
            return False  # nothing to acknowledge on an open channel
        if method in QUEUE_ACCESS_METHODS:
            queue = args["queue"]
            owner = self.pool.exclusive.owner(self.vhost or "", queue) if queue else None
            if owner is not None and owner is not self:
                self._proxy_close_channel(
                    link,
                    c.RESOURCE_LOCKED,
                    f"cannot obtain exclusive access to locked queue '{queue}' in vhost '{self.vhost}'. "
                    "It could be originally declared on another connection or the exclusive property "
                    "value does not match that of the original declaration.",
                    method,
                )
                return False
            if method == c.QUEUE_DECLARE:
                exclusive = args["exclusive"] and not args["passive"]
                reserved = None
                if exclusive and queue and owner is None and isinstance(link.upstream, Upstream):
                    # Reserve the name now: a second client declaring it before our declare-ok
                    # must get 405, as it would from the broker on its own connection.
                    self.pool.exclusive.add(self.vhost or "", queue, self, link.upstream)
                    reserved = queue
                if not args["nowait"]:
                    link.pending_declares.append((exclusive, reserved))
            elif method == c.QUEUE_DELETE:
                if args["nowait"]:
                    self.pool.exclusive.remove(self.vhost or "", queue)
                else:
                    link.pending_deletes.append(queue)
            elif method == c.BASIC_CONSUME and args["consumer_tag"]:
                link.consumer_tags.add(args["consumer_tag"])
        elif method == c.BASIC_CANCEL and args["nowait"]:
            link.consumer_tags.discard(args["consumer_tag"])  # no cancel-ok will come
        elif method == c.CONFIRM_SELECT and not link.confirm:
            link.confirm = True  # the broker numbers publishes from here
            link.confirms = ConfirmTracker()
        link.record.request(method, args, bytes(payload), self.topology)
        return True

    def _renumber_ack(self, link: Link, method: tuple[int, int], buf: bytearray, start: int) -> bytes | None:
        """A client ack/nack/reject on a recovered channel, in the broker's numbering; None when it
        names a delivery from before the recovery (dropped: the broker requeued it already)."""
        tag, bits = _ACK_ARGS.unpack_from(buf, start + 4)
        upstream_tag = ack_tag(tag, method != c.BASIC_REJECT and bool(bits & 1), link.tag_offset)
        if upstream_tag is None:
            self.metrics.stale_ack()
            return None
        return bytes(buf[start : start + 4]) + _ACK_ARGS.pack(upstream_tag, bits)

    def _on_closing_channel_method(self, link: Link, method: tuple[int, int]) -> None:
        """On a closing (or never placed) channel only Close and Close-Ok matter (spec 1.5.2.5);
        the rest is dropped. A duplicate Close never reaches the shared connection."""
        if link.client is None:
            return  # the session was torn down meanwhile (e.g. while flushing); nothing is ours
        if method == c.CHANNEL_CLOSE:
            to_client, _ = link.close_event(CloseEvent.CLIENT_CLOSE)
        elif method == c.CHANNEL_CLOSE_OK:
            to_client, _ = link.close_event(CloseEvent.CLIENT_CLOSE_OK)
        else:
            return
        if to_client:
            self.outbox.put(to_client)

    def _proxy_close_channel(self, link: Link, reply_code: int, detail: str, method: tuple[int, int]) -> None:
        """A channel error decided by the proxy: Close to the client, and the upstream channel closed."""
        error = ProtocolError(reply_code, detail, method)
        log.info(
            "channel closed by proxy",
            extra=self.log_extra(
                "channel_error", channel=link.client_channel, reply_code=reply_code, reply_text=error.text
            ),
        )
        to_client, _ = link.close_event(CloseEvent.CLIENT_ERROR, reply_code, error.text, method)
        self.outbox.put(to_client)
        if link.upstream is not None:
            self._flush()  # what the client sent before this method goes first
            link.close_upstream(200, "closed by amqproxy")

    def _release_channels(self) -> None:
        """Close the upstream side of every channel exactly once; the client side ends with us.
        Frames already accepted this read (a pipelined publish, say) go out first, in the same
        write as the closes: one write per upstream connection."""
        batches = self._batches
        links = list(self.channels.values())
        self.channels.clear()
        for link in links:
            self._delivered_before += link.delivered
            self.metrics.channel_closed(self.vhost, self.username)
        for link in links:
            link.client = None
            upstream = link.upstream
            if upstream is not None and not upstream.alive:  # a dead connection, or a recovery's gap
                upstream.release(link)
                link.close_event(CloseEvent.UPSTREAM_GONE)
            batch = batches[upstream] if upstream is not None and upstream.alive else None
            link.close_event(CloseEvent.CLIENT_GONE, 200, "client connection closed", into=batch)
        for destination, out in batches.items():
            destination.send(out)
        batches.clear()

    def forget(self, link: Link) -> None:
        if self.channels.get(link.client_channel) is link:
            del self.channels[link.client_channel]
            self._delivered_before += link.delivered
            self.metrics.channel_closed(self.vhost, self.username)

    # ------------------------------------------------------------------ called by the upstream leg and failover

    def send_to_client(self, data: bytes | bytearray) -> None:
        self.outbox.put(data)

    def placed_on(self, role: Role, upstream: Upstream) -> None:
        self.preferred[role] = upstream
        self.upstream_ids.add(upstream.id)

    def upstream_lost(self, upstream: ChannelSink, node: str, cause: str, links: list[Link]) -> None:
        """`upstream` died with these channels of ours on it: fail them over, or close with 320."""
        if self.closing:
            return
        if self.config.upstream_failure == "recover" and not self.pool.stopping and self.vhost is not None:
            Failover(self, node, cause).begin(upstream, links)
            return
        self.close_connection(
            c.CONNECTION_FORCED, f"CONNECTION_FORCED - upstream connection lost: {cause}", kind="upstream_lost"
        )

    def upstream_blocked(self, upstream: BlockingUpstream, reason: str) -> bool:
        if "connection.blocked" not in self.capabilities or self.closing:
            return False
        if not self.blocked_by:
            self.outbox.put(method_frame(0, encode_method(c.CONNECTION_BLOCKED, reason=reason)))
        self.blocked_by.add(upstream)
        return True

    def upstream_unblocked(self, upstream: BlockingUpstream) -> None:
        if upstream not in self.blocked_by:
            return
        self.blocked_by.discard(upstream)
        if not self.blocked_by and not self.closing:
            self.outbox.put(_UNBLOCKED)
