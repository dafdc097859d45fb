"""Circuit breakers, backoff and node choice, with a fake clock and fixed randomness."""

import random

from amqproxy.nodes import BackoffPolicy, BreakerPolicy, CircuitBreaker, Node, NodeSet


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock, **policy):
    changes = []
    b = CircuitBreaker(
        BreakerPolicy(jitter=0.0, **policy), lambda old, new: changes.append((old, new)), clock, lambda: 0.5
    )
    return b, changes


def test_consecutive_failures_open_then_half_open_probe_closes():
    clock = Clock()
    b, changes = breaker(clock, failures=3, open_time=5)
    for _ in range(2):
        b.record_failure()
    assert b.state == "closed" and b.allows_attempt()
    b.record_failure()
    assert b.state == "open" and not b.allows_attempt()
    clock.now += 5
    assert b.allows_attempt()  # half-open: exactly one probe
    assert b.state == "half-open" and not b.allows_attempt()
    b.record_success()
    assert b.state == "closed" and b.allows_attempt()
    assert changes == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_failed_probe_reopens_for_longer_up_to_the_cap():
    clock = Clock()
    b, _ = breaker(clock, failures=1, open_time=5, open_time_max=12)
    periods = []
    b.record_failure()
    for _ in range(4):
        periods.append(b.open_until - clock.now)
        clock.now = b.open_until
        assert b.allows_attempt()
        b.record_failure()
    assert periods == [5, 10, 12, 12]


def test_failure_ratio_over_the_window():
    clock = Clock()
    b, _ = breaker(clock, failures=100, failure_ratio=0.5, window=10, min_requests=4)
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.state == "closed"  # 3 attempts: below min_requests
    b.record_success()
    b.record_failure()  # 3 failures of 5
    assert b.state == "open"


def test_old_events_leave_the_window():
    clock = Clock()
    b, _ = breaker(clock, failures=100, failure_ratio=0.5, window=10, min_requests=4)
    for _ in range(3):
        b.record_failure()
    clock.now += 11
    for _ in range(3):
        b.record_success()
    b.record_failure()
    assert b.state == "closed"


