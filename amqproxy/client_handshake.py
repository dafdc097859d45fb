"""The handshake of a client session: the session's side of the sans-IO core's decisions.

`HandshakeDriver` is mixed into `ClientSession` (client.py). It feeds the core
(`protocol.connection.ClientConnection`) what the client sends and carries out what the core
asks: prove the credentials (--auth-file, then the broker through `Pool.authenticate`), admit
(`admission.Admission`: --allow-cidr/--deny-cidr, --authz-policy, limits), open the vhost
(`Pool.open_vhost`, a paused vhost's wait), and refuse with the core's Connection.Close. The
client's own steps have --handshake-timeout; waiting for an upstream, which the client cannot
help, is not counted against it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

import gevent

from .admission import Admission, Verdict
from .protocol import constants as c
from .protocol import proxyproto
from .protocol.connection import Authenticate, ClientConnection, ConnectionState, Ended, OpenVhost, Refuse, Send
from .protocol.errors import reply_text
from .protocol.handshake import Credentials, negotiate
from .upstream_handshake import UpstreamError

if TYPE_CHECKING:
    import socket

    from .access import AddressFilter
    from .config import Config
    from .limits import Limits, TokenBucket
    from .metrics import Metrics
    from .outbox import Outbox
    from .pool import Pool
    from .tls import PeerInfo

log = logging.getLogger("amqproxy.client")


class Refused(Exception):
    """The handshake ends here; the client has been told why (or the socket just closes).
    `timed_out`: the client took longer than its --handshake-timeout (counted by the session)."""

    def __init__(self, text: str, timed_out: bool = False) -> None:
        super().__init__(text)
        self.timed_out = timed_out


class HandshakeTimeout(Refused):
    """--handshake-timeout passed. Handed to `gevent.Timeout` as the class, not an instance:
    only a read that does time out builds one, not every handshake read."""

    def __init__(self) -> None:
        super().__init__("handshake timeout", timed_out=True)


class SessionHost(Protocol):
    """What a client session uses of the proxy that accepted it (server.Proxy)."""

    @property
    def config(self) -> Config:
        """The configuration in force now (a reload replaces it)."""

    @property
    def pool(self) -> Pool: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def limits(self) -> Limits: ...

    @property
    def address_filter(self) -> AddressFilter: ...

    def wait_if_paused(self, vhost: str) -> bool:
        """Hold the caller while `vhost` is paused; False if it stayed paused too long."""


class HandshakeDriver:
    """The handshake methods of `ClientSession` (the attributes below are the session's own)."""

    proxy: SessionHost
    config: Config
    pool: Pool
    metrics: Metrics
    sock: socket.socket
    outbox: Outbox
    core: ClientConnection
    admission: Admission
    tls: PeerInfo | None
    peer_host: str
    client_host: str
    address: str
    proxied_by: str | None
    auth_user: str
    capabilities: frozenset[str]
    credentials: Credentials | None
    vhost: str | None
    pool_key: tuple[str, str, str]
    channel_max: int
    max_body: int
    heartbeat: int
    opened_at: float
    last_recv: float
    closing: bool
    close_reason: str
    _byte_bucket: TokenBucket | None
    _handshake_deadline: float

    def log_extra(self, event: str, **fields: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _await_close_ok(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ handshake (drives the core)

    def _handshake(self) -> None:
        self._handshake_deadline = time.monotonic() + self.config.handshake_timeout
        core = self.core
        # On the TLS listener a PROXY header precedes the TLS handshake and was read there.
        if (
            self.tls is None
            and self.config.accept_proxy_protocol
            and proxyproto.trusted(self.peer_host, self.config.proxy_protocol_from)
        ):
            core.receive_data(self._read_proxy_header())
        self._admit(self.admission.address(self.client_host, self.proxy.address_filter))
        core.external = self._external_offered()
        while True:
            action = core.next_action()
            if action is None:
                data = self._handshake_recv(65536)
                if not data:
                    if core.state is ConnectionState.HEADER:
                        raise Refused("client closed before the protocol header")
                    raise Refused("client closed during the handshake")
                self.last_recv = time.monotonic()
                core.receive_data(data)
            elif isinstance(action, Send):
                self.outbox.put(action.data)
            elif isinstance(action, Authenticate):
                self._authenticate(action.credentials)
            elif isinstance(action, Refuse):
                self.capabilities = core.capabilities
                self._refuse(action.reply_code, action.text, action.method, "auth")
            elif isinstance(action, OpenVhost):
                self._open_vhost(action.vhost)
                return
            elif isinstance(action, Ended):
                if action.refused:
                    self.metrics.client_refused(action.refused)
                raise Refused(action.reason)

    def _authenticate(self, credentials: Credentials) -> None:
        """StartOk: --auth-file, --authz-policy and the per-user limits, then the broker proves
        the credentials (unless a limit refused the client: it causes no upstream work)."""
        self.capabilities = self.core.capabilities
        if self.config.auth is not None:
            credentials = self._proxy_login(credentials)
        self.credentials = credentials
        self._admit(self.admission.user(self.auth_user or credentials.username, self.proxy.config.authz_policy))
        try:
            if self.admission.refusal is None:
                self._upstream_wait(self.pool.authenticate, credentials)
        except UpstreamError as exc:
            self._refuse_upstream(exc, c.CONNECTION_START_OK)
        self._check_still_open()
        channel_max = negotiate(self.config.channel_max, self.pool.channel_max)
        frame_max = negotiate(self.config.frame_max, self.pool.frame_max)
        self.outbox.put(self.core.authenticated(channel_max, frame_max).data)

    def _open_vhost(self, vhost: str) -> None:
        """Connection.Open: admission of the vhost, a paused vhost's wait, the vhost opened upstream."""
        core = self.core
        self.channel_max, self.max_body, self.heartbeat = core.channel_max, core.max_body, core.heartbeat
        credentials = self.credentials
        assert credentials is not None
        verdict = self.admission.vhost(vhost, self.auth_user or credentials.username, self.proxy.config.authz_policy)
        self._admit(verdict)
        refusal = verdict.refusal
        if refusal is not None:
            self.metrics.limit_hit(refusal.limit, True)
            self._refusal_delay()
            self._refuse(refusal.reply_code, refusal.text, c.CONNECTION_OPEN, "limit", limit=refusal.limit)
        if not self._paused_wait(vhost):
            self._refuse(
                c.CONNECTION_FORCED,
                f"CONNECTION_FORCED - vhost '{vhost}' is paused for maintenance",
                c.CONNECTION_OPEN,
                "paused",
            )
        try:
            self._upstream_wait(self.pool.open_vhost, credentials, vhost)
        except UpstreamError as exc:
            self._refuse_upstream(exc, c.CONNECTION_OPEN)
        self._check_still_open()
        self.vhost = vhost
        self.pool_key = (credentials.username, credentials.password, vhost)
        self.outbox.put(core.opened().data)
        self.metrics.client_opened(vhost, credentials.username, time.monotonic() - self.opened_at)
        self._byte_bucket = self.proxy.limits.byte_rate_bucket(time.monotonic())

    def _check_still_open(self) -> None:
        """Closed by another greenlet (a drain, the admin API) while the upstream was awaited."""
        if self.closing:
            raise Refused(self.close_reason or "closed during the handshake")

    def _handshake_recv(self, size: int) -> bytes:
        """recv() within what is left of the client's --handshake-timeout."""
        remaining = self._handshake_deadline - time.monotonic()
        if remaining <= 0:
            raise HandshakeTimeout
        with gevent.Timeout(remaining, HandshakeTimeout):
            return self.sock.recv(size)

    def _upstream_wait(self, call: Any, *args: Any) -> None:
        """Run a pool call; the time it takes does not count against the client's handshake budget."""
        started = time.monotonic()
        try:
            call(*args, started + self.config.connect_timeout)
        finally:
            self._handshake_deadline += time.monotonic() - started

    def _paused_wait(self, vhost: str) -> bool:
        """Hold the client while its vhost is paused; the wait is not the client's handshake time."""
        started = time.monotonic()
        try:
            return self.proxy.wait_if_paused(vhost)
        finally:
            self._handshake_deadline += time.monotonic() - started

    def _read_proxy_header(self) -> bytes:
        """A PROXY protocol header from a trusted balancer: the client's real address. Returns
        the bytes read past it (the start of the AMQP protocol header)."""
        data = b""
        while True:
            chunk = self._handshake_recv(256)
            if not chunk:
                raise Refused("client closed before the PROXY protocol header")
            data += chunk
            try:
                result = proxyproto.parse(data)
            except proxyproto.ProxyHeaderError as exc:
                self.metrics.client_refused("protocol_header")
                raise Refused(f"bad PROXY protocol header: {exc}") from None
            if result is not None:
                break
            if len(data) > 536:  # v2's largest header plus a margin
                raise Refused("PROXY protocol header too long")
        consumed, source = result
        if source is not None:
            self._named_by_balancer(source)
        return data[consumed:]

    def _named_by_balancer(self, source: tuple[str, int]) -> None:
        """A trusted PROXY header named the client behind the balancer."""
        self.proxied_by = self.address
        host, port = source
        self.client_host = host
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _external_offered(self) -> bool:
        """EXTERNAL: a verified client certificate, and an --auth-file that maps subjects to users."""
        auth = self.config.auth
        return bool(self.tls is not None and self.tls.subject_dn and auth is not None and auth.subjects)

    def _proxy_login(self, credentials: Credentials) -> Credentials:
        """--auth-file: check the client against the proxy's credentials and return the broker
        credentials its user maps to; refuse with RabbitMQ's 403 otherwise."""
        auth = self.config.auth
        assert auth is not None
        if credentials.mechanism == "EXTERNAL":
            assert self.tls is not None
            user = auth.user_for_subject(self.tls.subject_dn, self.tls.subject_cn)
            self.auth_user = user.name if user is not None else self.tls.subject_dn
        else:
            self.auth_user = credentials.username
            user = auth.verify(credentials.username, credentials.password)
        if user is None:
            self._refuse(
                c.ACCESS_REFUSED,
                f"ACCESS_REFUSED - Login was refused using authentication mechanism {credentials.mechanism}. "
                "For details see the broker logfile.",
                c.CONNECTION_START_OK,
                "auth",
            )
        assert user is not None  # _refuse raised
        return Credentials(user.upstream_user, user.upstream_password, "PLAIN")

    def _refuse_upstream(self, exc: UpstreamError, method: tuple[int, int]) -> None:
        if exc.reply_code:
            # The broker's own verdict (403 ACCESS_REFUSED, 530 NOT_ALLOWED "vhost ... not found").
            reason = {403: "auth", 506: "limit"}.get(exc.reply_code, "vhost")
            self.metrics.error(reason, "permanent", self.vhost)
            self._refuse(exc.reply_code, exc.text, method, reason)
        self.metrics.error("upstream_unavailable", "transient", self.vhost)
        self._refuse(
            c.CONNECTION_FORCED,
            f"CONNECTION_FORCED - upstream unavailable: {exc.text}",
            method,
            "breaker_open" if exc.breaker_open else "upstream_unavailable",
        )

    def _refuse(self, reply_code: int, text: str, method: tuple[int, int], reason: str, **fields: Any) -> None:
        """Refuse the handshake (reasons: auth, vhost, limit, access, paused, upstream_unavailable,
        breaker_open): counted, logged, then the core's Connection.Close (or, for a login refused
        by the spec's rules, none) and the wait for Close-Ok."""
        text = reply_text(text)
        self.metrics.client_refused(reason)
        log.warning(
            "client refused",
            extra=self.log_extra("client_refused", reason=reason, reply_code=reply_code, reply_text=text, **fields),
        )
        action = self.core.refuse(reply_code, text, method)
        if isinstance(action, Send):
            self.closing = True
            self.outbox.put(action.data)
            self._await_close_ok()
        raise Refused(text)

    # ------------------------------------------------------------------ admission (limits and access)

    def _admit(self, verdict: Verdict) -> None:
        """Act on an admission verdict: alarms are logged and counted; a denial refuses now (an
        address with a TCP close, --authz-policy after --limit-refusal-delay)."""
        for alarm in verdict.alarms:
            self.metrics.limit_hit(alarm.limit, False)
            log.warning(
                "limit reached (alarm only: admitted)",
                extra=self.log_extra(
                    "limit_alarm", limit=alarm.limit, reply_code=alarm.reply_code, reply_text=alarm.text
                ),
            )
        denial = verdict.denial
        if denial is None:
            return
        self.metrics.access_denied(denial.reason)
        if not denial.reply_code:  # --allow-cidr/--deny-cidr: before any AMQP byte
            self.metrics.client_refused("access")
            log.warning("client address refused", extra=self.log_extra("access_denied", reason=denial.reason))
            raise Refused(denial.text)
        self._refusal_delay()
        self._refuse(denial.reply_code, denial.text, denial.method, "access", access=denial.reason)

    def _refusal_delay(self) -> None:
        """Hold a refused client a moment so that its retry loop does not spin; only this
        greenlet waits. Not counted against the client's handshake time."""
        delay = self.proxy.limits.refusal_delay
        if delay > 0:
            gevent.sleep(delay)
            self._handshake_deadline += delay
