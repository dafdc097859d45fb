"""Locust users that speak AMQP 0-9-1 through py-amqp (imported by the scenario locustfiles).

Only Locust processes import this module: Locust monkey-patches the standard library with
gevent before a locustfile is loaded, so py-amqp's blocking socket calls yield to other
users. Never import it from the pytest process or from ``loadtests/run.py``.

Every AMQP operation is reported to Locust's ``request`` event (request type ``amqp``,
the operation as the name) with its response time in ms and, on failure, the exception:

=============================== ==============================================================
name                            what is timed
=============================== ==============================================================
``connect``                     TCP connect + AMQP handshake up to Connection.OpenOk
``connect (refused by limit)``  a handshake the server closed with 530/506 naming a limit
                                (``--max-connections``): expected in the storm scenario, so
                                a *success* of its own type, never a failure
``channel open``                Channel.Open -> OpenOk
``publish``                     Basic.Publish without confirms (time to hand it to the socket)
``publish (confirm)``           Basic.Publish on a confirm channel, until the broker's ack
``consume latency``             end-to-end: the body starts with the publisher's
                                ``time.time_ns()``; response time = receive time - that stamp
``get``                         Basic.Get -> GetOk/GetEmpty
``ack``                         Basic.Ack (asynchronous: time to write it)
``close``                       Connection.Close -> CloseOk
``cycle``                       connect + channel + publish 1 + close (churn scenarios)
=============================== ==============================================================

A failed operation is reported, the user's connection is dropped (the next task reconnects,
after a short backoff that doubles per consecutive failure up to 1 s), and the task ends with
``RescheduleTask`` so that no failure is counted twice as a Locust "error".

Environment read by the users (set by ``loadtests/run.py``): ``LOADTEST_QUEUE`` (queue
name), ``LOADTEST_QUEUE_ARGS`` (JSON arguments for its declaration), ``LOADTEST_RATE``
(messages/s per publishing user), ``LOADTEST_HOLD`` (seconds a storm user keeps its
connection), ``LOADTEST_BODY`` (body bytes).
"""

from __future__ import annotations

import json
import os
import struct
import time
from contextlib import contextmanager
from urllib.parse import unquote, urlparse

import amqp
from locust import User, events
from locust.exception import RescheduleTask
from locust.runners import WorkerRunner

REQUEST_TYPE = "amqp"
STAMP = struct.Struct(">q")
QUEUE = os.environ.get("LOADTEST_QUEUE", "amqproxy-locust")
QUEUE_ARGS = json.loads(os.environ.get("LOADTEST_QUEUE_ARGS", "{}") or "{}")
RATE = float(os.environ.get("LOADTEST_RATE", "50"))
HOLD = float(os.environ.get("LOADTEST_HOLD", "2"))
BODY_SIZE = int(os.environ.get("LOADTEST_BODY", "1024"))

LIMIT_CODES = (506, 530)


def parse_amqp_url(url: str | None) -> dict:
    """amqp://user:pass@host:port/vhost -> py-amqp Connection keyword arguments."""
    u = urlparse(url or "amqp://guest:guest@127.0.0.1:5673/")
    if u.scheme not in ("amqp", ""):
        raise ValueError(f"only amqp:// hosts are supported, not {url!r}")
    path = u.path[1:] if u.path.startswith("/") else u.path
    return {
        "host": f"{u.hostname or '127.0.0.1'}:{u.port or 5672}",
        "userid": unquote(u.username or "guest"),
        "password": unquote(u.password or "guest"),
        "virtual_host": unquote(path) if path else "/",
    }


def is_limit_refusal(exc: BaseException) -> bool:
    """A Connection.Close during the handshake that names a connection limit."""
    code = getattr(exc, "reply_code", None)
    text = str(getattr(exc, "reply_text", None) or exc).lower()
    return code in LIMIT_CODES and "limit" in text


def stamped_body(size: int = BODY_SIZE) -> bytes:
    return STAMP.pack(time.time_ns()) + b"x" * max(0, size - STAMP.size)


# --------------------------------------------------------------------------
# queue set-up, once per test, on the master (or the only) process
# --------------------------------------------------------------------------


