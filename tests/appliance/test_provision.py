"""The VM appliance (Vagrantfile + appliance/), tested here without a VM.

`appliance/provision.sh --prefix DIR` runs once per module: it installs the proxy from this
checkout into DIR/opt/amqproxy and renders every file of the appliance under DIR, without
apt-get, useradd, sysctl, rabbitmqctl or systemctl, and without writing outside DIR. The proxy is
then started exactly as the rendered amqproxy.service would start it (its ExecStart= command
line, EnvironmentFile=, Environment= and LimitNOFILE=, from /), and a real AMQP client
publishes a message through it that is then fetched from the broker itself.

Toxiproxy cannot be downloaded here: the script gets a stand-in archive through TOXIPROXY_URL
(file://) with its TOXIPROXY_SHA256, which exercises the same download-and-verify code as the
pinned GitHub release in the VM.

Tools that are not always installed (systemd-analyze, shellcheck, vagrant, ruby, promtool) are
used where present; each check skips with the reason where its tool is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions
import pytest

from tests.support.ports import free_port
from tests.support.settings import BROKER_HOST, BROKER_PORT

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
APPLIANCE = REPO / "appliance"
PROVISION = APPLIANCE / "provision.sh"
DASHBOARD = APPLIANCE / "grafana" / "amqproxy-dashboard.json"


# The environment systemd gives a system service before Environment=/EnvironmentFile=.
SYSTEMD_BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
START_TIMEOUT = 20.0
PROVISION_TIMEOUT = 480

# Metrics the dashboard must chart (the proxy's own, and prometheus-client's process collector).
DASHBOARD_METRICS = (
    "amqproxy_client_connections",
    "amqproxy_client_connections_opened_total",
    "amqproxy_client_connections_closed_total",
    "amqproxy_client_connections_refused_total",
    "amqproxy_upstream_connections",
    "amqproxy_upstream_channels",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def run(cmd, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# --------------------------------------------------------------------------- systemd units


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """[Section] -> key -> values (a key may repeat), as systemd reads the file (no line
    continuations are used by our units; the test insists on that)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path}:{n}: line continuation (not supported by this test)"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path}:{n}: not 'Key=value': {raw!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env_file(path: Path) -> dict[str, str]:
    """systemd EnvironmentFile= syntax, restricted to what the appliance's file may use:
    comments and KEY=value lines (optionally quoted)."""
    env: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        assert m, f"{path}:{n}: not a KEY=value line: {raw!r}"
        value = m.group(2)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[m.group(1)] = value
    return env


def unit_seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert m, f"unsupported time span {value!r}"
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


@dataclass
class UnitLaunch:
    """How systemd would start a service: argv, environment, working directory, nofile."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    nofile: int | None


def launch_of(unit_path: Path) -> UnitLaunch:
    service = parse_unit(unit_path)["Service"]
    (exec_start,) = service["ExecStart"]
    assert exec_start[0] not in "-@+!:", f"ExecStart= prefix not emulated by this test: {exec_start!r}"
    assert "$" not in exec_start and "%" not in exec_start, "ExecStart= expansions not emulated by this test"
    env = dict(SYSTEMD_BASE_ENV)
    for assignment in service.get("Environment", []):
        for word in shlex.split(assignment):
            key, _, value = word.partition("=")
            env[key] = value
    for env_file in service.get("EnvironmentFile", []):
        optional = env_file.startswith("-")
        env_path = Path(env_file.lstrip("-"))
        if optional and not env_path.exists():
            continue
        env.update(parse_env_file(env_path))
    nofile = service.get("LimitNOFILE", [None])[-1]
    return UnitLaunch(
        argv=shlex.split(exec_start),
        env=env,
        cwd=service.get("WorkingDirectory", ["/"])[-1],
        nofile=int(nofile) if nofile else None,
    )


def start_like_unit(launch: UnitLaunch, log_path: Path, extra_env: dict[str, str] | None = None):
    def set_nofile():
        if launch.nofile is None:
            return
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (launch.nofile, launch.nofile))
        except (ValueError, OSError):  # not root: as much as this user may have
            limit = launch.nofile if hard == resource.RLIM_INFINITY else min(launch.nofile, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    log = open(log_path, "ab", buffering=0)
    try:
        return subprocess.Popen(
            launch.argv,
            env={**launch.env, **(extra_env or {})},
            cwd=launch.cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=set_nofile,
        )
    finally:
        log.close()


def wait_serving(proc: subprocess.Popen, amqp_port: int, http_port: int, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = "not tried"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"proxy exited with {proc.returncode} at start:\n{log_path.read_text()}", pytrace=False)
        try:
            status, _ = http_get(f"http://127.0.0.1:{http_port}/healthz", timeout=1)
            with socket.create_connection(("127.0.0.1", amqp_port), timeout=1):
                pass
            if status == 200:
                return
            last = f"/healthz answered {status}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.1)
    pytest.fail(f"proxy not serving after {START_TIMEOUT}s ({last}):\n{log_path.read_text()}", pytrace=False)


def stop(proc: subprocess.Popen, timeout: float = 15) -> float:
    """SIGTERM, as systemd's stop does; returns the seconds until the process was gone."""
    started = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return time.monotonic() - started


