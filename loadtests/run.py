#!/usr/bin/env python3
"""Run one Locust scenario headless, write its reports, and check its thresholds.

    python -m loadtests.run churn --users 8 --spawn-rate 8 --run-time 30s
    python -m loadtests.run confirms --users 12 --run-time 2m --processes 2
    python -m loadtests.run storm --host amqp://guest:guest@10.0.0.5:5673/   # a proxy of yours
    python -m loadtests.run --list
    tox -e load -- reconnect --run-time 60s

What it does:

1. Reads ``SCENARIO`` (a literal dict) from ``loadtests/scenarios/<name>.py`` without
   importing Locust.
2. Unless ``--host`` is given, starts its own amqproxy subprocess (``ProxyServer`` of
   ``loadtests/benchmark/targets.py``: free ports, ``--log-level warning``) with the scenario's
   ``proxy_args`` plus any ``--proxy-arg``. A scenario with ``toxiproxy: true`` gets its
   upstream through a Toxiproxy proxy to the broker: ``TOXIPROXY_URL`` when set, else the
   project's fault proxy (``python -m chaos.faultproxy``) started here.
3. Runs ``locust --headless -f loadtests/scenarios/<name>.py --csv ... --csv-full-history
   --html ...`` (``--processes K`` forwarded), with the users' settings in the environment.
4. Reads ``<prefix>_stats.csv`` (and the per-second ``_stats_history.csv`` for fault
   scenarios) and checks the scenario's thresholds; prints a verdict per check.

Results: ``loadtests/results/<scenario>-<UTC timestamp>/`` (or ``--results DIR``):
``locust_stats.csv``, ``locust_stats_history.csv``, ``locust_failures.csv``,
``locust_exceptions.csv``, ``report.html`` (throughput and percentile charts over time),
``final_stats.json`` (the final numbers the thresholds use), ``locust.log``, ``locust.out``
(Locust's own summary tables), ``amqproxy.log``, ``faults.json`` (fault windows), ``verdict.json``.

Thresholds (in the scenario's ``thresholds``): ``max_failure_ratio`` (failures / requests over
all request types; refusals by a connection limit are successes of their own type),
``max_p99_ms`` per request name, ``nonzero`` (request names that must have succeeded at least
once), ``failures_only_in_fault`` (no failure before the first fault or later than
``recovery_s`` after the last), ``recovered`` (these names succeed after that point),
``breaker_opened`` (the proxy's /metrics show a breaker transition to open).

Exit status: 0 all thresholds met; 1 a threshold missed (or Locust reported unhandled
exceptions); 2 usage or set-up error; 3 the scenario needs something that is not available
(a proxy flag such as ``--max-connections``, or a Toxiproxy server).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from loadtests.benchmark.system import proc_cpu_seconds, proc_tree, raise_nofile  # noqa: E402
from loadtests.benchmark.targets import ProxyServer  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

SCENARIO_DIR = REPO_ROOT / "loadtests" / "scenarios"
RESULTS_DIR = REPO_ROOT / "loadtests" / "results"
EXIT_OK, EXIT_THRESHOLD, EXIT_SETUP, EXIT_UNAVAILABLE = 0, 1, 2, 3
BROKER = os.environ.get("AMQPROXY_TEST_BROKER", "127.0.0.1:5672")


class Unavailable(Exception):
    """The scenario needs a feature or tool that is not there (exit 3)."""


def scenario_names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_scenario(name: str) -> dict:
    path = SCENARIO_DIR / f"{name}.py"
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SCENARIO" for t in node.targets):
            sc = ast.literal_eval(node.value)
            sc["path"] = str(path)
            sc["name"] = name
            return sc
    raise SystemExit(f"{path}: no SCENARIO = {{...}} literal")


def parse_duration(text: str) -> float:
    """Locust's run-time syntax: 30, 30s, 2m, 1h30m."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise argparse.ArgumentTypeError(f"bad run time {text!r} (e.g. 30s, 2m, 1h30m)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def proxy_help() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "amqproxy", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    )
    return out.stdout + out.stderr


# --------------------------------------------------------------------------
# Toxiproxy
# --------------------------------------------------------------------------


