"""The load generator's AMQP clients: RawAMQP (a minimal AMQP 0-9-1 client, cheap per message
and per handshake, with the handshake's phases timed) and its frame helpers, and `connect` for
py-amqp, the ordinary client the latency workload uses."""

from __future__ import annotations

import socket
import struct
import time
from typing import TYPE_CHECKING

import amqp
import pamqp.body
import pamqp.commands as pc
import pamqp.frame
import pamqp.header

if TYPE_CHECKING:
    from .targets import Target

FRAME_HEADER = struct.Struct(">BHI")
METHOD_ID = struct.Struct(">HH")
ACK_ARGS = struct.Struct(">QB")
BASIC_DELIVER, BASIC_ACK, BASIC_NACK = (60, 60), (60, 80), (60, 120)
CHANNEL_CLOSE, CONNECTION_CLOSE = (20, 40), (10, 50)
RECV_SIZE = 1 << 20


def connect(target: Target) -> amqp.Connection:
    """A py-amqp connection to target (guest/guest, no heartbeats)."""
    conn = amqp.Connection(
        host=f"{target.host}:{target.port}",
        userid="guest",
        password="guest",
        virtual_host="/",
        heartbeat=0,
        connect_timeout=10,
        write_timeout=10,
    )
    conn.connect()
    return conn


class RawAMQP:
    """Just enough AMQP 0-9-1 to publish and consume at full speed from Python.

    The handshake and control methods are encoded with pamqp; the hot path sends
    pre-encoded message frames in batches and scans incoming frames with struct, so
    the load generator is far cheaper per message than any full client library
    (py-amqp tops out near 10k msg/s per process here, which would hide the proxy).
    One channel (1), no heartbeats, PLAIN guest/guest.

    The handshake is timed: `handshake_s` from the TCP connect to Connection.OpenOk,
    `channel_open_s` from Channel.Open to Channel.OpenOk (None without a channel).
    """

    def __init__(self, target: Target, timeout: float = 10.0, sockmod=socket, channel: bool = True):
        # sockmod: the socket module (gevent.socket for many concurrent handshakes in one process)
        t_connect = time.monotonic()
        self.sock = sockmod.create_connection((target.host, target.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.sock.sendall(b"AMQP\x00\x00\x09\x01")
        self.expect(pc.Connection.Start)
        self.send(0, pc.Connection.StartOk(client_properties={"product": "amqproxy-bench"}, response="\0guest\0guest"))
        tune = self.expect(pc.Connection.Tune)
        frame_max = min(tune.frame_max or 131072, 131072)
        self.send(0, pc.Connection.TuneOk(channel_max=tune.channel_max or 2047, frame_max=frame_max, heartbeat=0))
        self.send(0, pc.Connection.Open(virtual_host="/"))
        self.expect(pc.Connection.OpenOk)
        t_open = time.monotonic()
        self.handshake_s = t_open - t_connect
        self.channel_open_s: float | None = None
        if channel:
            self.send(1, pc.Channel.Open())
            self.expect(pc.Channel.OpenOk)
            self.channel_open_s = time.monotonic() - t_open

    def send(self, channel: int, frame) -> None:
        self.sock.sendall(pamqp.frame.marshal(frame, channel))

    def read_frame(self):
        while True:
            if len(self.buf) >= 7:
                size = FRAME_HEADER.unpack_from(self.buf)[2]
                if len(self.buf) >= size + 8:
                    used, channel, frame = pamqp.frame.unmarshal(bytes(self.buf[: size + 8]))
                    del self.buf[:used]
                    return channel, frame
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionError("connection closed by peer")
            self.buf += data

    def expect(self, cls):
        """Read frames until one of type cls; skip content of deliveries; raise on Close."""
        while True:
            _ch, frame = self.read_frame()
            if isinstance(frame, cls):
                return frame
            if isinstance(frame, (pc.Connection.Close, pc.Channel.Close)):
                raise RuntimeError(f"{frame.name}: {frame.reply_code} {frame.reply_text}")

    def take_buffer(self) -> bytearray:
        """Bytes already read past the last parsed frame (for the hot loops)."""
        data, self.buf = self.buf, bytearray()
        return data

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.sock.settimeout(timeout)
            self.buf = bytearray()
            self.send(0, pc.Connection.Close(reply_code=200, reply_text="bench done", class_id=0, method_id=0))
            self.expect(pc.Connection.CloseOk)
        except (OSError, RuntimeError, ConnectionError):
            pass
        finally:
            self.sock.close()


def encode_publish(queue: str, body: bytes) -> bytes:
    """One Basic.Publish to the default exchange, header and body frames, on channel 1."""
    return (
        pamqp.frame.marshal(pc.Basic.Publish(exchange="", routing_key=queue), 1)
        + pamqp.frame.marshal(pamqp.header.ContentHeader(0, len(body), pc.Basic.Properties()), 1)
        + pamqp.frame.marshal(pamqp.body.ContentBody(body), 1)
    )


def scan_frames(buf: bytearray, have: int, on_method) -> int:
    """Call on_method(method_id, buf, payload_start) for each complete method frame in
    buf[:have]; return the offset of the first incomplete frame."""
    pos = 0
    unpack_header, unpack_method = FRAME_HEADER.unpack_from, METHOD_ID.unpack_from
    while have - pos >= 7:
        ftype, _ch, size = unpack_header(buf, pos)
        end = pos + size + 8
        if end > have:
            break
        if ftype == 1:
            on_method(unpack_method(buf, pos + 7), buf, pos + 7)
        pos = end
    return pos


def raise_on_close(method: tuple[int, int], buf, start: int) -> None:
    if method in (CHANNEL_CLOSE, CONNECTION_CLOSE):
        code = struct.unpack_from(">H", buf, start + 4)[0]
        text_len = buf[start + 6]
        text = bytes(buf[start + 7 : start + 7 + text_len]).decode(errors="replace")
        raise RuntimeError(
            f"broker/proxy closed the {'channel' if method == CHANNEL_CLOSE else 'connection'}: {code} {text}"
        )


class FrameStream:
    """Receive loop over a RawAMQP socket after the handshake: a growable buffer, a
    timeout per recv, and frame scanning."""

    def __init__(self, raw: RawAMQP, recv_timeout: float):
        self.sock = raw.sock
        self.sock.settimeout(recv_timeout)
        self.buf = bytearray(RECV_SIZE * 2)
        pending = raw.take_buffer()
        self.buf[: len(pending)] = pending
        self.have = len(pending)
        self._pending = bool(pending)

    def pump(self, on_method) -> bool:
        """One recv (False on timeout), then dispatch every complete method frame."""
        if self._pending:  # frames that arrived with the last handshake reply
            self._pending = False
            self.have -= self._scan(on_method)
        try:
            n = self.sock.recv_into(memoryview(self.buf)[self.have :])
        except TimeoutError:
            return False
        if n == 0:
            raise ConnectionError("connection closed by peer")
        self.have += n
        self.have -= self._scan(on_method)
        return True

    def _scan(self, on_method) -> int:
        used = scan_frames(self.buf, self.have, on_method)
        if used:
            rest = self.have - used
            self.buf[:rest] = self.buf[used : self.have]
        return used
