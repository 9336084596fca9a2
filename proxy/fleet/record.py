"""The fleet's decision record as a member mirrors it. Pure, no I/O.

The mirror serves GET /events and re-seeds an empty store while or after the store is away. It
keeps the local record's rule, decisions and noise capped apart, so a storm of noise never
pushes a decision out.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from typing import Any

from proxy.events import MAX_EVENTS, MAX_NOISE_EVENTS, NOISE_ACTIONS


class Mirror:
    """Event JSON (with the fleet's ids), oldest first: at most MAX_EVENTS decisions and,
    besides them, at most MAX_NOISE_EVENTS records of NOISE_ACTIONS."""

    def __init__(self) -> None:
        self._decisions: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._noise: deque[dict[str, Any]] = deque(maxlen=MAX_NOISE_EVENTS)
        self.last_id = 0

    def extend(self, events: Iterable[dict[str, Any]]) -> None:
        """Events newer than the last one kept, oldest first."""
        for event in events:
            event_id = int(event.get("id", 0))
            if event_id <= self.last_id:
                continue
            kept = self._noise if event.get("action") in NOISE_ACTIONS else self._decisions
            kept.append(event)
            self.last_id = event_id

    def since(self, event_id: int) -> list[dict[str, Any]]:
        merged = heapq.merge(self._decisions, self._noise, key=lambda e: int(e.get("id", 0)))
        return [event for event in merged if int(event.get("id", 0)) > event_id]

    def __len__(self) -> int:
        return len(self._decisions) + len(self._noise)
