"""AMQP 0-9-1 method and field-table (de)coding, strict enough to reject what RabbitMQ would.

The proxy decodes only control-plane methods (handshake, channel lifecycle, the few methods whose
arguments change routing or isolation); hot-path methods (publish, ack, deliver) are routed by
their (class, method) id alone. Decoding is exact: trailing or missing bytes raise DecodeError,
which the session turns into 501 FRAME_ERROR as RabbitMQ does for an undecodable method.
"""

from __future__ import annotations

import math
import struct
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

_S_U8 = struct.Struct(">B")
_S_I8 = struct.Struct(">b")
_S_U16 = struct.Struct(">H")
_S_I16 = struct.Struct(">h")
_S_U32 = struct.Struct(">I")
_S_I32 = struct.Struct(">i")
_S_U64 = struct.Struct(">Q")
_S_I64 = struct.Struct(">q")
_S_F32 = struct.Struct(">f")
_S_F64 = struct.Struct(">d")
_S_METHOD_ID = struct.Struct(">HH")


class DecodeError(ValueError):
    """The bytes are not a well-formed AMQP value."""


class Timestamp(int):
    """A field-table timestamp ('T'): seconds since the epoch, kept distinct from plain integers."""


# ---------------------------------------------------------------------------- field values


def _need(data: bytes | memoryview, offset: int, size: int) -> None:
    if offset + size > len(data):
        raise DecodeError("truncated value")


def decode_shortstr(data: bytes | memoryview, offset: int) -> tuple[str, int]:
    _need(data, offset, 1)
    length = data[offset]
    offset += 1
    _need(data, offset, length)
    raw = bytes(data[offset : offset + length])
    # RabbitMQ takes any bytes here; surrogateescape keeps them and re-encodes them unchanged.
    return raw.decode("utf-8", "surrogateescape"), offset + length


def decode_longstr(data: bytes | memoryview, offset: int) -> tuple[bytes, int]:
    _need(data, offset, 4)
    (length,) = _S_U32.unpack_from(data, offset)
    offset += 4
    _need(data, offset, length)
    return bytes(data[offset : offset + length]), offset + length


def encode_shortstr(value: str | bytes) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if len(raw) > 255:
        raise ValueError("short string longer than 255 bytes")
    return _S_U8.pack(len(raw)) + raw


