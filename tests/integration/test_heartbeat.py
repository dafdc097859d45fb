"""14. Heartbeats negotiated by the client are honoured: an idle but live
client is kept (and sent heartbeats) for several heartbeat intervals."""

import asyncio
import threading

import aio_pika

from ._support import run_async

IDLE = 7.0


def _aio_pika_idle(target, queue, result):
    async def main():
        conn = await aio_pika.connect(target.url(heartbeat=2), timeout=10)
        try:
            ch = await conn.channel()
            q = await ch.declare_queue(queue)
            await asyncio.sleep(IDLE)
            assert not conn.is_closed, "aio-pika connection closed while idle"
            await ch.default_exchange.publish(aio_pika.Message(b"aio-after-idle"), routing_key=queue)
            msg = await q.get(timeout=5, fail=False)
            for _ in range(50):
                if msg is not None:
                    break
                await asyncio.sleep(0.05)
                msg = await q.get(timeout=5, fail=False)
            assert msg is not None, "message published after idle not found"
            await msg.ack()
            result["body"] = msg.body
            result["closed"] = conn.is_closed
        finally:
            await conn.close()

    try:
        run_async(main(), timeout=IDLE + 20)
    except BaseException as e:  # noqa: BLE001
        result["error"] = repr(e)


def test_idle_clients_with_heartbeat_2_survive(target, names):
    """pika and aio-pika idle concurrently for 7 s with heartbeat=2."""
    aio_queue = names.queue("aio")
    aio_result = {}
    aio_thread = threading.Thread(target=_aio_pika_idle, args=(target, aio_queue, aio_result), daemon=True)
    aio_thread.start()

    q = names.queue()
    conn = target.pika(heartbeat=2)
    try:
        assert conn._impl.params.heartbeat == 2
        ch = conn.channel()
        ch.queue_declare(q)
        checker = conn._impl._heartbeat_checker
        assert checker is not None
        before = checker._heartbeat_frames_received
        conn.sleep(IDLE)  # keeps servicing I/O: sends heartbeats, reads them
        assert conn.is_open, "pika connection closed while idle"
        received = checker._heartbeat_frames_received - before
        # The server side sends a heartbeat at least every 2 s (RabbitMQ every 1 s).
        assert received >= 3, f"only {received} heartbeats received in {IDLE}s"
        ch.basic_publish("", q, b"after-idle")
        m, _, body = ch.basic_get(q, auto_ack=True)
        assert body == b"after-idle"
    finally:
        if conn.is_open:
            conn.close()
        aio_thread.join(IDLE + 25)
    assert "error" not in aio_result, aio_result["error"]
    assert aio_result == {"body": b"aio-after-idle", "closed": False}


def test_heartbeat_disabled_client_is_not_dropped(target):
    """heartbeat=0 (disabled) for a short idle period: nothing is sent."""
    conn = target.pika(heartbeat=0)
    try:
        assert conn._impl.params.heartbeat == 0
        assert conn._impl._heartbeat_checker is None
        conn.sleep(0.5)
        assert conn.is_open
        conn.channel().close()
    finally:
        conn.close()
