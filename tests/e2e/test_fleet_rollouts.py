"""One decision per fleet: the leader alone runs a rollout, on every member's summed counts;
a failing canary is rolled back once for the fleet; a killed leader is replaced within the
lease and the run goes on from its step; a leader frozen past its lease takes no step when it
wakes. Real `laneswitch run` processes and a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from bisect import bisect_right
from collections.abc import AsyncIterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from proxy.fleet.coordinator import REPORT_INTERVAL
from proxy.fleet.store import _COMMIT
from tests.helpers import Fleet, Member, Traffic, TrapRelay, admin_call, running_fleet

CANARY = """
    rollout:
      strategy: canary
      stable: blue
      canary: green
      step_weights: [STEPS]
      interval: INTERVAL
      threshold: 2
      min_requests: 5
      progress_deadline: 1m
      promotion: manual
      metrics: {success_rate: {min: 95}}
"""


def canary(steps: str = "50", interval: str = "1s") -> str:
    return CANARY.replace("STEPS", steps).replace("INTERVAL", interval)


async def events(member: Member, since: int = 0) -> list[dict[str, Any]]:
    status, answer = await admin_call(member.admin_port, "GET", f"/events?since={since}")
    assert status == 200, answer
    return list(answer["events"])


async def fleet_status(member: Member) -> dict[str, Any]:
    status, answer = await admin_call(member.admin_port, "GET", "/status")
    assert status == 200, answer
    return answer


async def leader_of(members: list[Member], timeout: float = 10.0) -> Member:
    """The member the fleet's lease names, once one holds it."""
    async with asyncio.timeout(timeout):
        while True:
            state = await fleet_status(members[0])
            leader = state["fleet"]["leader"]
            for member in members:
                if member.name == leader:
                    return member
            await asyncio.sleep(0.05)


async def new_leader(members: list[Member], timeout: float) -> str:
    """The first of `members` that says it leads (and decides)."""
    async with asyncio.timeout(timeout):
        while True:
            for member in members:
                state = await fleet_status(member)
                if state["fleet"]["is_leader"]:
                    return str(member.name)
            await asyncio.sleep(0.02)


def green_failing(request: object) -> bytes:
    return b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\ngreen"


@pytest.fixture
async def failing_fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    async with running_fleet(tmp_path, green=green_failing) as fleet:
        yield fleet


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    async with running_fleet(tmp_path) as fleet:
        yield fleet


async def test_a_failing_canary_is_rolled_back_once_for_the_fleet_on_the_summed_counts(
    failing_fleet: Fleet,
) -> None:
    fleet = failing_fleet
    members = [fleet.member(name, service_extra=canary()) for name in ("a", "b", "c")]
    await asyncio.gather(*(m.start() for m in members))
    loads = [Traffic(m.data_port).start() for m in members]
    try:
        started = time.monotonic()
        status, answer = await admin_call(
            members[1].admin_port, "POST", "/services/shop/rollout/start"
        )
        assert status == 200, answer
        async with asyncio.timeout(15):
            while True:
                states = [await fleet_status(m) for m in members]
                phases = {s["services"]["shop"]["rollout"]["phase"] for s in states}
                weights = {s["services"]["shop"]["versions"]["green"]["weight"] for s in states}
                if phases == {"rolled_back"} and weights == {0}:
                    break
                await asyncio.sleep(0.05)
        took = time.monotonic() - started
        # (threshold + 1) x interval + 1 s, plus the first step (the canary gets traffic only then)
        assert took < (2 + 1) * 1 + 1 + 1.5, took
        await asyncio.sleep(1.5)  # would a second member roll back too?
    finally:
        for load in loads:
            await load.stop()
    record = await events(members[0])
    rollbacks = [e for e in record if e["action"] == "rollback"]
    assert len(rollbacks) == 1, rollbacks
    leader = rollbacks[0]["member"]
    assert rollbacks[0]["actor"] == "auto"
    # Every interval's analysis: an interval with too few requests for a verdict (likely on a
    # loaded machine, the first after the step) is a hold, and its requests count too.
    judged = [e for e in record if e["action"] in ("hold", "check_failed", "rollback")]
    assert all(e["member"] == leader for e in judged)
    analysed = sum(e["values"]["requests"] for e in judged)
    # The analysis judged the fleet's requests: what every member sent to green, not one
    # member's share (each sent about a third); the last report window may be uncounted.
    per_member = [load.count(500, b"green") for load in loads]
    assert all(n > 0 for n in per_member), per_member
    assert analysed > max(per_member) * 1.5, (analysed, per_member)
    assert analysed <= sum(per_member), (analysed, per_member)
    assert analysed >= sum(per_member) * 0.5, (analysed, per_member)
    assert len(fleet.green.requests) == sum(per_member)


# How late a member's requests may reach the store's counts: one report interval, and a
# margin for a report that a loaded machine runs late.
REPORTED_WITHIN = REPORT_INTERVAL + 0.15


