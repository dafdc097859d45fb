"""Record how today's code closes one channel, for every ordering of up to six close events.

Drives the real ClientSession / Upstream close paths (not a model of them) with fake sockets,
and writes tests/golden/channel_close.json: for every sequence of events, what went to the
client, what went upstream, and when the upstream channel id was released and the client
channel id forgotten. `test_close_golden.py` replays every sequence against the current code.

    python tests/golden/record_channel_close.py
"""

from __future__ import annotations

import itertools
import json
import struct
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from amqproxy.channel import Link  # noqa: E402
from amqproxy.client import ClientSession  # noqa: E402
from amqproxy.config import Config, Node  # noqa: E402
from amqproxy.exclusive import ExclusiveQueues  # noqa: E402
from amqproxy.protocol import constants as c  # noqa: E402
from amqproxy.protocol.codec import decode_method, encode_method  # noqa: E402
from amqproxy.protocol.errors import ProtocolError  # noqa: E402
from amqproxy.recovery import Topology  # noqa: E402
from amqproxy.upstream import Upstream  # noqa: E402

OUT = Path(__file__).with_name("channel_close.json")

CLIENT_CHANNEL = 3
UPSTREAM_CHANNEL = 5

# The close events of one channel.
EVENTS = (
    "client_close",  # the client sends Channel.Close
    "client_close_ok",  # the client sends Channel.Close-Ok
    "broker_close",  # the broker sends Channel.Close (e.g. 404)
    "broker_close_ok",  # the broker sends Channel.Close-Ok
    "proxy_close",  # the proxy closes the channel with an error of its own (e.g. 405 exclusive queue)
    "client_gone",  # the client connection ends (socket closed, Connection.Close)
)
STARTS = ("placed", "unplaced")  # the channel has an upstream channel, or none yet
MAX_LENGTH = 6


class _Anything:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _FakeOutbox:
    def __init__(self, log: list[str], side: str) -> None:
        self.log = log
        self.side = side
        self.buffered = 0
        self.high_watermark = 1 << 30

    def put(self, data, received_at: float = 0.0) -> None:
        self.log.extend(describe_frames(bytes(data), self.side))


def describe_frames(data: bytes, side: str, forwarded: bool = False) -> list[str]:
    out = []
    pos = 0
    while pos < len(data):
        frame_type, channel, size = struct.unpack_from(">BHI", data, pos)
        payload = data[pos + 7 : pos + 7 + size]
        pos += 8 + size
        method, args = decode_method(payload)
        name = {c.CHANNEL_CLOSE: "Close", c.CHANNEL_CLOSE_OK: "CloseOk"}.get(method, str(method))
        if method == c.CHANNEL_CLOSE and not forwarded:
            name += f" {args['reply_code']}"
        out.append(f"{side} {'fwd ' if forwarded else ''}{name} ch{channel}")
    return out


