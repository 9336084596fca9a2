"""What the control plane asks of the rollouts: hooks around its changes, and their run state.

The control plane calls these at the points where a change meets a running rollout (a change by
hand pauses it, a rollback ends it, a reload may start or edit one) and to persist the runs with
the rest of the runtime state (the state file, the fleet's store). `rollout.manager` implements
it; the control plane never imports that module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from proxy.config.model import Config
from proxy.control.weights import Weights
from proxy.rollout.runs import Runs


class Rollouts(Protocol):
    """Every service's rollout, as the control plane sees them."""

    # The runs, saved with the rest of the runtime state, and put back from a state file or
    # the fleet's store.
    runs: Runs

    def status(self, service: str) -> dict[str, Any] | None:
        """The rollout part of GET /status; None without a rollout block."""
        ...

    def rollback_target(self, service: str) -> str | None:
        """After a promotion, the version that had the traffic before it."""
        ...

    async def before_manual_change(self, service: str, action: str, actor: str) -> None:
        """A switch or weights call is about to be made: a running rollout pauses."""
        ...

    async def before_rollback(self, service: str, actor: str) -> Callable[[], None] | None:
        """A rollback by a person is about to be made: counted, and it ends the run; the
        returned commit stores the run's end (called with the rollback's weights)."""
        ...

    def config_changed(
        self, old: Config, new: Config, weights_before: Mapping[str, Weights]
    ) -> list[tuple[str, str]]:
        """A reload was adopted (under the lock): the services whose candidate is a new
        release, with why, for `start_release` once the lock is released."""
        ...

    async def start_release(self, service: str, reason: str) -> None:
        """A new release of the candidate: a new run from weight 0 (actor "config")."""
        ...

    async def restored(self) -> None:
        """The saved runtime state is back: resume (or supersede) the saved runs."""
        ...

    def fleet_changed(self, before: Mapping[str, Any] | None = None) -> None:
        """The fleet's state was applied (`before`: the runs it replaced), or this member's
        leadership changed (None)."""
        ...

    async def shutdown(self) -> None:
        """The graceful stop began: no decision from now on (one under way finishes)."""
        ...

    def close(self) -> None: ...
