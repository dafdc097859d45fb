"""Smoke runs of the Locust load scenarios (loadtests/scenarios/) through the real runner.

Each test runs ``python -m loadtests.run <scenario>`` as a subprocess for a few seconds with a
few users: the runner starts its own amqproxy (and, for the fault scenarios, a Toxiproxy
proxy via chaos.toxiproxy_endpoint()), runs Locust headless, and exits 0 only when the
scenario's own thresholds hold. The tests check behaviour, not speed: exit status 0 and
successful requests of every expected type in the final stats. Locust is never imported
here (it monkey-patches the interpreter); the long runs are on demand (``tox -e load``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.settings import BROKER_HOST, BROKER_PORT, REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

# scenario -> (runner arguments, request names that must have succeeded)
SMOKE = {
    "churn": (["-u", "4", "-r", "4", "-t", "3s"], ["connect", "channel open", "publish", "close", "cycle"]),
    "confirms": (
        ["-u", "5", "-r", "5", "-t", "3s"],
        ["connect", "channel open", "publish (confirm)", "consume latency", "ack", "get"],
    ),
    "storm": (["-u", "20", "-r", "20", "-t", "3s"], ["connect", "connect (refused by limit)", "publish", "close"]),
    "reconnect": (
        ["-u", "4", "-r", "4", "-t", "10s", "--fault", "at=0.2", "--fault", "duration=2", "--fault", "recovery_s=3"],
        ["connect", "publish (confirm)", "consume latency"],
    ),
    "flapping": (
        ["-u", "4", "-r", "4", "-t", "12s", "--fault", "at=0.15", "--fault", "duration=3", "--fault", "recovery_s=4"],
        ["connect", "cycle"],
    ),
}


@pytest.mark.parametrize("scenario", list(SMOKE))
def test_scenario_smoke(scenario, tmp_path):
    args, expected = SMOKE[scenario]
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQPROXY_", "LOADTEST_"))}
    env["LOADTEST_HOLD"] = "1"  # storm: hold each connection 1 s
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.run", scenario, *args, "--results", str(results),
         "--broker", f"{BROKER_HOST}:{BROKER_PORT}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=85,
    )  # fmt: skip
    output = f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    if proc.returncode == 3:
        if "--max-connections not available" in proc.stderr:
            pytest.skip("--max-connections not available")
        pytest.fail(f"scenario {scenario} unavailable:\n{output}")
    assert proc.returncode == 0, f"runner exit {proc.returncode}\n{output}\n{_tail(results / 'amqproxy.log')}"
    final = json.loads((results / "final_stats.json").read_text())
    ok = {r["name"]: r["requests"] - r["failures"] for r in final["stats"]}
    missing = [name for name in expected if ok.get(name, 0) <= 0]
    assert not missing, f"no successful {missing}; stats: {ok}\n{output}"
    for name in ("locust_stats.csv", "locust_stats_history.csv", "report.html"):
        assert (results / name).stat().st_size > 0, name


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "--- amqproxy.log ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
