"""Admin HTTP API on --http-listen: /healthz and /metrics (gevent WSGI, off the data path)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from gevent.pywsgi import WSGIServer
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

if TYPE_CHECKING:
    from .server import Proxy

log = logging.getLogger("amqproxy.admin")


class AdminServer:
    def __init__(self, proxy: Proxy, address: tuple[str, int]) -> None:
        self.proxy = proxy
        self._server = WSGIServer(address, self._app, log=None, error_log=log)

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(timeout=1)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        routes = {"/healthz": self._healthz, "/metrics": self._metrics}
        handler = routes.get(path)
        if handler is None:
            return _json(start_response, "404 Not Found", {"error": "not found", "path": path})
        if method not in ("GET", "HEAD"):
            return _json(start_response, "405 Method Not Allowed", {"error": "method not allowed"}, [("Allow", "GET")])
        return handler(start_response)

    def _healthz(self, start_response: Callable[..., Any]) -> Iterable[bytes]:
        return _json(start_response, "200 OK", {"status": "ok", "clients": len(self.proxy.sessions)})

    def _metrics(self, start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.proxy.metrics.refresh()
        body = generate_latest(REGISTRY)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
        return [body]


def _json(
    start_response: Callable[..., Any], status: str, payload: dict[str, Any], headers: list | None = None
) -> Iterable[bytes]:
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))] + (headers or []))
    return [body]
