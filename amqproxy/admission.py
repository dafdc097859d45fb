"""Admission of one client connection: what the access rules and the limits say at each step.

Three points of the handshake ask, before any upstream work: the address right after accept
(and the PROXY header), the user at StartOk, the vhost at Connection.Open. `Admission` answers
with a `Verdict` built from the decision values of access.py and limits.py; it holds the
connection-limit slots the client took, and a limit's refusal until Open, where RabbitMQ
refuses its own connection limits (530). Pure: the session logs, counts, waits and refuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .access import (
    USER_REFUSED_CODE,
    VHOST_REFUSED_CODE,
    AddressFilter,
    AuthzPolicy,
    user_refused_text,
    vhost_refused_text,
)
from .limits import Decision, Key, Limits, Refusal
from .protocol import constants as c


@dataclass(frozen=True)
class Denial:
    """Refused by --allow-cidr/--deny-cidr (an address: reply_code 0, a plain TCP close) or by
    --authz-policy (`reason` authz_user or authz_vhost)."""

    reason: str
    reply_code: int
    text: str
    method: tuple[int, int]


@dataclass
class Verdict:
    denial: Denial | None = None  # refused now
    refusal: Refusal | None = None  # a limit refuses: at Connection.Open, the client is told
    alarms: list[Refusal] = field(default_factory=list)  # alarm-only limits that would have refused


class Admission:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.held: list[Key] = []  # connection-limit slots this client holds
        self.refusal: Refusal | None = None  # the first limit that refused it

    def address(self, host: str, address_filter: AddressFilter) -> Verdict:
        denied = address_filter.check(host)
        if denied is not None:
            return Verdict(Denial(denied, 0, f"address {denied} by --allow-cidr/--deny-cidr", (0, 0)))
        return self._apply(self.limits.admit_address(host))

    def user(self, user: str, policy: AuthzPolicy | None) -> Verdict:
        """`user` is the name the client logged in with (its --auth-file name, not the broker user)."""
        if policy is not None and not policy.user_allowed(user):
            return Verdict(Denial("authz_user", USER_REFUSED_CODE, user_refused_text(user), c.CONNECTION_START_OK))
        if self.refusal is not None:
            return Verdict()
        return self._apply(self.limits.admit_user(user))

    def vhost(self, vhost: str, user: str, policy: AuthzPolicy | None) -> Verdict:
        """The last step: any limit that refused the client earlier is told now."""
        if policy is not None and not policy.vhost_allowed(user, vhost):
            text = vhost_refused_text(user, vhost)
            return Verdict(Denial("authz_vhost", VHOST_REFUSED_CODE, text, c.CONNECTION_OPEN))
        verdict = self._apply(self.limits.admit_vhost(vhost, user)) if self.refusal is None else Verdict()
        verdict.refusal = self.refusal
        return verdict

    def release(self) -> None:
        """The connection ended: its slots are free."""
        self.limits.release(self.held)
        self.held = []

    def _apply(self, decision: Decision) -> Verdict:
        self.held += decision.held
        if decision.refusal is not None and self.refusal is None:
            self.refusal = decision.refusal
        return Verdict(alarms=decision.alarms)
