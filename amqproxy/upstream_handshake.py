"""The handshake of a pooled upstream connection, in the caller's greenlet, and its vocabulary.

`UpstreamHandshake` is mixed into `upstream.Upstream`: TCP (and TLS, and a PROXY header) to the
node, Start/StartOk/Tune/TuneOk (the login that proves a client's credentials), then
Connection.Open for a vhost, after which the connection's reader and writer take over. The
states an upstream connection goes through, and the errors of dialling
of its pool are here too, so that every part of `Upstream` can name them.
"""

from __future__ import annotations

import enum
import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, Protocol

import gevent

from . import tls
from .metrics import FORWARD_LATENCY_C2U
from .outbox import Outbox
from .protocol import constants as c
from .protocol import proxyproto
from .protocol.codec import DecodeError, decode_method, encode_method
from .protocol.errors import ProtocolError
from .protocol.frames import FrameReader, method_frame
from .protocol.handshake import Credentials, negotiate, start_ok_payload, tune_ok_payload

if TYPE_CHECKING:
    from .config import Config
    from .nodes import Node

log = logging.getLogger("amqproxy.upstream")

_HAS_USER_TIMEOUT = hasattr(socket, "TCP_USER_TIMEOUT")


class UpstreamState(str, enum.Enum):
    NEW = "new"  # dialling: TCP, TLS, the protocol header
    LOGGED_IN = "logged-in"  # Start/StartOk/Tune/TuneOk done: the credentials are proven
    OPEN = "open"  # Connection.Open done: carries channels
    CLOSING = "closing"  # our Connection.Close sent, awaiting Close-Ok
    CLOSED = "closed"


