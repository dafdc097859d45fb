"""Channel closes that cross on the wire: the broker closes a channel (a channel error) while the
client closes it too. Whatever order the Close and Close-Ok frames take, the upstream channel is
freed exactly once, the shared upstream connection stays open, and the client sees what RabbitMQ
itself would show it.

Found by the live fuzz test: RabbitMQ does not always answer a Close it receives on a channel it
is closing itself when the Close-Ok follows close behind, so a proxy that answered the client's
crossing Close by sending a Close of its own upstream waited forever for that reply, and the
upstream channel leaked (one per occurrence, until the connection's channel_max ran out).
"""

from __future__ import annotations

import socket
import struct
import threading

import pika
import pytest
from pamqp import commands as C

from ._support import RawAMQP, shutdown_both, wait_until

_CHANNEL_OPEN_OK, _CHANNEL_CLOSE, _CHANNEL_CLOSE_OK = (20, 11), (20, 40), (20, 41)


class _Relayed:
    """One relayed connection: the proxy's socket, and the broker's frames held back, if any."""

    def __init__(self, number: int, proxy_side: socket.socket):
        self.number = number
        self.proxy_side = proxy_side
        self.lock = threading.Lock()  # one writer to the proxy at a time: a read's frames, or the held ones
        self.held: bytearray | None = None


_HOLD, _RELEASE = "hold", "release"


class CrossingRelay:
    """A TCP relay between the proxy and the broker that reads the broker's frames. With
    `drop_late_close_ok`, it drops a Channel.Close-Ok that the broker sends on a channel it has
    sent a Close on: RabbitMQ does that when its writer loses the race against the channel's end
    (observed under load), here made deterministic. With `hold_late_close_ok`, that Close-Ok
    and everything after it is held back until the proxy sends its next Channel.Close: a late
    Close-Ok (RabbitMQ's writers are one per channel), here as late as it can be. It also
    records, per channel, what the proxy sent after the broker's Close."""

    def __init__(self, broker_host: str, broker_port: int, drop_late_close_ok: bool, hold_late_close_ok: bool = False):
        self.broker = (broker_host, broker_port)
        self.drop_late_close_ok = drop_late_close_ok
        self.hold_late_close_ok = hold_late_close_ok
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.broker_closed: set[tuple[int, int]] = set()  # (connection, channel) the broker closed
        self.closes_after_broker_close: list[tuple[int, int]] = []  # the proxy's Close sent anyway
        self.dropped = 0
        self.held = 0  # late Close-Oks held back
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        number = 0
        while True:
            try:
                proxy_side, _ = self.listener.accept()
            except OSError:
                return
            number += 1
            broker_side = socket.create_connection(self.broker)
            relayed = _Relayed(number, proxy_side)
            for src, dst, reader in (
                (proxy_side, broker_side, self._from_proxy),
                (broker_side, proxy_side, self._from_broker),
            ):
                threading.Thread(target=self._pipe, args=(src, dst, reader, relayed), daemon=True).start()

    def _pipe(self, src, dst, on_frame, relayed: _Relayed) -> None:
        buf = b""
        from_broker = on_frame == self._from_broker
        skip = 0 if from_broker else 8  # the protocol header
        try:
            while data := src.recv(65536):
                buf += data
                out = bytearray()
                if skip:
                    taken = min(skip, len(buf))
                    out += buf[:taken]
                    buf, skip = buf[taken:], skip - taken
                with relayed.lock:
                    while len(buf) >= 7:
                        frame_type, channel, size = struct.unpack_from(">BHI", buf)
                        if len(buf) < size + 8:
                            break
                        frame, buf = buf[: size + 8], buf[size + 8 :]
                        method = struct.unpack_from(">HH", frame, 7) if frame_type == 1 and size >= 4 else None
                        verdict = on_frame(relayed.number, channel, method, relayed.held is not None)
                        if verdict is _HOLD:
                            relayed.held = bytearray()
                        elif verdict is _RELEASE:
                            assert relayed.held is not None
                            relayed.proxy_side.sendall(relayed.held)  # before this Close reaches the broker
                            relayed.held = None
                        if not verdict:
                            continue
                        if from_broker and relayed.held is not None:
                            relayed.held += frame
                        else:
                            out += frame
                    if from_broker:
                        dst.sendall(out)
                if not from_broker:
                    dst.sendall(out)
        except OSError:
            pass
        finally:
            shutdown_both(src, dst)

    def _from_broker(self, number: int, channel: int, method, holding: bool):
        key = (number, channel)
        with self.lock:
            if method == _CHANNEL_CLOSE:
                self.broker_closed.add(key)
            elif method == _CHANNEL_OPEN_OK:
                self.broker_closed.discard(key)
            elif method == _CHANNEL_CLOSE_OK and key in self.broker_closed:
                if self.drop_late_close_ok:
                    self.dropped += 1
                    return False
                if self.hold_late_close_ok and not holding:
                    self.held += 1
                    return _HOLD
        return True

    def _from_proxy(self, number: int, channel: int, method, holding: bool):
        with self.lock:
            if method == _CHANNEL_CLOSE and (number, channel) in self.broker_closed:
                self.closes_after_broker_close.append((number, channel))
        if holding and method == _CHANNEL_CLOSE:
            return _RELEASE
        return True


