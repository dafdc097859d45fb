"""Helpers shared by the integration tests (fixtures live in tests/conftest.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import tempfile
import time

import pamqp.commands as C
import pamqp.exceptions
import pamqp.frame
import pamqp.header


def run_async(coro, timeout: float = 30.0):
    """Run a coroutine to completion in a fresh event loop, bounded."""

    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def shutdown_both(*socks: socket.socket) -> None:
    """End a relay's pipe: shut both directions of each socket, whatever state it is in."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02, msg: str = ""):
    """Poll predicate() until truthy; return its value or raise AssertionError."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {msg} (last={last!r})")


def secret_file(value: str) -> str:
    """A file of mode 0600 holding `value`: how tests pass secrets (--admin-token-file ...), since
    the proxy refuses secrets as flags and secret files readable by everyone."""
    fd, path = tempfile.mkstemp(prefix="amqproxy-test-secret-")
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pika_error(exc) -> tuple:
    """(exception type name, reply code, reply text) of a pika error."""
    return (type(exc).__name__, getattr(exc, "reply_code", None), getattr(exc, "reply_text", None))


def pika_drain(connection, predicate, timeout: float = 5.0):
    """Process pika BlockingConnection events until predicate() or timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        connection.process_data_events(time_limit=min(0.05, remaining))
    return True


class RawAMQP:
    """A minimal hand-driven AMQP 0-9-1 client (pamqp codec) for protocol-level
    tests: frame sizes, protocol header, heartbeats."""

    def __init__(self, host: str, port: int, timeout: float = 5.0, source: str | None = None):
        # `source`: connect from this local address (e.g. 127.0.0.2: another client host on loopback)
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.buf = b""
        self.frame_sizes: list[int] = []

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, frame, channel: int = 0) -> None:
        self.sock.sendall(pamqp.frame.marshal(frame, channel))

    def read_until_closed(self, timeout: float = 5.0) -> tuple[bytes, str]:
        """All bytes until the peer closes; returns (data, how) where how is
        'eof', 'reset' or 'timeout'."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        data = self.buf
        self.buf = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return data, "timeout"
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return data, "timeout"
            except ConnectionResetError:
                return data, "reset"
            if not chunk:
                return data, "eof"
            data += chunk

    def recv_frame(self):
        """Next (channel, frame); raises EOFError when the peer closed."""
        while True:
            if len(self.buf) >= 7:
                try:
                    n, ch, frame = pamqp.frame.unmarshal(self.buf)
                except pamqp.exceptions.UnmarshalingException:
                    pass
                else:
                    self.frame_sizes.append(n)
                    self.buf = self.buf[n:]
                    return ch, frame
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("peer closed the connection")
            self.buf += chunk

    def expect(self, cls, channel: int | None = None):
        ch, frame = self.recv_frame()
        assert isinstance(frame, cls), f"expected {cls.__name__}, got {frame!r} on channel {ch}"
        if channel is not None:
            assert ch == channel, f"expected channel {channel}, got {ch}"
        return frame

    def handshake(
        self,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
        heartbeat: int = 0,
        frame_max: int | None = None,
        channel_max: int | None = None,
    ):
        """Do the connection handshake; returns (start, tune, reply) where
        reply is Connection.OpenOk or Connection.Close."""
        self.send_bytes(pamqp.header.ProtocolHeader().marshal())
        start = self.expect(C.Connection.Start, 0)
        self.send(
            C.Connection.StartOk(
                client_properties={
                    "product": "amqproxy-tests-raw",
                    "capabilities": {"authentication_failure_close": True},
                },
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
                locale="en_US",
            )
        )
        ch, tune = self.recv_frame()
        if isinstance(tune, C.Connection.Close):
            return start, None, tune
        assert isinstance(tune, C.Connection.Tune), tune
        self.send(
            C.Connection.TuneOk(
                channel_max=tune.channel_max if channel_max is None else channel_max,
                frame_max=tune.frame_max if frame_max is None else frame_max,
                heartbeat=heartbeat,
            )
        )
        self.send(C.Connection.Open(virtual_host=vhost))
        ch, reply = self.recv_frame()
        return start, tune, reply


def small_frame_amqp_connection_class(frame_max: int):
    """py-amqp adopts the server's proposed frame_max in Connection.Tune,
    ignoring its own `frame_max` argument; this subclass really negotiates
    min(server, frame_max) in its TuneOk."""
    import amqp

    class SmallFrameConnection(amqp.Connection):
        def _on_tune(self, channel_max, server_frame_max, server_heartbeat, argsig="BlB"):
            wanted = min(server_frame_max or frame_max, frame_max)
            return super()._on_tune(channel_max, wanted, server_heartbeat, argsig)

    return SmallFrameConnection
