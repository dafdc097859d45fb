"""Random bytes at a live proxy while well-behaved clients keep working with nothing lost.

Well-behaved pika clients (publishers with confirms, consumers with manual acks) move
checksummed messages through the proxy. Meanwhile hostile connections, on the same vhost and
user and so on the same pooled upstream connections, throw at the proxy: random garbage, a valid
protocol header then garbage, a truncated real handshake, and a real client's captured frame
stream (recorded through a relay) replayed with its handshake intact and the rest mutated.

Asserts: every confirmed message is consumed exactly once (by checksum); no well-behaved client
sees an error; every hostile connection the proxy closes is closed within a bound and counted in
/metrics; afterwards no session, channel or handshake is left over; the proxy is alive and its
log holds no traceback. Deterministic: the hostile traffic comes from a seeded generator per
worker (set AMQPROXY_TEST_FUZZ_SEED to explore other seeds, AMQPROXY_TEST_FUZZ_SECONDS for a
longer hostile phase: the crossing-close leak of test_channel_close.py showed in 4 of 13 runs of
40 s, rarely in one of 8 s).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
import urllib.request

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from amqproxy.protocol import constants as c
from amqproxy.protocol.codec import decode_method, method_id
from amqproxy.protocol.errors import ProtocolError
from amqproxy.protocol.frames import FrameReader

from ._support import pika_drain, shutdown_both, wait_until

SEED = int(os.environ.get("AMQPROXY_TEST_FUZZ_SEED", "20261126"))
HOSTILE_PHASE = float(os.environ.get("AMQPROXY_TEST_FUZZ_SECONDS", "8"))  # of hostile traffic (and publishing)

pytestmark = [pytest.mark.integration, pytest.mark.proxy_only, pytest.mark.timeout(82 + HOSTILE_PHASE)]

HANDSHAKE_TIMEOUT = 2.0
CLOSE_OK_WAIT = 3.0  # the proxy waits this long for our Close-Ok before closing the socket
HOSTILE_WORKERS = 6
# A connection the proxy has not closed by then is one it has no reason to close (the mutations
# left valid AMQP): we close it ourselves.
QUIET_WAIT = HANDSHAKE_TIMEOUT + 1.5
CLOSE_BOUND = CLOSE_OK_WAIT + 2.0  # from the proxy's Connection.Close to the socket's end

# A traceback the lead knows about (see test_hostile.py::test_short_method_frame_is_501, xfail):
# a method frame shorter than its class and method ids. Counted, not failed on.
KNOWN_TRACEBACKS: tuple[str, ...] = ()  # signatures of proxy bugs still open (none)


# ---------------------------------------------------------------------------- helpers


def scrape(proc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/metrics", timeout=10) as response:
        body = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def total(samples, name: str, exclude: dict[str, set[str]] | None = None) -> float:
    """Sum of a counter over all its label sets, but those whose labels are in `exclude`."""
    out = 0.0
    for (sample_name, labels), value in samples.items():
        if sample_name != name:
            continue
        if exclude and any(dict(labels).get(key) in values for key, values in exclude.items()):
            continue
        out += value
    return out


def proxy_initiated_closes(samples) -> float:
    """Connections the proxy refused or closed itself (not the client's own leaving)."""
    return total(samples, "amqproxy_client_connections_refused_total") + total(
        samples, "amqproxy_client_connections_closed_total", exclude={"reason": {"client", "socket_error"}}
    )


def capture_client_stream(proc, vhost: str) -> tuple[bytes, bytes]:
    """What a real client (pika) sends in a typical session, recorded by a relay in front of the
    proxy: (protocol header through Connection.Open, everything after)."""
    listener = socket.create_server(("127.0.0.1", 0))
    recorded = bytearray()

    def relay():
        client, _ = listener.accept()
        upstream = socket.create_connection((proc.host, proc.port))

        def pipe(src, dst, record):
            try:
                while data := src.recv(65536):
                    if record:
                        recorded.extend(data)
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                shutdown_both(src, dst)

        back = threading.Thread(target=pipe, args=(upstream, client, False), daemon=True)
        back.start()
        pipe(client, upstream, True)
        back.join(5)
        client.close()
        upstream.close()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    params = pika.ConnectionParameters(
        host="127.0.0.1",
        port=listener.getsockname()[1],
        virtual_host=vhost,
        credentials=pika.PlainCredentials("guest", "guest"),
        heartbeat=0,  # a replayed session must not be closed for silence
        socket_timeout=5,
        stack_timeout=10,
    )
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.basic_qos(prefetch_count=10)
    queue = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
    ch.queue_bind(queue, "amq.direct", routing_key=queue)
    ch.confirm_delivery()
    for i in range(3):
        properties = pika.BasicProperties(
            content_type="application/octet-stream",
            headers={"n": i, "tag": "fuzz", "nested": {"list": [1, "x", True]}},
            delivery_mode=1,
            message_id=f"m{i}",
            timestamp=1_700_000_000 + i,
        )
        ch.basic_publish("amq.direct", queue, bytes(range(256)) * (i + 1), properties)
    got = []
    ch.basic_consume(queue, lambda ch_, method, props, body: (got.append(body), ch_.basic_ack(method.delivery_tag)))
    assert pika_drain(conn, lambda: len(got) == 3, timeout=10)
    ch2 = conn.channel()
    ch2.tx_select()
    ch2.basic_publish("", queue, b"in a transaction")
    ch2.tx_commit()
    ch2.close()
    ch.close()
    conn.close()
    thread.join(10)
    listener.close()
    stream = bytes(recorded)
    assert stream.startswith(c.PROTOCOL_HEADER)
    reader = FrameReader(c.PRE_TUNE_FRAME_MAX)
    reader.feed(stream[8:])
    while (frame := reader.next_frame()) is not None:
        _type, _channel, start, end = frame
        if method_id(bytes(reader.buffer[start:end])) == c.CONNECTION_OPEN:
            split = 8 + end + 1
            return stream[:split], stream[split:]
    raise AssertionError("no Connection.Open in the captured stream")


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randrange(len(out) + 1)
        action = rng.choice(["flip", "flip", "insert", "delete", "duplicate", "truncate", "swap-frames"])
        if action == "flip" and where < len(out):
            out[where] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        elif action == "insert":
            out[where:where] = rng.randbytes(rng.randint(1, 16))
        elif action == "delete":
            del out[where : where + rng.randint(1, 16)]
        elif action == "duplicate":
            size = rng.randint(1, 64)
            out[where:where] = out[max(0, where - size) : where]
        elif action == "truncate":
            del out[where:]
        elif action == "swap-frames" and len(out) > 16:
            a, b = sorted(rng.sample(range(len(out)), 2))
            out = out[:a] + out[b:] + out[a:b]
    return bytes(out)


def hostile_payload(rng: random.Random, handshake: bytes, session: bytes) -> tuple[str, bytes]:
    kind = rng.choices(["garbage", "header-garbage", "mutated-session", "truncated-handshake"], [2, 2, 5, 1])[0]
    if kind == "garbage":
        return kind, rng.randbytes(rng.randint(1, 4096))
    if kind == "header-garbage":
        return kind, c.PROTOCOL_HEADER + rng.randbytes(rng.randint(1, 4096))
    if kind == "mutated-session":
        return kind, mutate(rng, session)  # sent once the handshake is through
    return kind, handshake[: rng.randrange(1, len(handshake))]


def connection_close_in(received: bytes) -> int | str | None:
    """Among the frames the proxy sent: the reply code of its Connection.Close, or "close-ok" when
    it answered a Connection.Close of ours (the mutated stream still held the client's own)."""
    if received.startswith(c.PROTOCOL_HEADER):
        return None
    reader = FrameReader(1 << 24)
    reader.feed(received)
    try:
        while (frame := reader.next_frame()) is not None:
            frame_type, channel, start, end = frame
            if frame_type == c.FRAME_METHOD and channel == 0:
                method, args = decode_method(bytes(reader.buffer[start:end]))
                if method == c.CONNECTION_CLOSE:
                    return args["reply_code"]
                if method == c.CONNECTION_CLOSE_OK:
                    return "close-ok"
    except (ProtocolError, ValueError) as exc:
        raise AssertionError(f"the proxy sent malformed frames: {exc}") from exc
    return None


def open_ok_in(received: bytes) -> bool:
    reader = FrameReader(1 << 24)
    reader.feed(received)
    while (frame := reader.next_frame()) is not None:
        frame_type, _channel, start, end = frame
        if frame_type == c.FRAME_METHOD and method_id(bytes(reader.buffer[start:end])) == c.CONNECTION_OPEN_OK:
            return True
    return False


def hostile_connection(proc, rng: random.Random, handshake: bytes, session: bytes) -> dict:
    kind, payload = hostile_payload(rng, handshake, session)
    answer_close = rng.random() < 0.5
    sock = socket.create_connection((proc.host, proc.port), timeout=5)
    received = bytearray()
    result = {"kind": kind, "outcome": None, "close_code": None}
    try:
        if kind == "mutated-session":
            # The real handshake first, up to Connection.OpenOk, as the captured client did. (Frames
            # pipelined behind Connection.Open wait for the client's next bytes: see
            # test_hostile.py::test_frames_pipelined_behind_connection_open_are_processed, xfail.)
            sock.sendall(handshake)
            while not open_ok_in(bytes(received)):
                data = sock.recv(65536)
                assert data, "the proxy closed a valid handshake"
                received.extend(data)
            received.clear()
        # Send in random pieces; the proxy may close while we write.
        pos = 0
        try:
            while pos < len(payload):
                step = rng.choice([1, 7, 64, 1500, len(payload)])
                sock.sendall(payload[pos : pos + step])
                pos += step
        except (BrokenPipeError, ConnectionResetError):
            pass
        deadline = time.monotonic() + QUIET_WAIT
        close_seen_at = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                assert close_seen_at is None, f"{kind}: Connection.Close sent but the socket stayed open"
                result["outcome"] = "still-open"  # valid AMQP after all: we leave
                break
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                result["outcome"] = "closed-by-proxy"
                if close_seen_at is not None:
                    assert time.monotonic() - close_seen_at < CLOSE_BOUND, kind
                break
            received.extend(data)
            if close_seen_at is None:
                code = connection_close_in(bytes(received))
                if code == "close-ok":
                    result["outcome"] = "client-closed"
                    break
                if code is not None:
                    result["close_code"] = code
                    close_seen_at = time.monotonic()
                    deadline = close_seen_at + CLOSE_BOUND
                    if answer_close:
                        try:
                            sock.sendall(b"\x01\x00\x00\x00\x00\x00\x04\x00\x0a\x00\x33\xce")  # Close-Ok
                        except OSError:
                            pass
    finally:
        sock.close()
    if result["close_code"] is not None:
        assert result["close_code"] in c.REPLY_NAMES and result["close_code"] >= 300, result
        assert result["outcome"] == "closed-by-proxy", result
    return result


# ---------------------------------------------------------------------------- well-behaved clients


def checksum_body(rng: random.Random, n: int) -> bytes:
    payload = f"{n}:".encode() + rng.randbytes(rng.randint(0, 20_000))
    return hashlib.sha256(payload).digest() + payload


def verified(body: bytes) -> bytes:
    digest, payload = body[:32], body[32:]
    assert hashlib.sha256(payload).digest() == digest, "a message body was corrupted"
    return digest


def publisher(target, vhost, queue, index, stop, confirmed, errors):
    rng = random.Random(SEED * 100 + index)
    try:
        conn = target.pika(virtual_host=vhost)
        ch = conn.channel()
        ch.confirm_delivery()
        n = 0
        while not stop.is_set():
            body = checksum_body(rng, n)
            ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=1), mandatory=True)
            confirmed.append(body[:32])  # basic_publish returned: the broker confirmed it
            n += 1
            if n % 20 == 0:
                time.sleep(0.01)
        conn.close()
    except Exception as exc:  # noqa: BLE001 - every failure of a well-behaved client is reported
        errors.append(f"publisher {index}: {exc!r}")


