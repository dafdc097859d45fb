"""Failover of a client's channels when their upstream connection dies (--upstream-failure recover).

`Failover` is one loss for one client. At the loss (`begin`, in the failing upstream's
greenlet, never blocking) it settles what cannot wait: outstanding publishes are nacked,
channels that cannot be recovered are failed, consumers of queues that died are cancelled,
and every other channel is put in a `channel.Gap` that holds the client's frames (the
forwarding loop goes on unchanged; past --recovery-buffer the client is not read). Then one
greenlet (`run`) re-establishes each channel on a healthy upstream within --recovery-timeout:
a stand-in link without a client replays what the client set up (topology first, then
confirm.select, up to a basic.qos round trip), and the channel moves onto it without yielding,
so no client frame can overtake. What was recorded and how tags stay continuous is pure logic
in recovery.py; the session only says what it is (`FailoverSession`).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import gevent
from gevent.event import AsyncResult

from .channel import ChannelSink, Gap, Link, Replay
from .pool import ChannelOwner
from .protocol import constants as c
from .protocol.closing import CloseEvent
from .protocol.codec import encode_method
from .protocol.errors import reply_text
from .protocol.frames import FRAME_HEADER_STRUCT, append_split_body, method_frame
from .protocol.rules import Role
from .recovery import consume_nowait, qos_default
from .upstream import Upstream
from .upstream_handshake import UpstreamError

if TYPE_CHECKING:
    from .config import Config
    from .metrics import Metrics
    from .pool import Pool

log = logging.getLogger("amqproxy.client")

_CHANNEL_OPEN = encode_method(c.CHANNEL_OPEN)


class FailoverSession(ChannelOwner, Protocol):
    """What a failover uses of the client session whose channels it moves."""

    @property
    def config(self) -> Config: ...

    @property
    def pool(self) -> Pool: ...

    @property
    def metrics(self) -> Metrics: ...

    def send_to_client(self, data: bytes | bytearray) -> None:
        """Frames of the proxy's own for the client (nacks, cancels, closes)."""

    def close_connection(
        self, reply_code: int, text: str, method: tuple[int, int] = (0, 0), kind: str | None = None
    ) -> None: ...

    def placed_on(self, role: Role, upstream: Upstream) -> None:
        """A channel of the client now lives on `upstream` (its preference for `role`)."""

    def log_extra(self, event: str, **fields: Any) -> dict[str, Any]: ...


class ChannelOutcome(enum.Enum):
    RECOVERED = "recovered"
    CLIENT_GONE = "client_gone"  # the client (or just that channel) went away meanwhile
    TIMEOUT = "timeout"  # no upstream within --recovery-timeout
    REFUSED = "refused"  # the broker refused the replay (its Channel.Close)


class RecoveryOutcome(str, enum.Enum):
    """How one failover ended (the `outcome` label of amqproxy_recoveries_total)."""

    RECOVERED = "recovered"
    PARTIAL = "partial"  # some channels failed
    TIMEOUT = "timeout"
    CLIENT_GONE = "client_gone"
    FAILED = "failed"


@dataclass
class Counts:
    nacked: int = 0
    cancelled: int = 0
    failed: int = 0
    recovered: int = 0


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


