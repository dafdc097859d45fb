"""The front door through the real proxy: source-address allow/deny lists (IPv4, IPv6, the
address a PROXY protocol header names) and the user -> vhost authorization policy."""

from __future__ import annotations

import ast
import json
import re
import socket
import time
import urllib.request

import amqp
import pamqp.commands as C
import pamqp.header
import pika
import pika.exceptions
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ._support import RawAMQP

pytestmark = [pytest.mark.integration, pytest.mark.proxy_only]


def metric(proc, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/metrics", timeout=15) as response:
        body = response.read().decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def events(proc, name: str) -> list[dict]:
    return [r for r in proc.log_records() if r.get("event") == name]


def tcp_closed_without_a_byte(host: str, port: int, family: int = socket.AF_INET, preamble: bytes = b"") -> bool:
    """Connect, send a protocol header: True when the proxy closes without sending anything."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect((host, port))
        sock.sendall(preamble + pamqp.header.ProtocolHeader().marshal())
        try:
            return sock.recv(4096) == b""
        except ConnectionResetError:
            return True


def pika_refusal(target, **kw) -> tuple[int, str]:
    with pytest.raises(pika.exceptions.AMQPConnectionError) as err:
        target.pika(**kw).close()
    match = re.match(r"ConnectionClosedByBroker: \((\d+)\) (.*)$", str(err.value.args[0]), re.S)
    assert match, f"unexpected pika error {err.value!r}"
    return int(match.group(1)), ast.literal_eval(match.group(2))


def test_denied_address_gets_a_tcp_close_before_any_amqp(proxy_factory):
    proc = proxy_factory("--deny-cidr", "127.0.0.0/8")
    before = metric(proc, "amqproxy_access_denied_total", reason="denied")  # the readiness probe's
    assert tcp_closed_without_a_byte(proc.host, proc.port)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        proc.target().pika()
    assert metric(proc, "amqproxy_access_denied_total", reason="denied") == before + 2
    assert metric(proc, "amqproxy_client_connections_refused_total", reason="access") == before + 2
    record = events(proc, "access_denied")[0]
    assert record["reason"] == "denied" and record["remote"].startswith("127.0.0.1:")


def test_allow_list(proxy_factory):
    outside = proxy_factory("--allow-cidr", "10.0.0.0/8,192.168.0.0/16")
    before = metric(outside, "amqproxy_access_denied_total", reason="not_allowed")  # the readiness probe's
    assert tcp_closed_without_a_byte(outside.host, outside.port)
    assert metric(outside, "amqproxy_access_denied_total", reason="not_allowed") == before + 1
    inside = proxy_factory("--allow-cidr", "10.0.0.0/8,127.0.0.1/32", "--deny-cidr", "127.0.0.2/32")
    conn = inside.target().pika()
    ch = conn.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", queue, b"in")
    assert ch.basic_get(queue, auto_ack=True)[2] == b"in"
    conn.close()
    # 127.0.0.2 is in the allowed /8 loopback only through the deny list: deny wins.
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        sock.settimeout(5)
        sock.connect((inside.host, inside.port))
        sock.sendall(pamqp.header.ProtocolHeader().marshal())
        assert sock.recv(4096) == b""


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def _start_on_ipv6(proxy_factory, *args: str):
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        port = sock.getsockname()[1]
    proc = proxy_factory("--listen", f"[::1]:{port}", *args, wait=False)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("::1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.alive, proc.log_tail()
            time.sleep(0.05)
    return proc, port


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_allow_and_deny(proxy_factory):
    denied, port = _start_on_ipv6(proxy_factory, "--deny-cidr", "::1/128")
    assert tcp_closed_without_a_byte("::1", port, socket.AF_INET6)
    allowed, port = _start_on_ipv6(proxy_factory, "--allow-cidr", "::1/128,10.0.0.0/8")
    conn = pika.BlockingConnection(pika.ConnectionParameters(host="::1", port=port, connection_attempts=1))
    ch = conn.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", queue, b"v6")
    assert ch.basic_get(queue, auto_ack=True)[2] == b"v6"
    conn.close()
    records = events(denied, "access_denied")
    assert records and all(r["remote"].startswith("::1:") and r["reason"] == "denied" for r in records)
    assert not events(allowed, "access_denied")


def test_lists_apply_to_the_address_a_proxy_header_names(proxy_factory):
    proc = proxy_factory(
        "--accept-proxy-protocol", "true", "--proxy-protocol-from", "127.0.0.1/32", "--deny-cidr", "203.0.113.0/24"
    )
    header = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 5673\r\n"
    assert tcp_closed_without_a_byte(proc.host, proc.port, preamble=header)
    (record,) = events(proc, "access_denied")
    assert record["remote"] == "203.0.113.7:40000"
    with RawAMQP(proc.host, proc.port) as raw:  # another real client address is let in
        raw.send_bytes(b"PROXY TCP4 198.51.100.7 127.0.0.1 40001 5673\r\n")
        _start, _tune, reply = raw.handshake()
        assert isinstance(reply, C.Connection.OpenOk)


def _policy(tmp_path, document) -> str:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(document))
    return str(path)


def test_authz_policy_refuses_a_vhost_with_530(proxy_factory, tmp_path, temp_vhost):
    policy = _policy(tmp_path, {"guest": ["/"]})
    proc = proxy_factory("--authz-policy", policy, "--limit-refusal-delay", "0.2")
    target = proc.target()
    assert pika_refusal(target, virtual_host=temp_vhost) == (
        530,
        f"NOT_ALLOWED - access to vhost '{temp_vhost}' refused for user 'guest'",
    )
    with pytest.raises(amqp.exceptions.NotAllowed):
        target.amqp(virtual_host=temp_vhost)
    conn = target.pika()  # "/" is allowed
    conn.channel().queue_declare("", exclusive=True)
    conn.close()
    assert metric(proc, "amqproxy_access_denied_total", reason="authz_vhost") == 2
    record = events(proc, "client_refused")[0]
    assert record["reason"] == "access" and record["access"] == "authz_vhost"
    # No upstream connection was ever opened for the refused vhost.
    assert not [r for r in events(proc, "upstream_open") if r["vhost"] == temp_vhost]


def test_authz_policy_refuses_an_unlisted_user_with_403(proxy_factory, tmp_path, temp_user):
    policy = _policy(tmp_path, {"guest": "*"})
    proc = proxy_factory("--authz-policy", policy, "--limit-refusal-delay", "0")
    target = proc.target()
    user, password = temp_user
    code, text = pika_refusal(target, user=user, password=password)
    assert (code, text) == (403, f"ACCESS_REFUSED - user '{user}' may not connect through this proxy (--authz-policy)")
    with pytest.raises(amqp.exceptions.AccessRefused) as err:
        target.amqp(userid=user, password=password)
    assert err.value.reply_code == 403
    assert metric(proc, "amqproxy_access_denied_total", reason="authz_user") == 2
    # Refused before any upstream work: no login for that user reached the broker.
    assert not [r for r in events(proc, "upstream_open") if r.get("user") == user]
    target.pika().close()


def test_authz_policy_reloads(proxy_factory, tmp_path, temp_vhost):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"*": ["/"]}))
    conf = tmp_path / "amqproxy.conf"
    conf.write_text(f"authz-policy = {policy}\nlimit-refusal-delay = 0\n")
    proc = proxy_factory("--config", str(conf))
    target = proc.target()
    assert pika_refusal(target, virtual_host=temp_vhost)[0] == 530
    policy.write_text(json.dumps({"*": ["/", temp_vhost]}))
    request = urllib.request.Request(f"http://{proc.host}:{proc.http_port}/reload", method="POST")
    with urllib.request.urlopen(request, timeout=15) as response:
        assert "--authz-policy" in json.loads(response.read())["changed"]
    target.pika(virtual_host=temp_vhost).close()
    # A broken policy file is rejected as a whole: the running policy stays.
    policy.write_text("{broken")
    request = urllib.request.Request(f"http://{proc.host}:{proc.http_port}/reload", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=15)
    assert err.value.code == 400
    target.pika(virtual_host=temp_vhost).close()
