"""Who may come in: source-address allow/deny lists and the user -> vhost authorization policy.

Pure logic, no sockets. `ClientSession` asks `AddressFilter.check` right after accept (and
after a PROXY protocol header, which names the real client) before any AMQP byte is sent, and
`AuthzPolicy` at StartOk (the user) and Connection.Open (the vhost) before any upstream work.

The policy file (`--authz-policy FILE`) is JSON: an object mapping a user name to the vhosts it
may use, a list of names or "*" for any vhost; the user "*" stands for every user not listed.
A user that is neither listed nor covered by "*" may not connect at all:

    {"orders-app": ["orders"], "ops": "*", "*": ["public"]}
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass

from .protocol import constants as c
from .protocol.errors import reply_text

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ANY = "*"


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 (dual-stack listeners)
    return address


@dataclass(frozen=True)
class AddressFilter:
    """--allow-cidr / --deny-cidr: deny wins; an empty allow list allows every address."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    @classmethod
    def from_lists(cls, allow: Sequence[Network], deny: Sequence[Network]) -> AddressFilter:
        return cls(tuple(allow), tuple(deny))

    def check(self, host: str) -> str | None:
        """None when `host` may connect, else the reason: `denied` (a --deny-cidr network) or
        `not_allowed` (outside every --allow-cidr network, or not an IP address)."""
        if not self.allow and not self.deny:
            return None
        address = _address(host)
        if address is None:
            return "not_allowed"  # e.g. a Unix socket peer: only when lists are configured
        if any(address in network for network in self.deny):
            return "denied"
        if self.allow and not any(address in network for network in self.allow):
            return "not_allowed"
        return None


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class AuthzPolicy:
    """Which users may use which vhosts. `rules` maps a user (or "*") to None (any vhost) or a
    frozenset of vhosts; `source` is the file it came from."""

    rules: tuple[tuple[str, frozenset[str] | None], ...]
    source: str = ""

    def _vhosts(self, user: str) -> frozenset[str] | None | bool:
        table = dict(self.rules)
        if user in table:
            return table[user]
        if ANY in table:
            return table[ANY]
        return False  # not covered: may not connect at all

    def user_allowed(self, user: str) -> bool:
        vhosts = self._vhosts(user)
        return vhosts is not False and (vhosts is None or bool(vhosts))

    def vhost_allowed(self, user: str, vhost: str) -> bool:
        vhosts = self._vhosts(user)
        if vhosts is False:
            return False
        return vhosts is None or vhost in vhosts  # type: ignore[operator]


def load_policy(path: str) -> AuthzPolicy | None:
    """Read and validate a policy file; '' means no policy. Raises ValueError with the cause."""
    path = path.strip()
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except OSError as exc:
        raise PolicyError(f"cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PolicyError(f"not valid JSON: {exc}") from None
    return parse_policy(document, path)


def parse_policy(document: object, source: str = "") -> AuthzPolicy:
    if not isinstance(document, dict):
        raise PolicyError("expected a JSON object mapping users to lists of vhosts")
    rules: list[tuple[str, frozenset[str] | None]] = []
    for user, vhosts in document.items():
        if vhosts == ANY:
            rules.append((user, None))
        elif isinstance(vhosts, list) and all(isinstance(v, str) for v in vhosts):
            rules.append((user, frozenset(vhosts)))
        else:
            raise PolicyError(f'user {user!r}: expected a list of vhost names or "*"')
    return AuthzPolicy(tuple(sorted(rules, key=lambda rule: rule[0])), source)


# What a refused client is told (RabbitMQ's own texts where it has one).


def user_refused_text(user: str) -> str:
    return reply_text(f"ACCESS_REFUSED - user '{user}' may not connect through this proxy (--authz-policy)")


def vhost_refused_text(user: str, vhost: str) -> str:
    return reply_text(f"NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}'")


USER_REFUSED_CODE = c.ACCESS_REFUSED
VHOST_REFUSED_CODE = c.NOT_ALLOWED
