"""Several amqproxy instances behind a real HAProxy (tests/support/haproxy.py: TCP mode,
send-proxy-v2, health checks of each instance's /readyz), in front of the three-node cluster.

- the instances see the clients' real addresses (the PROXY header), in /connections and in the
  audit log, with HAProxy's own address as `proxied_by`;
- a rolling restart (drain one instance with SIGTERM, start it again, then the next) under a
  churning load loses no confirmed message, and no client sees more than the one
  `320 CONNECTION_FORCED - proxy shutting down` per drained instance that lets it reconnect
  (through HAProxy, to an instance in rotation, at the first attempt); HAProxy takes a draining
  instance out of rotation (its /readyz answers 503 at once, --shutdown-delay) before the
  instance stops accepting, and sends it no new client after that.
"""

from __future__ import annotations

import datetime
import signal
import time

import pamqp.commands as C
import pytest

from tests.integration._support import RawAMQP, wait_until
from tests.support.ports import accepting

from ._load import Churner, Consumer, Ledger, Publisher, connector, stop_all

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

SHUTDOWN_DELAY = 2.0  # --shutdown-delay: 10 health checks of 200 ms (HAProxy needs one to fail)
DRAIN_TIMEOUT = 4.0  # --drain-timeout: longer than a churning client's session
FLEET_ARGS = ("--shutdown-delay", str(SHUTDOWN_DELAY), "--drain-timeout", str(DRAIN_TIMEOUT))
SHUTTING_DOWN = (320, "CONNECTION_FORCED - proxy shutting down")
DRAIN_BOUND = 30.0  # s for every confirmed message to be consumed after the load stopped


def _connections(fleet) -> list[dict]:
    return [c for proc in fleet.proxies for c in proc.admin_json("/connections")["connections"]]


@pytest.mark.cluster_smoke
def test_instances_see_the_clients_real_addresses(fleet):
    f = fleet(2)
    target = f.haproxy.target()
    raw = RawAMQP(target.host, target.port, source="127.0.0.2")  # another "host" on loopback
    py_amqp = target.amqp()
    try:
        _start, _tune, reply = raw.handshake()
        assert isinstance(reply, C.Connection.OpenOk), reply
        raw.send(C.Channel.Open(), 1)
        raw.expect(C.Channel.OpenOk, 1)
        py_amqp.channel().queue_declare("", exclusive=True)
        raw_address = f"127.0.0.2:{raw.sock.getsockname()[1]}"
        amqp_address = f"127.0.0.1:{py_amqp.sock.getsockname()[1]}"
        listed = {c["remote"]: c for c in _connections(f)}
        assert {raw_address, amqp_address} <= set(listed), listed
        for address in (raw_address, amqp_address):
            balancer = listed[address]["proxied_by"]
            assert balancer and balancer.startswith("127.0.0.1:") and balancer != address, listed[address]
    finally:
        raw.close()
        py_amqp.collect()
    wait_until(
        lambda: (
            {raw_address, amqp_address}
            <= {r["remote"] for p in f.proxies for r in p.log_records() if r.get("event") == "audit"}
        ),
        10,
        msg="an audit line per client, with its real address",
    )
    audits = {r["remote"]: r for p in f.proxies for r in p.log_records() if r.get("event") == "audit"}
    assert audits[raw_address]["proxied_by"].startswith("127.0.0.1:")
    assert audits[amqp_address]["user"] == "guest"