def consumer(target, vhost, queue, index, done, consumed, errors):
    try:
        conn = target.pika(virtual_host=vhost)
        ch = conn.channel()
        ch.basic_qos(prefetch_count=50)

        def on_message(channel, method, properties, body):
            consumed.append(verified(body))
            channel.basic_ack(method.delivery_tag)

        ch.basic_consume(queue, on_message)
        while not done.is_set():
            conn.process_data_events(time_limit=0.1)
        conn.close()
    except Exception as exc:  # noqa: BLE001
        errors.append(f"consumer {index}: {exc!r}")


# ---------------------------------------------------------------------------- the test


def test_random_bytes_at_a_live_proxy_while_clients_work(proxy_factory, temp_vhost):
    proc = proxy_factory("--handshake-timeout", str(HANDSHAKE_TIMEOUT))
    target = proc.target()
    vhost = temp_vhost
    setup = target.pika(virtual_host=vhost)
    queue = f"amqproxy-test-fuzz-live-{time.monotonic_ns()}"
    setup.channel().queue_declare(queue, auto_delete=False)
    setup.close()
    handshake, session = capture_client_stream(proc, vhost)

    before = scrape(proc)
    stop_publishing, stop_consuming = threading.Event(), threading.Event()
    confirmed: list[bytes] = []
    consumed: list[bytes] = []
    errors: list[str] = []
    results: list[dict] = []
    failures: list[str] = []
    threads = [
        threading.Thread(target=publisher, args=(target, vhost, queue, i, stop_publishing, confirmed, errors))
        for i in range(2)
    ] + [
        threading.Thread(target=consumer, args=(target, vhost, queue, i, stop_consuming, consumed, errors))
        for i in range(2)
    ]
    for thread in threads:
        thread.start()

    def hostile(index):
        rng = random.Random(SEED + index)
        end = time.monotonic() + HOSTILE_PHASE
        while time.monotonic() < end:
            try:
                results.append(hostile_connection(proc, rng, handshake, session))
            except AssertionError as exc:
                failures.append(str(exc))
            except OSError as exc:
                failures.append(f"hostile worker {index}: {exc!r}")

    hostiles = [threading.Thread(target=hostile, args=(i,)) for i in range(HOSTILE_WORKERS)]
    for thread in hostiles:
        thread.start()
    for thread in hostiles:
        thread.join(HOSTILE_PHASE + QUIET_WAIT + CLOSE_BOUND + 10)
    stop_publishing.set()
    for thread in threads[:2]:
        thread.join(15)

    # Every confirmed message is consumed exactly once, uncorrupted.
    wait_until(lambda: len(consumed) >= len(confirmed), timeout=15, msg="messages still missing")
    stop_consuming.set()
    for thread in threads[2:]:
        thread.join(15)
    assert not [t for t in threads + hostiles if t.is_alive()]
    assert not errors, errors
    assert not failures, failures[:10]
    assert len(confirmed) > 100
    assert sorted(consumed) == sorted(confirmed)

    # Every hostile connection ended; those the proxy closed are counted.
    outcomes: dict[str, int] = {}
    for result in results:
        key = f"{result['kind']}/{result['outcome']}"
        outcomes[key] = outcomes.get(key, 0) + 1
    assert len(results) >= 3 * HOSTILE_WORKERS, outcomes
    closed_by_proxy = sum(1 for r in results if r["outcome"] == "closed-by-proxy")
    assert closed_by_proxy >= len(results) // 2, outcomes

    def settled():
        stats = proc.admin_json("/stats")["totals"]
        return (
            stats["clients"] == 0
            and stats["client_channels"] == 0
            and stats["upstream_channels"] == 0
            and stats["handshaking_clients"] == 0
            and proc.admin_json("/healthz")["clients"] == 0
        )

    try:
        wait_until(settled, timeout=10, interval=0.1)
    except AssertionError:
        channels = [u.get("channel_list") for u in proc.admin_json("/upstreams?channels=1")["connections"]]
        raise AssertionError(
            f"sessions or channels left over: {proc.admin_json('/stats')}; upstream channels: {channels}"
        ) from None
    after = scrape(proc)
    # Closes the proxy decided: each hostile connection it closed, plus none of the well-behaved.
    assert proxy_initiated_closes(after) - proxy_initiated_closes(before) == closed_by_proxy, outcomes
    assert proc.alive
    records = proc.log_records()
    tracebacks = [r for r in records if r.get("exc_info")]
    unknown = [r for r in tracebacks if not any(sig in r["exc_info"] for sig in KNOWN_TRACEBACKS)]
    assert not unknown, unknown[0]["exc_info"]
    assert not [r for r in records if r.get("event") == "upstream_lost"]
    print(f"seed {SEED}: {len(results)} hostile connections {outcomes}; {len(confirmed)} messages; "
          f"{len(tracebacks)} known tracebacks")  # fmt: skip
