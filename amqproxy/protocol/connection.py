"""The client side of an AMQP connection, channel 0, as a state machine that never touches a socket.

In the spirit of h11: the session feeds it the bytes it read (`receive_data`) and asks for the
next action (`next_action`); the core answers with bytes to send and with the decisions it
needs from the session (prove these credentials, open this vhost), and the session tells it
the outcome (`authenticated`, `opened`, `refuse`). Every rule of the handshake and of channel 0
is here, so it is tested with plain bytes (tests/unit/test_connection.py).

    HEADER --protocol header--> START_SENT --StartOk--> AUTHENTICATING --authenticated()-->
    TUNE_SENT --TuneOk--> AWAITING_OPEN --Open--> OPENING --opened()--> RUNNING
    any state --refuse()/close(), or a protocol error the session answers with close()--> CLOSING
    CLOSING --the client's Close-Ok (or Close, answered)--> CLOSED
    RUNNING --the client's Connection.Close (answered)--> CLOSED

A violation raises `ProtocolError` (RabbitMQ's code and text); the session then calls `close()`
with it. After the proxy's Connection.Close everything but Close and Close-Ok is dropped
(spec 1.4.2.5). Channels (1 and up) are the session's forwarding loop's: in RUNNING it reads
frames from `reader` itself and hands channel-0 frames to `connection_frame`.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

from . import constants as c
from .codec import DecodeError, decode_method, encode_method, method_name
from .errors import ProtocolError, reply_text
from .frames import FrameReader, method_frame
from .handshake import (
    MECHANISMS,
    MECHANISMS_WITH_EXTERNAL,
    AuthError,
    Credentials,
    client_capabilities,
    parse_credentials,
    start_payload,
    tune_payload,
)

_METHOD_ID = struct.Struct(">HH")
_CLOSE_OK = method_frame(0, encode_method(c.CONNECTION_CLOSE_OK))
_OPEN_OK = method_frame(0, encode_method(c.CONNECTION_OPEN_OK))
_UPDATE_SECRET_OK = method_frame(0, encode_method(c.CONNECTION_UPDATE_SECRET_OK))


class ConnectionState(enum.Enum):
    HEADER = "header"  # waiting for the protocol header
    START_SENT = "start_sent"  # Connection.Start sent, waiting for StartOk
    AUTHENTICATING = "authenticating"  # StartOk read: the session proves the credentials
    TUNE_SENT = "tune_sent"  # Connection.Tune sent, waiting for TuneOk
    AWAITING_OPEN = "awaiting_open"  # tuned, waiting for Connection.Open
    OPENING = "opening"  # Open read: the session admits the vhost and opens it upstream
    RUNNING = "running"
    CLOSING = "closing"  # our Connection.Close sent: waiting for Close-Ok
    CLOSED = "closed"


# What the session is asked to do.


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class Authenticate:
    """Prove these credentials (admission, --auth-file, the broker); then `authenticated()` or `refuse()`."""

    credentials: Credentials


@dataclass(frozen=True)
class Refuse:
    """The client cannot go on (its StartOk named no usable credentials): log and count it, then `refuse()`."""

    reply_code: int
    text: str
    method: tuple[int, int]


@dataclass(frozen=True)
class OpenVhost:
    """Admit the vhost and open it upstream; then `opened()` or `refuse()`."""

    vhost: str


@dataclass(frozen=True)
class Established:
    """Connection.OpenOk has been sent: the session forwards from now on."""


@dataclass(frozen=True)
class ClientClosed:
    """The client sent Connection.Close (answered with Close-Ok): the session ends."""

    reply_code: int
    reply_text: str


@dataclass(frozen=True)
class SecretUpdated:
    """connection.update-secret, acknowledged (pooled upstreams keep the secret they logged in with)."""


@dataclass(frozen=True)
class Ended:
    """The connection is over; `reason` says how. Nothing more will be sent or read. `refused`
    names the refusal when it was one (the session counts it: protocol_header)."""

    reason: str
    refused: str = ""


Action = Send | Authenticate | Refuse | OpenVhost | Established | ClientClosed | SecretUpdated | Ended

# The method each handshake state waits for.
_EXPECTED = {
    ConnectionState.START_SENT: c.CONNECTION_START_OK,
    ConnectionState.TUNE_SENT: c.CONNECTION_TUNE_OK,
    ConnectionState.AWAITING_OPEN: c.CONNECTION_OPEN,
}


class ClientConnection:
    """Channel 0 of one client connection (see the module docstring for the states)."""

    def __init__(self, client_heartbeat: int, external: bool = False) -> None:
        self.state = ConnectionState.HEADER
        self.reader = FrameReader(c.PRE_TUNE_FRAME_MAX)
        self.client_heartbeat = client_heartbeat  # what Tune proposes
        self.external = external  # offer EXTERNAL (a verified certificate maps to a user)
        self.capabilities: frozenset[str] = frozenset()
        self.credentials: Credentials | None = None
        self.channel_max = 0
        self.frame_max = 0
        self.max_body = c.PRE_TUNE_FRAME_MAX - c.FRAME_OVERHEAD
        self.heartbeat = 0
        self.vhost = ""
        self._header = b""
        self._tuned = (0, 0)  # the channel_max and frame_max our Tune offered
        self._pending: deque[Action] = deque()  # actions decided, not yet handed out

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> None:
        if self.state is ConnectionState.HEADER:
            self._header += data
        else:
            self.reader.feed(data)

    def next_action(self) -> Action | None:
        """The next thing to do, or None when more bytes are needed (or the session's answer is)."""
        if self._pending:
            return self._pending.popleft()
        state = self.state
        if state is ConnectionState.HEADER:
            return self._read_header()
        if state in _EXPECTED:
            args = self._read_method(_EXPECTED[state])
            if args is None:
                return self._pending.popleft() if self._pending else None
            return self._on_handshake_method(state, args)
        if state is ConnectionState.CLOSING:
            return self._read_close_ok()
        return None  # AUTHENTICATING / OPENING wait for the session; RUNNING is read by the session

    def _end(self, reason: str, send: bytes = b"", refused: str = "") -> Action:
        self.state = ConnectionState.CLOSED
        if send:
            self._pending.append(Ended(reason, refused))
            return Send(send)
        return Ended(reason, refused)

    def _read_header(self) -> Action | None:
        header = self._header
        if len(header) < 8 and c.PROTOCOL_HEADER.startswith(header[:4]):
            return None
        rest, self._header = header[8:], b""
        if header[:8] != c.PROTOCOL_HEADER and header[:8] != c.LEGACY_0_9_1_HEADER:
            # Spec 4.2.2: answer an unsupported header with ours, then close.
            return self._end("unsupported protocol header", c.PROTOCOL_HEADER, refused="protocol_header")
        self.state = ConnectionState.START_SENT
        self.reader.feed(rest)
        mechanisms = MECHANISMS_WITH_EXTERNAL if self.external else MECHANISMS
        return Send(method_frame(0, start_payload(mechanisms=mechanisms)))

    def _read_method(self, expected: tuple[int, int]) -> dict[str, Any] | None:
        """The next handshake method, which must be `expected` (heartbeats are skipped); None
        when more bytes are needed or the client closed (its Close is answered: see _pending)."""
        reader = self.reader
        while True:
            frame = reader.next_frame()
            if frame is None:
                return None
            frame_type, channel, start, end = frame
            if frame_type == c.FRAME_HEARTBEAT:
                continue
            if frame_type != c.FRAME_METHOD or channel != 0:
                raise ProtocolError(c.UNEXPECTED_FRAME, f"expected {method_name(expected)} on channel 0")
            try:
                method, args = decode_method(bytes(reader.buffer[start:end]))
            except DecodeError as exc:
                raise ProtocolError(c.FRAME_ERROR, f"cannot decode {method_name(expected)}: {exc}") from exc
            reader.compact()
            if method == c.CONNECTION_CLOSE:
                self._pending.appendleft(self._end("client closed during the handshake", _CLOSE_OK))
                return None
            if method != expected:
                raise ProtocolError(
                    c.COMMAND_INVALID, f"expected {method_name(expected)}, got {method_name(method)}", method
                )
            return args

    def _on_handshake_method(self, state: ConnectionState, args: dict[str, Any]) -> Action | None:
        if state is ConnectionState.START_SENT:
            self.capabilities = client_capabilities(args["client_properties"])
            self.state = ConnectionState.AUTHENTICATING
            try:
                credentials = parse_credentials(args["mechanism"], args["response"], self.external)
            except AuthError as exc:
                return Refuse(exc.reply_code, exc.text, c.CONNECTION_START_OK)
            self.credentials = credentials
            return Authenticate(credentials)
        if state is ConnectionState.TUNE_SENT:
            self._on_tune_ok(args["channel_max"], args["frame_max"], args["heartbeat"])
            self.state = ConnectionState.AWAITING_OPEN
            return self.next_action()
        self.vhost = args["virtual_host"]
        self.state = ConnectionState.OPENING
        return OpenVhost(self.vhost)

    def _on_tune_ok(self, channel_max: int, frame_max: int, heartbeat: int) -> None:
        offered_channel_max, offered_frame_max = self._tuned
        if frame_max and frame_max < c.FRAME_MIN_SIZE:
            raise ProtocolError(
                c.NOT_ALLOWED, f"frame_max={frame_max} < {c.FRAME_MIN_SIZE} min size", c.CONNECTION_TUNE_OK
            )
        if frame_max > offered_frame_max:
            raise ProtocolError(
                c.NOT_ALLOWED, f"frame_max={frame_max} > {offered_frame_max} max size", c.CONNECTION_TUNE_OK
            )
        if channel_max > offered_channel_max:
            raise ProtocolError(
                c.NOT_ALLOWED,
                f"channel_max={channel_max} > {offered_channel_max} max channels",
                c.CONNECTION_TUNE_OK,
            )
        self.channel_max = channel_max or offered_channel_max
        self.frame_max = frame_max or offered_frame_max
        self.max_body = self.frame_max - c.FRAME_OVERHEAD
        self.reader.max_frame_size = self.frame_max
        self.heartbeat = heartbeat

    def _read_close_ok(self) -> Action | None:
        """After our Connection.Close: drop everything until Close-Ok (a crossing Close is answered)."""
        reader = self.reader
        try:
            while (frame := reader.next_frame()) is not None:
                frame_type, channel, start, _end = frame
                if channel == 0 and frame_type == c.FRAME_METHOD:
                    method = _METHOD_ID.unpack_from(reader.buffer, start)
                    if method == c.CONNECTION_CLOSE:
                        return self._end("the client's Close crossed ours", _CLOSE_OK)
                    if method == c.CONNECTION_CLOSE_OK:
                        return self._end("Close-Ok received")
        except ProtocolError:
            return self._end("unreadable bytes after Connection.Close")  # nothing more to wait for
        reader.compact()
        return None

    # ------------------------------------------------------------------ the session's answers

    def authenticated(self, channel_max: int, frame_max: int) -> Send:
        """The credentials are good: Connection.Tune offers these limits (and the heartbeat)."""
        assert self.state is ConnectionState.AUTHENTICATING
        self._tuned = (channel_max, frame_max)
        self.state = ConnectionState.TUNE_SENT
        return Send(method_frame(0, tune_payload(channel_max, frame_max, self.client_heartbeat)))

    def opened(self) -> Send:
        """The vhost is open upstream: Connection.OpenOk, and the connection runs."""
        assert self.state is ConnectionState.OPENING
        self.state = ConnectionState.RUNNING
        return Send(_OPEN_OK)

    def refuse(self, reply_code: int, text: str, method: tuple[int, int]) -> Send | Ended:
        """Refuse the handshake. A login refused at StartOk, of a client that did not ask for
        authentication_failure_close, gets no Close (the spec's way: the socket just closes)."""
        if (
            reply_code == c.ACCESS_REFUSED
            and method == c.CONNECTION_START_OK
            and "authentication_failure_close" not in self.capabilities
        ):
            self.state = ConnectionState.CLOSED
            return Ended(text)
        return self.close(reply_code, text, method)

    def close(self, reply_code: int, text: str, method: tuple[int, int] = (0, 0)) -> Send:
        """Connection.Close from the proxy; only Close-Ok (or a crossing Close) matters afterwards."""
        self.state = ConnectionState.CLOSING
        return Send(
            method_frame(
                0,
                encode_method(
                    c.CONNECTION_CLOSE,
                    reply_code=reply_code,
                    reply_text=reply_text(text),
                    class_id=method[0],
                    method_id=method[1],
                ),
            )
        )

    # ------------------------------------------------------------------ channel 0 while running

    def connection_frame(self, frame_type: int, payload: memoryview | bytes) -> Action | None:
        """A channel-0 frame read by the forwarding loop (RUNNING). The session answers a
        ClientClosed with `close_ok()` once its channels are released, a SecretUpdated with
        `update_secret_ok()`."""
        if frame_type == c.FRAME_HEARTBEAT:
            return None
        if frame_type != c.FRAME_METHOD:
            raise ProtocolError(c.UNEXPECTED_FRAME, "expected method frame, got non method frame instead")
        try:
            method, args = decode_method(payload)
        except DecodeError as exc:
            raise ProtocolError(c.FRAME_ERROR, f"cannot decode connection method: {exc}") from exc
        if method == c.CONNECTION_CLOSE:
            self.state = ConnectionState.CLOSED
            return ClientClosed(args["reply_code"], args["reply_text"])
        if method == c.CONNECTION_CLOSE_OK:
            return None
        if method == c.CONNECTION_UPDATE_SECRET:
            return SecretUpdated()
        raise ProtocolError(c.CHANNEL_ERROR, "unexpected method in connection state running", method)

    @staticmethod
    def close_ok() -> bytes:
        return _CLOSE_OK

    @staticmethod
    def update_secret_ok() -> bytes:
        return _UPDATE_SECRET_OK
