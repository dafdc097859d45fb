"""Cluster: RabbitMQ nodes of the tests' own (an OwnBroker each: own node names, ports, data
dirs) sharing one Erlang cookie and clustered with `rabbitmqctl join_cluster`, for quorum queues,
streams and node failures under the proxy. The shared broker is never part of it.

Starting nodes is the slow part (seconds each on two cores), so the nodes boot in parallel and
the cluster is meant to be started once per test session; `ensure_healthy()` undoes whatever a
test did to a node (killed, app stopped, drained for maintenance) before the next test."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from .own_node import OwnBroker, OwnBrokerError, pid_alive
from .settings import OWN_BROKER_START_TIMEOUT

FORM_TIMEOUT = 60.0  # s for every node to see every other one running


class ClusterError(RuntimeError):
    pass


def in_parallel(calls: list[Callable[[], object]]) -> None:
    """Run the calls on threads of their own and wait for all; re-raise the first error."""
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(call,), daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


class Cluster:
    """`size` own RabbitMQ nodes clustered together; the first one is the seed the others join."""

    def __init__(self, base_dir: Path, sbin: Path, size: int = 3, extra_conf: str = "") -> None:
        cookie = uuid.uuid4().hex.upper()
        self.nodes = [OwnBroker(Path(base_dir) / f"node-{i + 1}", sbin, extra_conf, cookie=cookie) for i in range(size)]
        self.drained: set[str] = set()  # node names put into maintenance mode by drain()

    # -- addresses -------------------------------------------------------------
    @property
    def seed(self) -> OwnBroker:
        return self.nodes[0]

    @property
    def upstream_urls(self) -> list[str]:
        return [node.upstream_url for node in self.nodes]

    def upstream_args(self) -> list[str]:
        """The proxy flags naming every node: --upstream URL, repeated."""
        return [arg for url in self.upstream_urls for arg in ("--upstream", url)]

    def node_at(self, port: int) -> OwnBroker:
        """The node listening for AMQP on `port` (e.g. from a proxy's /upstreams node label)."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def label(self, node: OwnBroker) -> str:
        """How the proxy names the node in /upstreams and metrics (host:port)."""
        return f"{node.host}:{node.port}"

    # -- lifecycle -------------------------------------------------------------
    def start(self, timeout: float = OWN_BROKER_START_TIMEOUT) -> Cluster:
        """Boot every node at once, then join the others to the seed one by one (parallel joins
        would race on the cluster's schema) and wait until all of them see each other."""
        in_parallel([lambda node=node: node.start(timeout) for node in self.nodes])
        for node in self.nodes[1:]:
            node.stop_app()
            node.ctl("join_cluster", self.seed.nodename, timeout=timeout)
            node.start_app()
        self.await_formed()
        return self

    def stop(self) -> None:
        in_parallel([node.stop for node in self.nodes])

    def remove_data(self) -> None:
        for node in self.nodes:
            node.remove_data()

    def running_nodes(self, asked: OwnBroker) -> set[str]:
        """The running cluster members as `asked` sees them (empty if it cannot be asked)."""
        try:
            out = asked.ctl("cluster_status", "--formatter", "json", timeout=15)
        except OwnBrokerError:
            return set()
        start = out.find("{")
        if start < 0:
            return set()
        return set(json.loads(out[start:]).get("running_nodes", []))

    def await_formed(self, timeout: float = FORM_TIMEOUT) -> None:
        """Wait until every node runs its app and sees all nodes running."""
        want = {node.nodename for node in self.nodes}
        deadline = time.monotonic() + timeout
        seen: dict[str, set[str]] = {}
        while time.monotonic() < deadline:
            seen = {node.nodename: self.running_nodes(node) for node in self.nodes}
            if all(members == want for members in seen.values()):
                return
            time.sleep(0.5)
        raise ClusterError(f"cluster not formed within {timeout}s: running nodes as each node sees them: {seen}")

    # -- maintenance -----------------------------------------------------------
    def upgrade(self, node: OwnBroker, *args: str, timeout: float = 120) -> str:
        """rabbitmq-upgrade -n <node> ARGS (drain, revive, await_online_quorum_plus_one, ...)."""
        cmd = [str(node.sbin / "rabbitmq-upgrade"), "-n", node.nodename, *args]
        res = subprocess.run(
            cmd,
            env=node.env,
            cwd=str(node.base_dir),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if res.returncode != 0:
            raise ClusterError(f"{' '.join(cmd[1:])} failed ({res.returncode}): {res.stdout}\n{res.stderr}")
        return res.stdout

    def drain(self, node: OwnBroker) -> None:
        """Maintenance mode: the node closes its client connections, suspends its listeners and
        hands its quorum queue leaderships to the other nodes."""
        self.drained.add(node.nodename)
        self.upgrade(node, "drain")

    def revive(self, node: OwnBroker) -> None:
        self.upgrade(node, "revive")
        self.drained.discard(node.nodename)

    def disturbed(self) -> list[OwnBroker]:
        """Nodes a test left unwell: gone, paused, app stopped, alarmed or drained."""
        return [
            node
            for node in self.nodes
            if not pid_alive(node.pid)
            or node.paused
            or node.app_stopped
            or node.memory_alarm
            or node.nodename in self.drained
        ]

    def ensure_healthy(self) -> None:
        """Undo what a test did: every node running, app started, out of maintenance, and the
        cluster whole again. Cheap when no node was disturbed (rabbitmqctl calls take a second)."""
        if not self.disturbed():
            return
        in_parallel([node.ensure_healthy for node in self.nodes])
        for node in self.nodes:
            if node.nodename in self.drained:
                self.revive(node)
        self.await_formed()

    def alive(self) -> list[OwnBroker]:
        return [node for node in self.nodes if pid_alive(node.pid)]

    def log_tails(self, n: int = 40) -> dict[str, str]:
        return {node.nodename: node.log_tail(n) for node in self.nodes}

    def __repr__(self) -> str:
        return f"<Cluster {[repr(node) for node in self.nodes]}>"
