"""The load the cluster tests run through the proxy: publishers with confirms, consumers with
manual acks and a prefetch, and churning clients (connect, publish a few, close), each a pika
BlockingConnection on a thread of its own, recording what they saw in one Ledger.

`reconnect=False` gives clients with no recovery of their own: the first error ends the client
(and is recorded), which is how the failover tests prove that the proxy hid the failure.
`reconnect=True` gives clients that reconnect after an error (the rolling-restart test counts
those reconnections and what caused them)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pika
import pika.exceptions

PREFETCH = 20
RECONNECT_DELAY = 0.1  # s between a reconnecting client's error and its next connect
PAUSE = 0.005  # s between a publisher's messages: a steady stream, not a flood on two cores


@dataclass
class ClientError:
    client: str
    at: float
    kind: str  # "close" (Connection.Close, with code and text), "tcp" (no Close), "connect"
    code: int | None
    text: str


def describe(exc: BaseException) -> tuple[str, int | None, str]:
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker | pika.exceptions.ChannelClosedByBroker):
        return "close", exc.reply_code, exc.reply_text
    if isinstance(exc, pika.exceptions.AMQPConnectionError) and not isinstance(exc, pika.exceptions.StreamLostError):
        return "connect", None, repr(exc)
    return "tcp", None, repr(exc)


@dataclass
class Ledger:
    """What every client saw, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    confirmed: set[str] = field(default_factory=set)
    nacked: int = 0
    consumed: set[str] = field(default_factory=set)
    duplicates: int = 0
    confirm_times: dict[str, list[float]] = field(default_factory=dict)  # per publisher
    delivery_times: dict[str, list[float]] = field(default_factory=dict)  # per consumer
    errors: list[ClientError] = field(default_factory=list)
    sessions: dict[str, int] = field(default_factory=dict)  # connections opened, per client
    longest_publish: float = 0.0  # s from basic.publish to its confirm (or nack)

    def error(self, client: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(ClientError(client, time.monotonic(), *describe(exc)))

    def longest_gap(self, times: dict[str, list[float]], start: float, end: float) -> float:
        """The longest time any client went without an event within [start, end]."""
        worst = 0.0
        with self.lock:
            series = [list(t) for t in times.values()]
        for events in series:
            marks = [start] + [t for t in events if start < t < end] + [end]
            worst = max(worst, max(b - a for a, b in zip(marks, marks[1:], strict=False)))
        return worst

    def missing(self) -> set[str]:
        with self.lock:
            return self.confirmed - self.consumed


class Client(threading.Thread):
    def __init__(self, name: str, connect: Callable[[str], pika.BlockingConnection], ledger: Ledger, reconnect: bool):
        super().__init__(name=name, daemon=True)
        self.client = name
        self.connect = connect
        self.ledger = ledger
        self.reconnect = reconnect
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            conn = None
            try:
                conn = self.connect(self.client)
                with self.ledger.lock:
                    self.ledger.sessions[self.client] = self.ledger.sessions.get(self.client, 0) + 1
                self.session(conn)
            except (pika.exceptions.AMQPError, OSError) as exc:
                self.ledger.error(self.client, exc)
                if not self.reconnect:
                    break
                self.stop.wait(RECONNECT_DELAY)
            finally:
                self.ready.set()
                if conn is not None and conn.is_open:
                    try:
                        conn.close()
                    except (pika.exceptions.AMQPError, OSError):
                        pass

    def session(self, conn: pika.BlockingConnection) -> None:
        raise NotImplementedError


class Publisher(Client):
    """Persistent messages with confirms, one at a time; a nacked or unconfirmed one is published
    again (same id) before the next."""

    def __init__(self, name, connect, ledger, reconnect, queue: str) -> None:
        super().__init__(name, connect, ledger, reconnect)
        self.queue = queue
        self.numbers = itertools.count()
        self.unconfirmed: str | None = None
        ledger.confirm_times[name] = []

    def session(self, conn: pika.BlockingConnection) -> None:
        ch = conn.channel()
        ch.confirm_delivery()
        self.ready.set()
        props = pika.BasicProperties(delivery_mode=2)
        while not self.stop.is_set():
            message = self.unconfirmed or f"{self.client}-{next(self.numbers)}"
            self.unconfirmed = message
            started = time.monotonic()
            try:
                ch.basic_publish("", self.queue, message.encode(), props)
            except pika.exceptions.NackError:
                with self.ledger.lock:
                    self.ledger.nacked += 1
                continue
            finally:
                waited = time.monotonic() - started
                with self.ledger.lock:
                    self.ledger.longest_publish = max(self.ledger.longest_publish, waited)
            now = time.monotonic()
            with self.ledger.lock:
                self.ledger.confirmed.add(message)
                self.ledger.confirm_times[self.client].append(now)
            self.unconfirmed = None
            time.sleep(PAUSE)


class Consumer(Client):
    """Consumes with manual acks and a prefetch, recording each delivery."""

    def __init__(self, name, connect, ledger, reconnect, queue: str) -> None:
        super().__init__(name, connect, ledger, reconnect)
        self.queue = queue
        ledger.delivery_times[name] = []

    def session(self, conn: pika.BlockingConnection) -> None:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=PREFETCH)

        def on_message(channel, method, _props, body):
            now = time.monotonic()
            message = body.decode()
            with self.ledger.lock:
                if message in self.ledger.consumed:
                    self.ledger.duplicates += 1
                self.ledger.consumed.add(message)
                self.ledger.delivery_times[self.client].append(now)
            channel.basic_ack(method.delivery_tag)

        ch.basic_consume(self.queue, on_message)
        self.ready.set()
        while not self.stop.is_set():
            conn.process_data_events(time_limit=0.1)


