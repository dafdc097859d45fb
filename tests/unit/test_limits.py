"""Limits as pure logic: token buckets, keyed counters, admission decisions and alarm-only mode."""

import pytest

from amqproxy.config import ConfigError, parse_config
from amqproxy.limits import ConnectionCounters, Limits, TokenBucket, parse_limit_name


def limits(*argv: str) -> Limits:
    return Limits(parse_config(list(argv), {}))


def test_token_bucket_admits_a_burst_then_refills_at_its_rate():
    bucket = TokenBucket(rate=2.0, burst=2.0, now=0.0)
    assert bucket.take(0.0) and bucket.take(0.0)
    assert not bucket.take(0.0)
    assert not bucket.take(0.4)  # 0.8 tokens
    assert bucket.take(0.5)  # 1.0 token
    assert not bucket.take(0.5)
    assert bucket.take(100.0) and bucket.take(100.0) and not bucket.take(100.0)  # capped at the burst


def test_token_bucket_debit_says_how_long_to_wait():
    bucket = TokenBucket(rate=1000.0, burst=1000.0, now=0.0)
    assert bucket.debit(0.0, 600) == 0.0
    assert bucket.debit(0.0, 900) == pytest.approx(0.5)  # 500 bytes in debt at 1000/s
    assert bucket.debit(0.5, 0) == 0.0


def test_counters_acquire_all_or_nothing_and_release():
    counters = ConnectionCounters()
    assert counters.try_acquire([("a", 2), ("b", 1)]) is None
    assert counters.try_acquire([("a", 2), ("b", 1)]) == "b"  # b is full: a not taken either
    assert counters.count("a") == 1 and counters.count("b") == 1
    assert counters.try_acquire([("a", 2), ("c", 0)]) is None  # limit 0: counted, never refused
    assert counters.try_acquire([("a", 2)]) == "a"
    counters.release(["a", "b", "c"])
    assert (counters.count("a"), counters.count("b"), counters.count("c")) == (1, 0, 0)
    counters.release(["a", "a"])  # never negative
    assert counters.count("a") == 0


def test_global_limit_refuses_with_506_naming_the_option():
    lim = limits("--max-connections", "2")
    first, second, third = (lim.admit_address("10.0.0.1") for _ in range(3))
    assert first.refusal is None and second.refusal is None
    assert third.refusal is not None and third.held == []
    assert third.refusal.reply_code == 506
    assert third.refusal.text == "RESOURCE_ERROR - proxy connection limit (2) is reached (--max-connections)"
    lim.release(first.held)
    assert lim.admit_address("10.0.0.2").refusal is None


def test_per_ip_user_and_vhost_limits_count_separately():
    lim = limits("--max-connections-per-ip", "1", "--max-connections-per-user", "1", "--max-connections-per-vhost", "1")
    assert lim.admit_address("10.0.0.1").refusal is None
    refused = lim.admit_address("10.0.0.1").refusal
    assert refused is not None and refused.reply_code == 530 and "'10.0.0.1'" in refused.text
    assert "--max-connections-per-ip" in refused.text
    assert lim.admit_address("10.0.0.2").refusal is None
    assert lim.admit_user("alice").refusal is None
    refused = lim.admit_user("alice").refusal
    assert refused is not None and refused.text == (
        "NOT_ALLOWED - Connection refused for user 'alice': user connection limit (1) is reached "
        "(--max-connections-per-user)"
    )
    assert lim.admit_user("bob").refusal is None
    assert lim.admit_vhost("/", "alice").refusal is None
    refused = lim.admit_vhost("/", "bob").refusal
    assert refused is not None and refused.text == (
        "NOT_ALLOWED - access to vhost '/' refused for user 'bob': connection limit (1) is reached "
        "(--max-connections-per-vhost)"
    )


def test_a_refused_address_takes_no_slot_of_a_limit_it_passed():
    lim = limits("--max-connections", "5", "--max-connections-per-ip", "1")
    assert lim.admit_address("10.0.0.1").refusal is None
    assert lim.admit_address("10.0.0.1").refusal is not None
    assert lim.counters.count(("all", "")) == 1


