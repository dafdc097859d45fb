"""The benchmark's driver: its arguments, the servers it starts (our proxy, its variants and the
anchor), the interleaved rounds of runs, and the report at the end (`main`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import amqp

from . import __doc__ as PACKAGE_DOC
from .client import connect
from .report import fmt, print_idle, print_table, short_error, summarize
from .system import (
    find_broker_pid,
    parse_cpus,
    proc_cpu_seconds,
    profile_top,
    raise_nofile,
    restore_affinity,
    set_process_affinity,
    start_py_spy,
    stop_py_spy,
)
from .targets import REPO_ROOT, Admin, Anchor, ProxyServer, Target
from .workloads import DEFAULT_WORKLOADS, WORKLOADS, Settings, Workload, idle_metrics

QUEUE_PREFIX = "amqproxy-bench-"
Server = ProxyServer | Anchor


def run_one(wl: Workload, target: Target, rnd: int, s: Settings, admin: Admin, broker_pid: int | None) -> dict:
    """One run of wl against target. For a target with a server (a proxy or the anchor) the record
    holds that server's CPU ("proxy_cpu_s", whichever proxy it is)."""
    server = target.server
    rec = {"workload": wl.name, "target": target.name, "round": rnd, "ok": False, "metrics": {}, "error": None,
           "checks_failed": []}  # fmt: skip
    q = f"{QUEUE_PREFIX}{wl.name}-{target.name}-{rnd}-{uuid.uuid4().hex[:8]}"
    proxy_cpu0 = server.cpu_seconds() if server is not None else None
    broker_cpu0 = proc_cpu_seconds(broker_pid) if broker_pid else None
    t_start = time.monotonic()
    expected_in_queue = None
    cpu_per_op = None
    try:
        admin.declare(q, wl.queue_args)
        metrics = wl.run(target, q, s)
        rec["loadgen_cpu_s"] = metrics.pop("_loadgen_cpu_s", None)
        rec["messages_total"] = metrics.pop("_messages_total", None)
        expected_in_queue = metrics.pop("_expected_in_queue", None)
        cpu_per_op = metrics.pop("_cpu_per_op", None)
        rec["checks_failed"] = metrics.pop("_checks", [])
        rec["metrics"] = metrics
        rec["ok"] = True
    except Exception as e:  # noqa: BLE001 - a failed run is reported, not fatal
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["wall_s"] = time.monotonic() - t_start
    if broker_cpu0 is not None:
        b1 = proc_cpu_seconds(broker_pid)
        rec["broker_cpu_s"] = None if b1 is None else b1 - broker_cpu0
    if server is not None:
        p1 = server.cpu_seconds()
        rec["proxy_cpu_s"] = None if p1 is None or proxy_cpu0 is None else p1 - proxy_cpu0
        if rec["proxy_cpu_s"] is not None and rec.get("messages_total"):
            # both legs: a message published through the proxy and consumed through it counts twice
            rec["proxy_us_per_msg"] = rec["proxy_cpu_s"] * 1e6 / rec["messages_total"]
        if rec["proxy_cpu_s"] is not None and cpu_per_op and cpu_per_op[1]:
            key, ops = cpu_per_op  # e.g. proxy CPU ms per churn cycle: CPU seconds of the run / cycles
            rec["metrics"][key] = rec["proxy_cpu_s"] * 1e3 / ops
        if not server.alive:
            rec["ok"] = False
            what = "amqproxy" if server.kind == "proxy" else server.name
            rec["error"] = (rec["error"] or "") + f"\n{what} died (exit {server.returncode}):\n{server.log_tail(30)}"
    try:
        if rec["ok"] and expected_in_queue is not None:
            rec["settled_in_queue"] = admin.settle(q, expected_in_queue)
        rec["left_in_queue"] = admin.delete(q)
    except Exception as e:  # noqa: BLE001
        rec["cleanup_error"] = f"{type(e).__name__}: {e}"
    if rec["ok"] and expected_in_queue is not None and rec.get("left_in_queue") != expected_in_queue:
        rec["checks_failed"].append(
            f"message loss: {expected_in_queue} messages published, {rec.get('left_in_queue')} in the queue"
        )
    return rec


