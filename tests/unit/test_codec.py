"""Method and field-table coding, driven with bytes only."""

from decimal import Decimal

import pytest

from amqproxy.protocol import constants as c
from amqproxy.protocol.codec import (
    DecodeError,
    Timestamp,
    decode_method,
    decode_table,
    encode_method,
    encode_table,
)


def test_table_round_trip_covers_rabbitmq_field_types():
    table = {
        "bool": True,
        "int": -5,
        "big": 2**40,
        "float": 1.5,
        "str": "héllo",
        "bytes": b"\x00\x01",
        "nested": {"a": [1, "b", {"c": False}]},
        "none": None,
        "ts": Timestamp(1700000000),
        "dec": Decimal("1.25"),
    }
    decoded, end = decode_table(encode_table(table), 0)
    assert end == len(encode_table(table))
    assert decoded["bool"] is True
    assert decoded["int"] == -5 and decoded["big"] == 2**40
    assert decoded["float"] == 1.5
    assert decoded["str"] == "héllo".encode()  # longstr comes back as bytes
    assert decoded["bytes"] == b"\x00\x01"
    assert decoded["nested"] == {"a": [1, b"b", {"c": False}]}
    assert decoded["none"] is None
    assert isinstance(decoded["ts"], Timestamp) and decoded["ts"] == 1700000000
    assert decoded["dec"] == Decimal("1.25")


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x00\x05\x01aZ\x00\x00",  # unknown field type
        b"\x00\x00\x00\x09\x01aS\x00\x00\x00\x09",  # longstr overruns the table
        b"\x00\x00\x00\x10",  # table longer than the data
    ],
)
def test_malformed_tables_are_rejected(raw):
    with pytest.raises(DecodeError):
        decode_table(raw, 0)


def test_method_round_trip_packs_consecutive_bits():
    payload = encode_method(
        c.QUEUE_DECLARE, queue="q1", durable=True, exclusive=True, nowait=True, arguments={"x-max-length": 10}
    )
    method, args = decode_method(payload)
    assert method == c.QUEUE_DECLARE
    assert args["queue"] == "q1"
    assert (args["passive"], args["durable"], args["exclusive"], args["auto_delete"], args["nowait"]) == (
        False,
        True,
        True,
        False,
        True,
    )
    assert args["arguments"] == {"x-max-length": 10}
    # ticket (2), shortstr (3), then one octet for the five bits: durable, exclusive, nowait
    assert payload[4:6] == b"\x00\x00" and payload[6:9] == b"\x02q1" and payload[9] == 0b10110


def test_trailing_or_missing_bytes_are_decode_errors():
    payload = encode_method(c.BASIC_ACK, delivery_tag=7, multiple=True)
    assert decode_method(payload)[1] == {"delivery_tag": 7, "multiple": True}
    with pytest.raises(DecodeError):
        decode_method(payload + b"\x00")
    with pytest.raises(DecodeError):
        decode_method(payload[:-1])
    with pytest.raises(DecodeError):
        decode_method(b"\x00\x3c")  # shorter than class and method ids


def test_unknown_method_is_a_decode_error():
    with pytest.raises(DecodeError):
        decode_method(b"\x00\x63\x00\x01")


def test_non_utf8_short_strings_survive_a_round_trip():
    """RabbitMQ accepts any bytes in a short string; the proxy must not refuse or alter them."""
    payload = encode_method(c.QUEUE_DECLARE, queue="x")[:6] + b"\x02\xff\xfe" + encode_method(c.QUEUE_DECLARE)[7:]
    method, args = decode_method(payload)
    assert encode_method(method, **args) == payload


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_rejected(value):
    """RabbitMQ drops the connection on NaN or infinities in a table."""
    with pytest.raises(DecodeError):
        decode_table(encode_table({"k": value}), 0)
