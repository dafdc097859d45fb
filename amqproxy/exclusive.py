"""Exclusive queues on shared upstream connections.

The broker ties an exclusive queue to the *connection* that declared it; behind the pool that
connection is shared, so the proxy keeps the tie to the declaring *client*: other clients get
405 RESOURCE_LOCKED (the broker's own answer for another connection's exclusive queue), and the
queue is deleted upstream when its client leaves, so it never outlives it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import ClientSession
    from .upstream import Upstream


class ExclusiveQueues:
    def __init__(self) -> None:
        self._owners: dict[tuple[str, str], tuple[ClientSession, Upstream]] = {}
        self._by_client: dict[ClientSession, set[tuple[str, str]]] = {}

    def owner(self, vhost: str, queue: str) -> ClientSession | None:
        entry = self._owners.get((vhost, queue))
        return entry[0] if entry else None

    def add(self, vhost: str, queue: str, client: ClientSession, upstream: Upstream) -> None:
        key = (vhost, queue)
        self._owners[key] = (client, upstream)
        # The broker ties the queue to that connection: the client's later channels must go there.
        client.exclusive_upstream = upstream
        self._by_client.setdefault(client, set()).add(key)

    def remove(self, vhost: str, queue: str) -> None:
        entry = self._owners.pop((vhost, queue), None)
        if entry is not None:
            keys = self._by_client.get(entry[0])
            if keys is not None:
                keys.discard((vhost, queue))
                if not keys:
                    del self._by_client[entry[0]]

    def remove_if_owner(self, vhost: str, queue: str, client: ClientSession) -> None:
        entry = self._owners.get((vhost, queue))
        if entry is not None and entry[0] is client:
            self.remove(vhost, queue)

    def release_client(self, client: ClientSession) -> dict[Upstream, list[str]]:
        """Forget a departing client's queues; returns them grouped by the upstream that owns them."""
        grouped: dict[Upstream, list[str]] = {}
        for key in self._by_client.pop(client, ()):
            entry = self._owners.pop(key, None)
            if entry is not None:
                grouped.setdefault(entry[1], []).append(key[1])
        return grouped

    def forget_upstream(self, upstream: Upstream) -> None:
        """The broker deletes a dead connection's exclusive queues itself."""
        for key, (_client, owner) in list(self._owners.items()):
            if owner is upstream:
                self.remove(*key)

    def owners_on(self, upstream: Upstream) -> set[ClientSession]:
        return {client for client, owner in self._owners.values() if owner is upstream}

    def __len__(self) -> int:
        return len(self._owners)
