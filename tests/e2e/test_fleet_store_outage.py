"""The fleet's store goes away under load and comes back empty: traffic never fails, changes
are refused with 503 except a rollback, which applies at once on its member and reaches the
store when it returns; the restarted store is re-seeded from the members, event ids kept, and
no member falls back to its config file's weights. Real processes, real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.fleet.store import FleetStore
from tests.helpers import Fleet, Member, Traffic, admin_call, running_fleet

HALF = {"blue": 50, "green": 50}
GREEN = {"blue": 0, "green": 100}


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    async with running_fleet(tmp_path) as fleet:
        yield fleet


async def status(member: Member) -> dict[str, Any]:
    code, answer = await admin_call(member.admin_port, "GET", "/status")
    assert code == 200, answer
    return answer


def weights(state: dict[str, Any]) -> dict[str, int]:
    versions = state["services"]["shop"]["versions"]
    return {name: version["weight"] for name, version in versions.items()}


async def test_the_store_stopped_under_load_and_restarted_empty(fleet: Fleet) -> None:
    a, b = fleet.member("a"), fleet.member("b")  # the files say blue 100, green 0
    await asyncio.gather(a.start(), b.start())
    for change in ({"weights": HALF}, {"to": "green"}):
        path = "/services/shop/weights" if "weights" in change else "/services/shop/switch"
        code, answer = await admin_call(
            a.admin_port, "PUT" if "weights" in change else "POST", path, change
        )
        assert code == 200 and answer["members"]["pending"] == [], answer
    loads = [Traffic(m.data_port).start() for m in (a, b)]
    try:
        before = await admin_call(b.admin_port, "GET", "/events")
        last_id = before[1]["events"][-1]["id"]
        await fleet.redis.stop()
        async with asyncio.timeout(10):
            while any([(await status(m))["fleet"]["store_up"] for m in (a, b)]):
                await asyncio.sleep(0.05)
        assert (await admin_call(a.admin_port, "GET", "/readyz"))[0] == 200
        refused = [
            await admin_call(a.admin_port, "POST", "/services/shop/switch", {"to": "blue"}),
            await admin_call(b.admin_port, "PUT", "/services/shop/weights", {"weights": HALF}),
        ]
        for code, answer in refused:
            assert (code, answer.get("error")) == (503, "fleet store unavailable"), answer
        code, answer = await admin_call(a.admin_port, "POST", "/reload")
        assert code == 200, answer  # still re-reads this member's file
        code, answer = await admin_call(a.admin_port, "POST", "/services/shop/rollback")
        assert code == 200, answer
        assert weights(await status(a)) == HALF  # applied here at once
        assert weights(await status(b)) == GREEN  # b cannot know yet
        await asyncio.sleep(0.5)
        await fleet.redis.start()  # the same port, empty; the fixture stops it at the end
        async with asyncio.timeout(4 + 2):  # 2 x lease, and a margin for a loaded machine
            while weights(await status(b)) != HALF:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    finally:
        for load in loads:
            await load.stop()
    assert [load.failed for load in loads] == [0, 0], [load.errors[:3] for load in loads]
    assert all(load.count(200) > 100 for load in loads)
    store = FleetStore(fleet.redis.url, "shop")
    try:
        found = await store.read()
        assert found is not None
        assert found[1]["weights"]["shop"] == HALF  # the local rollback is in the store
        record = await store.events_since(0)
    finally:
        await store.close()
    rollbacks = [e for e in record if e["action"] == "rollback"]
    assert [(e["member"], e["to"]) for e in rollbacks] == [("a", HALF)]
    assert rollbacks[0]["id"] > last_id  # ids kept across the empty restart, not from 1
    assert [e["id"] for e in record] == sorted({e["id"] for e in record})
    for member in (a, b):
        state = await status(member)
        assert state["fleet"]["store_up"] is True
        assert weights(state) == HALF  # not the file's blue 100


async def test_rollout_calls_get_503_while_the_store_is_down_and_rollback_still_works(
    fleet: Fleet,
) -> None:
    rollout = """
    rollout:
      strategy: canary
      stable: blue
      canary: green
      step_weights: [50]
      interval: 1s
      metrics: {success_rate: {min: 95}}
"""
    a = await fleet.member("a", weights=(50, 50), service_extra=rollout).start()
    await fleet.redis.stop()
    async with asyncio.timeout(10):
        while (await status(a))["fleet"]["store_up"]:
            await asyncio.sleep(0.05)
    for verb in ("start", "pause", "resume", "promote", "abort"):
        code, answer = await admin_call(a.admin_port, "POST", f"/services/shop/rollout/{verb}")
        assert (code, answer.get("error")) == (503, "fleet store unavailable"), (verb, answer)
    code, answer = await admin_call(a.admin_port, "POST", "/services/shop/rollback")
    assert code == 200, answer
    assert weights(await status(a)) == {"blue": 100, "green": 0}
