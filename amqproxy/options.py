"""The options table: every option once, with its parser, default and help.

Each option is a flag (--name-with-dashes), an AMQPROXY_<NAME> env var and a config-file key.
config.py builds the parser, the `Config` defaults and the README's option table from `OPTIONS`,
so a default is written once, here. Value parsers raise ValueError with the reason; the caller
names the option.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .access import load_policy
from .limits import parse_limit_name
from .nodes import Node

# ---------------------------------------------------------------------------- value parsers


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def parse_optional_hostport(value: str) -> tuple[str, int] | None:
    if value.strip().lower() in ("", "off", "none", "disabled"):
        return None
    return parse_hostport(value)


def parse_node(value: str) -> Node:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"expected an amqp:// or amqps:// URL, got scheme {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("URL has no host")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError("URL has an invalid port") from exc
    tls = parts.scheme == "amqps"
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"proxy_protocol"})
    if unknown:
        raise ValueError(f"unknown URL parameter(s) {', '.join(unknown)} (known: proxy_protocol)")
    proxy_protocol = query.get("proxy_protocol", [""])[-1].lower()
    if proxy_protocol in ("off", "none"):
        proxy_protocol = ""
    if proxy_protocol not in ("", "v1", "v2"):
        raise ValueError("proxy_protocol must be v1, v2 or off")
    return Node(unquote(parts.hostname), port or (5671 if tls else 5672), tls, proxy_protocol)


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


def _workers(value: str) -> int:
    if value.strip().lower() == "auto":
        return os.cpu_count() or 1
    return _positive_int(value)


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be zero or a positive integer")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be a positive number of seconds")
    return number


def _channel_max(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 65535:
        raise ValueError("must be between 1 and 65535")
    return number


def _frame_max(value: str) -> int:
    number = int(value)
    if not 4096 <= number <= 2**31:
        raise ValueError("must be at least 4096 (the AMQP minimum)")
    return number


def _heartbeat(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be between 0 (off) and 65535 seconds")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError("must be zero (off) or a positive number")
    return number


def _ratio(value: str) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise ValueError("must be a ratio in (0, 1]")
    return number


def _percent(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 100:
        raise ValueError("must be a percentage between 0 and 100")
    return number


def _multiplier(value: str) -> float:
    number = float(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        lowered = value.strip().lower()
        if lowered not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return lowered

    return parse


@dataclass(frozen=True)
class Option:
    name: str  # the Config attribute; flag is --name-with-dashes
    parse: Callable[[str], Any]
    default: str
    help: str
    metavar: str = ""
    repeatable: bool = False
    reloadable: bool = True  # applied live by a reload (SIGHUP, POST /reload); else needs a restart

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "AMQPROXY_" + self.name.upper()

    @property
    def config_key(self) -> str:
        return self.name.replace("_", "-")


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as exc:
        raise ValueError(f"expected a CIDR network: {exc}") from None


def _token(value: str) -> str:
    return value.strip()


def _path(value: str) -> str:
    return os.path.expanduser(value.strip())


def _text(value: str) -> str:
    return value.strip()


OPTIONS: tuple[Option, ...] = (
    Option(
        "listen", parse_hostport, "127.0.0.1:5673", "AMQP listen address for clients", "HOST:PORT", reloadable=False
    ),
    Option(
        "upstream",
        parse_node,
        "amqp://127.0.0.1:5672",
        "broker node URL (amqp:// or amqps://; add ?proxy_protocol=v1 or v2 to send a PROXY header); repeat, or comma-separate, for several nodes",
        "URL",
        repeatable=True,
    ),
    Option(
        "http_listen",
        parse_optional_hostport,
        "127.0.0.1:15673",
        "admin HTTP address (/healthz, /metrics); 'off' disables it",
        "HOST:PORT",
        reloadable=False,
    ),
    Option("log_level", _choice("debug", "info", "warning", "error"), "info", "log level", "LEVEL"),
    Option(
        "admin_token",
        _token,
        "",
        "token required by the admin API's state-changing and debug endpoints and the status page; from the env var, the "
        "config file (then mode o-r) or --admin-token-file, never a flag (ps shows it); empty = no token",
        "TOKEN",
    ),
    Option("log_format", _choice("json", "text"), "json", "log line format", "FORMAT"),
    Option(
        "max_channels_per_upstream",
        _channel_max,
        "2047",
        "most channels multiplexed onto one upstream connection (also capped by the broker's channel_max)",
        "N",
    ),
    Option("channel_max", _channel_max, "2047", "channel_max offered to clients (capped by the broker's)", "N"),
    Option("frame_max", _frame_max, "131072", "frame_max offered to clients and asked of brokers (bytes)", "BYTES"),
    Option(
        "idle_timeout",
        _positive_float,
        "30",
        "close an upstream connection after it has had no channels for this long (seconds)",
        "SECONDS",
    ),
    Option("client_heartbeat", _heartbeat, "60", "heartbeat offered to clients in Tune (seconds, 0 = off)", "SECONDS"),
    Option(
        "upstream_heartbeat",
        _heartbeat,
        "5",
        "heartbeat asked of brokers on pooled connections (seconds; an idle connection silent for twice this "
        "is dead). Few pooled connections afford a short one; under 5 gives false positives",
        "SECONDS",
    ),
    Option(
        "upstream_silence_timeout",
        _non_negative_float,
        "8",
        "while the proxy waits for a broker (a reply, a confirm, a channel.open, an unsent write) and has read "
        "nothing at all from that connection for this long, the connection is dead; at least "
        "--upstream-heartbeat + 3 (an idle broker may write nothing for one heartbeat interval); 0 = off",
        "SECONDS",
    ),
    Option(
        "upstream_keepalive",
        _non_negative_float,
        "10",
        "TCP keepalive on upstream sockets: probes after this many idle seconds, 3 probes a third of it apart; "
        "0 = off (heartbeats keep a healthy connection from ever being idle that long)",
        "SECONDS",
    ),
    Option(
        "upstream_tcp_user_timeout",
        _non_negative_float,
        "0",
        "TCP_USER_TIMEOUT of upstream sockets: the kernel drops a connection whose sent data stays unacknowledged "
        "this long; it also drops one a broker stops reading (memory alarm), so keep it above the longest alarm; "
        "0 = off",
        "SECONDS",
    ),
    Option(
        "connect_timeout", _positive_float, "10", "timeout for an upstream TCP connect plus AMQP handshake", "SECONDS"
    ),
    Option(
        "handshake_timeout",
        _positive_float,
        "10",
        "a client must finish its AMQP handshake within this time",
        "SECONDS",
    ),
    Option(
        "client_buffer",
        _positive_int,
        str(64 * 1024 * 1024),
        "bytes waiting for a client that reads too slowly before it is disconnected",
        "BYTES",
    ),
    Option(
        "upstream_buffer",
        _positive_int,
        str(4 * 1024 * 1024),
        "bytes waiting for an upstream before publishing clients stop being read (backpressure)",
        "BYTES",
    ),
    Option("backlog", _positive_int, "1024", "listen backlog of the client socket", "N", reloadable=False),
    Option(
        "workers",
        _workers,
        "1",
        "worker processes sharing the listen port (SO_REUSEPORT), each with its own pool; auto = CPU count",
        "N",
        reloadable=False,
    ),
    Option(
        "drain_timeout",
        _non_negative_float,
        "30",
        "on SIGTERM/SIGINT, how long clients may finish on their own before they get 320 (seconds)",
        "SECONDS",
    ),
    Option(
        "shutdown_delay",
        _non_negative_float,
        "0",
        "on SIGTERM/SIGINT, keep accepting new clients this long while /readyz answers 503, so that a load "
        "balancer's health check takes the instance out of rotation before it stops accepting; then the drain "
        "(seconds)",
        "SECONDS",
    ),
    Option(
        "accept_proxy_protocol",
        _bool,
        "false",
        "expect a PROXY protocol v1/v2 header from --proxy-protocol-from sources (the client's real address)",
        "BOOL",
    ),
    Option(
        "proxy_protocol_from",
        _network,
        "127.0.0.1/32",
        "sources trusted to send PROXY headers (CIDR; repeat or comma-separate); others are served as is",
        "CIDR",
        repeatable=True,
    ),
    Option(
        "pause_timeout",
        _positive_float,
        "60",
        "how long a new client of a paused vhost is held at Connection.Open before it gets 320",
        "SECONDS",
    ),
    Option(
        "node_strategy",
        _choice("round-robin", "least-connections", "random"),
        "round-robin",
        "how new upstream connections are spread over healthy nodes",
        "STRATEGY",
    ),
    Option(
        "channel_placement",
        _choice("fill", "spread"),
        "fill",
        "which pooled connection a new channel goes to: fill one first, or spread by fewest channels",
        "MODE",
    ),
    Option(
        "separate_publishers",
        _bool,
        "true",
        "keep publishing and consuming channels on separate upstream connections (RabbitMQ flow control is per connection)",
        "BOOL",
    ),
    Option(
        "max_upstreams_per_credential",
        _non_negative_int,
        "0",
        "most upstream connections per (user, vhost) credential set; 0 = no limit",
        "N",
    ),
    Option("max_upstreams", _non_negative_int, "0", "most upstream connections in total; 0 = no limit", "N"),
    Option(
        "min_idle_upstreams",
        _non_negative_int,
        "0",
        "idle upstream connections kept open (and re-dialled) per credential set once it has been used",
        "N",
    ),
    Option(
        "upstream_max_age",
        _non_negative_float,
        "0",
        "after this many seconds an upstream connection takes no new channels and closes once empty; 0 = off",
        "SECONDS",
    ),
    Option(
        "upstream_check_interval",
        _non_negative_float,
        "10",
        "a pooled connection silent for longer than this must answer a new channel's channel.open (a round "
        "trip) before the client's method goes out; one heard from within it (heartbeats come every few "
        "seconds) gets channel.open pipelined with the method, covered by --upstream-silence-timeout; 0 = always "
        "a round trip",
        "SECONDS",
    ),
    Option("backoff_initial", _positive_float, "0.1", "first reconnect delay (seconds, with jitter)", "SECONDS"),
    Option("backoff_max", _positive_float, "5", "longest reconnect delay (seconds)", "SECONDS"),
    Option("backoff_multiplier", _multiplier, "2", "growth of the reconnect delay per failed attempt", "FACTOR"),
    Option("breaker_failures", _positive_int, "5", "consecutive connection failures that open a node's breaker", "N"),
    Option(
        "breaker_failure_ratio",
        _ratio,
        "0.5",
        "share of failed attempts within --breaker-window that opens a node's breaker",
        "RATIO",
    ),
    Option("breaker_window", _positive_float, "30", "window for --breaker-failure-ratio (seconds)", "SECONDS"),
    Option(
        "breaker_min_requests",
        _positive_int,
        "10",
        "attempts within the window before --breaker-failure-ratio applies",
        "N",
    ),
    Option(
        "breaker_open_time",
        _positive_float,
        "5",
        "first open period of a breaker (seconds); doubles on repeated trips, with jitter",
        "SECONDS",
    ),
    Option("breaker_open_max", _positive_float, "60", "longest open period of a breaker (seconds)", "SECONDS"),
    Option(
        "breaker_probe_interval",
        _positive_float,
        "0.25",
        "a client already waiting for a failing node (open breaker or not) probes it this often, one probe at a "
        "time per node: the client gets in within this long of the node's return (seconds)",
        "SECONDS",
    ),
    Option(
        "breaker_max_open_percent",
        _percent,
        "50",
        "most nodes whose breakers may be open at once (percent; at least one), so breakers never take every node out",
        "PERCENT",
    ),
    Option(
        "breaker_all_open",
        _choice("fail-fast", "queue"),
        "fail-fast",
        "when every node's breaker is open: refuse new clients at once, or queue them up to --connect-timeout",
        "MODE",
    ),
    Option(
        "upstream_failure",
        _choice("recover", "close"),
        "recover",
        "when an upstream connection is lost: re-establish its clients' channels on a healthy upstream "
        "(topology, qos, confirms, consumers; see docs/OPERATIONS.md), or close those clients with 320",
        "MODE",
    ),
    Option(
        "recovery_timeout",
        _positive_float,
        "30",
        "how long --upstream-failure recover tries to bring a client's lost channels back before 320",
        "SECONDS",
    ),
    Option(
        "recovery_buffer",
        _positive_int,
        str(4 * 1024 * 1024),
        "bytes a recovering channel holds from its client (publishes during the gap) before the client "
        "stops being read",
        "BYTES",
    ),
    # TLS and authentication
    Option(
        "tls_listen",
        parse_optional_hostport,
        "off",
        "AMQP over TLS listen address for clients (beside --listen; RabbitMQ uses 5671); 'off' disables it",
        "HOST:PORT",
        reloadable=False,
    ),
    Option("tls_cert", _path, "", "certificate chain (PEM) of the TLS listener; re-read on reload", "FILE"),
    Option("tls_key", _path, "", "private key (PEM) of --tls-cert; must not be readable by everyone", "FILE"),
    Option("tls_ca", _path, "", "CA certificates (PEM) that client certificates must chain to (mTLS)", "FILE"),
    Option(
        "tls_verify_client",
        _choice("none", "optional", "required"),
        "none",
        "client certificates on the TLS listener: not asked for, verified if sent, or required (mTLS)",
        "MODE",
    ),
    Option("tls_min_version", _choice("1.2", "1.3"), "1.2", "lowest TLS version clients may use", "VERSION"),
    Option(
        "tls_ciphers",
        _text,
        "",
        "OpenSSL cipher list for TLS 1.2 clients (TLS 1.3 suites are OpenSSL's); empty = OpenSSL defaults",
        "LIST",
    ),
    Option(
        "upstream_tls_ca",
        _path,
        "",
        "CA certificates (PEM) that amqps:// brokers' certificates must chain to; empty = the system CAs",
        "FILE",
    ),
    Option("upstream_tls_cert", _path, "", "client certificate (PEM) presented to amqps:// brokers (mTLS)", "FILE"),
    Option(
        "upstream_tls_key",
        _path,
        "",
        "private key (PEM) of --upstream-tls-cert; must not be readable by everyone",
        "FILE",
    ),
    Option(
        "upstream_tls_verify_hostname",
        _bool,
        "true",
        "check that an amqps:// broker's certificate names the host dialled (or --upstream-tls-server-name)",
        "BOOL",
    ),
    Option(
        "upstream_tls_server_name",
        _text,
        "",
        "SNI and verified name for amqps:// brokers instead of each node's host; empty = the node's host",
        "NAME",
    ),
    Option(
        "auth_file",
        _path,
        "",
        "proxy credential file (TOML; hashed passwords, mapping to broker users; see README): clients log in "
        "against it instead of the broker; must not be readable by everyone; empty = off",
        "FILE",
    ),
    Option(
        "admin_token_file",
        _path,
        "",
        "file holding --admin-token (must not be readable by everyone); re-read on reload",
        "FILE",
    ),
    # limits and access
    Option(
        "max_connections", _non_negative_int, "0", "most client connections in total (506 beyond it); 0 = no limit", "N"
    ),
    Option(
        "max_connections_per_ip",
        _non_negative_int,
        "0",
        "most client connections from one source address (530 beyond it); 0 = no limit",
        "N",
    ),
    Option(
        "max_connections_per_user",
        _non_negative_int,
        "0",
        "most client connections of one user (530 beyond it); 0 = no limit",
        "N",
    ),
    Option(
        "max_connections_per_vhost",
        _non_negative_int,
        "0",
        "most client connections to one vhost (530 beyond it); 0 = no limit",
        "N",
    ),
    Option(
        "connection_rate_per_ip",
        _non_negative_float,
        "0",
        "new client connections per second from one source address (token bucket, burst of one second); 0 = no limit",
        "RATE",
    ),
    Option(
        "connection_rate_per_user",
        _non_negative_float,
        "0",
        "new client connections per second of one user (token bucket, burst of one second); 0 = no limit",
        "RATE",
    ),
    Option(
        "client_byte_rate",
        _non_negative_int,
        "0",
        "bytes per second read from one client connection; a faster publisher is slowed by not reading "
        "its socket; 0 = no limit",
        "BYTES",
    ),
    Option(
        "limit_refusal_delay",
        _non_negative_float,
        "0.75",
        "a client refused by a limit or by --authz-policy gets its Connection.Close after this delay "
        "(seconds), so that retry loops do not spin",
        "SECONDS",
    ),
    Option(
        "limits_alarm_only",
        parse_limit_name,
        "",
        "limits that only log and count what they would refuse (e.g. max-connections-per-user; 'all'); "
        "repeat or comma-separate",
        "LIMIT",
        repeatable=True,
    ),
    Option(
        "slow_client_grace",
        _positive_float,
        "2",
        "a client whose unsent data stays above --client-buffer this long is disconnected (seconds)",
        "SECONDS",
    ),
    Option(
        "allow_cidr",
        _network,
        "",
        "only these source networks may connect (CIDR, IPv4 or IPv6; repeat or comma-separate); empty = all",
        "CIDR",
        repeatable=True,
    ),
    Option(
        "deny_cidr",
        _network,
        "",
        "source networks refused at once with a TCP close (CIDR; repeat or comma-separate); wins over --allow-cidr",
        "CIDR",
        repeatable=True,
    ),
    Option(
        "authz_policy",
        load_policy,
        "",
        "JSON file mapping users to the vhosts they may use (re-read on reload); empty = no policy",
        "FILE",
    ),
)


def split_list(value: str) -> list[str]:
    # Env vars and config files may hold a list as "a,b" or "[a, b]".
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return [item.strip() for item in value.split(",") if item.strip()]
