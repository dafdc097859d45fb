"""Admin HTTP API on --http-listen: health, readiness, metrics, and the operator's views.

Off the data path (gevent WSGI greenlets). JSON answers with stable field names; unknown paths
are 404, wrong methods 405. Endpoints that change state or expose internals (DELETE
/connections/<id>, PUT /log-level, /debug/*) require `Authorization: Bearer <--admin-token>`
when a token is configured. Nothing here ever shows a password.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

import gevent
from gevent import monkey
from gevent.pywsgi import WSGIServer
from gevent.util import format_run_info
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from .logsetup import LEVELS
from .protocol import constants as c
from .upstream import Upstream

if TYPE_CHECKING:
    from .channel import Link
    from .client import ClientSession
    from .config import Config
    from .pool import Pool

log = logging.getLogger("amqproxy.admin")

MAX_PROFILE_SECONDS = 60
_PROFILE_INTERVAL = 0.005

StartResponse = Callable[..., Any]


class AdminTarget(Protocol):
    """What the admin API reads and controls of the proxy (server.Proxy)."""

    @property
    def config(self) -> Config: ...

    @property
    def pool(self) -> Pool: ...

    @property
    def sessions(self) -> set[ClientSession]: ...

    @property
    def stopping(self) -> bool:
        """Draining: /readyz answers 503."""

    def reload(self, origin: str) -> dict[str, Any]: ...

    def pause(self, vhost: str) -> None: ...

    def resume(self, vhost: str) -> None: ...

    def paused_vhosts(self) -> list[str]: ...


class HTTPError(Exception):
    def __init__(self, status: str, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class AdminServer:
    def __init__(self, proxy: AdminTarget, address: tuple[str, int] | str) -> None:
        """`address` is host and port, or the path of a unix socket (a worker under --workers)."""
        self.proxy = proxy
        listener: tuple[str, int] | socket.socket = address if isinstance(address, tuple) else _unix_listener(address)
        self._server = WSGIServer(listener, self._app, log=None, error_log=log)
        # path -> {method: (handler, needs_token)}; "/connections/" routes by prefix.
        self._routes: dict[str, dict[str, tuple[Callable[..., Any], bool]]] = {
            "/healthz": {"GET": (self._healthz, False)},
            "/readyz": {"GET": (self._readyz, False)},
            "/metrics": {"GET": (self._metrics, False)},
            "/stats": {"GET": (self._stats, False)},
            "/connections": {"GET": (self._connections, False)},
            "/connections/": {"GET": (self._connection, False), "DELETE": (self._kill_connection, True)},
            "/upstreams": {"GET": (self._upstreams, False)},
            "/log-level": {"GET": (self._get_log_level, False), "PUT": (self._set_log_level, True)},
            "/reload": {"POST": (self._reload, True)},
            "/vhosts": {"GET": (self._paused_vhosts, False)},
            "/vhosts/pause": {"POST": (self._pause, True)},
            "/vhosts/resume": {"POST": (self._resume, True)},
            "/debug/greenlets": {"GET": (self._greenlets, True)},
            "/debug/profile": {"GET": (self._profile, True)},
        }

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address  # type: ignore[no-any-return]

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(timeout=1)

    # ------------------------------------------------------------------ dispatch

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            routes = self._routes.get(path)
            argument = None
            if routes is None and path.startswith("/connections/") and path.count("/") == 2:
                routes, argument = self._routes["/connections/"], path.rsplit("/", 1)[1]
            if routes is None:
                raise HTTPError("404 Not Found", f"no such endpoint: {path}")
            if method == "HEAD" and "GET" in routes:
                method = "GET"
            if method not in routes:
                allow = ", ".join(sorted(routes))
                raise HTTPError("405 Method Not Allowed", f"{method} not allowed on {path}", [("Allow", allow)])
            handler, needs_token = routes[method]
            if needs_token:
                self._check_token(environ)
            query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
            if argument is not None:
                return handler(start_response, query, environ, argument)  # type: ignore[no-any-return]
            return handler(start_response, query, environ)  # type: ignore[no-any-return]
        except HTTPError as exc:
            return _json(start_response, exc.status, {"error": exc.message}, exc.headers)

    def _check_token(self, environ: dict[str, Any]) -> None:
        refusal = token_refusal(environ, self.proxy.config.admin_token)
        if refusal is not None:
            raise refusal

    # ------------------------------------------------------------------ health

    def _healthz(
        self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]
    ) -> Iterable[bytes]:
        return _json(start_response, "200 OK", {"status": "ok", "clients": len(self.proxy.sessions)})

    def _readyz(self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]) -> Iterable[bytes]:
        reasons = []
        if self.proxy.stopping:
            reasons.append("draining: the proxy is shutting down")
        elif not self.proxy.pool.ready():
            reasons.append("no upstream node usable: every circuit breaker is open")
        if reasons:
            return _json(start_response, "503 Service Unavailable", {"ready": False, "reasons": reasons})
        return _json(start_response, "200 OK", {"ready": True, "reasons": []})

    def _metrics(
        self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]
    ) -> Iterable[bytes]:
        body = generate_latest(REGISTRY)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
        return [body]

    # ------------------------------------------------------------------ operator views

    def _stats(self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]) -> Iterable[bytes]:
        """Per credential set, like a pooler's SHOW POOLS."""
        pools: dict[tuple[str, str], dict[str, Any]] = {}

        def entry(vhost: str, user: str) -> dict[str, Any]:
            return pools.setdefault(
                (vhost, user),
                {
                    "vhost": vhost,
                    "user": user,
                    "clients": 0,
                    "client_channels": 0,
                    "upstream_connections": {"in_use": 0, "idle": 0},
                    "upstream_channels": 0,
                    "nodes": {},
                },
            )

        for session in list(self.proxy.sessions):
            if session.vhost is not None:
                item = entry(session.vhost, session.username)
                item["clients"] += 1
                item["client_channels"] += len(session.channels)
        for upstream in self.proxy.pool.all_upstreams():
            user, _password, vhost = upstream.key
            item = entry(vhost, user)
            item["upstream_connections"]["in_use" if upstream.links else "idle"] += 1
            item["upstream_channels"] += len(upstream.links)
            item["nodes"][upstream.node.label] = item["nodes"].get(upstream.node.label, 0) + 1
        items = sorted(pools.values(), key=lambda p: (p["vhost"], p["user"]))
        totals = {
            "clients": sum(p["clients"] for p in items),
            "client_channels": sum(p["client_channels"] for p in items),
            "upstream_connections": sum(sum(p["upstream_connections"].values()) for p in items),
            "upstream_channels": sum(p["upstream_channels"] for p in items),
            "handshaking_clients": sum(1 for s in list(self.proxy.sessions) if s.vhost is None),
        }
        return _json(start_response, "200 OK", {"pools": items, "totals": totals})

    def _connections(
        self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]
    ) -> Iterable[bytes]:
        sessions = sorted(self.proxy.sessions, key=lambda s: s.opened_at)
        return _json(start_response, "200 OK", {"connections": [_describe(s) for s in sessions]})

    def _find(self, connection_id: str) -> ClientSession:
        for session in self.proxy.sessions:
            if session.id == connection_id:
                return session
        raise HTTPError("404 Not Found", f"no client connection {connection_id}")

    def _connection(
        self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any], connection_id: str
    ) -> Iterable[bytes]:
        session = self._find(connection_id)
        detail = _describe(session)
        detail["channels"] = [
            {
                "channel": link.client_channel,
                "upstream_id": link.upstream.id if isinstance(link.upstream, Upstream) else None,
                "upstream_channel": link.upstream_channel or None,
                "role": link.upstream.role if isinstance(link.upstream, Upstream) else None,
                "closing": link.closing,
            }
            for link in sorted(session.channels.values(), key=lambda link: link.client_channel)
        ]
        detail["capabilities"] = sorted(session.capabilities)
        detail["heartbeat"] = session.heartbeat
        detail["channel_max"] = session.channel_max
        detail["frame_max"] = session.max_body + c.FRAME_OVERHEAD
        return _json(start_response, "200 OK", detail)

    def _kill_connection(
        self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any], connection_id: str
    ) -> Iterable[bytes]:
        session = self._find(connection_id)
        reason = query.get("reason", "closed by an administrator")[:200]
        session.close_connection(c.CONNECTION_FORCED, f"CONNECTION_FORCED - {reason}", kind="admin")
        log.warning(
            "client connection closed through the admin API",
            extra={"event": "admin_close", "client_id": session.id, "reason": reason},
        )
        return _json(start_response, "200 OK", {"closed": session.id, "reply_code": 320, "reason": reason})

    def _upstreams(
        self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]
    ) -> Iterable[bytes]:
        now = time.monotonic()
        pool = self.proxy.pool
        nodes = []
        for state in pool.nodes.states:
            breaker = state.breaker
            nodes.append(
                {
                    "node": state.node.label,
                    "tls": state.node.tls,
                    "breaker": breaker.state,
                    "breaker_open_for_s": round(max(0.0, breaker.open_until - now), 3)
                    if breaker.state == "open"
                    else 0.0,
                    "consecutive_failures": breaker.consecutive_failures,
                    "connections": state.connections,
                    "last_error": state.last_error or None,
                    "last_error_age_s": round(now - state.last_error_at, 3) if state.last_error_at else None,
                    "retired": state.retired,
                }
            )
        connections = []
        for upstream in sorted(pool.all_upstreams() + list(pool.closing), key=lambda u: u.id):
            user, _password, vhost = upstream.key
            connections.append(
                {
                    "id": upstream.id,
                    "node": upstream.node.label,
                    "name": upstream.name,
                    "vhost": vhost,
                    "user": user,
                    "state": upstream.state,
                    "role": upstream.role,
                    "channels": len(upstream.links),
                    "clients": len(upstream.clients()),
                    "age_s": round(now - upstream.created, 3),
                    "idle_s": round(now - upstream.idle_since, 3) if not upstream.links else 0.0,
                    "blocked": upstream.blocked_reason,
                    "channel_max": upstream.channel_max,
                    "frame_max": upstream.frame_max,
                    "heartbeat": upstream.heartbeat,
                }
            )
            if query.get("channels") in ("1", "true"):
                connections[-1]["channel_list"] = [_describe_link(link) for link in upstream.links.values()]
        return _json(start_response, "200 OK", {"nodes": nodes, "connections": connections})

    # ------------------------------------------------------------------ runtime controls and debugging

    def _reload(self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]) -> Iterable[bytes]:
        result = self.proxy.reload("admin API")
        status = "400 Bad Request" if result["result"] == "rejected" else "200 OK"
        return _json(start_response, status, result)

    def _paused_vhosts(
        self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]
    ) -> Iterable[bytes]:
        return _json(start_response, "200 OK", {"paused": sorted(self.proxy.paused_vhosts())})

    def _pause(self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]) -> Iterable[bytes]:
        """POST /vhosts/pause?vhost=<vhost>: hold that vhost's new clients at Connection.Open."""
        vhost = _vhost_argument(query)
        self.proxy.pause(vhost)
        return _json(start_response, "200 OK", {"vhost": vhost, "paused": True})

    def _resume(self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]) -> Iterable[bytes]:
        vhost = _vhost_argument(query)
        self.proxy.resume(vhost)
        return _json(start_response, "200 OK", {"vhost": vhost, "paused": False})

    def _get_log_level(
        self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]
    ) -> Iterable[bytes]:
        level = logging.getLevelName(logging.getLogger().level).lower()
        return _json(start_response, "200 OK", {"level": level})

    def _set_log_level(
        self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]
    ) -> Iterable[bytes]:
        level = query.get("level")
        if level is None:
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0) or 0)
            try:
                level = json.loads(body or b"{}").get("level")
            except (ValueError, AttributeError):
                raise HTTPError("400 Bad Request", 'expected {"level": "debug|info|warning|error"}') from None
        level = str(level or "").lower()
        if level not in LEVELS:
            raise HTTPError("400 Bad Request", f"level must be one of {', '.join(LEVELS)}")
        logging.getLogger().setLevel(LEVELS[level])
        log.warning("log level changed", extra={"event": "log_level", "level": level})
        return _json(start_response, "200 OK", {"level": level})

    def _greenlets(
        self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]
    ) -> Iterable[bytes]:
        text = "\n".join(format_run_info()).encode()
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(text)))])
        return [text]

    def _profile(
        self, start_response: StartResponse, query: dict[str, str], environ: dict[str, Any]
    ) -> Iterable[bytes]:
        """Sample the running proxy's stack from a native thread for N seconds (?seconds=, default 5)."""
        try:
            seconds = float(query.get("seconds", "5"))
        except ValueError:
            raise HTTPError("400 Bad Request", "seconds must be a number") from None
        if not 0 < seconds <= MAX_PROFILE_SECONDS:
            raise HTTPError("400 Bad Request", f"seconds must be in (0, {MAX_PROFILE_SECONDS}]")
        result = _sample_stacks(seconds)
        return _json(start_response, "200 OK", result)


