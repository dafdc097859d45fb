"""Proxy authentication: clients prove themselves against a proxy-side credential file
(--auth-file) and are mapped to the credentials used upstream, so applications never hold
broker passwords. With mTLS, the EXTERNAL mechanism maps a client certificate's subject to a
proxy user.

The file is TOML, and must not be readable by everyone::

    [users.orders-app]
    password = "scrypt$16384$8$1$<salt, base64>$<hash, base64>"   # amqproxy hash-password
    upstream_user = "orders"
    upstream_password_file = "/etc/amqproxy/secrets/orders.pw"      # or:
    # upstream_password_env = "ORDERS_BROKER_PASSWORD"

    [users.billing-worker]                 # no password: certificate (EXTERNAL) only
    upstream_user = "billing"
    upstream_password_env = "BILLING_BROKER_PASSWORD"

    [certificates]                         # subject -> proxy user, for EXTERNAL
    "CN=billing-worker,O=Example" = "billing-worker"   # the full DN (RFC 4514), or
    "billing-worker-2" = "billing-worker"              # the bare common name

Password hashes: `scrypt$N$r$p$salt$hash` or `pbkdf2-sha256$iterations$salt$hash`; compared in
constant time. Plain passwords are refused, in the file and for upstream passwords (a file of
mode o-r, or an env var). Hashing runs in gevent's thread pool so that a login never stalls
other clients; a password that verified once is remembered (as a keyed SHA-256 in memory, until
the file is reloaded) so reconnecting clients do not pay for scrypt every time.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import gevent

from .tls import TLSConfigError, check_private_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1
PBKDF2_ITERATIONS = 600_000
_SCRYPT_MAXMEM = 256 * 1024 * 1024


class AuthSettings(Protocol):
    """The settings `load` reads and fills in (config.Config has them)."""

    auth_file: str
    auth: ProxyAuth | None
    admin_token: str
    admin_token_file: str


class AuthFileError(ValueError):
    """The credential file (or a secret it references) cannot be used; the message names the option."""


@dataclass(frozen=True)
class ProxyUser:
    name: str
    password_hash: str  # empty: this user may only log in with a certificate (EXTERNAL)
    upstream_user: str
    upstream_password: str = field(repr=False)

    def __repr__(self) -> str:  # never print a secret
        return f"ProxyUser({self.name!r} -> {self.upstream_user!r})"


# ---------------------------------------------------------------------------- hashes


def hash_password(password: str, scheme: str = "scrypt") -> str:
    salt = secrets.token_bytes(16)
    if scheme == "scrypt":
        digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"
    if scheme == "pbkdf2-sha256":
        digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, PBKDF2_ITERATIONS)
        return f"pbkdf2-sha256${PBKDF2_ITERATIONS}${_b64(salt)}${_b64(digest)}"
    raise ValueError(f"unknown hash scheme {scheme!r} (scrypt, pbkdf2-sha256)")


def check_hash_format(encoded: str) -> None:
    """Raise ValueError unless `encoded` is a hash this module can verify."""
    parts = encoded.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            if n < 2 or n & (n - 1) or r < 1 or p < 1:
                raise ValueError("bad scrypt parameters")
        elif parts[0] == "pbkdf2-sha256" and len(parts) == 4:
            if int(parts[1]) < 1:
                raise ValueError("bad iteration count")
        else:
            raise ValueError("expected scrypt$N$r$p$salt$hash or pbkdf2-sha256$iterations$salt$hash")
        _unb64(parts[-2])
        _unb64(parts[-1])
    except (ValueError, IndexError) as exc:
        raise ValueError(f"not a password hash ({exc}); plain passwords are not accepted") from None


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of `password` against a stored hash (blocking: see ProxyAuth.verify)."""
    parts = encoded.split("$")
    if parts[0] == "scrypt":
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        expected = _unb64(parts[5])
        actual = _scrypt(password, _unb64(parts[4]), n, r, p, len(expected))
    elif parts[0] == "pbkdf2-sha256":
        expected = _unb64(parts[3])
        actual = hashlib.pbkdf2_hmac("sha256", password.encode(), _unb64(parts[2]), int(parts[1]), len(expected))
    else:
        return False
    return hmac.compare_digest(actual, expected)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int = 32) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=dklen)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


