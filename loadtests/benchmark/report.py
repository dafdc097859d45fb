"""What a benchmark prints and stores: percentiles, medians over rounds, the ratios between
targets (proxy / direct, and with an anchor anchor / direct and proxy / anchor), the tables."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .workloads import Workload

MAIN = ("direct", "proxy", "anchor")  # the other targets are variants of the proxy (proxy_NAME)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def median_of(runs: list[dict], getter: Callable[[dict], float | None]) -> float | None:
    values = [v for v in (getter(r) for r in runs if r["ok"]) if v is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(runs: list[dict], workloads: list[Workload]) -> list[dict]:
    """One row per (workload, metric, proxy or variant) with the medians of direct, that proxy
    and the anchor (when it ran), and their ratios; then one "cpu" row per (workload, server)."""
    rows = []
    for wl in workloads:
        names = sorted({r["target"] for r in runs if r["workload"] == wl.name} | {"direct", "proxy"})
        by_target = {t: [r for r in runs if r["workload"] == wl.name and r["target"] == t] for t in names}
        anchor = "anchor" in names
        extras = [t for t in names if t not in MAIN]  # e.g. proxy_w2 (--compare-workers)
        for proxy_name in ["proxy", *extras]:
            cols = [("direct", "direct"), ("proxy", proxy_name)] + ([("anchor", "anchor")] if anchor else [])
            for m in wl.metrics:
                label = m.label if proxy_name == "proxy" else f"{m.label} [{proxy_name}]"
                row = {"workload": wl.name, "metric": label, "key": m.key, "higher_is_better": m.higher_is_better}
                for col, t in cols:
                    rs = by_target[t]
                    row[col] = median_of(rs, lambda r, k=m.key: r["metrics"].get(k))
                    row[f"{col}_ok"] = f"{sum(r['ok'] for r in rs)}/{len(rs)}"
                row["ratio"] = ratio(row["proxy"], row["direct"])
                if anchor:
                    row["anchor_ratio"] = ratio(row["anchor"], row["direct"])
                    row["proxy_anchor_ratio"] = ratio(row["proxy"], row["anchor"])
                rows.append(row)
        for server in ["proxy", *extras] + (["anchor"] if anchor else []):
            # the "proxy_*" keys are the server of the row: a variant's or the anchor's numbers
            cpu = {"workload": wl.name if server == "proxy" else f"{wl.name} [{server}]", "metric": "cpu",
                   "key": "cpu", "target": server}  # fmt: skip
            for col, t in (("direct", "direct"), ("proxy", server)):
                rs = by_target[t]
                cpu[f"{col}_loadgen_cpu_s"] = median_of(rs, lambda r: r.get("loadgen_cpu_s"))
                cpu[f"{col}_broker_cpu_s"] = median_of(rs, lambda r: r.get("broker_cpu_s"))
            cpu["proxy_cpu_s"] = median_of(by_target[server], lambda r: r.get("proxy_cpu_s"))
            cpu["proxy_wall_s"] = median_of(by_target[server], lambda r: r.get("wall_s"))
            cpu["proxy_us_per_msg"] = median_of(by_target[server], lambda r: r.get("proxy_us_per_msg"))
            rows.append(cpu)
    return rows


def short_error(text: str | None) -> str:
    """The error without traceback frames (the JSON keeps the full text)."""
    lines = [ln for ln in str(text).splitlines() if ln.strip() and not ln.startswith((" ", "Traceback"))]
    return "\n".join(lines)


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def print_table(rows: list[dict], rounds: int) -> None:
    metric_rows = [r for r in rows if r["metric"] != "cpu"]
    anchor = any("anchor" in r for r in metric_rows)
    if anchor:
        print(f"\nMedians over {rounds} round(s); p/d = proxy / direct, a/d = anchor / direct, p/a = proxy / anchor")
        head = (
            f"{'workload':<25} {'metric':<28} {'better':<6} {'direct':>10} {'proxy':>10} {'anchor':>10}"
            f" {'p/d':>6} {'a/d':>6} {'p/a':>6}  {'ok d/p/a':>13}"
        )
    else:
        print(f"\nMedians over {rounds} round(s); ratio = proxy / direct")
        head = f"{'workload':<25} {'metric':<28} {'better':<6} {'direct':>10} {'proxy':>10} {'ratio':>7}  {'ok d/p':>9}"
    print(head)
    print("-" * len(head))
    for r in metric_rows:
        better = "higher" if r["higher_is_better"] else "lower"
        line = f"{r['workload']:<25} {r['metric']:<28} {better:<6} {fmt(r['direct']):>10} {fmt(r['proxy']):>10}"
        if anchor:
            ok = f"{r['direct_ok']} {r['proxy_ok']} {r['anchor_ok']}"
            line += (
                f" {fmt(r['anchor']):>10} {fmt(r['ratio']):>6} {fmt(r['anchor_ratio']):>6}"
                f" {fmt(r['proxy_anchor_ratio']):>6}  {ok:>13}"
            )
        else:
            line += f" {fmt(r['ratio']):>7}  {r['direct_ok'] + ' ' + r['proxy_ok']:>9}"
        print(line)
    print(
        "\nCPU seconds per run (medians; whole run incl. setup and warm-up; %core = CPU s / run wall time;"
        " broker is informational" + ("; [anchor] rows: the anchor's process" if anchor else "") + ")"
    )
    head = (
        f"{'workload':<36} {'proxy':>7} {'proxy %core':>11} {'loadgen d':>10} {'loadgen p':>10}"
        f" {'loadgen p %core':>15} {'broker d':>9} {'broker p':>9} {'proxy us/msg':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["metric"] != "cpu":
            continue
        wall = r["proxy_wall_s"]
        util = r["proxy_cpu_s"] / wall * 100 if r["proxy_cpu_s"] is not None and wall else None
        lutil = r["proxy_loadgen_cpu_s"] / wall * 100 if r["proxy_loadgen_cpu_s"] is not None and wall else None
        print(
            f"{r['workload']:<36} {fmt(r['proxy_cpu_s']):>7} {fmt(util, 0):>11}"
            f" {fmt(r['direct_loadgen_cpu_s']):>10} {fmt(r['proxy_loadgen_cpu_s']):>10} {fmt(lutil, 0):>15}"
            f" {fmt(r['direct_broker_cpu_s']):>9} {fmt(r['proxy_broker_cpu_s']):>9}"
            f" {fmt(r['proxy_us_per_msg'], 1):>12}"
        )


def print_idle(runs: list[dict], counts: list[int]) -> None:
    idle = [r for r in runs if r["workload"] == "idle" and r["ok"]]
    if not idle:
        return
    servers = list(dict.fromkeys(r["target"] for r in idle))
    named = servers != ["proxy"]
    if named:
        print(f"\nIdle clients ({', '.join(servers)}; medians over rounds; RSS of each server's process tree)")
    else:
        print("\nIdle clients (proxy only; medians over rounds; RSS of the proxy process tree)")
    head = (
        (f"{'target':<8} " if named else "")
        + f"{'clients':>8} {'open/s':>8} {'held':>7} {'errors':>6} {'RSS before MB':>13} {'with MB':>8}"
        f" {'after MB':>8} {'KB/client':>9} {'returned %':>10} {'upstreams':>20}"
    )
    print(head)
    print("-" * len(head))
    for server in servers:
        mine = [r for r in idle if r["target"] == server]
        for n in counts:

            def med(key: str, n: int = n, mine: list[dict] = mine) -> float | None:
                return median_of(mine, lambda run: run["metrics"].get(f"{key}_{n}"))

            ups = mine[-1]["metrics"].get(f"upstream_connections_{n}")
            print(
                (f"{server:<8} " if named else "")
                + f"{n:>8} {fmt(med('open_per_s')):>8} {fmt(med('held'), 0):>7} {fmt(med('errors'), 0):>6}"
                f" {fmt(med('rss_before_mb'), 1):>13} {fmt(med('rss_with_mb'), 1):>8}"
                f" {fmt(med('rss_after_mb'), 1):>8} {fmt(med('rss_per_client_kb'), 1):>9}"
                f" {fmt(med('returned_pct'), 0):>10} {str(ups):>20}"
            )
