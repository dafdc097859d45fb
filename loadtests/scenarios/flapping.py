"""Circuit-breaker behaviour under a flapping node (Toxiproxy enabled/disabled in turn).

The runner starts the proxy with a small breaker (``--breaker-failures 3``, open 0.5-2 s) and
``--breaker-all-open fail-fast``; from 20 % of the run the upstream's Toxiproxy proxy flaps
(down ``fault.down`` s, up ``fault.up`` s) for ``fault.duration`` s, then stays up. Users
churn (connect, channel, publish 1, close) so that every cycle needs the pool.

What must hold: while the node flaps, clients are answered quickly (refused with 320 by the
open breaker or by a short connect timeout: ``connect`` p99 bounded, nobody hangs); the
breaker opened at least once (``amqproxy_breaker_transitions_total{to="open"}`` on the
proxy's /metrics, checked by the runner when it started the proxy); no failures outside the
flapping window plus ``recovery_s``; and every request type succeeds again afterwards.

    python -m loadtests.run flapping --users 8 --run-time 60s
"""

from locust import constant, task

from loadtests.amqp_users import AmqpUser
from loadtests.faults import install_fault_controller

SCENARIO = {
    "description": "churning clients while the upstream node flaps; breaker opens, fast refusals, recovery",
    "defaults": {"users": 6, "spawn_rate": 6, "run_time": "40s"},
    "toxiproxy": True,
    "proxy_args": [
        "--connect-timeout",
        "2",
        "--backoff-initial",
        "0.05",
        "--backoff-max",
        "0.3",
        "--breaker-failures",
        "3",
        "--breaker-open-time",
        "0.5",
        "--breaker-open-max",
        "2",
        "--breaker-all-open",
        "fail-fast",
    ],
    "fault": {"kind": "flap", "at": 0.2, "duration": 8, "down": 1, "up": 1, "recovery_s": 5},
    "queue_args": {"x-max-length": 10000},
    "thresholds": {
        "max_failure_ratio": 0.5,
        "max_p99_ms": {"connect": 4000},
        "nonzero": ["connect", "cycle"],
        "failures_only_in_fault": True,
        "recovered": ["cycle"],
        "breaker_opened": True,
    },
}

install_fault_controller()


class FlappingChurn(AmqpUser):
    wait_time = constant(0.02)

    @task
    def one_cycle(self):
        self.cycle()
