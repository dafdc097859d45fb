"""Reading a socket into a `FrameReader`: one receive buffer for the whole process.

A fresh `recv(256 KiB)` allocates that much every read (malloc maps and unmaps it: two system
calls per read), however little arrives. All greenlets share one buffer instead: `recv_into` fills
it and the bytes are appended to the reader before anything can yield, so no other greenlet can
write it in between (gevent switches only where a greenlet waits).
"""

from __future__ import annotations

import socket

from .protocol.frames import FrameReader

RECV_SIZE = 256 * 1024
_BUFFER = bytearray(RECV_SIZE)
_VIEW = memoryview(_BUFFER)


def receive(sock: socket.socket, reader: FrameReader) -> int:
    """Read what is there (waiting for it if nothing is) into `reader`; 0 at end of stream."""
    count = sock.recv_into(_BUFFER)
    if count:
        reader.buffer += _VIEW[:count]
    return count
