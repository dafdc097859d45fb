"""Test support shared by the test suite (tests/), the chaos suite (chaos/) and the benchmarks
(loadtests/): the amqproxy process, the shared broker, RabbitMQ nodes of a test's own, ports.

Fixtures stay in tests/conftest.py; everything here is plain code that any of them can import.
"""
