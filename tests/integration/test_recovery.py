"""Transparent recovery (`--upstream-failure recover`) under real broker faults on a
RabbitMQ node of this module's own (`own_broker`; the shared broker is never disturbed).

The clients have NO recovery of their own (plain pika BlockingConnection, py-amqp): publishers
with confirms and consumers with manual acks run through the proxy while the node is stopped
and started, killed and restarted, or while the proxy's upstream TCP connections are cut.

- zero confirmed messages lost: every message confirmed to a publisher is consumed at least
  once by the end (duplicates allowed and counted);
- publishers see nacks, never a hang, for messages in flight at the loss;
- consumers never see a repeated or decreasing delivery tag, never a 406 for acking across the
  recovery;
- what cannot be recovered fails clearly (exclusive queue consumers are cancelled, tx channels
  closed), and an outage longer than --recovery-timeout ends in 320.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request

import amqp
import amqp.exceptions
import pamqp.commands as C
import pika
import pika.exceptions
import pytest

from ._support import RawAMQP, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.proxy_only]

HANG_BOUND = 45.0  # s: no publish may wait longer than this (recovery timeout + node start)
DRAIN_BOUND = 30.0  # s: every confirmed message consumed within this after the publisher stops
RECOVERY_ARGS = (
    "--recovery-timeout",
    "60",
    "--breaker-open-time",
    "0.5",
    "--breaker-open-max",
    "1",
    "--backoff-max",
    "0.5",
)


def connect(proc, **kw) -> pika.BlockingConnection:
    params = dict(
        host=proc.host,
        port=proc.port,
        credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=1,
        socket_timeout=30,
        stack_timeout=60,
        heartbeat=0,
    )
    params.update(kw)
    return pika.BlockingConnection(pika.ConnectionParameters(**params))


def metrics(proc) -> str:
    with urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/metrics", timeout=10) as response:
        return response.read().decode()


def metric(proc, name: str) -> float:
    total = 0.0
    for line in metrics(proc).splitlines():
        if line.startswith(name) and not line.startswith("#"):
            rest = line[len(name) :]
            if rest[:1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def recovery_logs(proc) -> list[dict]:
    return [r for r in proc.log_records() if r.get("event") == "recovery"]


class PikaPublisher(threading.Thread):
    """Publishes numbered persistent messages with confirms; a nacked number is published again."""

    def __init__(self, proc, queue: str) -> None:
        super().__init__(daemon=True)
        self.proc, self.queue = proc, queue
        self.stop = threading.Event()
        self.confirmed: set[int] = set()
        self.nacked: list[int] = []
        self.longest_wait = 0.0
        self.error: BaseException | None = None
        self.conn: pika.BlockingConnection | None = None

    def run(self) -> None:
        try:
            self.conn = conn = connect(self.proc)
            ch = conn.channel()
            ch.confirm_delivery()
            n = 0
            retry: list[int] = []
            while not self.stop.is_set():
                if retry:
                    number = retry.pop()
                else:
                    n += 1
                    number = n
                started = time.monotonic()
                try:
                    ch.basic_publish(
                        "", self.queue, str(number).encode(), pika.BasicProperties(delivery_mode=2), mandatory=True
                    )
                    self.confirmed.add(number)
                except pika.exceptions.NackError:
                    self.nacked.append(number)
                    retry.append(number)
                self.longest_wait = max(self.longest_wait, time.monotonic() - started)
                time.sleep(0.002)
            conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


class AmqpPublisher(PikaPublisher):
    """The same with py-amqp (confirm_publish=True: basic_publish selects confirms and waits for
    each one; a plain confirm_select() would not make it wait)."""

    def run(self) -> None:
        try:
            conn = amqp.Connection(
                host=f"{self.proc.host}:{self.proc.port}",
                userid="guest",
                password="guest",
                connect_timeout=10,
                confirm_publish=True,
            )
            conn.connect()
            ch = conn.channel()
            n = 0
            retry: list[int] = []
            while not self.stop.is_set():
                if retry:
                    number = retry.pop()
                else:
                    n += 1
                    number = n
                started = time.monotonic()
                try:
                    ch.basic_publish(
                        amqp.Message(str(number).encode(), delivery_mode=2),
                        routing_key=self.queue,
                        confirm_timeout=HANG_BOUND,
                    )
                    self.confirmed.add(number)
                except amqp.exceptions.MessageNacked:
                    self.nacked.append(number)
                    retry.append(number)
                self.longest_wait = max(self.longest_wait, time.monotonic() - started)
                time.sleep(0.002)
            conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


class PikaConsumer(threading.Thread):
    """Consumes with manual acks (one ack in three is a `multiple` ack), recording every tag."""

    def __init__(self, proc, queue: str, declare: bool = True) -> None:
        super().__init__(daemon=True)
        self.proc, self.queue, self.declare = proc, queue, declare
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.tags: list[int] = []
        self.bodies: list[int] = []
        self.redelivered = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = connect(self.proc)
            ch = conn.channel()
            if self.declare:
                ch.queue_declare(self.queue, durable=True)
            ch.basic_qos(prefetch_count=20)

            def on_message(channel, method, _props, body) -> None:
                self.tags.append(method.delivery_tag)
                self.bodies.append(int(body))
                self.redelivered += bool(method.redelivered)
                if method.delivery_tag % 3 == 0:
                    channel.basic_ack(method.delivery_tag, multiple=True)
                elif method.delivery_tag % 3 == 1:
                    channel.basic_ack(method.delivery_tag)
                # tags = 2 (mod 3) are acked by the next multiple ack

            ch.basic_consume(self.queue, on_message)
            self.ready.set()
            while not self.stop.is_set():
                conn.process_data_events(time_limit=0.1)
            conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.ready.set()


def run_fault(
    proc, queue: str, fault, after: int = 200, publisher_class=PikaPublisher
) -> tuple[PikaPublisher, PikaConsumer]:
    """Publisher and consumer through the proxy; `fault()` while they run; then until `after`
    more messages were confirmed, then drain. Returns both for the assertions."""
    consumer = PikaConsumer(proc, queue)
    consumer.start()
    assert consumer.ready.wait(20) and consumer.error is None, consumer.error
    publisher = publisher_class(proc, queue)
    publisher.start()
    wait_until(lambda: len(publisher.confirmed) > 100 and len(consumer.bodies) > 50, 20, msg="traffic flows")
    fault()
    before = len(publisher.confirmed)
    wait_until(
        lambda: len(publisher.confirmed) > before + after or publisher.error is not None,
        HANG_BOUND,
        msg=f"publishing resumes after the fault (nacked {publisher.nacked[:5]}...)",
    )
    publisher.stop.set()
    publisher.join(HANG_BOUND)
    assert not publisher.is_alive(), "publisher hangs"
    assert publisher.error is None, repr(publisher.error)
    wait_until(
        lambda: publisher.confirmed <= set(consumer.bodies) or consumer.error is not None,
        DRAIN_BOUND,
        msg=f"confirmed messages consumed: missing {sorted(publisher.confirmed - set(consumer.bodies))[:10]}",
    )
    consumer.stop.set()
    consumer.join(10)
    return publisher, consumer


def assert_transparent(publisher: PikaPublisher, consumer: PikaConsumer) -> None:
    assert consumer.error is None, repr(consumer.error)
    missing = publisher.confirmed - set(consumer.bodies)
    assert not missing, f"{len(missing)} confirmed messages never consumed: {sorted(missing)[:10]}"
    tags = consumer.tags
    assert all(b > a for a, b in zip(tags, tags[1:], strict=False)), "delivery tags repeated or decreased"
    assert publisher.longest_wait < HANG_BOUND
    # Duplicates (redeliveries of unacked messages) are allowed; they are counted here.
    duplicates = len(consumer.bodies) - len(set(consumer.bodies))
    print(
        f"confirmed {len(publisher.confirmed)}, nacked {len(publisher.nacked)}, consumed {len(consumer.bodies)} "
        f"({duplicates} duplicates, {consumer.redelivered} redelivered), longest publish {publisher.longest_wait:.2f}s"
    )


def assert_nacks_counted(proc, publisher) -> None:
    """Every nack the publisher saw was one the proxy sent for a publish in flight at a loss."""
    assert metric(proc, "amqproxy_recovery_publishes_nacked_total") == len(publisher.nacked)


@pytest.mark.timeout(120)
def test_stop_app_start_app_is_transparent(own_broker, proxy_factory):
    proc = proxy_factory("--upstream", own_broker.upstream_url, *RECOVERY_ARGS)
    queue = f"recovery-stop-{time.monotonic_ns()}"
    # Non-durable topology declared through the proxy: a stopped node forgets it, recovery re-declares it.
    topo = connect(proc)
    topo_ch = topo.channel()
    exchange, topo_queue = f"{queue}-x", f"{queue}-topo"
    topo_ch.exchange_declare(exchange, "fanout", durable=False, arguments={"alternate-exchange": "amq.direct"})
    topo_ch.queue_declare(topo_queue, durable=False, arguments={"x-max-length": 1000})
    topo_ch.queue_bind(topo_queue, exchange)

    def fault() -> None:
        own_broker.stop_app()
        time.sleep(1.0)
        own_broker.start_app()

    publisher, consumer = run_fault(proc, queue, fault)
    assert_transparent(publisher, consumer)
    assert_nacks_counted(proc, publisher)
    # The topology client's channel came back with its exchange, queue and binding.
    topo_ch.basic_publish(exchange, "", b"routed after recovery")
    wait_until(lambda: topo_ch.basic_get(topo_queue, auto_ack=True)[2] == b"routed after recovery", 10)
    topo.close()
    records = recovery_logs(proc)
    assert records and all(r["outcome"] == "recovered" for r in records), records
    assert metric(proc, "amqproxy_recoveries_total") >= 3
    assert metric(proc, "amqproxy_recovery_channels_recovered_total") >= 3


@pytest.mark.timeout(150)
def test_kill9_and_restart_is_transparent(own_broker, proxy_factory):
    proc = proxy_factory("--upstream", own_broker.upstream_url, *RECOVERY_ARGS)
    queue = f"recovery-kill-{time.monotonic_ns()}"

    def fault() -> None:
        own_broker.kill9()
        # A node name epmd still lists cannot be registered again: a restart right after the
        # kill would fail to boot.
        name = own_broker.nodename.split("@")[0]
        wait_until(lambda: f"name {name} " not in _epmd_names(), 10, 0.05, msg="epmd forgets the killed node")
        own_broker.restart()

    publisher, consumer = run_fault(proc, queue, fault, publisher_class=AmqpPublisher)
    assert_transparent(publisher, consumer)
    assert_nacks_counted(proc, publisher)
    assert metric(proc, "amqproxy_recoveries_total") >= 2


def _epmd_names() -> str:
    return subprocess.run(["epmd", "-names"], capture_output=True, text=True, timeout=10).stdout


def _cut_upstream_sockets(proc, broker_port: int) -> None:
    """Kill the proxy's TCP connections to the node (ss -K: the kernel resets them)."""
    out = subprocess.run(
        ["ss", "-K", "-tn", "dst", f"127.0.0.1:{broker_port}"], capture_output=True, text=True, timeout=10
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.timeout(90)
def test_upstream_tcp_cut_is_transparent(own_broker, proxy_factory):
    proc = proxy_factory("--upstream", own_broker.upstream_url, *RECOVERY_ARGS)
    queue = f"recovery-cut-{time.monotonic_ns()}"
    publisher, consumer = run_fault(proc, queue, lambda: _cut_upstream_sockets(proc, own_broker.port))
    assert_transparent(publisher, consumer)
    assert_nacks_counted(proc, publisher)
    records = recovery_logs(proc)
    assert records and all(r["outcome"] == "recovered" for r in records), records


@pytest.mark.timeout(60)
def test_exclusive_queue_consumer_is_cancelled_and_can_declare_again(own_broker, proxy_factory):
    proc = proxy_factory("--upstream", own_broker.upstream_url, *RECOVERY_ARGS)
    conn = amqp.Connection(host=f"{proc.host}:{proc.port}", userid="guest", password="guest", connect_timeout=10)
    conn.connect()
    ch = conn.channel()
    queue, _, _ = ch.queue_declare("", exclusive=True)
    cancelled: list[str] = []
    got: list[bytes] = []
    tag = ch.basic_consume(queue, callback=lambda m: got.append(m.body), on_cancel=cancelled.append, no_ack=True)
    own_broker.stop_app()
    own_broker.start_app()
    deadline = time.monotonic() + 30
    while not cancelled and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.2)
        except TimeoutError:
            pass
    assert cancelled == [tag]
    # The channel lives on: declare a new exclusive queue and consume from it.
    queue2, _, _ = ch.queue_declare("", exclusive=True)
    ch.basic_consume(queue2, callback=lambda m: got.append(m.body), no_ack=True)
    ch.basic_publish(amqp.Message(b"after"), routing_key=queue2)
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.2)
        except TimeoutError:
            pass
    assert got == [b"after"]
    conn.close()
    assert metric(proc, "amqproxy_recovery_consumers_cancelled_total") == 1


