"""How one proxied channel closes: a state per side and one transition table.

A client channel is mapped onto an upstream channel, and each side closes with its own
handshake (spec 1.5.2.5 / 4.2.6: Close is answered by Close-Ok; after sending Close a peer
discards everything but Close and Close-Ok). The proxy sits between the two handshakes, so it
keeps one state per side:

client side                       upstream side
  OPEN                              NONE            (no upstream channel yet, or it is gone)
  CLOSE_SENT     ours unanswered    OPEN
  CLOSE_RECEIVED theirs unanswered  CLOSE_SENT      ours unanswered
  CROSSED        both sent; theirs  CLOSE_RECEIVED  the broker's unanswered
                 answered, ours not DONE            released: the id may be reused
  DONE           forgotten: the client may reuse the id (or the client is gone)

`TABLE[(client, upstream, event)]` gives the next states and the effects, in the order they
happen: frames to send (or the received frame to forward), and the points where the upstream
channel id is released and the client channel id forgotten. A side's id is freed only when
every Close it sent was answered and every Close it received was answered, so no reply for a
previous user can ever reach a reused id. One exception, forced by RabbitMQ: when our Close and
the broker's Close cross, the broker's Close-Ok for ours may or may not come (RabbitMQ answers
it from a channel process that our Close-Ok stops), so the link is done once the broker's Close
is answered, but its id is not free yet: it goes to a drain (`Effect.DRAIN`), which reopens it
and frees it after the open-ok and a close of its own. A late Close-Ok then reaches the drain,
never the id's next user (taken as the answer to that user's Close, it would free the id while
the broker still has the channel, and the next channel.open on it would be a 504 "second
'channel.open' seen" for the whole shared connection). Once the broker has sent Close, the proxy
answers it only with Close-Ok, never with a Close of its own.

Pure and socket-free: `channel.Link.close_event` applies a transition and carries out its
effects; tests/golden/channel_close.json pins the table to the behaviour it replaced.
"""

from __future__ import annotations

import enum
import itertools


class ClientSide(enum.Enum):
    OPEN = "open"
    CLOSE_SENT = "close_sent"
    CLOSE_RECEIVED = "close_received"
    CROSSED = "crossed"
    DONE = "done"


class UpstreamSide(enum.Enum):
    NONE = "none"
    OPEN = "open"
    CLOSE_SENT = "close_sent"
    CLOSE_RECEIVED = "close_received"
    DONE = "done"


class CloseEvent(enum.Enum):
    CLIENT_CLOSE = "client_close"  # the client sent Channel.Close
    CLIENT_CLOSE_OK = "client_close_ok"  # the client sent Channel.Close-Ok
    BROKER_CLOSE = "broker_close"  # the broker sent Channel.Close
    BROKER_CLOSE_OK = "broker_close_ok"  # the broker sent Channel.Close-Ok
    CLIENT_ERROR = "client_error"  # the proxy closes the client side (a channel error of its own)
    UPSTREAM_CLOSE = "upstream_close"  # the proxy closes the upstream side (client left, channel moved...)
    CLIENT_GONE = "client_gone"  # the client connection ended: its side is over, the upstream side closes
    UPSTREAM_GONE = "upstream_gone"  # the upstream channel died with its connection: that side answers for it


class Effect(enum.Enum):
    CLIENT_CLOSE = "client Close"  # send our Channel.Close (code, text) to the client
    CLIENT_CLOSE_OK = "client CloseOk"  # send Channel.Close-Ok to the client
    FORWARD_TO_CLIENT = "client fwd"  # pass the broker's frame on to the client
    UPSTREAM_CLOSE = "upstream Close"  # send our Channel.Close to the broker
    UPSTREAM_CLOSE_OK = "upstream CloseOk"  # send Channel.Close-Ok to the broker
    FORWARD_UPSTREAM = "upstream fwd"  # pass the client's frame on to the broker
    RELEASE = "release"  # the upstream channel id is free
    DRAIN = "drain"  # the link is done with its upstream id, which is reused only once drained
    FORGET = "forget"  # the client channel id is free


C = ClientSide
U = UpstreamSide
E = CloseEvent
Transition = tuple[ClientSide, UpstreamSide, tuple[Effect, ...]]


