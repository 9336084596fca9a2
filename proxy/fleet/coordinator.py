"""A member of a fleet: wires one `ControlPlane` to the fleet's store (SPEC §9).

What it does, each in its own task:
- sync: subscribes to the generation channel and polls the generation every POLL_INTERVAL
  (pub/sub drops messages on a reconnect, traefik #8749); on every notice, poll and
  (re)connect, `changes.Changes.sync` brings this member in line with the store.
- lease: the leader renews every lease * RENEW_FRACTION and stops deciding at lease *
  DECIDE_FRACTION after the last renewal it sent (`lease.Leadership`); a member that does not
  lead tries to take a free lease every lease * ACQUIRE_FRACTION. Only the deciding member runs
  the rollout timers, and every write it makes carries its fencing number.
- heartbeat: this member's record (admin URL, config hash, applied generation, health view).
- counts: what this member served since its last report, into the store's open counts of
  each service; the leader's analysis takes them whole at each window's start and end
  (`windows.Windows`).

Writes: `saved()` (after every change of the control plane) goes through `changes.Changes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client.core import Metric

from proxy.config.blocks import FleetConfig
from proxy.control import ControlPlane
from proxy.errors import ControlError
from proxy.fleet.backend import STORE_UNAVAILABLE, StateBackend
from proxy.fleet.changes import Changes
from proxy.fleet.lease import Leadership
from proxy.fleet.member import Member
from proxy.fleet.status import acknowledgement, fleet_metrics, is_live, member_row
from proxy.fleet.store import (
    CALL_TIMEOUT,
    FleetStore,
    MemberRecord,
    StoreUnavailable,
    new_lease_value,
)
from proxy.fleet.windows import Windows
from proxy.metrics import StatsSnapshot

log = logging.getLogger("laneswitch.fleet")

# How often a member checks the generation even when no notice arrived (seconds).
POLL_INTERVAL = 0.5
# How often a member reports its counters (seconds; at most lease / 5): the analysis judges
# the fleet's requests of an interval to within this. One MULTI of a few HINCRBYs each time.
REPORT_INTERVAL = 0.2
# How often a member writes its heartbeat (seconds; at most lease / 5).
HEARTBEAT_INTERVAL = 1.0
# After the holder's lease key expires, a member tries to take it this much later (seconds):
# a little, so members do not all hit the store at the same millisecond.
ACQUIRE_SLACK = 0.01
# How often a change's caller looks at the members' applied generations (seconds).
ACK_POLL = 0.02
# Pause between attempts to reach a store that is down (seconds).
RECONNECT_DELAY = 0.2

# How long `stop()` waits for a cancelled task before cancelling it again (seconds).
CANCEL_AGAIN = 0.1


async def _cancel_all(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel `tasks` and wait until each has ended, cancelling again while one runs on: on
    Python 3.11 `asyncio.wait_for`, which redis-py puts around every write, drops a cancel that
    lands as the write completes (cpython #86296, fixed in 3.12), and the task would go on."""
    for task in tasks:
        task.cancel()
    while pending := [task for task in tasks if not task.done()]:
        await asyncio.wait(pending, timeout=CANCEL_AGAIN)
        for task in pending:
            task.cancel()
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a task that failed is not reported again at exit


