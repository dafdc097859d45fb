"""Recent upstream failures and recoveries: what GET /upstreams lists as `events` and the status
page shows, so that an operator sees at a glance what went wrong with the nodes and what came back.

Bounded and de-duplicated: a node that keeps failing with the same error is one entry with a
count and the time of its latest occurrence, so a long outage cannot push everything else out.
Times are wall-clock seconds (the --workers supervisor merges the workers' lists by time). The
texts are those the logs already carry (error texts and fixed phrases): never credentials.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

FAILURE = "failure"
RECOVERY = "recovery"
EVENTS_KEPT = 50


class RecentEvents:
    def __init__(self, size: int = EVENTS_KEPT, clock: Callable[[], float] = time.time) -> None:
        self.size = size
        self._clock = clock
        # (kind, node, text) -> entry; the most recently seen last.
        self._entries: OrderedDict[tuple[str, str, str], dict[str, Any]] = OrderedDict()

    def add(self, kind: str, node: str, text: str) -> None:
        now = self._clock()
        key = (kind, node, text)
        entry = self._entries.pop(key, None)
        if entry is None:
            entry = {"kind": kind, "node": node or None, "text": text, "count": 0, "first_at": now}
        entry["count"] += 1
        entry["at"] = now
        self._entries[key] = entry
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def snapshot(self) -> list[dict[str, Any]]:
        """Newest first, each with its age in seconds at the time of the call."""
        now = self._clock()
        return [
            dict(
                entry, at=round(entry["at"], 3), first_at=round(entry["first_at"], 3), age_s=round(now - entry["at"], 3)
            )
            for entry in reversed(self._entries.values())
        ]
