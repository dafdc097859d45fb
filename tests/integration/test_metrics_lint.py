"""The /metrics exposition checked by the ecosystem's own tools and rules, one process and
--workers 2: `promtool check metrics` (Debian's prometheus package) finds nothing, names and units
follow the Prometheus conventions, every query of the Grafana dashboard
(appliance/grafana/amqproxy-dashboard.json) names a metric the proxy exposes, and the README's
metrics table lists exactly the metrics there are.

Each proxy sees some traffic first (clients, a refused login, a limit's refusal, a node that is
down, an upstream closed when idle), so that labelled series exist: under --workers a metric that
never had a sample is not exposed at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import urllib.request
from dataclasses import dataclass

import pika
import pika.exceptions
import pytest

from tests.support.proxy import ProxyProcess
from tests.support.settings import REPO_ROOT, UPSTREAM_URL

from ._support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.proxy_only]

DASHBOARD = REPO_ROOT / "appliance" / "grafana" / "amqproxy-dashboard.json"
README = REPO_ROOT / "README.md"
PROMTOOL = shutil.which("promtool")
MODES = {"one process": [], "--workers 2": ["--workers", "2"]}
# Metrics only a --workers supervisor exposes.
WORKERS_ONLY = {"amqproxy_workers_configured", "amqproxy_workers_alive"}


@dataclass
class Exposition:
    mode: str
    text: str

    @property
    def types(self) -> dict[str, str]:
        """Family name -> type, from the # TYPE lines (each family exactly once)."""
        pairs = re.findall(r"^# TYPE (\S+) (\S+)$", self.text, re.M)
        names = [name for name, _type in pairs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        assert not duplicates, f"{self.mode}: families declared twice: {duplicates}"
        return dict(pairs)

    @property
    def helps(self) -> dict[str, str]:
        return dict(re.findall(r"^# HELP (\S+) (.*)$", self.text, re.M))

    @property
    def samples(self) -> set[str]:
        return set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", self.text, re.M))

    def ours(self) -> dict[str, str]:
        """The amqproxy_ families, without prometheus-client's _created companions."""
        types = self.types
        return {
            name: kind
            for name, kind in types.items()
            if name.startswith("amqproxy_") and not (name.endswith("_created") and _created_of(name, types) is not None)
        }


def _created_of(name: str, types: dict[str, str]) -> str | None:
    base = name[: -len("_created")]
    for candidate in (base + "_total", base):
        if types.get(candidate) in ("counter", "histogram", "summary"):
            return candidate
    return None


LIMIT_PER_USER = 2


def connect(proc: ProxyProcess, password: str = "guest") -> pika.BlockingConnection:
    credentials = pika.PlainCredentials("guest", password)
    conn = pika.BlockingConnection(pika.ConnectionParameters(proc.host, proc.port, credentials=credentials))
    channel = conn.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.basic_publish("", queue, b"x" * 200)
    channel.basic_get(queue, auto_ack=True)
    return conn


def exercise(proc: ProxyProcess, workers: int) -> None:
    """Traffic that gives the labelled metrics their series; every connection closed after."""
    conns: list[pika.BlockingConnection] = []
    try:
        # --max-connections-per-user counts per worker: at most this many can be admitted.
        for _ in range(LIMIT_PER_USER * workers + 1):
            conns.append(connect(proc))
    except pika.exceptions.AMQPConnectionError as exc:
        assert "user connection limit" in str(exc)
    else:
        pytest.fail(f"no connection refused by --max-connections-per-user {LIMIT_PER_USER}")
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        connect(proc, password="wrong")
    for conn in conns:
        conn.close()


def scrape(proc: ProxyProcess) -> str:
    with urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/metrics", timeout=10) as response:
        return response.read().decode()


@pytest.fixture(scope="module", params=list(MODES))
def exposition(request, tmp_path_factory):
    with socket.socket() as dead:  # bound, never listening: a node that is down
        dead.bind(("127.0.0.1", 0))
        args = [
            "--upstream", f"amqp://127.0.0.1:{dead.getsockname()[1]}", "--upstream", UPSTREAM_URL,
            "--breaker-failures", "1", "--idle-timeout", "1", "--max-connections-per-user", "2",
            *MODES[request.param],
        ]  # fmt: skip
        proc = ProxyProcess(tmp_path_factory.mktemp("metrics") / "proxy.log", args)
        try:
            proc.start().wait_ready()
            exercise(proc, workers=2 if "--workers" in args else 1)

            def closed_when_idle() -> bool:  # by the janitor, --idle-timeout 1 after the last channel left
                return "\namqproxy_upstream_connections_closed_total{" in scrape(proc)

            wait_until(closed_when_idle, timeout=10, msg="no upstream connection closed after --idle-timeout 1")
            keep = connect(proc)  # the live gauges of a credential set exist while it has clients

            def live() -> str | None:  # under --workers, bridged to the supervisor's files within a tick
                text = scrape(proc)
                return text if all(f"\n{name}{{" in text for name in ("amqproxy_client_connections",
                                                                     "amqproxy_pool_channels")) else None  # fmt: skip

            text = wait_until(live, timeout=5, msg="no live gauges of the client's credential set")
            keep.close()
        finally:
            proc.stop()
    yield Exposition(request.param, text)


def test_promtool_check_metrics_finds_nothing(exposition):
    if PROMTOOL is None:
        reason = "promtool is not installed (Debian package prometheus; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition.text, capture_output=True, text=True)
    problems = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not problems, f"{exposition.mode}: promtool check metrics:\n{problems}"


def test_names_and_units_follow_the_prometheus_conventions(exposition):
    types, helps = exposition.types, exposition.helps
    ours = exposition.ours()
    assert len(ours) > 20, sorted(ours)
    for name, kind in ours.items():
        assert re.fullmatch(r"amqproxy_[a-z][a-z0-9_]*", name), f"{name}: snake case under the amqproxy_ prefix"
        assert helps.get(name), f"{name}: no HELP text"
        if kind == "counter":
            assert name.endswith("_total"), f"counter {name}: ends in _total"
        else:
            assert not name.endswith("_total"), f"{kind} {name}: only counters end in _total"
        words = name.split("_")
        # Base units, spelt out and plural (seconds, bytes), as the unit's suffix.
        assert not set(words) & {"ms", "us", "sec", "secs", "millis", "milliseconds", "minutes", "hours",
                                 "kb", "mb", "kilobytes", "megabytes", "percent", "pct", "count"}, name  # fmt: skip
        base = name.removesuffix("_total")
        if set(words) & {"duration", "latency", "seconds", "age", "time"}:
            assert base.endswith("_seconds"), f"{name}: a time is in seconds, and says so last"
        if "bytes" in words:
            assert base.endswith("_bytes"), f"{name}: a size is in bytes, and says so last"
        assert not set(words) & {"counter", "gauge", "histogram", "summary"}, f"{name}: no type in the name"
    # Bounded labels: never connection ids, queue names or addresses.
    label_names = set(re.findall(r"[{,]([a-zA-Z_][a-zA-Z0-9_]*)=", exposition.text))
    assert not label_names & {"id", "client_id", "connection", "queue", "remote", "address", "password"}
    assert all(kind in ("counter", "gauge", "histogram", "summary", "info") for kind in types.values())


# ------------------------------------------------------------------ the dashboard

_NOT_METRICS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
}  # fmt: skip


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label matchers and
    label lists left out); label_values(metric, label) of Grafana's templating is unwrapped."""
    expr = re.sub(r"label_values\(\s*([^,]+?)\s*,\s*[a-zA-Z_]\w*\s*\)", r"\1", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w$.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group(0).lower() in _NOT_METRICS:
            continue  # a function or aggregation, or a keyword
        names.add(match.group(0))
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str) and value:
                    queries.append(value)
                elif key == "query" and isinstance(value, str) and value and node.get("type") == "query":
                    queries.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return queries


