"""PROXY protocol v1 (text) and v2 (binary) headers, as sent by HAProxy and cloud load balancers.

Pure parsing: `parse(data)` returns None while the header is incomplete, the header's length
and the original source address once it is whole, and raises ProxyHeaderError when the bytes
are not a PROXY header. Only the source address matters to the proxy (limits, logs, audit).

`encode(version, source, destination)` builds the header the proxy sends to a broker whose
listener requires one (RabbitMQ's `proxy_protocol = true`).
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's longest v1 line, CRLF included


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header."""


def parse(data: bytes) -> tuple[int, tuple[str, int] | None] | None:
    """(bytes consumed, (source host, source port) or None for LOCAL/UNKNOWN), or None if incomplete."""
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data[:1] == b"P":
        return _parse_v1(data)
    raise ProxyHeaderError("expected a PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[int, tuple[str, int] | None] | None:
    if not V1_PREFIX.startswith(data[:6]):
        raise ProxyHeaderError("expected 'PROXY '")
    end = data.find(b"\r\n")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        return None
    parts = data[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return end + 2, None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    try:
        source = ipaddress.ip_address(parts[2])
        port = int(parts[4])
    except ValueError as exc:
        raise ProxyHeaderError(f"malformed PROXY v1 address: {exc}") from None
    if (source.version == 4) != (parts[1] == "TCP4") or not 0 <= port <= 65535:
        raise ProxyHeaderError("PROXY v1 address does not match its family")
    return end + 2, (str(source), port)


def _parse_v2(data: bytes) -> tuple[int, tuple[str, int] | None] | None:
    if len(data) < 16:
        if not V2_SIGNATURE.startswith(data[:12]):
            raise ProxyHeaderError("bad PROXY v2 signature")
        return None
    if data[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("bad PROXY v2 signature")
    version_command, family, length = struct.unpack_from(">BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError("unsupported PROXY protocol version")
    total = 16 + length
    if len(data) < total:
        return None
    command = version_command & 0x0F
    if command == 0:  # LOCAL: health checks from the balancer itself
        return total, None
    if command != 1:
        raise ProxyHeaderError("unknown PROXY v2 command")
    address_family = family >> 4
    if address_family == 1 and length >= 12:  # AF_INET
        source = ipaddress.IPv4Address(data[16:20])
        (port,) = struct.unpack_from(">H", data, 24)
        return total, (str(source), port)
    if address_family == 2 and length >= 36:  # AF_INET6
        source6 = ipaddress.IPv6Address(data[16:32])
        (port,) = struct.unpack_from(">H", data, 48)
        return total, (str(source6), port)
    return total, None  # AF_UNSPEC / AF_UNIX: keep the peer address


def trusted(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def encode(version: str, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY header ("v1" text or "v2" binary, command PROXY over TCP) for these endpoints."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:  # e.g. an IPv4-mapped peer: fall back to the v6 forms
        src, dst = _as_v6(src), _as_v6(dst)
    if version == "v1":
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")
    if version == "v2":
        family_byte = 0x11 if src.version == 4 else 0x21  # AF_INET / AF_INET6, STREAM
        addresses = src.packed + dst.packed + struct.pack(">HH", source[1], destination[1])
        return V2_SIGNATURE + struct.pack(">BBH", 0x21, family_byte, len(addresses)) + addresses
    raise ValueError(f"unknown PROXY protocol version {version!r}")


def _as_v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ip if isinstance(ip, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{ip}")