class Churner(Publisher):
    """A short-lived client, over and over: connect, publish `per_session` messages with
    confirms, close (the PHP/CGI pattern a pooling proxy is for)."""

    def __init__(self, name, connect, ledger, reconnect, queue: str, per_session: int = 5) -> None:
        super().__init__(name, connect, ledger, reconnect, queue)
        self.per_session = per_session

    def session(self, conn: pika.BlockingConnection) -> None:
        ch = conn.channel()
        ch.confirm_delivery()
        self.ready.set()
        props = pika.BasicProperties(delivery_mode=2)
        sent = 0
        while sent < self.per_session and not self.stop.is_set():
            message = self.unconfirmed or f"{self.client}-{next(self.numbers)}"
            self.unconfirmed = message
            try:
                ch.basic_publish("", self.queue, message.encode(), props)
            except pika.exceptions.NackError:
                with self.ledger.lock:
                    self.ledger.nacked += 1
                continue
            with self.ledger.lock:
                self.ledger.confirmed.add(message)
                self.ledger.confirm_times[self.client].append(time.monotonic())
            self.unconfirmed = None
            sent += 1
        conn.close()


def connector(host: str, port: int, heartbeat: int = 0) -> Callable[[str], pika.BlockingConnection]:
    """connect(client_name) -> a BlockingConnection named after the client. Generous client-side
    timeouts: the proxy, not pika, has to end any hang."""

    def connect(name: str) -> pika.BlockingConnection:
        return pika.BlockingConnection(
            pika.ConnectionParameters(
                host=host,
                port=port,
                credentials=pika.PlainCredentials("guest", "guest"),
                client_properties={"connection_name": name},
                heartbeat=heartbeat,
                socket_timeout=30,
                stack_timeout=60,
                blocked_connection_timeout=None,
                connection_attempts=1,
            )
        )

    return connect


def stop_all(clients: list[Client], timeout: float) -> list[str]:
    """Stop the clients; the names of those still running after `timeout`."""
    for client in clients:
        client.stop.set()
    deadline = time.monotonic() + timeout
    for client in clients:
        client.join(max(0.0, deadline - time.monotonic()))
    return [client.client for client in clients if client.is_alive()]
