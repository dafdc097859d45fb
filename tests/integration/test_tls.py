"""TLS: the client listener (--tls-listen) with optional mTLS, EXTERNAL login by certificate,
TLS to the broker (amqps://, hostname verification, mTLS), and certificate rotation by reload.

Certificates are made by the tests (tests/tlspki.py). The broker side uses a RabbitMQ node of
this module's own with a TLS listener that requires client certificates; the shared broker is
never touched except through the proxy's plain upstream."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import time
import urllib.request

import aio_pika
import amqp
import pika
import pika.exceptions
import pytest
from cryptography import x509
from tlspki import PKI

from tests.support.ports import free_port

from ._support import run_async, wait_until

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server_cert(pki):
    return pki.server(filename="proxy-server")


def client_context(pki, client=None, maximum=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def tls_proxy(proxy_factory, server_cert, *extra, **kw):
    port = free_port()
    proc = proxy_factory(
        "--tls-listen",
        f"127.0.0.1:{port}",
        "--tls-cert",
        str(server_cert.cert),
        "--tls-key",
        str(server_cert.key),
        "--handshake-timeout",
        "3",
        *extra,
        **kw,
    )
    proc.tls_port = port
    return proc


def pika_tls(proc, ctx, credentials=None, **kw):
    params = pika.ConnectionParameters(
        host="127.0.0.1",
        port=proc.tls_port,
        ssl_options=pika.SSLOptions(ctx, "localhost"),
        credentials=credentials or pika.PlainCredentials("guest", "guest"),
        socket_timeout=5,
        stack_timeout=10,
        connection_attempts=1,
        **kw,
    )
    return pika.BlockingConnection(params)


def round_trip(conn) -> None:
    """Publish one message through the connection and get it back."""
    ch = conn.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    ch.confirm_delivery()
    ch.basic_publish("", queue, b"over tls")
    method, _props, body = ch.basic_get(queue, auto_ack=True)
    assert method is not None and body == b"over tls"


def presented_serial(port: int, ctx: ssl.SSLContext) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            der = s.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def metrics(proc) -> str:
    with urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/metrics", timeout=5) as r:
        return r.read().decode()


def refused_count(proc, reason: str) -> float:
    m = re.search(rf'^amqproxy_client_connections_refused_total\{{reason="{reason}"\}} (\S+)$', metrics(proc), re.M)
    return float(m.group(1)) if m else 0.0


def events(proc, name: str) -> list[dict]:
    return [r for r in proc.log_records() if r.get("event") == name]


def post_reload(proc) -> dict:
    req = urllib.request.Request(f"http://{proc.host}:{proc.http_port}/reload", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def private(path, text: str):
    path.write_text(text)
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------------------- ingress


def test_pika_py_amqp_and_aio_pika_over_the_tls_listener(proxy_factory, pki, server_cert):
    proc = tls_proxy(proxy_factory, server_cert)
    conn = pika_tls(proc, client_context(pki))
    try:
        round_trip(conn)
    finally:
        conn.close()

    c = amqp.Connection(
        host=f"127.0.0.1:{proc.tls_port}",
        ssl={"ca_certs": str(pki.ca), "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "localhost"},
        connect_timeout=5,
    )
    c.connect()
    try:
        ch = c.channel()
        queue, _, _ = ch.queue_declare("", exclusive=True)
        ch.basic_publish(amqp.Message(b"py-amqp"), routing_key=queue)
        assert wait_until(lambda: ch.basic_get(queue, no_ack=True), timeout=5).body == b"py-amqp"
    finally:
        c.close()

    async def aio() -> bytes:
        conn = await aio_pika.connect(
            f"amqps://guest:guest@localhost:{proc.tls_port}/", ssl_context=client_context(pki), timeout=10
        )
        async with conn:
            ch = await conn.channel(publisher_confirms=True)
            queue = await ch.declare_queue("", exclusive=True)
            await ch.default_exchange.publish(aio_pika.Message(b"aio-pika"), routing_key=queue.name)
            message = await queue.get(timeout=5)
            await message.ack()
            return message.body

    assert run_async(aio()) == b"aio-pika"
    # The plain listener keeps working beside the TLS one.
    plain = proc.target().pika()
    round_trip(plain)
    plain.close()
    opened = [r for r in events(proc, "client_open")]
    assert len(opened) == 4


def test_mtls_required(proxy_factory, pki, server_cert, tmp_path):
    proc = tls_proxy(proxy_factory, server_cert, "--tls-ca", str(pki.ca), "--tls-verify-client", "required")
    good = pika_tls(proc, client_context(pki, pki.client("app-1")))  # stays open across the failures
    ch = good.channel()

    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika_tls(proc, client_context(pki)).close()  # no certificate
    stranger_ca = PKI(tmp_path / "other", name="stranger CA")
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika_tls(proc, client_context(pki, stranger_ca.client("app-1"))).close()  # wrong CA

    failures = wait_until(
        lambda: len(events(proc, "tls_handshake_failed")) >= 2 and events(proc, "tls_handshake_failed")
    )
    assert len(failures) == 2, failures  # logged once each
    assert all(f["remote"].startswith("127.0.0.1:") for f in failures)
    assert "CERTIFICATE" in failures[0]["error"].upper()
    assert refused_count(proc, "tls_handshake") == 2
    # The failures touched no one else.
    ch.queue_declare("", exclusive=True)
    good.close()
    # The audit line is written when the proxy has torn the session down, just after Close-Ok.
    audit = wait_until(lambda: [r for r in proc.log_records() if r.get("event") == "audit"])
    assert audit[-1]["tls_subject"] == "CN=app-1"


def test_min_version_is_enforced(proxy_factory, pki, server_cert):
    proc = tls_proxy(proxy_factory, server_cert, "--tls-min-version", "1.3")
    with pytest.raises(ssl.SSLError):
        presented_serial(proc.tls_port, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError)):
        pika_tls(proc, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    conn = pika_tls(proc, client_context(pki))  # 1.3 is fine
    round_trip(conn)
    conn.close()
    failures = wait_until(lambda: events(proc, "tls_handshake_failed"))
    assert failures[0]["error"] == "UNSUPPORTED_PROTOCOL"


def test_a_denied_address_is_closed_before_any_tls_work(proxy_factory, pki, server_cert):
    proc = tls_proxy(proxy_factory, server_cert, "--deny-cidr", "127.0.0.0/8")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        presented_serial(proc.tls_port, client_context(pki))
    # (the plain listener's start-up probe is refused too; the TLS one has no client session)
    wait_until(lambda: [e for e in events(proc, "access_denied") if "client_id" not in e])
    assert not events(proc, "tls_handshake_failed")  # no handshake was attempted


def test_a_silent_client_is_dropped_after_the_handshake_timeout(proxy_factory, pki, server_cert):
    proc = tls_proxy(proxy_factory, server_cert)
    with socket.create_connection(("127.0.0.1", proc.tls_port), timeout=10) as s:
        started = time.monotonic()
        assert s.recv(10) == b""  # closed by the proxy, nothing sent
        assert 2 < time.monotonic() - started < 8
    wait_until(lambda: any(f["error"] == "handshake timeout" for f in events(proc, "tls_handshake_failed")))


def test_proxy_protocol_header_before_the_tls_handshake(proxy_factory, pki, server_cert):
    import pamqp.commands as C

    from ._support import RawAMQP

    proc = tls_proxy(proxy_factory, server_cert, "--accept-proxy-protocol", "true")
    with RawAMQP("127.0.0.1", proc.tls_port) as raw:
        raw.send_bytes(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 5671\r\n")
        raw.sock = client_context(pki).wrap_socket(raw.sock, server_hostname="localhost")
        _start, _tune, reply = raw.handshake()
        assert isinstance(reply, C.Connection.OpenOk)
        with urllib.request.urlopen(f"http://{proc.host}:{proc.http_port}/connections", timeout=5) as r:
            (listing,) = json.loads(r.read())["connections"]
        assert listing["remote"] == "203.0.113.7:5555" and listing["proxied_by"].startswith("127.0.0.1:")
    # A trusted source that starts with TLS instead of a PROXY header is refused, and counted.
    with pytest.raises((ssl.SSLError, OSError)):
        presented_serial(proc.tls_port, client_context(pki))
    failure = wait_until(lambda: events(proc, "tls_handshake_failed"))
    assert "PROXY" in failure[0]["error"]


def test_reload_swaps_the_certificate_for_new_connections(proxy_factory, pki, tmp_path):
    first = pki.server(filename="rotating")
    proc = tls_proxy(proxy_factory, first)
    ctx = client_context(pki)
    assert presented_serial(proc.tls_port, ctx) == first.serial
    old = pika_tls(proc, ctx)

    second = pki.server(filename="rotating-next")
    os.replace(second.cert, first.cert)  # same paths, new files: how certificates get renewed
    os.replace(second.key, first.key)
    assert post_reload(proc)["result"] == "applied"
    assert presented_serial(proc.tls_port, ctx) == second.serial
    round_trip(old)  # the connection made before keeps working with its session

    third = pki.server(filename="rotating-third")
    os.replace(third.cert, first.cert)
    os.replace(third.key, first.key)
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(events(proc, "reload")) >= 2, msg="no reload on SIGHUP")
    assert presented_serial(proc.tls_port, ctx) == third.serial

    first.key.chmod(0o644)  # a broken key is rejected; the running certificate stays
    assert proc.proc.send_signal(signal.SIGHUP) is None
    rejected = wait_until(lambda: [e for e in events(proc, "reload") if e["result"] == "rejected"])
    assert "--tls-key" in rejected[0]["problems"][0]
    assert presented_serial(proc.tls_port, ctx) == third.serial
    old.close()


# ---------------------------------------------------------------------------- EXTERNAL


def test_external_maps_a_certificate_subject_to_a_user(proxy_factory, pki, server_cert, tmp_path):
    guest_pw = private(tmp_path / "guest.pw", "guest")
    users = private(
        tmp_path / "users.toml",
        f"""