@pytest.mark.timeout(60)
def test_tx_channel_fails_clearly_and_others_recover(own_broker, proxy_factory):
    proc = proxy_factory("--upstream", own_broker.upstream_url, *RECOVERY_ARGS)
    conn = connect(proc)
    tx = conn.channel()
    tx.tx_select()
    tx.basic_publish("", "amqproxy-nowhere", b"uncommitted")
    plain = conn.channel()
    plain.queue_declare("", exclusive=True)  # the channel is really placed before the fault
    queue = f"recovery-tx-{time.monotonic_ns()}"
    own_broker.stop_app()
    own_broker.start_app()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        tx.tx_commit()
    assert err.value.reply_code == 406 and "transaction" in err.value.reply_text, err.value
    # The other channel of the same connection was recovered.
    plain.queue_declare(queue, auto_delete=True)
    plain.basic_publish("", queue, b"x")
    wait_until(lambda: plain.basic_get(queue, auto_ack=True)[2] == b"x", 10)
    conn.close()
    assert metric(proc, "amqproxy_recovery_channels_failed_total") >= 1


@pytest.mark.timeout(60)
def test_outage_longer_than_recovery_timeout_ends_in_320(own_broker, proxy_factory):
    proc = proxy_factory("--upstream", own_broker.upstream_url, "--recovery-timeout", "3", "--backoff-max", "0.5")
    conn = connect(proc)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish("", "amqproxy-nowhere", b"before")
    own_broker.stop_app()
    started = time.monotonic()
    try:
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as err:
            while time.monotonic() - started < 20:
                conn.process_data_events(time_limit=0.2)
        elapsed = time.monotonic() - started
    finally:
        own_broker.start_app()
    assert err.value.reply_code == 320, err.value
    assert "not recovered within 3 s" in err.value.reply_text, err.value.reply_text
    assert 2.5 < elapsed < 8, elapsed
    records = recovery_logs(proc)
    assert [r["outcome"] for r in records] == ["timeout"], records
    json.dumps(records)


