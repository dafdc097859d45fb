"""Channel-id mapping and close bookkeeping, without sockets."""

import socket
from types import SimpleNamespace

from amqproxy.channel import Link
from amqproxy.config import Config
from amqproxy.exclusive import ExclusiveQueues
from amqproxy.nodes import BreakerPolicy, Node, NodeSet
from amqproxy.protocol import constants as c
from amqproxy.protocol.closing import CloseEvent
from amqproxy.protocol.codec import decode_method, encode_method
from amqproxy.protocol.frames import method_frame
from amqproxy.protocol.handshake import Credentials
from amqproxy.upstream import Upstream
from amqproxy.upstream_handshake import UpstreamState


def make_upstream(channel_max=3):
    config = Config()
    nodes = NodeSet(config.upstream, "round-robin", BreakerPolicy(), 50)
    pool = SimpleNamespace(config=config, pid=1, exclusive=ExclusiveQueues(), forget=lambda u: None, nodes=nodes)
    pool.upstream_gone = lambda u, unexpected, wanted: None
    upstream = Upstream(pool, Node("127.0.0.1", 5672, False), Credentials("guest", "guest"), 1)
    upstream.state = UpstreamState.OPEN
    upstream.channel_max = channel_max
    return upstream


def attached(upstream, client, client_channel, role=None):
    link = Link(client, client_channel, None, 0)
    return link if upstream.attach(link, role) else None


def test_client_channels_get_distinct_upstream_ids_until_full():
    upstream = make_upstream(channel_max=3)
    a, b = object(), object()
    links = [attached(upstream, a, 1), attached(upstream, b, 1), attached(upstream, a, 2)]
    assert [link.upstream_channel for link in links] == [1, 2, 3]
    assert [link.client_channel for link in links] == [1, 1, 2]
    assert all(link.upstream is upstream for link in links)
    assert attached(upstream, b, 2) is None  # full: the pool must dial another connection
    assert not upstream.has_room


def test_an_id_is_reused_only_after_release_and_never_while_in_use():
    upstream = make_upstream(channel_max=3)
    first = attached(upstream, None, 1)
    second = attached(upstream, None, 2)
    upstream.release(first)
    third = attached(upstream, None, 3)
    fourth = attached(upstream, None, 4)
    ids = {second.upstream_channel, third.upstream_channel, fourth.upstream_channel}
    assert ids == {1, 2, 3}
    assert attached(upstream, None, 5) is None


def test_release_of_a_stale_link_does_not_free_its_successor():
    upstream = make_upstream(channel_max=1)
    old = attached(upstream, None, 1)
    upstream.release(old)
    new = attached(upstream, None, 1)
    upstream.release(old)  # a late duplicate must not free the new link's id
    assert upstream.links[new.upstream_channel] is new


def test_an_upstream_carries_one_role_while_it_has_client_channels():
    upstream = make_upstream(channel_max=10)
    publisher = attached(upstream, object(), 1, "publish")
    assert upstream.role == "publish"
    assert upstream.accepts("publish", 0) and not upstream.accepts("consume", 0)
    upstream.release(publisher)
    assert upstream.role is None and upstream.accepts("consume", 0)


def test_an_upstream_past_max_age_takes_no_new_channels():
    upstream = make_upstream(channel_max=10)
    upstream.pool.config.upstream_max_age = 60
    assert upstream.accepts("publish", upstream.created + 59)
    assert not upstream.accepts("publish", upstream.created + 61)


class _Recorder:
    """A client that records what its links free (the upstream side is a real Upstream)."""

    def __init__(self):
        self.forgotten = []

    def forget(self, link):
        self.forgotten.append(link)


def _sent(upstream):
    frames = []
    upstream.send = lambda data, received_at=0.0: frames.append(bytes(data))
    return frames


def test_client_initiated_close_frees_both_ids_once_the_broker_answers():
    upstream, client = make_upstream(channel_max=10), _Recorder()
    sent = _sent(upstream)
    link = attached(upstream, client, 1)
    assert not link.closing
    assert link.close_event(CloseEvent.CLIENT_CLOSE) == (b"", True)  # the client's Close goes upstream as it is
    assert link.closing and link.upstream_channel in upstream.links and not client.forgotten
    assert link.close_event(CloseEvent.CLIENT_CLOSE) == (b"", False)  # a duplicate is dropped
    assert link.close_event(CloseEvent.BROKER_CLOSE_OK) == (b"", True)  # the broker's Close-Ok answers the client
    assert link.upstream_channel not in upstream.links and client.forgotten == [link] and sent == []


def test_broker_initiated_close_is_answered_upstream_after_the_clients_close_ok():
    upstream, client = make_upstream(channel_max=10), _Recorder()
    sent = _sent(upstream)
    link = attached(upstream, client, 1)
    assert link.close_event(CloseEvent.BROKER_CLOSE) == (b"", True)
    assert link.client_not_listening and sent == []
    assert link.close_event(CloseEvent.CLIENT_CLOSE_OK) == (b"", False)
    assert sent == [method_frame(link.upstream_channel, encode_method(c.CHANNEL_CLOSE_OK))]
    assert link.upstream_channel not in upstream.links and client.forgotten == [link]


