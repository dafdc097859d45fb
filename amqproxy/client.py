"""ClientSession: one downstream AMQP connection, from the protocol header to the last Close-Ok.

Greenlets: the StreamServer handler greenlet runs `run()`: the handshake, then the forwarding
loop that alone reads the client socket; one `Outbox` alone writes it. The session drives the
sans-IO core of channel 0 (`protocol.connection.ClientConnection`): it feeds it the bytes it
reads and carries out what the core asks (authenticate, admit and open the vhost, send these
bytes). The forwarding loop routes each client frame by channel id onto the linked upstream
channel (rewriting only the channel id), after the checks in `protocol.rules` that keep one
client's mistakes off shared connections; the channels themselves are client_channels.py's.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import gevent

from .admission import Admission
from .client_channels import ClientChannels
from .client_handshake import HandshakeDriver, HandshakeTimeout, Refused, SessionHost
from .limits import CLIENT_BYTE_RATE, TokenBucket
from .metrics import BYTES, CLIENT_TO_UPSTREAM, FORWARD_LATENCY_U2C, FRAMES
from .outbox import Outbox
from .protocol import constants as c
from .protocol.connection import (
    ClientClosed,
    ClientConnection,
    ConnectionState,
    SecretUpdated,
    Send,
)
from .protocol.constants import FRAME_END, FRAME_METHOD, REPLY_NAMES
from .protocol.content import PUBLISH, Run, append_frames, message_run
from .protocol.errors import ProtocolError, reply_text
from .protocol.frames import FRAME_HEADER_STRUCT, HEARTBEAT_FRAME, VALID_FRAME_TYPES, append_split_body, method_frame
from .protocol.handshake import Credentials
from .protocol.rules import EXPECT_METHOD, Role, check_ack_layout

if TYPE_CHECKING:
    from .tls import PeerInfo

log = logging.getLogger("amqproxy.client")
audit_log = logging.getLogger("amqproxy.audit")

_METHOD_ID = struct.Struct(">HH")
_RECV_SIZE = 256 * 1024
_ACKS = frozenset({c.BASIC_ACK, c.BASIC_NACK, c.BASIC_REJECT})
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


class ClientSession(ClientChannels, HandshakeDriver):
    def __init__(
        self,
        proxy: SessionHost,
        sock: socket.socket,
        address: tuple[Any, ...],
        on_end: Callable[[ClientSession], None],
        tls: PeerInfo | None = None,
        source: tuple[str, int] | None = None,
    ) -> None:
        """`on_end` is called once the session is torn down; `tls` is what the TLS listener's
        handshake found, `source` the client a PROXY header ahead of that handshake named."""
        super().__init__()
        self._on_end = on_end
        self.proxy = proxy
        self.pool = proxy.pool
        self.config = proxy.config
        self.metrics = proxy.metrics
        self.sock = sock
        self.peer_host = str(address[0]) if address else ""
        self.address = f"{address[0]}:{address[1]}" if len(address) >= 2 else str(address)
        self.proxied_by: str | None = None  # the balancer's address when a PROXY header named the client
        self.client_host = self.peer_host  # the client's own address (a trusted PROXY header's source)
        if source is not None:
            self._named_by_balancer(source)
        self.admission = Admission(proxy.limits)
        self._byte_bucket: TokenBucket | None = None  # --client-byte-rate
        self._byte_rate_noted = False
        self.tls = tls  # the TLS listener's: version, cipher, certificate subject
        self.auth_user = ""  # the --auth-file user; self.credentials are then the broker's, mapped
        self.id = f"{_id_prefix}-{next(_ids):x}"
        self.core = ClientConnection(self.config.client_heartbeat)
        self.capabilities: frozenset[str] = frozenset()
        self.credentials: Credentials | None = None
        self.vhost: str | None = None
        self.pool_key: tuple[str, str, str] = ("", "", "")
        self.channel_max = 0
        self.max_body = c.PRE_TUNE_FRAME_MAX - c.FRAME_OVERHEAD
        self.heartbeat = 0
        self.opened_at = time.monotonic()
        self.last_recv = self.opened_at
        self.closing = False
        self.close_reason = ""
        self.close_kind = "client"  # one of metrics.CLOSE_REASONS
        self.close_code = 0  # the reply code of the Connection.Close we sent, if any
        self.connected_at = time.time()
        self.bytes_in = self.bytes_out = 0
        self.messages_in = 0  # publishes from the client
        self.outbox = Outbox(
            sock, self._on_write_error, high_watermark=self.config.client_buffer, latency=FORWARD_LATENCY_U2C
        )
        self._torn_down = False
        self._handshake_deadline = 0.0
        self.throttled = False  # waiting for an upstream to drain: our reads are paused on purpose
        self.over_buffer_since: float | None = None  # when the outbox went above --client-buffer

    def __repr__(self) -> str:
        return f"ClientSession({self.id} {self.address})"

    def log_extra(self, event: str, **fields: Any) -> dict[str, Any]:
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
                with gevent.Timeout(bound, HandshakeTimeout):
                    self._handshake()
            except Refused as exc:
                self.close_reason = str(exc)
                if exc.timed_out:
                    self.metrics.client_refused("handshake_timeout")
                return
            if log.isEnabledFor(logging.INFO):  # the fields are not even built otherwise
                log.info("client connected", extra=self.log_extra("client_open"))
            self._forward_loop()
        except ProtocolError as exc:
            self._protocol_failure(exc)
        except (OSError, gevent.Timeout) as exc:
            if not self.close_reason:
                self.close_reason = f"socket error: {exc}"
                self.close_kind = "socket_error"
        except Exception:
            # A bug of ours: the client gets a clean 541, never a traceback, and others carry on.
            log.exception("internal error in client session", extra=self.log_extra("client_internal_error"))
            self.close_kind = "internal_error"
            self._protocol_failure(ProtocolError(c.INTERNAL_ERROR, "internal error in amqproxy"))
        finally:
            self._teardown()
            # Flush what is queued (a final Close-Ok), then let StreamServer close the socket.
            self.outbox.close_when_drained()
            self.outbox.join(_CLOSE_OK_WAIT)
            self.outbox.kill()

    def _protocol_failure(self, exc: ProtocolError) -> None:
        self.core.reader.unshare()
        if self.close_kind == "client":
            self.close_kind = "protocol_error"
        if self.vhost is None:
            self.metrics.client_refused("protocol_error")
        if exc.reply_code != c.CONNECTION_FORCED:  # 320 here is an upstream problem, counted there
            self.metrics.frame_failed(CLIENT_TO_UPSTREAM, REPLY_NAMES.get(exc.reply_code, "error").lower())
            self.metrics.error("client_protocol", "permanent", self.vhost)
        log.warning(
            "client protocol error",
            extra=self.log_extra("client_protocol_error", reply_code=exc.reply_code, reply_text=exc.text),
        )
        self.close_connection(exc.reply_code, exc.text, exc.method)
        self._await_close_ok()

    def _await_close_ok(self) -> None:
        """After our Connection.Close, the core drops everything until Close-Ok (spec 1.4.2.5) or
        the grace ends."""
        core = self.core
        try:
            with gevent.Timeout(_CLOSE_OK_WAIT, False):
                while core.state is ConnectionState.CLOSING:
                    action = core.next_action()
                    if isinstance(action, Send):
                        self.outbox.put(action.data)
                    elif action is None:
                        data = self.sock.recv(65536)
                        if not data:
                            return
                        core.receive_data(data)
        except OSError:
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
        self.outbox.put(self.core.close(reply_code, text, method).data)
        # Bound the wait for the client's Close-Ok even when this was called from another
        # greenlet (an upstream reader) while the session's read loop sits in recv().
        gevent.spawn_later(_CLOSE_OK_WAIT + 0.5, self._shutdown_socket)

    def _delete_exclusive_queues(self, wait: float = 0.0) -> None:
        """The client's exclusive queues go with it (the broker cannot see the client leave a
        shared upstream connection). With `wait`, return once the broker has deleted them (or
        the wait ends): a client that reconnects at once and redeclares, or another that looks
        for the queue, must not find it. Idempotent: the registry hands each queue out once."""
        deleted = []
        for upstream, names in self.pool.exclusive.release_client(self).items():
            if upstream.alive:
                deleted += upstream.delete_queues(names)
        if wait and deleted:
            gevent.wait(deleted, timeout=wait)

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
            self.metrics.error(kind, "transient", self.vhost)
        log.warning("client aborted", extra=self.log_extra("client_abort", reason=reason))
        self.closing = True
        self.outbox.kill()
        self._shutdown_socket()

    def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        self.closing = True
        self.admission.release()
        self._release_channels()
        for blocker in self.blocked_by:
            blocker.forget_blocked(self)
        self.blocked_by.clear()
        self._delete_exclusive_queues()
        self._on_end(self)
        if self.vhost is not None:
            self.metrics.client_closed(self.vhost, self.username, self.close_kind)
            if audit_log.isEnabledFor(logging.INFO):
                self._audit()
        if self.credentials is not None and log.isEnabledFor(logging.INFO):
            log.info(
                "client disconnected",
                extra=self.log_extra(
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
            self.metrics.limit_hit(CLIENT_BYTE_RATE, enforced)
            log.warning(
                "client byte rate limit reached" + ("" if enforced else " (alarm only: not slowed)"),
                extra=self.log_extra(
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
        reader = self.core.reader
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
                        # A client's Connection.Close releases its channels into this read's
                        # batches, behind what it sent before (_release_channels).
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
                            if method != c.BASIC_ACK:  # streams refuse these with a connection error
                                link.record.refused_at = time.monotonic()
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

    def _on_connection_frame(self, frame_type: int, payload: memoryview) -> bool:
        """Channel 0 after the handshake (the core's rules). Returns True when the session should end."""
        action = self.core.connection_frame(frame_type, payload)
        if isinstance(action, ClientClosed):
            self.close_reason = f"client closed ({action.reply_code} {action.reply_text})"
            self.close_kind = "client"
            self.closing = True
            self._release_channels()
            # Close-Ok only once its exclusive queues are gone: a direct connection's go as it
            # ends, so a client that has seen the Close-Ok must not find them still there.
            self._delete_exclusive_queues(wait=_CLOSE_OK_WAIT)
            self.outbox.put(self.core.close_ok())
            return True
        if isinstance(action, SecretUpdated):
            # Token-refreshing clients: acknowledge so they keep working. Pooled upstreams stay
            # keyed by the secret they logged in with.
            self.outbox.put(self.core.update_secret_ok())
            log.info("client updated its secret", extra=self.log_extra("client_update_secret"))
        return False

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
