"""A small TCP fault proxy with Toxiproxy 2.x's HTTP API, for machines without Toxiproxy.

The chaos suite drives faults through Toxiproxy's API (toxiproxy-python). Where the real
server cannot be installed, this module stands in for it: the same endpoints, JSON shapes and
status codes (Shopify/toxiproxy api.go), and the toxics the suite uses, with Toxiproxy's
meaning:

- ``latency`` {latency, jitter} (ms): each chunk is forwarded ``latency`` +- ``jitter`` after
  it arrived (order kept, so a pipelined stream is delayed, not throttled).
- ``bandwidth`` {rate} (KB/s, 1 KB = 1000 bytes): the stream is paced to that rate.
- ``timeout`` {timeout} (ms): the stream's data is dropped; once it has been quiet for
  ``timeout`` the connection is closed. ``timeout`` 0 is a blackhole: the stream is no longer
  read past its buffer, so the data is held (the sender's TCP window fills, as behind a dead
  route), never delivered, and the connection is never closed. Removing the toxic closes the
  connections it applied to (their streams lost data), as Toxiproxy's cleanup does.
- ``reset_peer`` {timeout} (ms): the next chunk on the stream (or its end) is dropped and,
  ``timeout`` later, both sockets are closed with SO_LINGER 0: both peers see ECONNRESET.
- ``slow_close`` {delay} (ms): the end of the stream's source reaches the other side late.
- ``limit_data`` {bytes}: the connection is closed once that many bytes went through.

``stream`` is ``upstream`` (client to server) or ``downstream`` (server to client, the
default); ``toxicity`` is the chance that a toxic applies to a given connection, drawn once
per connection. Toxics apply to open connections as well as new ones. A disabled proxy stops
listening and closes its connections; enabling it listens on the same address again.

Run it with ``python -m chaos.faultproxy --listen 127.0.0.1:8474``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import socket as stdsocket
import struct
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import gevent.event
import gevent.queue
from gevent import socket
from gevent.pywsgi import WSGIServer

VERSION = "2.12.0-faultproxy"
STREAMS = ("upstream", "downstream")
CHUNK = 32 * 1024
# Bytes read but not yet forwarded, per direction, before the reader stops reading: a slow
# toxic backs up into the sender's TCP window, as Toxiproxy's bounded channels make it do.
BUFFER = 256 * 1024
# Toxic type -> its attributes and their defaults (Toxiproxy's defaults are all 0).
TOXIC_ATTRIBUTES: dict[str, dict[str, int]] = {
    "latency": {"latency": 0, "jitter": 0},
    "bandwidth": {"rate": 0},
    "timeout": {"timeout": 0},
    "reset_peer": {"timeout": 0},
    "slow_close": {"delay": 0},
    "limit_data": {"bytes": 0},
}


class ApiError(Exception):
    """An API failure answered as Toxiproxy does: {"error": message, "status": code}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Toxic:
    """One toxic as the API shows it; the links read its attributes on every chunk."""

    def __init__(self, spec: dict[str, Any]) -> None:
        kind = spec.get("type")
        if kind not in TOXIC_ATTRIBUTES:
            raise ApiError(400, "invalid toxic type")
        stream = spec.get("stream") or "downstream"
        if stream not in STREAMS:
            raise ApiError(400, "stream was invalid, can be either upstream or downstream")
        self.type: str = kind
        self.stream: str = stream
        self.name: str = spec.get("name") or f"{kind}_{stream}"
        self.toxicity: float = 1.0
        self.attributes: dict[str, int] = dict(TOXIC_ATTRIBUTES[kind])
        self.update(spec)

    def update(self, spec: dict[str, Any]) -> None:
        if "toxicity" in spec:
            self.toxicity = float(spec["toxicity"])
        for key, value in (spec.get("attributes") or {}).items():
            if key in self.attributes:
                self.attributes[key] = int(value)

    def __getitem__(self, attribute: str) -> int:
        return self.attributes[attribute]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
            "attributes": dict(self.attributes),
        }


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    try:
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class Link:
    """One proxied connection: a client socket, its upstream socket, and a pump per direction.

    Each direction has a reader greenlet (timestamps chunks as they arrive) and a writer
    greenlet (applies the direction's toxics, in the order they were added, to each chunk)."""

    def __init__(self, proxy: Proxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.sockets = {"upstream": upstream, "downstream": client}  # where each stream writes to
        self.sources = {"upstream": client, "downstream": upstream}
        self.applies: dict[str, bool] = {}  # toxic name -> drawn against its toxicity
        self.timers: dict[str, gevent.Greenlet] = {}  # timeout toxic name -> its close timer
        self.quiet_since: dict[str, float] = {}  # timeout toxic name -> last data it dropped
        self.sent = {"upstream": 0, "downstream": 0}
        self.buffered = {"upstream": 0, "downstream": 0}
        self.room = {stream: gevent.event.Event() for stream in STREAMS}  # set when buffered drops
        self.closed = False
        self.greenlets: list[gevent.Greenlet] = []
        for stream in STREAMS:
            queue: gevent.queue.Queue = gevent.queue.Queue()
            self.greenlets.append(gevent.spawn(self._read, stream, queue))
            self.greenlets.append(gevent.spawn(self._write, stream, queue))
        for toxic in proxy.toxics.values():
            self.toxic_added(toxic)

    # -- toxics --------------------------------------------------------------
    def toxic_added(self, toxic: Toxic) -> None:
        self.applies[toxic.name] = random.random() < toxic.toxicity
        if self.applies[toxic.name] and toxic.type == "timeout":
            self.quiet_since[toxic.name] = time.monotonic()
            self.timers[toxic.name] = gevent.spawn(self._close_when_quiet, toxic)

    def toxic_removed(self, toxic: Toxic) -> None:
        applied = self.applies.pop(toxic.name, False)
        timer = self.timers.pop(toxic.name, None)
        if timer is not None:
            timer.kill(block=False)
        if applied and toxic.type == "timeout":
            self.close()

    def _active(self, stream: str) -> list[Toxic]:
        return [t for t in self.proxy.toxics.values() if t.stream == stream and self.applies.get(t.name)]

    def _close_when_quiet(self, toxic: Toxic) -> None:
        while True:
            timeout = toxic["timeout"] / 1000.0
            remaining = self.quiet_since[toxic.name] + timeout - time.monotonic()
            if timeout > 0 and remaining <= 0:
                self.close()
                return
            gevent.sleep(remaining if timeout > 0 else 1.0)

    # -- pumps ---------------------------------------------------------------
    def _read(self, stream: str, queue: gevent.queue.Queue) -> None:
        source = self.sources[stream]
        while True:
            while self.buffered[stream] >= BUFFER:
                self.room[stream].clear()
                self.room[stream].wait()
            try:
                data = source.recv(CHUNK)
            except OSError:
                data = b""
            self.buffered[stream] += len(data)
            queue.put((time.monotonic(), data))
            if not data:
                return

    def _write(self, stream: str, queue: gevent.queue.Queue) -> None:
        sink = self.sockets[stream]
        while True:
            arrived, data = queue.get()
            toxics = self._active(stream)
            resets = [t["timeout"] for t in toxics if t.type == "reset_peer"]
            if resets:
                gevent.sleep(resets[0] / 1000.0)
                self.close(reset=True)
                return
            timeouts = [t for t in toxics if t.type == "timeout"]
            while any(t["timeout"] == 0 for t in timeouts):
                # Blackhole: hold this chunk (and, once BUFFER is full, stop reading) until the
                # toxic goes, which closes the link.
                gevent.sleep(0.05)
                timeouts = [t for t in self._active(stream) if t.type == "timeout"]
            for toxic in timeouts:
                self.quiet_since[toxic.name] = time.monotonic()
            if not data:
                delays = [t["delay"] for t in toxics if t.type == "slow_close"]
                gevent.sleep(0 if timeouts else max(delays, default=0) / 1000.0)
                self.close()
                return
            try:
                if not timeouts:  # a timeout toxic drops the data
                    self._deliver(stream, sink, arrived, data)
            except OSError:
                self.close()
                return
            self.buffered[stream] -= len(data)
            self.room[stream].set()

    def _deliver(self, stream: str, sink: socket.socket, arrived: float, data: bytes) -> None:
        toxics = self._active(stream)
        for toxic in toxics:
            if toxic.type == "latency":
                jitter = toxic["jitter"]
                delay = (toxic["latency"] + (random.uniform(-jitter, jitter) if jitter else 0)) / 1000.0
                gevent.sleep(max(0.0, arrived + delay - time.monotonic()))
        limits = [t["bytes"] - self.sent[stream] for t in toxics if t.type == "limit_data"]
        if limits:
            data = data[: max(0, min(limits))]
        rates = [t["rate"] * 1000 for t in toxics if t.type == "bandwidth" and t["rate"] > 0]
        step = max(1, min(rates) // 10 if rates else len(data))  # pace in 100 ms slices
        for offset in range(0, len(data), step):
            piece = data[offset : offset + step]
            sink.sendall(piece)
            self.sent[stream] += len(piece)
            if rates:
                gevent.sleep(len(piece) / min(rates))
        if limits and min(limits) <= len(data):
            self.close()

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.links.discard(self)
        for timer in self.timers.values():
            timer.kill(block=False)
        for sock in self.sockets.values():
            if reset:
                _reset(sock)
            else:
                sock.close()
        current = gevent.getcurrent()
        for greenlet in self.greenlets:
            if greenlet is not current:
                greenlet.kill(block=False)


class Proxy:
    """A listening address forwarding to an upstream address, with its toxics and links."""

    def __init__(self, name: str, listen: str, upstream: str) -> None:
        self.name = name
        self.listen = listen
        self.upstream = upstream
        self.enabled = False
        self.toxics: dict[str, Toxic] = {}  # insertion order is application order
        self.links: set[Link] = set()
        self._server: socket.socket | None = None
        self._acceptor: gevent.Greenlet | None = None

    def start(self) -> None:
        if self.enabled:
            return
        host, port = _split_address(self.listen)
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind((host, port))
        except OSError as e:
            server.close()
            raise ApiError(500, f"listen tcp {self.listen}: {e.strerror}") from None
        server.listen(128)
        host, port = server.getsockname()[:2]
        self.listen = f"{host}:{port}"
        self._server = server
        self._acceptor = gevent.spawn(self._accept, server)
        self.enabled = True

    def stop(self) -> None:
        if not self.enabled:
            return
        self.enabled = False
        if self._acceptor is not None:
            self._acceptor.kill(block=False)
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            client, _ = server.accept()
            gevent.spawn(self._connect, client)

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(_split_address(self.upstream), timeout=10)
        except OSError:
            client.close()  # as Toxiproxy does: the client sees its connection closed
            return
        upstream.settimeout(None)
        if not self.enabled:
            client.close()
            upstream.close()
            return
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.links.add(Link(self, client, upstream))

    def add_toxic(self, spec: dict[str, Any]) -> Toxic:
        toxic = Toxic(spec)
        if toxic.name in self.toxics:
            raise ApiError(409, "toxic already exists")
        self.toxics[toxic.name] = toxic
        for link in list(self.links):
            link.toxic_added(toxic)
        return toxic

    def update_toxic(self, name: str, spec: dict[str, Any]) -> Toxic:
        toxic = self.get_toxic(name)
        toxic.update(spec)  # links read attributes as they go
        return toxic

    def get_toxic(self, name: str) -> Toxic:
        if name not in self.toxics:
            raise ApiError(404, "toxic not found")
        return self.toxics[name]

    def remove_toxic(self, name: str) -> None:
        toxic = self.toxics.pop(name, None)
        if toxic is None:
            raise ApiError(404, "toxic not found")
        for link in list(self.links):
            link.toxic_removed(toxic)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "toxics": [t.to_json() for t in self.toxics.values()],
        }


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return (host.strip("[]") or "0.0.0.0", int(port))


class Api:
    """The Toxiproxy 2.x HTTP API over a registry of proxies (a WSGI app)."""

    def __init__(self) -> None:
        self.proxies: dict[str, Proxy] = {}
        proxy, toxic = r"/proxies/(?P<proxy>[^/]+)", r"/toxics/(?P<toxic>[^/]+)"
        self._routes: list[tuple[re.Pattern[str], dict[str, Callable[..., tuple[int, Any]]]]] = [
            (re.compile(r"/version"), {"GET": self._version}),
            (re.compile(r"/reset"), {"POST": self._reset}),
            (re.compile(r"/proxies"), {"GET": self._proxy_index, "POST": self._proxy_create}),
            (
                re.compile(proxy),
                {
                    "GET": self._proxy_show,
                    "POST": self._proxy_update,
                    "PATCH": self._proxy_update,
                    "DELETE": self._proxy_delete,
                },
            ),
            (re.compile(proxy + r"/toxics"), {"GET": self._toxic_index, "POST": self._toxic_create}),
            (
                re.compile(proxy + toxic),
                {
                    "GET": self._toxic_show,
                    "POST": self._toxic_update,
                    "PATCH": self._toxic_update,
                    "DELETE": self._toxic_delete,
                },
            ),
        ]

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", "/"), environ["REQUEST_METHOD"]
        try:
            handler, args = self._route(path, method)
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            status, payload = handler(body, **args)
        except ApiError as e:
            status, payload = e.status, {"error": e.message, "status": e.status}
        reason = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 404: "Not Found"}
        reason.update({405: "Method Not Allowed", 409: "Conflict", 500: "Internal Server Error"})
        data = b"" if status == 204 else json.dumps(payload).encode() + b"\n"
        headers = [("Content-Length", str(len(data)))]
        if data:
            headers.append(("Content-Type", "application/json"))
        start_response(f"{status} {reason[status]}", headers)
        return [data]

    def _route(self, path: str, method: str) -> tuple[Callable[..., tuple[int, Any]], dict[str, str]]:
        matched = False
        for pattern, methods in self._routes:
            m = pattern.fullmatch(path)
            if m and method in methods:
                return methods[method], m.groupdict()
            matched = matched or m is not None
        raise ApiError(405, "method not allowed") if matched else ApiError(404, "404 page not found")

    @staticmethod
    def _decode(body: bytes) -> dict[str, Any]:
        try:
            value = json.loads(body or b"{}")
        except ValueError as e:
            raise ApiError(400, f"bad request body: {e}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "bad request body")
        return value

    def _get(self, name: str) -> Proxy:
        if name not in self.proxies:
            raise ApiError(404, "proxy not found")
        return self.proxies[name]

    def _version(self, body: bytes) -> tuple[int, Any]:
        return 200, {"version": VERSION}

    def _reset(self, body: bytes) -> tuple[int, Any]:
        for proxy in self.proxies.values():
            proxy.start()
            for name in list(proxy.toxics):
                proxy.remove_toxic(name)
        return 204, None

    def _proxy_index(self, body: bytes) -> tuple[int, Any]:
        return 200, {name: proxy.to_json() for name, proxy in self.proxies.items()}

    def _proxy_create(self, body: bytes) -> tuple[int, Any]:
        spec = self._decode(body)
        for required in ("name", "upstream"):
            if not spec.get(required):
                raise ApiError(400, f"missing required field: {required}")
        if spec["name"] in self.proxies:
            raise ApiError(409, "proxy already exists")
        proxy = Proxy(spec["name"], spec.get("listen") or "127.0.0.1:0", spec["upstream"])
        if spec.get("enabled", True):
            proxy.start()
        self.proxies[proxy.name] = proxy
        return 201, proxy.to_json()

    def _proxy_show(self, body: bytes, proxy: str) -> tuple[int, Any]:
        return 200, self._get(proxy).to_json()

    def _proxy_update(self, body: bytes, proxy: str) -> tuple[int, Any]:
        """As Toxiproxy's Proxy.Update: a new address restarts the proxy; absent fields keep their value."""
        target, spec = self._get(proxy), self._decode(body)
        listen, upstream = spec.get("listen", target.listen), spec.get("upstream", target.upstream)
        enabled = bool(spec.get("enabled", target.enabled))
        if (listen, upstream) != (target.listen, target.upstream):
            target.stop()
            target.listen, target.upstream = listen, upstream
        if enabled:
            target.start()
        else:
            target.stop()
        return 200, target.to_json()

    def _proxy_delete(self, body: bytes, proxy: str) -> tuple[int, Any]:
        self._get(proxy).stop()
        del self.proxies[proxy]
        return 204, None

    def _toxic_index(self, body: bytes, proxy: str) -> tuple[int, Any]:
        return 200, [t.to_json() for t in self._get(proxy).toxics.values()]

    def _toxic_create(self, body: bytes, proxy: str) -> tuple[int, Any]:
        return 200, self._get(proxy).add_toxic(self._decode(body)).to_json()

    def _toxic_show(self, body: bytes, proxy: str, toxic: str) -> tuple[int, Any]:
        return 200, self._get(proxy).get_toxic(toxic).to_json()

    def _toxic_update(self, body: bytes, proxy: str, toxic: str) -> tuple[int, Any]:
        return 200, self._get(proxy).update_toxic(toxic, self._decode(body)).to_json()

    def _toxic_delete(self, body: bytes, proxy: str, toxic: str) -> tuple[int, Any]:
        self._get(proxy).remove_toxic(toxic)
        return 204, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.faultproxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8474", help="API address HOST:PORT (default %(default)s)")
    args = parser.parse_args(argv)
    server = WSGIServer(_split_address(args.listen), Api(), log=None)
    server.start()
    # The address line tells a parent that started us on port 0 where the API is.
    host, port = server.address[:2]
    print(f"faultproxy API listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
