"""Target: where a test connects to (the broker itself or a proxy in front of it), with the
connection helpers of each client library."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .proxy import ProxyProcess


@dataclass
class Target:
    """Where a test connects to: the broker itself or a proxy in front of it."""

    name: str
    host: str
    port: int
    proxy: ProxyProcess | None = None
    user: str = "guest"
    password: str = "guest"
    vhost: str = "/"
    extra: dict = field(default_factory=dict)

    @property
    def is_proxy(self) -> bool:
        return self.proxy is not None

    # pika ----------------------------------------------------------------
    def pika_params(self, **kw):
        import pika

        user = kw.pop("user", self.user)
        password = kw.pop("password", self.password)
        params = dict(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(user, password),
            socket_timeout=5,
            stack_timeout=10,
            connection_attempts=1,
        )
        params.update(kw)
        return pika.ConnectionParameters(**params)

    def pika(self, **kw):
        import pika

        return pika.BlockingConnection(self.pika_params(**kw))

    # py-amqp -------------------------------------------------------------
    def amqp(self, connect: bool = True, connection_class=None, **kw):
        import amqp

        params = dict(
            host=f"{self.host}:{self.port}",
            userid=self.user,
            password=self.password,
            virtual_host=self.vhost,
            connect_timeout=5,
            read_timeout=10,
            write_timeout=10,
        )
        params.update(kw)
        conn = (connection_class or amqp.Connection)(**params)
        if connect:
            conn.connect()
        return conn

    # aio-pika ------------------------------------------------------------
    def url(self, user=None, password=None, vhost=None, **query) -> str:
        from urllib.parse import quote, urlencode

        user = self.user if user is None else user
        password = self.password if password is None else password
        vhost = self.vhost if vhost is None else vhost
        url = (
            f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/{quote(vhost, safe='')}"
        )
        if query:
            url += "?" + urlencode(query)
        return url

    def __str__(self):
        return self.name
