"""The benchmark's machinery (loadtests/benchmark/) keeps working as the proxy and the test support
change: its ratios and tables with and without an anchor, the anchor's log, and short real runs
of churn and idle through each kind of target (the broker, our proxy, the cloudamqp/amqproxy
anchor when its binary is on the machine). Speed is never checked here, only that every number
the report needs is measured and every check holds."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.settings import BROKER_HOST, BROKER_PORT, REPO_ROOT, UPSTREAM_URL


def _benchmark_package(name: str = "loadtests_benchmark"):
    """loadtests/benchmark under a name of its own: inside pytest `loadtests` is this directory
    (tests/loadtests), not the repository's loadtests/ (the package imports itself relatively)."""
    if name not in sys.modules:
        init = REPO_ROOT / "loadtests" / "benchmark" / "__init__.py"
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return lambda module: importlib.import_module(f"{name}.{module}")


_module = _benchmark_package()
print_table, summarize = _module("report").print_table, _module("report").summarize
run_one, note_proxy_log = _module("runner").run_one, _module("runner").note_proxy_log
Admin, Anchor, ProxyServer, Target = (
    getattr(_module("targets"), n) for n in ("Admin", "Anchor", "ProxyServer", "Target")
)
WORKLOADS, Settings, idle_metrics = (
    getattr(_module("workloads"), n) for n in ("WORKLOADS", "Settings", "idle_metrics")
)

ANCHOR = Path(os.environ.get("AMQPROXY_TEST_ANCHOR", "/work/shared/anchors/cloudamqp-amqproxy-3.1.3"))
SHORT = Settings(warmup=0.2, duration=0.6, body_size=16, confirm_window=10, latency_rate=100, churn_workers=2,
                 idle_clients=[20], idle_procs=1, idle_hold=0.2, idle_settle=0.2)  # fmt: skip


def _run(target: str, cycles: float, cpu: float | None = None) -> dict:
    metrics = {"cycles_per_s": cycles}
    return {"workload": "churn", "target": target, "round": 1, "ok": True, "metrics": metrics, "checks_failed": [],
            "proxy_cpu_s": cpu, "wall_s": 2.0, "loadgen_cpu_s": 0.5}  # fmt: skip


def test_summary_gives_the_anchor_its_ratios_and_its_cpu_row():
    runs = [_run("direct", 100), _run("proxy", 150, 0.4), _run("anchor", 300, 0.1)]
    rows = summarize(runs, [WORKLOADS["churn"]])
    cycles = next(r for r in rows if r["key"] == "cycles_per_s")
    assert (cycles["direct"], cycles["proxy"], cycles["anchor"]) == (100, 150, 300)
    assert (cycles["ratio"], cycles["anchor_ratio"], cycles["proxy_anchor_ratio"]) == (1.5, 3.0, 0.5)
    cpu = {r["target"]: r for r in rows if r["metric"] == "cpu"}
    assert cpu["anchor"]["workload"] == "churn [anchor]" and cpu["anchor"]["proxy_cpu_s"] == 0.1
    assert cpu["proxy"]["workload"] == "churn" and cpu["proxy"]["proxy_cpu_s"] == 0.4


def test_without_an_anchor_the_rows_and_the_table_are_as_before(capsys):
    rows = summarize([_run("direct", 100), _run("proxy", 150, 0.4)], [WORKLOADS["churn"]])
    assert not any("anchor" in r or "anchor_ratio" in r for r in rows)
    print_table(rows, 1)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("workload") and "better" in line)
    assert header.split() == ["workload", "metric", "better", "direct", "proxy", "ratio", "ok", "d/p"]
    assert "ratio = proxy / direct" in out and "[anchor]" not in out


def test_with_an_anchor_the_table_shows_its_column_and_ratios(capsys):
    rows = summarize([_run("direct", 100), _run("proxy", 150, 0.4), _run("anchor", 300, 0.1)], [WORKLOADS["churn"]])
    print_table(rows, 1)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("workload") and "better" in line)
    assert header.split()[3:9] == ["direct", "proxy", "anchor", "p/d", "a/d", "p/a"]
    line = next(line for line in out.splitlines() if "cycles/s" in line)
    assert line.split()[3:10] == ["100", "150", "300", "1.50", "3.00", "0.50", "1/1"]
    assert "churn [anchor]" in out


