"""Property-based tests of the method and field-table codec and the content-header property check.

Round trips: whatever the proxy can encode decodes to the same values. Robustness: any bytes
decode or raise DecodeError (which the sessions turn into 501), never another exception, however
deeply tables and arrays nest. Strictness: a valid method with a byte missing or a byte too many
does not decode (RabbitMQ refuses both).
"""

from __future__ import annotations

import math
import struct
from decimal import Decimal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from amqproxy.protocol import constants as c
from amqproxy.protocol.codec import (
    _SPEC,
    MAX_NESTING,
    DecodeError,
    Timestamp,
    decode_method,
    decode_table,
    encode_method,
    encode_table,
    malformed_shortstr,
)
from amqproxy.protocol.errors import ProtocolError
from amqproxy.protocol.rules import check_basic_properties

# ---------------------------------------------------------------------------- strategies

# Short strings: any text but lone surrogates (their UTF-8 is not defined); 20 characters are at
# most 80 bytes, well within a short string's 255.
short_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
decimals = st.builds(lambda unscaled, scale: Decimal(unscaled).scaleb(-scale), int32, st.integers(0, 255))

scalar_values = st.one_of(
    st.booleans(),
    int64,
    st.floats(allow_nan=False, allow_infinity=False),
    decimals,
    st.binary(max_size=40),
    short_text,  # encoded as a long string: decodes to its UTF-8 bytes
    st.builds(Timestamp, st.integers(0, 2**64 - 1)),
    st.none(),
)
field_values = st.recursive(
    scalar_values,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(short_text, inner, max_size=4),
    ),
    max_leaves=10,
)
tables = st.dictionaries(short_text, field_values, max_size=5)
small_tables = st.dictionaries(short_text, scalar_values, max_size=3)


def normalized(value):
    """What decoding gives back for an encoded value."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict):
        return {key: normalized(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalized(item) for item in value]
    return value


def same(a, b) -> bool:
    """Equality that also tells the types apart (True is not 1, a Timestamp is not an int)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b)))
    return type(a) is type(b) and a == b


ARG_VALUES = {
    "octet": st.integers(0, 2**8 - 1),
    "short": st.integers(0, 2**16 - 1),
    "long": st.integers(0, 2**32 - 1),
    "longlong": st.integers(0, 2**64 - 1),
    "timestamp": st.integers(0, 2**64 - 1),
    "shortstr": short_text,
    "longstr": st.binary(max_size=64),
    "bit": st.booleans(),
    "table": tables,
}


@st.composite
def methods(draw):
    method = draw(st.sampled_from(sorted(_SPEC)))
    args = {name: draw(ARG_VALUES[kind]) for name, kind in _SPEC[method][1]}
    return method, args


# ---------------------------------------------------------------------------- round trips


@given(tables)
@example({})
@example({"nested": {"list": [1, [2, {"x": None}]], "t": Timestamp(0)}, "big": 2**40, "neg": -(2**63)})
def test_table_round_trip(table):
    encoded = encode_table(table)
    decoded, end = decode_table(encoded, 0)
    assert end == len(encoded)
    assert same(decoded, normalized(table)), (decoded, table)
    # A table decodes the same at any offset of a larger buffer, and reads nothing past itself.
    decoded_at, end_at = decode_table(b"\xaa" * 3 + encoded + b"\xbb" * 5, 3)
    assert end_at == 3 + len(encoded) and same(decoded_at, decoded)


@given(methods())
@example((c.CONNECTION_START_OK, {"client_properties": {"capabilities": {"basic.nack": True}}, "mechanism": "PLAIN"}))
def test_method_round_trip(generated):
    method, args = generated
    payload = encode_method(method, **args)
    decoded_method, decoded = decode_method(payload)
    assert decoded_method == method
    assert decoded.keys() == {name for name, _ in _SPEC[method][1]}
    for name, kind in _SPEC[method][1]:
        expected = args.get(name)
        if kind == "shortstr":
            expected = expected or ""
        elif kind == "longstr":
            expected = normalized(expected or b"")
        elif kind == "table":
            expected = normalized(expected or {})
        elif kind == "bit":
            expected = bool(expected)
        else:
            expected = expected or 0
        assert same(decoded[name], expected), (name, kind, decoded[name], expected)


@given(methods(), st.data())
def test_a_method_with_a_byte_missing_or_extra_does_not_decode(generated, data):
    method, args = generated
    payload = encode_method(method, **args)
    cut = data.draw(st.integers(0, len(payload) - 1), label="cut")
    with pytest.raises(DecodeError):
        decode_method(payload[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=8), label="extra")
    with pytest.raises(DecodeError):
        decode_method(payload + extra)


# ---------------------------------------------------------------------------- robustness

method_ids = st.sampled_from(sorted(_SPEC)).map(lambda m: struct.pack(">HH", *m))


@given(st.one_of(st.binary(max_size=300), st.builds(bytes.__add__, method_ids, st.binary(max_size=300))))
@example(b"")
@example(b"\x00\x0a")
@example(b"\x00\x32\x00\x0a\x00\x00\x00\x00\xff\xff\xff\xff")  # a table longer than the frame
def test_any_bytes_decode_or_raise_decode_error(payload):
    try:
        method, args = decode_method(payload)
    except DecodeError:
        return
    assert method in _SPEC
    # Re-encoding gives the same arguments back (the bytes may differ only in reserved bits).
    reencoded = encode_method(method, **args)
    assert len(reencoded) == len(payload)
    assert same(decode_method(reencoded)[1], args)