def note_proxy_log(rec: dict, problems: list[dict]) -> None:
    """Attach the proxy's warnings during a run to its record, identical lines counted once.
    The broker never goes away during the benchmark, so a lost upstream connection is a
    proxy fault: a failed check."""
    lines: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    for p in problems:
        extra = ", ".join(f"{k}={p[k]}" for k in ("event", "reason", "cause") if k in p)
        lines[f"{p.get('level')} {p.get('message')}" + (f" ({extra})" if extra else "")] += 1
        if p.get("event") == "upstream_lost":
            lost[str(p.get("cause"))] += 1
    for cause, n in lost.items():
        rec["checks_failed"].append(f"proxy lost {n} upstream connection(s): {cause}")
    if lines:
        rec["proxy_log_problems"] = [f"{line} x{n}" if n > 1 else line for line, n in lines.most_common(50)]


def parse_args(argv=None) -> argparse.Namespace:
    doc = PACKAGE_DOC or ""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 0.5 s warm-up, 1.5 s window")
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS, help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write raw numbers as JSON here")
    ap.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per run (default 1)")
    ap.add_argument("--duration", type=float, default=None, help="seconds measured per run (default 5)")
    ap.add_argument("--body-size", type=int, default=1024, help="message body bytes (default 1024)")
    ap.add_argument("--confirm-window", type=int, default=100, help="unconfirmed messages in flight (default 100)")
    ap.add_argument("--latency-rate", type=int, default=1000, help="msg/s of the latency publisher (default 1000)")
    ap.add_argument("--churn-workers", type=int, default=8, help="processes in the churn workload (default 8)")
    ap.add_argument(
        "--churn-client",
        choices=("raw", "py-amqp"),
        default="raw",
        help="churn client: raw (RawAMQP, cheapest; default) or py-amqp (a real library, ~2.5 ms CPU per cycle)",
    )
    ap.add_argument("--open-conns", type=int, default=500, help="open_rate: connections opened at once (default 500)")
    ap.add_argument("--open-procs", type=int, default=4, help="open_rate: load processes (default 4)")
    ap.add_argument(
        "--idle-clients",
        default=None,
        help="idle: comma-separated client counts (default 1000,5000,10000; --quick 500)",
    )
    ap.add_argument("--idle-procs", type=int, default=4, help="idle: load processes (default 4)")
    ap.add_argument("--idle-hold", type=float, default=None, help="idle: seconds the clients are held (default 3)")
    ap.add_argument(
        "--compare-workers",
        type=int,
        default=None,
        metavar="N",
        help="also run churn and open_rate against a second proxy started with --workers N (target proxy_wN)",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="another proxy with extra arguments, run in every workload as target proxy_NAME, e.g."
        " --variant 'ci5=--upstream-check-interval 5' (an optimisation's before/after in one run)",
    )
    ap.add_argument(
        "--broker-cpus",
        default=None,
        metavar="CPUS",
        help="pin the broker (every beam.smp thread) to these CPUs for the run, e.g. 0; its affinity is"
        " restored at the end. With --client-cpus: the broker gets the same CPUs in the direct and the"
        " proxy runs, and the proxy never takes CPU from it (the proxy on the clients' hosts or its own VM)",
    )
    ap.add_argument(
        "--client-cpus",
        default=None,
        metavar="CPUS",
        help="pin this script, its load generators and the proxies it starts to these CPUs, e.g. 1",
    )
    ap.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another proxy run from the checkout at PATH (e.g. a `git worktree` of the commit before a change),"
        " in every workload as target proxy_NAME: a code change's before/after in one run",
    )
    ap.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="PATH",
        help="profile the proxy (workers=1) with py-spy for the whole benchmark; collapsed stacks to PATH,"
        " top frames printed at the end",
    )
    ap.add_argument(
        "--anchor",
        type=Path,
        default=None,
        metavar="PATH",
        help="also run every workload against this cloudamqp/amqproxy binary (e.g. a release build of"
        " v3.1.3) as target anchor, interleaved with direct and proxy; adds the anchor / direct and"
        " proxy / anchor ratios",
    )
    ap.add_argument("--settle", type=float, default=0.5, help="pause between runs, seconds (default 0.5)")
    ap.add_argument("--broker", default="127.0.0.1:5672", metavar="HOST:PORT", help="RabbitMQ (default 127.0.0.1:5672)")
    ap.add_argument(
        "--proxy-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra amqproxy argument (repeatable; use --proxy-arg=--flag)",
    )
    args = ap.parse_args(argv)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    args.duration = args.duration if args.duration is not None else (1.5 if args.quick else 5.0)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        ap.error(f"unknown workload(s) {unknown}; choose from {','.join(WORKLOADS)}")
    args.workload_list = [WORKLOADS[n] for n in names]
    counts = args.idle_clients or ("500" if args.quick else "1000,5000,10000")
    try:
        args.idle_counts = [int(x) for x in counts.split(",") if x.strip()]
    except ValueError:
        ap.error("--idle-clients: comma-separated integers")
    args.idle_hold = args.idle_hold if args.idle_hold is not None else (1.0 if args.quick else 3.0)
    WORKLOADS["idle"].metrics = idle_metrics(args.idle_counts)
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0:
        ap.error("--rounds must be >= 1, --duration > 0, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bhost, _, bport = args.broker.rpartition(":")
    broker = Target("direct", bhost, int(bport))
    upstream = f"amqp://{bhost}:{bport}"
    settings = Settings(
        args.warmup, args.duration, args.body_size, args.confirm_window, args.latency_rate, args.churn_workers,
        churn_client=args.churn_client, open_conns=args.open_conns, open_procs=args.open_procs, idle_clients=args.idle_counts,
        idle_procs=args.idle_procs, idle_hold=args.idle_hold,
    )  # fmt: skip
    loadavg_start = os.getloadavg()
    if args.client_cpus:
        os.sched_setaffinity(0, parse_cpus(args.client_cpus))  # inherited by load generators and proxies
    nofile = raise_nofile()
    need = max(args.idle_counts) + 100 if any(w.name == "idle" for w in args.workload_list) else 0
    if need > nofile:
        print(f"warning: RLIMIT_NOFILE is {nofile}, the idle workload needs about {need} descriptors in the proxy",
              file=sys.stderr)  # fmt: skip
    admin = Admin(broker)
    log_path = Path(tempfile.mkstemp(prefix="amqproxy-bench-", suffix=".log")[1])
    proxy = ProxyServer(upstream, args.proxy_arg, log_path)
    anchor = Anchor(args.anchor, upstream, log_path.with_name(log_path.stem + "-anchor.log")) if args.anchor else None
    try:
        connect(broker).close()
        proxy.up()
        if anchor is not None:
            anchor.up()
    except Exception as e:  # noqa: BLE001
        print(f"cannot start: {type(e).__name__}: {e}", file=sys.stderr)
        proxy.stop()
        if anchor is not None:
            anchor.stop()
        return 2
    servers: dict[str, Server] = {"proxy": proxy}
    if anchor is not None:
        servers["anchor"] = anchor
    broker_pid = find_broker_pid(int(bport))
    broker_affinity: dict[int, set[int]] = {}
    if args.broker_cpus:
        if broker_pid is None:
            print("cannot pin the broker: its beam.smp process was not found", file=sys.stderr)
            for server in servers.values():
                server.stop()
            return 2
        broker_affinity = set_process_affinity(broker_pid, parse_cpus(args.broker_cpus))
    print(
        f"amqproxy pid {proxy.pid} on 127.0.0.1:{proxy.port} (log {log_path}); broker {args.broker}"
        f" (beam pid {broker_pid}); {args.rounds} round(s), warm-up {args.warmup}s, window {args.duration}s;"
        f" load average {loadavg_start[0]:.1f} on {os.cpu_count()} CPUs"
        + (f"; broker on CPUs {args.broker_cpus}" if args.broker_cpus else "")
        + (f"; clients and proxies on CPUs {args.client_cpus}" if args.client_cpus else ""),
        flush=True,
    )
    anchor_version = anchor.version() if anchor is not None else None
    if anchor is not None:
        print(f"anchor: {anchor.binary} ({anchor_version}) pid {anchor.pid} on 127.0.0.1:{anchor.port}"
              f" (log {anchor.log_path})", flush=True)  # fmt: skip
    spy = start_py_spy(proxy.pid, args.py_spy) if args.py_spy and proxy.pid else None
    variants = start_variants(args, upstream, log_path, servers)
    runs: list[dict] = []
    expected = 0
    started = time.time()
    try:
        for rnd in range(1, args.rounds + 1):
            for wl in args.workload_list:
                target_names = list(wl.targets) + (["anchor"] if anchor is not None else [])
                if "direct" in wl.targets:  # variants compare against direct; idle is proxy-only
                    target_names += [n for n, wls in variants.items() if wls is None or wl.name in wls]
                expected += len(target_names)
                for target_name in rotated(target_names, rnd):
                    rec = run_target(wl, target_name, rnd, settings, admin, broker, servers.get(target_name),
                                     broker_pid)  # fmt: skip
                    if rec is not None:
                        runs.append(rec)
                        time.sleep(args.settle)
                        print_run(rec, wl, servers.get(target_name))
    except KeyboardInterrupt:
        print("interrupted; reporting what ran", file=sys.stderr)
    finally:
        stop_py_spy(spy)
        restore_affinity(broker_affinity)
        for server in servers.values():
            server.stop()
        admin.cleanup()
    rows = summarize(runs, args.workload_list)
    print_table(rows, args.rounds)
    print_idle(runs, args.idle_counts)
    if args.py_spy:
        print(f"\npy-spy profile of the proxy ({args.py_spy}):\n{profile_top(args.py_spy)}")
    failed = [r for r in runs if not r["ok"]]
    checked = [r for r in runs if r["checks_failed"]]
    print(f"\n{len(runs) - len(failed)}/{expected} runs ok in {time.time() - started:.0f} s; proxy log {log_path}")
    if checked:
        print(f"{len(checked)} run(s) failed a correctness check (completed runs keep their numbers in the medians):")
        for r in checked:
            for check in r["checks_failed"]:
                print(f"  round {r['round']} {r['workload']} {r['target']}: {check}")
    if args.json:
        doc = {
            "meta": {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                "argv": sys.argv,
                "settings": asdict(settings),
                "rounds": args.rounds,
                "workloads": [w.name for w in args.workload_list],
                "python": platform.python_version(),
                "amqp_client": f"py-amqp {amqp.__version__}",
                "churn_client": args.churn_client,
                "loadavg_start": loadavg_start,
                "cpus": os.cpu_count(),
                "broker_cpus": args.broker_cpus,
                "client_cpus": args.client_cpus,
                "loadavg_end": os.getloadavg(),
                "proxy_starts": proxy.starts,
                "proxy_log": str(log_path),
                "git_rev": _git_rev(),
            },
            "summary": rows,
            "runs": runs,
        }
        if anchor is not None:
            doc["meta"].update(anchor=str(anchor.binary), anchor_version=anchor_version, anchor_starts=anchor.starts,
                               anchor_log=str(anchor.log_path))  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"raw numbers: {args.json}")
    return 1 if failed or checked or len(runs) < expected else 0


