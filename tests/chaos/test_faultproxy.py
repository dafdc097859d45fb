"""chaos.faultproxy, the stand-in for Toxiproxy: its API answers as Toxiproxy 2.x does (through
toxiproxy-python, the client the chaos suite uses), and each toxic has its effect on real
sockets, measured, so chaos results mean the same with either server."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
import toxiproxy
import toxiproxy.exceptions

from chaos import toxiproxy_endpoint

pytestmark = pytest.mark.timeout(30)


class Backend:
    """A TCP server behind the fault proxy: echoes, except `SEND n` (answers n bytes) and
    `CLOSE` (closes the connection)."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn):
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data or data == b"CLOSE":
                    return
                if data.startswith(b"SEND "):
                    conn.sendall(b"x" * int(data[5:]))
                else:
                    conn.sendall(data)


@pytest.fixture(scope="module")
def api():
    """A toxiproxy-python client on the module's endpoint (TOXIPROXY_URL or our fault proxy)."""
    with toxiproxy_endpoint() as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        server = toxiproxy.Toxiproxy()
        server.update_api_consumer(host, int(port))
        server.url = url
        yield server
        server.destroy_all()


@pytest.fixture(scope="module")
def backend():
    b = Backend()
    yield b
    b.server.close()


@pytest.fixture
def route(api, backend):
    """A fresh proxy to the backend; (toxiproxy Proxy, (host, port) to connect to)."""
    proxy = api.create(upstream=backend.address, name=f"t-{uuid.uuid4().hex[:8]}")
    host, port = proxy.listen.rsplit(":", 1)
    yield proxy, (host, int(port))
    proxy.destroy()


