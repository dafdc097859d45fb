"""The clients a chaos scenario runs through the proxy, and the ledger that counts their messages.

Publishers and consumers are pika BlockingConnections, each on its own thread with its own
reconnect loop, the way an application with a simple retry wrapper behaves: a publish that
was not confirmed (nack, or the connection/channel closed under it) is published again after
reconnecting, with the same message id. Every publish attempt ends in exactly one recorded
outcome, so "no silent loss" can be counted rather than sampled.

A thread marks itself busy while it is inside a blocking client call (connect, publish and
wait for the confirm); the longest such call is how long a client was left hanging."""

from __future__ import annotations

import collections
import itertools
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import pika
import pika.exceptions

RECONNECT_DELAY = 0.2  # s between a client's failure and its next connect
CONSUMER_PREFETCH = 50


@dataclass
class ClientError:
    """An error a client saw: ``close`` (Connection.Close or Channel.Close, with code and text)
    or ``tcp`` (the socket ended without a Close)."""

    at: float
    client: str
    op: str
    kind: str
    code: int | None
    text: str


def describe(exc: BaseException) -> tuple[str, int | None, str]:
    """(kind, reply code, text) of a pika error."""
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker | pika.exceptions.ChannelClosedByBroker):
        return "close", exc.reply_code, exc.reply_text
    # A close during the handshake becomes ProbableAuthenticationError/ProbableAccessDeniedError
    # carrying the repr() of the ConnectionClosedByBroker.
    m = re.fullmatch(r"ConnectionClosedByBroker: \((\d+)\) (['\"])(.*)\2", str(exc.args[0]) if exc.args else "")
    if m:
        return "close", int(m.group(1)), m.group(3)
    if isinstance(exc, pika.exceptions.NackError):
        return "nack", None, "basic.nack"
    return "tcp", None, repr(exc)


class Ledger:
    """What happened to every message id and client, shared by all workload threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts = 0
        self.outcome: dict[str, str] = {}  # message id -> last outcome: pending/confirmed/nacked/failed
        self.confirm_times: list[float] = []
        self.confirmed_at: dict[str, float] = {}  # message id -> when its (last) confirm arrived
        self.consumed: set[str] = set()
        self.errors: list[ClientError] = []
        self.busy: dict[str, tuple[str, float]] = {}  # client -> (op, since) while in a blocking call
        self.longest_stall = (0.0, "")  # (seconds, "client op") of the longest blocking call so far
        self.blocked_seen = 0  # connection.blocked notifications received
        # Numbering a client saw that no broker would produce (see Publisher and Consumer):
        # each one is a way to lose a message silently, whether or not this run lost one.
        self.numbering_errors: list[str] = []

    # -- blocking-call tracking ------------------------------------------------
    def enter(self, client: str, op: str) -> None:
        with self.lock:
            self.busy[client] = (op, time.monotonic())

    def leave(self, client: str) -> None:
        with self.lock:
            op, since = self.busy.pop(client)
            self._note_stall(client, op, time.monotonic() - since)

    def _note_stall(self, client: str, op: str, seconds: float) -> None:
        if seconds > self.longest_stall[0]:
            self.longest_stall = (seconds, f"{client} {op}")

    def stall_now(self) -> tuple[float, str]:
        """The longest blocking call in progress right now (seconds, "client op")."""
        now = time.monotonic()
        with self.lock:
            calls = [(now - since, f"{client} {op}") for client, (op, since) in self.busy.items()]
        return max(calls, default=(0.0, ""))

    # -- messages ------------------------------------------------------------
    def attempt(self, message_id: str) -> None:
        with self.lock:
            self.attempts += 1
            self.outcome[message_id] = "pending"

    def settle(self, message_id: str, outcome: str) -> None:
        with self.lock:
            self.outcome[message_id] = outcome
            if outcome == "confirmed":
                now = time.monotonic()
                self.confirm_times.append(now)
                self.confirmed_at[message_id] = now

    def consume(self, message_id: str) -> None:
        with self.lock:
            self.consumed.add(message_id)

    def error(self, client: str, op: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(ClientError(time.monotonic(), client, op, *describe(exc)))

    def numbering_error(self, client: str, text: str) -> None:
        with self.lock:
            self.numbering_errors.append(f"{client}: {text}")

    def confirmed_between(self, start: float, end: float) -> int:
        with self.lock:
            return sum(1 for t in self.confirm_times if start <= t < end)

    def errors_between(self, start: float, end: float) -> list[ClientError]:
        with self.lock:
            return [e for e in self.errors if start <= e.at < end]


class ConfirmSequence:
    """One publish at a time on a confirm channel: every basic.ack/nack must answer the publish
    outstanding (its sequence number, or a `multiple` one reaching it), once."""

    def __init__(self) -> None:
        self.outstanding = 0  # sequence number of the publish waiting for its confirm (0: none)
        self.last = 0  # the channel's publishes so far

    def published(self) -> None:
        self.last += 1
        self.outstanding = self.last

    def confirm(self, name: str, tag: int, multiple: bool) -> str:
        """Empty when the confirm answers the outstanding publish, else what is wrong with it."""
        outstanding, self.outstanding = self.outstanding, 0
        if outstanding and (tag == outstanding or (multiple and tag > outstanding)):
            return ""
        state = f"publish {outstanding} outstanding" if outstanding else f"no publish outstanding (last {self.last})"
        return f"{name} delivery-tag={tag} multiple={multiple} with {state}"


class DeliverySequence:
    """A channel's delivery tags are 1, 2, 3... (the broker numbers every delivery on a channel;
    the proxy keeps that numbering across a recovery)."""

    def __init__(self) -> None:
        self.last = 0

    def delivered(self, tag: int) -> str:
        """Empty for the next tag in sequence, else what is wrong with it."""
        expected, self.last = self.last + 1, tag
        if tag == expected:
            return ""
        return f"delivery-tag {tag} where {expected} was next"


@dataclass
class Endpoint:
    """Where the workload connects: the proxy's AMQP address and the queue it uses."""

    host: str
    port: int
    queue: str

    def params(self, name: str) -> pika.ConnectionParameters:
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            credentials=pika.PlainCredentials("guest", "guest"),
            client_properties={"connection_name": name},
            # Generous client-side timeouts: the proxy, not pika, must end a hang (clear failure).
            socket_timeout=30,
            stack_timeout=60,
            blocked_connection_timeout=None,
            connection_attempts=1,
        )


