"""ClientSession: one downstream AMQP connection, from the protocol header to the last Close-Ok.

Greenlets: the StreamServer handler greenlet runs `run()`: the handshake, then the forwarding
loop that alone reads the client socket; one `Outbox` alone writes it. The loop routes each
client frame by channel id onto the linked upstream channel (rewriting only the channel id),
after the checks in `protocol.rules` that keep one client's mistakes off shared connections.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

import gevent
from gevent.event import AsyncResult

from .access import USER_REFUSED_CODE, VHOST_REFUSED_CODE, user_refused_text, vhost_refused_text
from .channel import BlockingUpstream, ChannelSink, Gap, Link, Replay
from .limits import CLIENT_BYTE_RATE, Decision, Refusal, TokenBucket
from .metrics import BYTES, CLIENT_TO_UPSTREAM, FORWARD_LATENCY_U2C, FRAMES
from .outbox import Outbox
from .protocol import constants as c
from .protocol import proxyproto
from .protocol.closing import CloseEvent
from .protocol.codec import DecodeError, decode_method, encode_method, method_name
from .protocol.constants import FRAME_END, FRAME_METHOD, REPLY_NAMES
from .protocol.content import PUBLISH, Run, append_frames, message_run
from .protocol.errors import ProtocolError, reply_text
from .protocol.frames import (
    FRAME_HEADER_STRUCT,
    HEARTBEAT_FRAME,
    VALID_FRAME_TYPES,
    FrameReader,
    append_split_body,
    method_frame,
)
from .protocol.handshake import (
    MECHANISMS,
    MECHANISMS_WITH_EXTERNAL,
    AuthError,
    Credentials,
    client_capabilities,
    negotiate,
    parse_credentials,
    start_payload,
    tune_payload,
)
from .protocol.rules import CLIENT_CHANNEL_METHODS, EXPECT_METHOD, QUEUE_ACCESS_METHODS, Role, check_ack_layout, role_of
from .recovery import ConfirmTracker, Topology, ack_tag, consume_nowait, qos_default
from .upstream import Upstream, UpstreamError

if TYPE_CHECKING:
    from .access import AddressFilter
    from .config import Config
    from .limits import Limits
    from .metrics import Metrics
    from .pool import Pool
    from .tls import PeerInfo

log = logging.getLogger("amqproxy.client")
audit_log = logging.getLogger("amqproxy.audit")

_METHOD_ID = struct.Struct(">HH")
_ACK_ARGS = struct.Struct(">QB")
_RECV_SIZE = 256 * 1024
_ACKS = frozenset({c.BASIC_ACK, c.BASIC_NACK, c.BASIC_REJECT})
_CHANNEL_OPEN = encode_method(c.CHANNEL_OPEN)
_CHANNEL_OPEN_OK = encode_method(c.CHANNEL_OPEN_OK)
_CLOSE_OK_WAIT = 3.0  # how long a client gets to answer our Connection.Close
# A client whose outbox stays above --client-buffer for --slow-client-grace is disconnected; one
# whose outbox passes this many times the limit is disconnected at once (memory stays bounded).
_HARD_BUFFER_FACTOR = 4
_ids = itertools.count(1)
_id_prefix = f"{os.getpid() % 0xFFFF:04x}"


def _short_method_text(payload: memoryview) -> str:
    """RabbitMQ's text for a method frame too short to hold its (class, method) id."""
    octets = ",".join(str(b) for b in payload.tobytes())
    return f"type 1, all octets = <<{octets}>>: unknown_frame"


def renumber_frames(data: bytes | bytearray, channel: int, max_body: int) -> bytearray:
    """Whole frames re-addressed to `channel` (bodies re-split to `max_body` when larger)."""
    out = bytearray()
    pos = 0
    end_all = len(data)
    with memoryview(data) as view:
        while pos < end_all:
            frame_type, _channel, size = FRAME_HEADER_STRUCT.unpack_from(data, pos)
            start = pos + 7
            end = start + size
            if frame_type == c.FRAME_BODY and size > max_body:
                append_split_body(out, channel, view[start:end], max_body)
            else:
                out += FRAME_HEADER_STRUCT.pack(frame_type, channel, size)
                out += view[start : end + 1]
            pos = end + 1
    return out


class SessionHost(Protocol):
    """What a client session uses of the proxy that accepted it (server.Proxy)."""

    @property
    def config(self) -> Config:
        """The configuration in force now (a reload replaces it)."""

    @property
    def pool(self) -> Pool: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def limits(self) -> Limits: ...

    @property
    def address_filter(self) -> AddressFilter: ...

    def forget(self, session: ClientSession) -> None:
        """The session has ended."""

    def wait_if_paused(self, vhost: str) -> bool:
        """Hold the caller while `vhost` is paused; False if it stayed paused too long."""


class _Refused(Exception):
    """The handshake ends here; the client has been told why (or the socket just closes)."""


