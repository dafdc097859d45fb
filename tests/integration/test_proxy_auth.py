"""Proxy authentication (--auth-file): clients log in with proxy credentials (hashed in the file)
and are mapped to broker credentials they never hold; refusals read like RabbitMQ's. Secrets
stay off the command line, out of files everyone can read, and out of the logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import aio_pika
import aiormq.exceptions
import amqp
import pika
import pika.exceptions
import pytest

from amqproxy.auth import hash_password
from tests.support.settings import REPO_ROOT

from ._support import run_async, wait_until

REFUSED = "ACCESS_REFUSED - Login was refused using authentication mechanism {}. For details see the broker logfile."
APP_PASSWORD = "app-pw-Kx81"
WRONG = "wrong-pw-Vb3"


def private(path, text: str):
    path.write_text(text)
    path.chmod(0o600)
    return path


def users_toml(pw_file, *names: str) -> str:
    return "".join(
        f'[users.{name}]\npassword = "{hash_password(APP_PASSWORD)}"\nupstream_user = "{{user}}"\n'
        f'upstream_password_file = "{pw_file}"\n\n'
        for name in names
    )


@pytest.fixture
def auth_proxy(proxy_factory, temp_user, tmp_path):
    user, password = temp_user
    pw_file = private(tmp_path / "broker.pw", password + "\n")
    users = private(tmp_path / "users.toml", users_toml(pw_file, "app1").replace("{user}", user))
    proc = proxy_factory("--auth-file", str(users))
    proc.users_file = users
    proc.pw_file = pw_file
    return proc


def events(proc, name: str) -> list[dict]:
    return [r for r in proc.log_records() if r.get("event") == name]


def refused(proc, **kw):
    started = time.monotonic()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as err:
        proc.target().pika(**kw).close()
    assert time.monotonic() - started < 5
    prefix = "ConnectionClosedByBroker: (403) '"
    text = str(err.value.args[0])
    assert text.startswith(prefix) and text.endswith("'"), text
    return text[len(prefix) : -1]


def test_clients_log_in_as_proxy_users_and_reach_the_broker_as_the_mapped_user(auth_proxy, broker, temp_user):
    broker_user, broker_password = temp_user
    target = auth_proxy.target()
    conn = target.pika(user="app1", password=APP_PASSWORD)
    ch = conn.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.basic_publish("", queue, b"mapped")
    assert wait_until(lambda: ch.basic_get(queue, auto_ack=True)[2], timeout=5) == b"mapped"
    # The broker sees the mapped user on the proxy's connection.
    users = {c["user"] for c in broker.proxy_upstreams(auth_proxy)}
    assert users == {broker_user}

    c = target.amqp(userid="app1", password=APP_PASSWORD)  # py-amqp logs in with AMQPLAIN
    c.channel().queue_declare("", exclusive=True)
    c.close()

    async def aio() -> None:
        connection = await aio_pika.connect(target.url(user="app1", password=APP_PASSWORD), timeout=10)
        async with connection:
            await (await connection.channel()).declare_queue("", exclusive=True)

    run_async(aio())
    conn.close()
    opened = events(auth_proxy, "client_open")
    assert [(o["auth_user"], o["user"]) for o in opened] == [("app1", broker_user)] * 3
    log = auth_proxy.log_text()
    assert APP_PASSWORD not in log and broker_password not in log


def test_wrong_password_unknown_user_and_broker_credentials_are_refused(auth_proxy, temp_user):
    broker_user, broker_password = temp_user
    assert refused(auth_proxy, user="app1", password=WRONG) == REFUSED.format("PLAIN")
    assert refused(auth_proxy, user="nobody", password=APP_PASSWORD) == REFUSED.format("PLAIN")
    # The broker's own credentials are no key to the proxy: applications need not hold them.
    assert refused(auth_proxy, user=broker_user, password=broker_password) == REFUSED.format("PLAIN")
    with pytest.raises(amqp.exceptions.AccessRefused) as err:
        auth_proxy.target().amqp(userid="app1", password=WRONG)
    assert REFUSED.format("AMQPLAIN") in str(err.value)

    async def aio() -> None:
        await aio_pika.connect(auth_proxy.target().url(user="app1", password=WRONG), timeout=10)

    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        run_async(aio())

    refusals = wait_until(
        lambda: len(events(auth_proxy, "client_refused")) >= 5 and events(auth_proxy, "client_refused")
    )
    assert [r["auth_user"] for r in refusals] == ["app1", "nobody", broker_user, "app1", "app1"]
    assert all(r["reason"] == "auth" and r["reply_code"] == 403 for r in refusals)
    log = auth_proxy.log_text()
    assert WRONG not in log and broker_password not in log
    with urllib.request.urlopen(f"http://{auth_proxy.host}:{auth_proxy.http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'amqproxy_client_connections_refused_total{reason="auth"} 5.0' in text


def test_reload_reads_the_credential_file_again(auth_proxy, temp_user):
    broker_user, _ = temp_user
    existing = auth_proxy.target().pika(user="app1", password=APP_PASSWORD)
    private(auth_proxy.users_file, users_toml(auth_proxy.pw_file, "app2").replace("{user}", broker_user))
    req = urllib.request.Request(f"http://{auth_proxy.host}:{auth_proxy.http_port}/reload", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read())["result"] == "applied"
    auth_proxy.target().pika(user="app2", password=APP_PASSWORD).close()
    assert refused(auth_proxy, user="app1", password=APP_PASSWORD) == REFUSED.format("PLAIN")
    existing.channel().queue_declare("", exclusive=True)  # logged-in clients stay
    existing.close()


def run_proxy(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "amqproxy", "--listen", "127.0.0.1:5999", "--http-listen", "off", *args],
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_secrets_rules_stop_the_proxy_at_start(tmp_path):
    users = tmp_path / "users.toml"
    users.write_text('[users.a]\nupstream_user = "u"\nupstream_password_env = "X"\n')
    users.chmod(0o644)
    res = run_proxy("--auth-file", str(users))
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"amqproxy: error: --auth-file: {users} is readable by everyone (mode 644); chmod o-r it"
    )
    res = run_proxy("--admin-token", "Zq9-very-secret")
    assert res.returncode == 2 and "--admin-token: a secret is not accepted on the command line" in res.stderr
    assert "Zq9" not in res.stderr
    users.write_text('[users.a]\nupstream_user = "u"\nupstream_password = "inline-Zq9"\n')
    users.chmod(0o600)
    res = run_proxy("--auth-file", str(users))
    assert res.returncode == 2 and "upstream_password in the file is not allowed" in res.stderr
    assert "inline-Zq9" not in res.stderr
