"""The one place that turns a protocol violation into an AMQP reply code and text."""

from __future__ import annotations

from .constants import REPLY_NAMES


class ProtocolError(Exception):
    """A peer broke a rule; `hard` errors close the connection, soft ones only the channel.

    `text` follows RabbitMQ's form, "NAME - detail", so clients see what the broker would say.
    """

    def __init__(self, reply_code: int, detail: str, method: tuple[int, int] = (0, 0)) -> None:
        name = REPLY_NAMES.get(reply_code, "ERROR")
        self.reply_code = reply_code
        prefix = f"{name} - "
        self.text = (detail if detail.startswith(prefix) else prefix + detail)[:255]
        self.method = method
        super().__init__(self.text)

    @property
    def hard(self) -> bool:
        # Spec 1.3: codes in the connection class are hard errors; 3xx/4xx channel codes are soft.
        return self.reply_code == 320 or self.reply_code == 402 or self.reply_code >= 500