def _rule(client: ClientSide, upstream: UpstreamSide, event: CloseEvent) -> Transition:
    """The transition rules, once; `TABLE` holds them for every combination."""
    effects: list[Effect] = []
    c, u = client, upstream
    if event is E.CLIENT_CLOSE:
        if c is C.OPEN and u is U.NONE:  # never placed: nothing upstream to close
            effects.append(Effect.CLIENT_CLOSE_OK)
            c = C.DONE
        elif c is C.OPEN and u is U.OPEN:
            effects.append(Effect.FORWARD_UPSTREAM)  # the broker's Close-Ok will answer it
            c, u = C.CLOSE_RECEIVED, U.CLOSE_SENT
        elif c is C.CLOSE_SENT and u is not U.NONE:  # crossing our Close (or the broker's we passed on)
            if u is U.CLOSE_RECEIVED:
                effects.append(Effect.UPSTREAM_CLOSE_OK)
                u = U.DONE
            effects.append(Effect.CLIENT_CLOSE_OK)
            c = C.CROSSED
        # else: a duplicate Close never reaches the shared connection
    elif event is E.CLIENT_CLOSE_OK:
        if c is C.CLOSE_SENT or c is C.CROSSED:
            if u is U.CLOSE_RECEIVED:  # the broker's Close, passed on, is answered now
                effects.append(Effect.UPSTREAM_CLOSE_OK)
                u = U.DONE
            c = C.DONE
    elif event is E.BROKER_CLOSE:
        if u is U.OPEN and c is C.OPEN:
            effects.append(Effect.FORWARD_TO_CLIENT)  # the client's Close-Ok will answer it
            c, u = C.CLOSE_SENT, U.CLOSE_RECEIVED
        elif u in (U.OPEN, U.CLOSE_SENT, U.CLOSE_RECEIVED):
            # Nobody to tell (the client is gone or closing already): answered at once. Never
            # with a Close of ours: RabbitMQ may not answer a Close on a channel it is closing.
            effects.append(Effect.UPSTREAM_CLOSE_OK)
            if u is U.CLOSE_SENT and c is C.CLOSE_RECEIVED:
                # Our Close (the client's, passed on) crossed the broker's: both are done, and
                # the client's Close is answered by us.
                effects.append(Effect.CLIENT_CLOSE_OK)
                c = C.DONE
            u = U.DONE
    elif event is E.BROKER_CLOSE_OK:
        if u is U.CLOSE_SENT:
            u = U.DONE
            if c is C.CLOSE_RECEIVED:
                effects.append(Effect.FORWARD_TO_CLIENT)  # answers the client's own Close
                c = C.DONE
        # else: a late answer to a Close that crossed the broker's, dropped
    elif event is E.CLIENT_ERROR:
        if c is C.OPEN:
            effects.append(Effect.CLIENT_CLOSE)
            c = C.CLOSE_SENT
    elif event is E.UPSTREAM_CLOSE or event is E.CLIENT_GONE:
        if event is E.CLIENT_GONE:
            if c is C.DONE:
                return client, upstream, ()  # forgotten earlier: its upstream side goes on as it was
            c = C.DONE
        if u is U.OPEN:
            effects.append(Effect.UPSTREAM_CLOSE)
            u = U.CLOSE_SENT
        elif u is U.CLOSE_RECEIVED:
            effects.append(Effect.UPSTREAM_CLOSE_OK)
            u = U.DONE
    elif event is E.UPSTREAM_GONE:
        if u is not U.NONE:
            u = U.NONE
            if c is C.CLOSE_RECEIVED:  # the lost side answers for the broker
                effects.append(Effect.CLIENT_CLOSE_OK)
                c = C.DONE
    if upstream is not U.DONE and u is U.DONE:
        crossed = event is E.BROKER_CLOSE and upstream is U.CLOSE_SENT  # a Close-Ok may still come
        effects.append(Effect.DRAIN if crossed else Effect.RELEASE)
    if client is not C.DONE and c is C.DONE:
        effects.append(Effect.FORGET)
    return c, u, tuple(effects)


TABLE: dict[tuple[ClientSide, UpstreamSide, CloseEvent], Transition] = {
    (c, u, event): _rule(c, u, event) for c, u, event in itertools.product(ClientSide, UpstreamSide, CloseEvent)
}


def is_closing(client: ClientSide, upstream: UpstreamSide) -> bool:
    """Any Close sent or received on either side: only the close handshakes matter now."""
    return client is not C.OPEN or upstream in (U.CLOSE_SENT, U.CLOSE_RECEIVED, U.DONE)
