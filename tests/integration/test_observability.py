"""Metrics, logs and the admin API, checked against what the test did through the real proxy."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pika
import pika.exceptions
import pytest
from prometheus_client.parser import text_string_to_metric_families

from amqproxy.accel import implementation

from ._support import secret_file, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.proxy_only]

TOKEN = "t0ken-for-tests"


def http(proc, path: str, method: str = "GET", token: str | None = None, body: bytes | None = None):
    """(status, headers, body) of an admin API request."""
    request = urllib.request.Request(f"http://{proc.host}:{proc.http_port}{path}", method=method, data=body)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def http_json(proc, path: str, **kw):
    status, _headers, body = http(proc, path, **kw)
    return status, json.loads(body)


def scrape(proc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _headers, body = http(proc, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def use_channel(conn, queue: str, count: int = 1, body: bytes = b"x" * 100) -> None:
    ch = conn.channel()
    ch.queue_declare(queue, auto_delete=False)
    for _ in range(count):
        ch.basic_publish("", queue, body)


def test_metrics_follow_what_clients_do(proxy_factory, names):
    proc = proxy_factory()
    target = proc.target()
    queue = names.queue()
    conns = [target.pika() for _ in range(3)]
    for conn in conns:
        use_channel(conn, queue, count=2, body=b"y" * 1000)
    conns[0].close()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        target.pika(credentials=pika.PlainCredentials("guest", "not-the-password"))
    with socket.create_connection((proc.host, proc.port)) as raw:
        raw.sendall(b"HTTP/1.1 GET /\r\n\r\n")
        raw.recv(100)

    def settled():
        s = scrape(proc)
        return (
            s
            if value(s, "amqproxy_client_connections_closed_total", vhost="/", user="guest", reason="client")
            else None
        )

    s = wait_until(settled, timeout=5, msg="close not counted")
    assert value(s, "amqproxy_client_connections", vhost="/", user="guest") == 2
    assert value(s, "amqproxy_client_connections_opened_total", vhost="/", user="guest") == 3
    assert value(s, "amqproxy_client_connections_closed_total", vhost="/", user="guest", reason="client") == 1
    assert value(s, "amqproxy_client_connections_refused_total", reason="auth") == 1
    assert value(s, "amqproxy_client_connections_refused_total", reason="protocol_header") == 1
    assert value(s, "amqproxy_channels", vhost="/", user="guest") == 2
    assert value(s, "amqproxy_channels_opened_total", vhost="/", user="guest") == 3
    assert value(s, "amqproxy_channels_closed_total", vhost="/", user="guest") == 1
    assert value(s, "amqproxy_handshake_duration_seconds_count", vhost="/") == 3
    # 6 messages of 1000 bytes, one body frame each (+8 bytes of framing).
    assert value(s, "amqproxy_proxied_frames_total", direction="client_to_upstream", frame_type="body") == 6
    assert value(s, "amqproxy_proxied_bytes_total", direction="client_to_upstream", frame_type="body") == 6 * 1008
    assert value(s, "amqproxy_proxied_frames_total", direction="client_to_upstream", frame_type="header") == 6
    assert value(s, "amqproxy_forwarding_latency_seconds_count", direction="client_to_upstream") >= 1
    node = "127.0.0.1:5672"
    assert value(s, "amqproxy_breaker_state", node=node) == 0
    assert value(s, "amqproxy_upstream_connections", node=node, state="open") >= 1
    assert value(s, "amqproxy_upstream_connect_attempts_total", node=node, outcome="success") == value(
        s, "amqproxy_upstream_connections_opened_total", node=node
    )
    assert value(s, "amqproxy_errors_total", error_type="auth", category="permanent", vhost="") == 1
    assert value(s, "amqproxy_build_info", version="0.1.0", python=pytest.importorskip("platform").python_version(),
                 gevent=pytest.importorskip("gevent").__version__, implementation=implementation()) == 1  # fmt: skip
    for conn in conns[1:]:
        conn.close()
    s = wait_until(
        lambda: (lambda s: s if value(s, "amqproxy_client_connections", vhost="/", user="guest") == 0 else None)(
            scrape(proc)
        ),
        timeout=5,
        msg="gauge did not return to 0",
    )
    assert value(s, "amqproxy_client_connections_closed_total", vhost="/", user="guest", reason="client") == 3
    # Label cardinality: no connection ids, queue names or passwords anywhere in the exposition.
    text = http(proc, "/metrics")[2].decode()
    assert queue not in text and "not-the-password" not in text


def test_json_logs_and_audit_line(proxy_factory, names):
    proc = proxy_factory()
    target = proc.target()
    queue = names.queue()
    conn = target.pika()
    ch = conn.channel()
    ch.queue_declare(queue)
    for i in range(5):
        ch.basic_publish("", queue, b"m%d" % i)
    got = [ch.basic_get(queue, auto_ack=True)[2] for _ in range(3)]
    assert got == [b"m0", b"m1", b"m2"]
    conn.close()
    audit = wait_until(
        lambda: [r for r in proc.log_records() if r.get("event") == "audit"], timeout=5, msg="no audit line"
    )
    assert len(audit) == 1
    line = audit[0]
    assert line["logger"] == "amqproxy.audit"
    assert (line["user"], line["vhost"], line["end"], line["reply_code"]) == ("guest", "/", "client", 0)
    assert line["remote"].startswith("127.0.0.1:")
    assert (line["messages_in"], line["messages_out"]) == (5, 3)
    assert line["bytes_in"] > 0 and line["bytes_out"] > 0 and line["duration_s"] >= 0
    assert "opened_at" in line and line["client_id"]
    client_lines = [r for r in proc.log_records() if r.get("logger") == "amqproxy.client"]
    assert client_lines and all(r["client_id"] == line["client_id"] and "remote" in r for r in client_lines)
    upstream_lines = [r for r in proc.log_records() if r.get("logger") == "amqproxy.upstream"]
    assert upstream_lines and all("node" in r and "upstream_id" in r for r in upstream_lines)


def test_no_secret_reaches_logs_metrics_or_admin(proxy_factory, broker, temp_user):
    """Grep everything the proxy emitted for the passwords used."""
    user, password = temp_user
    proc = proxy_factory(
        "--admin-token-file", secret_file(TOKEN), "--upstream", f"amqp://{user}:urlsecret-42@127.0.0.1:5672"
    )
    target = proc.target()
    conn = target.pika(credentials=pika.PlainCredentials(user, password))
    conn.channel().queue_declare("", exclusive=True)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        target.pika(credentials=pika.PlainCredentials(user, password + "-wrong"))
    emitted = [http(proc, path, token=TOKEN)[2] for path in ("/metrics", "/stats", "/connections", "/upstreams")]
    emitted.append(http(proc, "/debug/greenlets", token=TOKEN)[2])
    conn.close()
    time.sleep(0.3)  # intrinsic: let the close be logged
    # Everything the proxy wrote (the harness's own "# command line" lines aside).
    emitted.append("\n".join(line for line in proc.log_text().splitlines() if not line.startswith("# ")).encode())
    for blob in emitted:
        assert password.encode() not in blob
        assert b"urlsecret-42" not in blob
        assert TOKEN.encode() not in blob


def test_admin_api(proxy_factory, names):
    proc = proxy_factory("--admin-token-file", secret_file(TOKEN))
    target = proc.target()
    keep = target.pika()
    use_channel(keep, names.queue())
    victim = target.pika()
    victim_ch = victim.channel()
    victim_ch.queue_declare(names.queue())

    status, health = http_json(proc, "/healthz")
    assert status == 200 and health.pop("uptime_s") > 0
    assert health == {"status": "ok", "clients": 2, "version": "0.1.0"}
    assert http_json(proc, "/readyz") == (200, {"ready": True, "reasons": []})

    status, stats = http_json(proc, "/stats")
    assert status == 200
    (pool,) = stats["pools"]
    assert (pool["vhost"], pool["user"], pool["clients"], pool["client_channels"]) == ("/", "guest", 2, 2)
    assert pool["upstream_connections"]["in_use"] >= 1 and stats["totals"]["clients"] == 2

    status, listing = http_json(proc, "/connections")
    assert status == 200 and len(listing["connections"]) == 2
    first = listing["connections"][0]
    assert set(first) >= {"id", "user", "vhost", "remote", "channels", "bytes_in", "bytes_out", "age_s", "upstream_ids"}
    victim_id = listing["connections"][1]["id"]
    status, detail = http_json(proc, f"/connections/{victim_id}")
    assert status == 200 and detail["channels"][0]["channel"] == 1 and detail["channels"][0]["upstream_id"]

    status, upstreams = http_json(proc, "/upstreams")
    assert status == 200
    assert upstreams["nodes"][0]["node"] == "127.0.0.1:5672" and upstreams["nodes"][0]["breaker"] == "closed"
    assert upstreams["connections"] and all("password" not in c for c in upstreams["connections"])

    # State-changing endpoints need the token.
    assert http(proc, f"/connections/{victim_id}", method="DELETE")[0] == 401
    assert http(proc, f"/connections/{victim_id}", method="DELETE", token="wrong")[0] == 403
    status, answer = http_json(proc, f"/connections/{victim_id}?reason=maintenance", method="DELETE", token=TOKEN)
    assert status == 200 and answer["closed"] == victim_id
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as err:
        victim.process_data_events(time_limit=3)
        victim_ch.queue_declare(names.queue())
    assert (err.value.reply_code, err.value.reply_text) == (320, "CONNECTION_FORCED - maintenance")
    assert keep.is_open
    assert http(proc, "/connections/nope")[0] == 404

    assert http(proc, "/no/such/path")[0] == 404
    status, headers, _ = http(proc, "/stats", method="POST")
    assert status == 405 and "GET" in headers["Allow"]

    # Log level at runtime.
    assert http_json(proc, "/log-level") == (200, {"level": "info"})
    assert http(proc, "/log-level", method="PUT", body=b'{"level": "debug"}')[0] == 401
    assert http_json(proc, "/log-level", method="PUT", body=b'{"level": "debug"}', token=TOKEN) == (
        200,
        {"level": "debug"},
    )
    assert http_json(proc, "/log-level") == (200, {"level": "debug"})
    assert http(proc, "/log-level?level=loud", method="PUT", token=TOKEN)[0] == 400

    # Debugging.
    assert http(proc, "/debug/greenlets")[0] == 401
    status, _, dump = http(proc, "/debug/greenlets", token=TOKEN)
    assert status == 200 and b"Greenlet" in dump
    status, profile = http_json(proc, "/debug/profile?seconds=0.5", token=TOKEN)
    assert status == 200 and profile["samples"] > 10 and profile["self"]
    assert http(proc, "/debug/profile?seconds=0", token=TOKEN)[0] == 400
    keep.close()
