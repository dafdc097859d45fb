"""Recovery bookkeeping (amqproxy/recovery.py) with plain method payloads, no sockets."""

from __future__ import annotations

import struct

import pytest

from amqproxy.protocol import constants as c
from amqproxy.protocol.codec import decode_method, encode_method
from amqproxy.recovery import (
    BLAME_WINDOW,
    ChannelRecord,
    ConfirmTracker,
    Consumer,
    Topology,
    ack_tag,
    consume_nowait,
    culprit,
    delivery_tag_position,
    qos_default,
    qos_global,
    shift_tag,
)

EXCHANGE_DECLARE_OK = (40, 11)
EXCHANGE_DELETE_OK = (40, 21)
QUEUE_BIND_OK = (50, 21)
QUEUE_UNBIND_OK = (50, 51)
BASIC_QOS_OK = (60, 11)


def send(record: ChannelRecord, topology: Topology, method, **args):
    """The client sends `method`: returns its payload as the replay would use it."""
    raw = encode_method(method, **args)
    _, decoded = decode_method(raw)
    record.request(method, decoded, raw, topology)
    return raw


def exchange_declare(name, kind="direct", nowait=False, passive=False, durable=False, arguments=None):
    return dict(
        exchange=name,
        type=kind,
        passive=passive,
        durable=durable,
        auto_delete=False,
        internal=False,
        nowait=nowait,
        arguments=arguments or {},
    )


def queue_declare(name, exclusive=False, auto_delete=False, durable=False, nowait=False, passive=False, arguments=None):
    return dict(
        queue=name,
        passive=passive,
        durable=durable,
        exclusive=exclusive,
        auto_delete=auto_delete,
        nowait=nowait,
        arguments=arguments or {},
    )


def queue_bind(queue, exchange, key="", nowait=False, arguments=None):
    return dict(queue=queue, exchange=exchange, routing_key=key, nowait=nowait, arguments=arguments or {})


def consume(queue, tag="", nowait=False, no_ack=False, arguments=None):
    return dict(
        queue=queue,
        consumer_tag=tag,
        no_local=False,
        no_ack=no_ack,
        exclusive=False,
        nowait=nowait,
        arguments=arguments or {},
    )


def qos(count, is_global=False):
    return {"prefetch_size": 0, "prefetch_count": count, "global": is_global}


# ---------------------------------------------------------------------------- topology


def test_topology_is_recorded_only_from_the_ok_and_replayed_in_order():
    record, topology = ChannelRecord(), Topology()
    x = send(record, topology, c.EXCHANGE_DECLARE, **exchange_declare("x", arguments={"alternate-exchange": "ae"}))
    q = send(record, topology, c.QUEUE_DECLARE, **queue_declare("q", arguments={"x-max-length": 10}))
    b = send(record, topology, c.QUEUE_BIND, **queue_bind("q", "x", "k"))
    assert topology.replay() == []  # nothing accepted yet
    record.reply(EXCHANGE_DECLARE_OK, "", topology)
    record.reply(c.QUEUE_DECLARE_OK, "q", topology)
    record.reply(QUEUE_BIND_OK, "", topology)
    assert topology.replay() == [x, q, b]  # arguments included: the client's own bytes
    assert not record.pending


def test_nowait_declares_are_recorded_at_once():
    record, topology = ChannelRecord(), Topology()
    x = send(record, topology, c.EXCHANGE_DECLARE, **exchange_declare("x", nowait=True))
    q = send(record, topology, c.QUEUE_DECLARE, **queue_declare("q", nowait=True))
    assert topology.replay() == [x, q]


def test_refused_declare_is_not_recorded():
    record, topology = ChannelRecord(), Topology()
    send(record, topology, c.EXCHANGE_DECLARE, **exchange_declare("x"))
    record.pending.clear()  # what a channel.close from the broker does
    assert topology.replay() == []


def test_passive_declares_are_not_topology():
    record, topology = ChannelRecord(), Topology()
    send(record, topology, c.EXCHANGE_DECLARE, **exchange_declare("x", passive=True))
    send(record, topology, c.QUEUE_DECLARE, **queue_declare("q", passive=True))
    record.reply(EXCHANGE_DECLARE_OK, "", topology)
    record.reply(c.QUEUE_DECLARE_OK, "q", topology)
    assert topology.replay() == []
    assert record.last_queue == "q"


@pytest.mark.parametrize(
    ("name", "flags", "reason"),
    [
        ("", {}, "server-named"),
        ("q", {"exclusive": True}, "exclusive"),
        ("q", {"auto_delete": True}, "auto-delete"),
    ],
)
def test_unrecoverable_queues_and_their_bindings_are_not_replayed(name, flags, reason):
    record, topology = ChannelRecord(), Topology()
    send(record, topology, c.QUEUE_DECLARE, **queue_declare(name, **flags))
    record.reply(c.QUEUE_DECLARE_OK, "amq.gen-1" if not name else name, topology)
    queue = name or "amq.gen-1"
    send(record, topology, c.QUEUE_BIND, **queue_bind(queue, "amq.fanout"))
    record.reply(QUEUE_BIND_OK, "", topology)
    assert topology.unrecoverable(queue) == reason
    assert topology.replay() == []