@given(st.binary(max_size=400))
@example(b"\x00\x00\x00\x05\x01kA\x00\x00")  # an array overrunning its table
@example(b"\x00\x00\x00\x0b\x01kd\x7f\xf8\x00\x00\x00\x00\x00\x00")  # NaN
def test_any_bytes_as_a_table_decode_or_raise_decode_error(data):
    try:
        table, end = decode_table(data, 0)
    except DecodeError:
        return
    assert 4 <= end <= len(data)
    assert isinstance(table, dict)


@given(st.integers(1, 3 * MAX_NESTING), st.sampled_from("FA"))
@example(5000, "F")
@example(5000, "A")
def test_deep_nesting_is_a_decode_error_never_a_recursion_error(depth, kind):
    """A few KiB of nested tables once crashed the decoder (RecursionError -> 541 and a traceback)."""
    value = b"F\x00\x00\x00\x00"
    for _ in range(depth):
        if kind == "F":
            body = b"\x01k" + value
            value = b"F" + len(body).to_bytes(4, "big") + body
        else:
            value = b"A" + len(value).to_bytes(4, "big") + value
    body = b"\x01k" + value
    table = len(body).to_bytes(4, "big") + body
    try:
        decoded, _ = decode_table(table, 0)
    except DecodeError as exc:
        assert "nested deeper" in str(exc)
        assert depth >= MAX_NESTING - 1
    else:
        assert depth < MAX_NESTING
        assert isinstance(decoded["k"], dict if kind == "F" else list)


# ---------------------------------------------------------------------------- content-header properties

PROPERTY_VALUES = (
    short_text,  # content-type
    short_text,  # content-encoding
    small_tables,  # headers
    st.integers(0, 255),  # delivery-mode
    st.integers(0, 255),  # priority
    short_text,  # correlation-id
    short_text,  # reply-to
    short_text,  # expiration
    short_text,  # message-id
    st.integers(0, 2**64 - 1),  # timestamp
    short_text,  # type
    short_text,  # user-id
    short_text,  # app-id
    short_text,  # cluster-id
)


@st.composite
def property_lists(draw):
    """A well-formed basic property list: flags, then the flagged values in order."""
    present = draw(st.lists(st.booleans(), min_size=14, max_size=14))
    flags = 0
    out = b""
    for index, (is_present, strategy) in enumerate(zip(present, PROPERTY_VALUES, strict=True)):
        if not is_present:
            continue
        flags |= 1 << (15 - index)
        value = draw(strategy)
        if index == 2:
            out += encode_table(value)
        elif index in (3, 4):
            out += bytes([value])
        elif index == 9:
            out += value.to_bytes(8, "big")
        else:
            raw = value.encode("utf-8")
            out += bytes([len(raw)]) + raw
    return flags.to_bytes(2, "big") + out


@given(property_lists(), st.integers(0, 8))
def test_well_formed_property_lists_pass(properties, offset):
    data = b"\xee" * offset + properties
    check_basic_properties(data, offset, len(data))


@given(property_lists(), st.data())
def test_truncated_or_padded_property_lists_are_501(properties, data):
    cut = data.draw(st.integers(0, len(properties) - 1))
    for bad in (properties[:cut], properties + data.draw(st.binary(min_size=1, max_size=4))):
        if bad[:2] == b"\x00\x00" and len(bad) == 2:
            continue  # no properties at all, which is well formed
        with pytest.raises(ProtocolError) as err:
            check_basic_properties(bad, 0, len(bad))
        assert err.value.reply_code == c.FRAME_ERROR


@given(st.binary(max_size=300))
def test_any_property_bytes_pass_or_are_501(data):
    try:
        check_basic_properties(data, 0, len(data))
    except ProtocolError as exc:
        assert exc.reply_code == c.FRAME_ERROR and exc.hard


# ---------------------------------------------------------------------------- UTF-8 in short strings


@given(st.binary(max_size=255), st.sampled_from(["queue", "consumer_tag", "reply_text"]))
@example(b"amqproxy-test-\xff", "queue")
@example("caf\u00e9".encode(), "queue")
@example(b"\xed\xa0\x80", "reply_text")  # an encoded surrogate: not UTF-8
def test_malformed_shortstr_is_exactly_invalid_utf8(raw, field):
    """RabbitMQ closes the connection (501) on invalid UTF-8 in a decoded method's short string;
    the proxy must catch exactly those before they reach a shared upstream connection."""
    method = {"queue": c.QUEUE_DECLARE, "consumer_tag": c.BASIC_CONSUME, "reply_text": c.CHANNEL_CLOSE}[field]
    payload = bytearray(encode_method(method, **{field: "PLACEHOLDER"}))
    at = payload.index(b"\x0bPLACEHOLDER")
    payload[at : at + 12] = bytes([len(raw)]) + raw
    decoded_method, args = decode_method(bytes(payload))
    try:
        raw.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    assert malformed_shortstr(decoded_method, args) == (None if valid else field)
    assert malformed_shortstr(c.BASIC_PUBLISH, {"exchange": "", "routing_key": ""}) is None