def _sample_stacks(seconds: float) -> dict[str, Any]:
    """Count which functions the main (gevent) thread is running, sampled every 5 ms."""
    start_thread = monkey.get_original("_thread", "start_new_thread")
    get_ident = monkey.get_original("_thread", "get_ident")
    real_sleep = monkey.get_original("time", "sleep")
    main_ident = get_ident()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    state = {"samples": 0, "done": False}

    def sampler() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(main_ident)
            if frame is not None:
                state["samples"] += 1
                seen = set()
                leaf = True
                while frame is not None:
                    code = frame.f_code
                    name = f"{code.co_name} ({code.co_filename}:{code.co_firstlineno})"
                    if leaf:
                        own[name] += 1
                        leaf = False
                    if name not in seen:
                        inclusive[name] += 1
                        seen.add(name)
                    frame = frame.f_back
            real_sleep(_PROFILE_INTERVAL)
        state["done"] = True

    start_thread(sampler, ())
    while not state["done"]:
        gevent.sleep(0.05)
    samples = state["samples"] or 1
    return {
        "seconds": seconds,
        "samples": state["samples"],
        "interval_s": _PROFILE_INTERVAL,
        "self": [{"function": f, "share": round(n / samples, 4)} for f, n in own.most_common(40)],
        "inclusive": [{"function": f, "share": round(n / samples, 4)} for f, n in inclusive.most_common(40)],
    }


