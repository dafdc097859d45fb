"""Where a benchmark run connects to (a *target*), and the processes behind the targets: our
proxy (built on the test suite's ProxyProcess), the cloudamqp/amqproxy anchor, and the Admin
connection that declares and deletes each run's queue straight on the broker.

A server behind a target answers the same questions whichever proxy it is: up() and stop(),
alive, cpu_seconds() and rss_kb() of its process tree, clients() and upstream_connections() it
holds now, and the warnings in its log since an offset."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import accepting, free_port
from tests.support.proxy import ProxyProcess, ProxyStartError
from tests.support.settings import PROXY_START_TIMEOUT, PROXY_STOP_TIMEOUT, REPO_ROOT

from .client import connect
from .system import tree_cpu_seconds, tree_rss_kb

QUEUE_EXPIRES_MS = 10 * 60 * 1000  # leftover queues vanish 10 min after last use
LOG_TAIL = 30  # log lines quoted when a server dies


@dataclass
class Target:
    """Where a run connects to: the broker itself (direct, server None) or a server in front of it."""

    name: str
    host: str
    port: int
    server: ProxyServer | Anchor | None = None


def log_lines_since(path: Path, offset: int) -> list[str]:
    """The lines of a server's log written after byte offset (none if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


class _TreeMeasures:
    """CPU seconds and RSS of a server process and its descendants, while it runs (the class
    that mixes this in has `pid` and `alive`)."""

    pid: int | None
    alive: bool

    def cpu_seconds(self) -> float | None:
        return tree_cpu_seconds(self.pid) if self.alive and self.pid else None

    def rss_kb(self) -> int | None:
        return tree_rss_kb(self.pid) if self.alive and self.pid else None


class ProxyServer(_TreeMeasures, ProxyProcess):
    """Our proxy under test: the test suite's ProxyProcess at --log-level warning, started again in
    place if it died, with its admin API's client and upstream counts."""

    kind = "proxy"

    def __init__(self, upstream: str, extra_args: list[str], log_path: Path, name: str = "proxy",
                 root: Path = REPO_ROOT):  # fmt: skip
        super().__init__(log_path, extra_args, upstream=upstream, root=root, log_level="warning")
        self.name = name
        self.starts = 0

    def up(self) -> None:
        """Start (again, after a crash) and wait until it accepts clients and /healthz answers 200."""
        if self.proc is not None:
            self.stop()  # reaps the old process and closes its log handle
        self.start()
        self.starts += 1
        try:
            self.wait_ready()
        except ProxyStartError:
            self.stop()
            raise

    def target(self) -> Target:  # the benchmark's Target (the test suite's has no server)
        return Target(self.name, self.host, self.port, self)

    def _admin(self, path: str) -> dict | None:
        try:
            return self.admin_json(path, timeout=5)
        except (OSError, ValueError):
            return None

    def clients(self) -> int | None:
        return (self._admin("/healthz") or {}).get("clients")

    def upstream_connections(self) -> int | str | None:
        """Upstream connections now (per upstream node as JSON when there are several)."""
        ups = ((self._admin("/stats") or {}).get("totals") or {}).get("upstream_connections")
        return json.dumps(ups) if isinstance(ups, dict) else ups

    def log_problems_since(self, offset: int) -> list[dict]:
        """WARNING-or-worse JSON log records written after byte offset."""
        out = []
        for line in log_lines_since(self.log_path, offset):
            if not line.startswith("{"):
                if line.strip() and not line.startswith("#"):
                    out.append({"level": "RAW", "message": line})
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                out.append(rec)
        return out


# "2026-12-03T11:43:15.683865Z  INFO amq_proxy.server Proxy listening on 127.0.0.1:5673"
ANCHOR_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\S+\s+([A-Z]+)\s+(.*)$")


