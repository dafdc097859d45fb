"""OwnBroker: a RabbitMQ node of a test's own (own name, ports, data dir), to stop, kill, pause
or alarm without touching the shared broker."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from .ports import accepting, free_port
from .settings import OWN_BROKER_MEMORY_WATERMARK, OWN_BROKER_START_TIMEOUT, OWN_BROKER_STOP_TIMEOUT
from .target import Target


class OwnBrokerError(RuntimeError):
    pass


def rabbitmq_sbin() -> Path | None:
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


def process_state(pid: int | str) -> str | None:
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


def pid_alive(pid: int | None) -> bool:
    """A killed, detached beam may linger as a zombie until it is reaped: that counts as gone, but
    only once all its threads have exited. Its main thread turns zombie first, and until the last
    thread is gone its sockets stay open: the AMQP listener still completes TCP handshakes, and a
    restart on the same port would take the dying node's listener for the new one's."""
    if pid is None:
        return False
    state = process_state(pid)
    if state != "Z":
        return state not in (None, "X")
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(process_state(f"{pid}/task/{tid}") not in (None, "Z", "X") for tid in threads)


class OwnBroker:
    """A RabbitMQ node of its own for tests that hurt their broker (stop it, kill it, pause it,
    alarm it), which the shared broker must never suffer.

    It has its own node name, AMQP port, distribution port, data and log directories, config
    file, empty plugins file and Erlang cookie (in its own HOME; random, or shared by the nodes of
    a cluster); the node's environment variables take precedence over
    /etc/rabbitmq/rabbitmq-env.conf (e.g. its NODENAME), and every start checks that the node
    came up under our name."""

    host = "127.0.0.1"
    user = "guest"
    password = "guest"

    def __init__(self, base_dir: Path, sbin: Path, extra_conf: str = "", cookie: str | None = None):
        self.base_dir = Path(base_dir)
        self.sbin = Path(sbin)
        self.extra_conf = extra_conf  # more rabbitmq.conf lines (e.g. proxy_protocol = true)
        # Nodes that are to be clustered share one cookie; a lone node gets a random one.
        self.cookie = cookie or uuid.uuid4().hex.upper()
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
        cookie.write_text(self.cookie)
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
        if pid_alive(self.pid):
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
            pid = self.read_pid_file()
            if pid is not None and not pid_alive(pid):
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

    def read_pid_file(self) -> int | None:
        try:
            return int(self._pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while pid_alive(self.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        """Stop the node (rabbitmqctl stop, then SIGKILL if it is still there)."""
        if not pid_alive(self.pid):
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
        if not pid_alive(self.pid):
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
        while process_state(self.pid) not in ("T", "t", "?"):
            if time.monotonic() > deadline:
                raise OwnBrokerError(f"{self.nodename} (pid {self.pid}) not stopped after SIGSTOP")
            time.sleep(0.01)

    def resume(self) -> None:
        if self.pid is not None and pid_alive(self.pid):
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
        if not pid_alive(self.pid):
            self.start()
        elif self.app_stopped:
            self.start_app()
        if self.memory_alarm:
            self.set_memory_alarm(False)

    def __repr__(self):
        return f"<OwnBroker {self.nodename} amqp={self.port} dist={self.dist_port} pid={self.pid}>"
