"""A long measurement: does an idle pool stay up for hours at the defaults while its broker is
merely busy? (No false positives of the silence watchdog or the heartbeats.)

A proxy with the default options in front of a RabbitMQ node of its own, a few idle clients
through it (a consumer, a confirm publisher that publishes once a minute, a channel that only
declared a queue), and a busy broker now and then: SIGSTOP for 1-2 s (a GC pause) every
`--pause-every` seconds, and a memory alarm for `--alarm-seconds` every `--alarm-every` seconds
while the publisher's publish waits for its confirm (the watchdog then waits for that confirm).
Every minute it records the proxy's unplanned upstream closes and the upstream connection ids;
one that changed is a false positive. Writes JSON lines to `--out` and a summary at the end.

    python -m chaos.idle_soak --minutes 120 --out chaos/results/idle-soak.jsonl

Traffic stays on loopback; the run ends by itself after `--minutes`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pika
import pika.exceptions

from tests.support.own_node import OwnBroker, rabbitmq_sbin
from tests.support.proxy import ProxyProcess

UNPLANNED = ("lost", "broker_closed", "heartbeat_timeout", "health_check", "silence_timeout")


def metric(proxy: ProxyProcess, name: str) -> dict[str, float]:
    """Samples of a metric: labels text -> value."""
    url = f"http://{proxy.host}:{proxy.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {m.group(1) or "": float(m.group(2)) for m in re.finditer(rf"^{name}(?:\{{(.*)\}})? (\S+)$", text, re.M)}


def upstream_ids(proxy: ProxyProcess) -> list[int]:
    url = f"http://{proxy.host}:{proxy.http_port}/upstreams"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return sorted(c["id"] for c in json.loads(resp.read())["connections"])


class Idle(threading.Thread):
    """One idle client: answers heartbeats (process_data_events), records any error."""

    def __init__(self, proxy: ProxyProcess, role: str, errors: list[str], stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"idle-{role}")
        self.proxy, self.role, self.errors, self.stop = proxy, role, errors, stop
        self.published = self.confirmed = 0
        self.publish_now = threading.Event()

    def run(self) -> None:
        try:
            conn = pika.BlockingConnection(
                pika.ConnectionParameters(self.proxy.host, self.proxy.port, blocked_connection_timeout=None)
            )
            ch = conn.channel()
            queue = ch.queue_declare(f"idle-soak-{self.role}", durable=True).method.queue
            if self.role == "consumer":
                ch.basic_consume(queue, lambda c, m, p, b: c.basic_ack(m.delivery_tag))
            elif self.role == "publisher":
                ch.confirm_delivery()
            while not self.stop.is_set():
                conn.process_data_events(time_limit=1)
                if self.role == "publisher" and self.publish_now.is_set():
                    self.publish_now.clear()
                    self.published += 1
                    ch.basic_publish("", "idle-soak-consumer", b"tick", pika.BasicProperties(delivery_mode=2))
                    self.confirmed += 1
            conn.close()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {self.role}: {exc!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=120)
    parser.add_argument("--pause-every", type=float, default=300, help="s between SIGSTOP pauses")
    parser.add_argument("--alarm-every", type=float, default=900, help="s between memory alarms")
    parser.add_argument("--alarm-seconds", type=float, default=30)
    parser.add_argument("--out", default="chaos/results/idle-soak.jsonl")
    args = parser.parse_args()
    sbin = rabbitmq_sbin()
    assert sbin is not None, "rabbitmq-server not found"
    base = Path(tempfile.mkdtemp(prefix="idle-soak-"))
    broker = OwnBroker(base / "broker", sbin).start()
    proxy = ProxyProcess(base / "proxy.log", (), upstream=broker.upstream_url).start().wait_ready()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # kill PID: the finally below still cleans up
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    stop = threading.Event()
    clients = [Idle(proxy, role, errors, stop) for role in ("consumer", "publisher", "declarer")]
    started = time.monotonic()
    pauses = alarms = 0
    next_pause = started + args.pause_every
    next_alarm = started + args.alarm_every
    next_sample = started
    rng = random.Random()
    try:
        for client in clients:
            client.start()
        time.sleep(3)
        first_ids = upstream_ids(proxy)
        with out.open("a") as log:
            while time.monotonic() - started < args.minutes * 60:
                now = time.monotonic()
                if now >= next_pause:
                    pause = rng.uniform(1.0, 2.0)
                    broker.pause()
                    time.sleep(pause)
                    broker.resume()
                    pauses += 1
                    next_pause = now + args.pause_every
                if now >= next_alarm:
                    broker.set_memory_alarm(True)
                    clients[1].publish_now.set()  # a publish that waits for its confirm all along
                    time.sleep(args.alarm_seconds)
                    broker.set_memory_alarm(False)
                    alarms += 1
                    next_alarm = time.monotonic() + args.alarm_every
                if now >= next_sample:
                    closed = metric(proxy, "amqproxy_upstream_connections_closed_total")
                    unplanned = {k: v for k, v in closed.items() if any(f'reason="{r}"' in k for r in UNPLANNED)}
                    ids = upstream_ids(proxy)
                    if rng.random() < 0.2:
                        clients[1].publish_now.set()
                    sample = {
                        "minutes": round((now - started) / 60, 1),
                        "upstreams": ids,
                        "unplanned_closes": unplanned,
                        "pauses": pauses,
                        "alarms": alarms,
                        "published": clients[1].published,
                        "confirmed": clients[1].confirmed,
                        "client_errors": list(errors),
                    }
                    log.write(json.dumps(sample) + "\n")
                    log.flush()
                    next_sample = now + 60
                time.sleep(0.5)
        summary = {
            "summary": True,
            "minutes": round((time.monotonic() - started) / 60, 1),
            "pauses": pauses,
            "alarms": alarms,
            "upstreams_first": first_ids,
            "upstreams_last": upstream_ids(proxy),
            "unplanned_closes": {
                k: v
                for k, v in metric(proxy, "amqproxy_upstream_connections_closed_total").items()
                if any(f'reason="{r}"' in k for r in UNPLANNED)
            },
            "published": clients[1].published,
            "confirmed": clients[1].confirmed,
            "client_errors": errors,
        }
        with out.open("a") as log:
            log.write(json.dumps(summary) + "\n")
        print(json.dumps(summary, indent=1))
    finally:
        stop.set()
        for client in clients:
            client.join(5)
        proxy.stop()
        broker.stop()


if __name__ == "__main__":
    main()