@pytest.mark.timeout(60)
def test_requests_sent_during_the_gap_are_answered_once_in_order(own_broker, proxy_factory):
    """A client that declares queues while its channel is being recovered (its frames are held)
    gets each declare-ok exactly once, in order, and its consumer keeps its numbering."""
    proc = proxy_factory("--upstream", own_broker.upstream_url, *RECOVERY_ARGS)
    conn = connect(proc)
    ch = conn.channel()
    base = f"recovery-gap-{time.monotonic_ns()}"
    ch.queue_declare(base, durable=True)
    ch.basic_publish("", base, b"one", pika.BasicProperties(delivery_mode=2))
    first = wait_until(lambda: ch.basic_get(base)[0], 10)  # unacked delivery, tag 1
    declared: list[str] = []
    errors: list[BaseException] = []

    def declare_during_gap() -> None:
        try:
            for suffix in ("a", "b"):
                declared.append(ch.queue_declare(f"{base}-{suffix}", auto_delete=False).method.queue)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    own_broker.stop_app()
    worker = threading.Thread(target=declare_during_gap, daemon=True)
    try:
        worker.start()  # pika is not thread-safe: the main thread leaves `conn` alone meanwhile
        time.sleep(0.5)  # intrinsic: the declares must be sent while the node is down
        assert not declared, "answered while the node was down"
    finally:
        own_broker.start_app()
    worker.join(40)
    assert not worker.is_alive() and not errors, errors
    assert declared == [f"{base}-a", f"{base}-b"]
    ch.basic_ack(first.delivery_tag)  # from before the loss: dropped by the proxy, no 406
    method = wait_until(lambda: ch.basic_get(base)[0], 10)  # "one" again, requeued by the broker
    assert method.redelivered and method.delivery_tag > first.delivery_tag
    ch.basic_ack(method.delivery_tag)
    assert ch.queue_declare(base, passive=True).method.message_count == 0
    conn.close()
    assert metric(proc, "amqproxy_recovery_stale_acks_total") == 1


