"""What the control plane asks of the place its runtime state lives (fleet mode or none).

The narrow interface between `ControlPlane` (and its `RolloutManager`) and fleet mode.

`LocalBackend` is a fleet of one (no `fleet` block): every call is a no-op or says yes, so the
control plane behaves exactly as without fleet mode. `coordinator.FleetCoordinator` is the
Redis-backed one. The control plane never imports the coordinator, only this.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client.core import Metric

from proxy.metrics import StatsSnapshot

# The admin API's answer when a change cannot reach the fleet's store.
STORE_UNAVAILABLE = "fleet store unavailable"


class StateBackend:
    """A fleet of one; the base of the fleet's coordinator."""

    fleet = False

    @property
    def ready(self) -> bool:
        """Part of /readyz: the member applied the fleet's current state (or gave up waiting)."""
        return True

    @property
    def writable(self) -> bool:
        """Changes other than a rollback may be made (the store can be reached)."""
        return True

    def deciding(self) -> bool:
        """This process may run rollout analyses and take their decisions (the leader)."""
        return True

    async def saved(self) -> None:
        """The runtime state or the decision record changed (after the state file write)."""

    async def acknowledged(self) -> dict[str, Any] | None:
        """After a change: wait for every live member to apply it; the members' answer for the
        admin API: acknowledged, pending, and config_behind of members that could not take it
        (None: not a fleet)."""
        return None

    async def window(
        self, service: str, versions: Sequence[str]
    ) -> tuple[float, list[StatsSnapshot]] | None:
        """The fleet's summed counters of `versions` since the last `mark` (and the window's
        start), then a new mark; None: use this process's own counters."""
        return None

    def mark(self, service: str) -> None:
        """A new analysis window of `service` starts now."""

    async def events(self, since: int) -> list[dict[str, Any]] | None:
        """The fleet's decision record after `since`; None: this process's own."""
        return None

    def status(self) -> dict[str, Any] | None:
        """The `fleet` part of GET /status; None: not a fleet."""
        return None

    def metrics(self) -> Iterable[Metric]:
        return ()