def encode_longstr(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return _S_U32.pack(len(raw)) + raw


# Nested tables and arrays deeper than this are refused (DecodeError, so 501) instead of
# exhausting Python's recursion limit: a few KiB of nesting would otherwise crash the decoder.
MAX_NESTING = 200


def _decode_field_value(data: bytes | memoryview, offset: int, depth: int = 0) -> tuple[Any, int]:
    _need(data, offset, 1)
    kind = chr(data[offset])
    offset += 1
    fixed = _FIXED_FIELD_TYPES.get(kind)
    if fixed is not None:
        _need(data, offset, fixed.size)
        (value,) = fixed.unpack_from(data, offset)
        offset += fixed.size
        if kind == "t":
            return value != 0, offset
        if kind == "T":
            return Timestamp(value), offset
        if (kind == "f" or kind == "d") and not math.isfinite(value):
            # RabbitMQ cannot parse NaN or infinities and drops the whole connection.
            raise DecodeError("non-finite float in a field table")
        return value, offset
    if kind == "S":
        return decode_longstr(data, offset)
    if kind == "x":
        return decode_longstr(data, offset)
    if kind == "F":
        return decode_table(data, offset, depth + 1)
    if kind == "A":
        if depth >= MAX_NESTING:
            raise DecodeError(f"field arrays and tables nested deeper than {MAX_NESTING}")
        _need(data, offset, 4)
        (length,) = _S_U32.unpack_from(data, offset)
        offset += 4
        end = offset + length
        _need(data, offset, length)
        items = []
        while offset < end:
            item, offset = _decode_field_value(data, offset, depth + 1)
            items.append(item)
        if offset != end:
            raise DecodeError("array overruns its length")
        return items, offset
    if kind == "D":
        _need(data, offset, 5)
        scale = data[offset]
        (unscaled,) = _S_I32.unpack_from(data, offset + 1)
        return Decimal(unscaled).scaleb(-scale), offset + 5
    if kind == "V":
        return None, offset
    raise DecodeError(f"unknown field type {kind!r}")


# RabbitMQ's table dialect (the 0-9-1 errata): 's' is a signed 16-bit int, 'u' unsigned.
_FIXED_FIELD_TYPES = {
    "t": _S_U8,
    "b": _S_I8,
    "B": _S_U8,
    "s": _S_I16,
    "u": _S_U16,
    "I": _S_I32,
    "i": _S_U32,
    "l": _S_I64,
    "L": _S_U64,
    "f": _S_F32,
    "d": _S_F64,
    "T": _S_U64,
}


def decode_table(data: bytes | memoryview, offset: int, depth: int = 0) -> tuple[dict[str, Any], int]:
    if depth > MAX_NESTING:
        raise DecodeError(f"field arrays and tables nested deeper than {MAX_NESTING}")
    _need(data, offset, 4)
    (length,) = _S_U32.unpack_from(data, offset)
    offset += 4
    end = offset + length
    _need(data, offset, length)
    table: dict[str, Any] = {}
    while offset < end:
        key, offset = decode_shortstr(data, offset)
        value, offset = _decode_field_value(data, offset, depth)
        table[key] = value
    if offset != end:
        raise DecodeError("table overruns its length")
    return table, offset


def _encode_field_value(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"t" + _S_U8.pack(1 if value else 0)
    if isinstance(value, Timestamp):
        return b"T" + _S_U64.pack(value)
    if isinstance(value, datetime):
        return b"T" + _S_U64.pack(int(value.replace(tzinfo=value.tzinfo or timezone.utc).timestamp()))
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"I" + _S_I32.pack(value)
        return b"l" + _S_I64.pack(value)
    if isinstance(value, float):
        return b"d" + _S_F64.pack(value)
    if isinstance(value, Decimal):
        sign, digits, exponent = value.as_tuple()
        scale = -int(exponent) if isinstance(exponent, int) and exponent < 0 else 0
        unscaled = int(value.scaleb(scale))
        return b"D" + _S_U8.pack(scale) + _S_I32.pack(unscaled)
    if isinstance(value, str):
        return b"S" + encode_longstr(value)
    if isinstance(value, (bytes, bytearray)):
        return b"x" + encode_longstr(bytes(value))
    if isinstance(value, dict):
        return b"F" + encode_table(value)
    if isinstance(value, (list, tuple)):
        body = b"".join(_encode_field_value(item) for item in value)
        return b"A" + _S_U32.pack(len(body)) + body
    if value is None:
        return b"V"
    raise TypeError(f"cannot encode {type(value).__name__} in a field table")


def encode_table(table: dict[str, Any] | None) -> bytes:
    if not table:
        return b"\x00\x00\x00\x00"
    body = b"".join(encode_shortstr(key) + _encode_field_value(value) for key, value in table.items())
    return _S_U32.pack(len(body)) + body


# ---------------------------------------------------------------------------- methods

# Argument types: octet, short, long, longlong, shortstr, longstr, bit, table, timestamp.
_ARG_STRUCTS = {"octet": _S_U8, "short": _S_U16, "long": _S_U32, "longlong": _S_U64, "timestamp": _S_U64}

_SPEC: dict[tuple[int, int], tuple[str, tuple[tuple[str, str], ...]]] = {}


def _define(class_id: int, method_id: int, name: str, *args: str) -> None:
    _SPEC[(class_id, method_id)] = (name, tuple(tuple(arg.split(":")) for arg in args))  # type: ignore[misc]


_define(
    10,
    10,
    "connection.start",
    "version_major:octet",
    "version_minor:octet",
    "server_properties:table",
    "mechanisms:longstr",
    "locales:longstr",
)
_define(
    10,
    11,
    "connection.start-ok",
    "client_properties:table",
    "mechanism:shortstr",
    "response:longstr",
    "locale:shortstr",
)
_define(10, 20, "connection.secure", "challenge:longstr")
_define(10, 21, "connection.secure-ok", "response:longstr")
_define(10, 30, "connection.tune", "channel_max:short", "frame_max:long", "heartbeat:short")
_define(10, 31, "connection.tune-ok", "channel_max:short", "frame_max:long", "heartbeat:short")
_define(10, 40, "connection.open", "virtual_host:shortstr", "capabilities:shortstr", "insist:bit")
_define(10, 41, "connection.open-ok", "known_hosts:shortstr")
_define(10, 50, "connection.close", "reply_code:short", "reply_text:shortstr", "class_id:short", "method_id:short")
_define(10, 51, "connection.close-ok")
_define(10, 60, "connection.blocked", "reason:shortstr")
_define(10, 61, "connection.unblocked")
_define(10, 70, "connection.update-secret", "new_secret:longstr", "reason:shortstr")
_define(10, 71, "connection.update-secret-ok")
_define(20, 10, "channel.open", "out_of_band:shortstr")
_define(20, 11, "channel.open-ok", "channel_id:longstr")
_define(20, 20, "channel.flow", "active:bit")
_define(20, 21, "channel.flow-ok", "active:bit")
_define(20, 40, "channel.close", "reply_code:short", "reply_text:shortstr", "class_id:short", "method_id:short")
_define(20, 41, "channel.close-ok")
_define(
    30, 10, "access.request", "realm:shortstr", "exclusive:bit", "passive:bit", "active:bit", "write:bit", "read:bit"
)
_define(30, 11, "access.request-ok", "ticket:short")
_define(
    40,
    10,
    "exchange.declare",
    "ticket:short",
    "exchange:shortstr",
    "type:shortstr",
    "passive:bit",
    "durable:bit",
    "auto_delete:bit",
    "internal:bit",
    "nowait:bit",
    "arguments:table",
)
_define(40, 11, "exchange.declare-ok")
_define(40, 20, "exchange.delete", "ticket:short", "exchange:shortstr", "if_unused:bit", "nowait:bit")
_define(40, 21, "exchange.delete-ok")
_define(
    40,
    30,
    "exchange.bind",
    "ticket:short",
    "destination:shortstr",
    "source:shortstr",
    "routing_key:shortstr",
    "nowait:bit",
    "arguments:table",
)
_define(40, 31, "exchange.bind-ok")
_define(
    40,
    40,
    "exchange.unbind",
    "ticket:short",
    "destination:shortstr",
    "source:shortstr",
    "routing_key:shortstr",
    "nowait:bit",
    "arguments:table",
)
_define(40, 51, "exchange.unbind-ok")
_define(
    50,
    10,
    "queue.declare",
    "ticket:short",
    "queue:shortstr",
    "passive:bit",
    "durable:bit",
    "exclusive:bit",
    "auto_delete:bit",
    "nowait:bit",
    "arguments:table",
)
_define(50, 11, "queue.declare-ok", "queue:shortstr", "message_count:long", "consumer_count:long")
_define(
    50,
    20,
    "queue.bind",
    "ticket:short",
    "queue:shortstr",
    "exchange:shortstr",
    "routing_key:shortstr",
    "nowait:bit",
    "arguments:table",
)
_define(50, 21, "queue.bind-ok")
_define(50, 30, "queue.purge", "ticket:short", "queue:shortstr", "nowait:bit")
_define(50, 31, "queue.purge-ok", "message_count:long")
_define(50, 40, "queue.delete", "ticket:short", "queue:shortstr", "if_unused:bit", "if_empty:bit", "nowait:bit")
_define(50, 41, "queue.delete-ok", "message_count:long")
_define(
    50,
    50,
    "queue.unbind",
    "ticket:short",
    "queue:shortstr",
    "exchange:shortstr",
    "routing_key:shortstr",
    "arguments:table",
)
_define(50, 51, "queue.unbind-ok")
_define(60, 10, "basic.qos", "prefetch_size:long", "prefetch_count:short", "global:bit")
_define(60, 11, "basic.qos-ok")
_define(
    60,
    20,
    "basic.consume",
    "ticket:short",
    "queue:shortstr",
    "consumer_tag:shortstr",
    "no_local:bit",
    "no_ack:bit",
    "exclusive:bit",
    "nowait:bit",
    "arguments:table",
)
_define(60, 21, "basic.consume-ok", "consumer_tag:shortstr")
_define(60, 30, "basic.cancel", "consumer_tag:shortstr", "nowait:bit")
_define(60, 31, "basic.cancel-ok", "consumer_tag:shortstr")
_define(
    60,
    40,
    "basic.publish",
    "ticket:short",
    "exchange:shortstr",
    "routing_key:shortstr",
    "mandatory:bit",
    "immediate:bit",
)
_define(60, 50, "basic.return", "reply_code:short", "reply_text:shortstr", "exchange:shortstr", "routing_key:shortstr")
_define(
    60,
    60,
    "basic.deliver",
    "consumer_tag:shortstr",
    "delivery_tag:longlong",
    "redelivered:bit",
    "exchange:shortstr",
    "routing_key:shortstr",
)
_define(60, 70, "basic.get", "ticket:short", "queue:shortstr", "no_ack:bit")
_define(
    60,
    71,
    "basic.get-ok",
    "delivery_tag:longlong",
    "redelivered:bit",
    "exchange:shortstr",
    "routing_key:shortstr",
    "message_count:long",
)
_define(60, 72, "basic.get-empty", "cluster_id:shortstr")
_define(60, 80, "basic.ack", "delivery_tag:longlong", "multiple:bit")
_define(60, 90, "basic.reject", "delivery_tag:longlong", "requeue:bit")
_define(60, 100, "basic.recover-async", "requeue:bit")
_define(60, 110, "basic.recover", "requeue:bit")
_define(60, 111, "basic.recover-ok")
_define(60, 120, "basic.nack", "delivery_tag:longlong", "multiple:bit", "requeue:bit")
_define(85, 10, "confirm.select", "nowait:bit")
_define(85, 11, "confirm.select-ok")
_define(90, 10, "tx.select")
_define(90, 11, "tx.select-ok")
_define(90, 20, "tx.commit")
_define(90, 21, "tx.commit-ok")
_define(90, 30, "tx.rollback")
_define(90, 31, "tx.rollback-ok")


def method_name(method: tuple[int, int]) -> str:
    spec = _SPEC.get(method)
    return spec[0] if spec else f"unknown({method[0]},{method[1]})"


def method_id(payload: bytes | memoryview) -> tuple[int, int]:
    if len(payload) < 4:
        raise DecodeError("method frame shorter than its class and method ids")
    return _S_METHOD_ID.unpack_from(payload, 0)  # type: ignore[return-value]


def decode_method(payload: bytes | memoryview) -> tuple[tuple[int, int], dict[str, Any]]:
    """Decode a whole method-frame payload; every byte must belong to an argument."""
    method = method_id(payload)
    spec = _SPEC.get(method)
    if spec is None:
        raise DecodeError(f"unknown method {method}")
    args: dict[str, Any] = {}
    offset = 4
    bit_byte = 0
    bit_index = 8  # forces a fresh octet on the first bit
    for name, kind in spec[1]:
        if kind == "bit":
            if bit_index == 8:
                _need(payload, offset, 1)
                bit_byte = payload[offset]
                offset += 1
                bit_index = 0
            args[name] = bool(bit_byte & (1 << bit_index))
            bit_index += 1
            continue
        bit_index = 8
        if kind == "shortstr":
            args[name], offset = decode_shortstr(payload, offset)
        elif kind == "longstr":
            args[name], offset = decode_longstr(payload, offset)
        elif kind == "table":
            args[name], offset = decode_table(payload, offset)
        else:
            fmt = _ARG_STRUCTS[kind]
            _need(payload, offset, fmt.size)
            (args[name],) = fmt.unpack_from(payload, offset)
            offset += fmt.size
    if offset != len(payload):
        raise DecodeError(f"{spec[0]} has {len(payload) - offset} trailing bytes")
    return method, args


def malformed_shortstr(method: tuple[int, int], args: dict[str, Any]) -> str | None:
    """The name of a decoded short-string argument that is not valid UTF-8, if any.

    Short strings decode with surrogateescape (any bytes survive a round trip), but RabbitMQ
    refuses invalid UTF-8 in the short strings of the methods it decodes with a connection error
    (501 "Malformed UTF-8 in shortstr"); basic.publish's are not checked."""
    spec = _SPEC.get(method)
    if spec is None:
        return None
    for name, kind in spec[1]:
        if kind == "shortstr":
            try:
                args[name].encode("utf-8")
            except UnicodeEncodeError:
                return name
    return None


def encode_method(method: tuple[int, int], **args: Any) -> bytes:
    """Encode a method payload; missing arguments take the type's zero value."""
    name, arg_spec = _SPEC[method]
    parts = [_S_METHOD_ID.pack(*method)]
    bit_byte = 0
    bit_index = 0
    for arg_name, kind in arg_spec:
        if kind == "bit":
            if args.get(arg_name):
                bit_byte |= 1 << bit_index
            bit_index += 1
            if bit_index == 8:
                parts.append(_S_U8.pack(bit_byte))
                bit_byte = bit_index = 0
            continue
        if bit_index:
            parts.append(_S_U8.pack(bit_byte))
            bit_byte = bit_index = 0
        value = args.get(arg_name)
        if kind == "shortstr":
            parts.append(encode_shortstr(value or ""))
        elif kind == "longstr":
            parts.append(encode_longstr(value or b""))
        elif kind == "table":
            parts.append(encode_table(value))
        else:
            parts.append(_ARG_STRUCTS[kind].pack(value or 0))
    if bit_index:
        parts.append(_S_U8.pack(bit_byte))
    return b"".join(parts)
