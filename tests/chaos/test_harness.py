"""The chaos harness's bookkeeping, without a broker: how client errors are classified, how
blocking calls are timed, and how a failed scenario shows in the summary."""

from __future__ import annotations

import time

import pika.exceptions

from chaos.report import ScenarioResult, render
from chaos.workload import ConfirmSequence, DeliverySequence, Ledger, describe


def test_describe_finds_the_close_code_pika_hides_in_handshake_errors():
    closed = pika.exceptions.ConnectionClosedByBroker(320, "CONNECTION_FORCED - upstream unavailable: x")
    hidden = pika.exceptions.ProbableAuthenticationError(repr(closed))
    assert describe(closed) == ("close", 320, "CONNECTION_FORCED - upstream unavailable: x")
    assert describe(hidden) == ("close", 320, "CONNECTION_FORCED - upstream unavailable: x")
    assert describe(pika.exceptions.StreamLostError("reset"))[:2] == ("tcp", None)
    assert describe(pika.exceptions.NackError([]))[:2] == ("nack", None)


def test_ledger_times_blocking_calls_in_progress_and_finished():
    ledger = Ledger()
    ledger.enter("pub-0", "publish")
    time.sleep(0.2)
    seconds, where = ledger.stall_now()
    assert seconds >= 0.2 and where == "pub-0 publish"
    ledger.leave("pub-0")
    assert ledger.stall_now() == (0.0, "")
    assert ledger.longest_stall[0] >= 0.2 and ledger.longest_stall[1] == "pub-0 publish"


def test_ledger_keeps_the_last_outcome_of_each_message():
    ledger = Ledger()
    ledger.attempt("m1")
    ledger.settle("m1", "failed")
    ledger.attempt("m1")  # published again after reconnecting
    ledger.settle("m1", "confirmed")
    ledger.attempt("m2")
    assert ledger.attempts == 3
    assert ledger.outcome == {"m1": "confirmed", "m2": "pending"}


def test_a_scenario_with_violations_fails_in_the_summary():
    ok = ScenarioResult("quiet", ["none"], published=10, confirmed=10, consumed=10, recovery=0.5)
    bad = ScenarioResult("lossy", ["reset_peer"], published=10, confirmed=10, consumed=9, lost=1)
    bad.violations.append("1 confirmed messages never consumed")
    table = render([ok, bad])
    assert "| quiet | none | 10 | 10 | 10 | 0 | 0 | - | 0.0 | 0.5 |" in table  # no detection: no silence
    assert table.splitlines()[3].endswith("| FAIL |") and table.splitlines()[2].endswith("| PASS |")
    assert "- lossy: 1 confirmed messages never consumed" in table


def test_confirm_sequence_flags_every_confirm_that_answers_no_outstanding_publish():
    confirms = ConfirmSequence()
    confirms.published()
    assert confirms.confirm("Basic.Ack", 1, False) == ""
    confirms.published()
    assert confirms.confirm("Basic.Nack", 2, True) == ""  # the recovery's nack of the publish in flight
    # A second answer for publish 2 (the broker's late ack after the proxy's nack) would be
    # taken by pika as the answer to publish 3: flagged whether it comes before or after it.
    assert (
        confirms.confirm("Basic.Ack", 2, False)
        == "Basic.Ack delivery-tag=2 multiple=False with no publish outstanding (last 2)"
    )
    confirms.published()
    assert (
        confirms.confirm("Basic.Ack", 2, False) == "Basic.Ack delivery-tag=2 multiple=False with publish 3 outstanding"
    )
    confirms.published()
    assert (
        confirms.confirm("Basic.Ack", 5, False) == "Basic.Ack delivery-tag=5 multiple=False with publish 4 outstanding"
    )
    confirms.published()
    assert confirms.confirm("Basic.Ack", 7, True) == ""  # multiple reaching it


def test_delivery_sequence_flags_gaps_and_repeats():
    tags = DeliverySequence()
    assert [tags.delivered(t) for t in (1, 2, 3)] == ["", "", ""]
    assert tags.delivered(5) == "delivery-tag 5 where 4 was next"  # a delivery dropped on the way
    assert tags.delivered(6) == ""
    assert tags.delivered(6) == "delivery-tag 6 where 7 was next"  # a repeat: an ack would settle another message