class Anchor(_TreeMeasures):
    """cloudamqp/amqproxy, a release binary run beside ours as a measuring instrument only
    (nothing of it belongs in the project), with its defaults. It has no admin API: its /metrics
    gauges give the client and upstream connection counts."""

    kind = "anchor"

    def __init__(self, binary: Path, upstream: str, log_path: Path, name: str = "anchor"):
        self.binary = Path(binary)
        self.upstream = upstream
        self.log_path = Path(log_path)
        self.name = name
        self.host = "127.0.0.1"
        self.port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def cmd(self) -> list[str]:
        return [str(self.binary), f"--listen={self.host}", f"--port={self.port}", f"--http-port={self.http_port}",
                self.upstream]  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def version(self) -> str | None:
        try:
            out = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True, timeout=10)
            return out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    def up(self, timeout: float = PROXY_START_TIMEOUT) -> None:
        """Start (again, after a crash) and wait until it accepts clients and /healthz answers 200."""
        self.stop()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(("# " + " ".join(self.cmd) + "\n").encode())
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.binary.name} exited with {self.returncode} at start:\n{self.log_tail()}")
            if accepting(self.host, self.port, timeout=1) and self._get("/healthz") is not None:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.binary.name} not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = PROXY_STOP_TIMEOUT) -> None:
        """SIGTERM (it exits once no client is left), SIGKILL after timeout."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)

    def target(self) -> Target:
        return Target(self.name, self.host, self.port, self)

    def _get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.http_port}{path}", timeout=5) as resp:
                return resp.read().decode() if resp.status == 200 else None
        except (OSError, urllib.error.URLError):
            return None

    def gauge(self, name: str) -> int | None:
        """One unlabelled gauge of its /metrics (Prometheus text), e.g. amqproxy_client_connections."""
        for line in (self._get("/metrics") or "").splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                try:
                    return int(float(value))
                except ValueError:
                    return None
        return None

    def clients(self) -> int | None:
        return self.gauge("amqproxy_client_connections")

    def upstream_connections(self) -> int | None:
        return self.gauge("amqproxy_upstream_connections")

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_problems_since(self, offset: int) -> list[dict]:
        """WARN-or-worse log lines after byte offset; lines of another shape (a crash) as RAW."""
        out = []
        for line in log_lines_since(self.log_path, offset):
            if not line.strip() or line.startswith("#"):
                continue
            m = ANCHOR_LOG_LINE.match(line)
            if m is None:
                out.append({"level": "RAW", "message": line})
            elif m.group(1) in ("WARN", "ERROR", "FATAL"):
                out.append({"level": m.group(1), "message": m.group(2)})
        return out

    def log_tail(self, n: int = LOG_TAIL) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class Admin:
    """Short-lived connection straight to the broker for queue setup and cleanup."""

    def __init__(self, broker: Target):
        self.broker = broker
        self.created: set[str] = set()

    def declare(self, name: str, arguments: dict | None = None) -> None:
        args = {"x-expires": QUEUE_EXPIRES_MS, **(arguments or {})}
        conn = connect(self.broker)
        try:
            conn.channel().queue_declare(name, durable=False, auto_delete=False, arguments=args)
            self.created.add(name)
        finally:
            conn.close()

    def delete(self, name: str) -> int | None:
        """Delete the queue; return the number of messages it still held."""
        conn = connect(self.broker)
        try:
            ch = conn.channel()
            left = ch.queue_delete(name)
            self.created.discard(name)
            return left
        finally:
            conn.close()

    def settle(self, name: str, expected: int, quiet: float = 2.0, limit: float = 20.0) -> int:
        """The queue's depth once it reaches `expected` or stops changing for `quiet` seconds.

        A client's Close-Ok does not mean the broker has routed its last publish yet (through
        the proxy, the upstream channel may still be working through it), so a count taken at
        once can miss messages that are merely in flight."""
        conn = connect(self.broker)
        try:
            ch = conn.channel()
            deadline = time.monotonic() + limit
            last, since = -1, time.monotonic()
            while True:
                count = ch.queue_declare(name, passive=True)[1]
                now = time.monotonic()
                if count != last:
                    last, since = count, now
                if count == expected or now - since >= quiet or now >= deadline:
                    return count
                time.sleep(0.1)
        finally:
            conn.close()

    def cleanup(self) -> None:
        for name in list(self.created):
            try:
                self.delete(name)
            except Exception as e:  # noqa: BLE001
                print(f"warning: could not delete queue {name}: {e}", file=sys.stderr)
