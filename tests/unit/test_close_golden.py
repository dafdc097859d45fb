"""The channel-close transition table against the golden record of the code it replaced.

tests/golden/channel_close.json was recorded from the ClientSession/Upstream close paths as
they were before `protocol.closing` (tests/golden/record_channel_close.py, in the history):
for every state those paths reached and every close event, what went to the client, what went
upstream, and whether the upstream id was released and the client id forgotten. Every sequence
of up to six events, from a placed and an unplaced channel, is replayed here through the table
(the way the forwarding loops use it) and must give the recorded effects at every step.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from amqproxy.protocol.closing import TABLE, ClientSide, CloseEvent, Effect, UpstreamSide, is_closing

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "golden" / "channel_close.json").read_text())
CLIENT_CH, UPSTREAM_CH = 3, 5


class Channel:
    """What the loops do around the table for one channel (client.py, upstream.py, channel.py)."""

    def __init__(self, start: str) -> None:
        self.c = ClientSide.OPEN
        self.u = UpstreamSide.OPEN if start == "placed" else UpstreamSide.NONE
        self.gone = False

    def apply(self, event: CloseEvent, frame: str = "") -> list[str]:
        self.c, self.u, effects = TABLE[(self.c, self.u, event)]
        out = []
        for effect in effects:
            if effect is Effect.CLIENT_CLOSE:
                out.append(f"client Close 405 ch{CLIENT_CH}")
            elif effect is Effect.CLIENT_CLOSE_OK:
                out.append(f"client CloseOk ch{CLIENT_CH}")
            elif effect is Effect.FORWARD_TO_CLIENT:
                out.append(f"client fwd {frame} ch{CLIENT_CH}")
            elif effect is Effect.UPSTREAM_CLOSE:
                out.append(f"upstream Close 200 ch{UPSTREAM_CH}")
            elif effect is Effect.UPSTREAM_CLOSE_OK:
                out.append(f"upstream CloseOk ch{UPSTREAM_CH}")
            elif effect is Effect.FORWARD_UPSTREAM:
                out.append(f"upstream fwd {frame} ch{UPSTREAM_CH}")
        # A drained id (closes crossed) is released from this channel's point of view: the
        # recorded code freed it at once; the drain that now reuses it only once the broker is
        # past the crossing is the upstream's (test_channel_close.py shows it on the wire).
        released = Effect.RELEASE in effects or Effect.DRAIN in effects
        tail = (["release"] if released else []) + (["forget"] if Effect.FORGET in effects else [])
        return out + tail

    def event(self, name: str) -> list[str]:
        placed = self.u in (UpstreamSide.OPEN, UpstreamSide.CLOSE_SENT, UpstreamSide.CLOSE_RECEIVED)
        if name in ("client_close", "client_close_ok"):
            if self.gone:
                return []  # nothing reads the client any more
            if self.c is ClientSide.DONE:
                return ["error 504"]  # the id is free: a method on it is a channel error
            frame = "Close" if name == "client_close" else "CloseOk"
            return self.apply(CloseEvent(name), frame)
        if name in ("broker_close", "broker_close_ok"):
            if not placed:
                return []  # released (or never placed): the reader drops frames for unknown channels
            return self.apply(CloseEvent(name), "Close" if name == "broker_close" else "CloseOk")
        if name == "proxy_close":
            # The loop decides a channel error only for a method on an open, placed channel.
            if self.gone or is_closing(self.c, self.u) or self.u is UpstreamSide.NONE:
                return []
            return self.apply(CloseEvent.CLIENT_ERROR) + self.apply(CloseEvent.UPSTREAM_CLOSE)
        assert name == "client_gone"
        if self.gone:
            return []
        self.gone = True
        return self.apply(CloseEvent.CLIENT_GONE)


def _expected_steps(start: str, sequence: tuple[str, ...]) -> list[list[str]]:
    state = GOLDEN["starts"][start]
    steps = []
    for name in sequence:
        effects, state = GOLDEN["table"][state][name]
        steps.append(effects)
    return steps


@pytest.mark.parametrize("start", ["placed", "unplaced"])
def test_every_sequence_of_up_to_six_close_events_matches_the_golden_record(start):
    events = GOLDEN["events"]
    checked = 0
    for length in range(1, GOLDEN["max_length"] + 1):
        for sequence in itertools.product(events, repeat=length):
            channel = Channel(start)
            got = [channel.event(name) for name in sequence]
            assert got == _expected_steps(start, sequence), f"{start}: {' '.join(sequence)}"
            checked += 1
    assert checked == sum(len(events) ** n for n in range(1, GOLDEN["max_length"] + 1))


def test_the_table_covers_every_state_and_event():
    assert len(TABLE) == len(ClientSide) * len(UpstreamSide) * len(CloseEvent)


def test_ids_are_freed_only_when_both_handshakes_of_a_side_are_over():
    # A sample of the rule, readable: the client closes, the broker answers.
    c, u, effects = TABLE[(ClientSide.OPEN, UpstreamSide.OPEN, CloseEvent.CLIENT_CLOSE)]
    assert (c, u, effects) == (ClientSide.CLOSE_RECEIVED, UpstreamSide.CLOSE_SENT, (Effect.FORWARD_UPSTREAM,))
    c, u, effects = TABLE[(c, u, CloseEvent.BROKER_CLOSE_OK)]
    assert (c, u) == (ClientSide.DONE, UpstreamSide.DONE)
    assert effects == (Effect.FORWARD_TO_CLIENT, Effect.RELEASE, Effect.FORGET)
    # The broker closes; the client leaves before answering: the proxy answers the broker.
    c, u, _ = TABLE[(ClientSide.OPEN, UpstreamSide.OPEN, CloseEvent.BROKER_CLOSE)]
    assert TABLE[(c, u, CloseEvent.CLIENT_GONE)][2] == (Effect.UPSTREAM_CLOSE_OK, Effect.RELEASE, Effect.FORGET)


def test_broker_frames_never_make_the_proxy_send_a_close_of_its_own_to_the_client():
    # upstream.py forwards, for a broker Close or Close-Ok, at most a Close-Ok of ours.
    for (_c, _u, event), (_c2, _u2, effects) in TABLE.items():
        if event in (CloseEvent.BROKER_CLOSE, CloseEvent.BROKER_CLOSE_OK):
            assert Effect.CLIENT_CLOSE not in effects
            assert not (Effect.CLIENT_CLOSE_OK in effects and Effect.FORWARD_TO_CLIENT in effects)
