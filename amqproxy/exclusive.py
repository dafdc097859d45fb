"""Exclusive queues on shared upstream connections.

The broker ties an exclusive queue to the *connection* that declared it; behind the pool that
connection is shared, so the proxy keeps the tie to the declaring *client*: other clients get
405 RESOURCE_LOCKED (the broker's own answer for another connection's exclusive queue), and the
queue is deleted upstream when its client leaves, so it never outlives it.

Generic over what a client and a connection are (the pool uses client sessions and upstream
connections); nothing here looks inside either.
"""

from __future__ import annotations

from typing import Generic, TypeVar

Owner = TypeVar("Owner")
Conn = TypeVar("Conn")


class ExclusiveQueues(Generic[Owner, Conn]):
    def __init__(self) -> None:
        self._owners: dict[tuple[str, str], tuple[Owner, Conn]] = {}
        self._by_client: dict[Owner, set[tuple[str, str]]] = {}
        # The connection of a client's first exclusive queue: the broker ties the queue to it, so
        # the client's later channels go there (kept until the client leaves).
        self._pins: dict[Owner, Conn] = {}

    def owner(self, vhost: str, queue: str) -> Owner | None:
        entry = self._owners.get((vhost, queue))
        return entry[0] if entry else None

    def add(self, vhost: str, queue: str, client: Owner, upstream: Conn) -> None:
        key = (vhost, queue)
        self._owners[key] = (client, upstream)
        self._pins[client] = upstream
        self._by_client.setdefault(client, set()).add(key)

    def pinned(self, client: Owner) -> Conn | None:
        """The connection holding `client`'s exclusive queues, where its new channels belong."""
        return self._pins.get(client)

    def remove(self, vhost: str, queue: str) -> None:
        entry = self._owners.pop((vhost, queue), None)
        if entry is not None:
            keys = self._by_client.get(entry[0])
            if keys is not None:
                keys.discard((vhost, queue))
                if not keys:
                    del self._by_client[entry[0]]

    def remove_if_owner(self, vhost: str, queue: str, client: Owner) -> None:
        entry = self._owners.get((vhost, queue))
        if entry is not None and entry[0] is client:
            self.remove(vhost, queue)

    def release_client(self, client: Owner) -> dict[Conn, list[str]]:
        """Forget a departing client's queues; returns them grouped by the upstream that owns them."""
        self._pins.pop(client, None)
        grouped: dict[Conn, list[str]] = {}
        for key in self._by_client.pop(client, ()):
            entry = self._owners.pop(key, None)
            if entry is not None:
                grouped.setdefault(entry[1], []).append(key[1])
        return grouped

    def forget_upstream(self, upstream: Conn) -> None:
        """The broker deletes a dead connection's exclusive queues itself."""
        for key, (_client, owner) in list(self._owners.items()):
            if owner is upstream:
                self.remove(*key)

    def owners_on(self, upstream: Conn) -> set[Owner]:
        return {client for client, owner in self._owners.values() if owner is upstream}

    def __len__(self) -> int:
        return len(self._owners)