class ToxiproxySetup:
    """A Toxiproxy proxy in front of the broker, on the server chaos.toxiproxy_endpoint() gives:
    TOXIPROXY_URL's, else a chaos.faultproxy subprocess started for the run."""

    def __init__(self, broker: str):
        self.broker = broker
        self.url = ""
        self.name = f"amqproxy-load-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.listen = ""
        self._stack = contextlib.ExitStack()

    def start(self) -> None:
        try:
            from chaos import toxiproxy_endpoint
        except ImportError:
            if not os.environ.get("TOXIPROXY_URL"):
                raise Unavailable("no Toxiproxy: set TOXIPROXY_URL, or provide chaos.toxiproxy_endpoint") from None
            self.url = os.environ["TOXIPROXY_URL"].rstrip("/")
        else:
            self.url = self._stack.enter_context(toxiproxy_endpoint())
        from loadtests.faults import use_toxiproxy

        listen = f"127.0.0.1:{free_port()}"
        proxy = use_toxiproxy(self.url).create(upstream=self.broker, name=self.name, listen=listen, enabled=True)
        self.listen = proxy.listen or listen

    def stop(self) -> None:
        try:
            if self.url:
                from loadtests.faults import use_toxiproxy

                p = use_toxiproxy(self.url).get_proxy(self.name)
                if p is not None:
                    p.destroy()
        except Exception as e:  # noqa: BLE001
            print(f"warning: could not delete toxiproxy proxy {self.name}: {e}", file=sys.stderr)
        finally:
            self._stack.close()


# --------------------------------------------------------------------------
# reading Locust's CSVs, checking thresholds
# --------------------------------------------------------------------------


def read_stats(path: Path) -> dict[str, dict]:
    """name -> row of Locust's _stats.csv columns; the final numbers (final_stats.json, written
    by the users' module when Locust quits) win over the CSV, which Locust rewrites only
    periodically."""
    final = path.parent / "final_stats.json"
    if final.exists():
        doc = json.loads(final.read_text())
        return {
            r["name"]: {"Request Count": r["requests"], "Failure Count": r["failures"], "Requests/s": r["rps"],
                        "50%": r["p50"], "95%": r["p95"], "99%": r["p99"], "Max Response Time": r["max"]}
            for r in doc["stats"]
        }  # fmt: skip
    rows: dict[str, dict] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows[row["Name"]] = row
    return rows


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return 0.0


