"""A leader's analysis windows over the fleet's counts, and this member's reports into them.

Every member reports what it served since its last report into the store's open counts of each
service (`report`); the leader takes them whole when a window starts (`mark`) and when it ends
(`window`), so a window holds what the fleet served in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

from proxy.fleet import counts
from proxy.fleet.member import Member
from proxy.fleet.store import Fence, StoreUnavailable, WriteRefused
from proxy.metrics import StatsRegistry, StatsSnapshot


class Windows:
    def __init__(self, member: Member, stats: StatsRegistry, lost: Callable[[str], None]) -> None:
        self.member = member
        self.stats = stats
        self._lost = lost  # told when a take shows the lease is another member's
        self._marks: dict[str, float] = {}  # service -> Unix time its analysis window started
        self._mark_tasks: dict[str, asyncio.Task[None]] = {}
        self._report_lock = asyncio.Lock()
        self._sent: dict[tuple[str, str], StatsSnapshot] = {}

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

    def stop(self) -> None:
        """Cancel the takes that start windows."""
        for task in self._mark_tasks.values():
            task.cancel()
        self._mark_tasks.clear()

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
        member = self.member
        epoch = member.leadership.epoch
        if epoch is None:
            return {}
        try:
            await self.report()
            taken = await member.store.take_counts(service, Fence(member.lease_value, epoch))
        except StoreUnavailable:
            return {}
        except WriteRefused:
            member.refusals += 1
            self._lost("taking the analysis counts was refused: the lease is another member's")
            return {}
        return counts.decode([taken])

    async def report(self) -> None:
        """What this member served since its last report, into the store. One at a time: a
        report sent twice would be counted twice."""
        async with self._report_lock:
            reports: dict[str, dict[str, int]] = {}
            sent: dict[tuple[str, str], StatsSnapshot] = {}
            for stats in self.stats.all():
                key = (stats.service, stats.version)
                now = stats.snapshot()
                before = self._sent.get(key)
                delta = now - before if before is not None else now
                fields = counts.encode(self.member.id, stats.service, stats.version, delta)
                if fields:
                    reports.setdefault(stats.service, {}).update(fields)
                    sent[key] = now
            if not reports:
                return
            try:
                await self.member.store.add_counts(reports)
            except StoreUnavailable:
                return  # kept: the next report adds it
            self._sent.update(sent)