class UpstreamError(Exception):
    """The broker could not be reached or refused us.

    `reply_code` is the broker's AMQP code when it answered (403, 530...), else 0. `permanent`
    failures (credentials, vhost, permissions) are not worth retrying on another node.
    `breaker_open`: nothing was tried, every node's circuit breaker is open.
    """

    def __init__(self, text: str, reply_code: int = 0, permanent: bool = False, breaker_open: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.reply_code = reply_code
        self.permanent = permanent
        self.breaker_open = breaker_open  # refused at once: every node's circuit breaker is open


class _HandshakePool(Protocol):
    """What the handshake uses of the pool."""

    @property
    def config(self) -> Config: ...

    @property
    def pid(self) -> int: ...


class UpstreamHandshake:
    """The handshake methods of `Upstream` (the attributes below are the connection's own)."""

    pool: _HandshakePool
    node: Node
    credentials: Credentials
    id: int
    vhost: str | None
    sock: socket.socket | None
    outbox: Outbox | None
    state: UpstreamState
    channel_max: int
    broker_channel_max: int
    frame_max: int
    max_body: int
    heartbeat: int
    server_properties: dict[str, Any]
    last_recv: float
    idle_since: float
    _reader: gevent.Greenlet | None
    _handshake: FrameReader

    @property
    def name(self) -> str:
        return f"amqproxy[{self.pool.pid}] upstream {self.id}"

    def _read_loop(self) -> None:
        raise NotImplementedError

    def _on_write_error(self, exc: BaseException) -> None:
        raise NotImplementedError

    def login(self, timeout: float) -> None:
        """TCP (+TLS) connect, protocol header, Start/StartOk/Tune/TuneOk: proves the credentials."""
        cfg = self.pool.config
        try:
            sock = socket.create_connection((self.node.host, self.node.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tune_socket(sock, cfg.upstream_keepalive, cfg.upstream_tcp_user_timeout)
            if self.node.proxy_protocol:  # before any TLS byte, as the broker expects it
                sock.sendall(proxyproto.encode(self.node.proxy_protocol, sock.getsockname(), sock.getpeername()))
            sock = tls.wrap_upstream(sock, self.node, cfg)  # amqps://: TLS (+mTLS) with SNI
            self.sock = sock
            sock.sendall(c.PROTOCOL_HEADER)
            method, args = self._expect_method(c.CONNECTION_START, timeout)
            self.server_properties = args["server_properties"]
            mechanisms = args["mechanisms"].split()
            mechanism = self.credentials.mechanism
            if mechanism.encode() not in mechanisms:
                mechanism = "PLAIN"
                if b"PLAIN" not in mechanisms:
                    raise UpstreamError(f"broker offers no PLAIN mechanism ({args['mechanisms']!r})", permanent=True)
            self._send_handshake(start_ok_payload(self.credentials, self.name, {}, mechanism))
            method, args = self._expect_method(c.CONNECTION_TUNE, timeout)
            self.broker_channel_max = args["channel_max"] or 65535
            self.channel_max = negotiate(cfg.max_channels_per_upstream, args["channel_max"]) or 65535
            self.frame_max = negotiate(cfg.frame_max, args["frame_max"]) or cfg.frame_max
            self.max_body = self.frame_max - c.FRAME_OVERHEAD
            self.heartbeat = cfg.upstream_heartbeat
            self._send_handshake(tune_ok_payload(self.channel_max, self.frame_max, self.heartbeat))
            self.state = UpstreamState.LOGGED_IN
        except UpstreamError:
            self.abort()
            raise
        except (OSError, ssl.SSLError, ProtocolError, DecodeError) as exc:
            self.abort()
            raise UpstreamError(f"cannot connect to {self.node.label}: {describe_error(exc)}") from exc

    def open(self, vhost: str, timeout: float) -> None:
        """Connection.Open for `vhost`; then start the reader and writer greenlets."""
        try:
            self._send_handshake(encode_method(c.CONNECTION_OPEN, virtual_host=vhost))
            self._expect_method(c.CONNECTION_OPEN_OK, timeout)
        except UpstreamError:
            self.abort()
            raise
        except (OSError, ssl.SSLError, ProtocolError, DecodeError) as exc:
            self.abort()
            raise UpstreamError(f"connection to {self.node.label} lost during open: {describe_error(exc)}") from exc
        assert self.sock is not None
        self.sock.settimeout(None)
        self.vhost = vhost
        self.state = UpstreamState.OPEN
        self.last_recv = self.idle_since = time.monotonic()
        self.outbox = Outbox(
            self.sock,
            self._on_write_error,
            high_watermark=self.pool.config.upstream_buffer,
            latency=FORWARD_LATENCY_C2U,
        )
        self._reader = gevent.spawn(self._read_loop)
        log.info(
            "upstream connection open",
            extra={
                "event": "upstream_open",
                "upstream_id": self.id,
                "node": self.node.label,
                "vhost": vhost,
                "user": self.credentials.username,
                "channel_max": self.channel_max,
                "frame_max": self.frame_max,
                "heartbeat": self.heartbeat,
            },
        )

    def _send_handshake(self, payload: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(method_frame(0, payload))

    def _expect_method(self, expected: tuple[int, int], timeout: float) -> tuple[tuple[int, int], dict[str, Any]]:
        assert self.sock is not None
        self.sock.settimeout(timeout)
        reader = self._handshake
        while True:
            frame = reader.next_frame()
            if frame is None:
                data = self.sock.recv(65536)
                if not data:
                    raise UpstreamError(
                        f"{self.node.label} closed the connection during the handshake "
                        f"(expected {'.'.join(map(str, expected))})",
                        reply_code=c.ACCESS_REFUSED if expected == c.CONNECTION_TUNE else 0,
                        permanent=expected == c.CONNECTION_TUNE,
                    )
                reader.feed(data)
                continue
            frame_type, _channel, start, end = frame
            if frame_type != c.FRAME_METHOD:
                continue  # heartbeats may arrive once tuned
            method, args = decode_method(bytes(reader.buffer[start:end]))
            reader.compact()
            if method == expected:
                return method, args
            if method == c.CONNECTION_CLOSE:
                try:
                    self._send_handshake(encode_method(c.CONNECTION_CLOSE_OK))
                except OSError:
                    pass
                code = args["reply_code"]
                raise UpstreamError(args["reply_text"], reply_code=code, permanent=code in (403, 530, 402))
            raise UpstreamError(f"unexpected {method} from {self.node.label} during the handshake")

    def abort(self) -> None:
        raise NotImplementedError


def tune_socket(sock: socket.socket, keepalive: float, user_timeout: float) -> None:
    """Kernel-level liveness on an upstream socket: TCP keepalive (idle seconds; 3 probes a
    third of that apart) and TCP_USER_TIMEOUT (unacknowledged data), where the OS has them."""
    if keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", keepalive),
            ("TCP_KEEPINTVL", keepalive / 3),
            ("TCP_KEEPCNT", 3),
        ):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), max(1, int(value)))
    if user_timeout and _HAS_USER_TIMEOUT:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))


def describe_error(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, socket.timeout):
        return "timed out"
    return text