def test_the_anchor_log_problems_are_its_warnings_and_lines_of_another_shape(tmp_path):
    log = tmp_path / "anchor.log"
    log.write_text(
        "# cloudamqp-amqproxy --listen=127.0.0.1\n"
        "2026-12-03T11:43:15.683865Z  INFO amq_proxy.server Proxy listening on 127.0.0.1:5673\n"
        "2026-12-03T11:43:16.000000Z  WARN amq_proxy.upstream Upstream closed: 320 CONNECTION_FORCED\n"
        "2026-12-03T11:43:17.000000Z ERROR amq_proxy.client Client disconnected: Broken pipe\n"
        "Unhandled exception: Index out of bounds (IndexError)\n"
    )
    anchor = Anchor(Path("/nonexistent"), UPSTREAM_URL, log)
    assert anchor.log_problems_since(0) == [
        {"level": "WARN", "message": "amq_proxy.upstream Upstream closed: 320 CONNECTION_FORCED"},
        {"level": "ERROR", "message": "amq_proxy.client Client disconnected: Broken pipe"},
        {"level": "RAW", "message": "Unhandled exception: Index out of bounds (IndexError)"},
    ]
    assert anchor.log_problems_since(log.stat().st_size) == []


def test_our_proxy_losing_an_upstream_is_a_failed_check_and_stray_lines_are_shown(tmp_path):
    log = tmp_path / "proxy.log"
    log.write_text(
        "# python -m amqproxy --listen 127.0.0.1:5673\n"
        '{"level": "INFO", "message": "client open", "event": "client_open"}\n'
        '{"level": "WARNING", "message": "upstream lost", "event": "upstream_lost", "cause": "reset"}\n'
        "Traceback (most recent call last):\n"
    )
    rec = {"checks_failed": []}
    note_proxy_log(rec, ProxyServer(UPSTREAM_URL, [], log).log_problems_since(0))
    assert rec["checks_failed"] == ["proxy lost 1 upstream connection(s): reset"]
    assert rec["proxy_log_problems"] == [
        "WARNING upstream lost (event=upstream_lost, cause=reset)",
        "RAW Traceback (most recent call last):",
    ]


def _churn_and_idle(target: Target) -> tuple[dict, dict]:
    admin = Admin(Target("direct", BROKER_HOST, BROKER_PORT))
    WORKLOADS["idle"].metrics = idle_metrics(SHORT.idle_clients)
    try:
        churn = run_one(WORKLOADS["churn"], target, 1, SHORT, admin, None)
        idle = run_one(WORKLOADS["idle"], target, 1, SHORT, admin, None) if target.server else {}
    finally:
        admin.cleanup()
    for rec in (churn, idle):
        assert not rec or (rec["ok"] and not rec["checks_failed"]), rec
    m = churn["metrics"]
    assert churn["left_in_queue"] == churn["settled_in_queue"] > 0  # every cycle's message arrived
    assert m["cycles_per_s"] > 0
    assert 0 < m["handshake_p50_ms"] <= m["handshake_p99_ms"]
    assert 0 < m["channel_open_p50_ms"] <= m["channel_open_p99_ms"]
    return churn, idle


def _check_server_numbers(churn: dict, idle: dict) -> None:
    assert churn["proxy_cpu_s"] is not None and churn["metrics"]["proxy_cpu_ms_per_cycle"] is not None
    n = SHORT.idle_clients[0]
    assert idle["metrics"][f"held_{n}"] == n and idle["metrics"][f"clients_left_after_{n}"] == 0
    assert idle["metrics"][f"rss_with_mb_{n}"] > 0 and idle["metrics"][f"open_per_s_{n}"] > 0


@pytest.mark.integration
def test_churn_direct_measures_the_handshake_without_server_numbers():
    churn, _ = _churn_and_idle(Target("direct", BROKER_HOST, BROKER_PORT))
    assert "proxy_cpu_ms_per_cycle" not in churn["metrics"] and "proxy_cpu_s" not in churn


@pytest.mark.integration
def test_churn_and_idle_through_our_proxy(tmp_path):
    proxy = ProxyServer(UPSTREAM_URL, [], tmp_path / "proxy.log")
    try:
        proxy.up()
        _check_server_numbers(*_churn_and_idle(proxy.target()))
    finally:
        proxy.stop()


@pytest.mark.integration
@pytest.mark.skipif(not os.access(ANCHOR, os.X_OK), reason=f"no cloudamqp/amqproxy binary at {ANCHOR}")
def test_churn_and_idle_through_the_anchor(tmp_path):
    anchor = Anchor(ANCHOR, UPSTREAM_URL, tmp_path / f"anchor-{uuid.uuid4().hex[:6]}.log")
    try:
        anchor.up()
        churn, idle = _churn_and_idle(anchor.target())
        _check_server_numbers(churn, idle)
        assert idle["metrics"][f"upstream_connections_{SHORT.idle_clients[0]}"] is not None
        assert anchor.log_problems_since(0) == []
    finally:
        anchor.stop()
