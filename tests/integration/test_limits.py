"""Client limits through the real proxy: global, per-address, per-user and per-vhost connection
limits, connection rates, alarm-only mode, live reload, the refusal delay, channel_max, a
client byte rate, slow readers and a connection storm. Real clients over real sockets."""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import aio_pika
import aiormq.exceptions
import amqp
import pamqp.body
import pamqp.commands as C
import pamqp.frame
import pamqp.header
import pika
import pika.exceptions
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ._support import RawAMQP, run_async, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.proxy_only]

TOKEN = "limits-token"
GLOBAL_TEXT = "RESOURCE_ERROR - proxy connection limit ({}) is reached (--max-connections)"


def http(proc, path: str, method: str = "GET"):
    request = urllib.request.Request(f"http://{proc.host}:{proc.http_port}{path}", method=method)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def metric(proc, name: str, **labels: str) -> float:
    status, body = http(proc, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def refusals(proc, limit: str, mode: str = "enforced") -> float:
    return metric(proc, "amqproxy_limit_refusals_total", limit=limit, mode=mode)


def events(proc, name: str) -> list[dict]:
    return [r for r in proc.log_records() if r.get("event") == name]


def pika_refusal(target, **kw) -> tuple[int, str, float]:
    """Connect with pika expecting a Connection.Close: (code, text, seconds it took)."""
    started = time.monotonic()
    with pytest.raises(pika.exceptions.AMQPConnectionError) as err:
        target.pika(**kw).close()
    elapsed = time.monotonic() - started
    # pika wraps the ConnectionClosedByBroker repr in its first argument.
    match = re.match(r"ConnectionClosedByBroker: \((\d+)\) (.*)$", str(err.value.args[0]), re.S)
    assert match, f"unexpected pika error {err.value!r}"
    return int(match.group(1)), ast.literal_eval(match.group(2)), elapsed


def roundtrip(conn, count: int = 10) -> None:
    ch = conn.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.confirm_delivery()
    for i in range(count):
        ch.basic_publish("", queue, b"m%d" % i)
    got = [ch.basic_get(queue, auto_ack=True)[2] for _ in range(count)]
    assert got == [b"m%d" % i for i in range(count)]
    ch.close()


def test_global_limit_refuses_after_the_delay_and_frees_slots(proxy_factory):
    proc = proxy_factory("--max-connections", "2", "--limit-refusal-delay", "0.5")
    target = proc.target()
    first, second = target.pika(), target.amqp()
    code, text, elapsed = pika_refusal(target)
    assert (code, text) == (506, GLOBAL_TEXT.format(2))
    assert 0.5 <= elapsed < 5
    with pytest.raises(amqp.exceptions.ResourceError) as err:
        target.amqp()
    assert (err.value.reply_code, err.value.reply_text) == (506, GLOBAL_TEXT.format(2))
    assert refusals(proc, "max_connections") == 2
    assert metric(proc, "amqproxy_client_connections_refused_total", reason="limit") == 2
    (record, _) = events(proc, "client_refused")
    assert record["limit"] == "max_connections" and record["reply_code"] == 506 and record["user"] == "guest"
    roundtrip(first)  # admitted clients carry on
    second.close()
    wait_until(lambda: len(proc.log_records()) and http(proc, "/stats")[0] == 200 and _clients(proc) == 1, timeout=5)
    third = target.pika()  # the slot was released
    roundtrip(third)
    third.close()
    first.close()


def _clients(proc) -> int:
    return json.loads(http(proc, "/stats")[1])["totals"]["clients"]


def test_refusal_delay_does_not_hold_up_other_clients(proxy_factory):
    proc = proxy_factory("--max-connections-per-user", "1", "--limit-refusal-delay", "4")
    target = proc.target()
    holder = target.pika()
    refused: list = []
    thread = threading.Thread(target=lambda: refused.append(pika_refusal(target)))
    thread.start()
    wait_until(lambda: json.loads(http(proc, "/stats")[1])["totals"]["handshaking_clients"] == 1, timeout=5)
    # While that client waits out its delay, guest's connection works and a slot frees at once.
    started = time.monotonic()
    roundtrip(holder)
    holder.close()
    other = target.pika()
    assert time.monotonic() - started < 2
    other.close()
    thread.join(15)
    (code, text, elapsed) = refused[0]
    assert code == 530 and "user connection limit (1)" in text and elapsed >= 4


def test_per_user_limit_counts_each_user(proxy_factory, temp_user):
    proc = proxy_factory("--max-connections-per-user", "2", "--limit-refusal-delay", "0.1")
    target = proc.target()
    held = [target.pika(), target.amqp()]
    code, text, _ = pika_refusal(target)
    assert code == 530
    assert text == (
        "NOT_ALLOWED - Connection refused for user 'guest': user connection limit (2) is reached "
        "(--max-connections-per-user)"
    )
    with pytest.raises(amqp.exceptions.NotAllowed) as err:
        target.amqp()
    assert err.value.reply_code == 530
    user, password = temp_user
    other = target.pika(user=user, password=password)  # another user has slots of its own
    roundtrip(other)
    other.close()
    assert refusals(proc, "max_connections_per_user") == 2
    for conn in held:
        conn.close()


def test_per_vhost_limit_with_aio_pika(proxy_factory, temp_vhost):
    proc = proxy_factory("--max-connections-per-vhost", "1", "--limit-refusal-delay", "0.1")
    target = proc.target()

    async def main():
        first = await aio_pika.connect(target.url(vhost=temp_vhost), timeout=10)
        try:
            # aiormq does not expect Connection.Close in reply to Connection.Open and reports
            # it as an invalid frame, as it does for RabbitMQ's own vhost limit.
            with pytest.raises(aiormq.exceptions.AMQPError) as err:
                await aio_pika.connect(target.url(vhost=temp_vhost), timeout=10)
            other_vhost = await aio_pika.connect(target.url(), timeout=10)  # "/" has its own count
            channel = await other_vhost.channel()
            queue = await channel.declare_queue(exclusive=True)
            await channel.default_exchange.publish(aio_pika.Message(b"hello"), routing_key=queue.name)
            message = await queue.get(timeout=5)
            assert message.body == b"hello"
            await other_vhost.close()
            return err.value
        finally:
            await first.close()

    error = run_async(main())
    assert type(error).__name__ == "InvalidFrameError" and "Connection.Close" in str(error)
    (record,) = events(proc, "client_refused")  # aiormq does not show the code and text: the log does
    assert record["reply_code"] == 530 and record["reply_text"] == (
        f"NOT_ALLOWED - access to vhost '{temp_vhost}' refused for user 'guest': connection limit (1) is reached "
        "(--max-connections-per-vhost)"
    )
    assert refusals(proc, "max_connections_per_vhost") == 1


def test_per_ip_limit(proxy_factory):
    proc = proxy_factory("--max-connections-per-ip", "1", "--limit-refusal-delay", "0.1")
    target = proc.target()
    held = target.pika()
    code, text, _ = pika_refusal(target)
    assert code == 530
    assert text == (
        "NOT_ALLOWED - connection refused for address '127.0.0.1': address connection limit (1) is reached "
        "(--max-connections-per-ip)"
    )
    held.close()


def test_connection_rate_per_user(proxy_factory):
    proc = proxy_factory("--connection-rate-per-user", "1", "--limit-refusal-delay", "0")
    target = proc.target()
    target.pika().close()
    code, text, _ = pika_refusal(target)  # the bucket holds one second of tokens: 1
    assert code == 530 and "connection rate limit (1/s) is reached (--connection-rate-per-user)" in text
    time.sleep(1.1)  # intrinsic: the bucket refills at one token per second
    target.pika().close()
    assert refusals(proc, "connection_rate_per_user") == 1


def test_connection_rate_per_ip_with_py_amqp(proxy_factory):
    proc = proxy_factory("--connection-rate-per-ip", "0.5", "--limit-refusal-delay", "0")
    before = refusals(proc, "connection_rate_per_ip")  # the readiness probe took the only token
    time.sleep(2.1)  # intrinsic: let the bucket (0.5/s, burst 1) refill after the readiness probe
    target = proc.target()
    target.amqp().close()
    with pytest.raises(amqp.exceptions.NotAllowed) as err:
        target.amqp()
    assert err.value.reply_code == 530
    assert err.value.reply_text == (
        "NOT_ALLOWED - connection refused for address '127.0.0.1': connection rate limit (0.5/s) is reached "
        "(--connection-rate-per-ip)"
    )
    assert refusals(proc, "connection_rate_per_ip") == before + 1


def test_alarm_only_admits_logs_and_counts(proxy_factory):
    proc = proxy_factory("--max-connections", "1", "--max-connections-per-ip", "1", "--limits-alarm-only", "all")
    target = proc.target()
    conns = [target.pika() for _ in range(3)]
    for conn in conns:
        roundtrip(conn, 2)
    assert refusals(proc, "max_connections", "alarm") == 2
    assert refusals(proc, "max_connections_per_ip", "alarm") == 2
    assert refusals(proc, "max_connections") == 0
    alarms = events(proc, "limit_alarm")
    assert len(alarms) == 4 and {a["limit"] for a in alarms} == {"max_connections", "max_connections_per_ip"}
    assert not events(proc, "client_refused")
    for conn in conns:
        conn.close()


def test_reload_changes_a_limit_live(proxy_factory, tmp_path):
    conf = tmp_path / "amqproxy.conf"
    conf.write_text("max-connections-per-user = 1\nlimit-refusal-delay = 0\n")
    proc = proxy_factory("--config", str(conf))
    target = proc.target()
    first = target.pika()
    assert pika_refusal(target)[0] == 530
    conf.write_text("max-connections-per-user = 2\nlimit-refusal-delay = 0\n")
    status, body = http(proc, "/reload", "POST")
    assert status == 200 and "--max-connections-per-user" in json.loads(body)["changed"]
    second = target.pika()  # admitted now
    assert pika_refusal(target)[0] == 530  # the third is not: both earlier connections count
    # Lowering the limit refuses new clients only; connected ones stay.
    conf.write_text("max-connections-per-user = 1\nlimit-refusal-delay = 0\n")
    assert http(proc, "/reload", "POST")[0] == 200
    roundtrip(first)
    roundtrip(second)
    second.close()
    assert pika_refusal(target)[0] == 530  # first still holds the only slot
    first.close()
    wait_until(lambda: _clients(proc) == 0, timeout=5)
    target.pika().close()


def test_channel_max_is_negotiated_and_enforced(proxy_factory):
    proc = proxy_factory("--channel-max", "3")
    with RawAMQP(proc.host, proc.port) as raw:
        _start, tune, reply = raw.handshake()
        assert tune.channel_max == 3 and isinstance(reply, C.Connection.OpenOk)
        for channel in (1, 2, 3):
            raw.send(C.Channel.Open(), channel)
            raw.expect(C.Channel.OpenOk, channel=channel)
        raw.send(C.Channel.Open(), 4)
        close = raw.expect(C.Connection.Close, channel=0)
        assert close.reply_code == 504 and "channel_max 3" in close.reply_text
    with RawAMQP(proc.host, proc.port) as raw:  # a client may not ask for more than offered
        _start, _tune, reply = raw.handshake(channel_max=4)
        assert isinstance(reply, C.Connection.Close) and reply.reply_code == 530


def test_client_byte_rate_slows_a_fast_publisher(proxy_factory, names, broker):
    proc = proxy_factory("--client-byte-rate", str(200 * 1024))
    target = proc.target()
    queue = names.queue("rate")
    conn = target.pika()
    ch = conn.channel()
    ch.queue_declare(queue)
    body = os.urandom(100 * 1024)
    started = time.monotonic()
    for _ in range(8):  # 800 KiB at 200 KiB/s, 200 KiB of burst: about 3 s
        ch.basic_publish("", queue, body)
    conn.process_data_events(time_limit=0)
    wait_until(lambda: broker.queue_message_count(queue) == 8, timeout=15, msg="messages lost")
    elapsed = time.monotonic() - started
    assert elapsed >= 2.5, f"800 KiB went through in {elapsed:.1f}s at 200 KiB/s"
    assert refusals(proc, "client_byte_rate") == 1  # counted once per connection
    (record,) = events(proc, "limit_throttle")
    assert record["limit"] == "client_byte_rate"
    conn.close()


@pytest.mark.timeout(180)
def test_connection_storm_global_limit_holds(proxy_factory):
    """300 concurrent connection attempts against --max-connections 50: never more than 50 are
    admitted, every other attempt gets 506 naming the limit, and the admitted ones publish and
    consume without losing a message."""
    limit, attempts, messages = 50, 300, 20
    proc = proxy_factory("--max-connections", str(limit), "--limit-refusal-delay", "0.5", "--handshake-timeout", "60")
    target = proc.target()
    lock = threading.Lock()
    admitted: list = []
    refused: list[tuple[int, str]] = []
    failed: list[str] = []
    attempted = threading.Semaphore(0)
    go = threading.Event()
    results: list[int] = []

    def client() -> None:
        try:
            conn = target.pika(socket_timeout=60, stack_timeout=90, blocked_connection_timeout=None)
        except pika.exceptions.AMQPConnectionError as exc:
            match = re.match(r"ConnectionClosedByBroker: \((\d+)\) (.*)$", str(exc.args[0] if exc.args else exc), re.S)
            with lock:
                if match:
                    refused.append((int(match.group(1)), ast.literal_eval(match.group(2))))
                else:
                    failed.append(repr(exc))
            attempted.release()
            return
        except Exception as exc:  # anything else is a failure of the test
            with lock:
                failed.append(repr(exc))
            attempted.release()
            return
        with lock:
            admitted.append(conn)
        attempted.release()
        try:
            go.wait(120)
            ch = conn.channel()
            queue = ch.queue_declare("", exclusive=True).method.queue
            ch.confirm_delivery()
            for i in range(messages):
                ch.basic_publish("", queue, b"%d" % i)
            got = []
            for method, _props, body in ch.consume(queue, auto_ack=True, inactivity_timeout=30):
                if method is None:
                    break
                got.append(body)
                if len(got) == messages:
                    break
            with lock:
                results.append(len(got) if got == [b"%d" % i for i in range(messages)] else -1)
            conn.close()
        except Exception as exc:
            with lock:
                failed.append(repr(exc))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(attempts)]
    for thread in threads:
        thread.start()
    most = 0
    deadline = time.monotonic() + 120
    done = 0
    while done < attempts and time.monotonic() < deadline:
        if attempted.acquire(timeout=0.2):
            done += 1
        if done % 25 == 0:
            most = max(most, _clients(proc))
    most = max(most, _clients(proc))
    assert done == attempts, f"only {done} attempts finished"
    go.set()
    for thread in threads:
        thread.join(120)
    assert not failed, failed[:5]
    assert len(admitted) == limit and most <= limit
    assert len(refused) == attempts - limit
    assert set(refused) == {(506, GLOBAL_TEXT.format(limit))}
    assert results == [messages] * limit
    assert refusals(proc, "max_connections") == attempts - limit
    assert len([r for r in events(proc, "client_refused") if r.get("limit") == "max_connections"]) == attempts - limit
    wait_until(lambda: _clients(proc) == 0, timeout=10)
    after = target.pika()  # every slot was released
    roundtrip(after)
    after.close()


