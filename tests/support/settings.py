"""Where the suite's broker is, and the timeouts its helpers use (environment overridable)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# The checkout whose proxy the suites start: this one, or another (AMQPROXY_TEST_PROXY_ROOT).
PROXY_ROOT = Path(os.environ.get("AMQPROXY_TEST_PROXY_ROOT") or REPO_ROOT)

_broker = os.environ.get("AMQPROXY_TEST_BROKER", "127.0.0.1:5672")
BROKER_HOST, _, _broker_port = _broker.rpartition(":")
BROKER_PORT = int(_broker_port)
UPSTREAM_URL = f"amqp://{BROKER_HOST}:{BROKER_PORT}"

PROXY_START_TIMEOUT = 15.0
PROXY_STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 200
OWN_BROKER_START_TIMEOUT = 60.0
OWN_BROKER_STOP_TIMEOUT = 30.0
# An own node's memory watermark when no alarm is wanted (RabbitMQ's default).
OWN_BROKER_MEMORY_WATERMARK = "0.4"