class Client(threading.Thread):
    """Base of the workload threads: a reconnect loop around `session()`."""

    def __init__(self, name: str, endpoint: Endpoint, ledger: Ledger) -> None:
        super().__init__(name=name, daemon=True)
        self.name_ = name
        self.endpoint = endpoint
        self.ledger = ledger
        self.stop = threading.Event()
        self.reconnect = True  # False: a client with no recovery of its own; an error ends it

    def connect(self) -> pika.BlockingConnection:
        self.ledger.enter(self.name_, "connect")
        try:
            conn = pika.BlockingConnection(self.endpoint.params(self.name_))
        finally:
            self.ledger.leave(self.name_)
        conn.add_on_connection_blocked_callback(self._on_blocked)
        return conn

    def _on_blocked(self, *_args: object) -> None:
        with self.ledger.lock:
            self.ledger.blocked_seen += 1

    def run(self) -> None:
        while not self.stop.is_set():
            conn = None
            try:
                conn = self.connect()
                self.session(conn)
            except (pika.exceptions.AMQPError, OSError) as e:
                self.ledger.error(self.name_, "session", e)
                if not self.reconnect:
                    return
                self.stop.wait(RECONNECT_DELAY)
            finally:
                if conn is not None and conn.is_open:
                    try:
                        conn.close()
                    except (pika.exceptions.AMQPError, OSError):
                        pass

    def session(self, conn: pika.BlockingConnection) -> None:
        raise NotImplementedError


class Publisher(Client):
    """Publishes persistent messages with confirms, one at a time; unconfirmed ones again.

    pika's BlockingChannel takes the next basic.ack/nack as the answer to the publish it waits
    for, whatever its delivery tag: one confirm too many (a duplicate, or one for a publish
    already settled) would shift every later answer by one, and the publish in flight at the
    next loss would count as confirmed though it was nacked. So every confirm is checked
    against the one publish outstanding (its sequence number in this channel)."""

    ids = itertools.count()

    def __init__(self, name: str, endpoint: Endpoint, ledger: Ledger) -> None:
        super().__init__(name, endpoint, ledger)
        self.retry: collections.deque[str] = collections.deque()  # unconfirmed ids, published again first

    def session(self, conn: pika.BlockingConnection) -> None:
        ch = conn.channel()
        ch.confirm_delivery()
        confirms = ConfirmSequence()

        def check_confirm(frame) -> None:  # type: ignore[no-untyped-def]
            method = frame.method
            error = confirms.confirm(method.NAME, method.delivery_tag, method.multiple)
            if error:
                self.ledger.numbering_error(self.name_, error)

        # Beside the BlockingChannel's own callback (internal API: pika has no public hook).
        for confirm in (pika.spec.Basic.Ack, pika.spec.Basic.Nack):
            ch._impl.callbacks.add(ch.channel_number, confirm, check_confirm, one_shot=False)
        props = pika.BasicProperties(delivery_mode=2)
        while not self.stop.is_set():
            message_id = self.retry.popleft() if self.retry else f"{self.name_}-{next(self.ids)}"
            self.ledger.attempt(message_id)
            confirms.published()
            self.ledger.enter(self.name_, "publish")
            try:
                ch.basic_publish("", self.endpoint.queue, message_id.encode(), props)
            except pika.exceptions.NackError as e:
                self.ledger.settle(message_id, "nacked")
                self.ledger.error(self.name_, "publish", e)
                self.retry.append(message_id)
                continue
            except BaseException:
                self.ledger.settle(message_id, "failed")
                self.retry.append(message_id)
                raise
            finally:
                self.ledger.leave(self.name_)
            self.ledger.settle(message_id, "confirmed")
            conn.process_data_events(0)  # dispatch connection.blocked/unblocked callbacks


