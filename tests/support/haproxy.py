"""HAProxy: a real HAProxy (Debian's `haproxy` binary) in front of several amqproxy instances,
run in the foreground as a child of the test with its own configuration file, never as the
system service.

Layer 4 (`mode tcp`), the PROXY protocol v2 towards the proxies (`send-proxy-v2`, so that they
see the clients' real addresses), and an HTTP health check of each proxy's `/readyz` on its
admin port: a draining proxy answers 503 and leaves rotation. The admin socket (a unix socket in
the test's directory) tells the servers' states. This is the configuration docs/DEPLOYMENT.md
shows, with loopback addresses and short check intervals."""

from __future__ import annotations

import csv
import io
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .ports import accepting, free_port
from .proxy import ProxyProcess
from .target import Target

START_TIMEOUT = 15.0


class HAProxyError(RuntimeError):
    pass


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


class HAProxy:
    """HAProxy balancing `servers` (amqproxy instances started with --accept-proxy-protocol)."""

    host = "127.0.0.1"

    def __init__(
        self,
        base_dir: Path,
        servers: list[ProxyProcess],
        check_interval_ms: int = 200,
        fall: int = 1,
        rise: int = 2,
        binary: str | None = None,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.servers = list(servers)
        self.check_interval_ms, self.fall, self.rise = check_interval_ms, fall, rise
        self.binary = binary or haproxy_binary()
        if self.binary is None:
            raise HAProxyError("haproxy not found (apt-get install haproxy)")
        self.port = free_port()
        # A unix socket path holds at most 97 bytes in HAProxy (and 107 in the kernel): a short
        # directory of its own, not the test's deep temporary directory.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="haproxy-"))
        self.socket_path = self._socket_dir / "admin.sock"
        self.config_path = self.base_dir / "haproxy.cfg"
        self.log_path = self.base_dir / "haproxy.log"
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @staticmethod
    def server_name(index: int) -> str:
        return f"amqproxy{index + 1}"

    def config_text(self) -> str:
        servers = "\n".join(
            f"    server {self.server_name(i)} {p.host}:{p.port} check port {p.http_port}"
            for i, p in enumerate(self.servers)
        )
        return f"""\
global
    log stdout format raw local0 info
    stats socket {self.socket_path} mode 600 level admin
    maxconn 4096

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    # Above any AMQP heartbeat interval, or HAProxy would cut quiet connections.
    timeout client 10m
    timeout server 10m
    timeout check 1s
    # A connection refused by a server that just stopped accepting goes to another one.
    retries 3
    option redispatch 1

frontend amqp
    bind {self.host}:{self.port}
    default_backend amqproxy

backend amqproxy
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
    default-server inter {self.check_interval_ms}ms fall {self.fall} rise {self.rise} send-proxy-v2
{servers}
"""

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> HAProxy:
        self.config_path.write_text(self.config_text())
        check = subprocess.run(
            [self.binary, "-c", "-f", str(self.config_path)], capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            raise HAProxyError(f"haproxy -c refused the configuration:\n{check.stdout}\n{check.stderr}")
        self._log_file = open(self.log_path, "ab", buffering=0)
        # -db: stay in the foreground, a child of the test.
        self.proc = subprocess.Popen(
            [self.binary, "-db", "-f", str(self.config_path)],
            cwd=str(self.base_dir),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not (accepting(self.host, self.port, timeout=0.5) and self.socket_path.exists()):
            if self.proc.poll() is not None:
                raise HAProxyError(f"haproxy exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise HAProxyError(f"haproxy not accepting after {START_TIMEOUT}s:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def log_tail(self, n: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def target(self) -> Target:
        return Target("haproxy", self.host, self.port)

    # -- the admin socket ----------------------------------------------------------
    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def statuses(self) -> dict[str, str]:
        """Each server's status in the backend ("UP", "DOWN", "UP 1/2", "MAINT", ...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row.get("pxname") == "amqproxy" and row.get("svname") not in ("FRONTEND", "BACKEND")
        }

    def wait_status(self, index: int, status: str, timeout: float) -> float:
        """Wait until server `index` has `status`; returns the monotonic time it was seen."""
        name = self.server_name(index)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.statuses().get(name)
            if last == status:
                return time.monotonic()
            time.sleep(0.02)
        raise HAProxyError(f"{name} still {last!r}, not {status!r}, after {timeout}s\n{self.log_tail()}")

    def wait_all_up(self, timeout: float = START_TIMEOUT) -> None:
        for index in range(len(self.servers)):
            self.wait_status(index, "UP", timeout)
