"""15. Many concurrent client connections, each with its own traffic."""

import threading

import pika

N_CONNECTIONS = 30
N_MESSAGES = 20


def _client(target, idx, queue, barrier, results):
    try:
        conn = target.pika()
        try:
            ch = conn.channel()
            ch.queue_declare(queue)
            barrier.wait(timeout=20)  # all 30 connections open at once
            for i in range(N_MESSAGES):
                ch.basic_publish("", queue, f"{idx}:{i}".encode(), pika.BasicProperties(correlation_id=f"{idx}-{i}"))
            got = []
            for method, props, body in ch.consume(queue, inactivity_timeout=10):
                if method is None:
                    break
                got.append((body, props.correlation_id))
                ch.basic_ack(method.delivery_tag)
                if len(got) == N_MESSAGES:
                    break
            ch.cancel()
            barrier.wait(timeout=20)  # nobody closes before everybody is done
            results[idx] = got
        finally:
            if conn.is_open:
                conn.close()
    except Exception as e:  # noqa: BLE001
        results[idx] = repr(e)
        barrier.abort()


def test_30_concurrent_connections(target, names):
    queues = [names.queue() for _ in range(N_CONNECTIONS)]
    barrier = threading.Barrier(N_CONNECTIONS)
    results = {}
    threads = [
        threading.Thread(target=_client, args=(target, i, queues[i], barrier, results), daemon=True)
        for i in range(N_CONNECTIONS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(45)
    assert not any(t.is_alive() for t in threads)
    errors = {i: r for i, r in results.items() if isinstance(r, str)}
    assert errors == {}
    assert sorted(results) == list(range(N_CONNECTIONS))
    for idx, got in results.items():
        assert got == [(f"{idx}:{i}".encode(), f"{idx}-{i}") for i in range(N_MESSAGES)], idx
