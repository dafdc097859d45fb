"""Fixtures of the cluster suite: three RabbitMQ nodes of the suite's own clustered together
(tests/support/cluster.py), started once per session, and proxies given all three as --upstream.

Every test module here marks its tests `cluster`; the default `tox` runs only those also marked
`cluster_smoke`, `tox -e cluster` runs them all. The `target` fixture of the main suite is
overridden: `direct` is the cluster's first node, `proxy` a proxy in front of all three, so the
direct-vs-proxy tests read as they do elsewhere.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pika.exceptions
import pytest

from tests.support.cluster import Cluster, ClusterError
from tests.support.haproxy import HAProxy, HAProxyError, haproxy_binary
from tests.support.own_node import OwnBrokerError, rabbitmq_sbin
from tests.support.ports import unique_name
from tests.support.proxy import ProxyProcess, ProxyStartError
from tests.support.target import Target

_START_SECONDS_KEY = pytest.StashKey[float]()
_LOGS_KEY = pytest.StashKey[list]()  # (title, callable returning text) per test, for failure reports
_FIGURES_KEY = pytest.StashKey[list]()  # measured figures, printed at the end of the run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for title, text in item.stash.get(_LOGS_KEY, []):
            report.sections.append((title, text()))


def attach_log(request, title: str, text) -> None:
    """Show `text()` (a log tail) in the report if this test fails."""
    request.node.stash.setdefault(_LOGS_KEY, []).append((title, text))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    seconds = config.stash.get(_START_SECONDS_KEY, None)
    figures = config.stash.get(_FIGURES_KEY, [])
    if seconds is None and not figures:
        return
    terminalreporter.write_sep("=", "cluster suite figures")
    if seconds is not None:
        terminalreporter.write_line(f"RabbitMQ cluster of 3 own nodes started and formed in {seconds:.1f} s")
    for line in figures:
        terminalreporter.write_line(line)


@pytest.fixture
def figures(request):
    """figures(line): a measured figure, printed in the run's summary (docs/DEPLOYMENT.md quotes them)."""

    def add(line: str) -> None:
        request.config.stash.setdefault(_FIGURES_KEY, []).append(f"{request.node.name}: {line}")

    return add


@pytest.fixture(scope="session")
def _cluster(request, tmp_path_factory):
    sbin = rabbitmq_sbin()
    if sbin is None:
        pytest.skip("rabbitmq-server / rabbitmqctl not found (set AMQPROXY_TEST_RABBITMQ_SBIN)")
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), sbin)
    started = time.monotonic()
    try:
        cluster.start()
    except (ClusterError, OwnBrokerError, subprocess.SubprocessError) as e:
        for node in cluster.nodes:
            node.pid = node.pid or node.read_pid_file()
        tails = "\n".join(f"--- {name} ---\n{tail}" for name, tail in cluster.log_tails().items())
        cluster.stop()
        pytest.fail(f"cannot start the RabbitMQ cluster: {e}\n{tails}", pytrace=False)
    request.config.stash[_START_SECONDS_KEY] = time.monotonic() - started
    try:
        yield cluster
    finally:
        cluster.stop()
        cluster.remove_data()


@pytest.fixture
def cluster(request, _cluster) -> Cluster:
    """The session's cluster, whole and healthy before and after the test (a killed node is
    started again, a stopped app started, a drained node revived)."""
    _cluster.ensure_healthy()
    for node in _cluster.nodes:
        attach_log(request, f"cluster node log ({node.nodename}, last 40 lines)", lambda node=node: node.log_tail(40))
    yield _cluster
    _cluster.ensure_healthy()


@pytest.fixture(scope="session")
def _cluster_proxy(_cluster, tmp_path_factory):
    proc = ProxyProcess(tmp_path_factory.mktemp("cluster-proxy") / "proxy.log", _cluster.upstream_args(), upstream=None)
    proc.start()
    try:
        proc.wait_ready()
    except ProxyStartError as e:
        proc.stop()
        pytest.fail(str(e), pytrace=False)
    yield proc
    proc.stop()


@pytest.fixture
def cluster_proxy(request, cluster, _cluster_proxy) -> ProxyProcess:
    """A proxy with default options in front of all three nodes, shared by the session."""
    attach_log(request, f"cluster proxy log ({_cluster_proxy.log_path}, last 200 lines)", _cluster_proxy.log_tail)
    if not _cluster_proxy.alive:
        pytest.fail(f"the cluster proxy died (code {_cluster_proxy.returncode})", pytrace=False)
    yield _cluster_proxy
    if not _cluster_proxy.alive:
        pytest.fail(f"the cluster proxy died during this test (code {_cluster_proxy.returncode})", pytrace=False)