[users.worker]
upstream_user = "guest"
upstream_password_file = "{guest_pw}"

[certificates]
"CN=worker-1,O=Example" = "worker"
""",
    )
    proc = tls_proxy(
        proxy_factory,
        server_cert,
        "--tls-ca",
        str(pki.ca),
        "--tls-verify-client",
        "optional",
        "--auth-file",
        str(users),
    )
    worker = pki.client("worker-1", organization="Example")
    conn = pika_tls(proc, client_context(pki, worker), credentials=pika.credentials.ExternalCredentials())
    round_trip(conn)
    conn.close()
    opened = events(proc, "client_open")
    assert opened[-1]["auth_user"] == "worker" and opened[-1]["user"] == "guest"

    # A verified certificate that maps to nobody: RabbitMQ's 403 for EXTERNAL.
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as err:
        pika_tls(proc, client_context(pki, pki.client("nobody")), credentials=pika.credentials.ExternalCredentials())
    assert "Login was refused using authentication mechanism EXTERNAL" in str(err.value)

    # Without a client certificate EXTERNAL is not offered (pika then gives up by itself).
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika_tls(proc, client_context(pki), credentials=pika.credentials.ExternalCredentials())


# ---------------------------------------------------------------------------- egress


@pytest.fixture(scope="module")
def tls_broker(own_broker_factory, pki):
    """A RabbitMQ node of this module's own whose TLS listener requires client certificates."""
    tls_port = free_port()
    cert = pki.server(filename="broker")
    node = own_broker_factory(
        f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
        f"ssl_options.cacertfile = {pki.ca}\n"
        f"ssl_options.certfile = {cert.cert}\n"
        f"ssl_options.keyfile = {cert.key}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = true\n"
    )
    node.tls_port = tls_port
    return node


