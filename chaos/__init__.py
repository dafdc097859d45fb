"""Chaos suite for amqproxy: faults on the upstream and client legs, driven through Toxiproxy's
HTTP API, with invariants checked per scenario (see chaos/README.md).

`toxiproxy_endpoint()` gives the API URL to drive: the real Toxiproxy named by TOXIPROXY_URL,
else a fault proxy of our own (chaos.faultproxy) started for the duration of the context."""

from chaos.endpoint import toxiproxy_endpoint

__all__ = ["toxiproxy_endpoint"]