class ClientSession:
    def __init__(self, proxy: SessionHost, sock: socket.socket, address: tuple[Any, ...]) -> None:
        self.proxy = proxy
        self.pool = proxy.pool
        self.config = proxy.config
        self.sock = sock
        self.peer_host = str(address[0]) if address else ""
        self.address = f"{address[0]}:{address[1]}" if len(address) >= 2 else str(address)
        self.proxied_by: str | None = None  # the balancer's address when a PROXY header named the client
        self.client_host = self.peer_host  # the client's own address (a trusted PROXY header's source)
        self._limit_held: list[tuple[str, str]] = []  # connection-limit slots this client holds
        self._limit_refusal: Refusal | None = None  # a limit refused this client: told at Connection.Open
        self._byte_bucket: TokenBucket | None = None  # --client-byte-rate
        self._byte_rate_noted = False
        self.tls: PeerInfo | None = None  # set by the TLS listener: version, cipher, certificate subject
        self.auth_user = ""  # the --auth-file user; self.credentials are then the broker's, mapped
        self.id = f"{_id_prefix}-{next(_ids):x}"
        self.channels: dict[int, Link] = {}
        self.topology = Topology()  # what this client declared, for recovery (control path only)
        self.capabilities: frozenset[str] = frozenset()
        self.credentials: Credentials | None = None
        self.vhost: str | None = None
        self.pool_key: tuple[str, str, str] = ("", "", "")
        self.channel_max = 0
        self.max_body = c.PRE_TUNE_FRAME_MAX - c.FRAME_OVERHEAD
        self.heartbeat = 0
        self.opened_at = time.monotonic()
        self.last_recv = self.opened_at
        self.preferred: dict[Role, Upstream] = {}  # role -> the upstream this client's channels use
        self.upstream_ids: set[int] = set()  # every upstream connection its channels used (audit)
        self.blocked_by: set[BlockingUpstream] = set()
        self.closing = False
        self.close_reason = ""
        self.close_kind = "client"  # one of metrics.CLOSE_REASONS
        self.close_code = 0  # the reply code of the Connection.Close we sent, if any
        self.connected_at = time.time()
        self.bytes_in = self.bytes_out = 0
        self.messages_in = 0  # publishes from the client
        self._delivered_before = 0  # deliveries on channels it no longer has (messages_out)
        self.outbox = Outbox(
            sock, self._on_write_error, high_watermark=self.config.client_buffer, latency=FORWARD_LATENCY_U2C
        )
        self._reader = FrameReader(c.PRE_TUNE_FRAME_MAX)
        self._batches: defaultdict[ChannelSink, bytearray] = defaultdict(bytearray)  # this read's frames, per upstream
        self._received_at = 0.0  # when the read that brought this batch's frames returned
        self._torn_down = False
        self._handshake_deadline = 0.0
        self.throttled = False  # waiting for an upstream to drain: our reads are paused on purpose
        self.over_buffer_since: float | None = None  # when the outbox went above --client-buffer

    def __repr__(self) -> str:
        return f"ClientSession({self.id} {self.address})"

    @property
    def username(self) -> str:
        return self.credentials.username if self.credentials is not None else ""

    @property
    def messages_out(self) -> int:
        """Deliveries to the client: each channel counts its own (`Link.delivered`)."""
        return self._delivered_before + sum(link.delivered for link in self.channels.values())

    def _log_extra(self, event: str, **fields: Any) -> dict[str, Any]:
        extra = {"event": event, "client_id": self.id, "remote": self.address}
        if self.credentials is not None:
            extra["user"] = self.credentials.username
        if self.auth_user:
            extra["auth_user"] = self.auth_user
        if self.vhost is not None:
            extra["vhost"] = self.vhost
        extra.update(fields)
        return extra

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        try:
            try:
                # The client's own steps have --handshake-timeout (see _handshake_recv); waiting for
                # an upstream, which the client cannot help, has --connect-timeout. This outer
                # bound is only a safety net over both.
                cfg = self.config
                bound = cfg.handshake_timeout + 2 * cfg.connect_timeout + cfg.pause_timeout + _CLOSE_OK_WAIT
                with gevent.Timeout(bound, _Refused("handshake timeout")):
                    self._handshake()
            except _Refused as exc:
                self.close_reason = str(exc)
                if str(exc) == "handshake timeout":
                    self.proxy.metrics.client_refused("handshake_timeout")
                return
            log.info("client connected", extra=self._log_extra("client_open"))
            self._forward_loop()
        except ProtocolError as exc:
            self._protocol_failure(exc)
        except (OSError, gevent.Timeout) as exc:
            if not self.close_reason:
                self.close_reason = f"socket error: {exc}"
                self.close_kind = "socket_error"
        except Exception:
            # A bug of ours: the client gets a clean 541, never a traceback, and others carry on.
            log.exception("internal error in client session", extra=self._log_extra("client_internal_error"))
            self.close_kind = "internal_error"
            self._protocol_failure(ProtocolError(c.INTERNAL_ERROR, "internal error in amqproxy"))
        finally:
            self._teardown()
            # Flush what is queued (a final Close-Ok), then let StreamServer close the socket.
            self.outbox.close_when_drained()
            self.outbox.join(_CLOSE_OK_WAIT)
            self.outbox.kill()

    def _protocol_failure(self, exc: ProtocolError) -> None:
        self._reader.unshare()
        metrics = self.proxy.metrics
        if self.close_kind == "client":
            self.close_kind = "protocol_error"
        if self.vhost is None:
            metrics.client_refused("protocol_error")
        if exc.reply_code != c.CONNECTION_FORCED:  # 320 here is an upstream problem, counted there
            metrics.frame_failed(CLIENT_TO_UPSTREAM, REPLY_NAMES.get(exc.reply_code, "error").lower())
            metrics.error("client_protocol", "permanent", self.vhost)
        log.warning(
            "client protocol error",
            extra=self._log_extra("client_protocol_error", reply_code=exc.reply_code, reply_text=exc.text),
        )
        self.close_connection(exc.reply_code, exc.text, exc.method)
        self._await_close_ok()

    def _await_close_ok(self) -> None:
        """After our Connection.Close, drop everything until Close-Ok (spec 1.4.2.5) or the grace ends."""
        reader = self._reader
        try:
            with gevent.Timeout(_CLOSE_OK_WAIT, False):
                while True:
                    while (frame := reader.next_frame()) is not None:
                        frame_type, channel, start, end = frame
                        if channel == 0 and frame_type == c.FRAME_METHOD:
                            method = _METHOD_ID.unpack_from(reader.buffer, start)
                            if method == c.CONNECTION_CLOSE:
                                self.outbox.put(method_frame(0, encode_method(c.CONNECTION_CLOSE_OK)))
                                return
                            if method == c.CONNECTION_CLOSE_OK:
                                return
                    reader.compact()
                    data = self.sock.recv(_RECV_SIZE)
                    if not data:
                        return
                    reader.feed(data)
        except (OSError, ProtocolError):
            return

    def close_connection(
        self, reply_code: int, text: str, method: tuple[int, int] = (0, 0), kind: str | None = None
    ) -> None:
        """Send Connection.Close and release every upstream channel now. Never blocks; idempotent.
        `kind` is the metric close reason (admin, shutdown...)."""
        if self.closing:
            return
        if kind is not None:
            self.close_kind = kind
        text = reply_text(text)
        self.closing = True
        self.close_reason = text
        self.close_code = reply_code
        self._release_channels()
        self.outbox.put(
            method_frame(
                0,
                encode_method(
                    c.CONNECTION_CLOSE, reply_code=reply_code, reply_text=text, class_id=method[0], method_id=method[1]
                ),
            )
        )
        # Bound the wait for the client's Close-Ok even when this was called from another
        # greenlet (an upstream reader) while the session's read loop sits in recv().
        gevent.spawn_later(_CLOSE_OK_WAIT + 0.5, self._shutdown_socket)

    def _shutdown_socket(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def abort(self, reason: str, kind: str | None = None) -> None:
        """Drop the connection without a Close (the client cannot take more bytes, or is dead)."""
        if not self.close_reason:
            self.close_reason = reason
        if kind is not None:
            self.close_kind = kind
            self.proxy.metrics.error(kind, "transient", self.vhost)
        log.warning("client aborted", extra=self._log_extra("client_abort", reason=reason))
        self.closing = True
        self.outbox.kill()
        self._shutdown_socket()

    def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        self.closing = True
        self.proxy.limits.release(self._limit_held)
        self._limit_held = []
        self._release_channels()
        for blocker in self.blocked_by:
            blocker.forget_blocked(self)
        self.blocked_by.clear()
        for upstream, names in self.pool.exclusive.release_client(self).items():
            if upstream.alive:
                upstream.delete_queues(names)
        self.proxy.forget(self)
        if self.vhost is not None:
            self.proxy.metrics.client_closed(self.vhost, self.username, self.close_kind)
            self._audit()
        if self.credentials is not None:
            log.info(
                "client disconnected",
                extra=self._log_extra(
                    "client_close",
                    reason=self.close_reason or "client closed",
                    duration_s=round(time.monotonic() - self.opened_at, 3),
                ),
            )

    def _audit(self) -> None:
        """One audit line per client connection: who, from where, how long, how much, how it ended."""
        audit_log.info(
            "client connection",
            extra={
                "event": "audit",
                "client_id": self.id,
                "user": self.username,
                "vhost": self.vhost,
                "remote": self.address,
                "proxied_by": self.proxied_by,
                "tls_subject": (self.tls.subject_dn or None) if self.tls is not None else None,
                "opened_at": datetime.fromtimestamp(self.connected_at, timezone.utc).isoformat(),
                "duration_s": round(time.monotonic() - self.opened_at, 3),
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "messages_in": self.messages_in,
                "messages_out": self.messages_out,
                "upstreams": sorted(self.upstream_ids),
                "end": self.close_kind,
                "reply_code": self.close_code,
                "reason": self.close_reason or "client closed",
            },
        )

    def _release_channels(self) -> None:
        """Close the upstream side of every channel exactly once; the client side ends with us."""
        # Frames already accepted this read (a pipelined channel.open, say) go out before the closes.
        for destination, out in self._batches.items():
            destination.send(out)
        self._batches.clear()
        links = list(self.channels.values())
        self.channels.clear()
        for link in links:
            self._delivered_before += link.delivered
            self.proxy.metrics.channel_closed(self.vhost, self.username)
        for link in links:
            link.client = None
            upstream = link.upstream
            if upstream is not None and not upstream.alive:  # a dead connection, or a recovery's gap
                upstream.release(link)
                link.close_event(CloseEvent.UPSTREAM_GONE)
            link.close_event(CloseEvent.CLIENT_GONE, 200, "client connection closed")

    def forget(self, link: Link) -> None:
        if self.channels.get(link.client_channel) is link:
            del self.channels[link.client_channel]
            self._delivered_before += link.delivered
            self.proxy.metrics.channel_closed(self.vhost, self.username)

    # ------------------------------------------------------------------ handshake

    def _read_handshake_method(self, expected: tuple[int, int]) -> dict[str, Any]:
        reader = self._reader
        while True:
            frame = reader.next_frame()
            if frame is None:
                data = self._handshake_recv(65536)
                if not data:
                    raise _Refused("client closed during the handshake")
                self.last_recv = time.monotonic()
                reader.feed(data)
                continue
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
                self.outbox.put(method_frame(0, encode_method(c.CONNECTION_CLOSE_OK)))
                raise _Refused("client closed during the handshake")
            if method != expected:
                raise ProtocolError(
                    c.COMMAND_INVALID, f"expected {method_name(expected)}, got {method_name(method)}", method
                )
            return args

    def _handshake_recv(self, size: int) -> bytes:
        """recv() within what is left of the client's --handshake-timeout."""
        remaining = self._handshake_deadline - time.monotonic()
        if remaining <= 0:
            raise _Refused("handshake timeout")
        with gevent.Timeout(remaining, _Refused("handshake timeout")):
            return self.sock.recv(size)

    def _upstream_wait(self, call: Any, *args: Any) -> None:
        """Run a pool call; the time it takes does not count against the client's handshake budget."""
        started = time.monotonic()
        try:
            call(*args, started + self.config.connect_timeout)
        finally:
            self._handshake_deadline += time.monotonic() - started

    def _paused_wait(self, vhost: str) -> bool:
        """Hold the client while its vhost is paused; the wait is not the client's handshake time."""
        started = time.monotonic()
        try:
            return self.proxy.wait_if_paused(vhost)
        finally:
            self._handshake_deadline += time.monotonic() - started

    def _read_proxy_header(self) -> bytes:
        """A PROXY protocol header from a trusted balancer: the client's real address. Returns
        the bytes read past it (the start of the AMQP protocol header)."""
        data = b""
        while True:
            chunk = self._handshake_recv(256)
            if not chunk:
                raise _Refused("client closed before the PROXY protocol header")
            data += chunk
            try:
                result = proxyproto.parse(data)
            except proxyproto.ProxyHeaderError as exc:
                self.proxy.metrics.client_refused("protocol_header")
                raise _Refused(f"bad PROXY protocol header: {exc}") from None
            if result is not None:
                break
            if len(data) > 536:  # v2's largest header plus a margin
                raise _Refused("PROXY protocol header too long")
        consumed, source = result
        if source is not None:
            self.proxied_by = self.address
            host, port = source
            self.client_host = host
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return data[consumed:]

    def _handshake(self) -> None:
        self._handshake_deadline = time.monotonic() + self.config.handshake_timeout
        header = b""
        # On the TLS listener a PROXY header precedes the TLS handshake and was read there.
        if (
            self.tls is None
            and self.config.accept_proxy_protocol
            and proxyproto.trusted(self.peer_host, self.config.proxy_protocol_from)
        ):
            header = self._read_proxy_header()
            header, rest = header[:8], header[8:]
            if rest:
                self._reader.feed(rest)
        self._admit_address()
        while len(header) < 8:
            data = self._handshake_recv(8 - len(header))
            if not data:
                raise _Refused("client closed before the protocol header")
            header += data
            if not c.PROTOCOL_HEADER.startswith(header[:4]):
                break
        if header != c.PROTOCOL_HEADER and header != c.LEGACY_0_9_1_HEADER:
            # Spec 4.2.2: answer an unsupported header with ours, then close.
            self.outbox.put(c.PROTOCOL_HEADER)
            self.proxy.metrics.client_refused("protocol_header")
            raise _Refused("unsupported protocol header")
        external = self._external_offered()
        self.outbox.put(method_frame(0, start_payload(mechanisms=MECHANISMS_WITH_EXTERNAL if external else MECHANISMS)))
        start_ok = self._read_handshake_method(c.CONNECTION_START_OK)
        self.capabilities = client_capabilities(start_ok["client_properties"])
        try:
            credentials = parse_credentials(start_ok["mechanism"], start_ok["response"], external)
        except AuthError as exc:
            self._refuse(exc.reply_code, exc.text, c.CONNECTION_START_OK, "auth")
        if self.config.auth is not None:
            credentials = self._proxy_login(credentials)
        self.credentials = credentials
        self._admit_user(self.auth_user or credentials.username)
        try:
            if self._limit_refusal is None:  # a refused client causes no upstream work
                self._upstream_wait(self.pool.authenticate, credentials)
        except UpstreamError as exc:
            self._refuse_upstream(exc, c.CONNECTION_START_OK)
        channel_max = negotiate(self.config.channel_max, self.pool.channel_max)
        frame_max = negotiate(self.config.frame_max, self.pool.frame_max)
        self.outbox.put(method_frame(0, tune_payload(channel_max, frame_max, self.config.client_heartbeat)))
        tune_ok = self._read_handshake_method(c.CONNECTION_TUNE_OK)
        if tune_ok["frame_max"] and tune_ok["frame_max"] < c.FRAME_MIN_SIZE:
            raise ProtocolError(
                c.NOT_ALLOWED, f"frame_max={tune_ok['frame_max']} < {c.FRAME_MIN_SIZE} min size", c.CONNECTION_TUNE_OK
            )
        if tune_ok["frame_max"] > frame_max:
            raise ProtocolError(
                c.NOT_ALLOWED, f"frame_max={tune_ok['frame_max']} > {frame_max} max size", c.CONNECTION_TUNE_OK
            )
        if tune_ok["channel_max"] > channel_max:
            raise ProtocolError(
                c.NOT_ALLOWED,
                f"channel_max={tune_ok['channel_max']} > {channel_max} max channels",
                c.CONNECTION_TUNE_OK,
            )
        self.channel_max = tune_ok["channel_max"] or channel_max
        client_frame_max = tune_ok["frame_max"] or frame_max
        self.max_body = client_frame_max - c.FRAME_OVERHEAD
        self._reader.max_frame_size = client_frame_max
        self.heartbeat = tune_ok["heartbeat"]
        open_args = self._read_handshake_method(c.CONNECTION_OPEN)
        vhost = open_args["virtual_host"]
        self._admit_vhost(vhost)
        if not self._paused_wait(vhost):
            self._refuse(
                c.CONNECTION_FORCED,
                f"CONNECTION_FORCED - vhost '{vhost}' is paused for maintenance",
                c.CONNECTION_OPEN,
                "paused",
            )
        try:
            self._upstream_wait(self.pool.open_vhost, credentials, vhost)
        except UpstreamError as exc:
            self._refuse_upstream(exc, c.CONNECTION_OPEN)
        self.vhost = vhost
        self.pool_key = (credentials.username, credentials.password, vhost)
        self.outbox.put(method_frame(0, encode_method(c.CONNECTION_OPEN_OK)))
        self.proxy.metrics.client_opened(vhost, credentials.username, time.monotonic() - self.opened_at)
        self._byte_bucket = self.proxy.limits.byte_rate_bucket(time.monotonic())

    def _external_offered(self) -> bool:
        """EXTERNAL: a verified client certificate, and an --auth-file that maps subjects to users."""
        auth = self.config.auth
        return bool(self.tls is not None and self.tls.subject_dn and auth is not None and auth.subjects)

    def _proxy_login(self, credentials: Credentials) -> Credentials:
        """--auth-file: check the client against the proxy's credentials and return the broker
        credentials its user maps to; refuse with RabbitMQ's 403 otherwise."""
        auth = self.config.auth
        assert auth is not None
        if credentials.mechanism == "EXTERNAL":
            assert self.tls is not None
            user = auth.user_for_subject(self.tls.subject_dn, self.tls.subject_cn)
            self.auth_user = user.name if user is not None else self.tls.subject_dn
        else:
            self.auth_user = credentials.username
            user = auth.verify(credentials.username, credentials.password)
        if user is None:
            self._refuse(
                c.ACCESS_REFUSED,
                f"ACCESS_REFUSED - Login was refused using authentication mechanism {credentials.mechanism}. "
                "For details see the broker logfile.",
                c.CONNECTION_START_OK,
                "auth",
            )
        assert user is not None  # _refuse raised
        return Credentials(user.upstream_user, user.upstream_password, "PLAIN")

    def _refuse_upstream(self, exc: UpstreamError, method: tuple[int, int]) -> None:
        if exc.reply_code:
            # The broker's own verdict (403 ACCESS_REFUSED, 530 NOT_ALLOWED "vhost ... not found").
            reason = {403: "auth", 506: "limit"}.get(exc.reply_code, "vhost")
            self.proxy.metrics.error(reason, "permanent", self.vhost)
            self._refuse(exc.reply_code, exc.text, method, reason)
        breaker = "circuit breaker" in exc.text
        self.proxy.metrics.error("upstream_unavailable", "transient", self.vhost)
        self._refuse(
            c.CONNECTION_FORCED,
            f"CONNECTION_FORCED - upstream unavailable: {exc.text}",
            method,
            "breaker_open" if breaker else "upstream_unavailable",
        )

    def _refuse(self, reply_code: int, text: str, method: tuple[int, int], reason: str, **fields: Any) -> None:
        """Refuse the handshake (reasons: auth, vhost, limit, access, upstream_unavailable, breaker_open)."""
        text = reply_text(text)
        self.proxy.metrics.client_refused(reason)
        log.warning(
            "client refused",
            extra=self._log_extra("client_refused", reason=reason, reply_code=reply_code, reply_text=text, **fields),
        )
        if reply_code == c.ACCESS_REFUSED and method == c.CONNECTION_START_OK:
            if "authentication_failure_close" not in self.capabilities:
                # Spec behaviour for clients that did not ask for a Close: just drop the socket.
                raise _Refused(text)
        self.closing = True
        self.outbox.put(
            method_frame(
                0,
                encode_method(
                    c.CONNECTION_CLOSE, reply_code=reply_code, reply_text=text, class_id=method[0], method_id=method[1]
                ),
            )
        )
        self._await_close_ok()
        raise _Refused(text)

    # ------------------------------------------------------------------ limits and access (#5)

    def _admit_address(self) -> None:
        """--allow-cidr/--deny-cidr, then the global and per-address limits: right after accept
        (and the PROXY header), before any AMQP byte is sent. A denied address gets a TCP close."""
        denied = self.proxy.address_filter.check(self.client_host)
        if denied is not None:
            self.proxy.metrics.access_denied(denied)
            self.proxy.metrics.client_refused("access")
            log.warning("client address refused", extra=self._log_extra("access_denied", reason=denied))
            raise _Refused(f"address {denied} by --allow-cidr/--deny-cidr")
        self._apply_limits(self.proxy.limits.admit_address(self.client_host))

    def _admit_user(self, user: str) -> None:
        """At StartOk, before any upstream work: --authz-policy for the user, the per-user limits.
        `user` is the name the client logged in with (its --auth-file name, not the broker user)."""
        policy = self.proxy.config.authz_policy
        if policy is not None and not policy.user_allowed(user):
            self._deny(USER_REFUSED_CODE, user_refused_text(user), c.CONNECTION_START_OK, "authz_user")
        if self._limit_refusal is None:
            self._apply_limits(self.proxy.limits.admit_user(user))

    def _admit_vhost(self, vhost: str) -> None:
        """At Connection.Open, before any upstream work: --authz-policy for the vhost, the per-vhost
        limit, and any limit that refused this client earlier (RabbitMQ refuses its connection
        limits here too, with 530). The user is the client's own login (its --auth-file name)."""
        user = self.auth_user or self.username
        policy = self.proxy.config.authz_policy
        if policy is not None and not policy.vhost_allowed(user, vhost):
            self._deny(VHOST_REFUSED_CODE, vhost_refused_text(user, vhost), c.CONNECTION_OPEN, "authz_vhost")
        if self._limit_refusal is None:
            self._apply_limits(self.proxy.limits.admit_vhost(vhost, user))
        refusal = self._limit_refusal
        if refusal is not None:
            self.proxy.metrics.limit_hit(refusal.limit, True)
            self._refusal_delay()
            self._refuse(refusal.reply_code, refusal.text, c.CONNECTION_OPEN, "limit", limit=refusal.limit)

    def _apply_limits(self, decision: Decision) -> None:
        self._limit_held += decision.held
        for alarm in decision.alarms:
            self.proxy.metrics.limit_hit(alarm.limit, False)
            log.warning(
                "limit reached (alarm only: admitted)",
                extra=self._log_extra(
                    "limit_alarm", limit=alarm.limit, reply_code=alarm.reply_code, reply_text=alarm.text
                ),
            )
        if decision.refusal is not None and self._limit_refusal is None:
            self._limit_refusal = decision.refusal

    def _deny(self, reply_code: int, text: str, method: tuple[int, int], reason: str) -> None:
        """Refused by --authz-policy (after --limit-refusal-delay)."""
        self.proxy.metrics.access_denied(reason)
        self._refusal_delay()
        self._refuse(reply_code, text, method, "access", access=reason)

    def _refusal_delay(self) -> None:
        """Hold a refused client a moment so that its retry loop does not spin; only this
        greenlet waits. Not counted against the client's handshake time."""
        delay = self.proxy.limits.refusal_delay
        if delay > 0:
            gevent.sleep(delay)
            self._handshake_deadline += delay

    def _pace(self, nbytes: int) -> None:
        """--client-byte-rate: a client reading faster than the rate is not read for a while."""
        bucket = self._byte_bucket
        assert bucket is not None
        delay = bucket.debit(time.monotonic(), nbytes)
        if delay <= 0:
            return
        limits = self.proxy.limits
        enforced = CLIENT_BYTE_RATE not in limits.alarm_only
        if not self._byte_rate_noted:  # counted and logged once per connection
            self._byte_rate_noted = True
            self.proxy.metrics.limit_hit(CLIENT_BYTE_RATE, enforced)
            log.warning(
                "client byte rate limit reached" + ("" if enforced else " (alarm only: not slowed)"),
                extra=self._log_extra(
                    "limit_throttle" if enforced else "limit_alarm",
                    limit=CLIENT_BYTE_RATE,
                    rate=limits.client_byte_rate,
                ),
            )
        if not enforced:
            bucket.tokens = 0.0
            return
        self.throttled = True  # not reading the client is our doing, not a missed heartbeat
        try:
            gevent.sleep(delay)
        finally:
            self.throttled = False
            self.last_recv = self._received_at = time.monotonic()  # the wait is not forwarding latency

    # ------------------------------------------------------------------ forwarding (hot path)

    def _forward_loop(self) -> None:
        sock = self.sock
        reader = self._reader
        channels = self.channels
        batches = self._batches
        pack_header = FRAME_HEADER_STRUCT.pack
        frame_header = FRAME_HEADER_STRUCT.unpack_from
        unpack_method = _METHOD_ID.unpack_from
        valid_types = VALID_FRAME_TYPES
        frame_counts = FRAMES[CLIENT_TO_UPSTREAM]
        byte_counts = BYTES[CLIENT_TO_UPSTREAM]
        run = Run()
        # Frames that came in the same read as Connection.Open are scanned before the first recv.
        handshake_leftover = reader.pending() > 0
        while True:
            if self.closing:
                self._await_close_ok()
                return
            if handshake_leftover:
                handshake_leftover = False
                self._received_at = time.monotonic()
            else:
                data = sock.recv(_RECV_SIZE)
                if not data:
                    self.close_reason = self.close_reason or "client closed the socket"
                    return
                self.last_recv = self._received_at = time.monotonic()
                self.bytes_in += len(data)
                if self._byte_bucket is not None:
                    self._pace(len(data))  # --client-byte-rate: wait before this read goes on
                reader.feed(data)
            buf = reader.buffer
            available = len(buf)
            pos = reader.pos
            max_frame = reader.max_frame_size
            with memoryview(buf) as view:
                # Frames are scanned inline (see FrameReader); reader.pos follows each frame so
                # that an error path can read on from the right place.
                while available - pos >= 7 and not self.closing:
                    frame_type, channel, size = frame_header(buf, pos)
                    end = pos + 7 + size
                    if frame_type not in valid_types or size + 8 > max_frame:
                        reader.next_frame()  # raises the precise framing error
                    if end >= available:
                        break
                    if buf[end] != FRAME_END:
                        reader.next_frame()
                    if frame_type == FRAME_METHOD and (link := channels.get(channel)) is not None:
                        # Fast path: whole publishes on a placed channel in its plain state are
                        # checked and copied a run at a time (see protocol/content.py).
                        upstream = link.upstream
                        if (
                            upstream is not None
                            and link.role is not Role.CONSUME  # its first publish may move it (_movable)
                            and link.expect == EXPECT_METHOD
                            and not link.closing
                            and not link.commit_pending
                            and message_run(buf, pos, available, channel, PUBLISH, max_frame, upstream.max_body, run)
                        ):
                            run.count(pos, frame_counts, byte_counts)
                            messages = run.messages
                            self.messages_in += messages
                            if link.confirm:
                                link.published += messages  # the client's publish sequence number
                            append_frames(batches[upstream], view[pos : run.end], link.upstream_channel)
                            pos = reader.pos = run.end
                            continue
                    frame_start = pos
                    start = pos + 7
                    pos = reader.pos = end + 1
                    frame_counts[frame_type] += 1
                    byte_counts[frame_type] += size + 8
                    if channel == 0:
                        # Connection-level events act on upstream channels directly: everything
                        # read before them must be on its way first.
                        self._flush()
                        if self._on_connection_frame(frame_type, view[start:end]):
                            return
                        continue
                    link = channels.get(channel)
                    if frame_type == c.FRAME_METHOD:
                        if size < 4:
                            raise ProtocolError(c.FRAME_ERROR, _short_method_text(view[start:end]))
                        method = unpack_method(buf, start)
                        if link is None:
                            if method != c.CHANNEL_OPEN:
                                raise ProtocolError(c.CHANNEL_ERROR, "expected 'channel.open'", method)
                            self._open_channel(channel)
                            continue
                        if link.closing:
                            self._flush()
                            self._on_closing_channel_method(link, method)
                            continue
                        if link.upstream is None and not self._place(link, method):
                            continue
                        if method == c.BASIC_PUBLISH and link.role is Role.CONSUME and self._movable(link):
                            if not self._move_to_publishers(link):
                                continue
                        if method == c.BASIC_PUBLISH:
                            # Hold the message until its last frame: a partly forwarded message
                            # followed by anything else on the channel would be a 505 for the
                            # whole shared connection (e.g. the client leaving mid-message).
                            link.on_publish(buf, start, end)
                            self.messages_in += 1
                            if link.confirm:
                                link.published += 1  # the client's publish sequence number
                            if link.upstream_channel == channel:
                                link.content += view[frame_start:pos]
                            else:
                                link.content += pack_header(c.FRAME_METHOD, link.upstream_channel, size)
                                link.content += view[start:pos]
                            continue
                        elif method in _ACKS:
                            link.on_method(method)
                            check_ack_layout(method, end - start)
                            if link.tag_offset:  # only on a channel that went through a recovery
                                renumbered = self._renumber_ack(link, method, buf, start)
                                if renumbered is not None:
                                    batches[link.upstream] += method_frame(link.upstream_channel, renumbered)  # type: ignore[index]
                                continue
                        elif not self._on_control_method(link, method, view[start:end]):
                            continue
                    elif link is None:
                        # RabbitMQ answers any non-method frame here, heartbeats included, with 505.
                        raise ProtocolError(c.UNEXPECTED_FRAME, "expected method frame, got non method frame instead")
                    elif link.closing:
                        continue
                    else:
                        content = link.content
                        if frame_type == c.FRAME_HEADER:
                            link.on_header(buf, start, end)
                            if link.upstream_channel == channel:
                                content += view[frame_start:pos]
                            else:
                                content += pack_header(c.FRAME_HEADER, link.upstream_channel, size)
                                content += view[start:pos]
                        elif frame_type == c.FRAME_BODY:
                            link.on_body(size)  # the guard proves the channel was placed
                            max_body = link.upstream.max_body  # type: ignore[union-attr]
                            if size > max_body:
                                append_split_body(content, link.upstream_channel, view[start:end], max_body)
                            elif link.upstream_channel == channel:
                                content += view[frame_start:pos]
                            else:
                                content += pack_header(c.FRAME_BODY, link.upstream_channel, size)
                                content += view[start:pos]
                        else:  # a heartbeat on a channel: 505 naming what was expected, as RabbitMQ
                            link.unexpected_frame()
                        if link.expect == EXPECT_METHOD:  # the message is complete
                            upstream = link.upstream
                            assert upstream is not None
                            batches[upstream] += content
                            content.clear()
                        continue
                    upstream = link.upstream
                    assert upstream is not None  # placed by _place() above
                    out = batches[upstream]
                    if link.upstream_channel == channel:
                        out += view[frame_start:pos]
                    else:
                        out += pack_header(frame_type, link.upstream_channel, size)
                        out += view[start:pos]
            reader.compact()
            self._flush()

    def _flush(self) -> None:
        """Hand this read's frames to their upstreams, in order; wait if an upstream is backed up."""
        batches = self._batches
        if not batches:
            return
        received_at = self._received_at
        for upstream, out in batches.items():
            upstream.send(out, received_at)
        backed_up = [sink for sink in batches if sink.backed_up()]
        batches.clear()
        for sink in backed_up:
            # Backpressure: a publisher faster than its upstream waits here, its socket unread,
            # as RabbitMQ itself stops reading a connection under flow control.
            self.throttled = True
            try:
                while not sink.wait_for_room(1.0) and not self.closing:
                    pass
            finally:
                self.throttled = False
                self.last_recv = time.monotonic()

    def _on_connection_frame(self, frame_type: int, payload: memoryview) -> bool:
        """Channel 0 after the handshake. Returns True when the session should end."""
        if frame_type == c.FRAME_HEARTBEAT:
            return False
        if frame_type != c.FRAME_METHOD:
            raise ProtocolError(c.UNEXPECTED_FRAME, "expected method frame, got non method frame instead")
        try:
            method, args = decode_method(payload)
        except DecodeError as exc:
            raise ProtocolError(c.FRAME_ERROR, f"cannot decode connection method: {exc}") from exc
        if method == c.CONNECTION_CLOSE:
            self.close_reason = f"client closed ({args['reply_code']} {args['reply_text']})"
            self.close_kind = "client"
            self.closing = True
            self._release_channels()
            self.outbox.put(method_frame(0, encode_method(c.CONNECTION_CLOSE_OK)))
            return True
        if method == c.CONNECTION_CLOSE_OK:
            return self.closing
        if method == c.CONNECTION_UPDATE_SECRET:
            # Token-refreshing clients: acknowledge so they keep working. Pooled upstreams stay
            # keyed by the secret they logged in with.
            self.outbox.put(method_frame(0, encode_method(c.CONNECTION_UPDATE_SECRET_OK)))
            log.info("client updated its secret", extra=self._log_extra("client_update_secret"))
            return False
        raise ProtocolError(c.CHANNEL_ERROR, "unexpected method in connection state running", method)

    def _open_channel(self, channel: int) -> None:
        """channel.open is answered by the proxy; the upstream channel is opened at the first method,
        when the channel's role (publishing or consuming) decides where it goes."""
        if channel > self.channel_max:
            raise ProtocolError(c.CHANNEL_ERROR, f"channel id {channel} out of range (channel_max {self.channel_max})")
        link = Link(self, channel, None, 0)
        self.channels[channel] = link
        self.proxy.metrics.channel_opened(self.vhost, self.username)
        self.outbox.put(method_frame(channel, _CHANNEL_OPEN_OK))

    def _place(self, link: Link, method: tuple[int, int]) -> bool:
        """First method on a channel: open its upstream channel; returns whether to forward `method`."""
        if method == c.CHANNEL_CLOSE or method == c.CHANNEL_CLOSE_OK:
            # Nothing upstream to close: a Close is answered here.
            self._on_closing_channel_method(link, method)
            return False
        if method == c.CHANNEL_OPEN:
            raise ProtocolError(c.CHANNEL_ERROR, "second 'channel.open' seen", method)
        self._flush()  # placement may have to dial: what was read before goes first
        self.throttled = True  # not reading the client meanwhile is our doing, not a missed heartbeat
        role = link.role = role_of(method) if self.config.separate_publishers else Role.ANY
        try:
            upstream, opened = self.pool.place(self, link, role)
        except UpstreamError as exc:
            if exc.reply_code:  # e.g. 506 with its own text
                raise ProtocolError(exc.reply_code, exc.text, method) from exc
            raise ProtocolError(c.CONNECTION_FORCED, f"upstream unavailable: {exc.text}", method) from exc
        finally:
            self.throttled = False
            self.last_recv = time.monotonic()
        self.preferred[role] = upstream
        if self.closing or link.client is None:
            # Closed by another greenlet while we waited: the channel is nobody's now.
            link.client = None
            if opened:
                link.close_upstream(200, "client connection closed")
            else:
                upstream.release(link)
            return False
        self.upstream_ids.add(upstream.id)
        if not opened:
            self._batches[upstream] += method_frame(link.upstream_channel, _CHANNEL_OPEN)
        upstream.tell_blocked(self)
        return True

    def _movable(self, link: Link) -> bool:
        """A channel placed with the consumers (its first method was, say, queue.declare) now
        publishes: may it move to a publishing connection? Only if nothing ties it to this one."""
        upstream = link.upstream
        return (
            self.config.separate_publishers
            and self.pool.exclusive.pinned(self) is None  # exclusive queues pin the client (Pool._choose)
            and upstream is not None
            and upstream.alive  # not a recovery's Gap
            and not link.record.pending  # an unanswered request would be overtaken
            and not link.record.unconfirmed  # so would a nowait one
            and not link.record.settings  # no qos or consumers to carry over
            and not link.confirm  # confirm and tx modes belong to the channel (and its numbering)
            and not link.record.tx
            and not link.consumer_tags
            and not link.delivered  # delivery tags are per channel
            and not link.tag_offset
            and not link.closing
        )

    def _move_to_publishers(self, link: Link) -> bool:
        """Give the channel a fresh upstream channel on a publishing connection: RabbitMQ's flow
        control and memory alarm block a connection that publishes, and the consumers placed on
        this one must not be blocked with it. The old upstream channel is closed by a stand-in
        link that no client hears from; everything the client sent before goes out first."""
        old = link.upstream
        assert isinstance(old, Upstream)
        self._flush()
        stand_in = Link(None, link.client_channel, old, link.upstream_channel)
        old.replace_link(link.upstream_channel, stand_in)
        stand_in.close_upstream(200, "channel moved to a publishing connection")
        if old in self.blocked_by and not any(
            other.upstream is old for other in self.channels.values() if other is not link
        ):
            old.forget_blocked(self)
            self.upstream_unblocked(old)
        link.unplace()
        self.proxy.metrics.channel_moved(self.vhost)
        log.debug(
            "channel moved to a publishing connection",
            extra=self._log_extra("channel_moved", channel=link.client_channel, upstream_id=old.id),
        )
        return self._place(link, c.BASIC_PUBLISH)  # False: the client left meanwhile

    def _on_control_method(self, link: Link, method: tuple[int, int], payload: memoryview) -> bool:
        """Check and interpret a control-plane method; returns whether to forward the frame."""
        if method == c.CHANNEL_OPEN:
            raise ProtocolError(c.CHANNEL_ERROR, "second 'channel.open' seen", method)
        link.on_method(method)
        if method not in CLIENT_CHANNEL_METHODS:
            raise ProtocolError(c.COMMAND_INVALID, f"unimplemented method {method_name(method)}", method)
        try:
            method, args = decode_method(payload)
        except DecodeError as exc:
            raise ProtocolError(c.FRAME_ERROR, f"cannot decode {method_name(method)}: {exc}", method) from exc
        link.check_control(method, args)
        if method == c.CHANNEL_CLOSE:
            link.close_event(CloseEvent.CLIENT_CLOSE)  # forwarded: the broker's Close-Ok answers it
            return True
        if method == c.CHANNEL_CLOSE_OK:
            return False  # nothing to acknowledge on an open channel
        if method in QUEUE_ACCESS_METHODS:
            queue = args["queue"]
            owner = self.pool.exclusive.owner(self.vhost or "", queue) if queue else None
            if owner is not None and owner is not self:
                self._proxy_close_channel(
                    link,
                    c.RESOURCE_LOCKED,
                    f"cannot obtain exclusive access to locked queue '{queue}' in vhost '{self.vhost}'. "
                    "It could be originally declared on another connection or the exclusive property "
                    "value does not match that of the original declaration.",
                    method,
                )
                return False
            if method == c.QUEUE_DECLARE:
                exclusive = args["exclusive"] and not args["passive"]
                reserved = None
                if exclusive and queue and owner is None and isinstance(link.upstream, Upstream):
                    # Reserve the name now: a second client declaring it before our declare-ok
                    # must get 405, as it would from the broker on its own connection.
                    self.pool.exclusive.add(self.vhost or "", queue, self, link.upstream)
                    reserved = queue
                if not args["nowait"]:
                    link.pending_declares.append((exclusive, reserved))
            elif method == c.QUEUE_DELETE:
                if args["nowait"]:
                    self.pool.exclusive.remove(self.vhost or "", queue)
                else:
                    link.pending_deletes.append(queue)
            elif method == c.BASIC_CONSUME and args["consumer_tag"]:
                link.consumer_tags.add(args["consumer_tag"])
        elif method == c.BASIC_CANCEL and args["nowait"]:
            link.consumer_tags.discard(args["consumer_tag"])  # no cancel-ok will come
        elif method == c.CONFIRM_SELECT and not link.confirm:
            link.confirm = True  # the broker numbers publishes from here
            link.confirms = ConfirmTracker()
        link.record.request(method, args, bytes(payload), self.topology)
        return True

    def _renumber_ack(self, link: Link, method: tuple[int, int], buf: bytearray, start: int) -> bytes | None:
        """A client ack/nack/reject on a recovered channel, in the broker's numbering; None when it
        names a delivery from before the recovery (dropped: the broker requeued it already)."""
        tag, bits = _ACK_ARGS.unpack_from(buf, start + 4)
        upstream_tag = ack_tag(tag, method != c.BASIC_REJECT and bool(bits & 1), link.tag_offset)
        if upstream_tag is None:
            self.proxy.metrics.stale_ack()
            return None
        return bytes(buf[start : start + 4]) + _ACK_ARGS.pack(upstream_tag, bits)

    def _on_closing_channel_method(self, link: Link, method: tuple[int, int]) -> None:
        """On a closing (or never placed) channel only Close and Close-Ok matter (spec 1.5.2.5);
        the rest is dropped. A duplicate Close never reaches the shared connection."""
        if link.client is None:
            return  # the session was torn down meanwhile (e.g. while flushing); nothing is ours
        if method == c.CHANNEL_CLOSE:
            to_client, _ = link.close_event(CloseEvent.CLIENT_CLOSE)
        elif method == c.CHANNEL_CLOSE_OK:
            to_client, _ = link.close_event(CloseEvent.CLIENT_CLOSE_OK)
        else:
            return
        if to_client:
            self.outbox.put(to_client)

    def _proxy_close_channel(self, link: Link, reply_code: int, detail: str, method: tuple[int, int]) -> None:
        """A channel error decided by the proxy: Close to the client, and the upstream channel closed."""
        error = ProtocolError(reply_code, detail, method)
        log.info(
            "channel closed by proxy",
            extra=self._log_extra(
                "channel_error", channel=link.client_channel, reply_code=reply_code, reply_text=error.text
            ),
        )
        to_client, _ = link.close_event(CloseEvent.CLIENT_ERROR, reply_code, error.text, method)
        self.outbox.put(to_client)
        if link.upstream is not None:
            self._flush()  # what the client sent before this method goes first
            link.close_upstream(200, "closed by amqproxy")

    # ------------------------------------------------------------------ called by upstream readers

    def deliver(self, data: bytes | bytearray, received_at: float) -> None:
        """Frames for this client, already remapped. Never blocks the calling upstream reader."""
        if self.closing:
            return  # after a Connection.Close only Close-Ok may follow (spec 1.4.2.5)
        outbox = self.outbox
        self.bytes_out += len(data)
        outbox.put(data, received_at)
        if outbox.buffered > self.config.client_buffer:
            if self.over_buffer_since is None:
                self.over_buffer_since = time.monotonic()
            if outbox.buffered > _HARD_BUFFER_FACTOR * self.config.client_buffer:
                self.abort(f"slow client: more than {outbox.buffered} bytes waiting to be written", "slow_client")

    def upstream_lost(self, upstream: ChannelSink, node: str, cause: str, links: list[Link]) -> None:
        """`upstream` died with these channels of ours on it: recover them or close with 320."""
        if self.closing:
            return
        if self.config.upstream_failure == "recover" and not self.pool.stopping and self.vhost is not None:
            self._begin_recovery(upstream, node, cause, links)
            return
        self.close_kind = "upstream_lost"
        self.close_connection(c.CONNECTION_FORCED, f"CONNECTION_FORCED - upstream connection lost: {cause}")

    # ------------------------------------------------------------------ recovery (--upstream-failure recover)

    def _begin_recovery(self, upstream: ChannelSink, node: str, cause: str, links: list[Link]) -> None:
        """At the loss, in the failing upstream's greenlet (never blocks): settle what cannot wait
        -- nack outstanding publishes, fail what cannot be recovered, cancel consumers of queues
        that died -- and put each remaining channel in a `Gap` that holds its client's frames;
        a greenlet then re-establishes them (`_recover`)."""
        if not links:
            return  # only exclusive queues of ours died there: using them now gets the broker's 404
        cut = [link.client_channel for link in links if link.body_due > 0 and not link.closing]
        if cut:
            # A delivery cut in the middle of its content frames: the client waits for body
            # frames that will never come, and any other frame on that channel is a connection
            # error for it. Only a Connection.Close ends that cleanly.
            self.proxy.metrics.recovery_channel_failed("content_cut")
            self.proxy.metrics.recovery("failed", 0.0, 0, 0, 0)
            self.close_kind = "upstream_lost"
            self.close_connection(
                c.CONNECTION_FORCED,
                f"CONNECTION_FORCED - upstream connection lost: a delivery on channel {cut[0]} was cut in the "
                f"middle of its content frames; {cause}",
            )
            return
        started = time.monotonic()
        outbox = self.outbox
        counts = {"nacked": 0, "cancelled": 0, "failed": 0, "recovered": 0}
        gaps: list[tuple[Link, Gap]] = []
        for link in sorted(links, key=lambda lk: lk.client_channel):
            if link.waiter is not None or link.client is not self:
                continue  # being placed by our own greenlet, which retries elsewhere
            channel = link.client_channel
            if link.closing:
                # A close handshake in progress: the lost side answers for the broker.
                to_client, _ = link.close_event(CloseEvent.UPSTREAM_GONE)
                if to_client:
                    outbox.put(to_client)
                continue
            tracker = link.confirms
            if tracker is not None:
                # A publish still arriving from the client (held until complete) never reached
                # the lost upstream: it goes to the new one, as the first of its numbering.
                sent = link.published - (1 if link.content else 0)
                nacks = tracker.lost(sent)
                for tag, multiple in nacks:
                    outbox.put(
                        method_frame(
                            channel, encode_method(c.BASIC_NACK, delivery_tag=tag, multiple=multiple, requeue=False)
                        )
                    )
                counts["nacked"] += tracker.nacked
                link.confirm_offset = sent
            link.tag_offset = link.delivered
            if link.record.tx:
                self._fail_channel(
                    link,
                    c.PRECONDITION_FAILED,
                    "PRECONDITION_FAILED - upstream connection lost while the channel was in transaction "
                    "mode (tx.select): its uncommitted work is lost; open a new channel",
                    "tx",
                )
                counts["failed"] += 1
                continue
            if not self._cancel_lost_consumers(link, counts):
                counts["failed"] += 1
                continue
            gap = Gap(self.config.recovery_buffer, upstream.max_body, [r.raw for r in link.record.pending])
            link.upstream = gap  # type: ignore[assignment]  # duck-types Upstream for the forwarding loop
            link.upstream_channel = channel
            gaps.append((link, gap))
        gevent.spawn(self._recover, node, cause, started, gaps, counts)

    def _cancel_lost_consumers(self, link: Link, counts: dict[str, int]) -> bool:
        """Consumers on queues that died with the upstream (exclusive, auto-delete, server-named)
        cannot be re-issued: basic.cancel to a client that takes it, else the channel is closed.
        Returns whether the channel lives on."""
        for consumer in link.record.consumers():
            reason = self.topology.unrecoverable(consumer.queue)
            if not reason:
                continue
            if "consumer_cancel_notify" not in self.capabilities:
                self._fail_channel(
                    link,
                    c.NOT_FOUND,
                    f"NOT_FOUND - upstream connection lost: consumer '{consumer.tag}' cannot be recovered, its "
                    f"{reason} queue '{consumer.queue}' is gone",
                    "consumer_lost",
                )
                return False
            link.record.cancelled(consumer.tag)
            link.consumer_tags.discard(consumer.tag)
            counts["cancelled"] += 1
            self.outbox.put(
                method_frame(link.client_channel, encode_method(c.BASIC_CANCEL, consumer_tag=consumer.tag, nowait=True))
            )
        return True

    def _fail_channel(self, link: Link, reply_code: int, text: str, reason: str) -> None:
        """A channel that cannot be recovered: Channel.Close to the client (nothing upstream)."""
        self.proxy.metrics.recovery_channel_failed(reason)
        log.warning(
            "channel not recovered",
            extra=self._log_extra(
                "recovery_channel_failed", channel=link.client_channel, reason=reason, reply_text=reply_text(text)
            ),
        )
        gap = link.upstream
        if isinstance(gap, Gap):
            gap.end()
        was_closing = link.closing
        to_client, _ = link.close_event(CloseEvent.UPSTREAM_GONE)  # the lost side answers for the broker
        if not was_closing:
            to_client, _ = link.close_event(CloseEvent.CLIENT_ERROR, reply_code, reply_text(text))
        if to_client:
            self.outbox.put(to_client)

    def _recover(
        self, node: str, cause: str, started: float, gaps: list[tuple[Link, Gap]], counts: dict[str, int]
    ) -> None:
        """Re-establish each channel on a healthy upstream (backoff and breakers as for any dial)
        within --recovery-timeout; the client's topology is re-declared first."""
        deadline = started + self.config.recovery_timeout
        topology = self.topology.replay()
        outcome = "recovered"
        try:
            for link, gap in gaps:
                result = self._recover_channel(link, gap, deadline, topology)
                if result == "recovered":
                    counts["recovered"] += 1
                    topology = []
                elif result == "client_gone":
                    if self.closing:
                        outcome = "client_gone"
                        break
                    gap.end()  # that channel alone is gone; the others go on
                elif result.startswith("timeout"):
                    outcome = "timeout"
                    self.close_kind = "upstream_lost"
                    self.close_connection(
                        c.CONNECTION_FORCED,
                        f"CONNECTION_FORCED - upstream connection lost: {cause}; not recovered within "
                        f"{self.config.recovery_timeout:g} s ({result[8:] or 'no upstream'})",
                    )
                    break
                else:
                    counts["failed"] += 1
                    self._fail_channel(
                        link,
                        c.PRECONDITION_FAILED,
                        f"PRECONDITION_FAILED - upstream connection lost; the channel could not be re-established: "
                        f"{result}",
                        "replay_error",
                    )
        finally:
            for _link, gap in gaps:
                gap.end()
        if outcome == "recovered" and counts["failed"]:
            outcome = "partial"
        duration = time.monotonic() - started
        self.proxy.metrics.recovery(outcome, duration, counts["recovered"], counts["cancelled"], counts["nacked"])
        log.log(
            logging.INFO if outcome == "recovered" else logging.WARNING,
            "upstream recovery",
            extra=self._log_extra(
                "recovery",
                node=node,
                cause=reply_text(cause),
                outcome=outcome,
                duration_s=round(duration, 3),
                channels=counts["recovered"] + counts["failed"],
                channels_recovered=counts["recovered"],
                channels_failed=counts["failed"],
                consumers_cancelled=counts["cancelled"],
                publishes_nacked=counts["nacked"],
            ),
        )

    def _recover_channel(self, link: Link, gap: Gap, deadline: float, topology: list[bytes]) -> str:
        """One channel: a stand-in link is placed and replays the setup the client should not see
        (topology, confirm.select) up to a basic.qos round trip; then the channel moves onto it at
        once (no yield), replays its qos and consumers in order, re-sends its unanswered requests
        and the frames held meanwhile. Returns "recovered", "client_gone", "timeout[: why]" or
        the broker's refusal."""
        delays = self.pool.backoff.delays()
        last_error = ""
        role = link.role or Role.CONSUME
        while True:
            if self.closing or link.client is None:
                return "client_gone"
            if link.closing and link.upstream is not gap:
                return "client_gone"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"timeout: {last_error}" if last_error else "timeout"
            stand_in = Link(None, link.client_channel, None, 0)
            try:
                upstream, opened = self.pool.place(self, stand_in, role, deadline)
            except UpstreamError as exc:
                last_error = exc.text
                if exc.permanent:
                    return f"timeout: {exc.text}"
                gevent.sleep(min(next(delays), max(0.0, deadline - time.monotonic())))
                continue
            self.preferred[role] = upstream
            channel = stand_in.upstream_channel
            replay = stand_in.replay = Replay(1)
            stand_in.waiter = waiter = AsyncResult()
            frames = bytearray()
            if not opened:
                frames += method_frame(channel, _CHANNEL_OPEN)
            for raw in topology:
                frames += method_frame(channel, raw)
            if link.record.confirm:
                frames += method_frame(channel, encode_method(c.CONFIRM_SELECT, nowait=True))
            frames += method_frame(channel, qos_default())  # the round trip that ends the replay
            upstream.send(frames)
            try:
                ok = bool(waiter.get(timeout=max(0.0, deadline - time.monotonic())))
            except gevent.Timeout:
                ok = False
            finally:
                stand_in.waiter = None
            if not ok:
                if replay.error:
                    return replay.error
                if upstream.alive:  # no answer in time
                    stand_in.close_upstream(200, "recovery timed out")
                continue  # the new upstream died too: place again
            if self.closing or link.client is None or link.upstream is not gap:
                stand_in.close_upstream(200, "client connection closed")
                return "client_gone"
            # The move: from here to the send nothing yields, so no client frame can overtake.
            stand_in.replay = None
            upstream.replace_link(channel, link)
            link.upstream = upstream  # the channel's close state carries over (a Close held in the gap)
            link.upstream_channel = channel
            if upstream.role is None:
                upstream.role = role if self.config.separate_publishers else Role.ANY
            self.preferred[upstream.role] = upstream
            self.upstream_ids.add(upstream.id)
            out = bytearray()
            if not link.closing:
                for kind, value in link.record.settings:
                    if kind == "qos":
                        out += method_frame(channel, value)
                        link.swallow_qos_ok += 1
                    else:
                        out += method_frame(channel, consume_nowait(value))
                for raw in gap.resend:
                    out += method_frame(channel, raw)
            out += renumber_frames(gap.held, channel, upstream.max_body)
            if link.content:
                link.content[:] = renumber_frames(link.content, channel, upstream.max_body)
            gap.held.clear()
            upstream.send(out)
            gap.end()
            upstream.tell_blocked(self)
            return "recovered"

    def upstream_blocked(self, upstream: BlockingUpstream, reason: str) -> bool:
        if "connection.blocked" not in self.capabilities or self.closing:
            return False
        if not self.blocked_by:
            self.outbox.put(method_frame(0, encode_method(c.CONNECTION_BLOCKED, reason=reason)))
        self.blocked_by.add(upstream)
        return True

    def upstream_unblocked(self, upstream: BlockingUpstream) -> None:
        if upstream not in self.blocked_by:
            return
        self.blocked_by.discard(upstream)
        if not self.blocked_by and not self.closing:
            self.outbox.put(method_frame(0, encode_method(c.CONNECTION_UNBLOCKED)))

    # ------------------------------------------------------------------ liveness

    def tick(self, now: float) -> None:
        """Called by the janitor about once a second: heartbeats on the client leg."""
        if self.over_buffer_since is not None:
            if self.outbox.buffered <= self.config.client_buffer:
                self.over_buffer_since = None
            elif now - self.over_buffer_since > self.proxy.config.slow_client_grace:
                self.abort(
                    f"slow client: more than {self.config.client_buffer} bytes waiting to be written "
                    f"for over {self.proxy.config.slow_client_grace:g} s",
                    "slow_client",
                )
                return
        heartbeat = self.heartbeat
        if not heartbeat or self.closing:
            return
        if now - self.last_recv > 2 * heartbeat and not self.throttled:
            self.abort(f"missed heartbeats from client ({2 * heartbeat} s without a frame)", "heartbeat_timeout")
            return
        if now - self.outbox.last_write >= heartbeat / 2:
            self.outbox.put(HEARTBEAT_FRAME)

    def _on_write_error(self, exc: BaseException) -> None:
        if not self.close_reason:
            self.close_reason = f"write failed: {exc}"
            self.close_kind = "socket_error"
        self.closing = True
        self._shutdown_socket()