def fail_channel(session: FailoverSession, link: Link, reply_code: int, text: str, reason: str) -> None:
    """A channel that cannot be recovered: Channel.Close to the client (nothing upstream)."""
    session.metrics.recovery_channel_failed(reason)
    log.warning(
        "channel not recovered",
        extra=session.log_extra(
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
        session.send_to_client(to_client)


class Failover:
    """One loss of an upstream connection, for one client."""

    def __init__(self, session: FailoverSession, node: str, cause: str) -> None:
        self.session = session
        self.node = node
        self.cause = cause
        self.started = time.monotonic()
        self.counts = Counts()
        self.gaps: list[tuple[Link, Gap]] = []

    # ------------------------------------------------------------------ at the loss

    def begin(self, upstream: ChannelSink, links: list[Link]) -> None:
        """Settle what cannot wait and hold the rest; then `run` in a greenlet of its own."""
        session = self.session
        if not links:
            return  # only exclusive queues of the client died there: using them now gets the broker's 404
        cut = [link.client_channel for link in links if link.body_due > 0 and not link.closing]
        if cut:
            # A delivery cut in the middle of its content frames: the client waits for body
            # frames that will never come, and any other frame on that channel is a connection
            # error for it. Only a Connection.Close ends that cleanly.
            session.metrics.recovery_channel_failed("content_cut")
            session.metrics.recovery(RecoveryOutcome.FAILED.value, 0.0, 0, 0, 0)
            session.close_connection(
                c.CONNECTION_FORCED,
                f"CONNECTION_FORCED - upstream connection lost: a delivery on channel {cut[0]} was cut in the "
                f"middle of its content frames; {self.cause}",
                kind="upstream_lost",
            )
            return
        counts = self.counts
        for link in sorted(links, key=lambda lk: lk.client_channel):
            if link.waiter is not None or link.client is not session:
                continue  # being placed by the client's own greenlet, which retries elsewhere
            if link.closing:
                # A close handshake in progress: the lost side answers for the broker.
                to_client, _ = link.close_event(CloseEvent.UPSTREAM_GONE)
                if to_client:
                    session.send_to_client(to_client)
                continue
            self._settle_confirms(link)
            link.tag_offset = link.delivered
            if link.record.tx:
                fail_channel(
                    session,
                    link,
                    c.PRECONDITION_FAILED,
                    "PRECONDITION_FAILED - upstream connection lost while the channel was in transaction "
                    "mode (tx.select): its uncommitted work is lost; open a new channel",
                    "tx",
                )
                counts.failed += 1
                continue
            if not self._cancel_lost_consumers(link):
                counts.failed += 1
                continue
            gap = Gap(session.config.recovery_buffer, upstream.max_body, [r.raw for r in link.record.pending])
            link.hold_in(gap)
            self.gaps.append((link, gap))
        gevent.spawn(self.run)

    def _settle_confirms(self, link: Link) -> None:
        """Nack the publishes the lost upstream never confirmed; the numbering goes on from there."""
        tracker = link.confirms
        if tracker is None:
            return
        # A publish still arriving from the client (held until complete) never reached the lost
        # upstream: it goes to the new one, as the first of its numbering.
        sent = link.published - (1 if link.content else 0)
        for tag, multiple in tracker.lost(sent):
            self.session.send_to_client(
                method_frame(
                    link.client_channel,
                    encode_method(c.BASIC_NACK, delivery_tag=tag, multiple=multiple, requeue=False),
                )
            )
        self.counts.nacked += tracker.nacked
        link.confirm_offset = sent

    def _cancel_lost_consumers(self, link: Link) -> bool:
        """Consumers on queues that died with the upstream (exclusive, auto-delete, server-named)
        cannot be re-issued: basic.cancel to a client that takes it, else the channel is closed.
        Returns whether the channel lives on."""
        session = self.session
        for consumer in link.record.consumers():
            reason = session.topology.unrecoverable(consumer.queue)
            if not reason:
                continue
            if "consumer_cancel_notify" not in session.capabilities:
                fail_channel(
                    session,
                    link,
                    c.NOT_FOUND,
                    f"NOT_FOUND - upstream connection lost: consumer '{consumer.tag}' cannot be recovered, its "
                    f"{reason} queue '{consumer.queue}' is gone",
                    "consumer_lost",
                )
                return False
            link.record.cancelled(consumer.tag)
            link.consumer_tags.discard(consumer.tag)
            self.counts.cancelled += 1
            session.send_to_client(
                method_frame(link.client_channel, encode_method(c.BASIC_CANCEL, consumer_tag=consumer.tag, nowait=True))
            )
        return True

    # ------------------------------------------------------------------ re-establishing (its own greenlet)

    def run(self) -> None:
        """Re-establish each held channel on a healthy upstream (backoff and breakers as for any
        dial) within --recovery-timeout; the client's topology is re-declared first."""
        session, counts = self.session, self.counts
        timeout = session.config.recovery_timeout
        deadline = self.started + timeout
        topology = session.topology.replay()
        outcome = RecoveryOutcome.RECOVERED
        try:
            for link, gap in self.gaps:
                result, detail = self._recover_channel(link, gap, deadline, topology)
                if result is ChannelOutcome.RECOVERED:
                    counts.recovered += 1
                    topology = []
                elif result is ChannelOutcome.CLIENT_GONE:
                    if session.closing:
                        outcome = RecoveryOutcome.CLIENT_GONE
                        break
                    gap.end()  # that channel alone is gone; the others go on
                elif result is ChannelOutcome.TIMEOUT:
                    outcome = RecoveryOutcome.TIMEOUT
                    session.close_connection(
                        c.CONNECTION_FORCED,
                        f"CONNECTION_FORCED - upstream connection lost: {self.cause}; not recovered within "
                        f"{timeout:g} s ({detail or 'no upstream'})",
                        kind="upstream_lost",
                    )
                    break
                else:
                    counts.failed += 1
                    fail_channel(
                        session,
                        link,
                        c.PRECONDITION_FAILED,
                        f"PRECONDITION_FAILED - upstream connection lost; the channel could not be re-established: "
                        f"{detail}",
                        "replay_error",
                    )
        finally:
            for _link, gap in self.gaps:
                gap.end()
        if outcome is RecoveryOutcome.RECOVERED and counts.failed:
            outcome = RecoveryOutcome.PARTIAL
        duration = time.monotonic() - self.started
        session.metrics.recovery(outcome.value, duration, counts.recovered, counts.cancelled, counts.nacked)
        log.log(
            logging.INFO if outcome is RecoveryOutcome.RECOVERED else logging.WARNING,
            "upstream recovery",
            extra=session.log_extra(
                "recovery",
                node=self.node,
                cause=reply_text(self.cause),
                outcome=outcome.value,
                duration_s=round(duration, 3),
                channels=counts.recovered + counts.failed,
                channels_recovered=counts.recovered,
                channels_failed=counts.failed,
                consumers_cancelled=counts.cancelled,
                publishes_nacked=counts.nacked,
            ),
        )

    def _recover_channel(
        self, link: Link, gap: Gap, deadline: float, topology: list[bytes]
    ) -> tuple[ChannelOutcome, str]:
        """One channel: a stand-in link is placed and replays the setup the client should not see
        (topology, confirm.select) up to a basic.qos round trip; then the channel moves onto it at
        once (no yield), replays its qos and consumers in order, re-sends its unanswered requests
        and the frames held meanwhile. The detail is why it timed out, or the broker's refusal."""
        session = self.session
        delays = session.pool.backoff.delays()
        last_error = ""
        role = link.role or Role.CONSUME
        while True:
            if session.closing or link.client is None:
                return ChannelOutcome.CLIENT_GONE, ""
            if link.closing and link.upstream is not gap:
                return ChannelOutcome.CLIENT_GONE, ""
            if deadline - time.monotonic() <= 0:
                return ChannelOutcome.TIMEOUT, last_error
            stand_in = Link(None, link.client_channel, None, 0)
            try:
                upstream, opened = session.pool.place(session, stand_in, role, deadline)
            except UpstreamError as exc:
                last_error = exc.text
                if exc.permanent:
                    return ChannelOutcome.TIMEOUT, exc.text
                gevent.sleep(min(next(delays), max(0.0, deadline - time.monotonic())))
                continue
            session.placed_on(role, upstream)
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
                    return ChannelOutcome.REFUSED, replay.error
                if upstream.alive:  # no answer in time
                    stand_in.close_upstream(200, "recovery timed out")
                continue  # the new upstream died too: place again
            if session.closing or link.client is None or link.upstream is not gap:
                stand_in.close_upstream(200, "client connection closed")
                return ChannelOutcome.CLIENT_GONE, ""
            self._move(link, gap, stand_in, upstream, role)
            return ChannelOutcome.RECOVERED, ""

    def _move(self, link: Link, gap: Gap, stand_in: Link, upstream: Upstream, role: Role) -> None:
        """The channel takes the stand-in's upstream channel and everything held goes out in one
        batch: from here to the send nothing yields, so no client frame can overtake."""
        session = self.session
        channel = stand_in.upstream_channel
        stand_in.replay = None
        upstream.replace_link(channel, link)
        link.moved_to(upstream, channel)
        upstream.assign_role(role if session.config.separate_publishers else Role.ANY)
        assert upstream.role is not None
        session.placed_on(upstream.role, upstream)
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
        upstream.tell_blocked(session)