def token_refusal(environ: dict[str, Any], token: str | None) -> HTTPError | None:
    """Why a request may not use a token-protected endpoint, or None when it may (also used by
    the --workers supervisor, which answers some of those endpoints itself)."""
    if not token:
        return None
    header = environ.get("HTTP_AUTHORIZATION", "")
    if not header.startswith("Bearer "):
        return HTTPError("401 Unauthorized", "this endpoint needs Authorization: Bearer <admin token>",
                         [("WWW-Authenticate", "Bearer")])  # fmt: skip
    if not hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        return HTTPError("403 Forbidden", "wrong admin token")
    return None


def _unix_listener(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by a worker that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def _vhost_argument(query: dict[str, str]) -> str:
    if "vhost" not in query:
        raise HTTPError("400 Bad Request", "give the vhost as ?vhost=<name> (percent-encoded, e.g. %2F for /)")
    return query["vhost"]


def _describe_link(link: Link) -> dict[str, Any]:
    """One upstream channel: whose it is and how far its close has got on each side (a channel
    that never leaves an upstream's table is found here)."""
    return {
        "upstream_channel": link.upstream_channel,
        "client": link.client.id if link.client is not None else None,
        "client_channel": link.client_channel,
        "role": link.role,
        "closing": link.closing,
        "close": {"client": link.client_side.value, "upstream": link.upstream_side.value},
        "awaiting_open_ok": link.waiter is not None,
        "replay": link.replay is not None,
    }


def _describe(session: ClientSession) -> dict[str, Any]:
    now = time.monotonic()
    upstream_ids = sorted(
        {link.upstream.id for link in session.channels.values() if isinstance(link.upstream, Upstream)}
    )
    return {
        "id": session.id,
        "user": session.username or None,
        "vhost": session.vhost,
        "remote": session.address,
        "proxied_by": session.proxied_by,
        "state": "closing" if session.closing else ("open" if session.vhost is not None else "handshake"),
        "channels": len(session.channels),
        "bytes_in": session.bytes_in,
        "bytes_out": session.bytes_out,
        "messages_in": session.messages_in,
        "messages_out": session.messages_out,
        "age_s": round(now - session.opened_at, 3),
        "upstream_ids": upstream_ids,
    }


def _json(
    start_response: StartResponse, status: str, payload: dict[str, Any], headers: list[tuple[str, str]] | None = None
) -> Iterable[bytes]:
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))] + (headers or []))
    return [body]