def egress_args(pki, client, *extra):
    return (
        "--upstream-tls-ca",
        str(pki.ca),
        "--upstream-tls-cert",
        str(client.cert),
        "--upstream-tls-key",
        str(client.key),
        *extra,
    )


def test_egress_tls_with_mtls_to_the_broker(proxy_factory, pki, tls_broker):
    proxy_client = pki.client("amqproxy")
    proc = proxy_factory(*egress_args(pki, proxy_client), upstream=f"amqps://127.0.0.1:{tls_broker.tls_port}")
    conn = proc.target().pika()
    round_trip(conn)
    conn.close()
    # The broker saw a TLS connection from the proxy, authenticated by the proxy's certificate.
    out = tls_broker.ctl("list_connections", "ssl", "peer_cert_subject", "--quiet")
    assert any(line.split("\t") == ["true", "CN=amqproxy"] for line in out.splitlines()), out


def test_egress_hostname_verification(proxy_factory, pki, tls_broker):
    proxy_client = pki.client("amqproxy")
    url = f"amqps://127.0.0.1:{tls_broker.tls_port}"
    # The broker's certificate names localhost and 127.0.0.1, not this name: refused.
    proc = proxy_factory(
        *egress_args(
            pki, proxy_client, "--upstream-tls-server-name", "not-the-broker.example", "--connect-timeout", "2"
        ),
        upstream=url,
    )
    with pytest.raises(pika.exceptions.AMQPConnectionError) as err:
        proc.target().pika()
    assert "upstream unavailable" in str(err.value)
    failed = wait_until(lambda: events(proc, "upstream_connect_failed"))
    assert "CERTIFICATE_VERIFY_FAILED" in failed[0]["reason"], failed[0]
    # Turned off, the same name is accepted (the chain is still verified).
    proc2 = proxy_factory(
        *egress_args(pki, proxy_client, "--upstream-tls-server-name", "not-the-broker.example"),
        "--upstream-tls-verify-hostname",
        "false",
        upstream=url,
    )
    conn = proc2.target().pika()
    round_trip(conn)
    conn.close()


def test_egress_without_a_client_certificate_is_refused_by_the_broker(proxy_factory, pki, tls_broker):
    proc = proxy_factory(
        "--upstream-tls-ca", str(pki.ca), "--connect-timeout", "2", upstream=f"amqps://127.0.0.1:{tls_broker.tls_port}"
    )
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        proc.target().pika()
    assert events(proc, "upstream_connect_failed")