def _log_time(record: dict) -> float:
    """The wall-clock time of a proxy log line (local time, millisecond resolution)."""
    return datetime.datetime.strptime(record["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_rolling_restart_under_churn_loses_nothing(fleet, queues, figures):
    f = fleet(3, *FLEET_ARGS)
    q = queues("rolling")
    declare = f.haproxy.target().pika()
    declare.channel().queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
    declare.close()

    ledger = Ledger()
    connect = connector(f.haproxy.host, f.haproxy.port)
    churners = [Churner(f"churn-{i}", connect, ledger, True, q) for i in range(4)]
    publishers = [Publisher(f"pub-{i}", connect, ledger, True, q) for i in range(2)]
    consumers = [Consumer(f"con-{i}", connect, ledger, True, q) for i in range(3)]
    clients = churners + publishers + consumers
    for client in clients:
        client.start()
    for client in clients:
        assert client.ready.wait(20), f"{client.client} did not start"
    time.sleep(2)

    steps = []  # per instance: when it was signalled, left rotation, closed its listener, came back
    for index in range(len(f.proxies)):
        proc = f.proxies[index]
        signalled = time.monotonic()
        signalled_wall = time.time()
        proc.proc.send_signal(signal.SIGTERM)
        down = f.haproxy.wait_status(index, "DOWN", SHUTDOWN_DELAY + 5)
        down_wall = time.time() - (time.monotonic() - down)
        still_accepting = accepting(proc.host, proc.port, timeout=0.5)
        assert proc.proc.wait(SHUTDOWN_DELAY + DRAIN_TIMEOUT + 15) == 0, proc.log_tail()
        records = proc.log_records()
        (closed,) = [r for r in records if r.get("event") == "drain_start"]
        late = [r for r in records if r.get("event") == "client_open" and _log_time(r) > down_wall + 0.5]
        f.restart(index)
        back = f.haproxy.wait_status(index, "UP", 15)
        steps.append(
            {
                "signalled": signalled,
                "out_of_rotation_s": down - signalled,
                "listener_closed_after_s": _log_time(closed) - signalled_wall,
                "still_accepting_when_out": still_accepting,
                "clients_at_drain": closed["clients"],
                "new_clients_after_out": late,
                "back_after_s": back - signalled,
            }
        )
    time.sleep(2)
    stuck = stop_all(churners + publishers, 30)
    assert not stuck, f"clients hang: {stuck}"
    wait_until(lambda: not ledger.missing(), DRAIN_BOUND, msg=f"{len(ledger.missing())} confirmed not consumed")
    stuck = stop_all(consumers, 30)
    assert not stuck, f"consumers hang: {stuck}"

    windows = [s["signalled"] for s in steps] + [float("inf")]
    per_step: dict[tuple[str, int], int] = {}
    for error in ledger.errors:
        step = max(i for i, start in enumerate(windows) if start <= error.at) if error.at >= windows[0] else -1
        per_step[(error.client, step)] = per_step.get((error.client, step), 0) + 1
    reconnected = sorted({e.client for e in ledger.errors})
    figures(
        f"ROLLING RESTART of {len(steps)} instances: confirmed {len(ledger.confirmed)}, lost {len(ledger.missing())}, "
        f"duplicates {ledger.duplicates}, connections {sum(ledger.sessions.values())}; "
        f"{len(ledger.errors)} x 320 to {len(reconnected)} clients ({reconnected}); "
        + "; ".join(
            f"instance {i + 1}: out of rotation after {s['out_of_rotation_s']:.2f} s, listener closed after "
            f"{s['listener_closed_after_s']:.2f} s, {s['clients_at_drain']} clients at the drain, back after "
            f"{s['back_after_s']:.2f} s"
            for i, s in enumerate(steps)
        )
    )
    assert not ledger.missing(), sorted(ledger.missing())[:10]
    others = [e for e in ledger.errors if (e.kind, e.code, e.text) != ("close", *SHUTTING_DOWN)]
    assert not others, f"errors other than the drain's 320: {others}"
    assert all(n == 1 for n in per_step.values()), f"a client got more than one 320 in a step: {per_step}"
    assert all(e.client.startswith(("pub-", "con-")) for e in ledger.errors), "a churning client got a 320"
    for i, s in enumerate(steps):
        assert s["still_accepting_when_out"], f"instance {i + 1} stopped accepting before HAProxy took it out"
        assert s["out_of_rotation_s"] < s["listener_closed_after_s"], s
        assert not s["new_clients_after_out"], f"instance {i + 1} got new clients after leaving rotation: {s}"
