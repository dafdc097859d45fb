"""Short-lived publisher churn: the PHP-style loop this proxy exists for.

Each user loops: connect, open a channel, publish one message, close the connection, with no
pause. Reported: ``connect``, ``channel open``, ``publish``, ``close`` and the whole ``cycle``.
The queue is capped (drop-head) so a long run does not fill the broker.

    python -m loadtests.run churn --users 8 --spawn-rate 8 --run-time 60s
"""

from locust import constant, task

from loadtests.amqp_users import AmqpUser

SCENARIO = {
    "description": "connect, channel, publish 1 message, close; in a loop",
    "defaults": {"users": 8, "spawn_rate": 8, "run_time": "30s"},
    "queue_args": {"x-max-length": 10000},
    "thresholds": {
        "max_failure_ratio": 0.01,
        "max_p99_ms": {"cycle": 1000, "connect": 1000},
        "nonzero": ["connect", "channel open", "publish", "close", "cycle"],
    },
}


class ChurnPublisher(AmqpUser):
    wait_time = constant(0)

    @task
    def one_cycle(self):
        self.cycle()
