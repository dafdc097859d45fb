"""What a client may send on a channel, checked before it reaches a shared upstream connection.

RabbitMQ answers some client mistakes with a *connection* error (hard reply codes: 501-505,
530, 540). On a pooled upstream that would close the connection under every other client, so
the proxy detects those mistakes itself and closes only the offending client, with the code and
text RabbitMQ would have used. `ChannelGuard` is the per-channel state for that; everything here
is pure and socket-free.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, NoReturn

from . import constants as c
from .codec import DecodeError, decode_shortstr, decode_table, malformed_shortstr
from .errors import ProtocolError

_U16 = struct.Struct(">H")
_HEADER_PREFIX = struct.Struct(">HHQ")

# Methods a client may send on a non-zero channel (spec 0-9-1 "server" side, RabbitMQ flavour).
CLIENT_CHANNEL_METHODS = frozenset(
    {
        c.CHANNEL_OPEN, c.CHANNEL_FLOW, c.CHANNEL_FLOW_OK, c.CHANNEL_CLOSE, c.CHANNEL_CLOSE_OK,
        c.ACCESS_REQUEST,
        c.EXCHANGE_DECLARE, c.EXCHANGE_DELETE, c.EXCHANGE_BIND, c.EXCHANGE_UNBIND,
        c.QUEUE_DECLARE, c.QUEUE_BIND, c.QUEUE_PURGE, c.QUEUE_DELETE, c.QUEUE_UNBIND,
        c.BASIC_QOS, c.BASIC_CONSUME, c.BASIC_CANCEL, c.BASIC_PUBLISH, c.BASIC_GET, c.BASIC_ACK,
        c.BASIC_REJECT, c.BASIC_RECOVER_ASYNC, c.BASIC_RECOVER, c.BASIC_NACK,
        c.CONFIRM_SELECT, c.TX_SELECT, c.TX_COMMIT, c.TX_ROLLBACK,
    }
)  # fmt: skip

# Built-in exchange types; plugin types are by convention "x-..." (e.g. x-consistent-hash).
# An unknown type is a hard 503 in RabbitMQ, so it must never reach a shared upstream.
BUILTIN_EXCHANGE_TYPES = frozenset({"direct", "fanout", "topic", "headers"})

# Methods whose queue argument must respect another client's exclusive queue (RabbitMQ's
# with_exclusive_access_or_die): everything that reads, changes or deletes the queue.
QUEUE_ACCESS_METHODS = frozenset(
    {c.QUEUE_DECLARE, c.QUEUE_BIND, c.QUEUE_UNBIND, c.QUEUE_PURGE, c.QUEUE_DELETE, c.BASIC_CONSUME, c.BASIC_GET}
)

# The first method on a channel reveals its role; publishing channels and consuming channels are
# placed on separate upstream connections (RabbitMQ's flow control is per connection).
PUBLISHER_METHODS = frozenset(
    {
        c.BASIC_PUBLISH,
        c.CONFIRM_SELECT,
        c.TX_SELECT,
        c.EXCHANGE_DECLARE,
        c.EXCHANGE_DELETE,
        c.EXCHANGE_BIND,
        c.EXCHANGE_UNBIND,
    }
)


class Role(str, enum.Enum):
    """Where a channel is placed: publishing and consuming channels go to different upstream
    connections (with --separate-publishers), or any connection."""

    PUBLISH = "publish"
    CONSUME = "consume"
    ANY = "any"


def role_of(method: tuple[int, int]) -> Role:
    return Role.PUBLISH if method in PUBLISHER_METHODS else Role.CONSUME


EXPECT_METHOD = 0
EXPECT_HEADER = 1
EXPECT_BODY = 2


class ChannelGuard:
    """Per client channel: content-frame sequencing, tx.commit in flight, consumer tags."""

    __slots__ = ("expect", "body_remaining", "commit_pending", "consumer_tags")

    def __init__(self) -> None:
        self.expect = EXPECT_METHOD
        self.body_remaining = 0
        self.commit_pending = False
        self.consumer_tags: set[str] = set()

    def on_method(self, method: tuple[int, int]) -> None:
        if self.expect != EXPECT_METHOD:
            self._out_of_sequence()
        if self.commit_pending and method != c.CHANNEL_CLOSE:  # RabbitMQ handles close first
            raise ProtocolError(c.CHANNEL_ERROR, "unexpected command while processing 'tx.commit'", method)

    def on_publish(self, payload: bytes | bytearray | memoryview, start: int, end: int) -> None:
        """basic.publish: validate its layout without decoding strings; the content must follow."""
        self.on_method(c.BASIC_PUBLISH)
        # class+method (4) ticket (2) exchange (shortstr) routing key (shortstr) bits (1)
        pos = start + 6
        if pos >= end:
            raise ProtocolError(c.FRAME_ERROR, "cannot decode basic.publish", c.BASIC_PUBLISH)
        pos += 1 + payload[pos]
        if pos >= end:
            raise ProtocolError(c.FRAME_ERROR, "cannot decode basic.publish", c.BASIC_PUBLISH)
        pos += 1 + payload[pos]
        if pos + 1 != end:
            raise ProtocolError(c.FRAME_ERROR, "cannot decode basic.publish", c.BASIC_PUBLISH)
        if payload[pos] & 0x02:
            raise ProtocolError(c.NOT_IMPLEMENTED, "immediate=true", c.BASIC_PUBLISH)
        self.expect = EXPECT_HEADER

    def on_header(self, payload: bytes | bytearray | memoryview, start: int, end: int) -> None:
        if self.expect != EXPECT_HEADER:
            self._out_of_sequence()
        if end - start < 14:
            raise ProtocolError(c.FRAME_ERROR, "cannot decode content header")
        class_id, weight, body_size = _HEADER_PREFIX.unpack_from(payload, start)
        if weight:  # RabbitMQ takes only weight 0 as a content header
            self._out_of_sequence()
        if class_id != c.BASIC_CLASS:
            raise ProtocolError(
                c.UNEXPECTED_FRAME,
                f"expected content header for class 60, got one for class {class_id} instead",
                c.BASIC_PUBLISH,
            )
        if end - start != 14 or payload[start + 12] or payload[start + 13]:
            # Properties present: RabbitMQ decodes them on publish and answers a malformed list
            # with 541 on the whole connection, so they are checked here first.
            check_basic_properties(payload, start + 12, end)
        if body_size:
            self.expect = EXPECT_BODY
            self.body_remaining = body_size
        else:
            self.expect = EXPECT_METHOD

    def on_body(self, size: int) -> None:
        if self.expect != EXPECT_BODY:
            self._out_of_sequence()
        remaining = self.body_remaining - size
        if remaining < 0:
            raise ProtocolError(c.FRAME_ERROR, "content body larger than announced in its header")
        self.body_remaining = remaining
        if remaining == 0:
            self.expect = EXPECT_METHOD

    def unexpected_frame(self) -> NoReturn:
        """A frame of a type no state of the channel takes (a heartbeat on it): 505 as RabbitMQ."""
        self._out_of_sequence()

    def _out_of_sequence(self) -> NoReturn:
        """A frame that does not fit the content sequence: RabbitMQ's command assembler texts
        (rabbit_command_assembler), naming the method whose content is in progress."""
        if self.expect == EXPECT_HEADER:
            detail, method = (
                "expected content header for class 60, got non content header frame instead",
                c.BASIC_PUBLISH,
            )
        elif self.expect == EXPECT_BODY:
            detail, method = "expected content body, got non content body frame instead", c.BASIC_PUBLISH
        else:
            detail, method = "expected method frame, got non method frame instead", (0, 0)
        raise ProtocolError(c.UNEXPECTED_FRAME, detail, method)

    def check_control(self, method: tuple[int, int], args: dict[str, Any]) -> None:
        """Rules for decoded control-plane methods that RabbitMQ enforces with hard errors."""
        if malformed_shortstr(method, args) is not None:
            # RabbitMQ's own text and (0, 0): it fails while parsing, before knowing the method.
            raise ProtocolError(c.FRAME_ERROR, "Malformed UTF-8 in shortstr")
        if method == c.BASIC_CONSUME:
            tag = args["consumer_tag"]
            if tag and tag in self.consumer_tags:
                raise ProtocolError(c.NOT_ALLOWED, f"attempt to reuse consumer tag '{tag}'", method)
        elif method == c.EXCHANGE_DECLARE:
            kind = args["type"]
            if not args["passive"] and kind not in BUILTIN_EXCHANGE_TYPES and not kind.startswith("x-"):
                raise ProtocolError(c.COMMAND_INVALID, f"unknown exchange type '{kind}'", method)
        elif method == c.BASIC_QOS:
            if args["prefetch_size"]:
                raise ProtocolError(c.NOT_IMPLEMENTED, f"prefetch_size!=0 ({args['prefetch_size']})", method)
        elif method == c.CHANNEL_FLOW:
            if not args["active"]:
                raise ProtocolError(c.NOT_IMPLEMENTED, "active=false", method)
        elif method == c.BASIC_RECOVER_ASYNC or method == c.BASIC_RECOVER:
            if not args["requeue"]:
                raise ProtocolError(c.NOT_IMPLEMENTED, "requeue=false", method)
        elif method == c.TX_COMMIT:
            self.commit_pending = True

    def reset(self) -> None:
        self.expect = EXPECT_METHOD
        self.body_remaining = 0
        self.commit_pending = False
        self.consumer_tags.clear()


# basic properties in flag order (bit 15 first): the type of each (0-9-1 spec, class basic).
_PROPERTY_TYPES = (
    "shortstr",  # content-type
    "shortstr",  # content-encoding
    "table",  # headers
    "octet",  # delivery-mode
    "octet",  # priority
    "shortstr",  # correlation-id
    "shortstr",  # reply-to
    "shortstr",  # expiration
    "shortstr",  # message-id
    "longlong",  # timestamp
    "shortstr",  # type
    "shortstr",  # user-id
    "shortstr",  # app-id
    "shortstr",  # cluster-id (reserved)
)


def check_basic_properties(payload: bytes | bytearray | memoryview, start: int, end: int) -> None:
    """Strictly decode a content header's property flags and list (exact length, no continuation)."""
    if end - start < 2:
        raise ProtocolError(c.FRAME_ERROR, "cannot decode content header properties")
    flags = (payload[start] << 8) | payload[start + 1]
    if flags & 0x3:  # bit 0: continuation, bit 1: unused
        raise ProtocolError(c.FRAME_ERROR, "content header property flags use reserved bits")
    data = bytes(payload[start:end])
    pos = 2
    try:
        for index, kind in enumerate(_PROPERTY_TYPES):
            if not flags & (1 << (15 - index)):
                continue
            if kind == "shortstr":
                _, pos = decode_shortstr(data, pos)
            elif kind == "table":
                _, pos = decode_table(data, pos)
            elif kind == "octet":
                if pos + 1 > len(data):
                    raise DecodeError("truncated property")
                pos += 1
            else:
                if pos + 8 > len(data):
                    raise DecodeError("truncated property")
                pos += 8
    except DecodeError as exc:
        raise ProtocolError(c.FRAME_ERROR, f"cannot decode content header properties: {exc}") from None
    if pos != len(data):
        raise ProtocolError(c.FRAME_ERROR, "content header properties overrun their frame")


def check_ack_layout(method: tuple[int, int], size: int) -> None:
    """basic.ack/nack/reject are fixed-size: class+method (4) + delivery tag (8) + bits (1)."""
    if size != 13:
        raise ProtocolError(c.FRAME_ERROR, "cannot decode acknowledgement", method)
