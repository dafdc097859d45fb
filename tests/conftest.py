"""Shared pytest fixtures for the amqproxy test suite.

Integration tests talk to a real RabbitMQ broker, either directly (target
``direct``) or through an amqproxy subprocess (target ``proxy``), and assert
identical observable outcomes for both.

Environment variables:

``AMQPROXY_TEST_TARGETS``
    Comma separated list of targets the ``target`` fixture is parametrized
    over (default ``direct,proxy``).  Tests that only make sense through the
    proxy are skipped when ``proxy`` is not listed.
``AMQPROXY_TEST_BROKER``
    ``host:port`` of the RabbitMQ broker (default ``127.0.0.1:5672``).
``AMQPROXY_TEST_DEFAULT_TIMEOUT``
    Per-test timeout in seconds applied (via pytest-timeout) to every test
    that has no ``timeout`` marker, unless a timeout was configured on the
    command line, in an ini file or by ``PYTEST_TIMEOUT`` (default 60).
``AMQPROXY_TEST_RABBITMQ_SBIN``
    Directory of the ``rabbitmq-server`` and ``rabbitmqctl`` scripts used to
    run the ``own_broker`` nodes (default ``/usr/lib/rabbitmq/bin``, else the
    directory of ``rabbitmq-server`` on PATH).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

# `tests.support` is importable however pytest was started (python -m pytest adds the cwd).
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.broker import Broker  # noqa: E402
from tests.support.own_node import OwnBroker, OwnBrokerError, rabbitmq_sbin  # noqa: E402
from tests.support.ports import unique_name  # noqa: E402
from tests.support.proxy import ProxyProcess, ProxyStartError  # noqa: E402
from tests.support.settings import BROKER_HOST, BROKER_PORT, LOG_TAIL_LINES, UPSTREAM_URL  # noqa: E402
from tests.support.target import Target  # noqa: E402

ALL_TARGETS = ("direct", "proxy")
TARGETS = tuple(t.strip() for t in os.environ.get("AMQPROXY_TEST_TARGETS", "direct,proxy").split(",") if t.strip())
for _t in TARGETS:
    if _t not in ALL_TARGETS:
        raise RuntimeError(f"AMQPROXY_TEST_TARGETS: unknown target {_t!r} (known: {ALL_TARGETS})")

DEFAULT_TIMEOUT = float(os.environ.get("AMQPROXY_TEST_DEFAULT_TIMEOUT", "60"))

_PROXIES_KEY = pytest.StashKey[list]()
_OWN_BROKERS_KEY = pytest.StashKey[list]()


# --------------------------------------------------------------------------
# pytest hooks
# --------------------------------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: test needs a running RabbitMQ broker")
    config.addinivalue_line(
        "markers",
        "proxy_only: test only makes sense through amqproxy (skipped unless 'proxy' is in AMQPROXY_TEST_TARGETS)",
    )
    config.addinivalue_line(
        "markers",
        "targets(*names): restrict the `target` fixture of a test to these "
        "targets (intersected with AMQPROXY_TEST_TARGETS)",
    )
    if not config.pluginmanager.hasplugin("timeout"):
        # Keep the marker known so that tests still collect without the plugin.
        config.addinivalue_line("markers", "timeout(seconds): per-test timeout (needs pytest-timeout)")


def _timeout_configured(config) -> bool:
    try:
        if config.getoption("timeout") is not None:
            return True
    except ValueError:
        return False
    if os.environ.get("PYTEST_TIMEOUT"):
        return True
    try:
        return bool(config.getini("timeout"))
    except ValueError:
        return False


def pytest_collection_modifyitems(config, items):
    integration_dir = Path(__file__).resolve().parent / "integration"
    add_timeout = config.pluginmanager.hasplugin("timeout") and not _timeout_configured(config)
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if integration_dir in path.parents:
            item.add_marker(pytest.mark.integration)
        if add_timeout and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))
        if item.get_closest_marker("proxy_only") and "proxy" not in TARGETS:
            item.add_marker(pytest.mark.skip(reason="proxy not in AMQPROXY_TEST_TARGETS"))


def pytest_generate_tests(metafunc):
    if "target" not in metafunc.fixturenames:
        return
    wanted = list(TARGETS)
    marker = metafunc.definition.get_closest_marker("targets")
    if marker is not None:
        wanted = [t for t in wanted if t in marker.args]
    if not wanted:
        # Parametrize with a skipped placeholder so the test shows up as skipped.
        metafunc.parametrize(
            "target",
            [pytest.param("none", marks=pytest.mark.skip(reason="no target selected"))],
            indirect=True,
        )
        return
    metafunc.parametrize("target", wanted, indirect=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for proc in item.stash.get(_PROXIES_KEY, []):
        report.sections.append(
            (
                f"amqproxy log (pid {proc.pid}, {proc.log_path}, last {LOG_TAIL_LINES} lines)",
                proc.log_tail(LOG_TAIL_LINES),
            )
        )
    for node in item.stash.get(_OWN_BROKERS_KEY, []):
        report.sections.append((f"own RabbitMQ node log ({node.log_path}, last 60 lines)", node.log_tail(60)))


def _record_proxy(request, proc: ProxyProcess) -> None:
    lst = request.node.stash.setdefault(_PROXIES_KEY, [])
    if proc not in lst:
        lst.append(proc)


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def broker() -> Broker:
    return Broker()


class _ProxyHolder:
    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self.current: ProxyProcess | None = None
        self.generation = 0
        self.all: list[ProxyProcess] = []

    def ensure(self) -> ProxyProcess:
        if self.current is not None and self.current.alive:
            return self.current
        self.generation += 1
        proc = ProxyProcess(self.base_dir / f"proxy-{self.generation}.log")
        self.all.append(proc)
        self.current = proc
        proc.start()
        try:
            proc.wait_ready()
        except ProxyStartError:
            proc.stop()
            raise
        return proc


@pytest.fixture(scope="session")
def _proxy_holder(tmp_path_factory):
    holder = _ProxyHolder(tmp_path_factory.mktemp("amqproxy-shared"))
    yield holder
    for proc in holder.all:
        proc.stop()


@pytest.fixture(scope="session")
def _proxy_start_failure():
    # Remember a start failure so that the 15 s wait is not repeated per test.
    return {}


@pytest.fixture
def proxy(request, _proxy_holder, _proxy_start_failure) -> ProxyProcess:
    """The shared amqproxy instance (default options), restarted if a previous
    test killed it.  Fails the test at teardown if the proxy died during it."""
    if "proxy" not in TARGETS:
        pytest.skip("proxy not in AMQPROXY_TEST_TARGETS")
    if "error" in _proxy_start_failure:
        pytest.fail(_proxy_start_failure["error"], pytrace=False)
    try:
        proc = _proxy_holder.ensure()
    except ProxyStartError as e:
        _proxy_start_failure["error"] = str(e)
        pytest.fail(str(e), pytrace=False)
    _record_proxy(request, proc)
    log_offset = proc.log_size()
    yield proc
    if not proc.alive:
        pytest.fail(
            f"amqproxy (pid {proc.pid}) exited with code {proc.returncode} "
            f"during this test\n--- log ---\n{proc.log_tail()}",
            pytrace=False,
        )
    _check_log_hygiene(proc, log_offset, shared=True)


def _check_log_hygiene(proc: ProxyProcess, since: int, shared: bool) -> None:
    if os.environ.get("AMQPROXY_TEST_ALLOW_NON_JSON_LOG"):
        return
    time.sleep(0.05)  # let output of just-closed connections land
    bad = proc.non_json_lines(since)
    if bad:
        where = " (shared proxy: may stem from the end of the previous test)" if shared else ""
        pytest.fail(
            f"amqproxy wrote {len(bad)} non-JSON log line(s) during this test{where}, "
            "e.g. an uncaught exception:\n" + "\n".join(bad[:60]),
            pytrace=False,
        )


@pytest.fixture
def proxy_factory(request, tmp_path):
    """start(*extra_args, upstream=URL) -> a fresh, ready ProxyProcess, stopped at teardown.

    The proxy's upstream is the shared broker unless `upstream` is given or the extra
    arguments contain their own `--upstream` flag(s) (e.g. an `own_broker`'s URL)."""
    if "proxy" not in TARGETS:
        pytest.skip("proxy not in AMQPROXY_TEST_TARGETS")
    started: list[ProxyProcess] = []

    def start(*extra_args: str, wait: bool = True, upstream: str | None = UPSTREAM_URL) -> ProxyProcess:
        proc = ProxyProcess(tmp_path / f"proxy-{len(started) + 1}.log", extra_args, upstream=upstream)
        started.append(proc)
        _record_proxy(request, proc)
        proc.start()
        if wait:
            try:
                proc.wait_ready()
            except ProxyStartError as e:
                pytest.fail(str(e), pytrace=False)
        return proc

    yield start
    for proc in started:
        proc.stop()
    for proc in started:
        if proc.ready:  # a failed start was reported already
            _check_log_hygiene(proc, 0, shared=False)


@pytest.fixture
def target(request) -> Target:
    """Parametrized over AMQPROXY_TEST_TARGETS: `direct` or `proxy`."""
    if request.param == "direct":
        return Target("direct", BROKER_HOST, BROKER_PORT)
    if request.param == "proxy":
        return request.getfixturevalue("proxy").target()
    raise ValueError(request.param)


@pytest.fixture
def direct() -> Target:
    """The broker itself, whatever the selected targets."""
    return Target("direct", BROKER_HOST, BROKER_PORT)


class Names:
    """Unique queue/exchange names; everything handed out is deleted (directly
    on the broker) at teardown."""

    def __init__(self):
        self.queues: list[tuple[str, str]] = []
        self.exchanges: list[tuple[str, str]] = []

    def queue(self, prefix: str = "q", vhost: str = "/") -> str:
        name = unique_name(prefix)
        self.queues.append((vhost, name))
        return name

    def exchange(self, prefix: str = "x", vhost: str = "/") -> str:
        name = unique_name(prefix)
        self.exchanges.append((vhost, name))
        return name

    def cleanup(self, broker: Broker) -> None:
        import pika.exceptions

        by_vhost: dict[str, list[tuple[str, str]]] = {}
        for vhost, name in self.queues:
            by_vhost.setdefault(vhost, []).append(("queue", name))
        for vhost, name in self.exchanges:
            by_vhost.setdefault(vhost, []).append(("exchange", name))
        for vhost, items in by_vhost.items():
            try:
                conn = broker.pika_connection(virtual_host=vhost)
            except pika.exceptions.AMQPError:
                continue  # vhost already gone
            try:
                ch = None
                for kind, name in items:
                    if ch is None or not ch.is_open:
                        ch = conn.channel()
                    try:
                        if kind == "queue":
                            ch.queue_delete(name)
                        else:
                            ch.exchange_delete(name)
                    except pika.exceptions.ChannelClosedByBroker:
                        ch = None  # e.g. 405 for another connection's exclusive queue
            finally:
                if conn.is_open:
                    conn.close()


@pytest.fixture
def names(broker):
    n = Names()
    yield n
    n.cleanup(broker)


@pytest.fixture(scope="session")
def temp_vhost(broker):
    """A vhost on which guest has full permissions (deleted at session end)."""
    vhost = unique_name("vh")
    broker.ctl("add_vhost", vhost)
    try:
        broker.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost
    finally:
        broker.ctl("delete_vhost", vhost, check=False)


@pytest.fixture(scope="session")
def locked_vhost(broker):
    """A vhost on which guest has NO permissions (deleted at session end)."""
    vhost = unique_name("vh-locked")
    broker.ctl("add_vhost", vhost)
    try:
        yield vhost
    finally:
        broker.ctl("delete_vhost", vhost, check=False)


@pytest.fixture(scope="session")
def temp_user(broker):
    """(user, password) of a fresh user with full permissions on "/"."""
    user = unique_name("user")
    password = "pw-" + uuid.uuid4().hex
    broker.ctl("add_user", user, password)
    try:
        broker.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, password
    finally:
        broker.ctl("delete_user", user, check=False)


@pytest.fixture(scope="session")
def _own_broker_node(tmp_path_factory):
    sbin = rabbitmq_sbin()
    if sbin is None:
        pytest.skip("rabbitmq-server / rabbitmqctl not found (set AMQPROXY_TEST_RABBITMQ_SBIN)")
    node = OwnBroker(tmp_path_factory.mktemp("own-broker"), sbin)
    try:
        node.start()
    except (OwnBrokerError, subprocess.SubprocessError) as e:
        node.pid = node.pid or node.read_pid_file()
        node.stop()
        pytest.fail(f"cannot start an own RabbitMQ node: {e}", pytrace=False)
    try:
        yield node
    finally:
        node.stop()
        node.remove_data()


@pytest.fixture
def own_broker(request, _own_broker_node) -> OwnBroker:
    """A RabbitMQ node of the suite's own (see OwnBroker), never the shared broker: one node for
    the session (starting one costs 10 s or more), brought back to health (resumed, running, app
    started, no alarm) before and after every test. Tests use unique queue names on it."""
    node = _own_broker_node
    node.ensure_healthy()
    request.node.stash.setdefault(_OWN_BROKERS_KEY, []).append(node)
    yield node
    node.ensure_healthy()


@pytest.fixture(scope="module")
def own_broker_factory(tmp_path_factory):
    """Start own RabbitMQ nodes with extra rabbitmq.conf lines (a TLS or PROXY-protocol listener,
    say): `node = own_broker_factory("proxy_protocol = true\\n")`. Stopped and removed after the
    module."""
    sbin = rabbitmq_sbin()
    if sbin is None:
        pytest.skip("rabbitmq-server / rabbitmqctl not found (set AMQPROXY_TEST_RABBITMQ_SBIN)")
    nodes: list[OwnBroker] = []

    def start(extra_conf: str = "") -> OwnBroker:
        node = OwnBroker(tmp_path_factory.mktemp("own-broker"), sbin, extra_conf)
        nodes.append(node)
        try:
            return node.start()
        except (OwnBrokerError, subprocess.SubprocessError) as e:
            node.pid = node.pid or node.read_pid_file()
            pytest.fail(f"cannot start an own RabbitMQ node: {e}", pytrace=False)

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()
            node.remove_data()
