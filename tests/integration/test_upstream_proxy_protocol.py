"""PROXY protocol towards the broker (`?proxy_protocol=v1|v2` on an --upstream URL).

A RabbitMQ listener with `proxy_protocol = true` drops every connection that does not start
with a PROXY header, so a proxy in front of such a listener must send one. The broker then
reports the header's source as the connection's peer: here, the proxy's own end of the pooled
connection (the connection is shared by many clients, so no single client address belongs
in it; the clients' addresses are in the proxy's /connections and audit log).
"""

from __future__ import annotations

import json
import uuid

import pika
import pika.exceptions
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.proxy_only]


@pytest.fixture(scope="module")
def proxy_protocol_broker(own_broker_factory):
    return own_broker_factory("proxy_protocol = true\n")


def _broker_connection_count(node) -> int:
    out = node.ctl("list_connections", "--formatter", "json", "name")
    return len(json.loads(out[out.find("[") :]))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_broker_requiring_the_header_accepts_the_proxy(proxy_factory, proxy_protocol_broker, version):
    node = proxy_protocol_broker
    proxy = proxy_factory(upstream=f"amqp://{node.host}:{node.port}?proxy_protocol={version}")
    queue = f"pp-{uuid.uuid4().hex[:8]}"
    with proxy.target().pika() as conn:
        ch = conn.channel()
        ch.queue_declare(queue, auto_delete=True)
        ch.basic_publish("", queue, b"through a PROXY header")
        _, _, body = ch.basic_get(queue, auto_ack=True)
        assert body == b"through a PROXY header"
        # The listener drops connections without a header: being listed proves it was accepted.
        assert _broker_connection_count(node) >= 1


def test_without_header_the_broker_drops_the_upstream_and_the_client_is_told(proxy_factory, proxy_protocol_broker):
    node = proxy_protocol_broker
    proxy = proxy_factory("--connect-timeout", "2", upstream=f"amqp://{node.host}:{node.port}")
    with pytest.raises(pika.exceptions.AMQPConnectionError) as info:
        proxy.target().pika(connection_attempts=1, blocked_connection_timeout=5)
    seen = repr(info.value)
    assert "(320)" in seen and "upstream unavailable" in seen, seen
