"""The fleet demo's tour: the single demo's acts, each started through another member's admin."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

from proxy.client import render_fleet
from proxy.demo import SETTLED, STEPS, act_state, tour_acts
from proxy.demo_fleet_processes import Fleet, Member

# How often the tour reads the members' /status while a rollout runs (seconds).
FOLLOW_POLL = 0.25


async def leader_of(fleet: Fleet) -> Member | None:
    """The member leading now (one takes the lease within moments of joining), if any."""
    by_name = {member.name: member for member in fleet.members}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(3.0):
            while True:
                for status in (await statuses(fleet)).values():
                    leader = by_name.get(status.get("fleet", {}).get("leader") or "")
                    if leader is not None:
                        return leader
                await asyncio.sleep(0.1)
    return None


async def call(
    session: aiohttp.ClientSession, member: Member, method: str, path: str
) -> dict[str, Any]:
    async with session.request(method, member.admin_url + path) as response:
        answer: dict[str, Any] = await response.json(content_type=None)
        if response.status >= 400:
            raise DemoTourError(f"{member.name}: {method} {path}: {answer.get('error', answer)}")
        return answer


class DemoTourError(Exception):
    """An admin call of the tour was refused (e.g. the store is down); the demo keeps serving."""


def applied_by(answer: dict[str, Any]) -> str:
    members = answer.get("members") or {}
    text = f"applied by {', '.join(members.get('acknowledged') or []) or 'none'}"
    if members.get("pending"):
        text += f"; pending: {', '.join(members['pending'])}"
    return text


async def statuses(fleet: Fleet) -> dict[str, dict[str, Any]]:
    """Every member's /status that answers (a member killed by hand is left out)."""

    async def one(member: Member) -> dict[str, Any] | None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, DemoTourError, ValueError):
            return await call(fleet.session, member, "GET", "/status")
        return None

    found = await asyncio.gather(*(one(member) for member in fleet.members))
    return {m.name: s for m, s in zip(fleet.members, found, strict=True) if s is not None}


def green_percent(status: dict[str, Any]) -> int:
    shop = status["services"]["shop"]
    return round(100 * int(shop["versions"]["green"]["weight"]) / int(shop["weight_total"]))


async def follow(fleet: Fleet, via: Member, number: int) -> dict[str, Any]:
    """Print green's weight whenever every member serves a new one; the end status of `via`."""
    shown: int | None = None
    while True:
        found = await statuses(fleet)
        weights = {name: green_percent(status) for name, status in found.items()}
        if len(set(weights.values())) == 1 and (weight := next(iter(weights.values()))) != shown:
            shown = weight
            leader = found[next(iter(found))].get("fleet", {}).get("leader") or "-"
            print(
                f"[demo] act {number}: green at {weight} % on "
                + ", ".join(weights)
                + f" (leader {leader})",
                flush=True,
            )
        status = found.get(via.name)
        if status is not None and status["services"]["shop"]["rollout"]["phase"] in SETTLED:
            return status
        await asyncio.sleep(FOLLOW_POLL)


async def all_applied(fleet: Fleet, via: Member, status: dict[str, Any]) -> dict[str, Any]:
    """`via`'s status once its members table shows every member at the store's generation
    (members report every second); the last one read if that takes over 3 s."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(3.0):
            while True:
                view = status.get("fleet", {})
                applied = {member.get("applied") for member in view.get("members") or []}
                if applied == {view.get("generation")}:
                    break
                await asyncio.sleep(FOLLOW_POLL)
                status = await call(fleet.session, via, "GET", "/status")
    return status


async def fleet_tour(fleet: Fleet, fail_rate: float | None) -> None:
    """The single demo's tour, each act started through another member's admin API."""
    try:
        await asyncio.sleep(1.0)
        for number, rate in enumerate(tour_acts(fail_rate), start=1):
            fleet.green.rate = rate
            via = fleet.members[number % len(fleet.members)]
            status = await call(fleet.session, via, "GET", "/status")
            if green_percent(status) == 100:
                answer = await call(fleet.session, via, "POST", "/services/shop/rollback")
                print(f"[demo] act {number}: rollback through {via.name}: {applied_by(answer)}")
            print(f"[demo] act {number}: rolling out green ({act_state(rate)}): {STEPS}")
            answer = await call(fleet.session, via, "POST", "/services/shop/rollout/start")
            print(f"[demo] act {number}: started through {via.name}: {applied_by(answer)}")
            status = await follow(fleet, via, number)
            rollout = status["services"]["shop"]["rollout"]
            last = rollout.get("last_decision") or {}
            leader = status.get("fleet", {}).get("leader") or "-"
            print(
                f"[demo] act {number}: {rollout['phase']}: {last.get('reason', '')} "
                f"(decided by the leader, {leader})",
                flush=True,
            )
            status = await all_applied(fleet, via, status)
            print("\n".join(render_fleet(status["fleet"])) + "\n", flush=True)
            await asyncio.sleep(3.0)
        print("[demo] your turn: see the commands above; Ctrl-C stops the demo", flush=True)
    except (DemoTourError, aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
        print(f"[demo] the tour stopped: {exc}; the fleet keeps running", flush=True)