class Consumer(Client):
    """Consumes with manual acks; records every delivery's id, then acks it.

    A channel's delivery tags are 1, 2, 3... (RabbitMQ numbers every delivery on a channel,
    and the proxy keeps the numbering across a recovery): a gap is a delivery dropped on the
    way, a repeat would make an ack settle another message."""

    def __init__(self, name: str, endpoint: Endpoint, ledger: Ledger, delay: float = 0.0) -> None:
        super().__init__(name, endpoint, ledger)
        self.delay = delay  # s per message: a slow consumer

    def session(self, conn: pika.BlockingConnection) -> None:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=CONSUMER_PREFETCH)
        tags = DeliverySequence()

        def on_message(channel, method, _props, body):  # type: ignore[no-untyped-def]
            error = tags.delivered(method.delivery_tag)
            if error:
                self.ledger.numbering_error(self.name_, f"{error} (message {body.decode()})")
            self.ledger.consume(body.decode())
            # pika dispatches every delivery that arrives meanwhile before returning: a slow
            # consumer stops being slow when told to stop, or it would never return.
            if self.delay and not self.stop.is_set():
                time.sleep(self.delay)
            channel.basic_ack(method.delivery_tag)

        ch.basic_consume(self.endpoint.queue, on_message)
        while not self.stop.is_set():
            conn.process_data_events(time_limit=0.2)


class Workload:
    """Publishers and consumers started and stopped together."""

    def __init__(
        self,
        endpoint: Endpoint,
        publishers: int = 2,
        consumers: int = 2,
        consumer_delay: float = 0.0,
        reconnect: bool = True,
    ):
        self.ledger = Ledger()
        self.clients: list[Client] = [Publisher(f"chaos-pub-{i}", endpoint, self.ledger) for i in range(publishers)] + [
            Consumer(f"chaos-con-{i}", endpoint, self.ledger, delay=consumer_delay) for i in range(consumers)
        ]
        for client in self.clients:
            client.reconnect = reconnect

    def start(self) -> None:
        for client in self.clients:
            client.start()

    def stop(self, timeout: float, drain: float = 0.0) -> dict[str, str]:
        """Stop every client; those still stuck after `timeout`, with where they are stuck.

        `drain` > 0: publishers stop first, and consumers get up to `drain` s to consume every
        confirmed message (they stop early once they have, or after 3 s without a delivery), so
        that a confirmed message still in the queue afterwards is one no consumer was given."""
        deadline = time.monotonic() + timeout
        consumers = [c for c in self.clients if isinstance(c, Consumer)]
        if drain > 0 and any(c.is_alive() for c in consumers):
            for client in self.clients:
                if not isinstance(client, Consumer):
                    client.stop.set()
            for client in self.clients:
                if not isinstance(client, Consumer):
                    client.join(max(0.0, deadline - time.monotonic()))
            until = time.monotonic() + drain
            last_count, last_change = -1, time.monotonic()
            while time.monotonic() < until:
                with self.ledger.lock:
                    confirmed = {m for m, o in self.ledger.outcome.items() if o == "confirmed"}
                    missing = len(confirmed - self.ledger.consumed)
                    count = len(self.ledger.consumed)
                if not missing:
                    break
                if count != last_count:
                    last_count, last_change = count, time.monotonic()
                elif time.monotonic() - last_change > 3.0:
                    break
                time.sleep(0.1)
        for client in self.clients:
            client.stop.set()
        for client in self.clients:
            client.join(max(0.0, deadline - time.monotonic()))
        frames = sys._current_frames()
        return {
            c.name_: " <- ".join(
                f"{f.name}:{f.lineno}" for f in reversed(traceback.extract_stack(frames[c.ident])[-6:])
            )
            for c in self.clients
            if c.is_alive() and c.ident in frames
        }