def _admin_call(host: str | None, fn) -> None:
    conn = amqp.Connection(**parse_amqp_url(host), connect_timeout=10, heartbeat=0)
    try:
        conn.connect()
        fn(conn.channel())
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - best effort
            conn.collect()


@events.test_start.add_listener
def _declare_queue(environment, **_kw):
    if isinstance(environment.runner, WorkerRunner):
        return
    args = {"x-expires": 300_000, **QUEUE_ARGS}
    try:
        _admin_call(
            environment.host, lambda ch: ch.queue_declare(QUEUE, durable=False, auto_delete=False, arguments=args)
        )
    except Exception as e:  # noqa: BLE001 - the users will report their own failures
        environment.events.request.fire(
            request_type=REQUEST_TYPE, name="setup: queue.declare", response_time=0, response_length=0, exception=e
        )


@events.test_stop.add_listener
def _delete_queue(environment, **_kw):
    if isinstance(environment.runner, WorkerRunner) or os.environ.get("LOADTEST_KEEP_QUEUE"):
        return
    try:
        _admin_call(environment.host, lambda ch: ch.queue_delete(QUEUE))
    except Exception:  # noqa: BLE001 - x-expires removes it anyway
        pass


@events.quitting.add_listener
def _write_final_stats(environment, **_kw):
    """Locust rewrites ``_stats.csv`` only periodically; the runner reads these final numbers."""
    path = os.environ.get("LOADTEST_FINAL_STATS")
    if not path or isinstance(environment.runner, WorkerRunner):
        return
    stats = environment.runner.stats
    rows = []
    for entry in [*stats.entries.values(), stats.total]:
        rows.append(
            {
                "name": "Aggregated" if entry is stats.total else entry.name,
                "type": entry.method or "",
                "requests": entry.num_requests,
                "failures": entry.num_failures,
                "rps": entry.total_rps,
                "p50": entry.get_response_time_percentile(0.5) if entry.num_requests else 0,
                "p95": entry.get_response_time_percentile(0.95) if entry.num_requests else 0,
                "p99": entry.get_response_time_percentile(0.99) if entry.num_requests else 0,
                "max": entry.max_response_time or 0,
            }
        )
    with open(path, "w") as f:
        json.dump({"stats": rows, "exceptions": sum(e["count"] for e in environment.runner.exceptions.values())}, f)


# --------------------------------------------------------------------------
# the base user
# --------------------------------------------------------------------------