def test_delete_drops_queue_exchange_and_bindings():
    record, topology = ChannelRecord(), Topology()
    send(record, topology, c.EXCHANGE_DECLARE, **exchange_declare("x", nowait=True))
    send(record, topology, c.EXCHANGE_DECLARE, **exchange_declare("y", nowait=True))
    q = send(record, topology, c.QUEUE_DECLARE, **queue_declare("q", nowait=True))
    send(record, topology, c.QUEUE_BIND, **queue_bind("q", "x", nowait=True))
    send(record, topology, c.EXCHANGE_BIND, destination="y", source="x", routing_key="", nowait=True, arguments={})
    send(record, topology, c.EXCHANGE_DELETE, exchange="x", if_unused=False, nowait=False)
    record.reply(EXCHANGE_DELETE_OK, "", topology)
    y = topology.exchanges["y"]
    assert topology.replay() == [y, q]
    send(record, topology, c.QUEUE_DELETE, queue="q", if_unused=False, if_empty=False, nowait=True)
    assert topology.replay() == [y]


def test_unbind_removes_the_binding():
    record, topology = ChannelRecord(), Topology()
    q = send(record, topology, c.QUEUE_DECLARE, **queue_declare("q", nowait=True))
    send(record, topology, c.QUEUE_BIND, **queue_bind("q", "amq.direct", "a", nowait=True))
    b = send(record, topology, c.QUEUE_BIND, **queue_bind("q", "amq.direct", "b", nowait=True))
    send(record, topology, c.QUEUE_UNBIND, queue="q", exchange="amq.direct", routing_key="a", arguments={})
    assert len(topology.replay()) == 3
    record.reply(QUEUE_UNBIND_OK, "", topology)
    assert topology.replay() == [q, b]


def test_empty_queue_name_means_the_last_declared_queue():
    record, topology = ChannelRecord(), Topology()
    send(record, topology, c.QUEUE_DECLARE, **queue_declare("named"))
    record.reply(c.QUEUE_DECLARE_OK, "named", topology)
    send(record, topology, c.BASIC_CONSUME, **consume(""))
    record.reply(c.BASIC_CONSUME_OK, "ctag-1", topology)
    assert record.consumers()[0].queue == "named"
    assert consume_nowait(record.consumers()[0])  # re-issued with the queue's real name
    _, args = decode_method(consume_nowait(record.consumers()[0]))
    assert args["queue"] == "named"


# ---------------------------------------------------------------------------- channel settings


def test_qos_and_consumers_are_replayed_in_acceptance_order():
    record, topology = ChannelRecord(), Topology()
    q10 = send(record, topology, c.BASIC_QOS, **qos(10))
    send(record, topology, c.BASIC_QOS, **qos(100, True))
    record.reply(BASIC_QOS_OK, "", topology)
    record.reply(BASIC_QOS_OK, "", topology)
    send(record, topology, c.BASIC_CONSUME, **consume("a", arguments={"x-priority": 5}))
    record.reply(c.BASIC_CONSUME_OK, "server-tag", topology)
    q20 = send(record, topology, c.BASIC_QOS, **qos(20))
    record.reply(BASIC_QOS_OK, "", topology)
    send(record, topology, c.BASIC_CONSUME, **consume("b", tag="mine", nowait=True))
    kinds = [(kind, value if kind == "qos" else value.tag) for kind, value in record.settings]
    assert kinds[0] == ("qos", q10) and kinds[1][0] == "qos" and qos_global(kinds[1][1])
    assert kinds[2:] == [("consume", "server-tag"), ("qos", q20), ("consume", "mine")]


def test_a_qos_replaced_before_any_consumer_is_not_replayed():
    record, topology = ChannelRecord(), Topology()
    for count in (1, 2, 3):
        send(record, topology, c.BASIC_QOS, **qos(count))
        record.reply(BASIC_QOS_OK, "", topology)
    assert len(record.settings) == 1
    _, args = decode_method(record.settings[0][1])
    assert args["prefetch_count"] == 3


def test_cancel_removes_the_consumer():
    record, topology = ChannelRecord(), Topology()
    send(record, topology, c.BASIC_CONSUME, **consume("a", tag="t1"))
    record.reply(c.BASIC_CONSUME_OK, "t1", topology)
    send(record, topology, c.BASIC_CONSUME, **consume("a", tag="t2", nowait=True))
    send(record, topology, c.BASIC_CANCEL, consumer_tag="t1", nowait=False)
    record.reply(c.BASIC_CANCEL_OK, "t1", topology)
    assert [cons.tag for cons in record.consumers()] == ["t2"]
    record.cancelled("t2")  # the broker's basic.cancel
    assert record.consumers() == []