class FleetCoordinator(StateBackend):
    fleet = True

    def __init__(self, control: ControlPlane, config: FleetConfig) -> None:
        self.control = control
        self.config = config
        self.lease = config.lease
        member = config.member or f"{socket.gethostname()}:{os.getpid()}"
        self.member = Member(
            id=member,
            store=FleetStore(
                config.redis, config.name, timeout=min(CALL_TIMEOUT, config.lease / 5)
            ),
            leadership=Leadership(config.lease),
            lease_value=new_lease_value(member),
        )
        self.changes = Changes(control, self.member, self._lost, self._heartbeat)
        self.windows = Windows(self.member, control.stats, self._lost)
        self.admin_url: str | None = None
        self.started = False  # the fleet's state is applied (or the store was not reachable)
        self.leader_id: str | None = None
        self.members: list[MemberRecord] = []
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, admin_url: str | None) -> None:
        """Join: apply the fleet's state (or seed an empty store with ours), then run. A store
        that cannot be reached within `lease` is reported down; this member then serves its
        own state and joins when the store comes back."""
        self.admin_url = admin_url
        self.changes.begin()
        deadline = time.monotonic() + self.lease
        while True:
            try:
                await self.changes.sync()
                break
            except StoreUnavailable as exc:
                if time.monotonic() >= deadline:
                    log.warning("%s; serving this member's own state until it returns", exc)
                    break
                await asyncio.sleep(RECONNECT_DELAY)
        self.started = True
        loop = asyncio.get_running_loop()
        for name, job in (
            ("sync", self._sync_loop),
            ("lease", self._lease_loop),
            ("heartbeat", self._heartbeat_loop),
            ("counts", self._counts_loop),
        ):
            self._tasks.append(loop.create_task(job(), name=f"fleet-{name}"))

    async def stop(self) -> None:
        """Leave: stop every task, hand the lease back (another member takes it at once)."""
        await _cancel_all(self._tasks)
        self._tasks.clear()
        self.windows.stop()
        if self.member.leadership.epoch is not None:
            self.member.leadership.lost()
            with contextlib.suppress(StoreUnavailable):
                await self.member.store.release(self.member.lease_value)
        await self.member.store.close()

    # -- StateBackend -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.started

    @property
    def writable(self) -> bool:
        return self.member.store_up

    def deciding(self) -> bool:
        return self.member.store_up and self.member.leadership.deciding(time.monotonic())

    async def saved(self) -> None:
        await self.changes.saved()

    async def acknowledged(self) -> dict[str, Any] | None:
        refused = self.changes.take_refused()
        if refused is not None:
            raise ControlError(
                409,
                f"the fleet changed at the same time (store at generation "
                f"{refused.generation}); the fleet's state is back in force, retry",
            )
        me = self.member.id
        if not self.member.store_up:
            return {"acknowledged": [me], "pending": []}
        target = self.changes.written
        deadline = time.monotonic() + self.config.ack_timeout
        while True:
            try:
                self.members = await self.member.store.members()
            except StoreUnavailable:
                return {"acknowledged": [me], "pending": []}
            behind = self.control.config_behind
            answer = acknowledgement(self.members, me, target, self.lease, behind)
            if not answer["pending"] or time.monotonic() >= deadline:
                return answer
            await asyncio.sleep(ACK_POLL)

    async def window(
        self, service: str, versions: Sequence[str]
    ) -> tuple[float, list[StatsSnapshot]] | None:
        return await self.windows.window(service, versions)

    def mark(self, service: str) -> None:
        self.windows.mark(service)

    async def events(self, since: int) -> list[dict[str, Any]] | None:
        return await self.changes.events(since)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "member": self.member.id,
            "leader": self.leader_id,
            "is_leader": self.deciding(),
            "epoch": self.member.leadership.epoch,
            "store_up": self.member.store_up,
            "generation": self.changes.store_generation,
            "applied": self.changes.applied,
            "config_behind": dict(self.control.config_behind),
            "refused_writes": self.member.refusals,
            "members": [member_row(r, self.leader_id, self.lease) for r in self.members],
        }

    def metrics(self) -> Iterable[Metric]:
        live = sum(1 for record in self.members if is_live(record, self.lease))
        return fleet_metrics(
            live, self.deciding(), self.member.store_up, self.changes.apply_latency
        )

    # -- the tasks ----------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        while True:
            try:
                async with self.member.store.changes() as pubsub:
                    await self.changes.sync()  # on every (re)subscribe: notices may have been lost
                    while True:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(POLL_INTERVAL * 2):
                                await pubsub.get_message(timeout=POLL_INTERVAL)
                        await self.changes.sync()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                self.member.store_down(exc)
            except Exception as exc:  # the subscription's connection broke
                log.debug("fleet subscription lost: %s", exc)
            await asyncio.sleep(RECONNECT_DELAY)

    async def _lease_loop(self) -> None:
        lead = self.member.leadership
        while True:
            sent = time.monotonic()
            if lead.epoch is not None:
                if lead.expired(sent):
                    self._lost("could not renew the lease in time")
                    continue
                try:
                    ours = await self.member.store.extend(self.member.lease_value, lead.ttl)
                except StoreUnavailable:
                    ours = None
                if ours:
                    lead.renewed(sent)
                elif ours is False:
                    self._lost("the lease passed to another member")
                    continue
                await asyncio.sleep(lead.renew_every)
            else:
                wait = lead.acquire_every
                if self.member.store_up:
                    with contextlib.suppress(StoreUnavailable):
                        epoch, left = await self.member.store.try_acquire(
                            self.member.lease_value, lead.ttl
                        )
                        if epoch:
                            await self._became_leader(epoch, sent)
                            continue
                        # Try again right when the holder's key expires, if sooner.
                        wait = min(wait, left + ACQUIRE_SLACK)
                await asyncio.sleep(wait)

    async def _became_leader(self, epoch: int, sent: float) -> None:
        self.member.leadership.acquired(epoch, sent)
        self.member.epoch_seen = max(self.member.epoch_seen, epoch)
        self.leader_id = self.member.id
        log.warning("%s leads the fleet %s (epoch %d)", self.member.id, self.config.name, epoch)
        # Decide from the fleet's state, not from what this member last saw.
        await self.changes.sync()
        self.control.events.record(
            "auto",
            "leader",
            None,
            to=self.member.id,
            reason=f"{self.member.id} leads the fleet (epoch {epoch})",
            values={"epoch": epoch},
        )
        await self.control.save()
        self.control.rollouts.fleet_changed(None)

    def _lost(self, why: str) -> None:
        log.warning("%s stops deciding: %s", self.member.id, why)
        self.member.leadership.lost()
        if self.leader_id == self.member.id:
            self.leader_id = None
        self.control.rollouts.fleet_changed(None)

    async def _heartbeat_loop(self) -> None:
        every = min(HEARTBEAT_INTERVAL, self.lease / 5)
        while True:
            await self._heartbeat()
            await asyncio.sleep(every)

    async def _heartbeat(self) -> None:
        control = self.control
        info = {
            "admin": self.admin_url,
            "config_hash": control.config_hash,
            "applied": self.changes.applied,
            "pid": os.getpid(),
            "store_up": True,
            "config_behind": dict(control.config_behind),
            "unhealthy": sorted(f"{s}/{v}/{e}" for s, v, e in control.unhealthy),
        }
        try:
            await self.member.store.heartbeat(self.member.id, info)
            self.members = await self.member.store.members()
            self.leader_id = await self.member.store.leader()
            self.member.epoch_seen = max(self.member.epoch_seen, await self.member.store.epoch())
        except StoreUnavailable as exc:
            self.member.store_down(exc)

    async def _counts_loop(self) -> None:
        every = min(REPORT_INTERVAL, self.lease / 5)
        while True:
            await asyncio.sleep(every)
            await self.windows.report()


__all__ = ["STORE_UNAVAILABLE", "FleetCoordinator"]