# --------------------------------------------------------------------------- fixtures


@dataclass
class Provisioned:
    prefix: Path
    home: Path
    amqp_port: int
    http_port: int
    args: list[str]
    env: dict[str, str]
    output: str
    seconds: float
    repo_before: set[str]

    def path(self, rel: str) -> Path:
        return self.prefix / rel.lstrip("/")


def fake_toxiproxy_archive(directory: Path) -> tuple[Path, str]:
    """A stand-in for toxiproxy_<v>_linux_amd64.tar.gz: the two binaries as shell scripts."""
    directory.mkdir(parents=True)
    archive = directory / "toxiproxy_0.0.0_linux_amd64.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("toxiproxy-server", "toxiproxy-cli"):
            script = directory / name
            script.write_text(f"#!/bin/sh\necho '{name} stand-in'\n")
            script.chmod(0o755)
            tar.add(script, arcname=name)
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def repo_build_leftovers() -> set[str]:
    """What `pip install <checkout>` leaves in a source tree when it builds in place."""
    return {p.name for p in REPO.iterdir() if p.name in ("build", "dist") or p.name.endswith(".egg-info")}


def provision_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQPROXY_", "TOXIPROXY_", "RABBITMQ_"))}
    # The compiled data path is the unit and integration tests' business: here pip installs the
    # pure-Python modules (compiling would add minutes to every run; the behaviour is the same).
    env.update(HOME=str(home), PYTHON=sys.executable, AMQPROXY_NO_COMPILE="1", **extra)
    return env


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory) -> Provisioned:
    """provision.sh --prefix, once per module; the prefix (venv included) is removed afterwards."""
    base = tmp_path_factory.mktemp("appliance")
    try:
        yield _provision(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _provision(base: Path) -> Provisioned:
    home = base / "home"
    home.mkdir()
    archive, sha = fake_toxiproxy_archive(base / "dist")
    amqp_port, http_port = free_port(), free_port()
    args = [
        "bash",
        str(PROVISION),
        "--prefix",
        str(base / "prefix"),
        "--source",
        str(REPO),
        "--listen",
        f"127.0.0.1:{amqp_port}",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--upstream",
        f"amqp://{BROKER_HOST}:{BROKER_PORT}",
    ]
    env = provision_env(home, TOXIPROXY_URL=archive.as_uri(), TOXIPROXY_SHA256=sha)
    before = repo_build_leftovers()
    started = time.monotonic()
    result = run(args, timeout=PROVISION_TIMEOUT, env=env, cwd=str(base))
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"provision.sh --prefix failed ({result.returncode}):\n{output}", pytrace=False)
    print(f"\nprovision.sh --prefix took {seconds:.1f}s")
    return Provisioned(
        prefix=base / "prefix",
        home=home,
        amqp_port=amqp_port,
        http_port=http_port,
        args=args,
        env=env,
        output=output,
        seconds=seconds,
        repo_before=before,
    )


@dataclass
class Service:
    proc: subprocess.Popen
    log_path: Path
    launch: UnitLaunch
    amqp_port: int
    http_port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"


@pytest.fixture(scope="module")
def service(provisioned, tmp_path_factory) -> Service:
    """The installed proxy, started as amqproxy.service's ExecStart= would start it."""
    launch = launch_of(provisioned.path("/etc/systemd/system/amqproxy.service"))
    log_path = tmp_path_factory.mktemp("appliance-service") / "amqproxy.log"
    proc = start_like_unit(launch, log_path)
    try:
        wait_serving(proc, provisioned.amqp_port, provisioned.http_port, log_path)
        yield Service(proc, log_path, launch, provisioned.amqp_port, provisioned.http_port)
    finally:
        stop(proc)


# --------------------------------------------------------------------------- prefix mode