def test_backoff_grows_with_jitter_and_stays_capped():
    delays = BackoffPolicy(initial=0.1, maximum=1.0, multiplier=2).delays(rng=lambda: 1.0)
    assert [round(next(delays), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    low = BackoffPolicy(initial=0.1, maximum=1.0, multiplier=2).delays(rng=lambda: 0.0)
    assert [round(next(low), 3) for _ in range(3)] == [0.05, 0.1, 0.2]


def nodes(n, strategy="round-robin", percent=50):
    return NodeSet([Node(f"h{i}", 5672, False) for i in range(n)], strategy, BreakerPolicy(failures=1, jitter=0.0),
                   percent, clock=Clock(), rng=random.Random(1))  # fmt: skip


def test_round_robin_rotates_and_skips_open_breakers():
    ns = nodes(3)
    firsts = [ns.candidates()[0].node.host for _ in range(4)]
    assert firsts == ["h0", "h1", "h2", "h0"]
    ns.record_failure(ns.states[1], "refused")
    assert [s.node.host for s in ns.candidates()] in (["h2", "h0"], ["h0", "h2"])


def test_least_connections():
    ns = nodes(3, "least-connections")
    ns.states[0].connections, ns.states[1].connections, ns.states[2].connections = 5, 1, 3
    assert [s.node.host for s in ns.candidates()] == ["h1", "h2", "h0"]


def test_open_breaker_cap_never_takes_every_node_out():
    ns = nodes(2, percent=50)
    ns.record_failure(ns.states[0], "refused")
    ns.record_failure(ns.states[1], "refused")
    assert [s.breaker.state for s in ns.states] == ["open", "closed"]
    assert ns.usable() and not ns.all_open()


def test_a_single_node_may_open_and_then_nothing_is_usable():
    ns = nodes(1, percent=50)
    ns.record_failure(ns.states[0], "refused")
    assert ns.all_open() and not ns.usable() and ns.candidates() == []


def test_reconfigure_retires_removed_nodes_and_adds_new_ones():
    ns = nodes(2)
    added, retired = ns.reconfigure([Node("h1", 5672, False), Node("h9", 5672, False)], "random", BreakerPolicy(), 50)
    assert [n.host for n in added] == ["h9"] and [n.host for n in retired] == ["h0"]
    assert {s.node.host for s in ns.candidates()} == {"h1", "h9"}
    assert ns.state_of(Node("h0", 5672, False)).retired


def test_failures_and_recoveries_are_kept_for_the_status_page():
    """NodeSet.recent: what failed, the breaker's trips and closes, and a node that answers again."""
    clock = Clock()
    ns = NodeSet([Node("h0", 5672, False), Node("h1", 5672, False)], "round-robin",
                 BreakerPolicy(failures=2, open_time=5, jitter=0.0), 100, clock=clock, rng=random.Random(1))  # fmt: skip
    h0, h1 = ns.states
    ns.record_failure(h1, "cannot connect to h1:5672: refused")
    ns.record_success(h1)  # answers again before its breaker tripped
    ns.record_failure(h0, "cannot connect to h0:5672: refused")
    ns.record_failure(h0, "cannot connect to h0:5672: refused")  # trips the breaker
    clock.now += 5
    assert h0.node in [s.node for s in ns.candidates()]  # half-open: the probe
    ns.record_success(h0)
    events = [(e["kind"], e["node"], e["text"], e["count"]) for e in ns.recent.snapshot()]
    assert events == [
        ("recovery", "h0:5672", "circuit breaker closed: the node takes new connections again", 1),
        ("failure", "h0:5672", "circuit breaker opened: no new connections to this node for now", 1),
        ("failure", "h0:5672", "cannot connect to h0:5672: refused", 2),
        ("recovery", "h1:5672", "the node answers again after 1 failed attempt", 1),
        ("failure", "h1:5672", "cannot connect to h1:5672: refused", 1),
    ]


def test_a_waiting_request_probes_an_open_breaker_once_per_probe_interval():
    """The open period keeps out new requests only: a waiting one probes at the probe interval,
    one probe at a time, and the first probe after the node's return closes the breaker, long
    before the open period would have ended."""
    clock = Clock()
    b, changes = breaker(clock, failures=2, open_time=5, probe_interval=0.25)
    b.record_failure()
    b.record_failure()
    assert b.state == "open" and not b.allows_attempt()
    assert b.allows_attempt(waiting=True)  # the first probe, at once
    assert not b.allows_attempt(waiting=True)  # one at a time
    b.record_failure()  # a failed probe of an open breaker leaves it as it is
    assert b.state == "open" and b.open_until == 105.0
    assert not b.allows_attempt(waiting=True)  # not before the probe interval
    clock.now += 0.25
    assert b.allows_attempt(waiting=True)
    b.record_success()  # the node is back: 0.25 s into a 5 s open period
    assert b.state == "closed" and b.allows_attempt() and b.allows_attempt(waiting=True)
    assert changes == [("closed", "open"), ("open", "closed")]


def test_probes_are_rate_limited_per_node_while_it_fails_even_when_closed():
    """Before the breaker opens, waiting requests already share one probe per interval on a
    node whose last attempt failed; new requests are not limited while it is closed."""
    clock = Clock()
    b, _ = breaker(clock, failures=5, probe_interval=0.5)
    b.record_failure()
    assert b.state == "closed" and b.allows_attempt()  # a new request
    attempts = 0
    for _ in range(40):  # 2 s of waiting requests polling every 50 ms
        if b.allows_attempt(waiting=True):
            attempts += 1
            b.record_failure()
        clock.now += 0.05
    assert attempts == 4  # at most one per 0.5 s, whoever asks


def test_an_abandoned_or_lost_probe_does_not_block_the_next():
    clock = Clock()
    b, _ = breaker(clock, failures=1, probe_interval=0.25, probe_timeout=10)
    b.record_failure()
    assert b.allows_attempt(waiting=True)
    b.probe_abandoned()  # its caller went away: no verdict
    clock.now += 0.25
    assert b.allows_attempt(waiting=True)
    clock.now += 9.9
    assert not b.allows_attempt(waiting=True)  # still in flight
    clock.now += 0.2
    assert b.allows_attempt(waiting=True)  # never reported: expired


def test_a_forced_trip_opens_at_once_within_the_cap():
    clock = Clock()
    b, _ = breaker(clock, failures=5)
    b.record_failure(trip=True)
    assert b.state == "open"
    c, _ = breaker(clock, failures=5)
    c.record_failure(may_open=False, trip=True)
    assert c.state == "closed"


def test_waiting_requests_go_to_healthy_nodes_first_and_probe_only_when_none_is_left():
    clock = Clock()
    nodes = [Node("a", 1, False), Node("b", 2, False)]
    ns = NodeSet(
        nodes,
        "round-robin",
        BreakerPolicy(failures=1, jitter=0.0, probe_interval=0.25),
        100,
        clock=clock,
        rng=random.Random(1),
    )
    a, b = ns.states
    ns.record_failure(a, "silent", trip=True)
    assert a.breaker.state == "open"
    for _ in range(4):  # whatever the round-robin turn: only the healthy node
        assert [s.node.label for s in ns.candidates(waiting=True)] == ["b:2"]
    ns.record_failure(b, "refused")  # now none is healthy: probes of both, rate-limited
    assert sorted(s.node.label for s in ns.candidates(waiting=True)) == ["a:1", "b:2"]
    assert ns.candidates(waiting=True) == []  # both probes in flight
    assert ns.candidates() == []  # new requests: both open