def test_confirm_and_tx_are_recorded_on_their_ok():
    record, topology = ChannelRecord(), Topology()
    send(record, topology, c.CONFIRM_SELECT, nowait=False)
    assert not record.confirm
    record.reply((85, 11), "", topology)
    assert record.confirm
    send(record, topology, c.TX_SELECT)
    record.reply((90, 11), "", topology)
    assert record.tx


def test_unanswered_requests_stay_pending_in_order():
    record, topology = ChannelRecord(), Topology()
    p = send(record, topology, c.QUEUE_PURGE, queue="q", nowait=False)
    g = send(record, topology, c.BASIC_GET, queue="q", no_ack=True)
    assert [r.raw for r in record.pending] == [p, g]
    record.reply((50, 31), "", topology)
    assert [r.raw for r in record.pending] == [g]
    record.reply(c.BASIC_GET_EMPTY, "", topology)
    assert not record.pending


def test_a_reply_that_answers_nothing_pending_is_ignored():
    record, topology = ChannelRecord(), Topology()
    send(record, topology, c.BASIC_QOS, **qos(1))
    assert record.reply(c.BASIC_CONSUME_OK, "x", topology) is None
    assert len(record.pending) == 1


# ---------------------------------------------------------------------------- blame for a broker connection error


def test_the_client_with_the_named_request_unanswered_is_the_culprit():
    """540 naming basic.consume (a consume on a quorum queue under a global qos): the client whose
    consume is unanswered, not its neighbour with other requests in flight."""
    topology = Topology()
    offender, bystander = ChannelRecord(), ChannelRecord()
    send(offender, topology, c.BASIC_CONSUME, **consume("quorum-q"))
    send(bystander, topology, c.QUEUE_DECLARE, **queue_declare("other"))
    lost = {"offender": [ChannelRecord(), offender], "bystander": [bystander]}
    assert culprit(lost, c.BASIC_CONSUME, now=100.0) == "offender"
    assert culprit(lost, c.BASIC_GET, now=100.0) is None  # nobody has a basic.get unanswered


def test_an_answered_request_is_not_blamed():
    record, topology = ChannelRecord(), Topology()
    send(record, topology, c.BASIC_CONSUME, **consume("q"))
    record.reply(c.BASIC_CONSUME_OK, "amq.ctag-1", topology)
    assert culprit({"client": [record]}, c.BASIC_CONSUME, now=0.0) is None


def test_two_possible_culprits_blame_nobody():
    topology = Topology()
    first, second = ChannelRecord(), ChannelRecord()
    send(first, topology, c.BASIC_CONSUME, **consume("q1"))
    send(second, topology, c.BASIC_CONSUME, **consume("q2"))
    assert culprit({"a": [first], "b": [second]}, c.BASIC_CONSUME, now=0.0) is None
    # ... but two channels of one client are one culprit
    assert culprit({"a": [first, second]}, c.BASIC_CONSUME, now=0.0) == "a"


@pytest.mark.parametrize("method", [c.BASIC_NACK, c.BASIC_REJECT])
def test_a_recent_nack_or_reject_is_blamed_an_old_one_is_not(method):
    """basic.nack/basic.reject have no reply (540 on a stream): blamed within BLAME_WINDOW."""
    recent, old, never = ChannelRecord(), ChannelRecord(), ChannelRecord()
    recent.refused_at = 100.0
    old.refused_at = 100.0 - BLAME_WINDOW - 1
    lost = {"recent": [recent], "old": [old], "never": [never]}
    assert culprit(lost, method, now=100.5) == "recent"
    assert culprit({"old": [old], "never": [never]}, method, now=100.5) is None


def test_a_close_naming_no_method_blames_the_one_client_with_a_request_in_flight():
    """541 INTERNAL_ERROR names no method (the broker's channel process crashed, e.g. on an invalid
    x-stream-offset): the client with an unanswered request, if it alone has one."""
    topology = Topology()
    busy, idle = ChannelRecord(), ChannelRecord()
    send(busy, topology, c.BASIC_CONSUME, **consume("stream", arguments={"x-stream-offset": "bogus"}))
    assert culprit({"busy": [busy], "idle": [idle]}, (0, 0), now=0.0) == "busy"
    assert culprit({"idle": [idle]}, (0, 0), now=0.0) is None


