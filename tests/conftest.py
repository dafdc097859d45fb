"""Shared pytest fixtures for the amqproxy test suite.

Integration tests talk to a real RabbitMQ broker, either directly (target
``direct``) or through an amqproxy subprocess (target ``proxy``), and assert
identical observable outcomes for both.

Environment variables:

``AMQPROXY_TEST_TARGETS``
    Comma separated list of targets the ``target`` fixture is parametrized
    over (default ``direct,proxy``).  Tests that only make sense through the
    proxy are skipped when ``proxy`` is not listed.
``AMQPROXY_TEST_BROKER``
    ``host:port`` of the RabbitMQ broker (default ``127.0.0.1:5672``).
``AMQPROXY_TEST_DEFAULT_TIMEOUT``
    Per-test timeout in seconds applied (via pytest-timeout) to every test
    that has no ``timeout`` marker, unless a timeout was configured on the
    command line, in an ini file or by ``PYTEST_TIMEOUT`` (default 60).
``AMQPROXY_TEST_RABBITMQ_SBIN``
    Directory of the ``rabbitmq-server`` and ``rabbitmqctl`` scripts used to
    run the ``own_broker`` nodes (default ``/usr/lib/rabbitmq/bin``, else the
    directory of ``rabbitmq-server`` on PATH).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

ALL_TARGETS = ("direct", "proxy")
TARGETS = tuple(t.strip() for t in os.environ.get("AMQPROXY_TEST_TARGETS", "direct,proxy").split(",") if t.strip())
for _t in TARGETS:
    if _t not in ALL_TARGETS:
        raise RuntimeError(f"AMQPROXY_TEST_TARGETS: unknown target {_t!r} (known: {ALL_TARGETS})")

_broker = os.environ.get("AMQPROXY_TEST_BROKER", "127.0.0.1:5672")
BROKER_HOST, _, _broker_port = _broker.rpartition(":")
BROKER_PORT = int(_broker_port)
UPSTREAM_URL = f"amqp://{BROKER_HOST}:{BROKER_PORT}"

DEFAULT_TIMEOUT = float(os.environ.get("AMQPROXY_TEST_DEFAULT_TIMEOUT", "60"))
PROXY_START_TIMEOUT = 15.0
PROXY_STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 200
OWN_BROKER_START_TIMEOUT = 60.0
OWN_BROKER_STOP_TIMEOUT = 30.0
# An own node's memory watermark when no alarm is wanted (RabbitMQ's default).
OWN_BROKER_MEMORY_WATERMARK = "0.4"

_PROXIES_KEY = pytest.StashKey[list]()
_OWN_BROKERS_KEY = pytest.StashKey[list]()


# --------------------------------------------------------------------------
# pytest hooks
# --------------------------------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: test needs a running RabbitMQ broker")
    config.addinivalue_line(
        "markers",
        "proxy_only: test only makes sense through amqproxy (skipped unless 'proxy' is in AMQPROXY_TEST_TARGETS)",
    )
    config.addinivalue_line(
        "markers",
        "targets(*names): restrict the `target` fixture of a test to these "
        "targets (intersected with AMQPROXY_TEST_TARGETS)",
    )
    if not config.pluginmanager.hasplugin("timeout"):
        # Keep the marker known so that tests still collect without the plugin.
        config.addinivalue_line("markers", "timeout(seconds): per-test timeout (needs pytest-timeout)")


def _timeout_configured(config) -> bool:
    try:
        if config.getoption("timeout") is not None:
            return True
    except ValueError:
        return False
    if os.environ.get("PYTEST_TIMEOUT"):
        return True
    try:
        return bool(config.getini("timeout"))
    except ValueError:
        return False


def pytest_collection_modifyitems(config, items):
    integration_dir = Path(__file__).resolve().parent / "integration"
    add_timeout = config.pluginmanager.hasplugin("timeout") and not _timeout_configured(config)
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if integration_dir in path.parents:
            item.add_marker(pytest.mark.integration)
        if add_timeout and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))
        if item.get_closest_marker("proxy_only") and "proxy" not in TARGETS:
            item.add_marker(pytest.mark.skip(reason="proxy not in AMQPROXY_TEST_TARGETS"))


def pytest_generate_tests(metafunc):
    if "target" not in metafunc.fixturenames:
        return
    wanted = list(TARGETS)
    marker = metafunc.definition.get_closest_marker("targets")
    if marker is not None:
        wanted = [t for t in wanted if t in marker.args]
    if not wanted:
        # Parametrize with a skipped placeholder so the test shows up as skipped.
        metafunc.parametrize(
            "target",
            [pytest.param("none", marks=pytest.mark.skip(reason="no target selected"))],
            indirect=True,
        )
        return
    metafunc.parametrize("target", wanted, indirect=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for proc in item.stash.get(_PROXIES_KEY, []):
        report.sections.append(
            (
                f"amqproxy log (pid {proc.pid}, {proc.log_path}, last {LOG_TAIL_LINES} lines)",
                proc.log_tail(LOG_TAIL_LINES),
            )
        )
    for node in item.stash.get(_OWN_BROKERS_KEY, []):
        report.sections.append((f"own RabbitMQ node log ({node.log_path}, last 60 lines)", node.log_tail(60)))


def _record_proxy(request, proc: ProxyProcess) -> None:
    lst = request.node.stash.setdefault(_PROXIES_KEY, [])
    if proc not in lst:
        lst.append(proc)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (small race window, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def accepting(host: str, port: int, timeout: float) -> bool:
    """Whether something accepts TCP connections on host:port. Test ports come from the
    ephemeral range, where a connect with nothing listening can pick the destination port as its
    source and connect to itself (TCP simultaneous open; Linux makes it rare by giving connect()
    even ports and bind() odd ones): that is not a listener."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            return sock.getsockname() != sock.getpeername()
    except OSError:
        return False


