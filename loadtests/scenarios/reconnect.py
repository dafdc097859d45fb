"""Reconnection under load: a node outage mid-run (Toxiproxy), bounded errors, recovery.

The runner puts the proxy's upstream behind a Toxiproxy proxy and starts the proxy with a
short ``--connect-timeout``; at 30 % of the run the Toxiproxy proxy is disabled for
``fault.duration`` s (every upstream connection drops, new ones are refused), then enabled.
Users: confirm publishers (``LOADTEST_RATE`` msg/s each) and 2 consumers, all reconnecting
with backoff after a failure. Thresholds: failures only inside the fault window (plus the
recovery allowance ``recovery_s``), requests of every type again after it, and an overall
failure ratio bound.

    python -m loadtests.run reconnect --users 10 --run-time 60s
"""

from locust import constant, constant_throughput, task

from loadtests.amqp_users import RATE, AmqpUser, ConsumerUser
from loadtests.faults import install_fault_controller

SCENARIO = {
    "description": "confirm publishers + consumers; the upstream node goes away mid-run and comes back",
    "defaults": {"users": 6, "spawn_rate": 6, "run_time": "30s"},
    "toxiproxy": True,
    "proxy_args": [
        "--connect-timeout",
        "2",
        "--backoff-max",
        "0.5",
        "--breaker-open-time",
        "1",
        "--breaker-open-max",
        "2",
    ],
    "fault": {"kind": "outage", "at": 0.3, "duration": 3, "recovery_s": 4},
    "queue_args": {"x-max-length": 100000},
    "thresholds": {
        "max_failure_ratio": 0.2,
        "max_p99_ms": {"connect": 5000},
        "nonzero": ["connect", "publish (confirm)", "consume latency"],
        "failures_only_in_fault": True,
        "recovered": ["publish (confirm)", "consume latency"],
    },
}

install_fault_controller()


class ConfirmPublisher(AmqpUser):
    confirm = True
    wait_time = constant_throughput(RATE)

    @task
    def publish_one(self):
        self.ensure_connected()
        self.publish()


class Consumer(ConsumerUser):
    fixed_count = 2
    wait_time = constant(0)

    @task
    def consume(self):
        self.consume_for(1.0)