RENDERED = (
    "/etc/amqproxy/amqproxy.conf",
    "/etc/default/amqproxy",
    "/etc/systemd/system/amqproxy.service",
    "/etc/systemd/system/toxiproxy.service",
    "/etc/toxiproxy/proxies.json",
    "/etc/rabbitmq/rabbitmq.conf",
    "/etc/rabbitmq/enabled_plugins",
    "/etc/systemd/system/rabbitmq-server.service.d/60-amqproxy-appliance.conf",
    "/etc/sysctl.d/60-amqproxy-appliance.conf",
    "/etc/security/limits.d/60-amqproxy-appliance.conf",
    "/etc/prometheus/prometheus.yml",
    "/usr/local/share/amqproxy/grafana/amqproxy-dashboard.json",
)


def test_prefix_mode_installs_the_venv_and_renders_every_file(provisioned):
    assert os.access(provisioned.path("/opt/amqproxy/bin/amqproxy"), os.X_OK)
    for rel in RENDERED:
        path = provisioned.path(rel)
        assert path.is_file(), f"{rel} not rendered under the prefix"
        leftover = re.findall(r"@[A-Z][A-Z0-9_]*@", path.read_text())
        assert not leftover, f"{rel}: unreplaced placeholders {leftover}"
    for binary in ("toxiproxy-server", "toxiproxy-cli"):
        assert os.access(provisioned.path(f"/usr/local/bin/{binary}"), os.X_OK)
    # The system-changing actions were skipped, and said so.
    for skipped in ("not applying sysctl", "not restarting RabbitMQ", "not enabling or starting amqproxy.service"):
        assert skipped in provisioned.output


def test_prefix_mode_writes_nothing_outside_the_prefix(provisioned):
    assert list(provisioned.home.iterdir()) == [], "provision.sh (or pip) wrote into HOME"
    assert repo_build_leftovers() <= provisioned.repo_before, "pip built inside the checkout"
    # Every absolute path of the rendered amqproxy files lies inside the prefix (or is a
    # system binary the unit merely runs).
    for rel in ("/etc/systemd/system/amqproxy.service", "/etc/systemd/system/toxiproxy.service"):
        text = provisioned.path(rel).read_text()
        for line in text.splitlines():
            if line.startswith(("ExecStart=", "EnvironmentFile=")):
                for word in shlex.split(line.partition("=")[2]):
                    if word.startswith("/"):
                        assert word.startswith(str(provisioned.prefix)), f"{rel}: {word} outside the prefix"


def test_second_run_changes_nothing(provisioned, service):
    before = {rel: provisioned.path(rel).stat().st_mtime_ns for rel in RENDERED}
    started = time.monotonic()
    result = run(provisioned.args, timeout=PROVISION_TIMEOUT, env=provisioned.env)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "written " not in output, f"a second run rewrote files:\n{output}"
    assert "pip install" not in output and "creating venv" not in output, f"a second run reinstalled:\n{output}"
    assert {rel: provisioned.path(rel).stat().st_mtime_ns for rel in RENDERED} == before
    assert service.proc.poll() is None
    print(f"\nsecond provision.sh --prefix run took {seconds:.1f}s")


def test_unknown_argument_fails_loudly(tmp_path):
    result = run(["bash", str(PROVISION), "--prefix", str(tmp_path / "p"), "--frobnicate"], env=provision_env(tmp_path))
    assert result.returncode != 0
    assert "unknown argument: --frobnicate" in result.stderr


# --------------------------------------------------------------------------- Toxiproxy


def test_toxiproxy_checksum_mismatch_installs_nothing(tmp_path):
    archive, sha = fake_toxiproxy_archive(tmp_path / "dist")
    wrong = hashlib.sha256(b"not the archive").hexdigest()
    prefix = tmp_path / "prefix"
    env = provision_env(tmp_path, TOXIPROXY_URL=archive.as_uri(), TOXIPROXY_SHA256=wrong)
    result = run(["bash", str(PROVISION), "--prefix", str(prefix), "--only", "toxiproxy"], env=env)
    assert result.returncode != 0, result.stdout + result.stderr
    assert f"expected sha256 {wrong}, got {sha}" in result.stderr
    assert not (prefix / "usr/local/bin/toxiproxy-server").exists()
    assert not list((prefix / "var/cache/amqproxy-appliance").glob("*")), "a rejected archive was kept"