def unique_name(prefix: str = "q") -> str:
    return f"amqproxy-test-{prefix}-{uuid.uuid4().hex[:12]}"


class ProxyStartError(RuntimeError):
    pass


class ProxyProcess:
    """An amqproxy subprocess with its own ports and log file."""

    def __init__(self, log_path: Path, extra_args=(), upstream: str | None = UPSTREAM_URL):
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
            "info",
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
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_file.write(("# " + " ".join(self.cmd) + "\n").encode())
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=str(REPO_ROOT),
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


# -- broker management ------------------------------------------------------


class Broker:
    """Access to the broker behind the proxy: rabbitmqctl and a direct AMQP
    connection for setup/cleanup that must not depend on the proxy."""

    host = BROKER_HOST
    port = BROKER_PORT

    def __init__(self):
        self.rabbitmqctl_path = shutil.which("rabbitmqctl")

    def ctl(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        if not self.rabbitmqctl_path:
            pytest.skip("rabbitmqctl not available")
        res = subprocess.run(
            [self.rabbitmqctl_path, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({res.returncode}): {res.stdout}\n{res.stderr}")
        return res.stdout

    def list_connections(self) -> list[dict]:
        """All broker connections, client_properties decoded to a dict."""
        out = self.ctl(
            "list_connections",
            "--formatter",
            "json",
            "name",
            "user",
            "vhost",
            "state",
            "client_properties",
        )
        start = out.find("[")
        rows = json.loads(out[start:]) if start >= 0 else []
        for row in rows:
            row["client_properties"] = _decode_ctl_table(row.get("client_properties"))
        return rows

    def proxy_upstreams(self, proxy: ProxyProcess) -> list[dict]:
        """Broker connections opened by this proxy instance."""
        prefix = proxy.connection_name_prefix
        return [
            c
            for c in self.list_connections()
            if str(c["client_properties"].get("connection_name", "")).startswith(prefix)
        ]

    def pika_connection(self, **kw):
        import pika

        params = dict(
            host=self.host,
            port=self.port,
            credentials=pika.PlainCredentials("guest", "guest"),
            socket_timeout=5,
            stack_timeout=10,
            connection_attempts=1,
        )
        params.update(kw)
        return pika.BlockingConnection(pika.ConnectionParameters(**params))

    def queue_message_count(self, queue: str, vhost: str = "/") -> int:
        conn = self.pika_connection(virtual_host=vhost)
        try:
            return conn.channel().queue_declare(queue, passive=True).method.message_count
        finally:
            conn.close()


def _decode_ctl_table(value):
    """rabbitmqctl --formatter json renders tables as [[key, type, value], ...]."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, list):
        return {}
    out = {}
    for entry in value:
        if isinstance(entry, list) and len(entry) == 3:
            key, typ, val = entry
            out[key] = _decode_ctl_table(val) if typ == "table" else val
    return out


# -- own RabbitMQ nodes -------------------------------------------------------


class OwnBrokerError(RuntimeError):
    pass


def _rabbitmq_sbin() -> Path | None:
    """The directory holding the real rabbitmq-server and rabbitmqctl scripts.

    Debian's /usr/sbin wrappers re-run them as the rabbitmq user (through su), who could not
    use a root-owned temporary directory, so the scripts they wrap are preferred."""
    candidates = []
    if os.environ.get("AMQPROXY_TEST_RABBITMQ_SBIN"):
        candidates.append(Path(os.environ["AMQPROXY_TEST_RABBITMQ_SBIN"]))
    candidates.append(Path("/usr/lib/rabbitmq/bin"))
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(found).parent)
    for directory in candidates:
        if (directory / "rabbitmq-server").exists() and (directory / "rabbitmqctl").exists():
            return directory
    return None


def _process_state(pid: int | str) -> str | None:
    """One-letter state of a process ('R', 'S', 'T', 'Z', ...), or None when there is none.
    `pid` may also be "<pid>/task/<tid>" for one thread."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None
    except OSError:  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"


def _pid_alive(pid: int | None) -> bool:
    """A killed, detached beam may linger as a zombie until it is reaped: that counts as gone, but
    only once all its threads have exited. Its main thread turns zombie first, and until the last
    thread is gone its sockets stay open: the AMQP listener still completes TCP handshakes, and a
    restart on the same port would take the dying node's listener for the new one's."""
    if pid is None:
        return False
    state = _process_state(pid)
    if state != "Z":
        return state not in (None, "X")
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(_process_state(f"{pid}/task/{tid}") not in (None, "Z", "X") for tid in threads)


class OwnBroker:
    """A RabbitMQ node of its own for tests that hurt their broker (stop it, kill it, pause it,
    alarm it), which the shared broker must never suffer.

    It has its own node name, AMQP port, distribution port, data and log directories, config
    file, empty plugins file and Erlang cookie (in its own HOME); the node's environment
    variables take precedence over /etc/rabbitmq/rabbitmq-env.conf (e.g. its NODENAME), and
    every start checks that the node came up under our name."""

    host = "127.0.0.1"
    user = "guest"
    password = "guest"

    def __init__(self, base_dir: Path, sbin: Path, extra_conf: str = ""):
        self.base_dir = Path(base_dir)
        self.sbin = Path(sbin)
        self.extra_conf = extra_conf  # more rabbitmq.conf lines (e.g. proxy_protocol = true)
        self.nodename = f"amqproxy-test-{uuid.uuid4().hex[:12]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.pid: int | None = None  # the beam.smp OS pid, recorded at each start
        self.paused = False
        self.app_stopped = False
        self.memory_alarm = False
        self._home = self.base_dir / "home"
        self._conf = self.base_dir / "rabbitmq.conf"
        self._pid_file = self.base_dir / "rabbitmq.pid"
        self._log_dir = self.base_dir / "log"
        self._write_files()

    # -- files and environment ----------------------------------------------
    def _write_files(self) -> None:
        for d in (self._home, self._log_dir, self.base_dir / "mnesia", self.base_dir / "conf.d"):
            d.mkdir(parents=True, exist_ok=True)
        cookie = self._home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        self._conf.write_text(
            f"listeners.tcp.1 = {self.host}:{self.port}\n"
            f"vm_memory_high_watermark.relative = {OWN_BROKER_MEMORY_WATERMARK}\n"
            "disk_free_limit.absolute = 1MB\n" + self.extra_conf
        )
        (self.base_dir / "enabled_plugins").write_text("[].\n")

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        base = self.base_dir
        env.update(
            HOME=str(self._home),  # the Erlang cookie of the node and of our rabbitmqctl calls
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS=self.host,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONFIG_FILE=str(self._conf),
            RABBITMQ_CONFIG_FILES=str(base / "conf.d"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(base / "plugins-expand"),
            RABBITMQ_FEATURE_FLAGS_FILE=str(base / "feature_flags"),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_MNESIA_DIR=str(base / "mnesia" / "node"),
            RABBITMQ_LOG_BASE=str(self._log_dir),
            RABBITMQ_PID_FILE=str(self._pid_file),
        )
        return env

    @property
    def upstream_url(self) -> str:
        return f"amqp://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._log_dir / f"{self.nodename}.log"

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log file)"

    def target(self) -> Target:
        """The node itself, for direct connections."""
        return Target("own-direct", self.host, self.port)

    # -- rabbitmqctl ---------------------------------------------------------
    def ctl(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """rabbitmqctl -n <this node> ARGS; returns stdout."""
        cmd = [str(self.sbin / "rabbitmqctl"), "-n", self.nodename, *args]
        try:
            res = subprocess.run(
                cmd,
                env=self.env,
                cwd=str(self.base_dir),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise OwnBrokerError(f"rabbitmqctl {' '.join(args)} timed out after {timeout}s") from e
        if check and res.returncode != 0:
            raise OwnBrokerError(
                f"rabbitmqctl -n {self.nodename} {' '.join(args)} failed ({res.returncode}): {res.stdout}\n{res.stderr}"
            )
        return res.stdout

    def eval(self, expr: str, timeout: float = 30) -> str:
        return self.ctl("eval", expr, timeout=timeout).strip()

    # -- lifecycle -----------------------------------------------------------
    def _port_open(self) -> bool:
        return accepting(self.host, self.port, timeout=0.5)

    def start(self, timeout: float = OWN_BROKER_START_TIMEOUT) -> OwnBroker:
        """Start the node (`rabbitmq-server -detached`) and wait until it is fully booted."""
        if _pid_alive(self.pid):
            raise OwnBrokerError(f"{self.nodename} is already running (pid {self.pid})")
        deadline = time.monotonic() + timeout
        self._pid_file.unlink(missing_ok=True)
        res = subprocess.run(
            [str(self.sbin / "rabbitmq-server"), "-detached"],
            env=self.env,
            cwd=str(self.base_dir),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if res.returncode != 0:
            raise OwnBrokerError(f"rabbitmq-server -detached failed ({res.returncode}): {res.stdout}\n{res.stderr}")
        # The AMQP listener opens at the end of the boot; poll it cheaply before asking rabbitmqctl.
        while not self._port_open():
            pid = self._read_pid_file()
            if pid is not None and not _pid_alive(pid):
                raise OwnBrokerError(f"{self.nodename} exited during startup\n--- log ---\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise OwnBrokerError(
                    f"{self.nodename}: port {self.port} not accepting after {timeout}s\n--- log ---\n{self.log_tail()}"
                )
            time.sleep(0.1)
        remaining_ms = max(1000, int((deadline - time.monotonic()) * 1000))
        try:
            out = self.eval(f"R = rabbit:await_startup({remaining_ms}), {{R, node(), os:getpid()}}.")
        except OwnBrokerError as exc:
            raise OwnBrokerError(f"{exc}\n--- log ---\n{self.log_tail()}") from exc
        m = re.fullmatch(r"\{ok,'?([^',]+)'?,\"(\d+)\"\}", out)
        if not m:
            raise OwnBrokerError(f"{self.nodename}: unexpected await_startup answer {out!r}")
        if m.group(1) != self.nodename:
            raise OwnBrokerError(f"node came up as {m.group(1)}, not {self.nodename}: the environment was overridden")
        self.pid = int(m.group(2))
        self.paused = self.app_stopped = self.memory_alarm = False
        return self

    def _read_pid_file(self) -> int | None:
        try:
            return int(self._pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _pid_alive(self.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        """Stop the node (rabbitmqctl stop, then SIGKILL if it is still there)."""
        if not _pid_alive(self.pid):
            return
        if self.paused:
            self.resume()
        try:
            self.ctl("stop", check=False, timeout=OWN_BROKER_STOP_TIMEOUT)
        except OwnBrokerError:
            pass
        if not self._wait_gone(10):
            os.kill(self.pid, signal.SIGKILL)
            self._wait_gone(10)

    def remove_data(self) -> None:
        if not _pid_alive(self.pid):
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def stop_app(self) -> None:
        self.app_stopped = True
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.app_stopped = False
        if not self._port_open():
            raise OwnBrokerError(f"{self.nodename}: port {self.port} closed after start_app")

    def kill9(self) -> None:
        """SIGKILL the node's beam.smp and wait until it is gone (its sockets die with it)."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        if not self._wait_gone(10):
            raise OwnBrokerError(f"{self.nodename} (pid {self.pid}) still alive after SIGKILL")
        self.paused = self.app_stopped = self.memory_alarm = False

    def restart(self, timeout: float = OWN_BROKER_START_TIMEOUT) -> None:
        """Start the node again, on the same ports and data directory."""
        self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the node hangs (its listen backlog still completes TCP handshakes)."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True
        deadline = time.monotonic() + 5
        while _process_state(self.pid) not in ("T", "t", "?"):
            if time.monotonic() > deadline:
                raise OwnBrokerError(f"{self.nodename} (pid {self.pid}) not stopped after SIGSTOP")
            time.sleep(0.01)

    def resume(self) -> None:
        if self.pid is not None and _pid_alive(self.pid):
            os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def set_memory_alarm(self, on: bool) -> None:
        """Raise or clear the node's memory alarm through its watermark, and return once
        rabbit_alarm has it (the alarm then reaches connections before any later frame)."""
        fraction = "0.0000001" if on else OWN_BROKER_MEMORY_WATERMARK
        want = "true" if on else "false"
        self.memory_alarm = True  # until proven cleared
        out = self.eval(
            f"ok = vm_memory_monitor:set_vm_memory_high_watermark({fraction}), "
            "Alarmed = fun() -> lists:any(fun({{resource_limit, memory, _}, _}) -> true; (_) -> false end, "
            "rabbit_alarm:get_alarms()) end, "
            f"Wait = fun W(0) -> timeout; W(N) -> case Alarmed() of {want} -> ok; _ -> timer:sleep(20), W(N - 1) end end, "
            "Wait(500)."
        )
        if out != "ok":
            raise OwnBrokerError(f"{self.nodename}: memory alarm not {'set' if on else 'cleared'} ({out!r})")
        self.memory_alarm = on

    def ensure_healthy(self) -> None:
        """Undo what a test did: resumed, running, app started, no alarm."""
        if self.paused:
            self.resume()
        if not _pid_alive(self.pid):
            self.start()
        elif self.app_stopped:
            self.start_app()
        if self.memory_alarm:
            self.set_memory_alarm(False)

    def __repr__(self):
        return f"<OwnBroker {self.nodename} amqp={self.port} dist={self.dist_port} pid={self.pid}>"


# -- targets ----------------------------------------------------------------


@dataclass
class Target:
    """Where a test connects to: the broker itself or a proxy in front of it."""

    name: str
    host: str
    port: int
    proxy: ProxyProcess | None = None
    user: str = "guest"
    password: str = "guest"
    vhost: str = "/"
    extra: dict = field(default_factory=dict)

    @property
    def is_proxy(self) -> bool:
        return self.proxy is not None

    # pika ----------------------------------------------------------------
    def pika_params(self, **kw):
        import pika

        user = kw.pop("user", self.user)
        password = kw.pop("password", self.password)
        params = dict(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(user, password),
            socket_timeout=5,
            stack_timeout=10,
            connection_attempts=1,
        )
        params.update(kw)
        return pika.ConnectionParameters(**params)

    def pika(self, **kw):
        import pika

        return pika.BlockingConnection(self.pika_params(**kw))

    # py-amqp -------------------------------------------------------------
    def amqp(self, connect: bool = True, connection_class=None, **kw):
        import amqp

        params = dict(
            host=f"{self.host}:{self.port}",
            userid=self.user,
            password=self.password,
            virtual_host=self.vhost,
            connect_timeout=5,
            read_timeout=10,
            write_timeout=10,
        )
        params.update(kw)
        conn = (connection_class or amqp.Connection)(**params)
        if connect:
            conn.connect()
        return conn

    # aio-pika ------------------------------------------------------------
    def url(self, user=None, password=None, vhost=None, **query) -> str:
        from urllib.parse import quote, urlencode

        user = self.user if user is None else user
        password = self.password if password is None else password
        vhost = self.vhost if vhost is None else vhost
        url = (
            f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/{quote(vhost, safe='')}"
        )
        if query:
            url += "?" + urlencode(query)
        return url

    def __str__(self):
        return self.name


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def broker() -> Broker:
    return Broker()


class _ProxyHolder:
    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self.current: ProxyProcess | None = None
        self.generation = 0
        self.all: list[ProxyProcess] = []

    def ensure(self) -> ProxyProcess:
        if self.current is not None and self.current.alive:
            return self.current
        self.generation += 1
        proc = ProxyProcess(self.base_dir / f"proxy-{self.generation}.log")
        self.all.append(proc)
        self.current = proc
        proc.start()
        try:
            proc.wait_ready()
        except ProxyStartError:
            proc.stop()
            raise
        return proc


@pytest.fixture(scope="session")
def _proxy_holder(tmp_path_factory):
    holder = _ProxyHolder(tmp_path_factory.mktemp("amqproxy-shared"))
    yield holder
    for proc in holder.all:
        proc.stop()


@pytest.fixture(scope="session")
def _proxy_start_failure():
    # Remember a start failure so that the 15 s wait is not repeated per test.
    return {}


@pytest.fixture
def proxy(request, _proxy_holder, _proxy_start_failure) -> ProxyProcess:
    """The shared amqproxy instance (default options), restarted if a previous
    test killed it.  Fails the test at teardown if the proxy died during it."""
    if "proxy" not in TARGETS:
        pytest.skip("proxy not in AMQPROXY_TEST_TARGETS")
    if "error" in _proxy_start_failure:
        pytest.fail(_proxy_start_failure["error"], pytrace=False)
    try:
        proc = _proxy_holder.ensure()
    except ProxyStartError as e:
        _proxy_start_failure["error"] = str(e)
        pytest.fail(str(e), pytrace=False)
    _record_proxy(request, proc)
    log_offset = proc.log_size()
    yield proc
    if not proc.alive:
        pytest.fail(
            f"amqproxy (pid {proc.pid}) exited with code {proc.returncode} "
            f"during this test\n--- log ---\n{proc.log_tail()}",
            pytrace=False,
        )
    _check_log_hygiene(proc, log_offset, shared=True)


def _check_log_hygiene(proc: ProxyProcess, since: int, shared: bool) -> None:
    if os.environ.get("AMQPROXY_TEST_ALLOW_NON_JSON_LOG"):
        return
    time.sleep(0.05)  # let output of just-closed connections land
    bad = proc.non_json_lines(since)
    if bad:
        where = " (shared proxy: may stem from the end of the previous test)" if shared else ""
        pytest.fail(
            f"amqproxy wrote {len(bad)} non-JSON log line(s) during this test{where}, "
            "e.g. an uncaught exception:\n" + "\n".join(bad[:60]),
            pytrace=False,
        )


@pytest.fixture
def proxy_factory(request, tmp_path):
    """start(*extra_args, upstream=URL) -> a fresh, ready ProxyProcess, stopped at teardown.

    The proxy's upstream is the shared broker unless `upstream` is given or the extra
    arguments contain their own `--upstream` flag(s) (e.g. an `own_broker`'s URL)."""
    if "proxy" not in TARGETS:
        pytest.skip("proxy not in AMQPROXY_TEST_TARGETS")
    started: list[ProxyProcess] = []

    def start(*extra_args: str, wait: bool = True, upstream: str | None = UPSTREAM_URL) -> ProxyProcess:
        proc = ProxyProcess(tmp_path / f"proxy-{len(started) + 1}.log", extra_args, upstream=upstream)
        started.append(proc)
        _record_proxy(request, proc)
        proc.start()
        if wait:
            try:
                proc.wait_ready()
            except ProxyStartError as e:
                pytest.fail(str(e), pytrace=False)
        return proc

    yield start
    for proc in started:
        proc.stop()
    for proc in started:
        if proc.ready:  # a failed start was reported already
            _check_log_hygiene(proc, 0, shared=False)


@pytest.fixture
def target(request) -> Target:
    """Parametrized over AMQPROXY_TEST_TARGETS: `direct` or `proxy`."""
    if request.param == "direct":
        return Target("direct", BROKER_HOST, BROKER_PORT)
    if request.param == "proxy":
        return request.getfixturevalue("proxy").target()
    raise ValueError(request.param)


@pytest.fixture
def direct() -> Target:
    """The broker itself, whatever the selected targets."""
    return Target("direct", BROKER_HOST, BROKER_PORT)


class Names:
    """Unique queue/exchange names; everything handed out is deleted (directly
    on the broker) at teardown."""

    def __init__(self):
        self.queues: list[tuple[str, str]] = []
        self.exchanges: list[tuple[str, str]] = []

    def queue(self, prefix: str = "q", vhost: str = "/") -> str:
        name = unique_name(prefix)
        self.queues.append((vhost, name))
        return name

    def exchange(self, prefix: str = "x", vhost: str = "/") -> str:
        name = unique_name(prefix)
        self.exchanges.append((vhost, name))
        return name

    def cleanup(self, broker: Broker) -> None:
        import pika.exceptions

        by_vhost: dict[str, list[tuple[str, str]]] = {}
        for vhost, name in self.queues:
            by_vhost.setdefault(vhost, []).append(("queue", name))
        for vhost, name in self.exchanges:
            by_vhost.setdefault(vhost, []).append(("exchange", name))
        for vhost, items in by_vhost.items():
            try:
                conn = broker.pika_connection(virtual_host=vhost)
            except pika.exceptions.AMQPError:
                continue  # vhost already gone
            try:
                ch = None
                for kind, name in items:
                    if ch is None or not ch.is_open:
                        ch = conn.channel()
                    try:
                        if kind == "queue":
                            ch.queue_delete(name)
                        else:
                            ch.exchange_delete(name)
                    except pika.exceptions.ChannelClosedByBroker:
                        ch = None  # e.g. 405 for another connection's exclusive queue
            finally:
                if conn.is_open:
                    conn.close()


@pytest.fixture
def names(broker):
    n = Names()
    yield n
    n.cleanup(broker)


@pytest.fixture(scope="session")
def temp_vhost(broker):
    """A vhost on which guest has full permissions (deleted at session end)."""
    vhost = unique_name("vh")
    broker.ctl("add_vhost", vhost)
    try:
        broker.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield vhost
    finally:
        broker.ctl("delete_vhost", vhost, check=False)


@pytest.fixture(scope="session")
def locked_vhost(broker):
    """A vhost on which guest has NO permissions (deleted at session end)."""
    vhost = unique_name("vh-locked")
    broker.ctl("add_vhost", vhost)
    try:
        yield vhost
    finally:
        broker.ctl("delete_vhost", vhost, check=False)


@pytest.fixture(scope="session")
def temp_user(broker):
    """(user, password) of a fresh user with full permissions on "/"."""
    user = unique_name("user")
    password = "pw-" + uuid.uuid4().hex
    broker.ctl("add_user", user, password)
    try:
        broker.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user, password
    finally:
        broker.ctl("delete_user", user, check=False)


@pytest.fixture(scope="module")
def _own_broker_node(tmp_path_factory):
    sbin = _rabbitmq_sbin()
    if sbin is None:
        pytest.skip("rabbitmq-server / rabbitmqctl not found (set AMQPROXY_TEST_RABBITMQ_SBIN)")
    node = OwnBroker(tmp_path_factory.mktemp("own-broker"), sbin)
    try:
        node.start()
    except (OwnBrokerError, subprocess.SubprocessError) as e:
        node.pid = node.pid or node._read_pid_file()
        node.stop()
        pytest.fail(f"cannot start an own RabbitMQ node: {e}", pytrace=False)
    try:
        yield node
    finally:
        node.stop()
        node.remove_data()


@pytest.fixture
def own_broker(request, _own_broker_node) -> OwnBroker:
    """A RabbitMQ node of this test module's own (see OwnBroker), never the shared broker: one
    node per module, brought back to health (resumed, running, app started, no alarm) before
    and after every test."""
    node = _own_broker_node
    node.ensure_healthy()
    request.node.stash.setdefault(_OWN_BROKERS_KEY, []).append(node)
    yield node
    node.ensure_healthy()


@pytest.fixture(scope="module")
def own_broker_factory(tmp_path_factory):
    """Start own RabbitMQ nodes with extra rabbitmq.conf lines (a TLS or PROXY-protocol listener,
    say): `node = own_broker_factory("proxy_protocol = true\\n")`. Stopped and removed after the
    module."""
    sbin = _rabbitmq_sbin()
    if sbin is None:
        pytest.skip("rabbitmq-server / rabbitmqctl not found (set AMQPROXY_TEST_RABBITMQ_SBIN)")
    nodes: list[OwnBroker] = []

    def start(extra_conf: str = "") -> OwnBroker:
        node = OwnBroker(tmp_path_factory.mktemp("own-broker"), sbin, extra_conf)
        nodes.append(node)
        try:
            return node.start()
        except (OwnBrokerError, subprocess.SubprocessError) as e:
            node.pid = node.pid or node._read_pid_file()
            pytest.fail(f"cannot start an own RabbitMQ node: {e}", pytrace=False)

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()
            node.remove_data()
