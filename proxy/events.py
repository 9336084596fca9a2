"""The decision record: every switch, weights change, rollback, reload and rollout step.

Events are numbered, kept in a bounded in-memory log (served at `GET /events`, persisted in the
state file) and written to the log as one JSON line each.
"""

from __future__ import annotations

import heapq
import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from proxy.jsonfields import Unreadable, known_fields

log = logging.getLogger("laneswitch.events")

# Decisions (switch, weights, rollback, step, promote, pause, ...) kept in memory and in the
# state file; older ones are only in the JSON log.
MAX_EVENTS = 1000
# Records that are not decisions (see NOISE_ACTIONS) have their own, smaller cap, so a storm of
# them (a thousand SIGHUPs, a hook failing every interval) never pushes a decision out.
MAX_NOISE_EVENTS = 200
# Actions that record what happened without changing traffic or a rollout's course.
NOISE_ACTIONS = frozenset({"reload", "reload_failed", "hold", "webhook"})


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    time: float  # Unix time
    service: str | None
    actor: str  # auto | admin | config
    action: str  # switch, weights, rollback, reload, reload_failed, step, promote, pause, ...
    from_: Any = None
    to: Any = None
    reason: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["from"] = data.pop("from_")
        return data

    @classmethod
    def from_json(cls, data: object) -> Event:
        """An event as `to_json` wrote it, by this or another laneswitch version: unknown
        fields are ignored; `Unreadable` (a ValueError) when a field has the wrong type."""
        if not isinstance(data, Mapping):
            raise Unreadable(f"expected an object, got {type(data).__name__}")
        fields = dict(data)
        fields["from_"] = fields.pop("from", None)
        return cls(**known_fields(cls, fields))


class EventLog:
    """Numbered events, oldest first: at most MAX_EVENTS decisions and, besides them, at most
    MAX_NOISE_EVENTS records of NOISE_ACTIONS."""

    def __init__(self, events: Iterable[Event] = ()) -> None:
        self._decisions: deque[Event] = deque(maxlen=MAX_EVENTS)
        self._noise: deque[Event] = deque(maxlen=MAX_NOISE_EVENTS)
        self._next_id = 1
        for event in sorted(events, key=lambda e: e.id):
            self._keep(event)

    def _keep(self, event: Event) -> None:
        (self._noise if event.action in NOISE_ACTIONS else self._decisions).append(event)
        self._next_id = max(self._next_id, event.id + 1)

    def record(
        self,
        actor: str,
        action: str,
        service: str | None = None,
        *,
        from_: Any = None,
        to: Any = None,
        reason: str = "",
        values: dict[str, Any] | None = None,
        thresholds: dict[str, Any] | None = None,
    ) -> Event:
        event = Event(
            id=self._next_id,
            time=time.time(),
            service=service,
            actor=actor,
            action=action,
            from_=from_,
            to=to,
            reason=reason,
            values=values or {},
            thresholds=thresholds or {},
        )
        self._keep(event)
        log.info("%s", json.dumps({"event": event.to_json()}, sort_keys=True))
        return event

    def since(self, event_id: int = 0) -> list[Event]:
        """Events with an id greater than `event_id`, oldest first."""
        merged = heapq.merge(self._decisions, self._noise, key=lambda e: e.id)
        return [event for event in merged if event.id > event_id]

    def last(self, service: str) -> Event | None:
        found: Event | None = None
        for kept in (self._decisions, self._noise):
            for event in reversed(kept):
                if event.service == service:
                    if found is None or event.id > found.id:
                        found = event
                    break
        return found

    def __len__(self) -> int:
        return len(self._decisions) + len(self._noise)
