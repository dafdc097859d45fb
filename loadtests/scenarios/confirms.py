"""Steady publishers with confirms plus consumers, reporting end-to-end latency percentiles.

Users: 2 consumers (``basic.consume``, prefetch 100, manual ``ack``; each delivery's body
carries the publisher's ``time.time_ns()``, reported as ``consume latency``), 1 ``get`` user
(``basic.get`` + ``ack`` every 100 ms), and publishers for the rest of the users, each
publishing with confirms at ``LOADTEST_RATE`` msg/s (default 50; ``--rate``), reported as
``publish (confirm)`` (time until the broker's ack).

    python -m loadtests.run confirms --users 12 --run-time 60s --rate 100
"""

from locust import constant, constant_throughput, task

from loadtests.amqp_users import RATE, AmqpUser, ConsumerUser

SCENARIO = {
    "description": "publishers with confirms at a fixed rate + consumers; end-to-end latency",
    "defaults": {"users": 8, "spawn_rate": 8, "run_time": "30s"},
    "queue_args": {"x-max-length": 100000},
    "thresholds": {
        "max_failure_ratio": 0.001,
        "max_p99_ms": {"publish (confirm)": 500, "consume latency": 1000, "connect": 1000},
        "nonzero": ["connect", "channel open", "publish (confirm)", "consume latency", "ack", "get"],
    },
}


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


class Getter(AmqpUser):
    fixed_count = 1
    wait_time = constant(0.1)

    @task
    def get_one(self):
        self.ensure_connected()
        self.get()
