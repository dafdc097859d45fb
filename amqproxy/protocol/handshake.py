"""Connection handshake pieces: what the proxy says as a server to clients and as a client to brokers.

Pure functions over method payloads; the sessions drive the sequence.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any

from .. import __version__
from .codec import DecodeError, decode_table, encode_method, encode_table
from .constants import CONNECTION_START, CONNECTION_START_OK, CONNECTION_TUNE, CONNECTION_TUNE_OK

# What RabbitMQ advertises (LESSONS: a proxy answering Connection.Start must advertise these).
SERVER_CAPABILITIES = {
    "publisher_confirms": True,
    "exchange_exchange_bindings": True,
    "basic.nack": True,
    "consumer_cancel_notify": True,
    "connection.blocked": True,
    "consumer_priorities": True,
    "authentication_failure_close": True,
    "per_consumer_qos": True,
    "direct_reply_to": True,
}

# What the proxy asks of the broker on its pooled connections. It must accept everything a
# client may rely on, and then filter per client (e.g. basic.cancel only to clients that asked).
UPSTREAM_CAPABILITIES = {
    "publisher_confirms": True,
    "exchange_exchange_bindings": True,
    "basic.nack": True,
    "consumer_cancel_notify": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
    "per_consumer_qos": True,
}

MECHANISMS = b"PLAIN AMQPLAIN"
# Offered only on TLS connections with a verified client certificate when --auth-file maps
# certificate subjects to users (RabbitMQ's rabbitmq_auth_mechanism_ssl offers it the same way).
MECHANISMS_WITH_EXTERNAL = b"PLAIN AMQPLAIN EXTERNAL"


class AuthError(ValueError):
    """The client's StartOk cannot be turned into credentials (reply code 503 or 403)."""

    def __init__(self, reply_code: int, text: str) -> None:
        super().__init__(text)
        self.reply_code = reply_code
        self.text = text


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = ""
    # The client's SASL mechanism, reused upstream so the broker's answers read the same.
    mechanism: str = "PLAIN"

    def __repr__(self) -> str:  # never print the password
        return f"Credentials(username={self.username!r}, password=***)"


@functools.lru_cache(maxsize=4)
def start_payload(cluster_name: str = "amqproxy", mechanisms: bytes = MECHANISMS) -> bytes:
    """Connection.Start, encoded once: it is the same for every client."""
    return encode_method(
        CONNECTION_START,
        version_major=0,
        version_minor=9,
        server_properties={
            "capabilities": SERVER_CAPABILITIES,
            "cluster_name": cluster_name,
            "copyright": "amqproxy contributors",
            "information": "amqproxy, a pooling AMQP 0-9-1 proxy for RabbitMQ",
            "platform": "Python/gevent",
            "product": "amqproxy",
            "version": __version__,
        },
        mechanisms=mechanisms,
        locales=b"en_US",
    )


def parse_credentials(mechanism: str, response: bytes, external: bool = False) -> Credentials:
    """Decode a SASL response for PLAIN ("authzid\\0user\\0pass") or AMQPLAIN (a bare table); with
    `external` (it was offered), EXTERNAL too: the certificate names the user, not the response."""
    if mechanism == "EXTERNAL" and external:
        return Credentials("", "", "EXTERNAL")
    if mechanism == "PLAIN":
        parts = response.split(b"\x00")
        if len(parts) != 3:
            raise AuthError(403, "ACCESS_REFUSED - malformed PLAIN response")
        return Credentials(parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace"), "PLAIN")
    if mechanism == "AMQPLAIN":
        # The response is a field table without its 4-byte length prefix.
        try:
            table, _ = decode_table(struct.pack(">I", len(response)) + response, 0)
        except DecodeError as exc:
            raise AuthError(403, "ACCESS_REFUSED - malformed AMQPLAIN response") from exc
        login, password = table.get("LOGIN"), table.get("PASSWORD")
        if login is None or password is None:
            raise AuthError(403, "ACCESS_REFUSED - AMQPLAIN response lacks LOGIN or PASSWORD")
        return Credentials(_text(login), _text(password), "AMQPLAIN")
    raise AuthError(503, f"COMMAND_INVALID - unknown authentication mechanism '{mechanism}'")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def sasl_response(credentials: Credentials, mechanism: str) -> bytes:
    if mechanism == "AMQPLAIN":
        return encode_table({"LOGIN": credentials.username, "PASSWORD": credentials.password})[4:]
    return b"\x00" + credentials.username.encode() + b"\x00" + credentials.password.encode()


def start_ok_payload(
    credentials: Credentials, connection_name: str, extra: dict[str, Any], mechanism: str = "PLAIN"
) -> bytes:
    return encode_method(
        CONNECTION_START_OK,
        client_properties={
            "product": "amqproxy",
            "version": __version__,
            "platform": "Python/gevent",
            "connection_name": connection_name,
            "capabilities": UPSTREAM_CAPABILITIES,
            **extra,
        },
        mechanism=mechanism,
        response=sasl_response(credentials, mechanism),
        locale="en_US",
    )


@functools.lru_cache(maxsize=16)
def tune_payload(channel_max: int, frame_max: int, heartbeat: int) -> bytes:
    """Connection.Tune, encoded once per set of limits: every client gets the same."""
    return encode_method(CONNECTION_TUNE, channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat)


def tune_ok_payload(channel_max: int, frame_max: int, heartbeat: int) -> bytes:
    return encode_method(CONNECTION_TUNE_OK, channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat)


def negotiate(ours: int, theirs: int) -> int:
    """Tune negotiation for limits where 0 means 'no limit': the smaller non-zero value wins."""
    if ours == 0:
        return theirs
    if theirs == 0:
        return ours
    return min(ours, theirs)


def client_capabilities(client_properties: dict[str, Any]) -> frozenset[str]:
    caps = client_properties.get("capabilities")
    if not isinstance(caps, dict):
        return frozenset()
    return frozenset(key for key, value in caps.items() if value is True)