class AmqpUser(User):
    """Base class: one AMQP connection (and channel) per user, operations reported to Locust."""

    abstract = True
    confirm = False  # open the connection with publisher confirms (py-amqp confirm_publish)
    heartbeat = 0

    def __init__(self, environment):
        super().__init__(environment)
        self.params = parse_amqp_url(self.host)
        self.conn: amqp.Connection | None = None
        self.ch: amqp.Channel | None = None
        self.failures_in_row = 0

    # -- reporting -----------------------------------------------------------
    def report(self, name: str, response_time_ms: float, length: int = 0, exc: BaseException | None = None) -> None:
        self.environment.events.request.fire(
            request_type=REQUEST_TYPE,
            name=name,
            response_time=response_time_ms,
            response_length=length,
            exception=exc,
            context={},
        )

    @contextmanager
    def op(self, name: str, length: int = 0):
        """Time the block as one operation; on failure report it, drop the connection and
        end the task (RescheduleTask)."""
        start = time.perf_counter()
        try:
            yield
        except RescheduleTask:
            raise
        except Exception as e:  # noqa: BLE001 - every failure is reported
            self.report(name, (time.perf_counter() - start) * 1000, length, e)
            self.failed()
            raise RescheduleTask() from e
        self.report(name, (time.perf_counter() - start) * 1000, length)
        self.failures_in_row = 0

    def failed(self) -> None:
        self.drop()
        self.failures_in_row += 1
        time.sleep(min(1.0, 0.05 * 2 ** min(self.failures_in_row, 5)))

    # -- connection ------------------------------------------------------------
    def connect(self, channel: bool = True) -> None:
        """connect (+ channel open); a refusal by a connection limit is reported as its own
        successful request type and ends the task."""
        start = time.perf_counter()
        conn = amqp.Connection(
            **self.params,
            heartbeat=self.heartbeat,
            connect_timeout=15,
            read_timeout=30,
            write_timeout=30,
            confirm_publish=self.confirm,
            client_properties={"product": "amqproxy-locust"},
        )
        try:
            conn.connect()
        except Exception as e:  # noqa: BLE001
            elapsed = (time.perf_counter() - start) * 1000
            conn.collect()
            if is_limit_refusal(e):
                self.report("connect (refused by limit)", elapsed)
                time.sleep(0.2)
                raise RescheduleTask() from e
            self.report("connect", elapsed, exc=e)
            self.failed()
            raise RescheduleTask() from e
        self.report("connect", (time.perf_counter() - start) * 1000)
        self.conn = conn
        if channel:
            with self.op("channel open"):
                self.ch = conn.channel()

    def close(self) -> None:
        conn, self.conn, self.ch = self.conn, None, None
        if conn is None:
            return
        start = time.perf_counter()
        try:
            conn.close()
        except Exception as e:  # noqa: BLE001
            conn.collect()
            self.report("close", (time.perf_counter() - start) * 1000, exc=e)
            return
        self.report("close", (time.perf_counter() - start) * 1000)

    def drop(self) -> None:
        """Forget the connection without a network round trip (after a failure)."""
        conn, self.conn, self.ch = self.conn, None, None
        if conn is not None:
            try:
                if conn.connected and conn.transport is not None:
                    conn.transport.close()
            except Exception:  # noqa: BLE001
                pass
            try:
                conn.collect()
            except Exception:  # noqa: BLE001
                pass

    def ensure_connected(self) -> None:
        if self.conn is None or self.ch is None or not self.conn.connected:
            self.drop()
            self.connect()
            self.on_connected()

    def on_connected(self) -> None:
        """Per-connection set-up (consume, qos, ...) after a (re)connect."""

    def on_stop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001
                self.drop()
            self.conn = self.ch = None

    # -- operations -------------------------------------------------------------
    def publish(self, body: bytes | None = None) -> None:
        body = body if body is not None else stamped_body()
        name = "publish (confirm)" if self.confirm else "publish"
        with self.op(name, len(body)):
            # with confirm_publish, py-amqp waits for the broker's ack (a nack raises)
            self.ch.basic_publish(amqp.Message(body), exchange="", routing_key=QUEUE)

    def get(self) -> None:
        with self.op("get"):
            msg = self.ch.basic_get(QUEUE, no_ack=False)
        if msg is not None:
            with self.op("ack"):
                self.ch.basic_ack(msg.delivery_tag)

    def cycle(self) -> None:
        """The short-lived client: connect, channel, publish 1 message, close."""
        start = time.perf_counter()
        self.connect()
        self.publish(b"x" * BODY_SIZE)
        self.close()
        self.report("cycle", (time.perf_counter() - start) * 1000)


class ConsumerUser(AmqpUser):
    """basic.consume with manual acks; reports consume latency (from the body's stamp) and acks."""

    abstract = True
    prefetch = 100

    def on_connected(self) -> None:
        with self.op("consume setup"):
            self.ch.basic_qos(0, self.prefetch, False)
            self.ch.basic_consume(QUEUE, callback=self._on_message, no_ack=False)

    def _on_message(self, msg: amqp.Message) -> None:
        now = time.time_ns()
        body = msg.body if isinstance(msg.body, bytes | bytearray) else bytes(msg.body, "latin-1")
        if len(body) >= STAMP.size:
            (stamp,) = STAMP.unpack_from(body)
            self.report("consume latency", (now - stamp) / 1e6, len(body))
        with self.op("ack"):
            self.ch.basic_ack(msg.delivery_tag)

    def consume_for(self, seconds: float = 1.0) -> None:
        self.ensure_connected()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.conn.drain_events(timeout=min(left, 0.5))
            except TimeoutError:
                continue
            except RescheduleTask:
                raise
            except Exception as e:  # noqa: BLE001 - lost connection / channel closed
                self.report("consume", 0, exc=e)
                self.failed()
                raise RescheduleTask() from e
