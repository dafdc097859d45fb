"""Outbox: the single writer of one socket.

Every socket in the proxy has exactly one reader greenlet and one writer greenlet (this one).
Producers put whole frame batches; the writer joins everything pending into one send, so a
frame is never split between writers and a batch costs one syscall. Producers never block on
the socket: a slow peer only grows its own outbox, which its owner bounds.
"""

from __future__ import annotations

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
        "_wake",
        "_room",
        "buffered",
        "high_watermark",
        "low_watermark",
        "last_write",
        "closed",
        "_close_when_drained",
        "_greenlet",
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
        self._wake = Event()
        self._room = Event()
        self._room.set()
        self.buffered = 0
        self.high_watermark = high_watermark
        self.low_watermark = high_watermark // 2
        self.last_write = time.monotonic()
        self.closed = False
        self._close_when_drained = False
        self._on_error = on_error
        self._oldest = 0.0  # when the oldest unsent byte was read from its sender
        self._latency = latency  # histogram child observing the time data spends in the proxy
        self._greenlet = gevent.spawn(self._run)

    def put(self, data: bytes | bytearray, received_at: float = 0.0) -> None:
        if self.closed:
            return
        if received_at and not self._oldest:
            self._oldest = received_at
        self._chunks.append(data)
        self.buffered += len(data)
        if self.buffered > self.high_watermark:
            self._room.clear()
        self._wake.set()

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """Block the calling producer until the backlog falls below the low watermark."""
        if self.buffered <= self.high_watermark:
            return True
        return self._room.wait(timeout)

    def close_when_drained(self) -> None:
        """Flush what is queued, then shut the socket down (used after a final Connection.Close)."""
        self._close_when_drained = True
        self._wake.set()

    def join(self, timeout: float) -> None:
        """Wait for the writer to finish (after close_when_drained), at most `timeout` seconds."""
        self._greenlet.join(timeout)

    def kill(self) -> None:
        self.closed = True
        self._chunks.clear()
        self.buffered = 0
        self._room.set()
        self._wake.set()

    def _run(self) -> None:
        chunks = self._chunks
        sock = self._sock
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
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
                if self.closed:
                    return
                if self._close_when_drained and not chunks:
                    self.closed = True
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
        except (OSError, gevent.GreenletExit) as exc:
            self.closed = True
            self._room.set()
            if not isinstance(exc, gevent.GreenletExit):
                self._on_error(exc)
