"""A member of a fleet: wires one `ControlPlane` to the fleet's store (SPEC §9).

What it does, each in its own task:
- sync: subscribes to the generation channel and polls the generation every POLL_INTERVAL
  (pub/sub drops messages on a reconnect, traefik #8749); a newer generation is read whole
  and applied through `ControlPlane.apply_fleet`. On every (re)connect it reconciles: an empty
  store is re-seeded from this member's applied state; changes made while the store was down
  (only rollbacks can be) are written over the fleet's state, so a rollback always wins.
- lease: the leader renews every lease * RENEW_FRACTION and stops deciding at lease *
  DECIDE_FRACTION after the last renewal it sent (`lease.Leadership`); a member that does not
  lead tries to take a free lease every lease * ACQUIRE_FRACTION. Only the deciding member runs
  the rollout timers, and every write it makes carries its fencing number.
- heartbeat: this member's record (admin URL, config hash, applied generation, health view).
- counts: what this member served since its last report, into the store's open counts of
  each service; the leader's analysis takes them whole at each window's start and end.

Writes: `saved()` (after every change of the control plane) writes the shared state and the
new events in one compare-and-set; a refused write is answered 409 by the admin call that
made it and the fleet's state is taken back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from proxy.config.blocks import FleetConfig
from proxy.control import ControlError, ControlPlane
from proxy.fleet import counts
from proxy.fleet.backend import STORE_UNAVAILABLE, StateBackend
from proxy.fleet.lease import Leadership
from proxy.fleet.record import Mirror
from proxy.fleet.store import (
    CALL_TIMEOUT,
    Fence,
    FleetStore,
    MemberRecord,
    StoreUnavailable,
    WriteRefused,
    new_lease_value,
)
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
# Bounds of `laneswitch_fleet_apply_seconds` (write in the store -> applied by this member).
APPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Key of the writer's clock in the stored state (for the apply-latency histogram).
WRITTEN_AT = "written_at"

# How long `stop()` waits for a cancelled task before cancelling it again (seconds).
CANCEL_AGAIN = 0.1

# Decisions only a leader takes: written by a member that does not lead, they are refused.
_LEADER_ACTIONS = frozenset(
    {"step", "switch", "hold", "check_failed", "promoting", "promote", "bake", "webhook"}
)


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


def _normal(value: Any) -> Any:
    """As JSON would give it back (int keys become strings, tuples lists): comparable."""
    return json.loads(json.dumps(value, sort_keys=True))


class FleetCoordinator(StateBackend):
    fleet = True

    def __init__(self, control: ControlPlane, config: FleetConfig) -> None:
        self.control = control
        self.config = config
        self.member = config.member or f"{socket.gethostname()}:{os.getpid()}"
        self.lease = config.lease
        self.store = FleetStore(
            config.redis, config.name, timeout=min(CALL_TIMEOUT, config.lease / 5)
        )
        self.leadership = Leadership(config.lease)
        self.lease_value = new_lease_value(self.member)
        self.admin_url: str | None = None
        self.started = False  # the fleet's state is applied (or the store was not reachable)
        self.store_up = False
        self.store_generation: int | None = None  # last seen in the store
        self.applied = 0  # generation of the fleet state this member applied or wrote
        self.written = 0  # generation of this member's last write: what its caller waits for
        self.synced: Any = None  # the fleet state as of `applied` (normalised JSON)
        self.dirty = False  # local changes the store has not got (made while it was down)
        self.pushed = 0  # local events up to this id are in the store (or were dropped)
        self.leader_id: str | None = None
        self.members: list[MemberRecord] = []
        self.mirror = Mirror()  # the fleet's record as last read (served while the store is down)
        self.refusals = 0
        self.apply_buckets = [0] * (len(APPLY_BUCKETS) + 1)
        self.apply_sum = 0.0
        self._refused: WriteRefused | None = None
        self._write_lock = asyncio.Lock()
        self._marks: dict[str, float] = {}  # service -> Unix time its analysis window started
        self._mark_tasks: dict[str, asyncio.Task[None]] = {}
        self._report_lock = asyncio.Lock()
        self._sent: dict[tuple[str, str], StatsSnapshot] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Local events never to write: decisions of a leader whose write was fenced.
        self._dropped: set[int] = set()
        self.epoch_seen = 0  # highest fencing epoch seen, kept when re-seeding an empty store
        # Services whose change the store did not get was a leader's decision, with the fence
        # it was taken under (see `_keep`); events up to `_kept` are noted there.
        self._unwritten: dict[str, Fence] = {}
        self._kept = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, admin_url: str | None) -> None:
        """Join: apply the fleet's state (or seed an empty store with ours), then run. A store
        that cannot be reached within `lease` is reported down; this member then serves its
        own state and joins when the store comes back."""
        self.admin_url = admin_url
        self.pushed = self._last_local_event()
        deadline = time.monotonic() + self.lease
        while True:
            try:
                await self._sync()
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
        for task in self._mark_tasks.values():
            task.cancel()
        self._mark_tasks.clear()
        if self.leadership.epoch is not None:
            self.leadership.lost()
            with contextlib.suppress(StoreUnavailable):
                await self.store.release(self.lease_value)
        await self.store.close()

    # -- StateBackend -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.started

    @property
    def writable(self) -> bool:
        return self.store_up

    def deciding(self) -> bool:
        return self.store_up and self.leadership.deciding(time.monotonic())

    async def saved(self) -> None:
        async with self._write_lock:
            await self._push()

    async def acknowledged(self) -> dict[str, Any] | None:
        refused, self._refused = self._refused, None
        if refused is not None:
            raise ControlError(
                409,
                f"the fleet changed at the same time (store at generation "
                f"{refused.generation}); the fleet's state is back in force, retry",
            )
        if not self.store_up:
            return {"acknowledged": [self.member], "pending": []}
        target = self.written
        deadline = time.monotonic() + self.config.ack_timeout
        while True:
            try:
                self.members = await self.store.members()
            except StoreUnavailable:
                return {"acknowledged": [self.member], "pending": []}
            acknowledged: list[str] = []
            pending: list[str] = []
            # Envoy's NACK: a member that applied the generation but could not take the
            # fleet's state for some service says so, with why.
            behind: dict[str, Any] = {}
            for record in self.members:
                if record.member == self.member:
                    acknowledged.append(record.member)
                elif self._live(record):
                    applied = record.info.get("applied")
                    done = isinstance(applied, int) and applied >= target
                    (acknowledged if done else pending).append(record.member)
                    if done and record.info.get("config_behind"):
                        behind[record.member] = record.info["config_behind"]
            if self.member not in acknowledged:
                acknowledged.append(self.member)
            if self.control.config_behind:
                behind[self.member] = dict(self.control.config_behind)
            if not pending or time.monotonic() >= deadline:
                answer: dict[str, Any] = {
                    "acknowledged": sorted(acknowledged),
                    "pending": sorted(pending),
                }
                if behind:
                    answer["config_behind"] = behind
                return answer
            await asyncio.sleep(ACK_POLL)

    async def window(
        self, service: str, versions: Sequence[str]
    ) -> tuple[float, list[StatsSnapshot]] | None:
        """What every member reported since this window started (`mark`, or the last
        analysis), taken from the store; a new window starts with the take."""
        await self._marking(service)
        since = self._marks.get(service, time.time())
        found = await self._take(service)
        self._marks[service] = time.time()
        return since, [counts.fleet_total(found, service, version) for version in versions]

    def mark(self, service: str) -> None:
        # Called from the rollout's decision (no awaiting there): the take that starts the
        # window runs at once, and the window's end awaits it.
        self._marks[service] = time.time()
        previous = self._mark_tasks.get(service)
        self._mark_tasks[service] = asyncio.get_running_loop().create_task(
            self._discard(service, previous), name=f"fleet-mark-{service}"
        )

    async def _discard(self, service: str, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(Exception):
                await previous
        await self._take(service)

    async def _marking(self, service: str) -> None:
        task = self._mark_tasks.pop(service, None)
        if task is not None:
            with contextlib.suppress(Exception):
                await task

    async def _take(self, service: str) -> dict[counts.CountKey, StatsSnapshot]:
        """The service's counts since the last take, with this member's own traffic reported
        first (the others' is at most one report interval old). Empty when the store cannot
        be reached or this member no longer leads: a deposed leader's take is refused by the
        fencing number, so it cannot steal the window of the member that replaced it."""
        epoch = self.leadership.epoch
        if epoch is None:
            return {}
        try:
            await self._report_counts()
            taken = await self.store.take_counts(service, Fence(self.lease_value, epoch))
        except StoreUnavailable:
            return {}
        except WriteRefused:
            self.refusals += 1
            self._lost("taking the analysis counts was refused: the lease is another member's")
            return {}
        return counts.decode([taken])

    async def events(self, since: int) -> list[dict[str, Any]] | None:
        if self.store_up:
            with contextlib.suppress(StoreUnavailable):
                return await self.store.events_since(since)
        return self.mirror.since(since)

    def status(self) -> dict[str, Any]:
        members = []
        for record in self.members:
            info = record.info
            members.append(
                {
                    "id": record.member,
                    "leader": record.member == self.leader_id,
                    "live": self._live(record),
                    "admin": info.get("admin"),
                    "config_hash": info.get("config_hash"),
                    "applied": info.get("applied"),
                    "last_seen": round(record.age, 3) if record.age is not None else None,
                    "store_up": info.get("store_up"),
                    "config_behind": info.get("config_behind", {}),
                    "unhealthy": info.get("unhealthy", []),
                }
            )
        return {
            "name": self.config.name,
            "member": self.member,
            "leader": self.leader_id,
            "is_leader": self.deciding(),
            "epoch": self.leadership.epoch,
            "store_up": self.store_up,
            "generation": self.store_generation,
            "applied": self.applied,
            "config_behind": dict(self.control.config_behind),
            "refused_writes": self.refusals,
            "members": members,
        }

    def metrics(self) -> Iterable[Metric]:
        live = GaugeMetricFamily(
            "laneswitch_fleet_members", "Live members of the fleet (heartbeat within the lease)."
        )
        live.add_metric([], sum(1 for record in self.members if self._live(record)))
        leader = GaugeMetricFamily(
            "laneswitch_fleet_leader", "1 on the member that leads the fleet (decides)."
        )
        leader.add_metric([], 1.0 if self.deciding() else 0.0)
        up = GaugeMetricFamily("laneswitch_fleet_store_up", "1 while the fleet's store answers.")
        up.add_metric([], 1.0 if self.store_up else 0.0)
        apply = HistogramMetricFamily(
            "laneswitch_fleet_apply_seconds",
            "From a change written to the store to this member serving it.",
        )
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*APPLY_BUCKETS, float("inf")), self.apply_buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        apply.add_metric([], buckets, self.apply_sum)
        return [live, leader, up, apply]

    # -- writing ------------------------------------------------------------------------------

    async def _push(self) -> None:
        """Write what changed locally (shared state, new events) to the store."""
        control = self.control
        state = _normal(control.fleet_state())
        events = [
            self._event_json(e.to_json())
            for e in control.events.since(self.pushed)
            if e.id not in self._dropped
        ]
        last = self._last_local_event()
        changed = state != self.synced
        if not changed and not events:
            return
        if not self.store_up or self.dirty:
            # Written on reconnect (`_reconcile`, with the events); a member that never
            # reached the store takes the fleet's state when it does.
            self._keep(events)
            self.dirty = self.dirty or (changed and self.synced is not None)
            return
        try:
            gen, _ = await self.store.commit(
                self.applied,
                {**state, WRITTEN_AT: time.time()} if changed else None,
                events,
                fence=self._fence(events),
            )
        except WriteRefused as exc:
            self.refusals += 1
            log.warning("%s: %s", self.member, exc)
            if exc.kind == "fenced":
                # Not the leader any more: its decisions never happened in the fleet; what
                # people did on this member (a rollback, a reload) is written without a fence.
                self._lost("a write was refused: the lease is another member's")
                decisions = {
                    e["id"]
                    for e in events
                    if e.get("actor") == "auto" and e.get("action") != "leader"
                }
                self._dropped.update(decisions)
                if not decisions:  # nothing of it was a leader's decision: write it again
                    asyncio.get_running_loop().create_task(self.saved())
                    return
                self.pushed = last
                asyncio.get_running_loop().create_task(self._resync_quietly())
                return
            self.pushed = last  # the events of a refused change never happened in the fleet
            self._refused = exc
            asyncio.get_running_loop().create_task(self._resync_quietly())
            return
        except StoreUnavailable as exc:
            self._store_down(exc)
            self._keep(events)
            self.dirty = self.dirty or (changed and self.synced is not None)
            return
        self.pushed = last
        if changed:
            self.applied = self.written = gen
            self.store_generation = gen
            self.synced = state
            self.dirty = False

    def _keep(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Note what the store did not get: a leader's decision is written later only under
        the fencing number it was taken with, so it is refused if the lease moved on meanwhile
        (the member that took it over decided from the fleet's state, without it); a person's
        change after it is written whatever happened (a rollback always wins)."""
        for event in events:
            if int(event["id"]) <= self._kept:
                continue
            self._kept = int(event["id"])
            service = event.get("service")
            if service is None or event.get("action") == "leader":
                continue
            if event.get("actor") == "auto":
                self._unwritten[service] = self._fence([event]) or Fence("", -1)
            else:
                self._unwritten.pop(service, None)

    def _fence(self, events: Sequence[Mapping[str, Any]]) -> Fence | None:
        """The leader's writes carry its fencing number; a leader's decision written by a
        member that does not lead (any more) carries one that can never match."""
        lead = self.leadership
        if lead.epoch is not None:
            return Fence(self.lease_value, lead.epoch)
        if any(e.get("actor") == "auto" and e.get("action") in _LEADER_ACTIONS for e in events):
            return Fence("", -1)
        rolled = any(e.get("actor") == "auto" and e.get("action") == "rollback" for e in events)
        return Fence("", -1) if rolled else None

    def _event_json(self, event: dict[str, Any]) -> dict[str, Any]:
        return {**event, "member": self.member}

    def _last_local_event(self) -> int:
        events = self.control.events.since(0)
        return events[-1].id if events else 0

    # -- reading ------------------------------------------------------------------------------

    async def _sync(self) -> None:
        """Bring this member in line with the store (raises StoreUnavailable)."""
        generation = await self.store.generation()
        self.store_generation = generation
        if not self.store_up:
            self.store_up = True
            log.info("%s: fleet store reachable", self.member)
            self.control.rollouts.fleet_changed(None)
        if generation is None:
            await self._seed()  # a member's seed (ours, or one that came first)
            generation = self.store_generation
        if generation is None:
            pass
        elif self.dirty:
            await self._reconcile()
        elif generation != self.applied:
            found = await self.store.read()
            if found is not None:
                await self._apply(*found)
        await self._pull_events()
        if self.pushed < self._last_local_event():
            await self.saved()

    async def _apply(self, generation: int, state: dict[str, Any]) -> None:
        written_at = state.pop(WRITTEN_AT, None)
        before = await self.control.apply_fleet(state)
        self.applied = generation
        self.synced = _normal(self.control.fleet_state())
        self.control.rollouts.fleet_changed(before)
        if isinstance(written_at, int | float):
            seconds = max(0.0, time.time() - written_at)
            self.apply_buckets[bisect_left(APPLY_BUCKETS, seconds)] += 1
            self.apply_sum += seconds
        await self._heartbeat()

    async def _seed(self) -> None:
        """The store holds no state (new, or restarted empty): put ours in, keeping the
        generation and the event ids. Only one member's seed is taken."""
        state = _normal(self.control.fleet_state())
        events = self.mirror.since(0)
        if not events:
            events = [self._event_json(e.to_json()) for e in self.control.events.since(0)]
            self.pushed = self._last_local_event()
        # A generation no member applied yet, so every member reads the seeded state.
        generation = self.applied + 1
        async with self._write_lock:
            seeded = await self.store.seed(
                generation, {**state, WRITTEN_AT: time.time()}, events, epoch=self.epoch_seen
            )
        if seeded:
            log.warning(
                "%s: the fleet store was empty: seeded it (generation %d)", self.member, generation
            )
            self.applied = self.written = self.store_generation = generation
            self.synced = state
            self.dirty = False
        else:
            self.store_generation = await self.store.generation()

    async def _reconcile(self) -> None:
        """Changes made here while the store was down go over the fleet's state, with the
        events that went with them: for each service that changed locally, ours wins (a
        rollback always wins over a step taken meanwhile); every other service takes the
        fleet's. A leader's decision among them is written under the fencing number it was
        taken with: if the lease has moved on, it never happened in the fleet."""
        found = await self.store.read()
        if found is None:
            await self._seed()
            return
        generation, fleet = found
        fleet.pop(WRITTEN_AT, None)
        local = _normal(self.control.fleet_state())
        synced = self.synced if isinstance(self.synced, dict) else {}
        events = [
            self._event_json(e.to_json())
            for e in self.control.events.since(self.pushed)
            if e.id not in self._dropped
        ]
        last = self._last_local_event()
        fences = set(self._unwritten.values())
        fence = (fences.pop() if len(fences) == 1 else Fence("", -1)) if fences else None
        skip: set[str] = set()
        async with self._write_lock:
            while True:
                merged = self._merged(fleet, local, synced, skip)
                try:
                    gen, _ = await self.store.commit(
                        generation, {**merged, WRITTEN_AT: time.time()}, events, fence=fence
                    )
                    break
                except WriteRefused as exc:
                    if exc.kind != "fenced" or fence is None:
                        return  # moved again: the next sync tries again
                    self.refusals += 1
                    log.warning("%s: %s: its decisions are dropped", self.member, exc)
                    if self.leadership.epoch is not None:
                        self._lost("a write was refused: the lease is another member's")
                    decisions = {
                        e["id"]
                        for e in events
                        if e.get("actor") == "auto" and e.get("action") != "leader"
                    }
                    self._dropped.update(decisions)
                    events = [e for e in events if e["id"] not in decisions]
                    skip, fence = set(self._unwritten), None
            self.applied = self.written = self.store_generation = gen
            self.pushed = last
            self._unwritten.clear()
            self.dirty = False
        await self.control.apply_fleet(merged)
        self.synced = _normal(self.control.fleet_state())
        log.info(
            "%s: changes made while the store was down written (generation %d)", self.member, gen
        )
        await self._heartbeat()

    @staticmethod
    def _merged(
        fleet: Mapping[str, Any],
        local: Mapping[str, Any],
        synced: Mapping[str, Any],
        skip: set[str],
    ) -> dict[str, Any]:
        """The fleet's state with this member's changes since `synced` over it, per service
        (except the services in `skip`)."""
        merged: dict[str, Any] = {}
        for part in ("weights", "previous_weights", "rollouts"):
            ours = local.get(part, {})
            before = synced.get(part, {})
            theirs = dict(fleet.get(part) or {})
            for service in set(ours) | set(before):
                if service in skip or service not in ours:
                    continue
                if ours.get(service) != before.get(service):
                    theirs[service] = ours[service]
            merged[part] = theirs
        return merged

    async def _pull_events(self) -> None:
        self.mirror.extend(await self.store.events_since(self.mirror.last_id))

    async def _resync_quietly(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            found = await self.store.read()
            if found is not None:
                await self._apply(*found)

    def _store_down(self, exc: Exception) -> None:
        if self.store_up:
            log.error("%s: %s: no steps, changes 503 except rollback", self.member, exc)
        self.store_up = False

    def _live(self, record: MemberRecord) -> bool:
        return record.age is not None and record.age < self.lease

    # -- the tasks ----------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        while True:
            try:
                async with self.store.changes() as pubsub:
                    await self._sync()  # on every (re)subscribe: notices may have been lost
                    while True:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(POLL_INTERVAL * 2):
                                await pubsub.get_message(timeout=POLL_INTERVAL)
                        await self._sync()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                self._store_down(exc)
            except Exception as exc:  # the subscription's connection broke
                log.debug("fleet subscription lost: %s", exc)
            await asyncio.sleep(RECONNECT_DELAY)

    async def _lease_loop(self) -> None:
        lead = self.leadership
        while True:
            sent = time.monotonic()
            if lead.epoch is not None:
                if lead.expired(sent):
                    self._lost("could not renew the lease in time")
                    continue
                try:
                    ours = await self.store.extend(self.lease_value, lead.ttl)
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
                if self.store_up:
                    with contextlib.suppress(StoreUnavailable):
                        epoch, left = await self.store.try_acquire(self.lease_value, lead.ttl)
                        if epoch:
                            await self._became_leader(epoch, sent)
                            continue
                        # Try again right when the holder's key expires, if sooner.
                        wait = min(wait, left + ACQUIRE_SLACK)
                await asyncio.sleep(wait)

    async def _became_leader(self, epoch: int, sent: float) -> None:
        self.leadership.acquired(epoch, sent)
        self.epoch_seen = max(self.epoch_seen, epoch)
        self.leader_id = self.member
        log.warning("%s leads the fleet %s (epoch %d)", self.member, self.config.name, epoch)
        # Decide from the fleet's state, not from what this member last saw.
        await self._sync()
        self.control.events.record(
            "auto",
            "leader",
            None,
            to=self.member,
            reason=f"{self.member} leads the fleet (epoch {epoch})",
            values={"epoch": epoch},
        )
        await self.control.save()
        self.control.rollouts.fleet_changed(None)

    def _lost(self, why: str) -> None:
        log.warning("%s stops deciding: %s", self.member, why)
        self.leadership.lost()
        if self.leader_id == self.member:
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
            "applied": self.applied,
            "pid": os.getpid(),
            "store_up": True,
            "config_behind": dict(control.config_behind),
            "unhealthy": sorted(f"{s}/{v}/{e}" for s, v, e in control.unhealthy),
        }
        try:
            await self.store.heartbeat(self.member, info)
            self.members = await self.store.members()
            self.leader_id = await self.store.leader()
            self.epoch_seen = max(self.epoch_seen, await self.store.epoch())
        except StoreUnavailable as exc:
            self._store_down(exc)

    async def _counts_loop(self) -> None:
        every = min(REPORT_INTERVAL, self.lease / 5)
        while True:
            await asyncio.sleep(every)
            await self._report_counts()

    async def _report_counts(self) -> None:
        """What this member served since its last report, into the store. One at a time: a
        report sent twice would be counted twice."""
        async with self._report_lock:
            reports: dict[str, dict[str, int]] = {}
            sent: dict[tuple[str, str], StatsSnapshot] = {}
            for stats in self.control.stats.all():
                key = (stats.service, stats.version)
                now = stats.snapshot()
                before = self._sent.get(key)
                delta = now - before if before is not None else now
                fields = counts.encode(self.member, stats.service, stats.version, delta)
                if fields:
                    reports.setdefault(stats.service, {}).update(fields)
                    sent[key] = now
            if not reports:
                return
            try:
                await self.store.add_counts(reports)
            except StoreUnavailable:
                return  # kept: the next report adds it
            self._sent.update(sent)


__all__ = ["STORE_UNAVAILABLE", "FleetCoordinator"]
