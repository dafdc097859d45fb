"""ChannelGuard: the client mistakes RabbitMQ punishes with connection errors."""

import pytest

from amqproxy.protocol import constants as c
from amqproxy.protocol.codec import decode_method, encode_method, encode_table
from amqproxy.protocol.errors import ProtocolError
from amqproxy.protocol.rules import ChannelGuard, check_ack_layout


def publish(**args):
    return encode_method(c.BASIC_PUBLISH, exchange="ex", routing_key="rk", **args)


def header(body_size, class_id=60):
    return class_id.to_bytes(2, "big") + b"\x00\x00" + body_size.to_bytes(8, "big") + b"\x00\x00"


def code_of(call, *args):
    with pytest.raises(ProtocolError) as err:
        call(*args)
    return err.value.reply_code


def test_publish_then_header_then_bodies_in_sequence():
    guard = ChannelGuard()
    p = publish()
    guard.on_publish(p, 0, len(p))
    h = header(10)
    guard.on_header(h, 0, len(h))
    guard.on_body(4)
    guard.on_body(6)
    guard.on_method(c.BASIC_ACK)  # back to expecting a method


def test_zero_length_body_needs_no_body_frame():
    guard = ChannelGuard()
    p = publish()
    guard.on_publish(p, 0, len(p))
    h = header(0)
    guard.on_header(h, 0, len(h))
    guard.on_method(c.BASIC_PUBLISH)


def test_out_of_order_content_frames_are_505():
    guard = ChannelGuard()
    h = header(1)
    assert code_of(guard.on_header, h, 0, len(h)) == 505
    assert code_of(guard.on_body, 1) == 505
    p = publish()
    guard.on_publish(p, 0, len(p))
    assert code_of(guard.on_method, c.BASIC_PUBLISH) == 505


def test_body_longer_than_announced_is_an_error():
    guard = ChannelGuard()
    p = publish()
    guard.on_publish(p, 0, len(p))
    h = header(3)
    guard.on_header(h, 0, len(h))
    assert code_of(guard.on_body, 4) == 501


def test_immediate_publish_is_540_and_garbled_publish_501():
    guard = ChannelGuard()
    p = publish(immediate=True)
    assert code_of(guard.on_publish, p, 0, len(p)) == 540
    p = publish()
    assert code_of(guard.on_publish, p + b"\x00", 0, len(p) + 1) == 501
    assert code_of(guard.on_publish, p[:-1], 0, len(p) - 1) == 501


@pytest.mark.parametrize(
    "method,args,code",
    [
        (c.EXCHANGE_DECLARE, {"exchange": "x", "type": "nope"}, 503),
        (c.BASIC_QOS, {"prefetch_size": 10, "prefetch_count": 1}, 540),
        (c.CHANNEL_FLOW, {"active": False}, 540),
        (c.BASIC_RECOVER_ASYNC, {"requeue": False}, 540),
    ],
)
def test_methods_rabbitmq_answers_with_hard_errors(method, args, code):
    guard = ChannelGuard()
    decoded_method, decoded = decode_method(encode_method(method, **args))
    assert code_of(guard.check_control, decoded_method, decoded) == code


def test_plugin_and_builtin_exchange_types_pass():
    guard = ChannelGuard()
    for kind in ("direct", "fanout", "topic", "headers", "x-consistent-hash"):
        guard.check_control(*decode_method(encode_method(c.EXCHANGE_DECLARE, exchange="x", type=kind)))
    # a passive declare names no type worth checking
    guard.check_control(*decode_method(encode_method(c.EXCHANGE_DECLARE, exchange="x", type="", passive=True)))


def test_consumer_tag_reuse_is_530():
    guard = ChannelGuard()
    guard.consumer_tags.add("ctag")
    method, args = decode_method(encode_method(c.BASIC_CONSUME, queue="q", consumer_tag="ctag"))
    assert code_of(guard.check_control, method, args) == 530
    method, args = decode_method(encode_method(c.BASIC_CONSUME, queue="q", consumer_tag=""))
    guard.check_control(method, args)  # server-named tags never collide


def test_commands_during_tx_commit_are_504():
    guard = ChannelGuard()
    guard.check_control(c.TX_COMMIT, {})
    assert code_of(guard.on_method, c.BASIC_ACK) == 504
    guard.commit_pending = False
    guard.on_method(c.BASIC_ACK)


def test_ack_layout():
    check_ack_layout(c.BASIC_ACK, 13)
    assert code_of(check_ack_layout, c.BASIC_ACK, 12) == 501


def props(flags, body=b""):
    return flags.to_bytes(2, "big") + body


@pytest.mark.parametrize(
    "properties",
    [
        props(0x8000, b"\x09text/"),  # content-type longer than the frame
        props(0x2000, b"\x00\x00\x00\x05\x01aZ\x00\x00"),  # headers with an unknown field type
        props(0x0001),  # continuation bit
        props(0x1000),  # delivery-mode flagged but missing
        props(0x1000, b"\x02\x00"),  # one byte too many
    ],
)
def test_malformed_properties_are_501(properties):
    guard = ChannelGuard()
    p = publish()
    guard.on_publish(p, 0, len(p))
    h = b"\x00\x3c\x00\x00" + (5).to_bytes(8, "big") + properties
    assert code_of(guard.on_header, h, 0, len(h)) == 501


def test_well_formed_properties_pass():
    guard = ChannelGuard()
    p = publish()
    guard.on_publish(p, 0, len(p))
    body = b"\x0atext/plain" + b"\x00\x00\x00\x0b\x01aS\x00\x00\x00\x01b\x00\x00\x00\x00"[:0]
    headers = encode_table({"a": "b", "n": 1})
    h = b"\x00\x3c\x00\x00" + (5).to_bytes(8, "big") + props(0x8000 | 0x2000 | 0x1000, body + headers + b"\x02")
    guard.on_header(h, 0, len(h))
    assert guard.expect == 2


def test_recover_requeue_false_is_540_in_both_forms():
    guard = ChannelGuard()
    for method in (c.BASIC_RECOVER, c.BASIC_RECOVER_ASYNC):
        assert code_of(guard.check_control, *decode_method(encode_method(method, requeue=False))) == 540


def test_channel_close_is_allowed_while_a_commit_is_pending():
    guard = ChannelGuard()
    guard.check_control(c.TX_COMMIT, {})
    guard.on_method(c.CHANNEL_CLOSE)
