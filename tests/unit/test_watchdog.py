"""The silence watchdog's two questions, without sockets: how long may a broker be silent
(`Upstream.silence_timeout`), and is the proxy waiting for it (`Upstream.awaiting`)."""

from test_channel_mapping import attached, make_upstream

from amqproxy.recovery import ConfirmTracker


def test_the_timeout_is_never_shorter_than_a_heartbeat_interval_plus_the_margin():
    upstream = make_upstream()
    upstream.heartbeat = 5
    assert upstream.silence_timeout() == 8.0  # the defaults: 8 s, 5 s heartbeat
    upstream.heartbeat = 30  # an idle broker may write nothing for 30 s
    assert upstream.silence_timeout() == 33.0
    upstream.pool.config.upstream_silence_timeout = 0
    assert upstream.silence_timeout() == 0.0  # off


def test_waiting_means_a_reply_a_confirm_an_open_ok_or_unsent_data():
    upstream = make_upstream()
    client = object()
    idle = attached(upstream, client, 1)
    assert upstream.awaiting() == ""  # a consumer waiting for deliveries waits for nothing
    idle.open_pending = True  # a pipelined channel.open
    assert "channel.open-ok" in upstream.awaiting()
    idle.open_pending = False
    publisher = attached(upstream, client, 2)
    publisher.confirm, publisher.confirms = True, ConfirmTracker()
    publisher.published = 3
    publisher.confirms.confirmed(2, True)
    assert "publisher confirms on channel" in upstream.awaiting()
    publisher.confirms.confirmed(3, False)
    assert upstream.awaiting() == ""
    publisher.published = 4
    publisher.content += b"x"  # the 4th is still arriving from the client: not sent yet
    assert upstream.awaiting() == ""