@pytest.fixture(params=["broker answers", "broker drops its Close-Ok"])
def crossing_relay(request, broker):
    relay = CrossingRelay(broker.host, broker.port, drop_late_close_ok=request.param != "broker answers")
    yield relay
    relay.close()


def _raw_client(host: str, port: int) -> RawAMQP:
    raw = RawAMQP(host, port)
    _, _, reply = raw.handshake()
    assert isinstance(reply, C.Connection.OpenOk), reply
    return raw


def _channel_error(raw: RawAMQP, channel: int, missing_queue: str) -> None:
    """Open `channel` and have the broker close it: basic.consume on a queue that does not exist."""
    raw.send(C.Channel.Open(), channel)
    raw.expect(C.Channel.OpenOk, channel)
    raw.send(C.Basic.Consume(queue=missing_queue, consumer_tag="crossing"), channel)
    close = raw.expect(C.Channel.Close, channel)
    assert close.reply_code == 404, (close.reply_code, close.reply_text)


def _close_behind_a_failing_method(raw: RawAMQP, missing_queue: str) -> None:
    """Open channel 1, then send basic.consume on a queue that does not exist and the client's
    Close in one write: the Close is on its way upstream when the broker's Close comes back (a
    true crossing on the proxy's upstream leg)."""
    raw.send(C.Channel.Open(), 1)
    raw.expect(C.Channel.OpenOk, 1)
    raw.send_bytes(
        pika.frame.Method(1, pika.spec.Basic.Consume(queue=missing_queue)).marshal()
        + pika.frame.Method(1, pika.spec.Channel.Close(200, "bye", 0, 0)).marshal()
    )


def _close(channel_reply_code: int = 200) -> C.Channel.Close:
    return C.Channel.Close(reply_code=channel_reply_code, reply_text="bye", class_id=0, method_id=0)


def _settled(proc) -> bool:
    totals = proc.admin_json("/stats")["totals"]
    return totals["clients"] == 0 and totals["client_channels"] == 0 and totals["upstream_channels"] == 0


def _wait_settled(proc) -> None:
    """No client, client channel or upstream channel is left; else fail with each upstream
    channel's close flags as they are then."""
    try:
        wait_until(lambda: _settled(proc), timeout=5, interval=0.05)
    except AssertionError:
        raise AssertionError(f"upstream channel left over: {_upstream_channels(proc)}") from None


def _open_upstreams(proc) -> set[int]:
    return {u["id"] for u in proc.admin_json("/upstreams")["connections"] if u["state"] == "open"}


def _upstream_channels(proc):
    return [u.get("channel_list") for u in proc.admin_json("/upstreams?channels=1")["connections"]]


@pytest.mark.proxy_only
@pytest.mark.parametrize("then", ["leaves at once", "answers Close-Ok, then leaves"])
def test_client_close_crossing_a_broker_close_frees_the_upstream_channel(proxy_factory, crossing_relay, names, then):
    proc = proxy_factory(upstream=f"amqp://127.0.0.1:{crossing_relay.port}")
    for _ in range(3):  # each round must leave nothing behind on the same upstream connection
        raw = _raw_client(proc.host, proc.port)
        _channel_error(raw, 1, names.queue())
        raw.send(_close(), 1)  # the client's Close, as if it crossed the broker's
        if then == "answers Close-Ok, then leaves":
            raw.expect(C.Channel.CloseOk, 1)
            raw.send(C.Channel.CloseOk(), 1)
        raw.close()
        _wait_settled(proc)
    # The broker's Close is answered with Close-Ok, never with a Close it might not answer.
    assert crossing_relay.closes_after_broker_close == []
    upstreams = _open_upstreams(proc)
    assert len(upstreams) == 1, upstreams  # never closed by the client's doings
    _still_carries_traffic(proc, names)
    assert _open_upstreams(proc) == upstreams


