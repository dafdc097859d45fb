"""`--workers N`: a supervisor and N worker processes sharing the listen port (SO_REUSEPORT).

What an operator sees must be one proxy: clients land on every worker, the admin API and
/metrics answer for all of them, signals drain/reload all of them, and a worker that dies is
replaced while the others keep serving.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pika
import pika.exceptions
import pytest

from ._support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.proxy_only]

TOKEN = "workers-token"
CLIENTS = 24  # enough that SO_REUSEPORT's hash puts clients on both workers (miss chance 2**-23)


def http(proc, path: str, method: str = "GET") -> tuple[int | None, dict | str]:
    request = urllib.request.Request(f"http://{proc.host}:{proc.http_port}{path}", method=method)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            body = response.read()
            status = response.status
            ctype = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        body, status, ctype = err.read(), err.code, err.headers.get("Content-Type", "")
    except OSError:
        return None, {}
    return status, json.loads(body or b"{}") if ctype.startswith("application/json") else body.decode()


def connect(proc) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters(host=proc.host, port=proc.port))


def events(proc, name: str) -> list[dict]:
    return [r for r in proc.log_records() if r.get("event") == name]


def metric(text: str, sample: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "admin-token"
    path.write_text(TOKEN)
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def two_workers(proxy_factory, token_file):
    return proxy_factory("--workers", "2", "--admin-token-file", token_file, "--drain-timeout", "3")


def test_both_workers_serve_and_the_admin_api_answers_for_both(two_workers):
    proc = two_workers
    status, health = http(proc, "/healthz")
    assert status == 200 and [w["alive"] for w in health["workers"]] == [True, True]
    worker_pids = {w["pid"] for w in health["workers"]}
    assert proc.pid not in worker_pids and len(worker_pids) == 2

    clients = [connect(proc) for _ in range(CLIENTS)]
    try:
        for client in clients:
            client.channel().queue_declare("", exclusive=True)
        _, listing = http(proc, "/connections")
        open_ones = [c for c in listing["connections"] if c["state"] == "open"]
        assert len(open_ones) == CLIENTS
        assert {c["worker"] for c in open_ones} == {0, 1}  # the kernel spread them

        _, stats = http(proc, "/stats")
        assert stats["totals"]["clients"] == CLIENTS and stats["totals"]["client_channels"] == CLIENTS
        _, upstreams = http(proc, "/upstreams")
        assert {c["worker"] for c in upstreams["connections"]} == {0, 1}  # a pool per worker

        # /metrics sums the workers: event counters at once, live gauges within a janitor tick.
        def scraped() -> str:
            return http(proc, "/metrics")[1]

        text = scraped()
        assert metric(text, 'amqproxy_client_connections_opened_total{user="guest",vhost="/"}') == CLIENTS
        assert metric(text, "amqproxy_workers_alive") == 2 and metric(text, "amqproxy_workers_configured") == 2
        wait_until(
            lambda: metric(scraped(), 'amqproxy_client_connections{user="guest",vhost="/"}') == CLIENTS,
            timeout=5,
            msg="live client gauge not summed over the workers",
        )

        # A request about one connection reaches the worker that holds it.
        victim = open_ones[-1]
        status, answer = http(proc, f"/connections/{victim['id']}?reason=test", method="DELETE")
        assert status == 200 and answer["closed"] == victim["id"]
        assert http(proc, "/connections/nope-1")[0] == 404
    finally:
        for client in clients:
            try:
                client.close()
            except pika.exceptions.AMQPError:
                pass


def test_a_dead_worker_is_replaced_and_the_others_keep_serving(two_workers):
    proc = two_workers
    _, health = http(proc, "/healthz")
    pids = [w["pid"] for w in health["workers"]]
    clients = [connect(proc) for _ in range(CLIENTS)]
    channels = [client.channel() for client in clients]
    _, listing = http(proc, "/connections")
    on_worker_1 = {c["remote"] for c in listing["connections"] if c["worker"] == 1}

    os.kill(pids[0], signal.SIGKILL)
    wait_until(
        lambda: (h := http(proc, "/healthz")[1]) and h["workers"][0]["pid"] not in (pids[0], None),
        timeout=10,
        msg="worker 0 not restarted",
    )
    wait_until(lambda: http(proc, "/readyz")[0] == 200, timeout=10, msg="not ready after the restart")
    (exit_line,) = events(proc, "worker_exit")
    assert exit_line["worker"] == 0 and exit_line["code"] == -signal.SIGKILL
    assert metric(http(proc, "/metrics")[1], "amqproxy_worker_restarts_total") == 1

    survivors = 0
    for client, channel in zip(clients, channels, strict=True):
        local = "{}:{}".format(*client._impl._transport._sock.getsockname())
        if local in on_worker_1:  # clients of the live worker never noticed
            channel.queue_declare("", exclusive=True)
            survivors += 1
        try:
            client.close()
        except pika.exceptions.AMQPError:
            pass
    assert survivors == len(on_worker_1) > 0
    with connect(proc) as fresh:  # and new clients are served
        fresh.channel().queue_declare("", exclusive=True)


def test_sigterm_drains_every_worker_and_sighup_reloads_every_worker(proxy_factory, tmp_path, token_file):
    conf = tmp_path / "amqproxy.conf"
    conf.write_text("idle-timeout = 30\n")
    proc = proxy_factory(
        "--workers", "2", "--config", str(conf), "--admin-token-file", token_file, "--drain-timeout", "2"
    )

    conf.write_text("idle-timeout = -1\n")
    status, answer = http(proc, "/reload", method="POST")
    assert status == 400 and answer["result"] == "rejected" and "--idle-timeout" in answer["problems"][0]
    conf.write_text("idle-timeout = 12\n")
    status, answer = http(proc, "/reload", method="POST")
    assert (status, answer["result"], answer["workers"], answer["changed"]) == (200, "applied", 2, ["--idle-timeout"])
    conf.write_text("idle-timeout = 13\n")
    proc.proc.send_signal(signal.SIGHUP)

    def worker_reloads() -> list[int]:
        return sorted(r["worker"] for r in events(proc, "reload") if "worker" in r and r["result"] == "applied")

    wait_until(lambda: worker_reloads() == [0, 0, 1, 1], timeout=10, msg="SIGHUP did not reach both workers")

    clients = [connect(proc) for _ in range(CLIENTS)]
    for client in clients:
        client.channel().queue_declare("", exclusive=True)
    started = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: http(proc, "/readyz")[0] in (503, None), timeout=5, msg="/readyz stayed ready")
    for client in clients:  # every worker drained for 2 s, then closed its clients with 320
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as err:
            client.process_data_events(time_limit=15)
            client.process_data_events(time_limit=15)
        assert (err.value.reply_code, err.value.reply_text) == (320, "CONNECTION_FORCED - proxy shutting down")
    assert proc.proc.wait(15) == 0
    assert time.monotonic() - started >= 2
    assert {r["worker"] for r in events(proc, "drain_start")} == {0, 1}
    assert events(proc, "supervisor_stopped")[0]["failed_workers"] == []


def test_workers_fail_at_start_when_the_port_is_taken():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # without SO_REUSEPORT: nobody else may bind the port
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        argv = ["--listen", f"127.0.0.1:{port}", "--http-listen", "off", "--workers", "2", "--log-format", "json"]
        result = subprocess.run([sys.executable, "-m", "amqproxy", *argv], capture_output=True, text=True, timeout=60)
    finally:
        holder.close()
    assert result.returncode == 2, result.stderr[-2000:]
    assert '"event": "workers_start_failed"' in result.stderr