def test_alarm_only_admits_counts_and_reports():
    lim = limits("--max-connections", "1", "--limits-alarm-only", "max-connections")
    first = lim.admit_address("10.0.0.1")
    second = lim.admit_address("10.0.0.1")
    assert first.refusal is None and first.alarms == []
    assert second.refusal is None and [a.limit for a in second.alarms] == ["max_connections"]
    assert lim.counters.count(("all", "")) == 2  # still counted: switching to enforced is exact
    lim.release(second.held)
    lim.release(first.held)
    assert lim.counters.count(("all", "")) == 0


def test_alarm_only_all_and_names_with_dashes_or_underscores():
    assert parse_limit_name("max-connections-per-user") == "max_connections_per_user"
    assert parse_limit_name("connection_rate_per_ip") == "connection_rate_per_ip"
    assert parse_limit_name("ALL") == "all"
    with pytest.raises(ValueError):
        parse_limit_name("max-widgets")
    with pytest.raises(ConfigError, match="--limits-alarm-only"):
        parse_config(["--limits-alarm-only", "nope"], {})
    lim = limits("--max-connections-per-user", "1", "--limits-alarm-only", "all")
    lim.admit_user("a")
    assert lim.admit_user("a").refusal is None


def test_connection_rate_per_user_and_ip():
    lim = limits("--connection-rate-per-user", "2", "--connection-rate-per-ip", "1")
    assert lim.admit_user("a", now=0.0).refusal is None
    assert lim.admit_user("a", now=0.0).refusal is None
    refused = lim.admit_user("a", now=0.0).refusal
    assert refused is not None and refused.limit == "connection_rate_per_user" and "(2/s)" in refused.text
    assert lim.admit_user("b", now=0.0).refusal is None  # per user
    assert lim.admit_user("a", now=0.6).refusal is None  # refilled
    assert lim.admit_address("10.0.0.1", now=0.0).refusal is None
    refused = lim.admit_address("10.0.0.1", now=0.1).refusal
    assert refused is not None and refused.reply_code == 530 and "--connection-rate-per-ip" in refused.text


def test_rate_refusal_releases_the_slots_it_took():
    lim = limits("--max-connections", "10", "--connection-rate-per-ip", "1")
    held = lim.admit_address("10.0.0.1", now=0.0).held
    assert lim.admit_address("10.0.0.1", now=0.0).refusal is not None
    assert lim.counters.count(("all", "")) == 1
    lim.release(held)


def test_rate_alarm_only_admits():
    lim = limits("--connection-rate-per-ip", "1", "--limits-alarm-only", "connection-rate-per-ip")
    lim.admit_address("h", now=0.0)
    decision = lim.admit_address("h", now=0.0)
    assert decision.refusal is None and [a.limit for a in decision.alarms] == ["connection_rate_per_ip"]


def test_idle_buckets_are_forgotten():
    lim = limits("--connection-rate-per-ip", "1")
    for i in range(2000):
        lim.admit_address(f"10.0.{i // 256}.{i % 256}", now=0.0)
    lim.admit_address("192.0.2.1", now=5.0)  # every earlier bucket is full again by now
    assert len(lim._ip_buckets) < 1100


def test_reconfigure_changes_limits_and_keeps_counts():
    lim = limits("--max-connections", "1")
    held = lim.admit_address("h").held
    assert lim.admit_address("h").refusal is not None
    lim.configure(parse_config(["--max-connections", "3"], {}))
    assert lim.admit_address("h").refusal is None
    lim.configure(parse_config([], {}))  # 0 = no limit: still counted
    assert lim.admit_address("h").refusal is None
    assert lim.counters.count(("all", "")) == 3
    lim.release(held)


def test_byte_rate_bucket_is_off_by_default():
    assert limits().byte_rate_bucket(0.0) is None
    bucket = limits("--client-byte-rate", "1000").byte_rate_bucket(0.0)
    assert bucket is not None and bucket.debit(0.0, 3000) == pytest.approx(2.0)


def test_long_names_keep_the_text_a_shortstr():
    lim = limits("--max-connections-per-user", "1")
    name = "é" * 300
    lim.admit_user(name)
    refused = lim.admit_user(name).refusal
    assert refused is not None and len(refused.text.encode()) <= 255


def test_defaults_are_off():
    config = parse_config([], {})
    assert (config.max_connections, config.max_connections_per_user, config.connection_rate_per_ip) == (0, 0, 0)
    assert config.limit_refusal_delay == 0.75 and config.limits_alarm_only == []
    assert config.allow_cidr == [] and config.deny_cidr == [] and config.authz_policy is None