@pytest.fixture
def cluster_proxy_factory(cluster, proxy_factory):
    """start(*extra_args) -> a fresh, ready proxy in front of all three nodes (stopped at teardown)."""

    def start(*extra_args: str, wait: bool = True) -> ProxyProcess:
        return proxy_factory(*cluster.upstream_args(), *extra_args, wait=wait, upstream=None)

    return start


@pytest.fixture
def target(request, cluster) -> Target:
    """Parametrized by the main suite (AMQPROXY_TEST_TARGETS): `direct` is the cluster's first
    node, `proxy` the shared proxy in front of all three."""
    if request.param == "direct":
        return Target("direct", cluster.seed.host, cluster.seed.port)
    if request.param == "proxy":
        return request.getfixturevalue("cluster_proxy").target()
    raise ValueError(request.param)


class ClusterQueues:
    """Unique queue names, deleted at teardown through a direct connection to a running node."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.names: list[str] = []

    def __call__(self, prefix: str = "q") -> str:
        name = unique_name(prefix)
        self.names.append(name)
        return name

    def cleanup(self) -> None:
        if not self.names:
            return
        node = self.cluster.alive()[0]
        conn = Target("cleanup", node.host, node.port).pika()
        try:
            for name in self.names:
                ch = conn.channel()
                try:
                    ch.queue_delete(name)
                    ch.close()
                except pika.exceptions.ChannelClosedByBroker:
                    pass
        finally:
            if conn.is_open:
                conn.close()


@pytest.fixture
def queues(cluster):
    q = ClusterQueues(cluster)
    yield q
    q.cleanup()


class Fleet:
    """`size` amqproxy instances in front of the cluster (--accept-proxy-protocol), behind one real
    HAProxy (tests/support/haproxy.py); an instance can be restarted on its own ports."""

    def __init__(self, base_dir: Path, cluster: Cluster, size: int, args: tuple[str, ...]) -> None:
        self.base_dir = base_dir
        self.args = [*cluster.upstream_args(), "--accept-proxy-protocol", "true", *args]
        self.proxies = [self._proxy(i, 1) for i in range(size)]
        self.generation = [1] * size
        self.all = list(self.proxies)
        self.haproxy = HAProxy(base_dir / "haproxy", self.proxies)

    def _proxy(self, index: int, generation: int) -> ProxyProcess:
        return ProxyProcess(self.base_dir / f"proxy-{index + 1}.{generation}.log", self.args, upstream=None)

    def start(self) -> Fleet:
        for proc in self.proxies:
            proc.start()
        for proc in self.proxies:
            proc.wait_ready()
        self.haproxy.start()
        self.haproxy.wait_all_up()
        return self

    def restart(self, index: int) -> ProxyProcess:
        """Start instance `index` again on its ports (the old process must have exited)."""
        old = self.proxies[index]
        self.generation[index] += 1
        new = self._proxy(index, self.generation[index])
        new.port, new.http_port = old.port, old.http_port
        self.proxies[index] = new
        self.all.append(new)
        new.start()
        new.wait_ready()
        return new

    def stop(self) -> None:
        self.haproxy.stop()
        for proc in self.all:
            proc.stop()


@pytest.fixture
def fleet(request, cluster, tmp_path):
    """start(size, *proxy_args) -> a started Fleet (stopped at teardown)."""
    if haproxy_binary() is None:
        pytest.skip("haproxy not installed (apt-get install haproxy; .ci/run installs it)")
    fleets: list[Fleet] = []

    def start(size: int, *args: str) -> Fleet:
        f = Fleet(tmp_path / f"fleet-{len(fleets) + 1}", cluster, size, args)
        fleets.append(f)
        attach_log(request, "haproxy log (last 80 lines)", f.haproxy.log_tail)
        attach_log(
            request,
            "amqproxy logs of the fleet (last 60 lines each)",
            lambda f=f: "\n".join(f"--- {p.log_path.name} ---\n{p.log_tail(60)}" for p in f.all),
        )
        try:
            return f.start()
        except (ProxyStartError, HAProxyError) as e:
            pytest.fail(str(e), pytrace=False)

    yield start
    for f in fleets:
        f.stop()