async def test_each_intervals_analysis_counts_every_members_requests_of_that_interval(
    fleet: Fleet,
) -> None:
    steps = "10, 20, 30, 40, 50, 60, 70, 80, 90"
    members = [
        fleet.member(name, service_extra=canary(steps, interval="2s")) for name in ("a", "b", "c")
    ]
    await asyncio.gather(*(m.start() for m in members))
    loads = [Traffic(m.data_port).start() for m in members]
    try:
        await leader_of(members)
        last = (await events(members[0]))[-1]["id"]
        status, answer = await admin_call(
            members[1].admin_port, "POST", "/services/shop/rollout/start"
        )
        assert status == 200, answer
        async with asyncio.timeout(30):
            while max(steps_of(await events(members[0], last)), default=0) < 6:
                await asyncio.sleep(0.05)
    finally:
        for load in loads:
            await load.stop()
    assert all(load.count(200, b"green") > 0 for load in loads)  # each member served green
    record = await events(members[0], last)
    # Every interval ends in one decision: a step (pass), a hold (inconclusive) or a failed
    # check. The window an analysis judged runs from the decision before it to itself.
    decisions = [e for e in record if e["action"] in ("step", "hold", "check_failed", "rollback")]
    arrived = sorted(request.received_at for request in fleet.green.requests)

    def between(start: float, end: float) -> int:
        return bisect_right(arrived, end) - bisect_right(arrived, start)

    judged = 0
    for before, decision in pairwise(decisions):
        if "requests" not in decision["values"]:
            continue
        start, end = before["time"], decision["time"]
        served = between(start, end)  # what the three members sent green in that interval
        analysed = decision["values"]["requests"]
        # Within one report interval: the window's last requests may not be reported yet,
        # and the ones just before its start were reported into it.
        missed = between(end - REPORTED_WITHIN, end)
        carried = between(start - REPORTED_WITHIN, start)
        assert served - missed <= analysed <= served + carried, (
            decision["values"]["step"] if "step" in decision["values"] else decision["action"],
            analysed,
            served,
            missed,
            carried,
        )
        judged += 1
    assert judged >= 5, decisions


def steps_of(record: list[dict[str, Any]]) -> list[int]:
    return [e["values"]["step"] for e in record if e["action"] == "step"]


async def test_a_killed_leader_is_replaced_within_the_lease_and_the_run_goes_on_from_its_step(
    fleet: Fleet,
) -> None:
    steps = "5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70"
    members = [fleet.member(name, service_extra=canary(steps)) for name in ("a", "b", "c")]
    await asyncio.gather(*(m.start() for m in members))
    loads = {m.name: Traffic(m.data_port).start() for m in members}
    try:
        leader = await leader_of(members)
        others = [m for m in members if m is not leader]
        status, answer = await admin_call(
            others[0].admin_port, "POST", "/services/shop/rollout/start"
        )
        assert status == 200, answer
        async with asyncio.timeout(15):
            while max(steps_of(await events(others[0])), default=0) < 3:
                await asyncio.sleep(0.05)
        await loads.pop(leader.name).stop()
        before = await events(others[0])
        last_id = before[-1]["id"]
        killed = time.time()
        leader.signal(signal.SIGKILL)
        new = await new_leader(others, timeout=10)
        async with asyncio.timeout(10):  # the run goes on under the new leader
            while not [e for e in await events(others[0], last_id) if e["action"] == "step"]:
                await asyncio.sleep(0.05)
        after = await events(others[0], last_id)
    finally:
        for load in loads.values():
            await load.stop()
    leaders = [e for e in after if e["action"] == "leader"]
    assert [e["member"] for e in leaders] == [new]
    # Within the lease (2 s), as the new leader recorded it when it took the lease (polling
    # the members' /status from here on a loaded machine only adds the poll's own delay).
    assert leaders[0]["time"] - killed < 2.0, leaders[0]["time"] - killed
    taken = steps_of(before) + steps_of(after)
    assert taken == list(range(1, len(taken) + 1)), taken  # no restart from 0, no double step
    assert all(e["member"] == new for e in after if e["action"] == "step")
    assert sum(load.failed for load in loads.values()) == 0


async def test_a_leader_frozen_past_its_lease_takes_no_step_when_it_wakes(fleet: Fleet) -> None:
    steps = "5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70"
    members = [fleet.member(name, service_extra=canary(steps)) for name in ("a", "b")]
    await asyncio.gather(*(m.start() for m in members))
    loads = [Traffic(m.data_port).start() for m in members]
    try:
        leader = await leader_of(members)
        other = next(m for m in members if m is not leader)
        status, answer = await admin_call(other.admin_port, "POST", "/services/shop/rollout/start")
        assert status == 200, answer
        async with asyncio.timeout(15):
            while max(steps_of(await events(other)), default=0) < 2:
                await asyncio.sleep(0.05)
        leader.signal(signal.SIGSTOP)
        await asyncio.sleep(4.0)  # 2 x lease: the other member took over meanwhile
        frozen_until = (await events(other))[-1]["id"]
        leader.signal(signal.SIGCONT)
        await asyncio.sleep(2.5)  # more than an interval and a renewal period
        after = await events(other, frozen_until)
        state = await fleet_status(leader)
    finally:
        for load in loads:
            await load.stop()
    assert state["fleet"]["leader"] == other.name
    assert state["fleet"]["is_leader"] is False
    assert not [e for e in after if e["member"] == leader.name and e["actor"] == "auto"], after
    assert [e for e in after if e["action"] == "step"], "the new leader stopped stepping"
    taken = steps_of(await events(other))
    assert taken == list(range(1, len(taken) + 1)), taken