class Harness:
    """One client session with one channel, on one upstream connection, both with fake sockets."""

    def __init__(self, start: str) -> None:
        self.log: list[str] = []
        config = Config()
        proxy = _Anything()
        proxy.metrics = _Anything()
        proxy.config = config
        pool = _Anything()
        pool.exclusive = ExclusiveQueues()
        pool.metrics = None
        pool.config = config
        proxy.pool = pool
        client = ClientSession.__new__(ClientSession)
        client.proxy = proxy
        client.pool = pool
        client.config = config
        client.channels = {}
        client.outbox = _FakeOutbox(self.log, "client")
        client._batches = defaultdict(bytearray)
        client._received_at = 0.0
        client.closing = False
        client.vhost = "/"
        client.credentials = None
        client.auth_user = ""
        client.id = "golden"
        client.address = "golden"
        client.topology = Topology()
        client.capabilities = frozenset()
        client.blocked_by = set()
        client.exclusive_upstream = None
        client.preferred = {}
        client.upstream_ids = set()
        upstream = Upstream.__new__(Upstream)
        upstream.pool = pool
        upstream.node = Node("golden", 1, False)
        upstream.id = 1
        upstream.links = {}
        upstream.outbox = _FakeOutbox(self.log, "upstream")
        upstream.state = "open"
        upstream.vhost = "/"
        upstream.role = None
        upstream.idle_since = 0.0
        upstream.blocked_clients = set()
        self.client, self.upstream = client, upstream
        link = Link(client, CLIENT_CHANNEL, None, 0)
        client.channels[CLIENT_CHANNEL] = link
        if start == "placed":
            link.upstream = upstream
            link.upstream_channel = UPSTREAM_CHANNEL
            upstream.links[UPSTREAM_CHANNEL] = link
        self.link = link
        self.gone = False

    # -- what the loops do with a frame (client.py _forward_loop, upstream.py _read_loop) ----

    def client_method(self, method: tuple[int, int], payload: bytes) -> None:
        client, link = self.client, self.link
        if self.gone:
            return  # the session has ended: nothing reads the client any more
        if client.channels.get(CLIENT_CHANNEL) is not link:
            self.log.append("error 504")  # RabbitMQ: a method on a channel that is not open
            return
        if link.closing:
            client._flush()
            client._on_closing_channel_method(link, method)
            return
        if link.upstream is None:
            client._place(link, method)  # Close / Close-Ok are answered without placing
            return
        if client._on_control_method(link, method, memoryview(payload)):
            data = bytes(struct.pack(">BHI", 1, link.upstream_channel, len(payload)) + payload + b"\xce")
            self.log.extend(describe_frames(data, "upstream", forwarded=True))

    def broker_method(self, method: tuple[int, int], payload: bytes) -> None:
        upstream = self.upstream
        link = upstream.links.get(UPSTREAM_CHANNEL)
        if link is None:
            return  # released: the reader drops frames for unknown channels
        rewritten = upstream._on_watched(link, method, memoryview(payload))
        if not rewritten:
            return
        client = link.client
        if client is None or client.closing:
            return
        if rewritten is True:
            self.log.append(f"client fwd {'Close' if method == c.CHANNEL_CLOSE else 'CloseOk'} ch{CLIENT_CHANNEL}")
        else:
            self.log.extend(describe_frames(_frame(link.client_channel, rewritten), "client"))

    def event(self, name: str) -> list[str]:
        self.log.clear()
        link = self.link
        in_links_before = self.upstream.links.get(UPSTREAM_CHANNEL) is link
        in_channels_before = self.client.channels.get(CLIENT_CHANNEL) is link
        try:
            if name == "client_close":
                self.client_method(c.CHANNEL_CLOSE, encode_method(c.CHANNEL_CLOSE, reply_code=200, reply_text="bye"))
            elif name == "client_close_ok":
                self.client_method(c.CHANNEL_CLOSE_OK, encode_method(c.CHANNEL_CLOSE_OK))
            elif name == "broker_close":
                self.broker_method(
                    c.CHANNEL_CLOSE, encode_method(c.CHANNEL_CLOSE, reply_code=404, reply_text="NOT_FOUND - no queue")
                )
            elif name == "broker_close_ok":
                self.broker_method(c.CHANNEL_CLOSE_OK, encode_method(c.CHANNEL_CLOSE_OK))
            elif name == "proxy_close":
                # The proxy decides a channel error while the channel is open and placed (the
                # forwarding loop reaches this only for a method on an open channel).
                if not self.gone and not link.closing and link.upstream is not None:
                    self.client._proxy_close_channel(link, c.RESOURCE_LOCKED, "locked", c.QUEUE_DECLARE)
            elif name == "client_gone":
                if not self.gone:
                    self.gone = True
                    self.client.closing = True
                    self.client._release_channels()
        except ProtocolError as exc:
            self.log.append(f"error {exc.reply_code}")
        if in_links_before and self.upstream.links.get(UPSTREAM_CHANNEL) is not link:
            self.log.append("release")
        if in_channels_before and self.client.channels.get(CLIENT_CHANNEL) is not link:
            self.log.append("forget")
        return list(self.log)


def _frame(channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce"


def state_of(h: Harness) -> str:
    """The close bookkeeping of the channel as today's code keeps it (flags on Link, presence)."""
    link = h.link
    flags = [
        name
        for name in (
            "c_close_sent", "c_close_received", "c_close_ok_sent", "c_close_ok_received",
            "u_close_sent", "u_close_received", "u_close_ok_sent", "u_close_ok_received", "closing",
        )
        if getattr(link, name)
    ]  # fmt: skip
    if link.upstream is not None:
        flags.append("placed")
    if h.upstream.links.get(UPSTREAM_CHANNEL) is link:
        flags.append("in_upstream")
    if h.client.channels.get(CLIENT_CHANNEL) is link:
        flags.append("in_client")
    if h.gone:
        flags.append("gone")
    return "+".join(flags) or "-"


def record() -> dict:
    """Every sequence of up to MAX_LENGTH events from each start, replayed on fresh objects; the
    table maps (state, event) to (effects, next state), and is checked to be a function: the
    same state and event always give the same effects, whatever sequence led there."""
    table: dict[str, dict[str, list]] = {}
    starts = {}
    for start in STARTS:
        starts[start] = state_of(Harness(start))
        for length in range(1, MAX_LENGTH + 1):
            for seq in itertools.product(EVENTS, repeat=length):
                harness = Harness(start)
                for name in seq[:-1]:
                    harness.event(name)
                before = state_of(harness)
                effects = harness.event(seq[-1])
                entry = [effects, state_of(harness)]
                known = table.setdefault(before, {}).setdefault(seq[-1], entry)
                if known != entry:
                    raise SystemExit(f"not a function of the state: {start} {seq}: {known} != {entry}")
    return {"starts": starts, "table": table}


if __name__ == "__main__":
    result = record()
    result.update(events=EVENTS, max_length=MAX_LENGTH)
    OUT.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{len(result['table'])} states, {sum(len(v) for v in result['table'].values())} transitions -> {OUT}")
