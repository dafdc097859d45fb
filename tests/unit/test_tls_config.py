"""TLS options: contexts built from files at parse time, with one clear line per problem; subject
names for EXTERNAL; and sends on a full TLS socket that do not block the producer."""

import ssl

import gevent
import gevent.socket
import pytest
from tlspki import PKI

from amqproxy import tls
from amqproxy.config import ConfigError, parse_config


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(pki):
    return pki.server()


def listener_args(server, *extra):
    return ["--tls-listen", "127.0.0.1:5671", "--tls-cert", str(server.cert), "--tls-key", str(server.key), *extra]


def test_no_tls_by_default():
    config = parse_config([], env={})
    assert config.tls_listen is None and config.tls_server is None and config.tls_upstream is None


def test_server_context(pki, server):
    config = parse_config(listener_args(server, "--tls-min-version", "1.3"), env={})
    ctx = config.tls_server
    assert ctx is not None and ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_NONE
    config = parse_config(listener_args(server, "--tls-ca", str(pki.ca), "--tls-verify-client", "required"), env={})
    assert config.tls_server.verify_mode == ssl.CERT_REQUIRED
    config = parse_config(listener_args(server, "--tls-ca", str(pki.ca), "--tls-verify-client", "optional"), env={})
    assert config.tls_server.verify_mode == ssl.CERT_OPTIONAL


def test_every_parse_builds_new_contexts(server):
    # What a reload relies on: the files are read again, the new context serves new connections.
    a = parse_config(listener_args(server), env={})
    b = parse_config(listener_args(server), env={})
    assert a.tls_server is not b.tls_server


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--tls-verify-client", "required"], "--tls-ca: --tls-verify-client required needs a CA file"),
        (["--tls-ciphers", "NO-SUCH-CIPHER"], "--tls-ciphers"),
        (["--tls-min-version", "1.1"], "--tls-min-version"),
        (["--tls-ca", "/nonexistent/ca.pem"], "--tls-ca: cannot read /nonexistent/ca.pem"),
    ],
)
def test_bad_listener_options(server, extra, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(listener_args(server, *extra), env={})
    assert needle in str(err.value)


def test_listener_needs_cert_and_key(server):
    with pytest.raises(ConfigError, match="--tls-cert: --tls-listen needs --tls-cert and --tls-key"):
        parse_config(["--tls-listen", "127.0.0.1:5671"], env={})
    with pytest.raises(ConfigError, match="--tls-key: cannot read /nonexistent"):
        parse_config(["--tls-listen", "127.0.0.1:5671", "--tls-cert", str(server.cert), "--tls-key", "/nonexistent"])


def test_world_readable_key_is_refused(pki, tmp_path):
    issued = pki.server(filename="readable")
    issued.key.chmod(0o644)
    with pytest.raises(ConfigError, match="--tls-key: .* readable by everyone"):
        parse_config(listener_args(issued), env={})


def test_mismatched_key_is_refused(pki, server):
    other = pki.server(filename="other")
    with pytest.raises(ConfigError, match="--tls-cert: cannot load certificate"):
        parse_config(["--tls-listen", "127.0.0.1:5671", "--tls-cert", str(server.cert), "--tls-key", str(other.key)])


def test_upstream_context(pki):
    client = pki.client("proxy")
    config = parse_config(
        [
            "--upstream",
            "amqps://broker.example",
            "--upstream-tls-ca",
            str(pki.ca),
            "--upstream-tls-cert",
            str(client.cert),
            "--upstream-tls-key",
            str(client.key),
        ],
        env={},
    )
    ctx = config.tls_upstream
    assert ctx is not None and ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    config = parse_config(["--upstream", "amqps://b", "--upstream-tls-verify-hostname", "false"], env={})
    assert config.tls_upstream is not None and not config.tls_upstream.check_hostname
    with pytest.raises(ConfigError, match="--upstream-tls-cert: needs --upstream-tls-key"):
        parse_config(["--upstream", "amqps://b", "--upstream-tls-cert", str(client.cert)], env={})


def test_subject_names():
    cert = {
        "subject": (
            (("countryName", "DE"),),
            (("organizationName", "Example, Inc."),),
            (("commonName", "app-1"),),
        )
    }
    assert tls.subject_dn(cert) == "CN=app-1,O=Example\\, Inc.,C=DE"
    assert tls.subject_cn(cert) == "app-1"
    assert tls.subject_dn({}) == "" and tls.subject_cn({}) == ""
    assert tls.subject_dn({"subject": ((("commonName", "#x+y "),),)}) == "CN=\\#x\\+y\\ "


def test_send_with_zero_timeout_never_blocks_on_a_full_tls_socket(pki, server):
    """The outbox's contract: send(data, 0, 0.0) returns what the socket took (maybe 0) at once.
    gevent's own SSLSocket would wait until the peer reads."""
    config = parse_config(listener_args(server), env={})
    a, b = gevent.socket.socketpair()
    server_sock = config.tls_server.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
    client_ctx = tls._Context(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cafile=str(pki.ca))
    client = client_ctx.wrap_socket(b, server_hostname="localhost", do_handshake_on_connect=False)
    jobs = [gevent.spawn(server_sock.do_handshake), gevent.spawn(client.do_handshake)]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert isinstance(server_sock, tls.NonBlockingSendSSLSocket)
    chunk = b"x" * 65536
    total = 0
    with gevent.Timeout(5, AssertionError("send(..., 0.0) blocked")):
        for _ in range(10_000):
            sent = server_sock.send(chunk, 0, 0.0)
            if sent == 0:
                break
            total += sent
    assert sent == 0 and total > 0
    # As the outbox does next: its writer greenlet sends the refused bytes (and what came after)
    # with sendall; OpenSSL's retry rule holds (same bytes first, no shorter), all arrive in order.
    tail = b"y" * 1000
    writer = gevent.spawn(server_sock.sendall, chunk + tail)
    data = bytearray()
    with gevent.Timeout(10):
        while len(data) < total + len(chunk) + len(tail):
            data += client.recv(1 << 20)
    writer.get(timeout=5)
    assert data == b"x" * (total + len(chunk)) + tail
    server_sock.close()
    client.close()
