"""TLS: the SSL contexts for clients (ingress, optional mTLS) and for brokers (egress, amqps://).

Contexts are built from the options when the configuration is parsed, so a reload (SIGHUP,
POST /reload) that re-reads the certificate files yields new contexts; the TLS listener and
the dial path take the context of the configuration current at each new connection, and
connections already open keep theirs. Broken files fail at start (exit 2) or reject a reload.

Handshakes run in the connection's own greenlet (client: within --handshake-timeout; broker:
within --connect-timeout); a failed client handshake is logged once and counted, and never
touches another connection.

Sockets come from gevent's SSL layer with one change: `send(data, 0, 0.0)` really does not
block. The outbox relies on that (a slow TLS client must grow its own outbox, not stall the
upstream reader that feeds it); gevent's SSLSocket waits for the socket whatever the timeout.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import gevent
from gevent import ssl as gssl
from gevent.socket import timeout_default

from .protocol import proxyproto

if TYPE_CHECKING:
    import ipaddress

    from .nodes import Node

log = logging.getLogger("amqproxy.tls")

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# RFC 4514 short names for the attributes Python's getpeercert() spells out.
_DN_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


class TLSSettings(Protocol):
    """The settings TLS is built from (config.Config has them all); `load` sets the contexts."""

    tls_listen: tuple[str, int] | None
    tls_cert: str
    tls_key: str
    tls_ca: str
    tls_verify_client: str
    tls_min_version: str
    tls_ciphers: str
    upstream: list[Node]
    upstream_tls_ca: str
    upstream_tls_cert: str
    upstream_tls_key: str
    upstream_tls_verify_hostname: bool
    upstream_tls_server_name: str
    accept_proxy_protocol: bool
    proxy_protocol_from: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    handshake_timeout: float
    tls_server: ssl.SSLContext | None
    tls_upstream: ssl.SSLContext | None


class TLSConfigError(ValueError):
    """A TLS option cannot be used (missing or unreadable file, bad key, ...); names the option."""


class NonBlockingSendSSLSocket(gssl.SSLSocket):
    """gevent's SSLSocket whose send(..., timeout=0.0) returns 0 instead of waiting for room."""

    def send(self, data: Any, flags: int = 0, timeout: Any = timeout_default) -> int:
        sslobj = self._sslobj
        if timeout == 0.0 and sslobj is not None and flags == 0:
            try:
                return int(sslobj.write(data))
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return 0
        return int(super().send(data, flags, timeout))


class _Context(gssl.SSLContext):
    __slots__ = ()
    sslsocket_class = NonBlockingSendSSLSocket


@dataclass(frozen=True)
class PeerInfo:
    """What a TLS client presented: empty strings when it sent no (verified) certificate."""

    version: str
    cipher: str
    subject_dn: str = ""
    subject_cn: str = ""


# ---------------------------------------------------------------------------- contexts


def check_private_file(path: str, flag: str) -> None:
    """Secrets (keys, password files, auth files) must not be readable by everyone."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise TLSConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    if mode & stat.S_IROTH:
        raise TLSConfigError(f"{flag}: {path} is readable by everyone (mode {stat.S_IMODE(mode):o}); chmod o-r it")


def server_context(config: TLSSettings) -> ssl.SSLContext:
    """The context of the client TLS listener (--tls-*)."""
    if not config.tls_cert or not config.tls_key:
        raise TLSConfigError("--tls-cert: --tls-listen needs --tls-cert and --tls-key")
    ctx = _Context(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[config.tls_min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if config.tls_ciphers:
        try:
            ctx.set_ciphers(config.tls_ciphers)
        except ssl.SSLError:
            raise TLSConfigError(f"--tls-ciphers: no usable cipher in {config.tls_ciphers!r}") from None
    check_private_file(config.tls_key, "--tls-key")
    _load_chain(ctx, config.tls_cert, config.tls_key, "--tls-cert")
    if config.tls_verify_client != "none":
        if not config.tls_ca:
            raise TLSConfigError(f"--tls-ca: --tls-verify-client {config.tls_verify_client} needs a CA file")
        _load_ca(ctx, config.tls_ca, "--tls-ca")
        ctx.verify_mode = ssl.CERT_REQUIRED if config.tls_verify_client == "required" else ssl.CERT_OPTIONAL
    elif config.tls_ca:
        _load_ca(ctx, config.tls_ca, "--tls-ca")
    return ctx


def upstream_context(config: TLSSettings) -> ssl.SSLContext:
    """The context of amqps:// upstream connections (--upstream-tls-*): verifies the broker's
    certificate (system CAs unless --upstream-tls-ca) and, by default, its host name."""
    ctx = _Context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.upstream_tls_ca:
        _load_ca(ctx, config.upstream_tls_ca, "--upstream-tls-ca")
    else:
        ctx.load_default_certs()
    if config.upstream_tls_cert or config.upstream_tls_key:
        if not (config.upstream_tls_cert and config.upstream_tls_key):
            raise TLSConfigError("--upstream-tls-cert: needs --upstream-tls-key too (and the other way round)")
        check_private_file(config.upstream_tls_key, "--upstream-tls-key")
        _load_chain(ctx, config.upstream_tls_cert, config.upstream_tls_key, "--upstream-tls-cert")
    ctx.check_hostname = config.upstream_tls_verify_hostname
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str, flag: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TLSConfigError(f"{flag}: cannot read {exc.filename or cert}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"{flag}: cannot load certificate {cert} with key {key}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, path: str, flag: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise TLSConfigError(f"{flag}: cannot read {path}: no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"{flag}: cannot load CA certificates from {path}: {exc}") from None


def load(config: TLSSettings) -> list[str]:
    """Build the contexts the configuration asks for into `config`; returns the problems."""
    problems = []
    if config.tls_listen is not None:
        try:
            config.tls_server = server_context(config)
        except TLSConfigError as exc:
            problems.append(str(exc))
    wants_upstream = any(node.tls for node in config.upstream) or config.upstream_tls_cert or config.upstream_tls_ca
    if wants_upstream:
        try:
            config.tls_upstream = upstream_context(config)
        except TLSConfigError as exc:
            problems.append(str(exc))
    return problems


# ---------------------------------------------------------------------------- connections


class HandshakeFailed(Exception):
    """A client's TLS handshake (or the PROXY header before it) failed; the text says why."""


