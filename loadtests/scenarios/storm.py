"""Connection storm against the proxy's configured connection limit (``--max-connections``).

The runner starts the proxy with ``--max-connections`` = half the users, and the users are
spawned as fast as asked: each connects, opens a channel, holds the connection for
``LOADTEST_HOLD`` s (default 2) with one publish, and closes; a connection the proxy refuses
with Connection.Close 530/506 naming a limit is reported as ``connect (refused by limit)``, a
success of its own type (expected), never as a failure. Anything else (timeouts, resets,
refusals without a limit) is a failure.

    python -m loadtests.run storm --users 400 --spawn-rate 400 --run-time 60s
"""

import time

from locust import between, task

from loadtests.amqp_users import HOLD, AmqpUser

SCENARIO = {
    "description": "more users than --max-connections, spawned at once; refusals counted apart",
    "defaults": {"users": 200, "spawn_rate": 200, "run_time": "30s"},
    "requires_flag": "--max-connections",
    "proxy_args": ["--max-connections", "{half_users}"],
    "env": {"LOADTEST_HOLD": "2"},
    "queue_args": {"x-max-length": 10000},
    "thresholds": {
        "max_failure_ratio": 0.01,
        "max_p99_ms": {"connect": 2000, "connect (refused by limit)": 2000},
        "nonzero": ["connect", "connect (refused by limit)", "publish", "close"],
    },
}


class StormUser(AmqpUser):
    wait_time = between(0.05, 0.3)

    @task
    def hold_one(self):
        self.connect()
        self.publish(b"x" * 100)
        time.sleep(HOLD)
        self.close()
