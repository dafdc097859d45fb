"""Lifecycle of the real proxy process: drain on SIGTERM, reload on SIGHUP / POST /reload,
check-config, vhost pause/resume, and a second instance on the same port."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pika
import pika.exceptions
import pytest

from ._support import secret_file, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.proxy_only]

TOKEN = "lifecycle-token"


def http(proc, path: str, method: str = "GET"):
    request = urllib.request.Request(f"http://{proc.host}:{proc.http_port}{path}", method=method)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
    except OSError:
        return None, {}


def connect(proc, **kw):
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            host=proc.host, port=proc.port, credentials=pika.PlainCredentials("guest", "guest"), **kw
        )
    )


def new_client_heartbeat(proc) -> int:
    conn = connect(proc)
    try:
        (listing,) = [c for c in http(proc, "/connections")[1]["connections"] if c["state"] == "open"][-1:]
        return http(proc, f"/connections/{listing['id']}")[1]["heartbeat"]
    finally:
        conn.close()


def events(proc, name: str) -> list[dict]:
    return [r for r in proc.log_records() if r.get("event") == name]


def test_sigterm_drains_with_confirms_in_flight(proxy_factory):
    proc = proxy_factory("--drain-timeout", "8")
    client = connect(proc)
    ch = client.channel()
    ch.confirm_delivery()
    queue = ch.queue_declare("", exclusive=True).method.queue
    for i in range(50):
        ch.basic_publish("", queue, b"before %d" % i)
    proc.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: http(proc, "/readyz")[0] == 503, timeout=5, msg="/readyz stayed ready")
    with pytest.raises(OSError):  # stopped accepting at once
        socket.create_connection((proc.host, proc.port), timeout=2).recv(1)
    # In-flight work completes during the drain: publishes are confirmed, deliveries flow.
    for i in range(50):
        ch.basic_publish("", queue, b"during %d" % i)
    got = [ch.basic_get(queue, auto_ack=True)[2] for _ in range(100)]
    assert got[:50] == [b"before %d" % i for i in range(50)] and got[50:] == [b"during %d" % i for i in range(50)]
    (start,) = events(proc, "drain_start")
    assert start["clients"] == 1 and start["drain_timeout_s"] == 8
    client.close()
    assert proc.proc.wait(10) == 0
    assert events(proc, "stopped")
    assert not events(proc, "drain_timeout")


def test_shutdown_delay_keeps_accepting_while_not_ready(proxy_factory):
    """--shutdown-delay: /readyz answers 503 at the signal, but new clients are still served for
    the delay (a balancer's health check has that long to take the instance out), then the
    listener closes and the drain runs as without it."""
    proc = proxy_factory("--shutdown-delay", "5", "--drain-timeout", "8")
    early = connect(proc)
    signalled = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: http(proc, "/readyz")[0] == 503, timeout=5, msg="/readyz stayed ready")
    assert http(proc, "/readyz")[1]["reasons"] == ["draining: the proxy is shutting down"]
    late = connect(proc)  # during the delay: served like any other client
    ch = late.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", queue, b"during the delay")
    assert ch.basic_get(queue, auto_ack=True)[2] == b"during the delay"
    assert time.monotonic() - signalled < 5, "the check ran past the delay: slow machine, inconclusive"
    wait_until(lambda: events(proc, "drain_start"), timeout=10, msg="no drain after the delay")
    (delayed,) = events(proc, "shutdown_delay")
    assert delayed["delay_s"] == 5 and delayed["signal"] == "SIGTERM"
    assert events(proc, "drain_start")[0]["clients"] == 2
    with pytest.raises(OSError):  # the listener is closed once the delay is over
        socket.create_connection((proc.host, proc.port), timeout=2).recv(1)
    early.close()
    late.close()
    assert proc.proc.wait(10) == 0


def test_drain_timeout_closes_remaining_clients_with_320(proxy_factory):
    proc = proxy_factory("--drain-timeout", "6")
    client = connect(proc)
    ch = client.channel()
    ch.queue_declare("", exclusive=True)
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as err:
        client.process_data_events(time_limit=15)
        client.process_data_events(time_limit=15)
    assert (err.value.reply_code, err.value.reply_text) == (320, "CONNECTION_FORCED - proxy shutting down")
    assert 6 <= time.monotonic() - started < 12
    assert proc.proc.wait(10) == 0
    progress = events(proc, "drain_progress")
    assert progress and progress[0]["clients"] == 1 and progress[0]["channels"] == 1
    assert events(proc, "drain_timeout")[0]["clients"] == 1


def test_second_signal_exits_at_once(proxy_factory):
    proc = proxy_factory("--drain-timeout", "30")
    client = connect(proc)
    proc.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: events(proc, "drain_start"), timeout=5, msg="no drain")
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGINT)
    assert proc.proc.wait(5) == 1
    assert time.monotonic() - started < 3
    assert events(proc, "stop_forced")
    try:
        client.close()
    except pika.exceptions.AMQPError:
        pass


def test_reload_applies_valid_changes_and_rejects_invalid_files(proxy_factory, tmp_path):
    conf = tmp_path / "amqproxy.conf"
    conf.write_text("idle-timeout = 30\nclient-heartbeat = 60\n")
    proc = proxy_factory("--config", str(conf), "--admin-token-file", secret_file(TOKEN))
    client = connect(proc)
    client.channel().queue_declare("", exclusive=True)

    conf.write_text("idle-timeout = 12\nclient-heartbeat = 7\n")
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: events(proc, "reload"), timeout=5, msg="no reload on SIGHUP")
    (applied,) = events(proc, "reload")
    assert applied["result"] == "applied" and set(applied["changed"]) == {"--idle-timeout", "--client-heartbeat"}
    assert new_client_heartbeat(proc) == 7  # new clients are offered the new heartbeat

    conf.write_text("idle-timeout = -1\nframe-max = 12\n")
    status, answer = http(proc, "/reload", method="POST")
    assert status == 400 and answer["result"] == "rejected"
    assert any("--idle-timeout" in p for p in answer["problems"]) and any(
        "--frame-max" in p for p in answer["problems"]
    )
    assert new_client_heartbeat(proc) == 7  # nothing changed

    conf.write_text("idle-timeout = 12\nclient-heartbeat = 7\nbacklog = 77\n")
    status, answer = http(proc, "/reload", method="POST")
    assert (status, answer["result"], answer["needs_restart"]) == (200, "needs_restart", ["--backlog"])

    ch = client.channel()  # the running client never noticed
    ch.queue_declare("", exclusive=True)
    client.close()
    metrics = urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/metrics").read().decode()
    for result, count in (("applied", 1), ("rejected", 1), ("needs_restart", 1)):
        assert f'amqproxy_config_reloads_total{{result="{result}"}} {count:.1f}' in metrics


def test_reload_retires_a_removed_node_gracefully(proxy_factory, tmp_path):
    """Two names for the broker make two nodes: after a reload that swaps them, new connections
    go to the new node, the client on the retired node keeps working, and the retired node's
    connection closes once it is empty."""
    conf = tmp_path / "amqproxy.conf"
    conf.write_text("upstream = amqp://127.0.0.1:5672\n")
    proc = proxy_factory("--config", str(conf), "--admin-token-file", secret_file(TOKEN), upstream=None)
    old_client = connect(proc)
    old_ch = old_client.channel()
    old_ch.queue_declare("", exclusive=True)
    conf.write_text("upstream = amqp://localhost:5672\n")
    status, answer = http(proc, "/reload", method="POST")
    assert (status, answer["result"], answer["changed"]) == (200, "applied", ["--upstream"])
    nodes = {n["node"]: n["retired"] for n in http(proc, "/upstreams")[1]["nodes"]}
    assert nodes == {"127.0.0.1:5672": True, "localhost:5672": False}

    new_client = connect(proc)
    new_client.channel().queue_declare("", exclusive=True)
    by_node = {c["node"]: c for c in http(proc, "/upstreams")[1]["connections"]}
    assert set(by_node) == {"127.0.0.1:5672", "localhost:5672"}
    old_ch.queue_declare("", exclusive=True)  # the old client never noticed
    old_client.close()
    wait_until(
        lambda: {c["node"] for c in http(proc, "/upstreams")[1]["connections"]} == {"localhost:5672"},
        timeout=8,
        interval=0.3,
        msg="retired node's connection not closed",
    )
    new_client.close()


def test_check_config_lists_every_problem(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("frame-max = 10\nidle-timeout = soon\n")
    run = subprocess.run(
        [sys.executable, "-m", "amqproxy", "check-config", "--config", str(conf), "--listen", "nowhere"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 3
    for flag in ("--listen", "--frame-max", "--idle-timeout"):
        assert any(flag in line for line in lines)
    conf.write_text("frame-max = 8192\n")
    run = subprocess.run(
        [sys.executable, "-m", "amqproxy", "check-config", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (run.returncode, run.stdout.strip()) == (0, "configuration ok")


def test_pause_holds_new_clients_at_open_and_resume_releases_them(proxy_factory):
    proc = proxy_factory("--admin-token-file", secret_file(TOKEN), "--pause-timeout", "2")
    existing = connect(proc)
    existing_ch = existing.channel()
    queue = existing_ch.queue_declare("", exclusive=True).method.queue
    assert http(proc, "/vhosts/pause?vhost=%2F", method="POST") == (200, {"vhost": "/", "paused": True})
    result: dict[str, object] = {}

    def newcomer() -> None:
        started = time.monotonic()
        conn = connect(proc)
        result["waited"] = time.monotonic() - started
        conn.close()

    thread = threading.Thread(target=newcomer)
    thread.start()
    time.sleep(1)  # intrinsic: the newcomer must be held for a while
    assert thread.is_alive()
    existing_ch.basic_publish("", queue, b"existing clients carry on")
    assert existing_ch.basic_get(queue, auto_ack=True)[2] == b"existing clients carry on"
    assert http(proc, "/vhosts/resume?vhost=%2F", method="POST") == (200, {"vhost": "/", "paused": False})
    thread.join(5)
    assert 1 <= result["waited"] < 3

    http(proc, "/vhosts/pause?vhost=%2F", method="POST")
    started = time.monotonic()
    with pytest.raises(pika.exceptions.AMQPConnectionError) as err:
        connect(proc)
    assert "paused for maintenance" in str(err.value)
    assert 2 <= time.monotonic() - started < 5
    assert http(proc, "/vhosts")[1] == {"paused": ["/"]}
    existing.close()


def test_a_new_instance_takes_over_the_port_while_the_old_one_drains(proxy_factory):
    old = proxy_factory("--drain-timeout", "10")
    client = connect(old)
    client.channel().queue_declare("", exclusive=True)
    new = proxy_factory("--listen", f"{old.host}:{old.port}", wait=False)
    wait_until(lambda: http(new, "/readyz")[0] == 200, timeout=15, msg="second instance not ready")
    old.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: events(old, "drain_start"), timeout=5, msg="old instance not draining")
    for _ in range(5):  # every new client lands on the new instance
        conn = connect(old)
        conn.channel().queue_declare("", exclusive=True)
        conn.close()
    assert len(events(new, "client_open")) == 5
    client.close()
    assert old.proc.wait(10) == 0


def _raw_handshake_after(proc, prefix: bytes) -> None:
    import pamqp.commands as C

    from ._support import RawAMQP

    with RawAMQP(proc.host, proc.port) as raw:
        raw.send_bytes(prefix)
        _start, _tune, reply = raw.handshake()
        assert isinstance(reply, C.Connection.OpenOk)
        listing = http(proc, "/connections")[1]["connections"]
        return listing


def test_proxy_protocol_gives_the_real_client_address(proxy_factory):
    import ipaddress
    import struct

    proc = proxy_factory("--accept-proxy-protocol", "true")
    listing = _raw_handshake_after(proc, b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 5673\r\n")
    assert [(c["remote"], c["proxied_by"].split(":")[0]) for c in listing] == [("203.0.113.7:5555", "127.0.0.1")]
    body = ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("::1").packed
    header = b"\r\n\r\n\x00\r\nQUIT\n" + struct.pack(">BBH", 0x21, 0x21, 36) + body + struct.pack(">HH", 6000, 5673)
    listing = _raw_handshake_after(proc, header)
    assert [c["remote"] for c in listing] == ["[2001:db8::7]:6000"]
    # A trusted source that sends no PROXY header is refused.
    with socket.create_connection((proc.host, proc.port), timeout=5) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        assert sock.recv(100) == b""
    audit = wait_until(lambda: [r for r in proc.log_records() if r.get("event") == "audit"], timeout=5, msg="audit")
    assert audit[0]["remote"] == "203.0.113.7:5555"


def test_proxy_protocol_only_from_trusted_sources(proxy_factory):
    proc = proxy_factory("--accept-proxy-protocol", "true", "--proxy-protocol-from", "192.0.2.0/24")
    conn = connect(proc)  # loopback is not trusted: served as is, no header expected
    conn.channel().queue_declare("", exclusive=True)
    (listing,) = http(proc, "/connections")[1]["connections"]
    assert listing["remote"].startswith("127.0.0.1:") and listing["proxied_by"] is None
    conn.close()