def test_toxiproxy_override_without_checksum_is_refused(tmp_path):
    archive, _ = fake_toxiproxy_archive(tmp_path / "dist")
    env = provision_env(tmp_path, TOXIPROXY_URL=archive.as_uri())
    result = run(["bash", str(PROVISION), "--prefix", str(tmp_path / "p"), "--only", "toxiproxy"], env=env)
    assert result.returncode != 0
    assert "set TOXIPROXY_SHA256" in result.stderr


def test_toxiproxy_release_is_pinned():
    text = PROVISION.read_text()
    version = re.search(r"^TOXIPROXY_PINNED_VERSION=(\d+\.\d+\.\d+)$", text, re.M)
    sha = re.search(r"^TOXIPROXY_PINNED_SHA256_AMD64=([0-9a-f]{64})$", text, re.M)
    assert version and sha, "the Toxiproxy release must be pinned by version and SHA-256"


def test_toxiproxy_proxies_cover_the_broker_leg(provisioned):
    proxies = json.loads(provisioned.path("/etc/toxiproxy/proxies.json").read_text())
    assert {p["name"]: p["upstream"] for p in proxies} == {"rabbitmq": f"{BROKER_HOST}:{BROKER_PORT}"}
    unit = parse_unit(provisioned.path("/etc/systemd/system/toxiproxy.service"))["Service"]
    assert f"-config {provisioned.prefix}/etc/toxiproxy/proxies.json" in unit["ExecStart"][0]


# --------------------------------------------------------------------------- the unit


def test_unit_runs_the_proxy_as_the_issue_asks(provisioned):
    unit = parse_unit(provisioned.path("/etc/systemd/system/amqproxy.service"))
    service = unit["Service"]
    assert service["User"] == ["amqproxy"]
    assert service["Restart"] == ["on-failure"]
    assert int(service["LimitNOFILE"][-1]) >= 65536
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # The proxy's own shutdown grace is a few seconds; no drain-timeout option exists yet.
    assert unit_seconds(service["TimeoutStopSec"][-1]) >= 30
    assert service["StandardError"] == ["journal"]
    assert service["EnvironmentFile"] == [f"{provisioned.prefix}/etc/default/amqproxy"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    settings = {}
    for line in provisioned.path("/etc/amqproxy/amqproxy.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert settings["log-format"] == "json"
    assert settings["upstream"] == f"amqp://{BROKER_HOST}:{BROKER_PORT}"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian package: systemd)")
    return tool


def _verify_problems(result: subprocess.CompletedProcess, *names: str) -> list[str]:
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if any(name in line for name in names)]


def test_systemd_analyze_verify_units(provisioned):
    tool = _systemd_analyze()
    units = [provisioned.path(f"/etc/systemd/system/{name}") for name in ("amqproxy.service", "toxiproxy.service")]
    result = run([tool, "verify", *map(str, units)])
    problems = _verify_problems(result, "amqproxy", "toxiproxy", str(provisioned.prefix))
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_systemd_analyze_verify_rabbitmq_drop_in(provisioned, tmp_path):
    tool = _systemd_analyze()
    # The drop-in, applied to a stand-in rabbitmq-server.service (the real one is the package's).
    (tmp_path / "rabbitmq-server.service").write_text("[Service]\nExecStart=/bin/true\n")
    shutil.copytree(
        provisioned.path("/etc/systemd/system/rabbitmq-server.service.d"), tmp_path / "rabbitmq-server.service.d"
    )
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}
    result = run([tool, "verify", "rabbitmq-server.service"], env=env)
    problems = _verify_problems(result, "rabbitmq-server.service.d", "60-amqproxy-appliance")
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


# --------------------------------------------------------------------------- the running proxy


def test_installed_proxy_carries_a_message_to_the_broker(service):
    queue = f"amqproxy-test-appliance-{uuid.uuid4().hex[:12]}"
    body = f"through the appliance {uuid.uuid4()}".encode()
    credentials = pika.PlainCredentials("guest", "guest")
    direct = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT, credentials=credentials))
    try:
        direct_channel = direct.channel()
        direct_channel.queue_declare(queue)
        via_proxy = pika.BlockingConnection(
            pika.ConnectionParameters("127.0.0.1", service.amqp_port, credentials=credentials, socket_timeout=5)
        )
        try:
            channel = via_proxy.channel()
            channel.confirm_delivery()
            channel.basic_publish("", queue, body, mandatory=True)
        finally:
            via_proxy.close()
        deadline = time.monotonic() + 5
        got = None
        while got is None and time.monotonic() < deadline:
            _, _, got = direct_channel.basic_get(queue, auto_ack=True)
            if got is None:
                time.sleep(0.05)
        assert got == body, "the message published through the installed proxy did not reach the broker"
    finally:
        try:
            direct.channel().queue_delete(queue)
        finally:
            direct.close()
    assert service.proc.poll() is None


