"""ProxyProcess: an amqproxy subprocess with its own ports and log file, as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .ports import accepting, free_port
from .settings import LOG_TAIL_LINES, PROXY_ROOT, PROXY_START_TIMEOUT, PROXY_STOP_TIMEOUT, UPSTREAM_URL
from .target import Target


class ProxyStartError(RuntimeError):
    pass


class ProxyProcess:
    """An amqproxy subprocess with its own ports and log file."""

    def __init__(
        self,
        log_path: Path,
        extra_args=(),
        upstream: str | None = UPSTREAM_URL,
        *,
        root: Path = PROXY_ROOT,
        log_level: str = "info",
    ):
        # root: the checkout whose amqproxy runs (a benchmark compares another commit's in one run)
        self.root = Path(root)
        self.log_level = log_level
        self.host = "127.0.0.1"
        self.port = free_port()
        self.http_port = free_port()
        self.upstream = upstream
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self._log_file = None

    # -- lifecycle ---------------------------------------------------------
    @property
    def cmd(self) -> list[str]:
        # An explicit --upstream among the extra arguments replaces the default one (repeating
        # the flag would add a second node, not override the first).
        upstream_given = any(a == "--upstream" or a.startswith("--upstream=") for a in self.extra_args)
        return [
            sys.executable,
            "-m",
            "amqproxy",
            "--listen",
            f"{self.host}:{self.port}",
            *([] if upstream_given or self.upstream is None else ["--upstream", self.upstream]),
            "--http-listen",
            f"{self.host}:{self.http_port}",
            "--log-format",
            "json",
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def start(self) -> ProxyProcess:
        # Only the explicit flags configure the proxy: drop AMQPROXY_* settings
        # from the environment (the test suite's own AMQPROXY_TEST_* included).
        env = {k: v for k, v in os.environ.items() if not k.startswith("AMQPROXY_")}
        env["PYTHONPATH"] = os.pathsep.join([str(self.root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_file.write(("# " + " ".join(self.cmd) + "\n").encode())
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=str(self.root),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_ready(self, timeout: float = PROXY_START_TIMEOUT) -> ProxyProcess:
        deadline = time.monotonic() + timeout
        amqp_ok = http_ok = False
        last_err = "not tried"
        while time.monotonic() < deadline:
            if not self.alive:
                raise ProxyStartError(
                    f"amqproxy exited with code {self.returncode} during startup\n"
                    f"--- log ({self.log_path}) ---\n{self.log_tail()}"
                )
            if not amqp_ok:
                amqp_ok = accepting(self.host, self.port, timeout=1)
                if not amqp_ok:
                    last_err = "AMQP port: not accepting"
            if amqp_ok and not http_ok:
                try:
                    status = self.healthz(timeout=1)
                    http_ok = status == 200
                    if not http_ok:
                        last_err = f"/healthz answered {status}"
                except (OSError, urllib.error.URLError) as e:
                    last_err = f"/healthz: {e!r}"
            if amqp_ok and http_ok:
                self.ready = True
                return self
            time.sleep(0.05)
        raise ProxyStartError(
            f"amqproxy not ready after {timeout}s (last error: {last_err})\n"
            f"--- log ({self.log_path}) ---\n{self.log_tail()}"
        )

    def healthz(self, timeout: float = 2.0) -> int:
        url = f"http://{self.host}:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code

    def admin_json(self, path: str, timeout: float = 10.0):
        """GET an admin endpoint without a token (e.g. "/stats", "/upstreams?channels=1")."""
        with urllib.request.urlopen(f"http://{self.host}:{self.http_port}{path}", timeout=timeout) as resp:
            return json.loads(resp.read())

    def stop(self, timeout: float = PROXY_STOP_TIMEOUT) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        rc = self.proc.returncode
        if self._log_file is not None:
            try:
                self._log_file.write(f"# exited with code {rc}\n".encode())
            finally:
                self._log_file.close()
                self._log_file = None
        return rc

    # -- introspection -----------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def non_json_lines(self, since: int = 0) -> list[str]:
        """Log lines after byte offset `since` that are not JSON objects (our
        own '# ...' lines excepted): with --log-format json these are
        uncaught exceptions or stray prints."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        bad = []
        for line in text.splitlines():
            if not line.strip() or line.startswith("# "):
                continue
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            if not ok:
                bad.append(line)
        return bad

    def log_records(self) -> list[dict]:
        """The JSON log lines (non-JSON lines are skipped)."""
        out = []
        for line in self.log_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def target(self) -> Target:
        return Target("proxy", self.host, self.port, proxy=self)

    @property
    def connection_name_prefix(self) -> str:
        return f"amqproxy[{self.pid}]"

    def __repr__(self):
        return f"<ProxyProcess pid={self.pid} {self.host}:{self.port} http={self.http_port}>"
