"""Broker: the shared RabbitMQ behind the proxy, through rabbitmqctl and direct connections."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest

from .settings import BROKER_HOST, BROKER_PORT

if TYPE_CHECKING:
    from .proxy import ProxyProcess


class Broker:
    """Access to the broker behind the proxy: rabbitmqctl and a direct AMQP
    connection for setup/cleanup that must not depend on the proxy."""

    host = BROKER_HOST
    port = BROKER_PORT

    def __init__(self):
        self.rabbitmqctl_path = shutil.which("rabbitmqctl")

    def ctl(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        if not self.rabbitmqctl_path:
            pytest.skip("rabbitmqctl not available")
        res = subprocess.run(
            [self.rabbitmqctl_path, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({res.returncode}): {res.stdout}\n{res.stderr}")
        return res.stdout

    def list_connections(self) -> list[dict]:
        """All broker connections, client_properties decoded to a dict."""
        out = self.ctl(
            "list_connections",
            "--formatter",
            "json",
            "name",
            "user",
            "vhost",
            "state",
            "client_properties",
        )
        start = out.find("[")
        rows = json.loads(out[start:]) if start >= 0 else []
        for row in rows:
            row["client_properties"] = decode_ctl_table(row.get("client_properties"))
        return rows

    def proxy_upstreams(self, proxy: ProxyProcess) -> list[dict]:
        """Broker connections opened by this proxy instance."""
        prefix = proxy.connection_name_prefix
        return [
            c
            for c in self.list_connections()
            if str(c["client_properties"].get("connection_name", "")).startswith(prefix)
        ]

    def pika_connection(self, **kw):
        import pika

        params = dict(
            host=self.host,
            port=self.port,
            credentials=pika.PlainCredentials("guest", "guest"),
            socket_timeout=5,
            stack_timeout=10,
            connection_attempts=1,
        )
        params.update(kw)
        return pika.BlockingConnection(pika.ConnectionParameters(**params))

    def queue_message_count(self, queue: str, vhost: str = "/") -> int:
        conn = self.pika_connection(virtual_host=vhost)
        try:
            return conn.channel().queue_declare(queue, passive=True).method.message_count
        finally:
            conn.close()


def decode_ctl_table(value):
    """rabbitmqctl --formatter json renders tables as [[key, type, value], ...]."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, list):
        return {}
    out = {}
    for entry in value:
        if isinstance(entry, list) and len(entry) == 3:
            key, typ, val = entry
            out[key] = decode_ctl_table(val) if typ == "table" else val
    return out
