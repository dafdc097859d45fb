"""Upstream: one pooled AMQP connection from the proxy to a broker node, shared by many clients.

Greenlets: the client greenlet that needs the connection runs the handshake (login, open);
afterwards one reader greenlet (`_read_loop`) owns reading the socket and one `Outbox` owns
writing it. The reader routes each frame by upstream channel id to the owning client's outbox
(never blocking on a client), and interprets only the methods that change channel state.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Protocol

import gevent
from gevent.event import AsyncResult

from .channel import ClientLeg, Link
from .metrics import BYTES, FRAMES, UPSTREAM_TO_CLIENT
from .outbox import Outbox
from .protocol import constants as c
from .protocol.codec import DecodeError, decode_method, encode_method
from .protocol.constants import FRAME_END, FRAME_METHOD, REPLY_NAMES
from .protocol.content import DELIVER, Run, append_frames, message_run
from .protocol.errors import ProtocolError
from .protocol.frames import (
    FRAME_HEADER_STRUCT,
    HEARTBEAT_FRAME,
    VALID_FRAME_TYPES,
    FrameReader,
    append_split_body,
    method_frame,
)
from .protocol.handshake import Credentials
from .protocol.rules import Role
from .recovery import culprit, delivery_tag_position, shift_tag
from .upstream_handshake import _HAS_USER_TIMEOUT, UpstreamHandshake, UpstreamState, describe_error
from .upstream_replies import WATCHED, UpstreamReplies

if TYPE_CHECKING:
    from .config import Config
    from .exclusive import ExclusiveQueues
    from .metrics import Metrics
    from .nodes import Node, NodeSet

log = logging.getLogger("amqproxy.upstream")

_METHOD_ID = struct.Struct(">HH")
_U64 = struct.Struct(">Q")
_DELIVERIES = frozenset({c.BASIC_DELIVER, c.BASIC_GET_OK})
_RECV_SIZE = 256 * 1024
_CHANNEL_OPEN = encode_method(c.CHANNEL_OPEN)


def _deliver(batches: dict[ClientLeg, bytearray], received_at: float) -> None:
    """Hand each client the frames a read gathered for it, and start the batches afresh."""
    for client, out in batches.items():
        client.deliver(out, received_at)
    batches.clear()


class UpstreamPool(Protocol):
    """What an upstream connection uses of the pool that owns it."""

    config: Config
    metrics: Metrics | None
    exclusive: ExclusiveQueues
    nodes: NodeSet
    pid: int
    closing: set[Upstream]  # sent Connection.Close, awaiting Close-Ok

    def forget(self, upstream: Upstream) -> None: ...

    def upstream_gone(self, upstream: Upstream, unexpected: bool, wanted: bool) -> None: ...


class Upstream(UpstreamHandshake, UpstreamReplies):
    """A pooled connection to a broker node; the handshake and the reply interpretation are its
    mixins' (upstream_handshake.py, upstream_replies.py)."""

    pool: UpstreamPool  # the mixins name only what they use of it

    def __init__(self, pool: UpstreamPool, node: Node, credentials: Credentials, upstream_id: int) -> None:
        self.pool = pool
        self.node = node
        self.credentials = credentials
        self.id = upstream_id
        self.vhost: str | None = None
        self.sock: socket.socket | None = None
        self.outbox: Outbox | None = None
        self.state = UpstreamState.NEW
        self.channel_max = 0  # what this connection carries: min(broker, --max-channels-per-upstream)
        self.broker_channel_max = 0  # what the broker allows a connection
        self.frame_max = 0
        self.max_body = 0
        self.heartbeat = 0
        self.server_properties: dict[str, Any] = {}
        self.links: dict[int, Link] = {}
        self._next_channel = 1
        self.created = time.monotonic()
        self.idle_since = self.created
        self.last_recv = self.created
        self.blocked_reason: str | None = None
        self.close_cause = ""
        self.fail_kind = ""  # how it failed (metric reason), once it has
        # The broker's Connection.Close, when it closed us: (reply code, text, class and method).
        self.broker_close: tuple[int, str, tuple[int, int]] | None = None
        self.role: Role | None = None  # role of its client channels; None when it has none
        self.blocked_clients: set[ClientLeg] = set()  # clients sent connection.blocked for us
        self.counted = False  # counted in its node's connection count
        self._reader: gevent.Greenlet | None = None
        self._watch_timer: gevent.Greenlet | None = None  # the watchdog's check due before the next tick
        self._handshake = FrameReader(c.PRE_TUNE_FRAME_MAX)

    def __repr__(self) -> str:
        return f"Upstream(u{self.id} {self.node.label} {self.state.value})"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.credentials.username, self.credentials.password, self.vhost or "")

    def abort(self) -> None:
        """Drop a connection that never reached the pool (failed or stale handshake)."""
        self.state = UpstreamState.CLOSED
        self.pool.upstream_gone(self, unexpected=False, wanted=False)
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass

    # ------------------------------------------------------------------ channels

    @property
    def alive(self) -> bool:
        return self.state is UpstreamState.OPEN

    @property
    def has_room(self) -> bool:
        return self.state is UpstreamState.OPEN and len(self.links) < self.channel_max

    def accepts(self, role: Role, now: float) -> bool:
        """Can a new client channel of `role` go here? Not when full, past --upstream-max-age,
        or carrying channels of the other role."""
        if not self.has_room:
            return False
        max_age = self.pool.config.upstream_max_age
        if max_age and now - self.created > max_age:
            return False
        if self.pool.nodes.state_of(self.node).retired:
            return False
        return self.role is None or self.role == role

    def attach(self, link: Link, role: Role | None = None) -> bool:
        """Give `link` a fresh upstream channel id (never one in use or awaiting Close-Ok)."""
        if not self.has_room:
            return False
        channel_max = self.channel_max
        # The client's own channel id when it is free: frames then cross verbatim, no rewrite.
        wanted = link.client_channel
        candidate = wanted if 0 < wanted <= channel_max and wanted not in self.links else self._next_channel
        for _ in range(channel_max):
            if candidate > channel_max:
                candidate = 1
            if candidate not in self.links:
                link.placed(self, candidate)
                self.links[candidate] = link
                self._next_channel = candidate + 1
                if role is not None and link.client is not None:
                    self.role = role
                return True
            candidate += 1
        return False

    def release(self, link: Link) -> None:
        if self.links.get(link.upstream_channel) is link:
            del self.links[link.upstream_channel]
            if not self.links:
                self.idle_since = time.monotonic()
                self.role = None

    def drain(self, link: Link, into: bytearray | None = None) -> None:
        """Our Close and the broker's crossed on `link`'s channel: the broker may still send the
        Close-Ok for ours, after our Close-Ok for its Close. The id is reopened by a drain link of
        the proxy's own at once (behind that Close-Ok, in the same batch when there is one): a
        late Close-Ok reaches the drain, which is open and drops it, and the drain closes the
        channel at its open-ok (upstream_replies), freeing the id when that Close is answered."""
        channel = link.upstream_channel
        if self.links.get(channel) is not link or not self.alive:
            self.release(link)
            return
        drain = Link(None, 0, self, channel)
        drain.draining = drain.open_pending = True  # the watchdog covers the open-ok
        self.links[channel] = drain
        if into is not None:
            into += method_frame(channel, _CHANNEL_OPEN)
        else:
            self.send(method_frame(channel, _CHANNEL_OPEN))

    def open_channel(self, link: Link, timeout: float) -> bool:
        """channel.open for an attached link, waiting for open-ok: a round trip proving the
        connection answers. False when it does not within `timeout`."""
        link.waiter = AsyncResult()
        self.send(method_frame(link.upstream_channel, _CHANNEL_OPEN))
        try:
            return bool(link.waiter.get(timeout=timeout))  # False: the connection died meanwhile
        except gevent.Timeout:
            return False
        finally:
            link.waiter = None

    def send(self, data: bytes | bytearray, received_at: float = 0.0) -> None:
        if self.outbox is not None:
            self.outbox.put(data, received_at)

    def backed_up(self) -> bool:
        outbox = self.outbox
        return outbox is not None and outbox.buffered > outbox.high_watermark

    def wait_for_room(self, timeout: float) -> bool:
        return self.outbox is None or self.outbox.wait_for_room(timeout)

    def send_method(self, channel: int, method: tuple[int, int], **args: Any) -> None:
        self.send(method_frame(channel, encode_method(method, **args)))

    def delete_queues(self, names: list[str]) -> list[AsyncResult]:
        """Delete exclusive queues left by a departed client, each on a fresh channel of its own.
        Returns one result per queue, True once the broker has deleted it (the channel's
        Close-Ok), False if the connection died first."""
        done: list[AsyncResult] = []
        for name in names:
            link = Link(None, 0, None, 0)
            if not self.attach(link):
                log.warning(
                    "no free channel to delete an exclusive queue",
                    extra={"event": "exclusive_cleanup_skipped", "upstream_id": self.id},
                )
                break
            link.cleaned = AsyncResult()
            done.append(link.cleaned)
            ch = link.upstream_channel
            self.send(
                method_frame(ch, _CHANNEL_OPEN)
                + method_frame(ch, encode_method(c.QUEUE_DELETE, queue=name, nowait=True))
            )
            link.close_upstream(200, "exclusive queue cleanup")
        return done

    # ------------------------------------------------------------------ reading

    def _read_loop(self) -> None:
        assert self.sock is not None
        sock = self.sock
        reader = self._handshake  # keeps whatever arrived with Open-Ok
        reader.max_frame_size = self.frame_max
        links = self.links
        pack_header = FRAME_HEADER_STRUCT.pack
        frame_header = FRAME_HEADER_STRUCT.unpack_from
        unpack_method = _METHOD_ID.unpack_from
        unpack_body_size = _U64.unpack_from
        valid_types = VALID_FRAME_TYPES
        max_frame = self.frame_max
        frame_counts = FRAMES[UPSTREAM_TO_CLIENT]
        byte_counts = BYTES[UPSTREAM_TO_CLIENT]
        run = Run()
        try:
            while True:
                data = sock.recv(_RECV_SIZE)
                if not data:
                    raise ConnectionResetError("connection closed by the broker")
                reader.feed(data)
                received_at = self.last_recv = time.monotonic()
                batches: defaultdict[ClientLeg, bytearray] = defaultdict(bytearray)
                buf = reader.buffer
                available = len(buf)
                pos = reader.pos
                # Frames whose channel id is the same on both legs are copied verbatim, a whole
                # contiguous run for one client at a time: [run_start, run_end) for run_client.
                run_client: ClientLeg | None = None
                run_start = run_end = 0
                with memoryview(buf) as view:
                    while available - pos >= 7:
                        frame_type, channel, size = frame_header(buf, pos)
                        end = pos + 7 + size
                        if frame_type not in valid_types or size + 8 > max_frame:
                            reader.pos = pos
                            reader.next_frame()  # raises the precise framing error
                        if end >= available:
                            break
                        if buf[end] != FRAME_END:
                            reader.pos = pos
                            reader.next_frame()
                        if frame_type == FRAME_METHOD and (link := links.get(channel)) is not None:
                            # Fast path: whole deliveries to a client in its plain state are
                            # copied a run at a time (see protocol/content.py).
                            client = link.client
                            if (
                                client is not None
                                and not client.closing
                                and not link.closing
                                and not link.tag_offset
                                and message_run(buf, pos, available, channel, DELIVER, max_frame, client.max_body, run)
                            ):
                                run.count(pos, frame_counts, byte_counts)
                                link.delivered += run.messages
                                if link.client_channel == channel:
                                    if client is run_client and pos == run_end:
                                        run_end = run.end
                                    else:
                                        if run_client is not None:
                                            batches[run_client] += view[run_start:run_end]
                                        run_client, run_start, run_end = client, pos, run.end
                                else:
                                    if run_client is not None:
                                        batches[run_client] += view[run_start:run_end]
                                        run_client = None
                                    append_frames(batches[client], view[pos : run.end], link.client_channel)
                                pos = run.end
                                continue
                        frame_start = pos
                        start = pos + 7
                        pos = end + 1
                        frame_counts[frame_type] += 1
                        byte_counts[frame_type] += size + 8
                        if channel == 0:
                            if frame_type == FRAME_METHOD:
                                # A Close (or a block) is the clients' news only after what came
                                # before it: at a loss their nacks must not overtake these acks.
                                if run_client is not None:
                                    batches[run_client] += view[run_start:run_end]
                                    run_client = None
                                _deliver(batches, received_at)
                            self._on_connection_frame(frame_type, view[start:end])
                            continue
                        link = links.get(channel)
                        if link is None:
                            continue
                        if frame_type == c.FRAME_METHOD:
                            method = unpack_method(buf, start)
                            rewritten: bytes | bool = True
                            if method in WATCHED:
                                rewritten = self._on_watched(link, method, view[start:end])
                                if not rewritten:
                                    continue
                            elif link.closing and link.client_not_listening:
                                continue
                            elif method in _DELIVERIES and link.client is not None:
                                link.delivered += 1
                                if link.tag_offset:  # only on a channel that went through a recovery
                                    rewritten = shift_tag(
                                        buf, start, end, delivery_tag_position(method, buf, start), link.tag_offset
                                    )
                            if rewritten is not True:
                                # A delivery tag or confirm number renumbered after a recovery.
                                client = link.client
                                if client is None or client.closing:
                                    continue
                                if run_client is not None:
                                    batches[run_client] += view[run_start:run_end]
                                    run_client = None
                                batches[client] += method_frame(link.client_channel, rewritten)  # type: ignore[arg-type]
                                continue
                        else:
                            # Content body bytes still due to the client on this channel: a loss
                            # that cuts a delivery in the middle cannot be recovered on it.
                            if frame_type == c.FRAME_HEADER:
                                link.body_due = unpack_body_size(buf, start + 4)[0]
                            else:
                                link.body_due -= size
                            if link.closing and link.client_not_listening:
                                continue
                        client = link.client
                        if client is None or client.closing:
                            continue
                        if link.client_channel == channel and (frame_type != c.FRAME_BODY or size <= client.max_body):
                            if client is run_client and frame_start == run_end:
                                run_end = pos
                                continue
                            if run_client is not None:
                                batches[run_client] += view[run_start:run_end]
                            run_client, run_start, run_end = client, frame_start, pos
                            continue
                        if run_client is not None:  # keep each client's frames in order
                            batches[run_client] += view[run_start:run_end]
                            run_client = None
                        out = batches[client]
                        if frame_type == c.FRAME_BODY and size > client.max_body:
                            append_split_body(out, link.client_channel, view[start:end], client.max_body)
                        else:
                            out += pack_header(frame_type, link.client_channel, size)
                            out += view[start : end + 1]
                    if run_client is not None:
                        batches[run_client] += view[run_start:run_end]
                reader.pos = pos
                reader.compact()
                _deliver(batches, received_at)
                # A busy broker socket never blocks recv(); yield so client writers get to run.
                gevent.sleep(0)
        except (OSError, ProtocolError, DecodeError) as exc:
            if isinstance(exc, (ProtocolError, DecodeError)) and self.pool.metrics is not None:
                reason = REPLY_NAMES.get(getattr(exc, "reply_code", 501), "frame_error").lower()
                self.pool.metrics.frame_failed(UPSTREAM_TO_CLIENT, reason)
            if self.state is not UpstreamState.CLOSED:
                self.fail(f"connection to {self.node.label} lost: {describe_error(exc)}")
            self._finish()
        except gevent.GreenletExit:
            pass

    def _on_connection_frame(self, frame_type: int, payload: memoryview) -> None:
        if frame_type == c.FRAME_HEARTBEAT:
            return
        if frame_type != c.FRAME_METHOD:
            raise ProtocolError(c.UNEXPECTED_FRAME, "content frame on channel 0")
        method, args = decode_method(payload)
        if method == c.CONNECTION_CLOSE:
            self.send_method(0, c.CONNECTION_CLOSE_OK)
            if self.outbox is not None:
                self.outbox.close_when_drained()
            self.broker_close = (args["reply_code"], args["reply_text"], (args["class_id"], args["method_id"]))
            self.fail(
                f"broker closed the upstream connection: {args['reply_code']} {args['reply_text']}",
                close_socket=False,
                kind="broker_closed",
            )
        elif method == c.CONNECTION_CLOSE_OK:
            self._finish()
        elif method == c.CONNECTION_BLOCKED:
            self.blocked_reason = args["reason"]
            # The broker stops reading a blocked connection: our unsent data is then no sign of
            # a dead peer, so the kernel's user timeout must not count it.
            self._set_user_timeout(0.0)
            for client in self.clients():
                self.tell_blocked(client)
        elif method == c.CONNECTION_UNBLOCKED:
            self._unblock_all()

    def tell_blocked(self, client: ClientLeg) -> None:
        """A client with channels here learns of the block (if it asked for connection.blocked)."""
        if self.blocked_reason is not None and client.upstream_blocked(self, self.blocked_reason):
            self.blocked_clients.add(client)

    def forget_blocked(self, client: ClientLeg) -> None:
        self.blocked_clients.discard(client)

    def assign_role(self, role: Role) -> None:
        """The role of the channels this connection carries, if it carries none yet."""
        if self.role is None:
            self.role = role

    def replace_link(self, channel: int, link: Link) -> None:
        """Upstream channel `channel` now belongs to `link` (a channel moving on or off it)."""
        self.links[channel] = link

    def _unblock_all(self) -> None:
        """The block is over (or this connection is): tell every client that was told it began,
        whether or not it still has channels here."""
        if self.blocked_reason is not None and self.state is UpstreamState.OPEN:
            self._set_user_timeout(self.pool.config.upstream_tcp_user_timeout)
        self.blocked_reason = None
        blocked, self.blocked_clients = self.blocked_clients, set()
        for client in blocked:
            client.upstream_unblocked(self)

    def clients(self) -> set[ClientLeg]:
        return {link.client for link in self.links.values() if link.client is not None}

    # ------------------------------------------------------------------ liveness and closing

    def tick(self, now: float) -> None:
        """Called by the janitor about once a second: heartbeats on this leg, and the watchdog.

        The watchdog: while the proxy waits for this broker (`awaiting`) and has read nothing at
        all from it for --upstream-silence-timeout, the connection is dead. An idle broker still
        writes a heartbeat at least once per heartbeat interval, a blocked one (memory alarm)
        too, so silence longer than that (the timeout must exceed it) while a reply is due means
        the bytes stopped flowing: a dead NAT entry, a hung host, a partition."""
        if self.state is not UpstreamState.OPEN or self.outbox is None:
            return
        silent = now - self.last_recv
        timeout = self.silence_timeout()
        if timeout and silent > timeout - TICK:
            if silent > timeout:
                if self._watchdog():
                    return
            elif self._watch_timer is None and self.awaiting():
                # Due before the next tick: check at the very moment instead, so detection
                # takes the silence timeout, not up to a tick more.
                self._watch_timer = gevent.spawn_later(timeout - silent, self._watch_at_timeout)
        if not self.heartbeat:
            return
        if silent > 2 * self.heartbeat:
            self.fail(
                f"missed heartbeats from {self.node.label} ({2 * self.heartbeat} s without a frame)",
                kind="heartbeat_timeout",
            )
            return
        if now - self.outbox.last_write >= self.heartbeat / 2:
            self.outbox.put(HEARTBEAT_FRAME)

    def _watchdog(self) -> bool:
        """Fail the connection if it has been silent past the timeout while awaited."""
        silent = time.monotonic() - self.last_recv
        timeout = self.silence_timeout()
        if self.state is not UpstreamState.OPEN or not timeout or silent < timeout:
            return False
        waiting = self.awaiting()
        if not waiting:
            return False
        self.fail(
            f"silent upstream: nothing read from {self.node.label} for {silent:.1f} s while waiting for "
            f"{waiting} (--upstream-silence-timeout {timeout:g} s)",
            kind="silence_timeout",
        )
        return True

    def silence_timeout(self) -> float:
        """The watchdog's timeout: --upstream-silence-timeout, but never less than one heartbeat
        interval (an idle or blocked broker writes a heartbeat at least that often) plus 3 s for
        a busy broker's pauses; 0 = off."""
        timeout = self.pool.config.upstream_silence_timeout
        return max(timeout, self.heartbeat + SILENCE_MARGIN) if timeout else 0.0

    def _watch_at_timeout(self) -> None:
        self._watch_timer = None
        self._watchdog()

    def awaiting(self) -> str:
        """What the proxy waits for from the broker on this connection ("" when nothing): a
        channel.open's open-ok (verified or pipelined), a recovery's replay, a reply to a
        synchronous request, a publisher confirm, or data the socket has not taken."""
        if self.outbox is not None and self.outbox.buffered:
            return f"the broker to take {self.outbox.buffered} bytes"
        for link in self.links.values():
            if link.waiter is not None or link.open_pending:
                return f"channel.open-ok on channel {link.upstream_channel}"
            if link.record.pending:
                return f"a reply on channel {link.upstream_channel}"
            tracker = link.confirms
            if link.confirm and tracker is not None and not link.closing:
                sent = link.published - (1 if link.content else 0)
                if tracker.acked_upto + len(tracker.above) < sent:
                    return f"publisher confirms on channel {link.upstream_channel}"
        return ""

    def _set_user_timeout(self, seconds: float) -> None:
        if self.sock is None or not self.pool.config.upstream_tcp_user_timeout or not _HAS_USER_TIMEOUT:
            return
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))
        except OSError:
            pass

    def close(self, reason: str, kind: str, grace: float = 5.0) -> None:
        """Close cleanly (Connection.Close 200); only called once no client channel is attached.
        `kind` is the metric reason: idle_timeout, max_age or shutdown."""
        if self.state is not UpstreamState.OPEN:
            return
        self._count_closed(kind)
        self.state = UpstreamState.CLOSING
        self.close_cause = reason
        self.pool.forget(self)
        self.pool.closing.add(self)
        self.send_method(0, c.CONNECTION_CLOSE, reply_code=200, reply_text=reason)
        log.info(
            "upstream connection closing",
            extra={"event": "upstream_close", "upstream_id": self.id, "node": self.node.label, "reason": reason},
        )
        gevent.spawn_later(grace, self._finish)

    def fail(self, cause: str, close_socket: bool = True, kind: str = "lost") -> None:
        """The connection is gone. Every client with a channel on it is told, with its channels
        here: it recovers them (`--upstream-failure recover`) or is closed with 320 and the cause.
        `kind` is the metric reason: lost, broker_closed, heartbeat_timeout or health_check."""
        if self.state is UpstreamState.CLOSED:
            return
        if self.state is UpstreamState.OPEN:
            self._count_closed(kind)
            metrics = self.pool.metrics
            if metrics is not None:
                metrics.error("upstream_lost", "transient", self.vhost)
        was_open = self.state is UpstreamState.OPEN
        self.state = UpstreamState.CLOSED
        self.close_cause = cause
        self.fail_kind = kind
        # Clients with channels here, and clients whose exclusive queues died with it.
        lost: dict[ClientLeg, list[Link]] = {client: [] for client in self.pool.exclusive.owners_on(self)}
        for link in self.links.values():
            if link.client is not None:
                lost.setdefault(link.client, []).append(link)
        clients = set(lost)
        self._unblock_all()
        for link in self.links.values():
            if link.waiter is not None:
                link.waiter.set(False)
            if link.cleaned is not None:
                link.cleaned.set(False)
                link.cleaned = None
        self.links.clear()
        self.pool.upstream_gone(self, unexpected=was_open, wanted=bool(clients))
        if was_open:
            log.warning(
                "upstream connection lost",
                extra={
                    "event": "upstream_lost",
                    "upstream_id": self.id,
                    "node": self.node.label,
                    "cause": cause,
                    "clients": len(clients),
                },
            )
        self.pool.exclusive.forget_upstream(self)
        blamed = self._blamed(lost)
        for client, links in lost.items():
            if client is blamed and self.broker_close is not None:
                # As on its own connection: the broker's code and text, and no recovery (which
                # would replay the method into the next upstream connection).
                code, text, method = self.broker_close
                client.close_connection(code, text, method, kind="protocol_error")
            else:
                client.upstream_lost(self, self.node.label, cause, links)
        if close_socket:
            self._finish()

    def _blamed(self, lost: dict[ClientLeg, list[Link]]) -> ClientLeg | None:
        """The client whose method made the broker close this shared connection with an error
        (recovery.culprit), if one alone can have; never for 320 (node shutdown, maintenance)."""
        if self.broker_close is None or self.broker_close[0] in (c.REPLY_SUCCESS, c.CONNECTION_FORCED):
            return None
        records = {client: [link.record for link in links] for client, links in lost.items()}
        return culprit(records, self.broker_close[2], time.monotonic())

    def _count_closed(self, kind: str) -> None:
        metrics = self.pool.metrics
        if metrics is not None:
            metrics.upstream_closed(self.node.label, kind)

    def _finish(self) -> None:
        self.state = UpstreamState.CLOSED
        if self.blocked_clients:
            self._unblock_all()
        self.pool.closing.discard(self)
        self.pool.upstream_gone(self, unexpected=False, wanted=False)
        if self.outbox is not None:
            self.outbox.kill()
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        reader = self._reader
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=False)
        timer, self._watch_timer = self._watch_timer, None
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)

    def _on_write_error(self, exc: BaseException) -> None:
        self.fail(f"write to {self.node.label} failed: {describe_error(exc)}")


TICK = 1.0  # the janitor calls tick() about this often (server.JANITOR_INTERVAL)
SILENCE_MARGIN = 3.0  # s the watchdog allows beyond a heartbeat interval (GC pauses, a loaded host)
