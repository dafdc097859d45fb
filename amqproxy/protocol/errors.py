"""The one place that turns a protocol violation into an AMQP reply code and text."""

from __future__ import annotations

from .constants import REPLY_NAMES

REPLY_TEXT_MAX = 255  # reply-text is a shortstr: at most 255 bytes of UTF-8


def reply_text(text: str) -> str:
    """`text` as a reply-text can carry it: at most 255 bytes. The one place texts are cut, the
    way RabbitMQ cuts its own (the first 252 bytes and "..."), never mid-character: a cut by
    characters can leave more than 255 bytes ("é" is two), which the codec refuses, turning a
    channel error into a 541 for the whole connection."""
    raw = text.encode()
    if len(raw) <= REPLY_TEXT_MAX:
        return text
    return raw[: REPLY_TEXT_MAX - 3].decode("utf-8", "ignore") + "..."


class ProtocolError(Exception):
    """A peer broke a rule; `hard` errors close the connection, soft ones only the channel.

    `text` follows RabbitMQ's form, "NAME - detail", so clients see what the broker would say.
    """

    def __init__(self, reply_code: int, detail: str, method: tuple[int, int] = (0, 0)) -> None:
        name = REPLY_NAMES.get(reply_code, "ERROR")
        self.reply_code = reply_code
        prefix = f"{name} - "
        self.text = reply_text(detail if detail.startswith(prefix) else prefix + detail)
        self.method = method
        super().__init__(self.text)

    @property
    def hard(self) -> bool:
        # Spec 1.3: codes in the connection class are hard errors; 3xx/4xx channel codes are soft.
        return self.reply_code == 320 or self.reply_code == 402 or self.reply_code >= 500
