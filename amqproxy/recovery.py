"""Transparent recovery (`--upstream-failure recover`): what a client channel set up, and the
numbering that must stay continuous for the client when its upstream channel is replaced.

Pure bookkeeping, no sockets; `ClientSession` drives it (see docs/ARCHITECTURE.md, "Recovery").

- `Topology` (per client connection, like the Java client's topology recovery): exchanges,
  queues and bindings the client declared, recorded from the broker's -ok only, dropped on
  delete. Exclusive, auto-delete and server-named queues are not recoverable (they die with the
  upstream connection, or come back under another name): they are never re-declared, and
  consumers on them are cancelled.
- `ChannelRecord` (per channel): the channel's settings and consumers in the order the broker
  accepted them (basic.qos, basic.consume, confirm.select, tx.select), and every synchronous
  request still waiting for its reply (re-sent after a recovery, so that the client gets it).
- `ConfirmTracker` (per confirm channel, built at the first loss): which publish sequence
  numbers the client still waits for; they are nacked at the loss.
- Delivery tags: after a recovery the broker numbers deliveries from 1 again; the client sees
  `upstream tag + offset`, where offset is the last tag it saw before the loss. `ack_tag`
  translates a client ack/nack/reject, or drops it when it names a tag from before the loss
  (the broker requeued those messages already).

Replays use the client's own method payloads (raw bytes, arguments table included) wherever
possible, so that what the broker sees again is exactly what it accepted before.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

from .protocol import constants as c
from .protocol.codec import encode_method, encode_shortstr

_U64 = struct.Struct(">Q")

# Synchronous client requests (0-9-1 spec: "synchronous request") and the replies that answer
# them, in order, per channel. A request sent with nowait=true has no reply.
REPLIES: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {
    c.CHANNEL_FLOW: (c.CHANNEL_FLOW_OK,),
    c.EXCHANGE_DECLARE: ((40, 11),),
    c.EXCHANGE_DELETE: ((40, 21),),
    c.EXCHANGE_BIND: ((40, 31),),
    c.EXCHANGE_UNBIND: ((40, 51),),
    c.QUEUE_DECLARE: (c.QUEUE_DECLARE_OK,),
    c.QUEUE_BIND: ((50, 21),),
    c.QUEUE_PURGE: ((50, 31),),
    c.QUEUE_DELETE: (c.QUEUE_DELETE_OK,),
    c.QUEUE_UNBIND: ((50, 51),),
    c.BASIC_QOS: ((60, 11),),
    c.BASIC_CONSUME: (c.BASIC_CONSUME_OK,),
    c.BASIC_CANCEL: (c.BASIC_CANCEL_OK,),
    c.BASIC_GET: (c.BASIC_GET_OK, c.BASIC_GET_EMPTY),
    c.BASIC_RECOVER: ((60, 111),),
    c.CONFIRM_SELECT: ((85, 11),),
    c.TX_SELECT: ((90, 11),),
    c.TX_COMMIT: ((90, 21),),
    c.TX_ROLLBACK: ((90, 31),),
}
REPLY_METHODS = frozenset(reply for replies in REPLIES.values() for reply in replies)
_NO_NOWAIT = frozenset(
    {c.CHANNEL_FLOW, c.QUEUE_UNBIND, c.BASIC_QOS, c.BASIC_GET, c.BASIC_RECOVER, c.TX_SELECT, c.TX_COMMIT, c.TX_ROLLBACK}
)
BASIC_QOS_OK = (60, 11)


class Pending(NamedTuple):
    """A synchronous request sent upstream and not answered yet."""

    replies: tuple[tuple[int, int], ...]
    method: tuple[int, int]
    args: dict[str, Any]
    raw: bytes  # the method frame's payload, as the client sent it


class Queue(NamedTuple):
    raw: bytes  # queue.declare payload
    durable: bool


class Binding(NamedTuple):
    raw: bytes
    destination: str
    source: str
    to_queue: bool


def unrecoverable_queue(server_named: bool, exclusive: bool, auto_delete: bool) -> str:
    if server_named:
        return "server-named"
    if exclusive:
        return "exclusive"
    if auto_delete:
        return "auto-delete"
    return ""


# Queues that die with their connection are remembered only to cancel their consumers at a
# loss; a client that makes many of them (a reply queue per request) keeps the latest ones.
MAX_TRANSIENT_QUEUES = 4096


class Topology:
    """Exchanges, queues and bindings a client declared, in declaration order; `transient`:
    the queues that cannot be re-declared (name -> why), oldest first."""

    __slots__ = ("exchanges", "queues", "bindings", "transient")

    def __init__(self) -> None:
        self.exchanges: dict[str, bytes] = {}
        self.queues: dict[str, Queue] = {}
        self.bindings: dict[tuple[Any, ...], Binding] = {}
        self.transient: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.exchanges) + len(self.queues) + len(self.bindings)

    def record(self, method: tuple[int, int], args: dict[str, Any], raw: bytes, queue_name: str = "") -> None:
        """A topology request the broker accepted (its -ok arrived, or it was sent with nowait)."""
        if method == c.EXCHANGE_DECLARE:
            if not args["passive"] and args["exchange"]:
                self.exchanges[args["exchange"]] = raw
        elif method == c.EXCHANGE_DELETE:
            name = args["exchange"]
            self.exchanges.pop(name, None)
            for key, binding in list(self.bindings.items()):
                if binding.source == name or (binding.destination == name and not binding.to_queue):
                    del self.bindings[key]
        elif method == c.QUEUE_DECLARE:
            if args["passive"] or not queue_name:
                return
            reason = unrecoverable_queue(not args["queue"], args["exclusive"], args["auto_delete"])
            if not reason:
                self.transient.pop(queue_name, None)
                self.queues[queue_name] = Queue(raw, args["durable"])
                return
            self.queues.pop(queue_name, None)
            self.transient.pop(queue_name, None)
            self.transient[queue_name] = reason
            if len(self.transient) > MAX_TRANSIENT_QUEUES:
                self.forget_queue(next(iter(self.transient)))
        elif method == c.QUEUE_DELETE:
            self.forget_queue(queue_name or args["queue"])
        elif method in (c.QUEUE_BIND, c.EXCHANGE_BIND):
            key = _binding_key(method, args, queue_name)
            to_queue = method == c.QUEUE_BIND
            destination = (queue_name or args["queue"]) if to_queue else args["destination"]
            if to_queue and not args["queue"]:
                return  # bound to "the last declared queue": a server-named one, not recoverable
            self.bindings[key] = Binding(raw, destination, args["exchange"] if to_queue else args["source"], to_queue)
        elif method in (c.QUEUE_UNBIND, c.EXCHANGE_UNBIND):
            bind = c.QUEUE_BIND if method == c.QUEUE_UNBIND else c.EXCHANGE_BIND
            self.bindings.pop(_binding_key(bind, args, queue_name), None)

    def forget_queue(self, name: str) -> None:
        self.queues.pop(name, None)
        self.transient.pop(name, None)
        for key, binding in list(self.bindings.items()):
            if binding.to_queue and binding.destination == name:
                del self.bindings[key]

    def unrecoverable(self, queue: str) -> str:
        """Why consumers on `queue` cannot be recovered ("" when they can)."""
        return self.transient.get(queue, "")

    def replay(self) -> list[bytes]:
        """Method payloads to re-declare everything recoverable: exchanges, queues, bindings."""
        out = list(self.exchanges.values())
        out += [queue.raw for queue in self.queues.values()]
        out += [
            binding.raw
            for binding in self.bindings.values()
            if not binding.to_queue or binding.destination not in self.transient
        ]
        return out


def _binding_key(method: tuple[int, int], args: dict[str, Any], queue_name: str) -> tuple[Any, ...]:
    table = tuple(sorted((k, repr(v)) for k, v in (args.get("arguments") or {}).items()))
    if method == c.QUEUE_BIND:
        return ("q", queue_name or args["queue"], args["exchange"], args["routing_key"], table)
    return ("x", args["destination"], args["source"], args["routing_key"], table)


class Consumer(NamedTuple):
    tag: str
    queue: str
    raw: bytes  # basic.consume payload as the client sent it


class ChannelRecord:
    """What a channel set up, in the order the broker accepted it, and its unanswered requests."""

    __slots__ = ("settings", "confirm", "tx", "last_queue", "pending", "unconfirmed", "refused_at")

    def __init__(self) -> None:
        # ("qos", raw) and ("consume", Consumer) in acceptance order: a per-consumer prefetch
        # applies to the consumers created after it, so the order is replayed as it was.
        self.settings: list[tuple[str, Any]] = []
        self.confirm = False
        self.tx = False
        self.last_queue = ""  # the queue "" means in queue methods (spec: the last declared)
        self.pending: deque[Pending] = deque()
        # A method went upstream with no reply to wait for (nowait, basic.recover-async): the
        # proxy cannot know when the broker has done it (ClientSession._movable needs to).
        self.unconfirmed = False
        self.refused_at = -math.inf  # when the client last sent basic.nack or basic.reject (monotonic)

    def request(self, method: tuple[int, int], args: dict[str, Any], raw: bytes, topology: Topology | None) -> None:
        """The client sent a control method upstream."""
        replies = REPLIES.get(method)
        if replies is None:
            self.unconfirmed = True
            return  # no reply, nothing to record (basic.recover-async, channel.close...)
        if method in _NO_NOWAIT or not args.get("nowait"):
            self.pending.append(Pending(replies, method, args, raw))
        else:
            self.unconfirmed = True
            self.accepted(method, args, raw, topology, "")

    def reply(self, method: tuple[int, int], name: str, topology: Topology | None) -> Pending | None:
        """A reply arrived from the broker: the oldest pending request it answers is accepted.
        `name` is the queue name of a queue.declare-ok or the tag of a consume-ok."""
        pending = self.pending
        if not pending or method not in pending[0].replies:
            return None
        request = pending.popleft()
        self.accepted(request.method, request.args, request.raw, topology, name)
        return request

    def accepted(
        self, method: tuple[int, int], args: dict[str, Any], raw: bytes, topology: Topology | None, name: str
    ) -> None:
        if method == c.BASIC_QOS:
            settings = self.settings
            # A qos replaced before any consumer used it needs no replay.
            for index in range(len(settings) - 1, -1, -1):
                kind, value = settings[index]
                if kind == "consume":
                    break
                if kind == "qos" and qos_global(value) == args["global"]:
                    del settings[index]
                    break
            settings.append(("qos", raw))
        elif method == c.BASIC_CONSUME:
            tag = name or args["consumer_tag"]
            queue = args["queue"] or self.last_queue
            self.settings.append(("consume", Consumer(tag, queue, raw)))
        elif method == c.BASIC_CANCEL:
            self.cancelled(args["consumer_tag"])
        elif method == c.CONFIRM_SELECT:
            self.confirm = True
        elif method == c.TX_SELECT:
            self.tx = True
        elif method == c.QUEUE_DECLARE:
            queue = name or args["queue"]
            self.last_queue = queue
            if topology is not None:
                topology.record(method, args, raw, queue)
        elif topology is not None and method in _TOPOLOGY:
            queue = ""
            if method in (c.QUEUE_BIND, c.QUEUE_UNBIND, c.QUEUE_DELETE):
                queue = args["queue"] or self.last_queue
            topology.record(method, args, raw, queue)

    def cancelled(self, tag: str) -> None:
        self.settings = [s for s in self.settings if not (s[0] == "consume" and s[1].tag == tag)]

    def consumers(self) -> list[Consumer]:
        return [value for kind, value in self.settings if kind == "consume"]


_TOPOLOGY = frozenset(
    {
        c.EXCHANGE_DECLARE,
        c.EXCHANGE_DELETE,
        c.EXCHANGE_BIND,
        c.EXCHANGE_UNBIND,
        c.QUEUE_DECLARE,
        c.QUEUE_BIND,
        c.QUEUE_UNBIND,
        c.QUEUE_DELETE,
    }
)


# basic.nack and basic.reject have no reply to wait for: a channel that sent one this recently is
# blamed for a broker connection error naming that method.
BLAME_WINDOW = 5.0
_REFUSALS = frozenset({c.BASIC_NACK, c.BASIC_REJECT})
_Client = TypeVar("_Client")


def blamed(record: ChannelRecord, method: tuple[int, int], now: float) -> bool:
    """Whether a channel sent what a broker's connection error names (Connection.Close's class
    and method): a request still unanswered; a nack or reject sent within BLAME_WINDOW; when the
    Close names no method (541 INTERNAL_ERROR: the broker's channel process crashed), any
    unanswered request."""
    if method == (0, 0):
        return bool(record.pending)
    if method in _REFUSALS:
        return now - record.refused_at <= BLAME_WINDOW
    return any(request.method == method for request in record.pending)


def culprit(lost: Mapping[_Client, Iterable[ChannelRecord]], method: tuple[int, int], now: float) -> _Client | None:
    """The one client whose channels caused a broker's connection error on a shared upstream
    connection, or None when no client or several could have.

    RabbitMQ refuses some methods with a connection error, not a channel error: on quorum queues
    a consume under a global basic.qos (540), on streams automatic acks, basic.get, basic.nack
    and basic.reject (540), an invalid x-stream-offset or basic.recover (541). Through the proxy
    that must end the client that did it, as it would end its own connection, and not be
    recovered: a recovery would replay the method into the next upstream connection, again."""
    found = [client for client, records in lost.items() if any(blamed(r, method, now) for r in records)]
    return found[0] if len(found) == 1 else None


def qos_global(raw: bytes) -> bool:
    """basic.qos payload: class+method (4), prefetch_size (4), prefetch_count (2), global bit."""
    return bool(raw[10] & 1)


def consume_nowait(consumer: Consumer) -> bytes:
    """The client's basic.consume again, with the tag the broker gave it and nowait=true (its
    consume-ok was delivered long ago): layout ticket, queue, tag, bits, arguments table."""
    raw = consumer.raw
    pos = 6
    pos += 1 + raw[pos]  # queue
    queue = consumer.queue
    tag_end = pos + 1 + raw[pos]
    bits = raw[tag_end] | 0x08  # nowait is the fourth bit (no_local, no_ack, exclusive, nowait)
    return raw[:6] + encode_shortstr(queue) + encode_shortstr(consumer.tag) + bytes([bits]) + raw[tag_end + 1 :]


def qos_default() -> bytes:
    return encode_method(c.BASIC_QOS, prefetch_size=0, prefetch_count=0, **{"global": False})


class ConfirmTracker:
    """Publisher confirms of one channel, in the client's numbering.

    `acked_upto`: every sequence number up to it is confirmed; `above`: confirmed numbers beyond
    it (out-of-order confirms). Outstanding = (acked_upto, published] minus `above`."""

    __slots__ = ("acked_upto", "above", "nacked")

    def __init__(self, acked_upto: int = 0) -> None:
        self.acked_upto = acked_upto
        self.above: set[int] = set()
        self.nacked = 0  # publishes the last `lost` nacked

    def confirmed(self, tag: int, multiple: bool) -> None:
        above = self.above
        if not above and (multiple or tag == self.acked_upto + 1):
            if tag > self.acked_upto:  # the usual case: confirms in order
                self.acked_upto = tag
            return
        if multiple:
            if tag > self.acked_upto:
                self.acked_upto = tag
                self.above = {t for t in self.above if t > tag}
        elif tag > self.acked_upto:
            self.above.add(tag)
        above = self.above
        while self.acked_upto + 1 in above:
            self.acked_upto += 1
            above.discard(self.acked_upto)

    def lost(self, published: int) -> list[tuple[int, bool]]:
        """The upstream is gone: (tag, multiple) nacks for everything outstanding; afterwards
        nothing is outstanding."""
        nacks: list[tuple[int, bool]]
        above = {t for t in self.above if t <= published}
        self.nacked = max(0, published - self.acked_upto - len(above))
        if published <= self.acked_upto:
            nacks = []
        elif not above:
            nacks = [(published, True)] if published > self.acked_upto + 1 else [(published, False)]
        else:
            nacks = [(t, False) for t in range(self.acked_upto + 1, published + 1) if t not in above]
        self.acked_upto = max(self.acked_upto, published)
        self.above.clear()
        return nacks


def ack_tag(tag: int, multiple: bool, offset: int) -> int | None:
    """A client ack/nack/reject on a recovered channel: the broker's tag, or None to drop it.

    Tags up to `offset` were delivered before the loss (the broker requeued them already).
    `multiple` with tag 0 means "everything outstanding", which now is only new deliveries; a
    `multiple` ack spanning old and new tags acks exactly the new ones."""
    if tag == 0:
        return 0
    if tag <= offset:
        return None
    return tag - offset


def delivery_tag_position(method: tuple[int, int], payload: bytes | bytearray | memoryview, start: int) -> int:
    """Offset of the delivery tag in a basic.deliver / basic.get-ok payload starting at `start`."""
    if method == c.BASIC_DELIVER:
        return start + 5 + payload[start + 4]  # after the consumer tag shortstr
    return start + 4


def shift_tag(payload: bytes | bytearray | memoryview, start: int, end: int, position: int, offset: int) -> bytes:
    """The method payload [start, end) with the 64-bit tag at `position` increased by `offset`."""
    (tag,) = _U64.unpack_from(payload, position)
    return bytes(payload[start:position]) + _U64.pack(tag + offset) + bytes(payload[position + 8 : end])
