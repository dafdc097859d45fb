"""Byte transcripts of client handshakes and refusals through a real proxy.

Each case is a list of steps: bytes the client sends, then how many frames it waits for before
the next step. Everything the proxy sends over the whole connection, until it closes it, is the
transcript. Recorded once from a known-good proxy (`--record`), replayed by
tests/integration/test_transcripts.py against the current code: the bytes must be the same.

    python -m tests.golden.transcripts --record      # proxies started here, shared broker
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

from amqproxy.protocol import constants as c
from amqproxy.protocol.codec import encode_method, encode_table

OUT = Path(__file__).with_name("transcripts.json")
FRAME_END = b"\xce"

# Proxy configurations the cases run against (extra flags; the policy file is written at start).
CONFIGS = {
    "default": [],
    "authz": ["--authz-policy", "{policy}", "--limit-refusal-delay", "0"],
}
POLICY = {"guest": ["allowed-vhost"]}


def frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + FRAME_END


def method(channel: int, which: tuple[int, int], **args) -> bytes:
    return frame(c.FRAME_METHOD, channel, encode_method(which, **args))


def plain(user: str, password: str) -> bytes:
    return f"\0{user}\0{password}".encode()


def amqplain(user: str, password: str) -> bytes:
    return encode_table({"LOGIN": user, "PASSWORD": password})[4:]


CAPS = {"capabilities": {"authentication_failure_close": True, "consumer_cancel_notify": True}}
HEADER = c.PROTOCOL_HEADER
HEARTBEAT = frame(c.FRAME_HEARTBEAT, 0, b"")


def start_ok(user="guest", password="guest", mechanism="PLAIN", properties=None) -> bytes:
    response = amqplain(user, password) if mechanism == "AMQPLAIN" else plain(user, password)
    return method(
        0,
        c.CONNECTION_START_OK,
        client_properties=properties if properties is not None else CAPS,
        mechanism=mechanism,
        response=response,
        locale="en_US",
    )


def tune_ok(channel_max=2047, frame_max=131072, heartbeat=0) -> bytes:
    return method(0, c.CONNECTION_TUNE_OK, channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat)


def open_(vhost="/") -> bytes:
    return method(0, c.CONNECTION_OPEN, virtual_host=vhost)


CLOSE = method(0, c.CONNECTION_CLOSE, reply_code=200, reply_text="bye", class_id=0, method_id=0)
CLOSE_OK = method(0, c.CONNECTION_CLOSE_OK)
HANDSHAKE = [(HEADER, 1), (start_ok(), 1), (tune_ok(), 0), (open_(), 1)]

# name -> (config, steps); a step is (bytes to send, frames to wait for). After the last step
# the client reads until the proxy closes; a Connection.Close from the proxy is answered.
CASES: dict[str, tuple[str, list[tuple[bytes, int]]]] = {
    "plain_ok_then_close": ("default", [*HANDSHAKE, (CLOSE, 1)]),
    "amqplain_ok": (
        "default",
        [(HEADER, 1), (start_ok(mechanism="AMQPLAIN"), 1), (tune_ok(), 0), (open_(), 1), (CLOSE, 1)],
    ),
    "channel_open_close": (
        "default",
        [
            *HANDSHAKE,
            (method(1, c.CHANNEL_OPEN), 1),
            (method(1, c.CHANNEL_CLOSE, reply_code=200, reply_text="", class_id=0, method_id=0), 1),
            (CLOSE, 1),
        ],
    ),
    "heartbeats_during_handshake": (
        "default",
        [(HEADER, 1), (HEARTBEAT + start_ok(), 1), (HEARTBEAT + tune_ok(heartbeat=0), 0), (open_(), 1), (CLOSE, 1)],
    ),
    "pipelined_handshake": ("default", [(HEADER + start_ok() + tune_ok() + open_(), 3), (CLOSE, 1)]),
    "protocol_header_0_8": ("default", [(b"AMQP\x01\x01\x08\x00", 1)]),
    "protocol_header_http": ("default", [(b"GET / HTTP/1.1\r\n\r\n", 1)]),
    "wrong_password_with_failure_close": ("default", [(HEADER, 1), (start_ok(password="nope"), 1)]),
    "wrong_password_without_failure_close": (
        "default",
        [(HEADER, 1), (start_ok(password="nope", properties={}), 1)],
    ),
    "unknown_mechanism": ("default", [(HEADER, 1), (start_ok(mechanism="CRAM-MD5"), 1)]),
    "external_without_certificate": ("default", [(HEADER, 1), (start_ok(mechanism="EXTERNAL"), 1)]),
    "unknown_vhost": ("default", [(HEADER, 1), (start_ok(), 1), (tune_ok(), 0), (open_("no-such-vhost"), 1)]),
    "tune_ok_frame_max_too_small": ("default", [(HEADER, 1), (start_ok(), 1), (tune_ok(frame_max=1024), 1)]),
    "tune_ok_frame_max_too_large": ("default", [(HEADER, 1), (start_ok(), 1), (tune_ok(frame_max=1 << 20), 1)]),
    "tune_ok_channel_max_too_large": ("default", [(HEADER, 1), (start_ok(), 1), (tune_ok(channel_max=4000), 1)]),
    "open_before_tune_ok": ("default", [(HEADER, 1), (start_ok(), 1), (open_(), 1)]),
    "close_during_handshake": ("default", [(HEADER, 1), (CLOSE, 1)]),
    "method_on_channel_1_during_handshake": ("default", [(HEADER, 1), (method(1, c.CHANNEL_OPEN), 1)]),
    "bad_frame_end": ("default", [(HEADER, 1), (start_ok()[:-1] + b"\x00", 1)]),
    "method_on_unopened_channel": ("default", [*HANDSHAKE, (method(2, c.BASIC_QOS, prefetch_count=1), 1)]),
    "channel_id_above_channel_max": (
        "default",
        [(HEADER, 1), (start_ok(), 1), (tune_ok(channel_max=10), 0), (open_(), 1), (method(11, c.CHANNEL_OPEN), 1)],
    ),
    "unexpected_connection_method": ("default", [*HANDSHAKE, (method(0, c.CONNECTION_OPEN, virtual_host="/"), 1)]),
    "content_frame_on_channel_0": ("default", [*HANDSHAKE, (frame(c.FRAME_BODY, 0, b"x"), 1)]),
    "authz_vhost_refused": ("authz", [(HEADER, 1), (start_ok(), 1), (tune_ok(), 0), (open_("/"), 1)]),
    "authz_user_refused": ("authz", [(HEADER, 1), (start_ok(user="someone-else"), 1)]),
}


def _frames_in(data: bytes) -> list[bytes]:
    """Complete frames at the start of `data` (a lone protocol header counts as one)."""
    out = []
    pos = 0
    if data.startswith(b"AMQP"):
        out.append(data[:8])
        pos = 8
    while len(data) - pos >= 7:
        (size,) = struct.unpack_from(">I", data, pos + 3)
        if len(data) - pos < size + 8:
            break
        out.append(data[pos : pos + size + 8])
        pos += size + 8
    return out


def _is_connection_close(data: bytes) -> bool:
    return (
        len(data) >= 11
        and data[0] == c.FRAME_METHOD
        and struct.unpack_from(">HHH", data, 1)[0] == 0
        and (struct.unpack_from(">HH", data, 7) == c.CONNECTION_CLOSE)
    )


def run_case(host: str, port: int, steps: list[tuple[bytes, int]], timeout: float = 10.0) -> bytes:
    """Send each step, wait for its frames; then read until the proxy closes the connection."""
    received = b""
    answered_close = False
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as sock:

        def read_more() -> bool:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return False
            nonlocal received
            received += chunk
            return bool(chunk)

        def answer_close() -> None:
            nonlocal answered_close
            if not answered_close and any(_is_connection_close(f) for f in _frames_in(received)):
                answered_close = True
                try:
                    sock.sendall(CLOSE_OK)
                except OSError:
                    pass

        for data, wait_frames in steps:
            try:
                sock.sendall(data)
            except OSError:
                break
            want = len(_frames_in(received)) + wait_frames
            while len(_frames_in(received)) < want:
                if not read_more():
                    return received
        while True:
            answer_close()
            if not read_more():
                return received


def start_proxies(base: Path):
    """One proxy per configuration (tests/support's ProxyProcess), against the shared broker."""
    from tests.support.proxy import ProxyProcess

    policy = base / "policy.json"
    policy.write_text(json.dumps(POLICY))
    procs = {}
    for name, flags in CONFIGS.items():
        args = [a.format(policy=policy) for a in flags]
        procs[name] = ProxyProcess(base / f"proxy-{name}.log", args).start().wait_ready()
    return procs


def record() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        procs = start_proxies(Path(tmp))
        try:
            return {
                name: run_case(procs[config].host, procs[config].port, steps).hex()
                for name, (config, steps) in CASES.items()
            }
        finally:
            for proc in procs.values():
                proc.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help=f"record every case into {OUT.name}")
    if not parser.parse_args().record:
        parser.print_help()
        sys.exit(2)
    transcripts = record()
    OUT.write_text(json.dumps(transcripts, indent=1, sort_keys=True) + "\n")
    print(f"{len(transcripts)} transcripts -> {OUT}")
