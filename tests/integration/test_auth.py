"""9. Authentication and vhost access are checked before Connection.OpenOk,
with the broker's own reply codes and texts; pooled logins never let a
wrong password through."""

import ast
import re
import time

import aio_pika
import aiormq.exceptions
import amqp
import pika
import pytest

from ._support import run_async

FAST = 5.0  # seconds a refused login may take at most

REFUSED_PLAIN = (
    "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile."
)
REFUSED_ANY = re.compile(
    r"ACCESS_REFUSED - Login was refused using authentication mechanism (PLAIN|AMQPLAIN)\. "
    r"For details see the broker logfile\."
)


def pika_connect_error(target, **kw):
    """Connect with pika expecting failure: (exception type, code, text, seconds)."""
    t0 = time.monotonic()
    with pytest.raises(pika.exceptions.AMQPConnectionError) as ei:
        conn = target.pika(**kw)
        conn.close()
    elapsed = time.monotonic() - t0
    exc = ei.value
    # pika wraps the ConnectionClosedByBroker repr in its first argument.
    m = re.match(r"ConnectionClosedByBroker: \((\d+)\) (.*)$", str(exc.args[0]), re.S)
    assert m, f"unexpected pika error {exc!r}"
    return type(exc).__name__, int(m.group(1)), ast.literal_eval(m.group(2)), elapsed


def test_pika_wrong_password(target):
    kind, code, text, elapsed = pika_connect_error(target, password="wrong-password")
    assert (kind, code, text) == ("ProbableAuthenticationError", 403, REFUSED_PLAIN)
    assert elapsed < FAST


def test_pika_unknown_user(target):
    kind, code, text, elapsed = pika_connect_error(target, user="no-such-user-amqproxy", password="x")
    assert (kind, code, text) == ("ProbableAuthenticationError", 403, REFUSED_PLAIN)
    assert elapsed < FAST


def test_pika_unknown_vhost(target):
    kind, code, text, elapsed = pika_connect_error(target, virtual_host="amqproxy-no-such-vhost")
    assert (kind, code, text) == (
        "ProbableAccessDeniedError",
        530,
        "NOT_ALLOWED - vhost amqproxy-no-such-vhost not found",
    )
    assert elapsed < FAST


def test_pika_vhost_without_permissions(target, locked_vhost):
    kind, code, text, elapsed = pika_connect_error(target, virtual_host=locked_vhost)
    assert (kind, code, text) == (
        "ProbableAccessDeniedError",
        530,
        f"NOT_ALLOWED - access to vhost '{locked_vhost}' refused for user 'guest'",
    )
    assert elapsed < FAST


def test_py_amqp_wrong_password(target):
    t0 = time.monotonic()
    with pytest.raises(amqp.exceptions.AccessRefused) as ei:
        target.amqp(password="wrong-password")
    assert time.monotonic() - t0 < FAST
    assert ei.value.reply_code == 403
    # py-amqp picks AMQPLAIN when offered, PLAIN otherwise.
    assert REFUSED_ANY.fullmatch(ei.value.reply_text), ei.value.reply_text


@pytest.mark.parametrize("method", ["PLAIN", "AMQPLAIN"])
def test_py_amqp_login_methods(target, method):
    conn = target.amqp(login_method=method)
    try:
        assert conn.connected
        conn.channel().close()
    finally:
        conn.close()
    with pytest.raises(amqp.exceptions.AccessRefused) as ei:
        target.amqp(login_method=method, password="wrong-password")
    assert (ei.value.reply_code, ei.value.reply_text) == (
        403,
        REFUSED_PLAIN.replace("PLAIN", method),
    )


def test_py_amqp_unknown_vhost(target):
    with pytest.raises(amqp.exceptions.NotAllowed) as ei:
        target.amqp(virtual_host="amqproxy-no-such-vhost")
    assert (ei.value.reply_code, ei.value.reply_text) == (
        530,
        "NOT_ALLOWED - vhost amqproxy-no-such-vhost not found",
    )


def test_aio_pika_wrong_password(target):
    async def main():
        with pytest.raises(aiormq.exceptions.ProbableAuthenticationError) as ei:
            await aio_pika.connect(target.url(password="wrong-password"), timeout=10)
        return ei.value.args

    t0 = time.monotonic()
    assert run_async(main()) == (REFUSED_PLAIN,)
    assert time.monotonic() - t0 < FAST


def test_aio_pika_unknown_vhost(target):
    async def main():
        # aiormq does not expect Connection.Close in reply to Connection.Open
        # and reports it as an invalid frame.
        with pytest.raises(aiormq.exceptions.AMQPError) as ei:
            await aio_pika.connect(target.url(vhost="amqproxy-no-such-vhost"), timeout=10)
        return ei.value

    exc = run_async(main())
    assert type(exc).__name__ == "InvalidFrameError"
    assert "Connection.Close" in str(exc)


def test_wrong_password_after_correct_login(target):
    good = target.pika()
    try:
        gch = good.channel()
        # While a correct login for the same user is connected (and pooled) ...
        kind, code, text, elapsed = pika_connect_error(target, password="guest-wrong")
        assert (kind, code, text) == ("ProbableAuthenticationError", 403, REFUSED_PLAIN)
        assert elapsed < FAST
        # ... prefix/suffix variants of the right password are refused too ...
        for pw in ("gues", "guest ", "Guest", ""):
            kind, code, _, _ = pika_connect_error(target, password=pw)
            assert (kind, code) == ("ProbableAuthenticationError", 403), repr(pw)
        # ... and the good connection is unaffected.
        assert gch.queue_declare("", exclusive=True).method.queue.startswith("amq.gen-")
    finally:
        good.close()
    # After the correct connection closed as well.
    kind, code, text, _ = pika_connect_error(target, password="guest-wrong")
    assert (kind, code, text) == ("ProbableAuthenticationError", 403, REFUSED_PLAIN)
    again = target.pika()
    again.close()


def test_other_user_with_password_of_pooled_user(target, temp_user):
    user, password = temp_user
    good = target.pika()  # guest/guest connected
    try:
        kind, code, text, _ = pika_connect_error(target, user=user, password="guest")
        assert (kind, code, text) == ("ProbableAuthenticationError", 403, REFUSED_PLAIN)
        kind, code, text, _ = pika_connect_error(target, user="guest", password=password)
        assert (kind, code, text) == ("ProbableAuthenticationError", 403, REFUSED_PLAIN)
        other = target.pika(user=user, password=password)
        try:
            ch = other.channel()
            q = ch.queue_declare("", exclusive=True).method.queue
            ch.basic_publish("", q, b"x", pika.BasicProperties(user_id=user))
            m, props, body = ch.basic_get(q, auto_ack=True)
            assert (body, props.user_id) == (b"x", user)
        finally:
            other.close()
    finally:
        good.close()


def test_vhost_isolation(target, temp_vhost, names):
    """The same queue name in two vhosts is two queues."""
    q = names.queue(vhost="/")
    names.queues.append((temp_vhost, q))
    a = target.pika()
    b = target.pika(virtual_host=temp_vhost)
    try:
        ach, bch = a.channel(), b.channel()
        ach.queue_declare(q)
        bch.queue_declare(q)
        ach.confirm_delivery()
        ach.basic_publish("", q, b"in-root")
        assert bch.basic_get(q) == (None, None, None)
        assert ach.basic_get(q, auto_ack=True)[2] == b"in-root"
    finally:
        a.close()
        b.close()
