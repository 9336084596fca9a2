"""The fleet's shared state on one member: the store's applied here, ours written there.

`sync` brings this member in line with the store: a newer generation is read whole and applied
through `ControlPlane.apply_fleet`; an empty store is re-seeded from this member's applied
state; changes made while the store was down (only rollbacks can be) are written over the
fleet's state, so a rollback always wins. `saved` (after every change of the control plane)
writes the shared state and the new events in one compare-and-set; a refused write is answered
409 by the admin call that made it (`take_refused`) and the fleet's state is taken back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from proxy.control import ControlPlane
from proxy.fleet.member import Member
from proxy.fleet.record import Mirror
from proxy.fleet.status import ApplyLatency
from proxy.fleet.store import Fence, StoreUnavailable, WriteRefused

log = logging.getLogger("laneswitch.fleet")

# Key of the writer's clock in the stored state (for the apply-latency histogram).
WRITTEN_AT = "written_at"

# Decisions only a leader takes: written by a member that does not lead, they are refused.
_LEADER_ACTIONS = frozenset(
    {"step", "switch", "hold", "check_failed", "promoting", "promote", "bake", "webhook"}
)


def _normal(value: Any) -> Any:
    """As JSON would give it back (int keys become strings, tuples lists): comparable."""
    return json.loads(json.dumps(value, sort_keys=True))


class Changes:
    def __init__(
        self,
        control: ControlPlane,
        member: Member,
        lost: Callable[[str], None],
        on_applied: Callable[[], Awaitable[None]],
    ) -> None:
        self.control = control
        self.member = member
        self._lost = lost  # told when a write shows the lease is another member's
        self._on_applied = on_applied  # after the fleet's state is applied here (the heartbeat)
        self.store_generation: int | None = None  # last seen in the store
        self.applied = 0  # generation of the fleet state this member applied or wrote
        self.written = 0  # generation of this member's last write: what its caller waits for
        self.synced: Any = None  # the fleet state as of `applied` (normalised JSON)
        self.dirty = False  # local changes the store has not got (made while it was down)
        self.pushed = 0  # local events up to this id are in the store (or were dropped)
        self.mirror = Mirror()  # the fleet's record as last read (served while the store is down)
        self.apply_latency = ApplyLatency()
        self._refused: WriteRefused | None = None
        self._write_lock = asyncio.Lock()
        # Local events never to write: decisions of a leader whose write was fenced.
        self._dropped: set[int] = set()
        # Services whose change the store did not get was a leader's decision, with the fence
        # it was taken under (see `_keep`); events up to `_kept` are noted there.
        self._unwritten: dict[str, Fence] = {}
        self._kept = 0

    def begin(self) -> None:
        """On joining: the events recorded so far are this member's past, not changes to
        write."""
        self.pushed = self._last_local_event()

    def take_refused(self) -> WriteRefused | None:
        """The refusal of this member's last write, once."""
        refused, self._refused = self._refused, None
        return refused

    async def saved(self) -> None:
        async with self._write_lock:
            await self._push()

    async def events(self, since: int) -> list[dict[str, Any]]:
        if self.member.store_up:
            with contextlib.suppress(StoreUnavailable):
                return await self.member.store.events_since(since)
        return self.mirror.since(since)

    # -- writing ------------------------------------------------------------------------------

    async def _push(self) -> None:
        """Write what changed locally (shared state, new events) to the store."""
        control = self.control
        member = self.member
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
        if not member.store_up or self.dirty:
            # Written on reconnect (`_reconcile`, with the events); a member that never
            # reached the store takes the fleet's state when it does.
            self._keep(events)
            self.dirty = self.dirty or (changed and self.synced is not None)
            return
        try:
            gen, _ = await member.store.commit(
                self.applied,
                {**state, WRITTEN_AT: time.time()} if changed else None,
                events,
                fence=self._fence(events),
            )
        except WriteRefused as exc:
            member.refusals += 1
            log.warning("%s: %s", member.id, exc)
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
            member.store_down(exc)
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
        lead = self.member.leadership
        if lead.epoch is not None:
            return Fence(self.member.lease_value, lead.epoch)
        if any(e.get("actor") == "auto" and e.get("action") in _LEADER_ACTIONS for e in events):
            return Fence("", -1)
        rolled = any(e.get("actor") == "auto" and e.get("action") == "rollback" for e in events)
        return Fence("", -1) if rolled else None

    def _event_json(self, event: dict[str, Any]) -> dict[str, Any]:
        return {**event, "member": self.member.id}

    def _last_local_event(self) -> int:
        events = self.control.events.since(0)
        return events[-1].id if events else 0

    # -- reading ------------------------------------------------------------------------------

    async def sync(self) -> None:
        """Bring this member in line with the store (raises StoreUnavailable)."""
        generation = await self.member.store.generation()
        self.store_generation = generation
        if not self.member.store_up:
            self.member.store_up = True
            log.info("%s: fleet store reachable", self.member.id)
            self.control.rollouts.fleet_changed(None)
        if generation is None:
            await self._seed()  # a member's seed (ours, or one that came first)
            generation = self.store_generation
        if generation is None:
            pass
        elif self.dirty:
            await self._reconcile()
        elif generation != self.applied:
            found = await self.member.store.read()
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
            self.apply_latency.observe(seconds)
        await self._on_applied()

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
            seeded = await self.member.store.seed(
                generation, {**state, WRITTEN_AT: time.time()}, events, epoch=self.member.epoch_seen
            )
        if seeded:
            log.warning(
                "%s: the fleet store was empty: seeded it (generation %d)",
                self.member.id,
                generation,
            )
            self.applied = self.written = self.store_generation = generation
            self.synced = state
            self.dirty = False
        else:
            self.store_generation = await self.member.store.generation()

    async def _reconcile(self) -> None:
        """Changes made here while the store was down go over the fleet's state, with the
        events that went with them: for each service that changed locally, ours wins (a
        rollback always wins over a step taken meanwhile); every other service takes the
        fleet's. A leader's decision among them is written under the fencing number it was
        taken with: if the lease has moved on, it never happened in the fleet."""
        found = await self.member.store.read()
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
                    gen, _ = await self.member.store.commit(
                        generation, {**merged, WRITTEN_AT: time.time()}, events, fence=fence
                    )
                    break
                except WriteRefused as exc:
                    if exc.kind != "fenced" or fence is None:
                        return  # moved again: the next sync tries again
                    self.member.refusals += 1
                    log.warning("%s: %s: its decisions are dropped", self.member.id, exc)
                    if self.member.leadership.epoch is not None:
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
            "%s: changes made while the store was down written (generation %d)", self.member.id, gen
        )
        await self._on_applied()

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
        self.mirror.extend(await self.member.store.events_since(self.mirror.last_id))

    async def _resync_quietly(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            found = await self.member.store.read()
            if found is not None:
                await self._apply(*found)
