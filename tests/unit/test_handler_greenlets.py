"""server.HandlerGreenlets, StreamServer's spawn: handler greenlets reused across clients."""

import gc
import weakref

import gevent
import gevent.event
import pytest

from amqproxy.server import IDLE_HANDLER_NAME, HandlerGreenlets


class Client:
    """Stands in for an accepted socket: only its lifetime matters here."""


def test_next_client_runs_in_the_greenlet_the_last_one_left():
    spawn = HandlerGreenlets()
    ran_in = []
    spawn(lambda n: ran_in.append((n, gevent.getcurrent())), 1)
    gevent.sleep(0)
    spawn(lambda n: ran_in.append((n, gevent.getcurrent())), 2)
    gevent.sleep(0)
    assert [n for n, _ in ran_in] == [1, 2]
    assert ran_in[0][1] is ran_in[1][1]


def test_clients_at_once_get_greenlets_of_their_own():
    spawn = HandlerGreenlets()
    release = gevent.event.Event()
    ran_in = []

    def handle(n):
        ran_in.append(gevent.getcurrent())
        release.wait()

    for n in range(3):
        spawn(handle, n)
    gevent.sleep(0)
    assert len(set(ran_in)) == 3
    release.set()
    gevent.sleep(0)


def test_an_idle_greenlet_keeps_nothing_of_its_last_client():
    spawn = HandlerGreenlets()
    client = Client()
    gone = weakref.ref(client)
    spawn(lambda c: None, client)
    gevent.sleep(0)
    del client
    gc.collect()
    assert gone() is None


def test_an_exception_is_reported_and_the_greenlet_serves_the_next_client(monkeypatch):
    spawn = HandlerGreenlets()
    hub = gevent.get_hub()
    reported = []
    monkeypatch.setattr(hub, "handle_error", lambda context, kind, value, tb: reported.append(kind))

    ran_in = []

    def fail():
        ran_in.append(gevent.getcurrent())
        raise RuntimeError("a bug in a handler")

    spawn(fail)
    gevent.sleep(0)
    spawn(lambda: ran_in.append(gevent.getcurrent()))
    gevent.sleep(0)
    assert reported == [RuntimeError]
    assert len(ran_in) == 2 and ran_in[0] is ran_in[1]


@pytest.mark.parametrize("keep", [0, 2])
def test_no_more_idle_greenlets_than_kept(keep):
    spawn = HandlerGreenlets(keep=keep)
    release = gevent.event.Event()
    for _ in range(5):
        spawn(release.wait)
    gevent.sleep(0)
    release.set()
    gevent.sleep(0)
    assert len(spawn._idle) == keep


def test_a_waiting_greenlet_is_named_idle_and_a_serving_one_is_not():
    """The chaos suite's leak check counts greenlets but for those named idle."""
    from chaos.harness import IDLE_HANDLER_NAME as discounted_by_the_leak_check

    assert discounted_by_the_leak_check == IDLE_HANDLER_NAME
    spawn = HandlerGreenlets()
    names = []
    spawn(lambda: names.append(gevent.getcurrent().name))
    gevent.sleep(0)
    (worker,) = [w.greenlet for w in spawn._idle]
    assert worker.name == IDLE_HANDLER_NAME
    spawn(lambda: names.append(gevent.getcurrent().name))
    gevent.sleep(0)
    assert names[0] == names[1] != IDLE_HANDLER_NAME
