"""Proxy: the accept loop, the janitor, and start/stop of everything else.

Greenlets: the StreamServer accept loop runs each client (a `ClientSession`) in a handler
greenlet of its own, one left idle by an earlier client when there is one (`HandlerGreenlets`);
one janitor greenlet ticks once a second for heartbeats on both legs and idle upstream eviction;
the admin HTTP server runs its own greenlets.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from typing import Any

import gevent
from gevent.event import Event
from gevent.hub import Waiter, get_hub
from gevent.server import StreamServer

from . import __version__, accel, tls
from .access import AddressFilter
from .admin import AdminServer
from .client import ClientSession
from .config import Config, ConfigError, parse_config, restart_only_changes
from .limits import Limits
from .logsetup import setup_logging
from .metrics import RELOADS, Metrics, MultiprocessBridge, multiprocess_enabled
from .options import OPTIONS
from .pool import Pool
from .protocol import constants as c
from .protocol import proxyproto
from .upstream import TICK

log = logging.getLogger("amqproxy.server")

JANITOR_INTERVAL = TICK  # upstream liveness (heartbeats, the watchdog) assumes this cadence
SHUTDOWN_GRACE = 3.0
DRAIN_REPORT_INTERVAL = 5.0
IDLE_HANDLERS = 64  # handler greenlets kept for the next clients once theirs has gone
IDLE_HANDLER_NAME = "client handler (idle)"  # how /debug/greenlets shows one waiting for a client


class HandlerGreenlets:
    """StreamServer's `spawn`: a new client runs in a handler greenlet that an earlier client left
    idle, or in a new one when none is. Creating, starting and ending a greenlet costs about
    10 µs (3.6 % of a short-lived client's instructions, `loadtests/hotpath.py --churn`);
    handing the next client to a waiting one costs a callback and a switch. Started the way
    `Greenlet.spawn` starts one (from the loop's next callbacks); an exception the handler lets
    out is reported by the hub as a greenlet's would be. An idle greenlet holds nothing of its
    last client, and is named IDLE_HANDLER_NAME while it waits (a leak check tells a pool from a
    session that never ended)."""

    def __init__(self, keep: int = IDLE_HANDLERS) -> None:
        self._idle: list[Waiter] = []
        self._keep = keep

    def __call__(self, handle: Any, *args: Any) -> None:
        if self._idle:
            get_hub().loop.run_callback(self._idle.pop().switch, (handle, args))
        else:
            # In a list that _serve empties: a Greenlet keeps its arguments until it ends.
            gevent.spawn(self._serve, [handle, args])

    def _serve(self, first: list[Any]) -> None:
        handle, args = first
        first.clear()
        me = gevent.getcurrent()
        name = me.name
        while True:
            try:
                handle(*args)
            except Exception:  # what Greenlet does with it: the hub prints it, the server goes on
                get_hub().handle_error(me, *sys.exc_info())
            handle, args = None, ()  # the last client's socket and session are not kept alive
            if len(self._idle) >= self._keep:
                return
            waiter = Waiter()
            self._idle.append(waiter)
            me.name = IDLE_HANDLER_NAME
            handle, args = waiter.get()
            me.name = name


class Proxy:
    def __init__(self, config: Config, admin_socket: str | None = None) -> None:
        self.config = config
        self.started_at = time.monotonic()
        # Under --workers, the admin API listens on this unix socket for the supervisor instead.
        self.admin_socket = admin_socket
        self.metrics = Metrics(self)
        self._metrics_bridge = MultiprocessBridge(self) if multiprocess_enabled() else None
        self.pool = Pool(config, self.metrics)
        self.limits = Limits(config)
        self.address_filter = AddressFilter.from_lists(config.allow_cidr, config.deny_cidr)
        self.sessions: set[ClientSession] = set()
        self.stopping = False
        self._paused: dict[str, Event] = {}  # vhost -> event set on resume
        self._stopped = Event()
        self._server: StreamServer | None = None
        self._tls_server: StreamServer | None = None  # --tls-listen
        self._tls_context: ssl.SSLContext | None = None  # the TLS listener's, as of the last reload
        self._admin: AdminServer | None = None
        self._janitor: gevent.Greenlet | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        listener = _listen(self.config.listen, self.config.backlog)
        self._server = StreamServer(listener, self._handle, spawn=HandlerGreenlets())
        self._server.start()
        if self.config.tls_listen is not None:
            self._tls_context = self.config.tls_server
            self._tls_server = StreamServer(
                _listen(self.config.tls_listen, self.config.backlog), self._handle_tls, spawn=HandlerGreenlets()
            )
            self._tls_server.start()
        admin_address = self.admin_socket or self.config.http_listen
        if admin_address is not None:
            self._admin = AdminServer(self, admin_address)
            self._admin.start()
        self._janitor = gevent.spawn(self._janitor_loop)
        log.info(
            "amqproxy started",
            extra={
                "event": "start",
                "version": __version__,
                "implementation": accel.implementation(),
                "listen": "{}:{}".format(*self.config.listen),
                "tls_listen": "{}:{}".format(*self.config.tls_listen) if self.config.tls_listen else None,
                "upstreams": [node.label for node in self.config.upstream],
                "http_listen": "{}:{}".format(*self.config.http_listen) if self.config.http_listen else None,
            },
        )

        stale = accel.sources_instead_of_extensions()
        if stale:
            log.warning(
                "compiled modules older than their sources: these run as Python (rebuild with "
                "`python setup.py build_ext --inplace` or reinstall)",
                extra={"event": "stale_extensions", "modules": stale},
            )

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.address  # type: ignore[no-any-return]

    def serve_forever(self) -> None:
        gevent.signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
        gevent.signal_handler(signal.SIGINT, self.stop, "SIGINT")
        gevent.signal_handler(signal.SIGHUP, self._reload_on_signal)
        self._stopped.wait()

    def stop(self, why: str = "stop") -> None:
        """Drain: stop accepting, let clients finish for --drain-timeout, then 320 to the rest,
        close upstreams with 200 and return. A second signal exits at once."""
        if self.stopping:
            log.warning("second stop signal: exiting now", extra={"event": "stop_forced"})
            logging.shutdown()
            os._exit(1)
        self.stopping = True
        gevent.spawn(self._stop, why)

    def _stop(self, why: str) -> None:
        # /readyz answers 503 from the signal on (self.stopping). A balancer that health-checks it
        # stops sending new clients within its check interval: keep accepting until then, or the
        # connections it still sends meanwhile would be refused (or reset in the accept queue).
        delay = self.config.shutdown_delay
        if delay > 0:
            log.info(
                "not ready, still accepting",
                extra={"event": "shutdown_delay", "signal": why, "clients": len(self.sessions), "delay_s": delay},
            )
            gevent.sleep(delay)
        if self._server is not None:
            self._server.close()  # no new clients
        if self._tls_server is not None:
            self._tls_server.close()
        log.info(
            "amqproxy draining",
            extra={
                "event": "drain_start",
                "signal": why,
                "clients": len(self.sessions),
                "channels": self._channel_count(),
                "drain_timeout_s": self.config.drain_timeout,
            },
        )
        now = time.monotonic()
        deadline = now + self.config.drain_timeout
        next_report = now + DRAIN_REPORT_INTERVAL
        while self.sessions and now < deadline:
            gevent.sleep(0.05)
            now = time.monotonic()
            if now >= next_report:
                next_report = now + DRAIN_REPORT_INTERVAL
                log.info(
                    "draining",
                    extra={
                        "event": "drain_progress",
                        "clients": len(self.sessions),
                        "channels": self._channel_count(),
                        "remaining_s": round(max(0.0, deadline - now), 1),
                    },
                )
        if self.sessions:
            log.info(
                "drain timeout: closing the remaining clients",
                extra={"event": "drain_timeout", "clients": len(self.sessions)},
            )
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
        log.info("amqproxy stopped", extra={"event": "stopped"})
        self._stopped.set()

    def _channel_count(self) -> int:
        return sum(len(session.channels) for session in list(self.sessions))

    # ------------------------------------------------------------------ pause / resume

    def pause(self, vhost: str) -> None:
        """Hold new clients of `vhost` at Connection.Open (bounded by --pause-timeout); existing
        clients carry on. For broker maintenance without errors."""
        if vhost not in self._paused:
            self._paused[vhost] = Event()
            log.warning("vhost paused", extra={"event": "vhost_pause", "vhost": vhost})

    def resume(self, vhost: str) -> None:
        event = self._paused.pop(vhost, None)
        if event is not None:
            event.set()
            log.warning("vhost resumed", extra={"event": "vhost_resume", "vhost": vhost})

    def paused_vhosts(self) -> list[str]:
        return list(self._paused)

    def wait_if_paused(self, vhost: str) -> bool:
        """Called at a client's Connection.Open: False if the vhost stayed paused for too long."""
        event = self._paused.get(vhost)
        if event is None:
            return True
        return bool(event.wait(self.config.pause_timeout))

    # ------------------------------------------------------------------ reload

    def _reload_on_signal(self) -> None:
        gevent.spawn(self.reload, "SIGHUP")

    def reload(self, origin: str) -> dict[str, Any]:
        """Re-read the configuration from its sources; apply it only if all of it is valid.

        Returns {"result": applied | needs_restart | rejected, ...}. Options that need a restart
        keep their running value and are listed; everything else changes live (new clients and
        connections see it; limits, nodes, breakers and log level at once)."""
        argv, env = self.config.sources
        try:
            new = parse_config(argv, env)
        except ConfigError as exc:
            RELOADS.labels("rejected").inc()
            log.error(
                "configuration reload rejected; the running configuration stays",
                extra={"event": "reload", "origin": origin, "result": "rejected", "problems": exc.problems},
            )
            return {"result": "rejected", "problems": exc.problems, "needs_restart": []}
        restart = restart_only_changes(self.config, new)
        for option in OPTIONS:
            if not option.reloadable:
                setattr(new, option.name, getattr(self.config, option.name))
        changed = [o.flag for o in OPTIONS if getattr(self.config, o.name) != getattr(new, o.name)]
        self.config = new
        self.pool.reconfigure(new)
        self.limits.configure(new)
        self.address_filter = AddressFilter.from_lists(new.allow_cidr, new.deny_cidr)
        setup_logging(new.log_level, new.log_format)
        result = "needs_restart" if restart else "applied"
        RELOADS.labels(result).inc()
        log.warning(
            "configuration reloaded",
            extra={"event": "reload", "origin": origin, "result": result, "changed": changed, "needs_restart": restart},
        )
        return {"result": result, "changed": changed, "needs_restart": restart, "problems": []}

    # ------------------------------------------------------------------ clients

    def _handle(self, sock: socket.socket, address: tuple) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = ClientSession(self, sock, address, self.sessions.discard)
        self.sessions.add(session)
        session.run()

    def _handle_tls(self, sock: socket.socket, address: tuple) -> None:
        """--tls-listen: the TLS handshake in this client's greenlet, with the certificate of the
        configuration current now (a reload changes it for new clients only); a failure is logged
        once, counted, and ends only this connection."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._address_denied_before_tls(address):
            return
        # A reload that turned --tls-listen off (needs a restart) built no context: keep the last one.
        self._tls_context = self.config.tls_server or self._tls_context
        assert self._tls_context is not None
        try:
            tls_sock, peer, source = tls.accept(sock, address, self.config, self._tls_context)
        except tls.HandshakeFailed as exc:
            self.metrics.client_refused("tls_handshake")
            log.warning(
                "client TLS handshake failed",
                extra={"event": "tls_handshake_failed", "remote": f"{address[0]}:{address[1]}", "error": str(exc)},
            )
            return
        try:
            # A PROXY header before the TLS bytes named the real client: `source`.
            session = ClientSession(self, tls_sock, address, self.sessions.discard, tls=peer, source=source)
            self.sessions.add(session)
            session.run()
        finally:
            tls_sock.close()

    def _address_denied_before_tls(self, address: tuple) -> bool:
        """--allow-cidr/--deny-cidr before the TLS handshake, so a denied address costs no crypto.
        A trusted PROXY-protocol source is checked later, by the address its header names."""
        host = str(address[0])
        if self.config.accept_proxy_protocol and proxyproto.trusted(host, self.config.proxy_protocol_from):
            return False
        denied = self.address_filter.check(host)
        if denied is None:
            return False
        self.metrics.access_denied(denied)
        self.metrics.client_refused("access")
        log.warning(
            "client address refused",
            extra={"event": "access_denied", "remote": f"{address[0]}:{address[1]}", "reason": denied},
        )
        return True

    @property
    def tls_address(self) -> tuple[str, int] | None:
        return self._tls_server.address if self._tls_server is not None else None

    # ------------------------------------------------------------------ live state (metrics.LiveSource)

    def live_clients(self) -> Iterator[tuple[str, str, int]]:
        for session in list(self.sessions):
            if session.vhost is not None:  # past its handshake
                yield session.vhost, session.username, len(session.channels)

    def live_upstreams(self) -> Iterator[tuple[str, str, int, str, str]]:
        pool = self.pool
        for upstream in pool.all_upstreams() + list(pool.closing):
            user, _password, vhost = upstream.key
            yield upstream.node.label, upstream.state.value, len(upstream.links), vhost, user

    def live_nodes(self) -> Iterator[tuple[str, str]]:
        for state in self.pool.nodes.states:
            yield state.node.label, state.breaker.state

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
                if self._metrics_bridge is not None:
                    self._metrics_bridge.sync()
            except Exception:  # the janitor must survive anything one connection does
                log.exception("janitor error", extra={"event": "janitor_error"})


def _listen(address: tuple[str, int], backlog: int) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        # A new instance can bind the same port while this one drains (zero-downtime restarts).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
