#!/usr/bin/env python3
"""Benchmark amqproxy against a direct RabbitMQ connection (and, with --anchor, against
cloudamqp/amqproxy), interleaved in one run.

    python loadtests/bench.py --quick          # smoke run, 1 short round of everything, ~1 minute
    python loadtests/bench.py --help           # all knobs

The method, every workload and metric: the docstring of the package, loadtests/benchmark/__init__.py.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # loadtests.benchmark and tests.support, run as a script

from loadtests.benchmark.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
