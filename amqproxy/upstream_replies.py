"""What the reader of an upstream connection makes of the broker's replies (control plane only).

`UpstreamReplies` is mixed into `upstream.Upstream`. For the methods in `WATCHED` the reader
asks `_on_watched` whether to pass the frame on to the client (or what to pass instead, a
renumbered payload after a recovery): channel close handshakes (`Link.close_event`), the
channel.open-ok of the proxy's own round trips, exclusive queues, consumer tags, the replies
recovery records, tx.commit-ok, publisher confirms, and a recovery's stand-in replays.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Protocol

from .channel import CHANNEL_CLOSE_OK, Link
from .protocol import constants as c
from .protocol.closing import CloseEvent
from .protocol.codec import decode_method
from .recovery import BASIC_QOS_OK, REPLY_METHODS, delivery_tag_position, shift_tag

if TYPE_CHECKING:
    from .channel import ClientLeg
    from .exclusive import ExclusiveQueues

# Broker methods the reader interprets: channel state, exclusive queues, consumer tags, the
# replies to synchronous requests (recorded for recovery, control plane only) and, on confirm
# channels, publisher confirms.
WATCHED = frozenset(
    {
        c.CHANNEL_OPEN_OK,
        c.CHANNEL_CLOSE,
        c.CHANNEL_CLOSE_OK,
        c.BASIC_CANCEL,
        c.BASIC_ACK,
        c.BASIC_NACK,
    }
    | REPLY_METHODS
)
_TX_COMMIT_OK = (90, 21)
_CONFIRMS = frozenset({c.BASIC_ACK, c.BASIC_NACK})
_U64_BIT = struct.Struct(">QB")


class _RepliesPool(Protocol):
    """What the reply interpretation uses of the pool: its registry of exclusive queues."""

    @property
    def exclusive(self) -> ExclusiveQueues[ClientLeg, Any]: ...


class UpstreamReplies:
    """The reply methods of `Upstream` (the attributes below are the connection's own)."""

    pool: _RepliesPool
    vhost: str | None

    def send_method(self, channel: int, method: tuple[int, int], **args: object) -> None:
        raise NotImplementedError

    def delete_queues(self, names: list[str]) -> list[Any]:
        raise NotImplementedError

    def _on_watched(self, link: Link, method: tuple[int, int], payload: memoryview) -> bool | bytes:
        """Update channel state from a broker reply; return whether to forward it to the client,
        or the payload to forward instead (renumbered after a recovery)."""
        client = link.client
        if method == c.CHANNEL_OPEN_OK:
            link.open_pending = False
        if link.replay is not None:
            return self._on_replay(link, method, payload)
        if method in _CONFIRMS:
            return self._on_confirm(link, payload)
        if method == c.CHANNEL_CLOSE_OK:
            return self._close_event(link, CloseEvent.BROKER_CLOSE_OK)
        if method == c.CHANNEL_CLOSE:
            # Declares the broker will now never answer: drop the names reserved for them.
            for _exclusive, reserved in link.pending_declares:
                if reserved is not None and client is not None:
                    self.pool.exclusive.remove_if_owner(self.vhost or "", reserved, client)
            link.pending_declares.clear()
            link.record.pending.clear()
            return self._close_event(link, CloseEvent.BROKER_CLOSE)
        if method == c.CHANNEL_OPEN_OK:
            # The proxy answered the client's channel.open itself (placement is deferred to the
            # channel's first method), so this reply is the proxy's own.
            if link.waiter is not None:
                link.waiter.set(True)
            elif link.draining:
                link.close_upstream(200, "channel id drained after crossing closes")
            return False
        name = ""
        forward: bool | bytes = True
        if method == c.QUEUE_DECLARE_OK:
            _, args = decode_method(payload)
            name = args["queue"]
            if link.pending_declares and link.pending_declares.popleft()[0]:
                if client is not None and not client.closing:
                    self.pool.exclusive.add(self.vhost or "", name, client, self)
                else:
                    # Its client is gone or leaving: the queue must not outlive it on this
                    # shared connection.
                    self.delete_queues([name])
            forward = not link.client_not_listening
        elif method == c.QUEUE_DELETE_OK:
            if link.pending_deletes:
                self.pool.exclusive.remove(self.vhost or "", link.pending_deletes.popleft())
            forward = not link.client_not_listening
        elif link.closing and link.client_not_listening:
            # The client was sent a Close (by the broker or the proxy): only Close-Ok matters now.
            # After the client's own Close, replies still in flight (commit-ok...) go through.
            return False
        elif method == c.BASIC_CONSUME_OK:
            _, args = decode_method(payload)
            name = args["consumer_tag"]
            link.consumer_tags.add(name)
        elif method == c.BASIC_CANCEL_OK:
            _, args = decode_method(payload)
            link.consumer_tags.discard(args["consumer_tag"])
        elif method == c.BASIC_CANCEL:
            _, args = decode_method(payload)
            link.consumer_tags.discard(args["consumer_tag"])
            link.record.cancelled(args["consumer_tag"])
            # Consumer cancel notify goes only to clients that advertised it (as RabbitMQ does).
            return client is not None and "consumer_cancel_notify" in client.capabilities
        elif method == _TX_COMMIT_OK:
            link.commit_pending = False
        elif method == BASIC_QOS_OK and link.swallow_qos_ok:
            link.swallow_qos_ok -= 1  # the answer to a basic.qos replayed by a recovery
            return False
        elif method == c.BASIC_GET_OK and client is not None:
            link.delivered += 1
            if link.tag_offset:
                position = delivery_tag_position(method, payload, 0)
                forward = shift_tag(payload, 0, len(payload), position, link.tag_offset)
        link.record.reply(method, name, client.topology if client is not None else None)
        return forward

    def _on_confirm(self, link: Link, payload: memoryview) -> bool | bytes:
        """basic.ack/nack from the broker (publisher confirms): bookkeeping only once the channel
        went through a recovery (then renumbered into the client's sequence)."""
        if link.closing and link.client_not_listening:
            return False
        tracker = link.confirms
        if tracker is None:
            return True
        tag, bits = _U64_BIT.unpack_from(payload, 4)
        offset = link.confirm_offset
        tracker.confirmed(tag + offset, bool(bits & 1))
        if not offset:
            return True
        return shift_tag(payload, 0, len(payload), 4, offset)

    def _on_replay(self, link: Link, method: tuple[int, int], payload: memoryview) -> bool:
        """A recovery's stand-in link: nothing reaches the client; count the replay's qos-oks."""
        replay = link.replay
        assert replay is not None
        if method == c.CHANNEL_CLOSE:
            _, args = decode_method(payload)
            replay.error = f"{args['reply_code']} {args['reply_text']}"
            link.close_event(CloseEvent.BROKER_CLOSE)
            if link.waiter is not None:
                link.waiter.set(False)
        elif method == c.CHANNEL_CLOSE_OK:
            link.close_event(CloseEvent.BROKER_CLOSE_OK)
        elif method == BASIC_QOS_OK:
            replay.remaining -= 1
            if replay.remaining <= 0 and link.waiter is not None:
                link.waiter.set(True)
        return False

    @staticmethod
    def _close_event(link: Link, event: CloseEvent) -> bool | bytes:
        """A Close or Close-Ok from the broker: what the read loop passes on to the client (the
        broker's frame, or a Close-Ok of ours answering the client's own Close)."""
        to_client, forward = link.close_event(event)
        if link.cleaned is not None:  # a cleanup channel's queue.delete is done (or refused)
            link.cleaned.set(event is CloseEvent.BROKER_CLOSE_OK)
            link.cleaned = None
        # A broker Close or Close-Ok yields no Close of ours for the client, at most a Close-Ok.
        return CHANNEL_CLOSE_OK if to_client else forward