def _connect(address, timeout=5.0):
    sock = socket.create_connection(address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _echo_time(sock, payload=b"ping"):
    started = time.monotonic()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        got += sock.recv(65536)
    assert got == payload
    return time.monotonic() - started


def _read_until_closed(sock, timeout):
    """(bytes received, how the stream ended: 'eof' / 'reset' / 'timeout', seconds taken)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, "reset", time.monotonic() - started
        except TimeoutError:
            return data, "timeout", time.monotonic() - started
        if not chunk:
            return data, "eof", time.monotonic() - started
        data += chunk


def _http(api, method, path, body=None):
    """(status, decoded JSON or None) of a raw API request."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(api.url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    return status, (json.loads(raw) if raw.strip() else None)


# -- API ------------------------------------------------------------------------


def test_api_answers_with_toxiproxy_shapes_and_status_codes(api, backend):
    status, version = _http(api, "GET", "/version")
    assert status == 200 and isinstance(version["version"], str)

    status, created = _http(api, "POST", "/proxies", {"name": "shapes", "upstream": backend.address})
    assert status == 201
    assert set(created) == {"name", "listen", "upstream", "enabled", "toxics"}
    assert created["enabled"] is True and created["toxics"] == [] and not created["listen"].endswith(":0")
    assert _http(api, "POST", "/proxies", {"name": "shapes", "upstream": backend.address})[0] == 409
    assert _http(api, "POST", "/proxies", {"name": "no-upstream"})[0] == 400

    status, toxic = _http(api, "POST", "/proxies/shapes/toxics", {"type": "latency", "attributes": {"latency": 5}})
    assert status == 200
    assert toxic == {
        "name": "latency_downstream",
        "type": "latency",
        "stream": "downstream",
        "toxicity": 1.0,
        "attributes": {"latency": 5, "jitter": 0},
    }
    assert _http(api, "POST", "/proxies/shapes/toxics", {"type": "latency"})[0] == 409
    assert _http(api, "POST", "/proxies/shapes/toxics", {"type": "no-such-toxic"})[0] == 400
    assert _http(api, "POST", "/proxies/shapes/toxics", {"type": "latency", "stream": "sideways"})[0] == 400
    status, updated = _http(api, "POST", "/proxies/shapes/toxics/latency_downstream", {"attributes": {"jitter": 2}})
    assert status == 200 and updated["attributes"] == {"latency": 5, "jitter": 2}
    assert _http(api, "GET", "/proxies/shapes")[1]["toxics"] == [updated]

    status, error = _http(api, "GET", "/proxies/nope")
    assert (status, error) == (404, {"error": "proxy not found", "status": 404})
    assert _http(api, "GET", "/proxies/shapes/toxics/nope")[0] == 404

    assert _http(api, "POST", "/proxies/shapes", {"enabled": False})[1]["enabled"] is False
    assert _http(api, "POST", "/reset") == (204, None)
    assert _http(api, "GET", "/proxies/shapes")[1] | {"listen": None} == created | {"listen": None}
    assert _http(api, "DELETE", "/proxies/shapes") == (204, None)
    assert "shapes" not in _http(api, "GET", "/proxies")[1]


def test_toxiproxy_python_round_trip(api, route):
    proxy, _address = route
    proxy.add_toxic(type="bandwidth", stream="upstream", attributes={"rate": 50})
    assert {name: (t.type, t.stream, t.attributes) for name, t in proxy.toxics().items()} == {
        "bandwidth_upstream": ("bandwidth", "upstream", {"rate": 50})
    }
    assert api.get_proxy(proxy.name).upstream == proxy.upstream
    with pytest.raises(toxiproxy.exceptions.NotFound):
        proxy.destroy_toxic("nope")
    assert proxy.destroy_toxic("bandwidth_upstream")
    assert proxy.toxics() == {}


# -- toxics on real sockets ---------------------------------------------------------


def test_latency_delays_each_direction_by_its_amount(api, route):
    proxy, address = route
    with _connect(address) as sock:
        baseline = _echo_time(sock)
        proxy.add_toxic(type="latency", attributes={"latency": 300})
        down = _echo_time(sock)
        proxy.add_toxic(type="latency", stream="upstream", attributes={"latency": 200})
        both = _echo_time(sock)
    assert baseline < 0.2, baseline
    assert 0.3 <= down < 0.3 + 1.0, down
    assert 0.5 <= both < 0.5 + 1.0, both


def test_latency_jitter_spreads_delays_within_its_bounds(api, route):
    proxy, address = route
    proxy.add_toxic(type="latency", attributes={"latency": 150, "jitter": 100})
    with _connect(address) as sock:
        samples = [_echo_time(sock) for _ in range(12)]
    assert min(samples) >= 0.05, samples
    assert max(samples) < 0.25 + 1.0, samples
    assert max(samples) - min(samples) > 0.02, f"no jitter seen: {samples}"


def test_bandwidth_paces_the_stream_to_its_rate(api, route):
    proxy, address = route
    size = 100_000
    with _connect(address) as sock:
        sock.sendall(f"SEND {size}".encode())
        fast = _read_exactly(sock, size)
        proxy.add_toxic(type="bandwidth", attributes={"rate": 200})  # 200 KB/s: 100 KB in 0.5 s
        sock.sendall(f"SEND {size}".encode())
        slow = _read_exactly(sock, size)
    assert fast < 0.3, fast
    assert 0.45 <= slow < 0.5 + 2.0, slow


def _read_exactly(sock, size):
    started = time.monotonic()
    got = 0
    while got < size:
        chunk = sock.recv(65536)
        assert chunk, "closed early"
        got += len(chunk)
    return time.monotonic() - started


def test_reset_peer_is_seen_as_econnreset(api, route):
    """The next chunk on the stream triggers it: `timeout` later both peers are reset."""
    proxy, address = route
    with _connect(address) as sock:
        _echo_time(sock)
        proxy.add_toxic(type="reset_peer", attributes={"timeout": 200})
        assert _read_until_closed(sock, timeout=0.5)[1] == "timeout", "reset before any data"
        sock.sendall(b"echo me")
        data, how, took = _read_until_closed(sock, timeout=5)
    assert (data, how) == (b"", "reset")
    assert 0.2 <= took < 0.2 + 2.0, took
    with _connect(address) as sock:  # new connections are reset too while the toxic is there
        sock.sendall(b"echo me")
        assert _read_until_closed(sock, timeout=5)[:2] == (b"", "reset")


def test_timeout_is_silence_then_close(api, route):
    proxy, address = route
    proxy.add_toxic(type="timeout", attributes={"timeout": 600})
    with _connect(address) as sock:
        sock.sendall(b"anyone there?")
        data, how, took = _read_until_closed(sock, timeout=5)
    assert data == b"" and how in ("eof", "reset"), (data, how)
    assert 0.6 <= took < 0.6 + 2.0, took


def test_timeout_zero_drops_data_and_closes_only_when_removed(api, route):
    proxy, address = route
    with _connect(address) as sock:
        proxy.add_toxic(type="timeout", attributes={"timeout": 0})
        sock.sendall(b"dropped")
        assert _read_until_closed(sock, timeout=1.5)[:2] == (b"", "timeout")
        proxy.destroy_toxic("timeout_downstream")
        assert _read_until_closed(sock, timeout=5)[:2] == (b"", "eof")


def test_timeout_zero_upstream_is_a_blackhole_that_holds_the_data(api, route):
    """timeout 0 on both streams: nothing reaches the backend or comes back, the connection is
    not closed, and the stream is held, not drained: a sender writing on fills its TCP window
    (its socket stops taking data), as behind a dead route, where dropping the data would let
    every write go through."""
    proxy, address = route
    with _connect(address) as sock:
        _echo_time(sock)
        proxy.add_toxic(type="timeout", attributes={"timeout": 0})
        proxy.add_toxic(type="timeout", stream="upstream", attributes={"timeout": 0})
        sock.sendall(b"held")
        assert _read_until_closed(sock, timeout=1.0)[:2] == (b"", "timeout")
        sock.setblocking(False)
        taken, chunk = 0, b"h" * 65536
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                taken += sock.send(chunk)
            except BlockingIOError:
                break
        else:
            pytest.fail(f"the blackhole kept taking data: {taken} bytes in 10 s")
        # The fault proxy's own buffer (256 KiB) plus both kernels' socket buffers, no more.
        assert taken < 64 * 1024 * 1024, taken
        sock.setblocking(True)
        proxy.destroy_toxic("timeout_upstream")
        proxy.destroy_toxic("timeout_downstream")
        assert _read_until_closed(sock, timeout=5)[1] in ("eof", "reset")


def test_slow_close_delays_the_close(api, route):
    proxy, address = route
    proxy.add_toxic(type="slow_close", attributes={"delay": 700})
    with _connect(address) as sock:
        _echo_time(sock)
        sock.sendall(b"CLOSE")
        data, how, took = _read_until_closed(sock, timeout=5)
    assert (data, how) == (b"", "eof")
    assert 0.7 <= took < 0.7 + 2.0, took


def test_limit_data_closes_after_that_many_bytes(api, route):
    proxy, address = route
    proxy.add_toxic(type="limit_data", attributes={"bytes": 1000})
    with _connect(address) as sock:
        sock.sendall(b"SEND 5000")
        data, how, _took = _read_until_closed(sock, timeout=5)
    assert (len(data), how) == (1000, "eof")


def test_disabled_proxy_closes_connections_and_refuses_new_ones(api, route):
    proxy, address = route
    with _connect(address) as sock:
        _echo_time(sock)
        proxy.disable()
        assert _read_until_closed(sock, timeout=5)[:2] == (b"", "eof")
    with pytest.raises(ConnectionRefusedError):
        _connect(address)
    proxy.enable()
    with _connect(address) as sock:
        assert _echo_time(sock) < 1.0


def test_toxicity_zero_leaves_connections_alone(api, route):
    proxy, address = route
    proxy.add_toxic(type="reset_peer", toxicity=0.0)
    with _connect(address) as sock:
        assert _echo_time(sock) < 1.0
        assert _read_until_closed(sock, timeout=0.5)[1] == "timeout"


def test_a_slow_toxic_backs_up_into_the_sender(api, route):
    """bandwidth 20 KB/s client to server: the fault proxy stops reading once its buffer is
    full, so a 64 MB send cannot complete in 2 s (Toxiproxy's bounded channels do the same).
    64 MB is above what loopback socket buffers can absorb (the sender's send buffer is pinned
    small; the receive side is capped by net.ipv4.tcp_rmem, 32 MB at most here), so the send
    must wait on the toxic."""
    proxy, address = route
    proxy.add_toxic(type="bandwidth", stream="upstream", attributes={"rate": 20})
    with _connect(address, timeout=2) as sock, pytest.raises(TimeoutError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.sendall(b"z" * 64_000_000)