def test_consume_nowait_keeps_flags_and_arguments_and_sets_tag():
    raw = encode_method(c.BASIC_CONSUME, **consume("q", no_ack=True, arguments={"x-priority": 3}))
    again = consume_nowait(Consumer("amq.ctag-7", "q", raw))
    _, args = decode_method(again)
    assert args == {
        **consume("q", no_ack=True, arguments={"x-priority": 3}),
        "consumer_tag": "amq.ctag-7",
        "nowait": True,
        "ticket": 0,
    }


def test_qos_default_is_per_consumer_zero():
    _, args = decode_method(qos_default())
    assert args == {"prefetch_size": 0, "prefetch_count": 0, "global": False}


# ---------------------------------------------------------------------------- delivery tags


@pytest.mark.parametrize(
    ("tag", "multiple", "offset", "expected"),
    [
        (5, False, 0, 5),
        (5, False, 10, None),  # delivered before the loss: dropped
        (10, False, 10, None),
        (11, False, 10, 1),
        (12, True, 10, 2),  # multiple spanning old and new: exactly the new ones
        (7, True, 10, None),  # multiple covering only old tags
        (0, True, 10, 0),  # "everything outstanding" is only new deliveries now
    ],
)
def test_ack_tag(tag, multiple, offset, expected):
    assert ack_tag(tag, multiple, offset) == expected


def test_delivery_tag_is_shifted_in_deliver_and_get_ok():
    deliver = encode_method(
        c.BASIC_DELIVER, consumer_tag="ctag", delivery_tag=3, redelivered=True, exchange="x", routing_key="k"
    )
    shifted = shift_tag(deliver, 0, len(deliver), delivery_tag_position(c.BASIC_DELIVER, deliver, 0), 100)
    _, args = decode_method(shifted)
    assert args["delivery_tag"] == 103 and args["consumer_tag"] == "ctag" and args["redelivered"]
    get_ok = encode_method(
        c.BASIC_GET_OK, delivery_tag=1, redelivered=False, exchange="", routing_key="q", message_count=4
    )
    frame = b"\x01\x00\x01" + struct.pack(">I", len(get_ok)) + get_ok + b"\xce"
    shifted = shift_tag(frame, 7, 7 + len(get_ok), delivery_tag_position(c.BASIC_GET_OK, frame, 7), 41)
    _, args = decode_method(shifted)
    assert args["delivery_tag"] == 42 and args["message_count"] == 4


# ---------------------------------------------------------------------------- publisher confirms


def test_confirms_in_order_leave_nothing_outstanding():
    tracker = ConfirmTracker()
    for tag in range(1, 6):
        tracker.confirmed(tag, False)
    assert tracker.lost(5) == [] and tracker.nacked == 0


def test_outstanding_publishes_are_nacked_with_one_multiple_nack():
    tracker = ConfirmTracker()
    tracker.confirmed(3, True)
    assert tracker.lost(7) == [(7, True)] and tracker.nacked == 4
    # Afterwards nothing is outstanding; numbering goes on from 7.
    tracker.confirmed(8, False)
    assert tracker.lost(8) == []


def test_a_single_outstanding_publish_is_nacked_alone():
    tracker = ConfirmTracker()
    tracker.confirmed(4, True)
    assert tracker.lost(5) == [(5, False)] and tracker.nacked == 1


def test_out_of_order_confirms_are_nacked_one_by_one():
    tracker = ConfirmTracker()
    tracker.confirmed(1, False)
    tracker.confirmed(3, False)
    tracker.confirmed(5, False)
    assert tracker.lost(6) == [(2, False), (4, False), (6, False)] and tracker.nacked == 3


def test_out_of_order_confirms_fill_the_gap():
    tracker = ConfirmTracker()
    tracker.confirmed(2, False)
    tracker.confirmed(1, False)
    assert tracker.acked_upto == 2 and not tracker.above
    tracker.confirmed(4, False)
    tracker.confirmed(6, True)
    assert tracker.acked_upto == 6 and not tracker.above


def test_nothing_published_nothing_nacked():
    assert ConfirmTracker().lost(0) == []


def test_transient_queues_are_bounded_and_a_redeclare_changes_the_verdict(monkeypatch):
    import amqproxy.recovery as recovery

    monkeypatch.setattr(recovery, "MAX_TRANSIENT_QUEUES", 3)
    record, topology = ChannelRecord(), Topology()
    for i in range(5):
        send(record, topology, c.QUEUE_DECLARE, **queue_declare(f"r{i}", exclusive=True, nowait=True))
        send(record, topology, c.QUEUE_BIND, **queue_bind(f"r{i}", "amq.direct", nowait=True))
    assert list(topology.transient) == ["r2", "r3", "r4"]
    assert len(topology.bindings) == 3  # the evicted queues' bindings went with them
    q = send(record, topology, c.QUEUE_DECLARE, **queue_declare("r4", durable=True, nowait=True))
    assert topology.unrecoverable("r4") == ""
    assert topology.replay()[0] == q
