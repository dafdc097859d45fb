"""`--workers N`: a supervisor process running N proxy workers that share the listen port.

Why processes: one gevent hub runs on one core. Each worker is a complete proxy (own pool,
breakers, limits) bound to the same address with SO_REUSEPORT, so the kernel spreads new
client connections over them. The supervisor carries no AMQP traffic; it owns what an operator
sees as "the proxy":

- the admin API on --http-listen, answered for all workers: each worker serves its own admin
  API on a unix socket in a private run directory, and the supervisor fans requests out and
  merges the JSON answers (the status page's files it serves itself: its script then polls
  the merged answers);
- /metrics, from prometheus-client's multiprocess files (every worker, and the supervisor,
  writes there; live-state gauges are bridged by each worker, see metrics.MultiprocessBridge);
- signals: SIGTERM/SIGINT drain every worker (a second one forces them), SIGHUP validates the
  configuration once and then reloads every worker;
- restarting a worker that died, with a growing delay if it keeps dying.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

import gevent
from gevent import subprocess
from gevent.event import Event
from gevent.pywsgi import WSGIServer

from . import __version__, statuspage
from .config import Config, ConfigError, parse_config
from .options import OPTIONS
from .recent import EVENTS_KEPT

log = logging.getLogger("amqproxy.supervisor")

WORKER_ENV = "_AMQPROXY_WORKER"  # set in a worker's environment: its index
WORKER_ADMIN_ENV = "_AMQPROXY_WORKER_ADMIN"  # the unix socket its admin API listens on
WORKER_TIMEOUT = 10.0  # s: a worker's answer to a fanned-out admin request
START_TIMEOUT = 30.0  # s: every worker must answer on its admin socket within this at start
RESTART_DELAY_MIN = 0.5
RESTART_DELAY_MAX = 30.0
CRASH_WINDOW = 60.0  # s: crashes closer together than this grow the restart delay
PR_SET_PDEATHSIG = 1

StartResponse = Callable[..., Any]


class WorkerProcess:
    """One worker: its process, its admin socket, and its crash history."""

    def __init__(self, index: int, run_dir: str) -> None:
        self.index = index
        self.admin_socket = os.path.join(run_dir, f"worker-{index}.sock")
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0  # monotonic time of the current process's start
        self.restarts = 0
        self.crashes: list[float] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart_delay(self, now: float) -> float:
        self.crashes = [t for t in self.crashes if now - t < CRASH_WINDOW] + [now]
        return min(RESTART_DELAY_MAX, RESTART_DELAY_MIN * 2 ** (len(self.crashes) - 1))

    def request(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, str]:
        """(status, body, content type) of this worker's admin API; raises OSError if unreachable."""
        conn = _UnixHTTPConnection(self.admin_socket, timeout=WORKER_TIMEOUT)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.read(), response.getheader("Content-Type", "")
        except http.client.HTTPException as exc:
            raise OSError(f"worker {self.index}: {exc}") from None
        finally:
            conn.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.run_dir = tempfile.mkdtemp(prefix="amqproxy-")  # 0700: only we reach the sockets
        metrics_dir = os.path.join(self.run_dir, "metrics")
        os.mkdir(metrics_dir)
        # Before prometheus_client is first imported: every metric of this process and of the
        # workers (which inherit the variable) lives in files there, summed at scrape time.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        from . import metrics
        from .admin import page_response, token_refusal

        self.metrics = metrics
        self._token_refusal = token_refusal
        self._page_response = page_response
        self.metrics_dir = metrics_dir
        self.workers = [WorkerProcess(i, self.run_dir) for i in range(config.workers)]
        self.started_at = time.monotonic()
        self.stopping = False
        self.started = False  # every worker answered once; before that a dying worker aborts the start
        self._stopped = Event()
        self._admin: WSGIServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self.stop, signal.Signals(signum).name)
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self.reload, "SIGHUP"))
        for worker in self.workers:
            self._spawn(worker)
            gevent.spawn(self._watch, worker)
        if not self._wait_workers_answer(START_TIMEOUT):
            log.error("workers did not start", extra={"event": "workers_start_failed"})
            self.stop("startup failure")
            self._stopped.wait()
            return 2
        self.started = True
        if self.config.http_listen is not None:
            self._admin = WSGIServer(self.config.http_listen, self._app, log=None, error_log=log)
            try:
                self._admin.start()
            except OSError as exc:
                log.error("cannot listen", extra={"event": "listen_failed", "error": str(exc)})
                self.stop("cannot listen")
        if not self.stopping:
            log.info(
                "amqproxy supervisor started",
                extra={
                    "event": "supervisor_start",
                    "version": __version__,
                    "workers": len(self.workers),
                    "pids": [w.pid for w in self.workers],
                    "listen": "{}:{}".format(*self.config.listen),
                },
            )
        self._stopped.wait()
        if self._admin is not None:
            self._admin.stop(timeout=1)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        failed = [w.index for w in self.workers if w.proc is not None and w.proc.returncode not in (0, None)]
        log.info("amqproxy supervisor stopped", extra={"event": "supervisor_stopped", "failed_workers": failed})
        return 1 if failed else 0

    def _spawn(self, worker: WorkerProcess) -> None:
        argv = self.config.sources[0]
        argv = sys.argv[1:] if argv is None else argv
        env = dict(os.environ, **{WORKER_ENV: str(worker.index), WORKER_ADMIN_ENV: worker.admin_socket})
        worker.started_at = time.monotonic()
        worker.proc = subprocess.Popen(
            [sys.executable, "-m", "amqproxy", *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only, which forwards it
            preexec_fn=_die_with_parent,
        )

    def _watch(self, worker: WorkerProcess) -> None:
        """Wait for the worker to exit; restart it unless the proxy is stopping."""
        while True:
            assert worker.proc is not None
            code = worker.proc.wait()
            pid = worker.proc.pid
            self.metrics.mark_worker_dead(pid)
            if self.stopping or not self.started:
                if all(not w.alive for w in self.workers):
                    self._stopped.set()
                return
            delay = worker.restart_delay(time.monotonic())
            log.error(
                "worker exited; restarting it",
                extra={"event": "worker_exit", "worker": worker.index, "pid": pid, "code": code, "restart_in_s": delay},
            )
            gevent.sleep(delay)
            if self.stopping:
                return
            worker.restarts += 1
            self.metrics.WORKER_RESTARTS.inc()
            self._spawn(worker)

    def _wait_workers_answer(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pending = list(self.workers)
        while pending and time.monotonic() < deadline and not self.stopping:
            if any(not w.alive for w in self.workers):
                return False  # e.g. the port is taken: restarting would only fail again
            for worker in list(pending):
                try:
                    worker.request("GET", "/healthz", {}, b"")
                    pending.remove(worker)
                except OSError:
                    pass
            if pending:
                gevent.sleep(0.05)
        return not pending

    def stop(self, why: str) -> None:
        """First signal: every worker drains (see Proxy.stop). Second: every worker exits now."""
        if self.stopping:
            log.warning("second stop signal: workers exit now", extra={"event": "stop_forced"})
        else:
            log.info("stopping workers", extra={"event": "supervisor_stop", "signal": why})
        self.stopping = True
        for worker in self.workers:
            if worker.alive:
                assert worker.proc is not None
                worker.proc.send_signal(signal.SIGTERM)
        if all(not w.alive for w in self.workers):
            self._stopped.set()

    def reload(self, origin: str) -> dict[str, Any]:
        """Validate the configuration once here; only a valid one is reloaded by every worker."""
        argv, env = self.config.sources
        try:
            new = parse_config(argv, env)
        except ConfigError as exc:
            self.metrics.RELOADS.labels("rejected").inc()
            log.error(
                "configuration reload rejected; the running configuration stays",
                extra={"event": "reload", "origin": origin, "result": "rejected", "problems": exc.problems},
            )
            return {"result": "rejected", "problems": exc.problems, "needs_restart": []}
        token = self.config.admin_token  # the workers still hold the old configuration, token included
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        answers = self._fan_out("POST", "/reload", headers, b"")
        self.config = _keep_restart_only(self.config, new)
        results = [json.loads(body) for _worker, status, body, _type in answers if status in (200, 400)]
        for worker, status, _body, _type in answers:
            if status not in (200, 400):
                log.error(
                    "worker did not reload",
                    extra={"event": "reload_worker_failed", "worker": worker.index, "status": status},
                )
        order = ["applied", "needs_restart", "rejected"]
        result = max((r["result"] for r in results), key=order.index, default="rejected")
        return {
            "result": result,
            "changed": sorted({flag for r in results for flag in r.get("changed", [])}),
            "needs_restart": sorted({flag for r in results for flag in r.get("needs_restart", [])}),
            "problems": sorted({p for r in results for p in r.get("problems", [])}),
            "workers": len(results),
        }

    # ------------------------------------------------------------------ admin API

    def _fan_out(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> list[tuple[WorkerProcess, int, bytes, str]]:
        """The same request to every live worker, in parallel; unreachable workers answer 503."""

        def ask(worker: WorkerProcess) -> tuple[WorkerProcess, int, bytes, str]:
            try:
                return (worker, *worker.request(method, path, headers, body))
            except OSError as exc:
                error = json.dumps({"error": f"worker {worker.index} unreachable: {exc}"}).encode()
                return worker, 503, error, "application/json"

        jobs = [gevent.spawn(ask, worker) for worker in self.workers]
        gevent.joinall(jobs)
        return [job.value for job in jobs]

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics" and method in ("GET", "HEAD"):
            text, content_type = self.metrics.multiprocess_exposition(self._supervisor_state())
            return _respond(start_response, 200, text, content_type)
        if path == "/healthz" and method in ("GET", "HEAD"):
            return self._healthz(start_response)
        if path in statuspage.PATHS and method in ("GET", "HEAD"):
            return self._page_response(environ, start_response, self.config.admin_token)  # type: ignore[no-any-return]
        if path == "/readyz" and self.stopping:
            draining = {"ready": False, "reasons": ["draining: the proxy is shutting down"]}
            return _respond(start_response, 503, json.dumps(draining).encode(), "application/json")
        if path == "/reload" and method == "POST":
            refusal = self._token_refusal(environ, self.config.admin_token)
            if refusal is not None:
                error = json.dumps({"error": refusal.message}).encode()
                status = int(refusal.status.split()[0])
                return _respond(start_response, status, error, "application/json", refusal.headers)
            result = self.reload("admin API")
            status = 400 if result["result"] == "rejected" else 200
            return _respond(start_response, status, json.dumps(result).encode(), "application/json")
        query = environ.get("QUERY_STRING", "")
        target = quote(path) + (f"?{query}" if query else "")
        headers: dict[str, str] = {}
        if "HTTP_AUTHORIZATION" in environ:
            headers["Authorization"] = environ["HTTP_AUTHORIZATION"]
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        answers = self._fan_out(method, target, headers, body)
        status, payload, content_type = merge_answers(path, [(w.index, s, b, t) for w, s, b, t in answers])
        return _respond(start_response, status, payload, content_type)

    def _healthz(self, start_response: StartResponse) -> Iterable[bytes]:
        answers = self._fan_out("GET", "/healthz", {}, b"")
        serving = [json.loads(body) for _w, status, body, _t in answers if status == 200]
        now = time.monotonic()
        payload = {
            "status": "ok" if serving else "no worker serving",
            "clients": sum(item.get("clients", 0) for item in serving),
            "version": __version__,
            "uptime_s": round(now - self.started_at, 3),
            "workers": [
                {
                    "worker": w.index,
                    "pid": w.pid,
                    "alive": w.alive,
                    "restarts": w.restarts,
                    "uptime_s": round(now - w.started_at, 3) if w.alive else None,
                }
                for w in self.workers
            ],
        }
        return _respond(start_response, 200 if serving else 503, json.dumps(payload).encode(), "application/json")

    def _supervisor_state(self) -> dict[str, Any]:
        processes = {"supervisor": os.getpid()}
        processes.update({str(w.index): w.pid for w in self.workers if w.alive and w.pid is not None})
        return {"workers": len(self.workers), "alive": sum(1 for w in self.workers if w.alive), "processes": processes}


def merge_answers(path: str, answers: list[tuple[int, int, bytes, str]]) -> tuple[int, bytes, str]:
    """One answer for the whole proxy from each worker's (index, status, body, content type).

    Lists of things (connections, upstream connections, nodes) are concatenated with a
    `worker` field; counts are summed; a request about one connection is answered by the worker
    that has it; anything else that every worker answered identically is passed through."""
    statuses = [status for _i, status, _b, _t in answers]
    if path.startswith("/connections/"):
        for _i, status, body, content_type in answers:
            if status != 404:
                return status, body, content_type
        return answers[0][1], answers[0][2], answers[0][3]
    if not all(t.startswith("application/json") for _i, _s, _b, t in answers):
        text = b"".join(f"== worker {i} ({s}) ==\n".encode() + body + b"\n" for i, s, body, _t in answers)
        return max(statuses), text, "text/plain; charset=utf-8"
    bodies = [(i, json.loads(body)) for i, _s, body, _t in answers]
    status = max(statuses)
    if path == "/connections" and status == 200:
        merged: dict[str, Any] = {"connections": _tagged(bodies, "connections")}
    elif path == "/upstreams" and status == 200:
        merged = {
            "nodes": _tagged(bodies, "nodes"),
            "connections": _tagged(bodies, "connections"),
            "events": sorted(_tagged(bodies, "events"), key=lambda e: e.get("at", 0), reverse=True)[:EVENTS_KEPT],
        }
    elif path == "/limits" and status == 200:
        merged = _merge_limits([body for _i, body in bodies])
    elif path == "/stats" and status == 200:
        merged = _merge_stats([body for _i, body in bodies])
    elif path == "/vhosts" and status == 200:
        merged = {"paused": sorted({v for _i, body in bodies for v in body.get("paused", [])})}
    elif path == "/readyz":
        reasons = [f"worker {i}: {reason}" for i, body in bodies for reason in body.get("reasons", [])]
        merged = {"ready": status == 200, "reasons": reasons}
    elif all(body == bodies[0][1] for _i, body in bodies):
        merged = bodies[0][1]
    else:
        merged = {"workers": [dict(body, worker=i) for i, body in bodies]}
    return status, json.dumps(merged).encode(), "application/json"


def _tagged(bodies: list[tuple[int, dict[str, Any]]], key: str) -> list[dict[str, Any]]:
    return [dict(item, worker=i) for i, body in bodies for item in body.get(key, [])]


def _merge_stats(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    pools: dict[tuple[str, str], dict[str, Any]] = {}
    for body in bodies:
        for item in body.get("pools", []):
            key = (item["vhost"], item["user"])
            pools[key] = _sum(pools[key], item) if key in pools else item
    totals: dict[str, Any] = {}
    for body in bodies:
        totals = _sum(totals, body.get("totals", {})) if totals else body.get("totals", {})
    return {"pools": [pools[k] for k in sorted(pools)], "totals": totals}


def _merge_limits(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """The settings are the same in every worker (one configuration); the counts add up."""
    merged = dict(bodies[0])
    rows = {row["limit"]: dict(row) for row in bodies[0].get("limits", [])}
    for body in bodies[1:]:
        for row in body.get("limits", []):
            if row["limit"] in rows:
                for key in ("refused", "would_refuse"):
                    rows[row["limit"]][key] += row.get(key, 0)
    merged["limits"] = list(rows.values())
    refused: dict[str, int] = {}
    for body in bodies:
        for reason, count in body.get("refused", {}).items():
            refused[reason] = refused.get(reason, 0) + count
    merged["refused"] = dict(sorted(refused.items()))
    return merged


def _sum(a: Any, b: Any) -> Any:
    """Numbers add, dicts merge key by key, anything else keeps the first value."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _sum(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return a + b
    return a


def _keep_restart_only(old: Config, new: Config) -> Config:
    """The supervisor's view after a reload: live options from `new`, restart-only ones from `old`."""
    for option in OPTIONS:
        if not option.reloadable:
            setattr(new, option.name, getattr(old, option.name))
    return new


def _respond(
    start_response: StartResponse,
    status: int,
    body: bytes,
    content_type: str,
    headers: list[tuple[str, str]] | None = None,
) -> Iterable[bytes]:
    reason = http.client.responses.get(status, "")
    start_response(
        f"{status} {reason}",
        [("Content-Type", content_type), ("Content-Length", str(len(body)))] + (headers or []),
    )
    return [body]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM us (a drain) if the supervisor dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: workers notice the orphaning in their janitor
        pass