class _Timeout(Exception):
    pass


def accept(
    sock: socket.socket, address: tuple[Any, ...], config: TLSSettings, ctx: ssl.SSLContext
) -> tuple[ssl.SSLSocket, PeerInfo, tuple[str, int] | None]:
    """The TLS listener's side of a new client, within --handshake-timeout: a PROXY header first
    when --accept-proxy-protocol trusts the source (it precedes the TLS bytes), then the TLS
    handshake with `ctx` (the current configuration's). Returns the TLS socket, what the client
    presented and the PROXY header's source address (None without one); raises HandshakeFailed."""
    source = None
    tls_sock = None
    try:
        with gevent.Timeout(config.handshake_timeout, _Timeout()):
            if config.accept_proxy_protocol and proxyproto.trusted(str(address[0]), config.proxy_protocol_from):
                source = _read_proxy_header(sock)
            tls_sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            tls_sock.do_handshake()
    except _Timeout:
        _close(tls_sock)
        raise HandshakeFailed("handshake timeout") from None
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; ProxyHeaderError a ValueError
        _close(tls_sock)
        raise HandshakeFailed(describe(exc)) from None
    cert = tls_sock.getpeercert() or {}
    cipher = tls_sock.cipher()
    peer = PeerInfo(
        version=tls_sock.version() or "",
        cipher=cipher[0] if cipher else "",
        subject_dn=subject_dn(cert),
        subject_cn=subject_cn(cert),
    )
    return tls_sock, peer, source


def _read_proxy_header(sock: socket.socket) -> tuple[str, int] | None:
    """Read exactly one PROXY v1/v2 header off the plain socket (not one byte of the TLS
    ClientHello behind it); return its source address."""
    data = _recv_exact(sock, 15)  # "PROXY UNKNOWN\r\n", the shortest header, is 15 bytes
    if data.startswith(proxyproto.V2_SIGNATURE[:12]):
        data += _recv_exact(sock, 1)
        data += _recv_exact(sock, int.from_bytes(data[14:16], "big"))
    elif not data.startswith(proxyproto.V1_PREFIX):
        raise proxyproto.ProxyHeaderError("expected a PROXY protocol header")
    else:
        while not data.endswith(b"\r\n"):
            if len(data) >= proxyproto.V1_MAX:
                raise proxyproto.ProxyHeaderError("PROXY v1 line too long")
            data += _recv_exact(sock, 1)
    result = proxyproto.parse(data)
    if result is None or result[0] != len(data):
        raise proxyproto.ProxyHeaderError("malformed PROXY protocol header")
    return result[1]


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("client closed before the TLS handshake")
        data += chunk
    return data


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        detail = getattr(exc, "verify_message", None)  # SSLCertVerificationError: why the peer's cert failed
        return f"{exc.reason}: {detail}" if detail else str(exc.reason)
    return str(exc) or exc.__class__.__name__


def wrap_upstream(sock: socket.socket, node: Node, config: TLSSettings) -> socket.socket:
    """TLS to an amqps:// node (after anything sent in the clear, such as a PROXY header).
    SNI and host name verification use --upstream-tls-server-name, else the node's host."""
    if not node.tls:
        return sock
    ctx = config.tls_upstream
    if ctx is None:
        ctx = config.tls_upstream = upstream_context(config)
    return ctx.wrap_socket(sock, server_hostname=config.upstream_tls_server_name or node.host)


# ---------------------------------------------------------------------------- subjects


def _rdns(cert: dict[str, Any]) -> list[list[tuple[str, str]]]:
    return [[(str(k), str(v)) for k, v in rdn] for rdn in cert.get("subject", ())]


def subject_dn(cert: dict[str, Any]) -> str:
    """The subject as an RFC 4514 string, most specific first ("CN=app,O=Example,C=DE"), the way
    `openssl x509 -noout -subject -nameopt RFC2253` prints it."""
    parts = []
    for rdn in reversed(_rdns(cert)):
        parts.append("+".join(f"{_DN_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(parts)


def subject_cn(cert: dict[str, Any]) -> str:
    for rdn in reversed(_rdns(cert)):
        for key, value in rdn:
            if key == "commonName":
                return value
    return ""


def _escape(value: str) -> str:
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)