@pytest.mark.timeout(60)
def test_exclusive_consumer_without_cancel_notify_gets_its_channel_closed(own_broker, proxy_factory):
    """A client that did not advertise consumer_cancel_notify cannot take a basic.cancel: its
    channel is closed with a reply text naming the reason; its connection lives on."""
    proc = proxy_factory("--upstream", own_broker.upstream_url, *RECOVERY_ARGS)
    with RawAMQP(proc.host, proc.port, timeout=40) as raw:
        _start, _tune, reply = raw.handshake()
        assert isinstance(reply, C.Connection.OpenOk), reply
        raw.send(C.Channel.Open(), 1)
        raw.expect(C.Channel.OpenOk, 1)
        raw.send(C.Queue.Declare(queue="", exclusive=True), 1)
        queue = raw.expect(C.Queue.DeclareOk, 1).queue
        raw.send(C.Basic.Consume(queue=queue, consumer_tag="only"), 1)
        raw.expect(C.Basic.ConsumeOk, 1)
        own_broker.stop_app()
        try:
            close = raw.expect(C.Channel.Close, 1)
        finally:
            own_broker.start_app()
        assert close.reply_code == 404, close
        assert "consumer 'only' cannot be recovered" in close.reply_text and queue in close.reply_text, close
        raw.send(C.Channel.CloseOk(), 1)
        # The connection is fine: a new channel works once the node is back.
        raw.send(C.Channel.Open(), 2)
        raw.expect(C.Channel.OpenOk, 2)
        raw.send(C.Queue.Declare(queue="", exclusive=True), 2)
        raw.expect(C.Queue.DeclareOk, 2)
    assert metric(proc, "amqproxy_recovery_channels_failed_total") == 1