def test_the_promql_reader_finds_the_metrics_of_a_query():
    expr = (
        'histogram_quantile(0.99, sum by (le, direction) (rate(amqproxy_forwarding_latency_seconds_bucket'
        '{instance=~"$instance", x="a{b}"}[$__rate_interval]))) / ignoring(x) up offset 5m'
    )  # fmt: skip
    assert promql_metrics(expr) == {"amqproxy_forwarding_latency_seconds_bucket", "up"}
    assert promql_metrics("label_values(amqproxy_build_info, instance)") == {"amqproxy_build_info"}


def test_every_dashboard_query_names_metrics_the_proxy_exposes(exposition):
    queries = dashboard_queries()
    assert len(queries) >= 20, "the dashboard's queries were not found"
    exposed = exposition.samples | set(exposition.types)
    for query in queries:
        names = promql_metrics(query)
        assert names, f"no metric found in the dashboard query {query!r}"
        missing = sorted(names - exposed)
        assert not missing, f"{exposition.mode}: the dashboard query {query!r} uses {missing}, not exposed"


# ------------------------------------------------------------------ the README


def readme_metrics() -> set[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`(amqproxy_[a-z0-9_]+)`", line.split("|")[1]))
    return names


def test_the_readme_lists_every_metric_and_only_those(exposition):
    listed = readme_metrics()
    ours = set(exposition.ours())
    missing = sorted(ours - listed)
    assert not missing, f"{exposition.mode}: exposed but not in the README's metrics table: {missing}"
    expected = listed - (WORKERS_ONLY if exposition.mode == "one process" else set())
    if exposition.mode == "one process":  # every family is declared here, samples or not
        assert sorted(expected - ours) == [], "in the README's metrics table but not exposed"
    else:
        assert WORKERS_ONLY <= ours