def test_a_proxy_channel_error_closes_both_sides_with_their_own_codes():
    upstream, client = make_upstream(channel_max=10), _Recorder()
    sent = _sent(upstream)
    link = attached(upstream, client, 2)
    to_client, forward = link.close_event(CloseEvent.CLIENT_ERROR, 405, "RESOURCE_LOCKED - locked", c.QUEUE_DECLARE)
    assert not forward
    assert decode_method(to_client[7:-1]) == (
        c.CHANNEL_CLOSE,
        {"reply_code": 405, "reply_text": "RESOURCE_LOCKED - locked", "class_id": 50, "method_id": 10},
    )
    link.close_upstream(200, "closed by amqproxy")
    assert decode_method(sent[0][7:-1])[1]["reply_code"] == 200
    # The broker's Close crosses ours: the link is done once we answer it (RabbitMQ may or may
    # not send the Close-Ok for ours), and its id goes to a drain, reopened behind our Close-Ok.
    channel = link.upstream_channel
    link.close_event(CloseEvent.BROKER_CLOSE)
    assert sent[1:] == [method_frame(channel, encode_method(c.CHANNEL_CLOSE_OK)), method_frame(channel, _OPEN)]
    assert upstream.links[channel] is not link and upstream.links[channel].draining
    assert link.close_event(CloseEvent.BROKER_CLOSE_OK) == (b"", False)


_OPEN = encode_method(c.CHANNEL_OPEN)


def _broker_says(upstream, link, method):
    payload = encode_method(method)
    return upstream._on_watched(link, method, memoryview(payload))


def test_a_crossed_id_is_reused_only_after_its_drain_is_closed():
    """A late Close-Ok for the crossed Close goes to the drain (taken by the id's next user as
    the answer to its own Close, it would free the id while the broker still has the channel:
    504 "second 'channel.open' seen" for the whole connection)."""
    upstream, client = make_upstream(channel_max=10), _Recorder()
    sent = _sent(upstream)
    link = attached(upstream, client, 1)
    channel = link.upstream_channel
    link.close_event(CloseEvent.CLIENT_GONE)  # our Close...
    link.close_event(CloseEvent.BROKER_CLOSE)  # ...crossed by the broker's
    drain = upstream.links[channel]
    assert drain.draining and drain.open_pending and upstream.awaiting() == f"channel.open-ok on channel {channel}"
    successor = attached(upstream, _Recorder(), 1)
    assert successor.upstream_channel != channel  # the client's own id is taken by the drain
    assert _broker_says(upstream, drain, c.CHANNEL_CLOSE_OK) is False  # the late Close-Ok: dropped
    assert upstream.links[channel] is drain
    del sent[:]
    assert _broker_says(upstream, drain, c.CHANNEL_OPEN_OK) is False
    assert [decode_method(frame[7:-1])[0] for frame in sent] == [c.CHANNEL_CLOSE]
    assert upstream.links[channel] is drain and not drain.open_pending
    _broker_says(upstream, drain, c.CHANNEL_CLOSE_OK)  # the answer to the drain's own Close
    assert channel not in upstream.links


def test_a_link_without_a_client_has_no_client_side():
    link = Link(None, 0, None, 5)
    assert link.client_not_listening


class _Client:
    pass


def test_exclusive_queues_follow_their_client():
    registry = ExclusiveQueues()
    alice, bob, up1, up2 = _Client(), _Client(), object(), object()
    registry.add("/", "q1", alice, up1)
    registry.add("/", "q2", alice, up2)
    registry.add("/", "q3", bob, up1)
    assert registry.owner("/", "q1") is alice and registry.owner("other", "q1") is None
    registry.remove("/", "q2")
    assert registry.release_client(alice) == {up1: ["q1"]}
    assert registry.owner("/", "q1") is None and registry.owner("/", "q3") is bob
    registry.forget_upstream(up1)
    assert len(registry) == 0


class _OrderClient:
    """A client that records, in order, what its upstream leg hands it."""

    closing = False
    max_body = 131072

    def __init__(self):
        self.events = []

    def deliver(self, data, received_at):
        self.events.append(("deliver", bytes(data)))

    def upstream_lost(self, upstream, node, cause, links):
        self.events.append(("lost", cause))

    def forget(self, link):
        pass


def test_what_came_before_the_brokers_close_reaches_the_client_before_the_loss():
    """The broker acks publishes and then closes the connection, all in one read: the client
    gets the acks before it learns of the loss (a recovery then nacks only what is really
    outstanding; nacks first would cover publishes whose acks follow)."""
    upstream, client = make_upstream(channel_max=10), _OrderClient()
    upstream.pool.metrics = None
    upstream.pool.closing = set()
    broker, proxy_side = socket.socketpair()
    upstream.sock = proxy_side
    upstream.frame_max = 131072
    link = attached(upstream, client, 1)
    ack = method_frame(link.upstream_channel, encode_method(c.BASIC_ACK, delivery_tag=3, multiple=True))
    close = method_frame(
        0,
        encode_method(
            c.CONNECTION_CLOSE, reply_code=320, reply_text="CONNECTION_FORCED - shutdown", class_id=0, method_id=0
        ),
    )
    broker.sendall(ack + close)
    broker.shutdown(socket.SHUT_WR)
    upstream._read_loop()
    broker.close()
    assert [event for event, _ in client.events] == ["deliver", "lost"]
    assert client.events[0][1] == ack