# What a member sends to run the state-write script (redis-py runs it by its SHA1).
COMMIT_SCRIPT = hashlib.sha1(_COMMIT.encode()).hexdigest().encode()


async def test_a_leader_cut_off_while_writing_a_step_has_that_write_refused_by_its_fencing_number(
    fleet: Fleet,
) -> None:
    steps = "5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70"
    relay = await TrapRelay(fleet.redis.port).start()
    a = fleet.member("a", redis=relay.url, service_extra=canary(steps))  # a's Redis: the relay
    b = fleet.member("b", service_extra=canary(steps))
    await a.start()
    assert (await leader_of([a])) is a
    await b.start()
    loads = [Traffic(m.data_port).start() for m in (a, b)]
    seen_steps: list[int] = []  # the fleet's step as b reports it, over time
    try:
        status, answer = await admin_call(b.admin_port, "POST", "/services/shop/rollout/start")
        assert status == 200, answer
        async with asyncio.timeout(15):
            while max(steps_of(await events(b)), default=0) < 2:
                await asyncio.sleep(0.05)
        # a's next state write (its next step) is where the link to Redis goes silent.
        relay.trap = COMMIT_SCRIPT
        await asyncio.wait_for(relay.trapped.wait(), 10)
        cut_at = (await events(b))[-1]["id"]
        async with asyncio.timeout(15):  # b takes the lease and goes on, two steps further
            while len([e for e in await events(b, cut_at) if e["action"] == "step"]) < 2:
                seen_steps.append((await fleet_status(b))["services"]["shop"]["rollout"]["step"])
                await asyncio.sleep(0.05)
        # a's write of its step reaches Redis only now, with a's old fencing number.
        answer = await relay.release()
        assert answer.startswith(b"*2\r\n:-2\r\n"), answer  # {-2, gen}: refused, fenced
        # a is back on the store: it takes the fleet's state, never writes its own step over it.
        async with asyncio.timeout(10):
            while True:
                state = await fleet_status(a)
                if state["fleet"]["store_up"] and (
                    state["fleet"]["applied"] == state["fleet"]["generation"]
                ):
                    break
                await asyncio.sleep(0.05)
        deadline = time.monotonic() + 2.5  # more than an interval: would b step twice?
        while time.monotonic() < deadline:
            seen_steps.append((await fleet_status(b))["services"]["shop"]["rollout"]["step"])
            await asyncio.sleep(0.05)
        state_a, state_b = await fleet_status(a), await fleet_status(b)
    finally:
        for load in loads:
            await load.stop()
        await relay.stop()
    assert seen_steps == sorted(seen_steps), seen_steps  # the fleet's run never went back
    record = await events(b)
    after = [e for e in record if e["id"] > cut_at]
    assert not [e for e in after if e["member"] == "a" and e["actor"] == "auto"], after
    taken = steps_of(record)
    assert taken == list(range(1, len(taken) + 1)), taken  # no double step
    assert state_a["fleet"]["is_leader"] is False and state_b["fleet"]["is_leader"] is True
    # a tried to write its step again on reconnect, under the same old fence: refused too.
    assert state_a["fleet"]["refused_writes"] >= 1
    assert (
        state_a["services"]["shop"]["rollout"]["step"]
        == state_b["services"]["shop"]["rollout"]["step"]
    )
    assert {n: v["weight"] for n, v in state_a["services"]["shop"]["versions"].items()} == {
        n: v["weight"] for n, v in state_b["services"]["shop"]["versions"].items()
    }


def set_revision(member: Member, revision: str) -> None:
    lines = []
    for line in member.config.read_text().splitlines():
        if line.startswith("      green:"):
            line = line.split(", revision")[0].rstrip("}") + f', revision: "{revision}"}}'
        lines.append(line)
    member.config.write_text("\n".join(lines) + "\n")


async def test_a_new_canary_revision_starts_one_run_for_the_fleet(fleet: Fleet) -> None:
    members = [fleet.member(name, service_extra=canary("10, 20")) for name in ("a", "b", "c")]
    for member in members:
        set_revision(member, "1")
    await asyncio.gather(*(m.start() for m in members))
    await leader_of(members)
    last = (await events(members[0]))[-1]["id"]
    for member in members:  # the new release reaches every member's file, one after the other
        set_revision(member, "2")
        status, answer = await admin_call(member.admin_port, "POST", "/reload")
        assert status == 200 and answer["changed"] is True, answer
    async with asyncio.timeout(10):
        while not [e for e in await events(members[0], last) if e["action"] == "start"]:
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # would another member start one too?
    starts = [e for e in await events(members[0], last) if e["action"] == "start"]
    leader = (await fleet_status(members[0]))["fleet"]["leader"]
    assert [(e["actor"], e["member"]) for e in starts] == [("config", leader)]
