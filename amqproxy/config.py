"""Configuration: the settings in force (`Config`), parsed from flags, env vars and a config file.

The options themselves are options.py's table; the parser, `--help`, the defaults and the
README table are built from it. Invalid values fail at start with one line naming the option
(exit code 2).
"""

from __future__ import annotations

import copy
import functools
import os
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import configargparse

from .access import AuthzPolicy
from .nodes import Node
from .options import OPTIONS, split_list

if TYPE_CHECKING:
    from .auth import ProxyAuth


class ConfigError(ValueError):
    """Options have invalid values; each message names its option (`problems` lists them all)."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


@dataclass(init=False)
class Config:
    """The settings in force: one attribute per option of options.OPTIONS, whose defaults are
    the table's (parsed once), and what `parse_config` builds from the files they name."""

    listen: tuple[str, int]
    upstream: list[Node]
    http_listen: tuple[str, int] | None
    log_level: str
    log_format: str
    max_channels_per_upstream: int
    channel_max: int
    frame_max: int
    idle_timeout: float
    client_heartbeat: int
    upstream_heartbeat: int
    upstream_silence_timeout: float
    upstream_keepalive: float
    upstream_tcp_user_timeout: float
    connect_timeout: float
    handshake_timeout: float
    client_buffer: int
    upstream_buffer: int
    backlog: int
    workers: int
    drain_timeout: float
    shutdown_delay: float
    pause_timeout: float
    accept_proxy_protocol: bool
    proxy_protocol_from: list
    node_strategy: str
    channel_placement: str
    separate_publishers: bool
    max_upstreams_per_credential: int
    max_upstreams: int
    min_idle_upstreams: int
    upstream_max_age: float
    upstream_check_interval: float
    backoff_initial: float
    backoff_max: float
    backoff_multiplier: float
    breaker_failures: int
    breaker_failure_ratio: float
    breaker_window: float
    breaker_min_requests: int
    breaker_open_time: float
    breaker_open_max: float
    breaker_probe_interval: float
    breaker_max_open_percent: float
    breaker_all_open: str
    upstream_failure: str
    recovery_timeout: float
    recovery_buffer: int
    admin_token: str
    # TLS and authentication
    tls_listen: tuple[str, int] | None
    tls_cert: str
    tls_key: str
    tls_ca: str
    tls_verify_client: str
    tls_min_version: str
    tls_ciphers: str
    upstream_tls_ca: str
    upstream_tls_cert: str
    upstream_tls_key: str
    upstream_tls_verify_hostname: bool
    upstream_tls_server_name: str
    auth_file: str
    admin_token_file: str
    # limits and access
    max_connections: int
    max_connections_per_ip: int
    max_connections_per_user: int
    max_connections_per_vhost: int
    connection_rate_per_ip: float
    connection_rate_per_user: float
    client_byte_rate: int
    limit_refusal_delay: float
    limits_alarm_only: list
    slow_client_grace: float
    allow_cidr: list
    deny_cidr: list
    authz_policy: AuthzPolicy | None
    # Not options. Built from the files the options name at every parse (start, reload):
    tls_server: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    tls_upstream: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    auth: ProxyAuth | None = field(default=None, compare=False, repr=False)
    # Where this configuration came from (argv, env), so that a reload reads the same sources.
    sources: tuple[list[str] | None, dict[str, str] | None] = (None, None)

    def __init__(self, **values: Any) -> None:
        """The defaults of the options table; `values` overrides some (tests, tools)."""
        for name, value in option_defaults().items():
            setattr(self, name, copy.copy(value))
        self.tls_server = self.tls_upstream = None
        self.auth = None
        self.sources = (None, None)
        for name, value in values.items():
            if name not in _FIELDS:
                raise TypeError(f"Config has no setting {name!r}")
            setattr(self, name, value)


_FIELDS = frozenset(Config.__annotations__)


@functools.cache
def option_defaults() -> dict[str, Any]:
    """Each option's default, parsed from the options table."""
    defaults: dict[str, Any] = {}
    for option in OPTIONS:
        if option.repeatable:
            defaults[option.name] = [option.parse(item) for item in split_list(option.default)]
        else:
            defaults[option.name] = option.parse(option.default)
    return defaults


class _Parser(configargparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        if "config file" in message.lower():
            message = f"--config: {message}"
        raise ConfigError(message)


def build_parser(prog: str = "amqproxy") -> configargparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="amqproxy: a pooling AMQP 0-9-1 proxy for RabbitMQ.",
        config_file_parser_class=configargparse.DefaultConfigFileParser,
    )
    parser.add_argument(
        "--config",
        is_config_file=True,
        env_var="AMQPROXY_CONFIG",
        metavar="FILE",
        help="config file: 'key = value' lines, keys are the option names without -- (default: none)",
    )
    for option in OPTIONS:
        parser.add_argument(
            option.flag,
            env_var=option.env,
            default=None,
            metavar=option.metavar or None,
            action="append" if option.repeatable else "store",
            help=f"{option.help} (default: {option.default})",
        )
    return parser


