"""This member of a fleet as each part of its coordinator sees it: id, store, lease, store state.

The parts (applying and writing changes, the analysis windows, the lease and heartbeat tasks)
are each handed this one object rather than the whole coordinator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from proxy.fleet.lease import Leadership
from proxy.fleet.store import FleetStore

log = logging.getLogger("laneswitch.fleet")


@dataclass(slots=True)
class Member:
    id: str
    store: FleetStore
    leadership: Leadership
    lease_value: str  # this member's value of the lease key: its writes' fence while it leads
    store_up: bool = False
    epoch_seen: int = 0  # highest fencing epoch seen, kept when re-seeding an empty store
    refusals: int = 0  # writes and takes the store refused

    def store_down(self, exc: Exception) -> None:
        if self.store_up:
            log.error("%s: %s: no steps, changes 503 except rollback", self.id, exc)
        self.store_up = False
