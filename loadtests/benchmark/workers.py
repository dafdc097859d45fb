"""The load generator: one process per connection (fork), each running a worker function
(w_*) that connects to a target, reports ready, waits for the common start instant and
measures inside the window; `run_workers` starts a run's processes and collects their results.
The idle workload's workers have a driver of their own (workloads.run_idle)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import statistics
import struct
import time
import traceback
from collections.abc import Callable

import amqp
import pamqp.commands as pc

from .client import (
    ACK_ARGS,
    BASIC_ACK,
    BASIC_DELIVER,
    BASIC_NACK,
    FrameStream,
    RawAMQP,
    connect,
    encode_publish,
    raise_on_close,
)
from .report import percentile
from .targets import Target

READY_TIMEOUT = 20.0  # seconds for workers to connect and report ready
RESULT_GRACE = 20.0  # seconds past the planned end before a run is declared hung
LATENCY_TAIL = 0.5  # seconds the latency consumer keeps reading after the window


class WorkerCtx:
    """Handed to each worker: signal ready, then wait for the common start instant."""

    def __init__(self, idx: int, events: mp.Queue, go, t0):
        self.idx = idx
        self._events = events
        self._go = go
        self._t0 = t0

    def ready(self) -> float:
        self._events.put(("ready", self.idx, None))
        if not self._go.wait(READY_TIMEOUT + 5):
            raise RuntimeError("no start signal from the benchmark driver")
        start = self._t0.value
        delay = start - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return start


def _worker_entry(fn: Callable, idx: int, target: Target, params: dict, events, go, t0) -> None:
    # Die quietly on SIGTERM from the driver (hung run) instead of printing a traceback.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(3))
    try:
        result = fn(WorkerCtx(idx, events, go, t0), target, params)
        result["cpu_s"] = time.process_time()
        events.put(("done", idx, result))
    except BaseException:
        events.put(("error", idx, traceback.format_exc(limit=6)))


def _drain_until(conn: amqp.Connection, deadline: float) -> None:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            conn.drain_events(timeout=min(remaining, 0.5))
        except TimeoutError:
            pass


def w_consumer(ctx: WorkerCtx, target: Target, p: dict) -> dict:
    """Raw no-ack consumer; counts Basic.Deliver frames received inside the window."""
    raw = RawAMQP(target)
    raw.send(1, pc.Basic.Consume(queue=p["queue"], consumer_tag="bench", no_ack=True))
    raw.expect(pc.Basic.ConsumeOk)
    stream = FrameStream(raw, recv_timeout=0.2)
    counts = [0]

    def on_method(method, buf, start):
        if method == BASIC_DELIVER:
            counts[0] += 1
        else:
            raise_on_close(method, buf, start)

    t0 = ctx.ready()
    m_start = t0 + p["warmup"]
    m_end = m_start + p["duration"]
    mono = time.monotonic
    before = 0
    while True:
        now = mono()
        if now >= m_end:
            break
        if now < m_start:
            before = counts[0]
        stream.pump(on_method)
    in_window = counts[0] - before
    total = counts[0]
    raw.close()
    return {"consumed_per_s": in_window / p["duration"], "consumed_total": total}


def w_publisher(ctx: WorkerCtx, target: Target, p: dict) -> dict:
    """Raw publisher, no confirms: pre-encoded messages sent in batches of `batch`."""
    raw = RawAMQP(target)
    batch = p.get("batch", 16)
    data = encode_publish(p["queue"], b"x" * p["body_size"]) * batch
    sendall, mono = raw.sock.sendall, time.monotonic
    t0 = ctx.ready()
    m_start = t0 + p["warmup"]
    m_end = m_start + p["duration"]
    batches = before = 0
    while True:
        now = mono()
        if now >= m_end:
            break
        if now < m_start:
            before = batches + 1
        sendall(data)
        batches += 1
    raw.close()
    return {"published_per_s": (batches - before) * batch / p["duration"], "published_total": batches * batch}


def w_confirm_publisher(ctx: WorkerCtx, target: Target, p: dict) -> dict:
    """Publisher confirms, pipelined: top the window up to `confirm_window` unconfirmed
    messages in one write, then read whatever acks have arrived, repeat."""
    raw = RawAMQP(target)
    raw.send(1, pc.Confirm.Select())
    raw.expect(pc.Confirm.SelectOk)
    stream = FrameStream(raw, recv_timeout=10.0)  # 10 s without an ack fails the run
    one = encode_publish(p["queue"], b"x" * p["body_size"])
    window = p["confirm_window"]
    outstanding: set[int] = set()
    counts = {"confirmed": 0, "nacked": 0}
    unpack_ack = ACK_ARGS.unpack_from

    def settle(tag: int, multiple: bool) -> int:
        if multiple:
            done = [t for t in outstanding if t <= tag]
            outstanding.difference_update(done)
            return len(done)
        if tag in outstanding:
            outstanding.discard(tag)
            return 1
        return 0

    def on_method(method, buf, start):
        if method == BASIC_ACK:
            tag, flags = unpack_ack(buf, start + 4)
            counts["confirmed"] += settle(tag, bool(flags & 1))
        elif method == BASIC_NACK:
            tag, flags = unpack_ack(buf, start + 4)
            counts["nacked"] += settle(tag, bool(flags & 1))
        else:
            raise_on_close(method, buf, start)

    sendall, mono = raw.sock.sendall, time.monotonic
    next_tag = 1
    t0 = ctx.ready()
    m_start = t0 + p["warmup"]
    m_end = m_start + p["duration"]
    before = 0
    while True:
        now = mono()
        if now >= m_end:
            break
        if now < m_start:
            before = counts["confirmed"]
        room = window - len(outstanding)
        if room > 0:
            sendall(one * room)
            outstanding.update(range(next_tag, next_tag + room))
            next_tag += room
        if not stream.pump(on_method):
            raise RuntimeError(f"no confirm within 10 s ({len(outstanding)} outstanding)")
    in_window = counts["confirmed"] - before
    raw.close()
    if counts["nacked"]:
        raise RuntimeError(f"{counts['nacked']} messages nacked by the broker")
    return {
        "confirmed_per_s": in_window / p["duration"],
        "published_total": next_tag - 1,
        "confirmed_total": counts["confirmed"],
    }


def window_ns(t0: float, p: dict) -> tuple[int, int]:
    """The measurement window in monotonic_ns, computed identically in every process."""
    m_start = t0 + p["warmup"]
    return int(m_start * 1e9), int((m_start + p["duration"]) * 1e9)


def w_rate_publisher(ctx: WorkerCtx, target: Target, p: dict) -> dict:
    """Publish at a fixed rate; body starts with time.monotonic_ns() at send time."""
    conn = connect(target)
    ch = conn.channel()
    pad = b"x" * max(0, p["body_size"] - 8)
    publish, q, rate = ch.basic_publish, p["queue"], p["latency_rate"]
    mono, mono_ns, pack, sleep = time.monotonic, time.monotonic_ns, struct.Struct(">q").pack, time.sleep
    t0 = ctx.ready()
    m_start = t0 + p["warmup"]
    m_end = m_start + p["duration"]
    start_ns, end_ns = window_ns(t0, p)  # the consumer's window: same stamps, same test
    i = sent_in_window = late = 0
    while True:
        scheduled = t0 + i / rate
        if scheduled >= m_end:
            break
        delay = scheduled - mono()
        if delay > 0:
            sleep(delay)
        elif delay < -0.001:
            late += 1
        stamp = mono_ns()
        publish(amqp.Message(pack(stamp) + pad), "", q)
        if start_ns <= stamp < end_ns:
            sent_in_window += 1
        i += 1
    conn.close()
    return {"sent_in_window": sent_in_window, "late_sends": late}


def w_latency_consumer(ctx: WorkerCtx, target: Target, p: dict) -> dict:
    conn = connect(target)
    ch = conn.channel()
    lat_ns: list[int] = []
    win_ns = [0, 0]
    unpack, mono_ns = struct.Struct(">q").unpack_from, time.monotonic_ns

    def on_message(msg):
        now = mono_ns()
        (stamp,) = unpack(msg.body)
        if win_ns[0] <= stamp < win_ns[1]:
            lat_ns.append(now - stamp)

    ch.basic_consume(p["queue"], no_ack=True, callback=on_message)
    t0 = ctx.ready()
    win_ns[0], win_ns[1] = window_ns(t0, p)
    _drain_until(conn, t0 + p["warmup"] + p["duration"] + LATENCY_TAIL)
    conn.close()
    if not lat_ns:
        raise RuntimeError("no messages received in the measurement window")
    ms = sorted(v / 1e6 for v in lat_ns)
    return {
        "received_in_window": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": ms[-1],
        "mean_ms": statistics.fmean(ms),
    }


def _raw_cycle(target: Target, frames: bytes) -> tuple[float, float | None]:
    """One churn cycle with RawAMQP: handshake, channel.open, publish, Connection.Close/CloseOk.
    Returns the seconds to Connection.OpenOk and from Channel.Open to its OpenOk."""
    raw = RawAMQP(target)
    try:
        raw.sock.sendall(frames)
        raw.send(0, pc.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0))
        raw.expect(pc.Connection.CloseOk)
    finally:
        raw.sock.close()
    return raw.handshake_s, raw.channel_open_s


def w_churn(ctx: WorkerCtx, target: Target, p: dict) -> dict:
    """Loop: connect, open channel, publish 1 message, close. Count completed cycles, and time
    each one's handshake (connect to Connection.OpenOk) and channel.open (to Channel.OpenOk).
    p["client"]: "raw" (RawAMQP, cheap) or "py-amqp" (a real client library)."""
    msg = amqp.Message(b"x" * p["body_size"])
    q, mono = p["queue"], time.monotonic
    if p.get("client", "raw") == "raw":
        frames = encode_publish(q, b"x" * p["body_size"])

        def cycle() -> tuple[float, float | None]:
            return _raw_cycle(target, frames)
    else:

        def cycle() -> tuple[float, float | None]:
            t_connect = mono()
            conn = connect(target)
            t_open = mono()
            try:
                ch = conn.channel()
                t_channel = mono()
                ch.basic_publish(msg, "", q)
            finally:
                conn.close()
            return t_open - t_connect, t_channel - t_open

    t0 = ctx.ready()
    m_start = t0 + p["warmup"]
    m_end = m_start + p["duration"]
    cycles = errors = completed = 0
    first_error = None
    cycle_ms: list[float] = []
    handshake_ms: list[float] = []
    channel_open_ms: list[float] = []
    while True:
        t_a = mono()
        if t_a >= m_end:
            break
        try:
            handshake_s, channel_s = cycle()
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors += 1
            if first_error is None:
                first_error = f"{type(e).__name__}: {e}"
            time.sleep(0.01)
            continue
        completed += 1
        t_b = mono()
        if m_start <= t_b < m_end:
            cycles += 1
            cycle_ms.append((t_b - t_a) * 1000)
            handshake_ms.append(handshake_s * 1000)
            if channel_s is not None:
                channel_open_ms.append(channel_s * 1000)
    cycle_ms.sort()
    return {
        "cycles": cycles,
        "completed": completed,
        "errors": errors,
        "first_error": first_error,
        "cycle_p50_ms": percentile(cycle_ms, 50) if cycle_ms else None,
        "handshake_ms": handshake_ms,  # per cycle in the window; run_churn pools the workers'
        "channel_open_ms": channel_open_ms,
    }


def _open_raw_concurrently(target: Target, n: int, concurrency: int, channel: bool = False):
    """Open n RawAMQP connections from greenlets (gevent sockets, no monkey-patching), at most
    `concurrency` handshakes in flight. Returns (connections, errors, time of the last OpenOk)."""
    import gevent.pool
    from gevent import socket as gsocket

    conns: list[RawAMQP] = []
    errors: list[str] = []
    last = [time.monotonic()]

    def one(_i):
        try:
            conns.append(RawAMQP(target, timeout=30, sockmod=gsocket, channel=channel))
            last[0] = time.monotonic()
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(e).__name__}: {e}")

    pool = gevent.pool.Pool(concurrency)
    for i in range(n):
        pool.spawn(one, i)
    pool.join(timeout=120)
    pool.kill()
    return conns, errors, last[0]


def _close_raw_all(conns: list) -> None:
    import gevent.pool

    pool = gevent.pool.Pool(200)
    for c in conns:
        pool.spawn(c.close, 5.0)
    pool.join(timeout=60)


def w_open(ctx: WorkerCtx, target: Target, p: dict) -> dict:
    """Open p["conns"] connections at once (all handshakes in flight together), then close."""
    import gevent  # noqa: F401 - the hub is created in this (forked) process

    t0 = ctx.ready()
    conns, errors, last = _open_raw_concurrently(target, p["conns"], p["conns"])
    handshake_ms = [c.handshake_s * 1000 for c in conns]
    _close_raw_all(conns)
    return {"opened": len(conns), "errors": len(errors), "first_error": errors[0] if errors else None,
            "t0": t0, "last_open": last, "handshake_ms": handshake_ms}  # fmt: skip


def w_idle(idx: int, target: Target, n: int, concurrency: int, events, go, release) -> None:
    """Idle clients (own driver, run_idle): open n connections, report, hold them until
    `release`, close them, report."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(3))
    try:
        import gevent

        events.put(("ready", idx, None))
        go.wait(60)
        t0 = time.monotonic()
        conns, errors, last = _open_raw_concurrently(target, n, concurrency)
        events.put(("opened", idx, {"opened": len(conns), "errors": len(errors), "first_error": errors[0] if errors else None,
                                     "t0": t0, "last_open": last}))  # fmt: skip
        while not release.is_set():
            gevent.sleep(0.1)  # keeps the hub alive; idle connections, no heartbeats (TuneOk 0)
        alive = 0
        for c in conns:  # a connection the proxy dropped meanwhile reads EOF
            c.sock.setblocking(False)
            try:
                alive += c.sock.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
            c.sock.setblocking(True)
        t1 = time.monotonic()
        _close_raw_all(conns)
        events.put(("closed", idx, {"still_open_at_release": alive, "close_s": time.monotonic() - t1,
                                    "cpu_s": time.process_time()}))  # fmt: skip
    except BaseException:
        events.put(("error", idx, traceback.format_exc(limit=6)))


