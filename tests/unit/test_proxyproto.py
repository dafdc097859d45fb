"""PROXY protocol header parsing, v1 and v2, with bytes only."""

import ipaddress
import struct

import pytest

from amqproxy.protocol.proxyproto import V2_SIGNATURE, ProxyHeaderError, encode, parse, trusted


def test_v1_tcp4_and_tcp6():
    line = b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 5673\r\n"
    assert parse(line + b"AMQP") == (len(line), ("203.0.113.7", 5555))
    line6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 6000 5673\r\n"
    assert parse(line6) == (len(line6), ("2001:db8::7", 6000))
    assert parse(b"PROXY UNKNOWN\r\n") == (15, None)


def test_v1_incomplete_then_whole():
    line = b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 5673\r\n"
    assert parse(line[:20]) is None
    assert parse(line)[0] == len(line)


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 nonsense 10.0.0.1 1 2\r\n",
        b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",  # family mismatch
        b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY " + b"x" * 120,
        b"AMQP\x00\x00\x09\x01",
    ],
)
def test_v1_garbage_is_refused(data):
    with pytest.raises(ProxyHeaderError):
        parse(data)


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack(">BBH", 0x20 | command, family, len(body)) + body


def test_v2_inet_and_inet6_and_local():
    body4 = ipaddress.IPv4Address("198.51.100.9").packed + ipaddress.IPv4Address("10.0.0.1").packed
    body4 += struct.pack(">HH", 4321, 5673)
    header = v2(1, 0x11, body4)
    assert parse(header + b"AMQP") == (len(header), ("198.51.100.9", 4321))
    body6 = ipaddress.IPv6Address("2001:db8::9").packed + ipaddress.IPv6Address("2001:db8::1").packed
    body6 += struct.pack(">HH", 999, 5673)
    assert parse(v2(1, 0x21, body6))[1] == ("2001:db8::9", 999)
    assert parse(v2(0, 0x00, b"")) == (16, None)


def test_v2_incomplete_and_bad_signature():
    header = v2(1, 0x11, b"\x00" * 12)
    assert parse(header[:10]) is None
    assert parse(header[:20]) is None
    with pytest.raises(ProxyHeaderError):
        parse(b"\r\n\r\n\x00\r\nQUIX\n" + b"\x00" * 8)


def test_trusted_sources():
    networks = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert trusted("10.1.2.3", networks) and trusted("::1", networks)
    assert not trusted("192.0.2.1", networks) and not trusted("bogus", networks)


@pytest.mark.parametrize(
    ("source", "destination"),
    [(("10.1.2.3", 40000), ("10.0.0.1", 5672)), (("2001:db8::7", 51000), ("2001:db8::1", 5672))],
)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_encoded_headers_parse_back_to_their_source(version, source, destination):
    header = encode(version, source, destination)
    assert parse(header + b"AMQP\x00\x00\x09\x01") == (len(header), source)


def test_v1_header_is_the_spec_line():
    assert encode("v1", ("127.0.0.1", 1234), ("127.0.0.1", 5672)) == (b"PROXY TCP4 127.0.0.1 127.0.0.1 1234 5672\r\n")


def test_mixed_families_are_sent_as_ipv6():
    header = encode("v1", ("::ffff:127.0.0.1", 1234), ("127.0.0.1", 5672))
    assert header.startswith(b"PROXY TCP6 ")
    assert parse(header) == (len(header), (str(ipaddress.ip_address("::ffff:127.0.0.1")), 1234))
