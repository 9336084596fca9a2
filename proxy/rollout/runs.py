"""Every service's rollout run, kept as the plain JSON the state file and the fleet's store hold.

The rollout manager reads and writes runs here; the control plane saves them with the rest of
the runtime state (`saved`), and puts back those of a state file (`load`) or of the fleet
(`adopt`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from proxy.jsonfields import Unreadable, known_fields
from proxy.rollout.values import RolloutState

log = logging.getLogger("laneswitch.rollout")


class Runs:
    """The run of each service that has (had) one: `RolloutState.to_json()` per service."""

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, Any]] = {}

    def state(self, service: str) -> RolloutState:
        return RolloutState.from_json(self._runs.get(service, {}))

    def store(self, service: str, state: RolloutState) -> None:
        self._runs[service] = state.to_json()

    def keep(self, services: Iterable[str]) -> list[str]:
        """Only the runs of `services` stay (those with a rollout block); returns the others'
        names, whose runs are dropped."""
        kept = set(services)
        dropped = [name for name in self._runs if name not in kept]
        for name in dropped:
            del self._runs[name]
        return dropped

    def saved(self) -> dict[str, dict[str, Any]]:
        """The runs as plain JSON, per service (the state file's and the fleet's `rollouts`)."""
        return self._runs

    def load(self, saved: Mapping[str, Any]) -> int:
        """The runs of a state file; returns how many entries were unreadable and skipped."""
        self._runs = {}
        skipped = 0
        for name, entry in saved.items():
            try:
                # Only the fields this version knows, each of its type (see RolloutState).
                self._runs[name] = known_fields(RolloutState, entry)
            except Unreadable as exc:
                skipped += 1
                log.warning("state file: rollouts.%s skipped: %s", name, exc)
        return skipped

    def adopt(
        self, runs: Mapping[str, Any], services: Collection[str], behind: Collection[str]
    ) -> dict[str, Any]:
        """The fleet's runs of this config's `services`, but for those `behind` (this member's
        config cannot take the fleet's state for them: they keep their own); returns the runs
        as they were before."""
        before = self._runs
        adopted = {
            name: dict(value)
            for name, value in runs.items()
            if name in services and name not in behind and isinstance(value, dict)
        }
        for name in behind:
            if name in before:
                adopted[name] = before[name]
        self._runs = adopted
        return before