def run_workers(roles: list[tuple[str, Callable, dict]], target: Target, planned: float) -> dict[str, dict]:
    """Start one process per role, release them together, collect their results.

    Returns {role name: result dict}. Raises RuntimeError on any worker error or timeout.
    """
    ctx = mp.get_context("fork")
    events = ctx.Queue()
    go = ctx.Event()
    t0 = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=_worker_entry, args=(fn, i, target, params, events, go, t0), daemon=True)
        for i, (_name, fn, params) in enumerate(roles)
    ]
    for pr in procs:
        pr.start()
    results: dict[int, dict] = {}
    errors: list[str] = []
    try:
        ready: set[int] = set()
        deadline = time.monotonic() + READY_TIMEOUT
        while len(ready) < len(procs):
            kind, idx, payload = events.get(timeout=max(0.01, deadline - time.monotonic()))
            if kind == "ready":
                ready.add(idx)
            elif kind == "error":
                raise RuntimeError(f"{roles[idx][0]} failed during setup:\n{payload}")
        t0.value = time.monotonic() + 0.05
        go.set()
        deadline = t0.value + planned + RESULT_GRACE
        while len(results) + len(errors) < len(procs):
            kind, idx, payload = events.get(timeout=max(0.01, deadline - time.monotonic()))
            if kind == "done":
                results[idx] = payload
            elif kind == "error":
                errors.append(f"{roles[idx][0]}[{idx}] failed:\n{payload}")
    except queue_mod.Empty:
        missing = [roles[i][0] for i in range(len(procs)) if i not in results]
        raise RuntimeError(f"timed out waiting for workers: {missing}") from None
    finally:
        for pr in procs:
            pr.join(timeout=5)
        for pr in procs:
            if pr.is_alive():
                pr.terminate()
                pr.join(timeout=5)
        events.close()
    if errors:
        raise RuntimeError("\n".join(errors))
    out: dict[str, dict] = {}
    for i, (name, _fn, _params) in enumerate(roles):
        out[name if name not in out else f"{name}{i}"] = results[i]
    return out