def test_readyz(service):
    status, body = http_get(service.url("/readyz"))
    if status == 404:
        health, _ = http_get(service.url("/healthz"))
        assert health == 200
        pytest.skip(
            "the installed amqproxy has no /readyz yet (404; /healthz answered 200): "
            "this test checks /readyz as soon as the proxy serves it"
        )
    assert status == 200, f"/readyz answered {status} with the broker up: {body!r}"


def test_logs_are_json_lines(service):
    lines = [line for line in service.log_path.read_text().splitlines() if line.strip()]
    assert lines, "the proxy logged nothing at start"
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}", pytrace=False)
    assert any(r.get("event") == "start" for r in records)


def test_metrics_feed_the_dashboard(service):
    # Labelled series exist once something happened: one client handshake through the proxy.
    client = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", service.amqp_port, credentials=pika.PlainCredentials("guest", "guest"))
    )
    client.channel().queue_declare("", exclusive=True)
    client.close()
    status, body = http_get(service.url("/metrics"))
    assert status == 200
    exposed = set(re.findall(r"^(?:# (?:HELP|TYPE) )?([a-zA-Z_:][a-zA-Z0-9_:]*)", body.decode(), re.M))
    wanted = set(_dashboard_metrics())
    missing = sorted(wanted - exposed)
    assert not missing, f"the dashboard charts metrics the proxy does not expose: {missing}"


def test_the_installed_package_serves_the_status_page(service):
    """`pip install .` ships the page's static files (package_data): the installed proxy serves
    them (the page itself is tested in a browser in tests/integration/test_status_page.py)."""
    for path, marker in (("/status", b"<title>amqproxy status</title>"), ("/status/status.js", b"fetchJSON"),
                         ("/status/status.css", b"table.cards")):  # fmt: skip
        status, body = http_get(service.url(path))
        assert status == 200 and marker in body, f"{path}: {status} {body[:200]!r}"


# --------------------------------------------------------------------------- signals


@pytest.fixture
def spare_proxy(provisioned, tmp_path):
    """Another proxy started the way the unit starts it, on its own ports (env overrides)."""
    launch = launch_of(provisioned.path("/etc/systemd/system/amqproxy.service"))
    amqp_port, http_port = free_port(), free_port()
    log_path = tmp_path / "amqproxy.log"
    extra = {"AMQPROXY_LISTEN": f"127.0.0.1:{amqp_port}", "AMQPROXY_HTTP_LISTEN": f"127.0.0.1:{http_port}"}
    proc = start_like_unit(launch, log_path, extra)
    try:
        wait_serving(proc, amqp_port, http_port, log_path)
        yield Service(proc, log_path, launch, amqp_port, http_port)
    finally:
        stop(proc)


def test_sigterm_drains_and_stops_well_within_timeout_stop_sec(provisioned, spare_proxy):
    """SIGTERM (systemctl stop): the proxy stops accepting and turns unready at once, the
    connected client keeps working while it drains, and once it leaves the proxy exits 0."""
    client = pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1", spare_proxy.amqp_port, credentials=pika.PlainCredentials("guest", "guest")
        )
    )
    channel = client.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    timeout_stop = unit_seconds(
        parse_unit(provisioned.path("/etc/systemd/system/amqproxy.service"))["Service"]["TimeoutStopSec"][-1]
    )
    started = time.monotonic()
    spare_proxy.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while http_get(spare_proxy.url("/readyz"))[0] != 503:
        assert time.monotonic() < deadline, "/readyz stayed ready while draining"
        time.sleep(0.05)
    channel.basic_publish("", queue, b"during the drain")
    assert channel.basic_get(queue, auto_ack=True)[2] == b"during the drain"
    client.close()
    spare_proxy.proc.wait(timeout_stop)
    seconds = time.monotonic() - started
    assert spare_proxy.proc.returncode == 0, spare_proxy.log_path.read_text()
    assert seconds < timeout_stop / 2, f"stop took {seconds:.1f}s of TimeoutStopSec={timeout_stop:.0f}s"