def read_history(path: Path) -> dict[str, list[tuple[float, float, float]]]:
    """name -> [(unix time, cumulative requests, cumulative failures)] from _stats_history.csv."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    if not path.exists():
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["Name"], []).append(
                (_num(row["Timestamp"]), _num(row["Total Request Count"]), _num(row["Total Failure Count"]))
            )
    return out


def counts_between(series: list[tuple[float, float, float]], t0: float, t1: float) -> tuple[float, float]:
    """(requests, failures) recorded in (t0, t1] by differencing the cumulative counts."""

    def at(t: float) -> tuple[float, float]:
        req = fail = 0.0
        for ts, r, f in series:
            if ts <= t:
                req, fail = r, f
        return req, fail

    r0, f0 = at(t0)
    r1, f1 = at(t1)
    return r1 - r0, f1 - f0


def breaker_opened(http_port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("amqproxy_breaker_transitions_total{") and 'to="open"' in line:
            total += _num(line.rsplit(" ", 1)[1])
    return total


def check(sc: dict, out: Path, prefix: Path, extra: dict) -> list[tuple[bool, str]]:
    th = sc.get("thresholds", {})
    stats = read_stats(Path(f"{prefix}_stats.csv"))
    agg = stats.get("Aggregated", {})
    per_name = {k: v for k, v in stats.items() if k != "Aggregated"}
    results: list[tuple[bool, str]] = []

    total_req, total_fail = _num(agg.get("Request Count")), _num(agg.get("Failure Count"))
    ratio = total_fail / total_req if total_req else 1.0
    if "max_failure_ratio" in th:
        results.append(
            (ratio <= th["max_failure_ratio"],
             f"failure ratio {ratio:.4f} ({int(total_fail)}/{int(total_req)}) <= {th['max_failure_ratio']}")
        )  # fmt: skip
    for name, limit in th.get("max_p99_ms", {}).items():
        row = per_name.get(name)
        if row is None:
            results.append((name not in th.get("nonzero", []), f"p99 {name}: no requests"))
            continue
        p99 = _num(row.get("99%"))
        results.append((p99 <= limit, f"p99 {name} {p99:.0f} ms <= {limit} ms"))
    for name in th.get("nonzero", []):
        row = per_name.get(name)
        ok_count = _num(row["Request Count"]) - _num(row["Failure Count"]) if row else 0
        results.append((ok_count > 0, f"{name}: {int(ok_count)} successful requests > 0"))

    fault = extra.get("faults")
    if th.get("failures_only_in_fault") or th.get("recovered"):
        windows = (fault or {}).get("windows") or []
        if not windows:
            results.append((False, "fault windows recorded (faults.json): none; the fault never ran"))
        else:
            history = read_history(Path(f"{prefix}_stats_history.csv"))
            agg_hist = history.get("Aggregated", [])
            recovery = sc.get("fault", {}).get("recovery_s", 5)
            first, last = windows[0]["start"], windows[-1]["end"] or windows[-1]["start"]
            t_end = agg_hist[-1][0] if agg_hist else last
            _, f_before = counts_between(agg_hist, 0, first - 1)  # history has 1 s resolution
            _, f_after = counts_between(agg_hist, last + recovery, t_end + 1)
            _, f_during = counts_between(agg_hist, first - 1, last + recovery)
            if th.get("failures_only_in_fault"):
                results.append((f_before == 0, f"failures before the fault: {int(f_before)} == 0"))
                results.append((f_after == 0, f"failures later than {recovery} s after the fault: {int(f_after)} == 0"))
                results.append((True, f"failures during the fault + recovery: {int(f_during)} (informational)"))
            for name in th.get("recovered", []):
                req, fail = counts_between(history.get(name, []), last + recovery, t_end + 1)
                note = f" (run ends {t_end - last:.1f} s after the fault: too short?)" if req - fail <= 0 else ""
                results.append((req - fail > 0, f"{name} after recovery: {int(req - fail)} successful > 0{note}"))
    if th.get("breaker_opened"):
        n = extra.get("breaker_open_transitions")
        if n is None:
            results.append((True, "breaker opened: not checked (proxy not started by this runner)"))
        else:
            results.append((n > 0, f"breaker transitions to open: {int(n)} > 0"))

    exc_path = Path(f"{prefix}_exceptions.csv")
    if exc_path.exists():
        with open(exc_path, newline="") as f:
            exc_rows = list(csv.DictReader(f))
        n_exc = sum(int(_num(r.get("Count"))) for r in exc_rows)
        first = exc_rows[0].get("Message", "") if exc_rows else ""
        results.append(
            (n_exc == 0, f"unhandled exceptions in users: {n_exc} == 0" + (f" (first: {first})" if first else ""))
        )
    return results


def print_summary(prefix: Path) -> None:
    stats = read_stats(Path(f"{prefix}_stats.csv"))
    head = f"{'name':<30} {'reqs':>8} {'fails':>7} {'req/s':>8} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>8}"
    print(head)
    print("-" * len(head))
    for name, r in stats.items():
        print(
            f"{name:<30} {int(_num(r['Request Count'])):>8} {int(_num(r['Failure Count'])):>7}"
            f" {_num(r['Requests/s']):>8.1f} {_num(r['50%']):>7.0f} {_num(r['95%']):>7.0f}"
            f" {_num(r['99%']):>7.0f} {_num(r['Max Response Time']):>8.0f}"
        )
    fpath = Path(f"{prefix}_failures.csv")
    if fpath.exists():
        with open(fpath, newline="") as f:
            rows = sorted(csv.DictReader(f), key=lambda r: -_num(r.get("Occurrences")))
        for r in rows[:8]:
            print(f"  failure x{r['Occurrences']}: {r['Name']}: {r['Error'][:160]}")


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("scenario", nargs="?", help="scenario name (loadtests/scenarios/<name>.py)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("-u", "--users", type=int, default=None, help="peak users (scenario default)")
    ap.add_argument("-r", "--spawn-rate", type=float, default=None, help="users started per second (scenario default)")
    ap.add_argument("-t", "--run-time", default=None, help="e.g. 30s, 2m (scenario default)")
    ap.add_argument("--processes", type=int, default=None, help="Locust --processes: fork K load processes")
    ap.add_argument("--host", default=None, help="amqp:// URL of a proxy to test (default: start one here)")
    ap.add_argument("--broker", default=BROKER, help=f"RabbitMQ HOST:PORT (default {BROKER})")
    ap.add_argument(
        "--results", type=Path, default=None, help="results folder (default loadtests/results/<scenario>-<time>)"
    )
    ap.add_argument("--rate", type=float, default=None, help="msg/s per publishing user (LOADTEST_RATE)")
    ap.add_argument(
        "--proxy-arg", action="append", default=[], metavar="ARG", help="extra amqproxy argument (repeatable)"
    )
    ap.add_argument(
        "--locust-arg", action="append", default=[], metavar="ARG", help="extra locust argument (repeatable)"
    )
    ap.add_argument(
        "--fault", action="append", default=[], metavar="KEY=VALUE",
        help="override a key of the scenario's fault plan, e.g. --fault duration=2 --fault recovery_s=3",
    )  # fmt: skip
    ap.add_argument("--no-thresholds", action="store_true", help="report only; exit 0 unless the run itself failed")
    args = ap.parse_args(argv)
    if args.list:
        return args
    if not args.scenario:
        ap.error("give a scenario name (see --list)")
    if args.scenario not in scenario_names():
        ap.error(f"unknown scenario {args.scenario!r}; choose from {', '.join(scenario_names())}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for name in scenario_names():
            print(f"{name:<12} {load_scenario(name).get('description', '')}")
        return EXIT_OK
    sc = load_scenario(args.scenario)
    for item in args.fault:
        key, _, value = item.partition("=")
        if not sc.get("fault") or not value:
            print(f"--fault {item}: the scenario has no fault plan, or no value given", file=sys.stderr)
            return EXIT_SETUP
        sc["fault"][key] = float(value) if re.fullmatch(r"[\d.]+", value) else value
    d = sc.get("defaults", {})
    users = args.users or d.get("users", 4)
    spawn_rate = args.spawn_rate or d.get("spawn_rate", users)
    run_time = args.run_time or d.get("run_time", "30s")
    run_s = parse_duration(run_time)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.results or RESULTS_DIR / f"{args.scenario}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "locust"
    raise_nofile()

    proxy: ProxyServer | None = None
    toxi: ToxiproxySetup | None = None
    extra: dict = {}
    env = dict(os.environ)  # LOADTEST_* set by the caller override the scenario's defaults
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    for k, v in sc.get("env", {}).items():
        env.setdefault(k, v)
    env["LOADTEST_QUEUE"] = f"amqproxy-locust-{args.scenario}-{uuid.uuid4().hex[:8]}"
    env["LOADTEST_QUEUE_ARGS"] = json.dumps(sc.get("queue_args", {}))
    env["LOADTEST_RUN_TIME"] = str(run_s)
    env["LOADTEST_FINAL_STATS"] = str(out / "final_stats.json")
    if args.rate is not None:
        env["LOADTEST_RATE"] = str(args.rate)
    try:
        flag = sc.get("requires_flag")
        if flag and args.host is None and flag not in proxy_help():
            raise Unavailable(f"{flag} not available (python -m amqproxy --help does not list it)")
        host = args.host
        if host is None:
            upstream = f"amqp://{args.broker}"
            if sc.get("toxiproxy"):
                toxi = ToxiproxySetup(args.broker)
                toxi.start()
                upstream = f"amqp://{toxi.listen}"
            fmt = {"users": users, "half_users": max(1, users // 2)}
            proxy_args = [a.format(**fmt) for a in sc.get("proxy_args", [])] + args.proxy_arg
            proxy = ProxyServer(upstream, proxy_args, out / "amqproxy.log")
            proxy.up()
            host = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        elif sc.get("toxiproxy"):
            if not (os.environ.get("TOXIPROXY_URL") and os.environ.get("LOADTEST_TOXI_PROXY")):
                raise Unavailable(
                    "--host with a fault scenario needs TOXIPROXY_URL and LOADTEST_TOXI_PROXY (the proxy's upstream)"
                )
            env["LOADTEST_TOXI_PROXY"] = os.environ["LOADTEST_TOXI_PROXY"]
        if toxi is not None:
            env["TOXIPROXY_URL"] = toxi.url
            env["LOADTEST_TOXI_PROXY"] = toxi.name
        if sc.get("fault"):
            env["LOADTEST_FAULT"] = json.dumps(sc["fault"])
            env["LOADTEST_FAULT_LOG"] = str(out / "faults.json")

        cmd = [
            sys.executable, "-m", "locust", "--headless", "-f", sc["path"], "--host", host,
            "--users", str(users), "--spawn-rate", str(spawn_rate), "--run-time", run_time,
            "--stop-timeout", "5", "--csv", str(prefix), "--csv-full-history", "--html", str(out / "report.html"),
            "--only-summary", "--exit-code-on-error", "0", "--logfile", str(out / "locust.log"),
        ]  # fmt: skip
        if args.processes:
            cmd += ["--processes", str(args.processes)]
        cmd += args.locust_arg
        print(f"scenario {args.scenario}: {users} users, spawn rate {spawn_rate}/s, {run_time}"
              f"{f', {args.processes} processes' if args.processes else ''}; host {host}; results {out}", flush=True)  # fmt: skip
        (out / "command.txt").write_text(" ".join(cmd) + "\n")
        t0 = time.monotonic()
        env["LOADTEST_DEADLINE"] = str(time.time() + run_s)
        try:
            proxy_cpu0 = proxy.cpu_seconds() if proxy is not None else None
            with open(out / "locust.out", "wb") as lout:
                lproc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=lout, stderr=subprocess.STDOUT)
                cpu_by_pid: dict[int, float] = {}
                deadline = time.monotonic() + run_s + 120
                while lproc.poll() is None:
                    for pid in proc_tree(lproc.pid):  # Locust and its --processes children
                        v = proc_cpu_seconds(pid)
                        if v is not None:
                            cpu_by_pid[pid] = max(v, cpu_by_pid.get(pid, 0.0))
                    if time.monotonic() > deadline:
                        lproc.kill()
                        raise subprocess.TimeoutExpired(cmd, run_s + 120)
                    time.sleep(0.5)
                rc = lproc.returncode
            wall = time.monotonic() - t0
            extra["loadgen_cpu_s"] = sum(cpu_by_pid.values())
            extra["loadgen_processes"] = len(cpu_by_pid)
            if proxy is not None and proxy_cpu0 is not None:
                p1 = proxy.cpu_seconds()
                extra["proxy_cpu_s"] = None if p1 is None else p1 - proxy_cpu0
            busiest = max(cpu_by_pid.values(), default=0.0)
            print(
                f"CPU over {wall:.0f} s: load generator {extra['loadgen_cpu_s']:.1f} s in {len(cpu_by_pid)} process(es)"
                f" (busiest {100 * busiest / wall:.0f} % of a core)"
                + (f", proxy {extra['proxy_cpu_s']:.1f} s ({100 * extra['proxy_cpu_s'] / wall:.0f} %)"
                   if extra.get("proxy_cpu_s") is not None else ""),
                flush=True,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            print("locust did not finish in time", file=sys.stderr)
            return EXIT_SETUP
        print(f"locust exited {rc} after {time.monotonic() - t0:.1f} s", flush=True)
        if not Path(f"{prefix}_stats.csv").exists():
            print(f"no stats written; see {out / 'locust.log'}", file=sys.stderr)
            return EXIT_SETUP
        if proxy is not None:
            extra["breaker_open_transitions"] = breaker_opened(proxy.http_port)
            if not proxy.alive:
                print(f"amqproxy died during the run:\n{proxy.log_tail()}", file=sys.stderr)
        log_text = (out / "locust.log").read_text(errors="replace") if (out / "locust.log").exists() else ""
        if any(
            m in log_text for m in ("CPU usage above", "CPU usage was too high", "CPU usage threshold was exceeded")
        ):
            print(
                "note: Locust reported its own CPU above 90 %: the load generator, not the proxy, was the limit;"
                " run again with --processes N (see docs/BENCHMARKS.md)",
                flush=True,
            )
        fpath = out / "faults.json"
        if fpath.exists():
            extra["faults"] = json.loads(fpath.read_text())
    except Unavailable as e:
        print(f"unavailable: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except Exception as e:  # noqa: BLE001
        print(f"set-up failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_SETUP
    finally:
        if proxy is not None:
            proxy.stop()
        if toxi is not None:
            toxi.stop()

    print_summary(prefix)
    results = check(sc, out, prefix, extra)
    if proxy is not None and proxy.proc is not None and proxy.proc.returncode not in (0, None, -signal.SIGTERM):
        results.append((False, f"amqproxy exit code {proxy.proc.returncode}"))
    print("\nthresholds:")
    for ok, text in results:
        print(f"  [{'ok' if ok else 'MISSED'}] {text}")
    passed = all(ok for ok, _ in results)
    (out / "verdict.json").write_text(
        json.dumps({"scenario": args.scenario, "users": users, "run_time": run_time, "passed": passed,
                    "checks": [{"ok": ok, "check": t} for ok, t in results], "locust_rc": rc,
                    "loadgen_cpu_s": extra.get("loadgen_cpu_s"), "proxy_cpu_s": extra.get("proxy_cpu_s")}, indent=2) + "\n"
    )  # fmt: skip
    print(f"\n{'PASSED' if passed else 'FAILED'}: {args.scenario}; report {out / 'report.html'}")
    if args.no_thresholds:
        return EXIT_OK
    return EXIT_OK if passed else EXIT_THRESHOLD


if __name__ == "__main__":
    sys.exit(main())