# ---------------------------------------------------------------------------- the file


class ProxyAuth:
    """The loaded credential file. A new instance per (re)load; lookups never block the hub."""

    def __init__(self, users: dict[str, ProxyUser], subjects: dict[str, str]) -> None:
        self.users = users
        self.subjects = subjects
        self._key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}  # user -> keyed digest of the password that verified
        self._dummy_hash = ""  # made at the first unknown user (scrypt is not free)

    def _fingerprint(self, user: ProxyUser, password: str) -> bytes:
        return hmac.new(self._key, f"{user.password_hash}\0{password}".encode(), hashlib.sha256).digest()

    def verify(self, username: str, password: str) -> ProxyUser | None:
        """The user, if `password` is theirs (PLAIN / AMQPLAIN)."""
        user = self.users.get(username)
        if user is not None and user.password_hash:
            fingerprint = self._fingerprint(user, password)
            known = self._verified.get(username)
            if known is not None and hmac.compare_digest(known, fingerprint):
                return user
            if _in_thread(verify_password, password, user.password_hash):
                self._verified[username] = fingerprint
                return user
            return None
        # An unknown user costs as much as a known one (no user enumeration by timing).
        if not self._dummy_hash:
            self._dummy_hash = str(gevent.get_hub().threadpool.apply(hash_password, (secrets.token_hex(8),)))
        _in_thread(verify_password, password, self._dummy_hash)
        return None

    def user_for_subject(self, dn: str, cn: str) -> ProxyUser | None:
        """The user mapped to a verified certificate subject: its full DN first, then its CN."""
        name = self.subjects.get(dn) if dn else None
        if name is None and cn:
            name = self.subjects.get(cn)
        return self.users.get(name) if name is not None else None


def _in_thread(func: object, *args: str) -> bool:
    # hashlib releases the GIL while hashing; the hub keeps serving everyone else.
    return bool(gevent.get_hub().threadpool.apply(func, args))


def load_file(path: str, env: Mapping[str, str], flag: str = "--auth-file") -> ProxyAuth:
    try:
        check_private_file(path, flag)
    except TLSConfigError as exc:
        raise AuthFileError(str(exc)) from None
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise AuthFileError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AuthFileError(f"{flag}: {path} is not valid TOML: {exc}") from None
    unknown = set(data) - {"users", "certificates"}
    if unknown:
        raise AuthFileError(f"{flag}: unknown section(s) {', '.join(sorted(unknown))} (users, certificates)")
    users = {}
    for name, entry in (data.get("users") or {}).items():
        users[name] = _user(name, entry, env, flag)
    subjects = {}
    for subject, name in (data.get("certificates") or {}).items():
        if not isinstance(name, str) or name not in users:
            raise AuthFileError(f"{flag}: certificate {subject!r} maps to unknown user {name!r}")
        subjects[subject] = name
    return ProxyAuth(users, subjects)