def test_reload_signal(provisioned, spare_proxy):
    """ExecReload= sends SIGHUP: the proxy reloads its configuration and keeps serving."""
    spare_proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "configuration reloaded" not in spare_proxy.log_path.read_text():
        assert spare_proxy.proc.poll() is None, "the proxy died of SIGHUP"
        assert time.monotonic() < deadline, "no reload log line after SIGHUP"
        time.sleep(0.05)
    status, _ = http_get(spare_proxy.url("/healthz"))
    assert status == 200 and spare_proxy.proc.poll() is None


# --------------------------------------------------------------------------- static checks


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return exprs


def _dashboard_metrics() -> list[str]:
    names = set()
    for expr in _dashboard_exprs():
        names.update(re.findall(r"\b((?:amqproxy|process)_[a-z0-9_]+)\b", expr))
    return sorted(names)


def test_dashboard_charts_the_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "amqproxy" and dashboard["title"]
    exprs = _dashboard_exprs()
    for metric in DASHBOARD_METRICS:
        assert any(re.search(rf"\b{metric}\b", e) for e in exprs), f"no panel charts {metric}"
    for expr in exprs:
        for counter in re.findall(r"\b[a-z0-9_]+_total\b", expr):
            assert re.search(rf"\b(rate|irate|increase)\(\s*{counter}\b", expr), (
                f"counter {counter} without rate(): {expr}"
            )
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"


def test_prometheus_scrapes_the_proxy(provisioned, tmp_path):
    config = provisioned.path("/etc/prometheus/prometheus.yml")
    assert f'targets: ["127.0.0.1:{provisioned.http_port}"]' in config.read_text()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package: prometheus); the scrape target was checked")
    result = run([promtool, "check", "config", "--syntax-only", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_parse():
    for script in sorted(APPLIANCE.glob("*.sh")):
        result = run(["bash", "-n", str(script)])
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert "set -euo pipefail" in script.read_text(), f"{script} must fail loudly (set -euo pipefail)"


def test_shellcheck():
    tool = shutil.which("shellcheck")
    if tool is None:
        pytest.skip("shellcheck not installed (Debian package: shellcheck)")
    scripts = sorted(str(p) for p in APPLIANCE.glob("*.sh"))
    assert scripts
    result = run([tool, "--external-sources", *scripts])
    assert result.returncode == 0, result.stdout + result.stderr


_VAGRANT_STUB = r"""
require "json"
# Records what the Vagrantfile configures: enough to check it evaluates and what it asks for.
class Rec
  def initialize(log, path) @log, @path = log, path end
  def method_missing(name, *args, **kw, &blk)
    @log << { "call" => (@path + [name.to_s]).join("."), "args" => args, "kw" => kw }
    child = Rec.new(@log, @path + [name.to_s])
    blk.call(child) if blk
    child
  end
  def respond_to_missing?(*) true end
end
module Vagrant
  LOG = []
  def self.configure(version) yield Rec.new(LOG, ["config"]) end
end
load ARGV[0]
puts JSON.generate(Vagrant::LOG)
"""


def test_vagrantfile_evaluates(tmp_path):
    ruby = shutil.which("ruby")
    if ruby is None:
        pytest.skip("ruby not installed (Debian package: ruby): Vagrantfile not evaluated")
    stub = tmp_path / "stub.rb"
    stub.write_text(_VAGRANT_STUB)
    result = run([ruby, str(stub), str(REPO / "Vagrantfile")], cwd=str(REPO))
    assert result.returncode == 0, result.stdout + result.stderr
    calls = json.loads(result.stdout)
    assigned = {c["call"]: c["args"] for c in calls}
    assert assigned["config.vm.box="] == ["debian/bookworm64"]
    forwarded = {
        c["kw"]["guest"] for c in calls if c["call"] == "config.vm.network" and c["args"] == ["forwarded_port"]
    }
    assert forwarded == {5673, 15673, 9090}
    providers = {c["args"][0] for c in calls if c["call"] == "config.vm.provider"}
    assert providers == {"virtualbox", "libvirt"}
    (provision,) = [c for c in calls if c["call"] == "config.vm.provision"]
    assert provision["kw"]["type"] == "shell"
    assert "appliance/provision.sh" in provision["kw"]["inline"]


def test_vagrant_validate(tmp_path):
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        pytest.skip("vagrant not installed (Debian package: vagrant): `vagrant validate` not run")
    # Provider blocks are not validated (no VirtualBox or libvirt here); Vagrant's state goes to
    # tmp_path, not into the checkout or HOME.
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "home"), "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot")}
    result = run([vagrant, "validate", "--ignore-provider"], cwd=str(REPO), env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
