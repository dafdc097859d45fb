"""The workloads: what each measures (its metrics) and how one run of it goes against one
target (run_*), from the settings of the benchmark. See the package docstring for each."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .report import percentile
from .targets import Anchor, ProxyServer, Target
from .workers import (
    LATENCY_TAIL,
    READY_TIMEOUT,
    run_workers,
    w_churn,
    w_confirm_publisher,
    w_consumer,
    w_idle,
    w_latency_consumer,
    w_open,
    w_publisher,
    w_rate_publisher,
)


@dataclass
class Settings:
    warmup: float
    duration: float
    body_size: int
    confirm_window: int
    latency_rate: int
    churn_workers: int
    churn_client: str = "raw"
    open_conns: int = 500
    open_procs: int = 4
    idle_clients: list[int] = field(default_factory=lambda: [1000, 5000, 10000])
    idle_procs: int = 4
    idle_concurrency: int = 100
    idle_hold: float = 3.0
    idle_settle: float = 3.0


@dataclass
class Metric:
    key: str  # key in the run's metrics dict
    label: str
    higher_is_better: bool


@dataclass
class Workload:
    name: str
    metrics: list[Metric]
    run: Callable[[Target, str, Settings], dict]  # (target, queue, settings) -> metrics
    queue_args: dict = field(default_factory=dict)
    # plus "anchor" with --anchor, and the variants (--compare-workers, --variant, --tree)
    targets: tuple[str, ...] = ("direct", "proxy")


def _base(s: Settings, q: str) -> dict:
    return {"queue": q, "warmup": s.warmup, "duration": s.duration, "body_size": s.body_size}


def _p50_p99(samples: list[float]) -> tuple[float | None, float | None]:
    if not samples:
        return None, None
    ordered = sorted(samples)
    return percentile(ordered, 50), percentile(ordered, 99)


def run_throughput_1p1c(target: Target, q: str, s: Settings) -> dict:
    p = _base(s, q)
    r = run_workers([("consumer", w_consumer, p), ("publisher", w_publisher, p)], target, s.warmup + s.duration)
    return {
        "consumed_per_s": r["consumer"]["consumed_per_s"],
        "published_per_s": r["publisher"]["published_per_s"],
        "_loadgen_cpu_s": r["consumer"]["cpu_s"] + r["publisher"]["cpu_s"],
        "_messages_total": r["publisher"]["published_total"] + r["consumer"]["consumed_total"],
    }


def run_throughput_confirms(target: Target, q: str, s: Settings) -> dict:
    p = {**_base(s, q), "confirm_window": s.confirm_window}
    r = run_workers([("consumer", w_consumer, p), ("publisher", w_confirm_publisher, p)], target, s.warmup + s.duration)
    pub = r["publisher"]
    return {
        "confirmed_per_s": pub["confirmed_per_s"],
        "consumed_per_s": r["consumer"]["consumed_per_s"],
        "_loadgen_cpu_s": r["consumer"]["cpu_s"] + pub["cpu_s"],
        "_messages_total": pub["published_total"] + r["consumer"]["consumed_total"],
    }


def run_latency(target: Target, q: str, s: Settings) -> dict:
    p = {**_base(s, q), "latency_rate": s.latency_rate}
    r = run_workers(
        [("consumer", w_latency_consumer, p), ("publisher", w_rate_publisher, p)],
        target,
        s.warmup + s.duration + LATENCY_TAIL,
    )
    c, pub = r["consumer"], r["publisher"]
    metrics = {k: v for k, v in c.items() if k != "cpu_s"}
    metrics["sent_in_window"] = pub["sent_in_window"]
    metrics["late_sends"] = pub["late_sends"]
    lost = pub["sent_in_window"] - c["received_in_window"]
    if lost:
        metrics["_checks"] = [
            f"message loss: {lost} of {pub['sent_in_window']} messages sent in the window never arrived"
        ]
    metrics["_loadgen_cpu_s"] = c["cpu_s"] + pub["cpu_s"]
    return metrics


def run_churn(target: Target, q: str, s: Settings) -> dict:
    p = {**_base(s, q), "client": s.churn_client}
    roles = [("churn", w_churn, p) for _ in range(s.churn_workers)]
    r = run_workers(roles, target, s.warmup + s.duration)
    workers = list(r.values())
    errors = sum(w["errors"] for w in workers)
    if errors:
        first = next(w["first_error"] for w in workers if w["first_error"])
        raise RuntimeError(f"{errors} churn cycles failed; first: {first}")
    p50s = [w["cycle_p50_ms"] for w in workers if w["cycle_p50_ms"] is not None]
    handshake = _p50_p99([v for w in workers for v in w["handshake_ms"]])
    channel_open = _p50_p99([v for w in workers for v in w["channel_open_ms"]])
    completed = sum(w["completed"] for w in workers)
    return {
        "cycles_per_s": sum(w["cycles"] for w in workers) / s.duration,
        "cycle_p50_ms": statistics.median(p50s) if p50s else None,
        "handshake_p50_ms": handshake[0],
        "handshake_p99_ms": handshake[1],
        "channel_open_p50_ms": channel_open[0],
        "channel_open_p99_ms": channel_open[1],
        # every completed cycle published one message to an uncapped, unconsumed queue
        "_expected_in_queue": completed,
        "_cpu_per_op": ("proxy_cpu_ms_per_cycle", completed),  # the server's CPU of the run / its cycles
        "_loadgen_cpu_s": sum(w["cpu_s"] for w in workers),
    }


def run_throughput_2p2c_confirms(target: Target, q: str, s: Settings) -> dict:
    p = {**_base(s, q), "confirm_window": s.confirm_window}
    roles = [("consumer", w_consumer, p), ("consumer", w_consumer, p),
             ("publisher", w_confirm_publisher, p), ("publisher", w_confirm_publisher, p)]  # fmt: skip
    r = run_workers(roles, target, s.warmup + s.duration)
    pubs = [v for k, v in r.items() if k.startswith("publisher")]
    cons = [v for k, v in r.items() if k.startswith("consumer")]
    return {
        "published_per_s": sum(x["confirmed_per_s"] for x in pubs),
        "consumed_per_s": sum(x["consumed_per_s"] for x in cons),
        "_loadgen_cpu_s": sum(x["cpu_s"] for x in r.values()),
        "_messages_total": sum(x["published_total"] for x in pubs) + sum(x["consumed_total"] for x in cons),
    }


def run_open_rate(target: Target, q: str, s: Settings) -> dict:
    """s.open_conns connections opened at once from s.open_procs processes (gevent in each)."""
    per = [s.open_conns // s.open_procs + (1 if i < s.open_conns % s.open_procs else 0) for i in range(s.open_procs)]
    roles = [("opener", w_open, {"conns": n}) for n in per if n]
    r = run_workers(roles, target, 60.0)
    ws = list(r.values())
    opened, errors = sum(w["opened"] for w in ws), sum(w["errors"] for w in ws)
    if errors:
        first = next(w["first_error"] for w in ws if w["first_error"])
        raise RuntimeError(f"{errors} of {s.open_conns} connections failed; first: {first}")
    elapsed = max(w["last_open"] for w in ws) - ws[0]["t0"]
    handshake = _p50_p99([v for w in ws for v in w["handshake_ms"]])
    return {
        "conns_per_s": opened / elapsed,
        "open_all_s": elapsed,
        "handshake_p50_ms": handshake[0],
        "handshake_p99_ms": handshake[1],
        "_cpu_per_op": ("proxy_cpu_ms_per_conn", opened),
        "_loadgen_cpu_s": sum(w["cpu_s"] for w in ws),
    }


def run_idle(target: Target, q: str, s: Settings) -> dict:
    """For each count in s.idle_clients: open that many idle connections from s.idle_procs
    processes, hold them s.idle_hold seconds, close them; the server's RSS before / with / after
    and the clients it holds (our /healthz, the anchor's client gauge)."""
    if target.server is None:
        raise RuntimeError("the idle workload runs against a proxy or anchor target only")
    out: dict = {"_loadgen_cpu_s": 0.0}
    checks: list[str] = []
    for n in s.idle_clients:
        res = _idle_once(target, n, s)
        out["_loadgen_cpu_s"] += res.pop("loadgen_cpu_s")
        checks += res.pop("checks")
        for k, v in res.items():
            out[f"{k}_{n}"] = v
    if checks:
        out["_checks"] = checks
    return out


def _wait_clients(server: ProxyServer | Anchor, want: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        n = server.clients()
        if n == want or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def _idle_once(target: Target, n: int, s: Settings) -> dict:
    server = target.server
    assert server is not None
    procs_n = max(1, min(s.idle_procs, n))
    per = [n // procs_n + (1 if i < n % procs_n else 0) for i in range(procs_n)]
    ctx = mp.get_context("fork")
    events, go, release = ctx.Queue(), ctx.Event(), ctx.Event()
    _wait_clients(server, 0, 10)
    gc_settle = s.idle_settle
    rss_before = server.rss_kb()
    procs = [ctx.Process(target=w_idle, args=(i, target, k, s.idle_concurrency, events, go, release), daemon=True)
             for i, k in enumerate(per)]  # fmt: skip
    for pr in procs:
        pr.start()
    got: dict[str, dict[int, dict]] = {"ready": {}, "opened": {}, "closed": {}}
    checks: list[str] = []

    def collect(kind: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(got[kind]) < len(procs):
            k, idx, payload = events.get(timeout=max(0.01, deadline - time.monotonic()))
            if k == "error":
                raise RuntimeError(f"idle worker {idx} failed:\n{payload}")
            got[k][idx] = payload or {}

    try:
        collect("ready", READY_TIMEOUT)
        go.set()
        collect("opened", 180)
        opened = sum(v["opened"] for v in got["opened"].values())
        errors = sum(v["errors"] for v in got["opened"].values())
        t0 = min(v["t0"] for v in got["opened"].values())
        open_s = max(v["last_open"] for v in got["opened"].values()) - t0
        held = _wait_clients(server, opened, 10)
        time.sleep(s.idle_hold)
        rss_with = server.rss_kb()
        upstreams = server.upstream_connections()
        held_end = server.clients()
        release.set()
        collect("closed", 120)
        still = sum(v["still_open_at_release"] for v in got["closed"].values())
        left = _wait_clients(server, 0, 30)
        time.sleep(gc_settle)
        rss_after = server.rss_kb()
    except queue_mod.Empty:
        raise RuntimeError(f"idle workers timed out ({n} clients)") from None
    finally:
        release.set()
        for pr in procs:
            pr.join(timeout=10)
            if pr.is_alive():
                pr.terminate()
        events.close()
    if errors:
        first = next(v["first_error"] for v in got["opened"].values() if v["first_error"])
        checks.append(f"{n} idle clients: {errors} failed to connect; first: {first}")
    if held_end != n or still != n:
        checks.append(
            f"{n} idle clients: {target.name} held {held_end} at the end of the hold, {still} still open at release"
        )
    grown = (rss_with or 0) - (rss_before or 0)
    return {
        "open_per_s": opened / open_s if open_s > 0 else None,
        "held": held_end,
        "held_after_open": held,
        "errors": errors,
        "rss_before_mb": rss_before / 1024 if rss_before else None,
        "rss_with_mb": rss_with / 1024 if rss_with else None,
        "rss_after_mb": rss_after / 1024 if rss_after else None,
        "rss_per_client_kb": grown / n if n else None,
        "returned_pct": 100.0 * ((rss_with or 0) - (rss_after or 0)) / grown if grown > 0 else None,
        "clients_left_after": left,
        "upstream_connections": upstreams,
        "loadgen_cpu_s": sum(v.get("cpu_s", 0.0) for v in got["closed"].values()),
        "checks": checks,
    }


# A publisher can outrun its consumer; cap the backlog so the broker never nears its
# memory alarm (which would block every publisher on the broker, not just ours).
THROUGHPUT_Q = {"x-max-length": 50_000}

WORKLOADS = {
    w.name: w
    for w in [
        Workload(
            "throughput_1p1c", [Metric("consumed_per_s", "consumed msg/s", True)], run_throughput_1p1c, THROUGHPUT_Q
        ),
        Workload(
            "throughput_confirms",
            [Metric("confirmed_per_s", "confirmed msg/s", True)],
            run_throughput_confirms,
            THROUGHPUT_Q,
        ),
        Workload(
            "latency",
            [Metric("p50_ms", "p50 latency ms", False), Metric("p99_ms", "p99 latency ms", False)],
            run_latency,
        ),
        Workload(
            "throughput_2p2c_confirms",
            [Metric("published_per_s", "published msg/s", True)],
            run_throughput_2p2c_confirms,
            THROUGHPUT_Q,
        ),
        Workload(
            "churn",
            [
                Metric("cycles_per_s", "cycles/s", True),
                Metric("handshake_p50_ms", "handshake p50 ms", False),
                Metric("handshake_p99_ms", "handshake p99 ms", False),
                Metric("channel_open_p50_ms", "channel.open p50 ms", False),
                Metric("channel_open_p99_ms", "channel.open p99 ms", False),
                Metric("proxy_cpu_ms_per_cycle", "proxy CPU ms/cycle", False),
            ],
            run_churn,
        ),
        Workload(
            "open_rate",
            [
                Metric("conns_per_s", "connections/s", True),
                Metric("handshake_p50_ms", "handshake p50 ms", False),
                Metric("handshake_p99_ms", "handshake p99 ms", False),
                Metric("proxy_cpu_ms_per_conn", "proxy CPU ms/connection", False),
            ],
            run_open_rate,
        ),
        Workload("idle", [], run_idle, targets=("proxy",)),
    ]
}
DEFAULT_WORKLOADS = "throughput_1p1c,throughput_confirms,throughput_2p2c_confirms,latency,churn,open_rate,idle"


def idle_metrics(counts: list[int]) -> list[Metric]:
    out = []
    for n in counts:
        out += [
            Metric(f"open_per_s_{n}", f"{n} open conn/s", True),
            Metric(f"rss_per_client_kb_{n}", f"{n} RSS KB/client", False),
            Metric(f"returned_pct_{n}", f"{n} RSS returned %", True),
            Metric(f"held_{n}", f"{n} held", True),
        ]
    return out
