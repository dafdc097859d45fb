"""Reply texts: one helper cuts them to what a shortstr carries, as RabbitMQ does."""

from amqproxy.protocol import constants as c
from amqproxy.protocol.codec import decode_method, encode_method
from amqproxy.protocol.errors import ProtocolError, reply_text


def test_short_texts_are_kept():
    assert reply_text("NOT_FOUND - no queue 'q'") == "NOT_FOUND - no queue 'q'"
    assert reply_text("x" * 255) == "x" * 255


def test_long_texts_are_cut_like_rabbitmq_at_252_bytes_plus_dots():
    assert reply_text("x" * 256) == "x" * 252 + "..."


def test_cut_counts_bytes_not_characters_and_never_splits_a_character():
    text = "RESOURCE_LOCKED - " + "é" * 200  # 418 bytes, 218 characters
    cut = reply_text(text)
    assert len(cut.encode()) <= 255
    assert cut.endswith("...") and cut[:-3] == text[: len(cut) - 3]
    odd = "x" + "é" * 200  # byte 252 falls inside an "é": that character is dropped, not split
    assert reply_text(odd) == "x" + "é" * 125 + "..."


def test_protocol_error_texts_always_encode():
    queue = "é" * 20
    error = ProtocolError(
        c.RESOURCE_LOCKED,
        f"cannot obtain exclusive access to locked queue '{queue}' in vhost '/'. It could be originally "
        "declared on another connection or the exclusive property value does not match that of the "
        "original declaration.",
        c.QUEUE_DECLARE,
    )
    payload = encode_method(c.CHANNEL_CLOSE, reply_code=405, reply_text=error.text, class_id=50, method_id=10)
    _, args = decode_method(payload)
    assert args["reply_text"] == error.text and len(error.text.encode()) == 255
