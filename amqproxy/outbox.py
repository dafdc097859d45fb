"""Outbox: the single writer of one socket.

Every socket in the proxy has exactly one reader greenlet and one writer: this outbox.
Producers put whole frame batches. With no backlog a batch is written at once with a
non-blocking send (no greenlet switch); what the socket does not take is queued, in order, for
a writer greenlet that exists only while a backlog does and joins everything pending into one
send. A frame is therefore never split between writers and never reordered, and producers never
block on the socket: a slow peer only grows its own outbox, which its owner bounds.
"""

from __future__ import annotations

import errno
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event


class Outbox:
    __slots__ = (
        "_sock",
        "_chunks",
        "_room",
        "buffered",
        "high_watermark",
        "low_watermark",
        "last_write",
        "closed",
        "_close_when_drained",
        "_writer",
        "_on_error",
        "_oldest",
        "_latency",
    )

    def __init__(
        self,
        sock: socket.socket,
        on_error: Callable[[BaseException], None],
        high_watermark: int = 4 * 1024 * 1024,
        latency: Any = None,
    ) -> None:
        self._sock = sock
        self._chunks: deque[bytes | bytearray] = deque()
        self._room = Event()
        self._room.set()
        self.buffered = 0
        self.high_watermark = high_watermark
        self.low_watermark = high_watermark // 2
        self.last_write = time.monotonic()
        self.closed = False
        self._close_when_drained = False
        self._writer: gevent.Greenlet | None = None  # exists only while there is a backlog
        self._on_error = on_error
        self._oldest = 0.0  # when the oldest unsent byte was read from its sender
        self._latency = latency  # histogram child observing the time data spends in the proxy

    def put(self, data: bytes | bytearray, received_at: float = 0.0) -> None:
        """Queue whole frames. With no backlog they are written at once, without blocking (the
        common case: no writer greenlet, no switch); whatever the socket does not take now goes
        to a writer greenlet that lives until the backlog is gone."""
        if self.closed:
            return
        if self._writer is None:
            try:
                sent = self._sock.send(data, 0, 0.0)  # type: ignore[call-arg]  # gevent: timeout 0, never blocks
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                if exc.errno not in _WOULD_BLOCK:
                    self._fail(exc)
                    return
                sent = 0
            now = self.last_write = time.monotonic()
            if sent == len(data):
                if received_at and self._latency is not None:
                    self._latency.observe(now - received_at)
                return
            data = bytes(memoryview(data)[sent:])
            self._writer = gevent.spawn(self._drain)
        if received_at and not self._oldest:
            self._oldest = received_at
        self._chunks.append(data)
        self.buffered += len(data)
        if self.buffered > self.high_watermark:
            self._room.clear()

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """Block the calling producer until the backlog falls below the low watermark."""
        if self.buffered <= self.high_watermark:
            return True
        return self._room.wait(timeout)

    def close_when_drained(self) -> None:
        """Flush what is queued, then shut the socket down (used after a final Connection.Close)."""
        if self.closed:
            return
        self._close_when_drained = True
        if self._writer is None:
            self._shutdown()

    def join(self, timeout: float) -> None:
        """Wait for the backlog to be written (after close_when_drained), at most `timeout` seconds."""
        if self._writer is not None:
            self._writer.join(timeout)

    def kill(self) -> None:
        self.closed = True
        self._chunks.clear()
        self.buffered = 0
        self._room.set()
        writer = self._writer
        if writer is not None and writer is not gevent.getcurrent():
            writer.kill(block=False)

    def _shutdown(self) -> None:
        self.closed = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        self._chunks.clear()
        self.buffered = 0
        self._room.set()
        # Not inline: the producer may be iterating over state that the handler changes. The
        # traceback goes: its frames would keep the producer's buffers (memoryviews) alive.
        gevent.spawn(self._on_error, exc.with_traceback(None))

    def _drain(self) -> None:
        chunks = self._chunks
        sock = self._sock
        try:
            while chunks and not self.closed:
                if len(chunks) == 1:
                    data = chunks.popleft()
                else:
                    data = b"".join(chunks)
                    chunks.clear()
                oldest, self._oldest = self._oldest, 0.0
                sock.sendall(data)
                self.buffered -= len(data)
                if self.buffered <= self.low_watermark:
                    self._room.set()
                now = self.last_write = time.monotonic()
                if oldest and self._latency is not None:
                    self._latency.observe(now - oldest)
        except OSError as exc:
            self._writer = None
            self._fail(exc)
            return
        except gevent.GreenletExit:
            self._writer = None
            return
        self._writer = None
        if self._close_when_drained and not self.closed:
            self._shutdown()


_WOULD_BLOCK = {errno.EAGAIN, errno.EWOULDBLOCK}
