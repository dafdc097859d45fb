"""Channel-id mapping and close bookkeeping, without sockets."""

from types import SimpleNamespace

from amqproxy.channel import Link
from amqproxy.config import Config, Node
from amqproxy.exclusive import ExclusiveQueues
from amqproxy.nodes import BreakerPolicy, NodeSet
from amqproxy.protocol.handshake import Credentials
from amqproxy.upstream import Upstream


def make_upstream(channel_max=3):
    config = Config()
    nodes = NodeSet(config.upstream, "round-robin", BreakerPolicy(), 50)
    pool = SimpleNamespace(config=config, pid=1, exclusive=ExclusiveQueues(), forget=lambda u: None, nodes=nodes)
    pool.upstream_gone = lambda u, unexpected, wanted: None
    upstream = Upstream(pool, Node("127.0.0.1", 5672, False), Credentials("guest", "guest"), 1)
    upstream.state = "open"
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


def test_client_initiated_close_finishes_both_sides_once():
    link = Link(object(), 1, None, 5)
    assert not link.closing
    link.begin_close()
    link.c_close_received = link.u_close_sent = True  # client Close forwarded upstream
    assert link.closing and not link.upstream_side_done() and not link.client_side_done()
    link.u_close_ok_received = link.c_close_ok_sent = True  # broker Close-Ok forwarded
    assert link.upstream_side_done() and link.client_side_done()


def test_broker_initiated_close_needs_the_clients_close_ok():
    link = Link(object(), 1, None, 5)
    link.u_close_received = link.c_close_sent = True  # broker Close forwarded to client
    assert not link.upstream_side_done()
    link.c_close_ok_received = link.u_close_ok_sent = True  # client's Close-Ok forwarded
    assert link.upstream_side_done() and link.client_side_done()


def test_simultaneous_close_waits_for_both_answers():
    link = Link(object(), 1, None, 5)
    link.u_close_sent = True  # ours
    link.u_close_received = True  # the broker's, crossing ours
    link.u_close_ok_sent = True
    assert not link.upstream_side_done()  # the broker still owes a Close-Ok for ours
    link.u_close_ok_received = True
    assert link.upstream_side_done()


def test_orphaned_link_client_side_is_done():
    link = Link(None, 0, None, 5)
    assert link.client_side_done()


class _Client:
    exclusive_upstream = None


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
