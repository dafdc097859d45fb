"""Fixtures of the chaos suite. The proxy process and the RabbitMQ node of its own come from the
main suite's fixtures (tests/conftest.py), imported, not copied; Toxiproxy is TOXIPROXY_URL's
or chaos.faultproxy (chaos.toxiproxy_endpoint)."""

from __future__ import annotations

import pytest

from chaos import toxiproxy_endpoint
from chaos.harness import ChaosRun, Toxi
from chaos.report import ScenarioResult, render, write
from tests import conftest as main_suite

# The main suite's fixtures, and its hook that attaches proxy and broker logs to failures.
_own_broker_node = main_suite._own_broker_node
own_broker = main_suite.own_broker
proxy_factory = main_suite.proxy_factory
pytest_runtest_makereport = main_suite.pytest_runtest_makereport

_RESULTS_KEY = pytest.StashKey[list]()


def pytest_addoption(parser):
    parser.addoption(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="soak mode: run every selected chaos scenario N times (ids run1..runN); the summary adds totals",
    )


def pytest_configure(config):
    config.stash[_RESULTS_KEY] = []


def pytest_generate_tests(metafunc):
    """--repeat N: each scenario becomes N tests, one per run, each with a fresh proxy and routes."""
    count = metafunc.config.getoption("repeat", 1)
    if count > 1 and "chaos" in metafunc.fixturenames:
        metafunc.fixturenames.append("soak_run")
        metafunc.parametrize("soak_run", range(1, count + 1), ids=lambda i: f"run{i}")


@pytest.fixture(scope="session")
def toxi():
    with toxiproxy_endpoint() as url:
        yield Toxi(url)


@pytest.fixture
def chaos(request, toxi, own_broker, proxy_factory):
    """chaos(scenario, **options) -> a started ChaosRun on this module's own broker node."""

    runs: list[ChaosRun] = []

    def start(scenario: str, **options) -> ChaosRun:
        run = ChaosRun(scenario, toxi, own_broker, proxy_factory, request.config.stash[_RESULTS_KEY], **options)
        runs.append(run)
        return run.start()

    yield start
    for run in runs:
        run.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results: list[ScenarioResult] = config.stash.get(_RESULTS_KEY, [])
    if not results:
        return
    terminalreporter.write_sep("=", "chaos summary")
    terminalreporter.write(render(results))
    terminalreporter.write_line(f"(written to {write(results)})")