def rotated(target_names: list[str], rnd: int) -> list[str]:
    """The run order of one round: direct first (the reference), then the others shifted by one
    place per round, so that no target always runs right after direct (a direct open_rate
    leaves the broker closing 500 connections) or always last."""
    head = [n for n in target_names if n == "direct"]
    rest = [n for n in target_names if n != "direct"]
    if rest:
        shift = (rnd - 1) % len(rest)
        rest = rest[shift:] + rest[:shift]
    return head + rest


def start_variants(args: argparse.Namespace, upstream: str, log_path: Path,
                   servers: dict[str, Server]) -> dict[str, tuple[str, ...] | None]:  # fmt: skip
    """Start the other proxies (--compare-workers, --variant, --tree) into servers; returns each
    one's workloads (None: every workload that runs direct)."""
    # name -> (extra args, workloads or None for all, checkout)
    variants: dict[str, tuple[list[str], tuple[str, ...] | None, Path]] = {}
    if args.compare_workers:
        workers = ["--workers", str(args.compare_workers)]
        variants[f"proxy_w{args.compare_workers}"] = (workers, ("churn", "open_rate"), REPO_ROOT)
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        variants[f"proxy_{name}"] = (rest.split(), None, REPO_ROOT)
    for spec in args.tree:
        name, _, path = spec.partition("=")
        variants[f"proxy_{name}"] = ([], None, Path(path).resolve())
    for name, (extra, _wls, root) in variants.items():
        log_v = log_path.with_name(log_path.stem + f"-{name}.log")
        server = servers[name] = ProxyServer(upstream, [*args.proxy_arg, *extra], log_v, name=name, root=root)
        try:
            server.up()
            print(f"{name}: pid {server.pid} on 127.0.0.1:{server.port} (log {log_v})", flush=True)
        except Exception as e:  # noqa: BLE001 - reported per run below
            print(f"warning: {name} did not start: {short_error(str(e))[:300]}", file=sys.stderr, flush=True)
    return {name: wls for name, (_extra, wls, _root) in variants.items()}


