"""The operator's status page on the admin listener (GET / and /status): the static files of
amqproxy/status/, served alike by a proxy's AdminServer and by the --workers supervisor.

The page carries no data. Its script polls the JSON endpoints (/healthz, /readyz, /stats,
/upstreams, /vhosts, /limits; under --workers the supervisor's merged answers) and builds the
DOM with text nodes only, so user names and vhosts, which are client input, never become markup;
a Content-Security-Policy that allows only the proxy's own script and style sheet backs that up.
Everything is served from the package: no build step, nothing from elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

StartResponse = Callable[..., Any]

# path -> (file in amqproxy/status/, content type)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/status": ("index.html", "text/html; charset=utf-8"),
    "/status/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/status/status.css": ("status.css", "text/css; charset=utf-8"),
}
PATHS = tuple(FILES)
# The page itself needs the admin token when one is set; its script and style sheet hold no data.
PROTECTED = frozenset({"/", "/status"})

HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
]
BASIC_CHALLENGE = ("WWW-Authenticate", 'Basic realm="amqproxy admin", charset="UTF-8"')


@functools.cache
def _read(name: str) -> bytes:
    return resources.files("amqproxy").joinpath("status", name).read_bytes()


def serve(environ: dict[str, Any], start_response: StartResponse, authorized: bool) -> Iterable[bytes]:
    """Answer GET for one of PATHS. `authorized`: the request may see the page (no token is
    configured, or it presented the token); otherwise a browser is asked for the token."""
    path = environ.get("PATH_INFO", "/")
    if path in PROTECTED and not authorized:
        body = b"401 Unauthorized: the status page needs the admin token, as the password (any user name)\n"
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), BASIC_CHALLENGE]
        start_response("401 Unauthorized", headers + HEADERS)
        return [body]
    name, content_type = FILES[path]
    body = _read(name)
    start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))] + HEADERS)
    return [body]