def test_crossing_closes_then_the_channel_id_is_reused(target, names):
    """What the client observes, direct and through the proxy: its crossing Close is answered
    with Close-Ok, and once it answered the broker's Close the channel id opens again."""
    raw = _raw_client(target.host, target.port)
    try:
        _channel_error(raw, 1, names.queue())
        raw.send(_close(), 1)
        raw.expect(C.Channel.CloseOk, 1)
        raw.send(C.Channel.CloseOk(), 1)
        queue = names.queue()
        raw.send(C.Channel.Open(), 1)
        raw.expect(C.Channel.OpenOk, 1)
        raw.send(C.Queue.Declare(queue=queue), 1)
        assert raw.expect(C.Queue.DeclareOk, 1).queue == queue
        if target.is_proxy:
            # The admin API shows this client's reopened channel, and only that one.
            host, port = raw.sock.getsockname()
            local = f"{host}:{port}"
            (me,) = [c["id"] for c in target.proxy.admin_json("/connections")["connections"] if c["remote"] == local]
            (listed,) = [
                c for channels in _upstream_channels(target.proxy) for c in channels or [] if c["client"] == me
            ]
            assert listed["client_channel"] == 1 and not listed["closing"], listed
            assert listed["close"] == {"client": "open", "upstream": "open"}, listed
        raw.send(_close(), 1)
        raw.expect(C.Channel.CloseOk, 1)
    finally:
        raw.close()
    if target.is_proxy:
        _wait_settled(target.proxy)


@pytest.mark.proxy_only
def test_client_close_pipelined_behind_a_failing_method(proxy_factory, crossing_relay, names):
    """The client's Close is on its way upstream when the broker's Close comes back (a true
    crossing on the proxy's upstream leg): the client gets its Close-Ok, nothing leaks, whether or
    not the broker answers the proxy's Close."""
    proc = proxy_factory(upstream=f"amqp://127.0.0.1:{crossing_relay.port}")
    for _ in range(3):
        raw = _raw_client(proc.host, proc.port)
        _close_behind_a_failing_method(raw, names.queue())
        # RabbitMQ may or may not show the client its own Close (404) first; a Close-Ok comes.
        while True:
            _, frame = raw.recv_frame()
            if isinstance(frame, C.Channel.Close):
                raw.send(C.Channel.CloseOk(), 1)
                continue
            assert isinstance(frame, C.Channel.CloseOk), frame
            break
        raw.close()
        _wait_settled(proc)
    upstreams = _open_upstreams(proc)
    assert len(upstreams) == 1, upstreams
    _still_carries_traffic(proc, names)
    assert _open_upstreams(proc) == upstreams


@pytest.mark.proxy_only
def test_a_late_close_ok_never_answers_the_next_user_of_the_id(proxy_factory, broker, names):
    """Closes cross on the upstream leg and the broker's Close-Ok for the crossed Close comes
    late, once the proxy has sent its next Close. The client's next channel gets its replies in
    order, its own Close-Ok last, and the shared connection stays open. (Found by the live fuzz
    test: the late Close-Ok answered the next channel on the same upstream id, its reply was
    lost, and the id was freed while the broker still had the channel; the next channel.open on
    it closed the whole upstream connection with 504 "second 'channel.open' seen".)"""
    relay = CrossingRelay(broker.host, broker.port, drop_late_close_ok=False, hold_late_close_ok=True)
    try:
        proc = proxy_factory(upstream=f"amqp://127.0.0.1:{relay.port}")
        raw = _raw_client(proc.host, proc.port)
        _close_behind_a_failing_method(raw, names.queue())
        raw.expect(C.Channel.CloseOk, 1)
        # The same client channel again, its first method and its Close in one write: the proxy
        # places it on the same upstream connection and forwards both at once.
        raw.send_bytes(
            pika.frame.Method(1, pika.spec.Channel.Open()).marshal()
            + pika.frame.Method(1, pika.spec.Basic.Qos(prefetch_count=7)).marshal()
            + pika.frame.Method(1, pika.spec.Channel.Close(200, "bye", 0, 0)).marshal()
        )
        replies = []
        while C.Channel.CloseOk not in replies:
            replies.append(type(raw.recv_frame()[1]))
        assert replies == [C.Channel.OpenOk, C.Basic.QosOk, C.Channel.CloseOk]
        assert relay.held == 1  # the late Close-Ok came, held until the proxy's next Close
        raw.close()
        _wait_settled(proc)
        assert len(_open_upstreams(proc)) == 1
        _still_carries_traffic(proc, names)
    finally:
        relay.close()


def _still_carries_traffic(proc, names) -> None:
    queue = names.queue()
    conn = proc.target().pika()
    try:
        ch = conn.channel()
        ch.queue_declare(queue)
        ch.confirm_delivery()
        ch.basic_publish("", queue, b"after the crossing closes")
        assert ch.basic_get(queue, auto_ack=True)[2] == b"after the crossing closes"
    finally:
        conn.close()
