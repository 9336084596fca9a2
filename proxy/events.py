"""The decision record: every switch, weights change, rollback, reload and rollout step.

Events are numbered, kept in a bounded in-memory log (served at `GET /events`, persisted in the
state file) and written to the log as one JSON line each.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from proxy.jsonfields import Unreadable, known_fields

log = logging.getLogger("laneswitch.events")

# Events kept in memory and in the state file; older ones are only in the JSON log.
MAX_EVENTS = 1000

ACTORS = ("auto", "admin", "config")


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
    """Numbered events, oldest first, at most MAX_EVENTS in memory."""

    def __init__(self, events: Iterable[Event] = ()) -> None:
        self._events: deque[Event] = deque(sorted(events, key=lambda e: e.id), maxlen=MAX_EVENTS)
        self._next_id = (self._events[-1].id + 1) if self._events else 1

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
        self._next_id += 1
        self._events.append(event)
        log.info("%s", json.dumps({"event": event.to_json()}, sort_keys=True))
        return event

    def since(self, event_id: int = 0) -> list[Event]:
        """Events with an id greater than `event_id`, oldest first."""
        return [event for event in self._events if event.id > event_id]

    def last(self, service: str) -> Event | None:
        for event in reversed(self._events):
            if event.service == service:
                return event
        return None

    def __len__(self) -> int:
        return len(self._events)
