"""Locust scenarios (locustfiles) of the amqproxy load suite; run them with ``python -m loadtests.run``.

Each file declares ``SCENARIO = {...}`` (a literal dict, read by the runner without importing
Locust): description, defaults (users, spawn rate, run time), environment for the users, proxy
arguments, an optional fault plan and the thresholds the run must meet.
"""
