"""Liveness on both legs and connection-level methods the proxy answers itself."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def test_idle_pooled_upstream_is_kept_alive_by_proxy_heartbeats(proxy_factory, broker, names):
    """With a 1 s upstream heartbeat the broker drops a silent connection after ~2 s; the proxy's
    own heartbeats keep the idle pooled connection alive, and the next client reuses it."""
    # --separate-publishers false: the next client's declare-then-publish channel reuses the
    # pooled connection instead of moving to a publishing one.
    proc = proxy_factory("--upstream-heartbeat", "1", "--idle-timeout", "60", "--separate-publishers", "false")
    target = proc.target()
    conn = target.pika()
    conn.channel().close()
    conn.close()
    (before,) = broker.proxy_upstreams(proc)
    time.sleep(5)  # intrinsic: the broker must have had time to miss heartbeats
    (after,) = broker.proxy_upstreams(proc)
    assert after["name"] == before["name"]
    conn = target.pika()
    ch = conn.channel()
    queue = names.queue()
    ch.queue_declare(queue)
    ch.basic_publish("", queue, b"still here")
    assert ch.basic_get(queue, auto_ack=True)[2] == b"still here"
    conn.close()
    (still,) = broker.proxy_upstreams(proc)
    assert still["name"] == before["name"]


def test_update_secret_is_answered(target, names):
    """connection.update-secret (token-refreshing clients) gets update-secret-ok, and the
    connection keeps working."""
    conn = target.pika()
    try:
        conn.update_secret("guest", "token refresh")
        ch = conn.channel()
        queue = names.queue()
        ch.queue_declare(queue)
        ch.basic_publish("", queue, b"after refresh")
        assert ch.basic_get(queue, auto_ack=True)[2] == b"after refresh"
    finally:
        conn.close()