def parse_config(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Config:
    """Parse flags, env vars and config file into a validated Config, or raise ConfigError."""
    parser = build_parser()
    try:
        namespace = parser.parse_args(args=argv, env_vars=os.environ if env is None else env)
    except ConfigError:
        raise
    except (OSError, configargparse.ConfigFileParserException) as exc:
        raise ConfigError(f"--config: {exc}") from exc
    config = Config()
    config.sources = (list(argv) if argv is not None else None, env)
    problems = []
    for option in OPTIONS:
        raw = getattr(namespace, option.name)
        if raw is None:
            raw = [option.default] if option.repeatable else option.default
        items = [str(raw)]
        if option.repeatable:
            values = raw if isinstance(raw, list) else [raw]
            items = [item for value in values for item in split_list(value)]
            if not items and option.default:  # a repeatable option with an empty default may stay empty
                problems.append(f"{option.flag}: at least one value is required")
                continue
        parsed = []
        for item in items:
            try:
                parsed.append(option.parse(item))
            except ValueError as exc:
                shown = _redact(item) if option.name == "upstream" else item
                problems.append(f"{option.flag}: invalid value {shown!r}: {exc}")
                break
        else:
            setattr(config, option.name, parsed if option.repeatable else parsed[0])
    problems.extend(_secret_problems(sys.argv[1:] if argv is None else argv, getattr(namespace, "config", None)))
    if not problems:
        problems.extend(_load_files(config, os.environ if env is None else env))
    if problems:
        raise ConfigError(problems[0], problems)
    return config


# Options whose values are secrets: never accepted as flags (ps and shell history show argv).
SECRET_OPTIONS = ("admin_token",)


def _secret_problems(argv: list[str], config_file: str | None) -> list[str]:
    problems = []
    for name in SECRET_OPTIONS:
        flag = "--" + name.replace("_", "-")
        if any(arg == flag or arg.startswith(flag + "=") for arg in argv):
            problems.append(
                f"{flag}: a secret is not accepted on the command line (ps shows it); use {flag}-file, "
                f"AMQPROXY_{name.upper()} or the config file"
            )
    if config_file:
        try:
            mode = os.stat(config_file).st_mode
            with open(config_file, encoding="utf-8", errors="replace") as f:
                keys = {line.partition("=")[0].partition(":")[0].strip() for line in f}
        except OSError:
            return problems  # the parser has reported it
        held = [key for key in (n.replace("_", "-") for n in SECRET_OPTIONS) if key in keys]
        if held and mode & 0o004:
            problems.append(
                f"--config: {config_file} holds a secret ({', '.join(held)}) and is readable by everyone "
                f"(mode {mode & 0o777:o}); chmod o-r it"
            )
    return problems


def _load_files(config: Config, env: Mapping[str, str]) -> list[str]:
    """Read what the options name: TLS certificates and keys, the credential file, secret files."""
    from . import auth, tls  # they need a parsed Config; imported late to keep config.py standalone

    problems = []
    if config.admin_token and config.admin_token_file:
        problems.append("--admin-token-file: give either it or --admin-token (env var, config file), not both")
    problems.extend(tls.load(config))
    problems.extend(auth.load(config, env))
    return problems


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """Flags whose new value a reload cannot apply: they need a restart."""
    return [
        option.flag
        for option in OPTIONS
        if not option.reloadable and getattr(old, option.name) != getattr(new, option.name)
    ]


def _redact(url: str) -> str:
    """Hide any password in a URL before it is shown in an error."""
    if "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if sep else "***"


def fail(message: str) -> None:
    print(f"amqproxy: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def options_markdown() -> str:
    """The README's option table, generated so that docs and code cannot drift."""
    rows = [
        "| flag | env var | config key | default | reload | meaning |",
        "|---|---|---|---|---|---|",
        "| `--config FILE` | `AMQPROXY_CONFIG` | | none | restart | config file of `key = value` lines |",
    ]
    for option in OPTIONS:
        flag = f"`{option.flag} {option.metavar}`" if option.metavar else f"`{option.flag}`"
        reload = "live" if option.reloadable else "restart"
        default = f"`{option.default}`" if option.default else "(empty)"
        rows.append(f"| {flag} | `{option.env}` | `{option.config_key}` | {default} | {reload} | {option.help} |")
    return "\n".join(rows) + "\n"


def write_option_tables(paths: list[str]) -> None:
    """Replace the option table in each Markdown file (from its header row to the next blank line)."""
    table = options_markdown().rstrip("\n")
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        start = text.index("| flag | env var |")
        end = text.find("\n\n", start)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text[:start] + table + (text[end:] if end >= 0 else "\n"))


if __name__ == "__main__":
    # `python -m amqproxy.config` prints the table; `--write-docs` regenerates it in place in the
    # README and the configuration reference (run from the repository root).
    if sys.argv[1:] == ["--write-docs"]:
        write_option_tables(["README.md", "docs/CONFIGURATION.md"])
    else:
        print(options_markdown(), end="")
