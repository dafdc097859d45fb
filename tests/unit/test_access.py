"""Allow/deny lists and the user -> vhost authorization policy, as pure logic."""

import json

import pytest

from amqproxy.access import AddressFilter, PolicyError, load_policy, parse_policy, vhost_refused_text
from amqproxy.config import ConfigError, parse_config


def address_filter(*argv: str) -> AddressFilter:
    config = parse_config(list(argv), {})
    return AddressFilter.from_lists(config.allow_cidr, config.deny_cidr)


def test_no_lists_allow_everything():
    assert address_filter().check("203.0.113.9") is None
    assert address_filter().check("not-an-ip") is None


def test_allow_list_ipv4_and_ipv6():
    f = address_filter("--allow-cidr", "10.0.0.0/8,2001:db8::/32")
    assert f.check("10.1.2.3") is None
    assert f.check("2001:db8::1") is None
    assert f.check("[2001:db8::1]") is None
    assert f.check("192.168.1.1") == "not_allowed"
    assert f.check("::1") == "not_allowed"
    assert f.check("/tmp/socket") == "not_allowed"


def test_deny_wins_over_allow():
    f = address_filter("--allow-cidr", "10.0.0.0/8", "--deny-cidr", "10.6.0.0/16", "--deny-cidr", "::1/128")
    assert f.check("10.6.0.1") == "denied"
    assert f.check("10.7.0.1") is None
    assert f.check("::1") == "denied"


def test_ipv4_mapped_ipv6_is_the_ipv4_address():
    f = address_filter("--deny-cidr", "127.0.0.0/8")
    assert f.check("::ffff:127.0.0.1") == "denied"
    assert f.check("fe80::1%eth0") is None


def test_bad_cidr_names_the_option():
    with pytest.raises(ConfigError, match="--deny-cidr"):
        parse_config(["--deny-cidr", "10.0.0.0/33"], {})


def test_policy_users_vhosts_and_wildcards():
    policy = parse_policy({"app": ["orders", "/"], "ops": "*", "*": ["public"], "nobody": []})
    assert policy.user_allowed("app") and policy.vhost_allowed("app", "orders")
    assert not policy.vhost_allowed("app", "billing")
    assert policy.vhost_allowed("ops", "anything")
    assert policy.user_allowed("stranger") and policy.vhost_allowed("stranger", "public")
    assert not policy.vhost_allowed("stranger", "orders")
    assert not policy.user_allowed("nobody")  # an empty list: may not connect at all


def test_policy_without_wildcard_refuses_unlisted_users():
    policy = parse_policy({"app": ["orders"]})
    assert not policy.user_allowed("other")
    assert not policy.vhost_allowed("other", "orders")


@pytest.mark.parametrize("document", [[], {"a": "orders"}, {"a": [1]}, {"a": None}])
def test_policy_rejects_bad_documents(document):
    with pytest.raises(PolicyError):
        parse_policy(document)


def test_policy_file_is_an_option_and_reloads_compare_by_content(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"app": ["orders"]}))
    first = parse_config(["--authz-policy", str(path)], {}).authz_policy
    assert first is not None and first.vhost_allowed("app", "orders")
    assert parse_config(["--authz-policy", str(path)], {}).authz_policy == first
    path.write_text(json.dumps({"app": ["billing"]}))
    second = parse_config(["--authz-policy", str(path)], {}).authz_policy
    assert second != first and second is not None and second.vhost_allowed("app", "billing")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="--authz-policy.*not valid JSON"):
        parse_config(["--authz-policy", str(path)], {})
    with pytest.raises(ConfigError, match="--authz-policy.*cannot read"):
        parse_config(["--authz-policy", str(tmp_path / "missing.json")], {})
    assert load_policy("") is None


def test_vhost_refusal_is_rabbitmqs_text():
    assert vhost_refused_text("guest", "orders") == "NOT_ALLOWED - access to vhost 'orders' refused for user 'guest'"
