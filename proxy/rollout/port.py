"""What the rollout manager needs of the control plane, and nothing more.

The manager reads the config, the weights in force, the counters and the decision record, and
changes traffic only through `apply_rollout` (the control plane's lock, table install,
acknowledgement, event and state file). It sees the control plane through this protocol, so
`proxy.control` and `proxy.rollout` never import each other; `proxy/server.py` wires the two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from proxy.config.model import Config
from proxy.events import EventLog
from proxy.fleet.backend import StateBackend
from proxy.metrics import MetricsWindow, StatsRegistry
from proxy.rollout.values import Weights


class ControlPort(Protocol):
    """The control plane as a rollout sees it."""

    config: Config
    weights: dict[str, Weights]  # in force, per service
    stats: StatsRegistry
    window: MetricsWindow  # the recent window of GET /status
    events: EventLog
    backend: StateBackend  # this process alone, or the fleet's store

    def share(self, service: str, version: str) -> float:
        """The version's share of its service's traffic, in percent."""
        ...

    def check_writable(self) -> None:
        """ControlError 503 while the fleet's store cannot take a change."""
        ...

    async def apply_rollout(
        self,
        service: str,
        weights: Weights | None,
        *,
        actor: str,
        action: str,
        reason: str,
        values: dict[str, Any],
        thresholds: dict[str, Any],
        phases: tuple[str, str],
        commit: Callable[[], bool],
    ) -> bool:
        """Carry out one decision under the control plane's lock; `commit` stores the run's
        new state there, with the weights (False from it: the run moved, dropped)."""
        ...

    async def save(self) -> None:
        """Write the state file and share the change (the fleet)."""
        ...
