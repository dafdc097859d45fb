"""Proxy: the accept loop, the janitor, and start/stop of everything else.

Greenlets: the StreamServer accept loop spawns one handler greenlet per client (a
`ClientSession`); one janitor greenlet ticks once a second for heartbeats on both legs and idle
upstream eviction; the admin HTTP server runs its own greenlets.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from . import __version__
from .admin import AdminServer
from .client import ClientSession
from .config import Config
from .metrics import Metrics
from .pool import Pool
from .protocol import constants as c

log = logging.getLogger("amqproxy.server")

JANITOR_INTERVAL = 1.0
SHUTDOWN_GRACE = 3.0


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics(self)
        self.pool = Pool(config, self.metrics)
        self.sessions: set[ClientSession] = set()
        self.stopping = False
        self._stopped = Event()
        self._server: StreamServer | None = None
        self._admin: AdminServer | None = None
        self._janitor: gevent.Greenlet | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        listener = _listen(self.config.listen, self.config.backlog)
        self._server = StreamServer(listener, self._handle)
        self._server.start()
        if self.config.http_listen is not None:
            self._admin = AdminServer(self, self.config.http_listen)
            self._admin.start()
        self._janitor = gevent.spawn(self._janitor_loop)
        log.info(
            "amqproxy started",
            extra={
                "event": "start",
                "version": __version__,
                "listen": "{}:{}".format(*self.config.listen),
                "upstreams": [node.label for node in self.config.upstream],
                "http_listen": "{}:{}".format(*self.config.http_listen) if self.config.http_listen else None,
            },
        )

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.address  # type: ignore[no-any-return]

    def serve_forever(self) -> None:
        gevent.signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self.stop, "SIGINT")
        self._stopped.wait()

    def stop(self, why: str = "stop") -> None:
        """Stop accepting, close every client with 320, close upstreams with 200, then return."""
        if self.stopping:
            log.warning("second stop signal: exiting now", extra={"event": "stop_forced"})
            os._exit(1)
        self.stopping = True
        log.info("amqproxy stopping", extra={"event": "stop", "signal": why, "clients": len(self.sessions)})
        gevent.spawn(self._stop)

    def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            session.close_connection(c.CONNECTION_FORCED, "CONNECTION_FORCED - proxy shutting down", kind="shutdown")
        deadline = time.monotonic() + SHUTDOWN_GRACE + 1
        while self.sessions and time.monotonic() < deadline:
            gevent.sleep(0.05)
        self.pool.close_all("proxy shutting down")
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while self.pool.closing and time.monotonic() < deadline:
            gevent.sleep(0.05)
        if self._admin is not None:
            self._admin.stop()
        if self._janitor is not None:
            self._janitor.kill(block=False)
        self._stopped.set()

    # ------------------------------------------------------------------ clients

    def _handle(self, sock: socket.socket, address: tuple) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = ClientSession(self, sock, address)
        self.sessions.add(session)
        session.run()

    def forget(self, session: ClientSession) -> None:
        self.sessions.discard(session)

    # ------------------------------------------------------------------ janitor

    def _janitor_loop(self) -> None:
        while True:
            gevent.sleep(JANITOR_INTERVAL)
            now = time.monotonic()
            try:
                for session in list(self.sessions):
                    session.tick(now)
                self.pool.tick(now)
                self.pool.reap(now)
            except Exception:  # the janitor must survive anything one connection does
                log.exception("janitor error", extra={"event": "janitor_error"})


def _listen(address: tuple[str, int], backlog: int) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