# -- backpressure -----------------------------------------------------------


def _raw_with_small_receive_buffer(host: str, port: int) -> RawAMQP:
    """A RawAMQP whose socket takes little into the kernel: what it does not read stays in the proxy."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.settimeout(5)
    sock.connect((host, port))
    raw = RawAMQP.__new__(RawAMQP)
    raw.sock, raw.buf, raw.frame_sizes = sock, b"", []
    return raw


def _upstreams_of(proc, client_id: str) -> list[int]:
    return json.loads(http(proc, f"/connections/{client_id}")[1])["upstream_ids"]


def test_slow_reader_is_disconnected_after_the_grace_while_its_neighbour_keeps_consuming(proxy_factory, names):
    """A consumer that stops reading: past --client-buffer for --slow-client-grace it is dropped
    with a reason; a consumer on the same upstream connection gets every message meanwhile."""
    proc = proxy_factory("--client-buffer", str(4 * 1024 * 1024), "--slow-client-grace", "1")
    target = proc.target()
    slow_queue, fast_queue = names.queue("slow"), names.queue("fast")
    loader = target.pika()
    load = loader.channel()
    load.queue_declare(slow_queue)
    load.queue_declare(fast_queue)
    body = os.urandom(256 * 1024)
    for _ in range(40):  # 10 MiB: above the 4 MiB watermark, below the 16 MiB hard limit
        load.basic_publish("", slow_queue, body)

    fast = target.pika()
    fast_ch = fast.channel()
    got: list[bytes] = []
    fast_ch.basic_consume(fast_queue, lambda ch, method, props, b: got.append(b), auto_ack=True)
    fast.process_data_events(time_limit=0.2)

    slow = _raw_with_small_receive_buffer(proc.host, proc.port)
    slow.handshake()
    slow.send(C.Channel.Open(), 1)
    slow.expect(C.Channel.OpenOk, channel=1)
    slow.send(C.Basic.Qos(prefetch_count=40), 1)
    slow.expect(C.Basic.QosOk, channel=1)
    slow.send(C.Basic.Consume(queue=slow_queue), 1)
    slow.expect(C.Basic.ConsumeOk, channel=1)
    # From here on the slow client reads nothing.
    # /connections lists clients in the order they connected: loader, fast, slow.
    _loader_id, fast_id, slow_id = (c["id"] for c in json.loads(http(proc, "/connections")[1])["connections"])
    assert _upstreams_of(proc, slow_id) == _upstreams_of(proc, fast_id)  # the same upstream connection

    started = time.monotonic()
    for i in range(200):
        load.basic_publish("", fast_queue, b"%d" % i)
        fast.process_data_events(time_limit=0)
    assert pika_drain_until(fast, lambda: len(got) == 200, timeout=5), f"neighbour got {len(got)} of 200"
    assert time.monotonic() - started < 5
    wait_until(lambda: events(proc, "client_abort"), timeout=10, msg="slow client not disconnected")
    (abort,) = events(proc, "client_abort")
    assert abort["client_id"] == slow_id
    assert abort["reason"] == "slow client: more than 4194304 bytes waiting to be written for over 1 s"
    assert metric(proc, "amqproxy_client_connections_closed_total", reason="slow_client") == 1
    assert got == [b"%d" % i for i in range(200)]
    slow.close()
    roundtrip(fast)
    fast.close()
    loader.close()


def pika_drain_until(conn, predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        conn.process_data_events(time_limit=0.05)
    return True


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(120)
def test_fast_publisher_is_slowed_not_buffered(own_broker, proxy_factory, broker):
    """The broker stops reading (memory alarm): the publisher's socket stops being read once
    --upstream-buffer is reached; the proxy's memory stays bounded while the client tries to
    push 160 MiB, and everything it did send is delivered once the alarm clears."""
    proc = proxy_factory("--upstream", own_broker.upstream_url, "--upstream-buffer", str(1024 * 1024))
    target = own_broker.target()
    setup = target.pika()
    setup.channel().queue_declare("amqproxy-test-backpressure", arguments={"x-max-length-bytes": 1 << 30})
    setup.close()
    publisher = RawAMQP(proc.host, proc.port)
    publisher.handshake()
    publisher.send(C.Channel.Open(), 1)
    publisher.expect(C.Channel.OpenOk, channel=1)
    body = b"x" * (64 * 1024)  # one body frame: below frame_max
    message = (
        pamqp.frame.marshal(C.Basic.Publish(exchange="", routing_key="amqproxy-test-backpressure"), 1)
        + pamqp.frame.marshal(pamqp.header.ContentHeader(0, len(body), C.Basic.Properties()), 1)
        + pamqp.frame.marshal(pamqp.body.ContentBody(body), 1)
    )
    publisher.send_bytes(message)  # places the channel before the alarm
    wait_until(lambda: _queue_depth(own_broker) == 1, timeout=10, msg="first message not delivered")
    rss_before = _rss(proc.pid)
    own_broker.set_memory_alarm(True)
    try:
        publisher.sock.setblocking(False)
        sent = 0
        pending = memoryview(b"")
        deadline = time.monotonic() + 8
        stalled_since = None
        while sent < 160 * 1024 * 1024 and time.monotonic() < deadline:
            if not pending:
                pending = memoryview(message)
            try:
                n = publisher.sock.send(pending)
            except BlockingIOError:
                n = 0
            sent += n
            pending = pending[n:]
            if n == 0:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 2:
                    break  # the proxy has stopped reading us for 2 s
                time.sleep(0.01)
            else:
                stalled_since = None
        rss_growth = _rss(proc.pid) - rss_before
        assert stalled_since is not None, f"the proxy kept reading: {sent} bytes accepted"
        assert sent < 100 * 1024 * 1024, f"{sent} bytes accepted while the broker read nothing"
        assert rss_growth < 32 * 1024 * 1024, f"proxy RSS grew by {rss_growth} bytes"
    finally:
        own_broker.set_memory_alarm(False)
    publisher.sock.setblocking(True)
    if pending:
        publisher.sock.sendall(pending)
    expected = 1 + sent // len(message) + (1 if pending and len(pending) < len(message) else 0)
    wait_until(lambda: _queue_depth(own_broker) == expected, timeout=30, msg="messages lost")
    publisher.close()


def _queue_depth(node) -> int:
    conn = node.target().pika()
    try:
        return conn.channel().queue_declare("amqproxy-test-backpressure", passive=True).method.message_count
    finally:
        conn.close()