def run_target(wl: Workload, name: str, rnd: int, s: Settings, admin: Admin, broker: Target, server: Server | None,
               broker_pid: int | None) -> dict:  # fmt: skip
    """One run of wl against the target called name (the broker when server is None), with the
    server started again first if it died, and its log's warnings meanwhile."""
    if server is not None and not server.alive:
        try:
            server.up()
        except Exception as e:  # noqa: BLE001
            print(f"[FAIL] round {rnd} {wl.name:<24} {name:<8} proxy did not start", flush=True)
            return {"workload": wl.name, "target": name, "round": rnd, "ok": False, "metrics": {},
                    "error": f"proxy (re)start failed: {short_error(str(e))[:500]}", "checks_failed": []}  # fmt: skip
    target = broker if server is None else server.target()
    log_offset = server.log_size() if server is not None else 0
    rec = run_one(wl, target, rnd, s, admin, broker_pid)
    if server is not None:
        note_proxy_log(rec, server.log_problems_since(log_offset))
    return rec


def print_run(rec: dict, wl: Workload, server: Server | None) -> None:
    shown = ", ".join(f"{m.key}={fmt(rec['metrics'].get(m.key))}" for m in wl.metrics[:6])
    status = "ok " if rec["ok"] else "FAIL"
    cpu = f" {server.kind}_cpu={fmt(rec.get('proxy_cpu_s'))}s" if server is not None else ""
    if server is not None and rec.get("proxy_us_per_msg") is not None:
        cpu += f" ({rec['proxy_us_per_msg']:.1f} us/msg)"
    print(f"[{status}] round {rec['round']} {wl.name:<24} {rec['target']:<8} {shown}{cpu}", flush=True)
    if not rec["ok"]:
        print("       " + short_error(rec["error"]).replace("\n", "\n       "), flush=True)
    for check in rec["checks_failed"]:
        print(f"       CHECK FAILED: {check}", flush=True)
    for line in rec.get("proxy_log_problems", [])[:5]:
        print(f"       proxy log: {line}", flush=True)


def _git_rev() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