def _user(name: str, entry: object, env: Mapping[str, str], flag: str) -> ProxyUser:
    where = f"{flag}: user {name!r}"
    if not isinstance(entry, dict):
        raise AuthFileError(f"{where}: expected a table")
    allowed = {"password", "upstream_user", "upstream_password_file", "upstream_password_env"}
    if "upstream_password" in entry:
        raise AuthFileError(
            f"{where}: upstream_password in the file is not allowed; use upstream_password_file or upstream_password_env"
        )
    unknown = set(entry) - allowed
    if unknown:
        raise AuthFileError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    password_hash = entry.get("password", "")
    if password_hash:
        try:
            check_hash_format(str(password_hash))
        except ValueError as exc:
            raise AuthFileError(f"{where}: password: {exc}") from None
    upstream_user = entry.get("upstream_user")
    if not isinstance(upstream_user, str) or not upstream_user:
        raise AuthFileError(f"{where}: upstream_user is required")
    pw_file, pw_env = entry.get("upstream_password_file"), entry.get("upstream_password_env")
    if bool(pw_file) == bool(pw_env):
        raise AuthFileError(f"{where}: give exactly one of upstream_password_file, upstream_password_env")
    if pw_file:
        upstream_password = read_secret_file(str(pw_file), f"{where}: upstream_password_file")
    else:
        value = env.get(str(pw_env))
        if value is None:
            raise AuthFileError(f"{where}: upstream_password_env: environment variable {pw_env} is not set")
        upstream_password = value
    return ProxyUser(name, str(password_hash), upstream_user, upstream_password)


def read_secret_file(path: str, flag: str) -> str:
    """A secret kept in a file of its own (mode o-r); one trailing newline is dropped."""
    try:
        check_private_file(path, flag)
        with open(path, encoding="utf-8") as f:
            value = f.read()
    except TLSConfigError as exc:
        raise AuthFileError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthFileError(f"{flag}: cannot read {path}: {exc}") from None
    return value[:-1] if value.endswith("\n") else value


def load(config: AuthSettings, env: Mapping[str, str]) -> list[str]:
    """Load --auth-file and --admin-token-file into `config`; returns the problems."""
    problems = []
    if config.auth_file:
        try:
            config.auth = load_file(config.auth_file, env)
        except AuthFileError as exc:
            problems.append(str(exc))
    if config.admin_token_file:
        try:
            config.admin_token = read_secret_file(config.admin_token_file, "--admin-token-file").strip()
        except AuthFileError as exc:
            problems.append(str(exc))
    return problems


# ---------------------------------------------------------------------------- CLI


def hash_password_main(argv: list[str]) -> int:
    """`amqproxy hash-password`: read a password (prompt, or stdin when not a terminal) and print
    its hash, or with --user a whole [users.NAME] entry for the --auth-file."""
    parser = argparse.ArgumentParser(prog="amqproxy hash-password", description=hash_password_main.__doc__)
    parser.add_argument("--scheme", choices=("scrypt", "pbkdf2-sha256"), default="scrypt")
    parser.add_argument("--user", help="print a [users.USER] entry instead of the bare hash")
    parser.add_argument("--upstream-user", help="broker user of the entry (default: --user)")
    parser.add_argument("--upstream-password-env", metavar="VAR", help="env var holding the broker password")
    parser.add_argument("--upstream-password-file", metavar="FILE", help="file holding the broker password")
    args = parser.parse_args(argv)
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("amqproxy: error: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("amqproxy: error: empty password", file=sys.stderr)
        return 2
    encoded = hash_password(password, args.scheme)
    if not args.user:
        print(encoded)
        return 0
    lines = [
        f"[users.{_toml_key(args.user)}]",
        f'password = "{encoded}"',
        f"upstream_user = {_toml_string(args.upstream_user or args.user)}",
    ]
    if args.upstream_password_file:
        lines.append(f"upstream_password_file = {_toml_string(args.upstream_password_file)}")
    else:
        var = args.upstream_password_env or "BROKER_PASSWORD_" + "".join(
            ch if ch.isalnum() else "_" for ch in args.user.upper()
        )
        lines.append(f"upstream_password_env = {_toml_string(var)}")
    print("\n".join(lines))
    return 0


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_key(value: str) -> str:
    if value and all(ch.isalnum() or ch in "-_" for ch in value):
        return value
    return _toml_string(value)


if __name__ == "__main__":
    sys.exit(hash_password_main(sys.argv[1:]))
