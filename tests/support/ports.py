"""Ports for test listeners, and whether something listens on one."""

from __future__ import annotations

import socket
import uuid


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (small race window, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def accepting(host: str, port: int, timeout: float) -> bool:
    """Whether something accepts TCP connections on host:port. Test ports come from the
    ephemeral range, where a connect with nothing listening can pick the destination port as its
    source and connect to itself (TCP simultaneous open; Linux makes it rare by giving connect()
    even ports and bind() odd ones): that is not a listener."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            return sock.getsockname() != sock.getpeername()
    except OSError:
        return False


def unique_name(prefix: str = "q") -> str:
    return f"amqproxy-test-{prefix}-{uuid.uuid4().hex[:12]}"
