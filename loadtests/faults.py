"""Faults for the load scenarios, through Toxiproxy's HTTP API (toxiproxy-python).

The runner (``loadtests/run.py``) puts the upstream of the proxy under test behind a
Toxiproxy proxy (``ToxiproxySetup``); a scenario's locustfile calls
``install_fault_controller()``, which, when the test starts, runs the scenario's fault plan
in a greenlet of the master (or only) Locust process and records when each fault began and
ended in ``LOADTEST_FAULT_LOG`` (JSON), so the runner can compare the failure counts of
Locust's per-second history inside and outside the fault windows.

Fault plans (``LOADTEST_FAULT``, JSON, from the scenario's ``fault`` entry):

The fault starts at ``at`` x the run time after the test starts, or earlier when the
fault plus ``recovery_s`` would not fit before ``LOADTEST_DEADLINE`` (set by the runner: the
earliest the run can end; Locust's run time also counts its own start-up).

* ``{"kind": "outage", "at": 0.3, "duration": 3}``: at 30 % of the run time, disable the
  Toxiproxy proxy (its listener closes and every connection through it drops: the node is
  gone) for 3 s, then enable it again.
* ``{"kind": "flap", "at": 0.2, "duration": 6, "down": 1, "up": 1}``: from 20 % of the run
  time, for 6 s, alternate 1 s disabled / 1 s enabled (a flapping node), then stay enabled.

The Toxiproxy server is ``TOXIPROXY_URL`` (e.g. ``http://127.0.0.1:8474``) when set; otherwise
the runner starts the project's Toxiproxy-compatible fault proxy
(``python -m chaos.faultproxy --listen 127.0.0.1:PORT``).
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import urlparse


def use_toxiproxy(url: str):
    """Point toxiproxy-python (a class-level host/port) at url; return a Toxiproxy client."""
    from toxiproxy.api import APIConsumer
    from toxiproxy.server import Toxiproxy

    u = urlparse(url if "://" in url else f"http://{url}")
    APIConsumer.host = u.hostname or "127.0.0.1"
    APIConsumer.port = u.port or 8474
    return Toxiproxy()


def _set_enabled(url: str, name: str, enabled: bool) -> None:
    server = use_toxiproxy(url)
    proxy = server.get_proxy(name)
    if proxy is None:
        raise RuntimeError(f"toxiproxy proxy {name!r} not found at {url}")
    if enabled:
        proxy.enable()
    else:
        proxy.disable()


def run_fault_plan(
    plan: dict, run_time: float, url: str, name: str, log_path: str | None, deadline: float | None = None
) -> list[dict]:
    """Execute the plan (blocking; gevent-friendly when the stdlib is patched). deadline (unix
    time, the earliest the run can end): start early enough that the fault and its recovery
    allowance fit before it, whatever Locust's start-up took."""
    windows: list[dict] = []
    delay = max(0.0, plan.get("at", 0.3) * run_time)
    if deadline is not None:
        room = deadline - time.time() - plan.get("duration", 3.0) - plan.get("recovery_s", 5.0) - 1.5
        delay = max(0.0, min(delay, room))

    def save() -> None:
        if log_path:
            with open(log_path, "w") as f:
                json.dump({"plan": plan, "proxy": name, "windows": windows}, f)

    time.sleep(delay)
    kind = plan.get("kind", "outage")
    if kind == "outage":
        spans = [(plan.get("duration", 3.0), 0.0)]
    elif kind == "flap":
        spans = []
        total, down, up = plan.get("duration", 6.0), plan.get("down", 1.0), plan.get("up", 1.0)
        t = 0.0
        while t + down <= total + 1e-9:
            spans.append((down, up))
            t += down + up
    else:
        raise ValueError(f"unknown fault kind {kind!r}")
    try:
        for down, up in spans:
            start = time.time()
            _set_enabled(url, name, False)
            windows.append({"start": start, "end": None})
            save()
            time.sleep(down)
            _set_enabled(url, name, True)
            windows[-1]["end"] = time.time()
            save()
            time.sleep(up)
    finally:
        try:
            _set_enabled(url, name, True)
        except Exception:  # noqa: BLE001 - the runner re-enables and deletes it anyway
            pass
        if windows and windows[-1]["end"] is None:
            windows[-1]["end"] = time.time()
        save()
    return windows


def install_fault_controller() -> None:
    """Called from a locustfile: run LOADTEST_FAULT when the test starts (master/local only)."""
    from locust import events
    from locust.runners import WorkerRunner

    plan_text = os.environ.get("LOADTEST_FAULT")
    if not plan_text:
        return
    plan = json.loads(plan_text)

    @events.test_start.add_listener
    def _start_faults(environment, **_kw):
        if isinstance(environment.runner, WorkerRunner):
            return
        url = os.environ.get("TOXIPROXY_URL")
        name = os.environ.get("LOADTEST_TOXI_PROXY")
        if not url or not name:
            environment.events.request.fire(
                request_type="amqp",
                name="setup: fault",
                response_time=0,
                response_length=0,
                exception=RuntimeError("fault scenario without TOXIPROXY_URL / LOADTEST_TOXI_PROXY"),
            )
            return
        run_time = float(os.environ.get("LOADTEST_RUN_TIME", "30"))
        import gevent

        def run():
            try:
                deadline = float(os.environ["LOADTEST_DEADLINE"]) if os.environ.get("LOADTEST_DEADLINE") else None
                run_fault_plan(plan, run_time, url, name, os.environ.get("LOADTEST_FAULT_LOG"), deadline)
            except Exception as e:  # noqa: BLE001
                environment.events.request.fire(
                    request_type="amqp", name="setup: fault", response_time=0, response_length=0, exception=e
                )

        gevent.spawn(run)
