"""The fleet store against a real redis-server: the lease and its fencing number, compare and
set on the generation, one event id sequence, re-seeding an empty store, members, counts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.events import MAX_EVENTS, MAX_NOISE_EVENTS
from proxy.fleet import counts
from proxy.fleet.lease import Leadership
from proxy.fleet.record import Mirror
from proxy.fleet.store import Fence, FleetStore, StoreUnavailable, WriteRefused, new_lease_value
from proxy.metrics import StatsSnapshot
from tests.helpers import RedisServer, redis_server


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with redis_server() as server:
        yield server


@pytest.fixture
async def store(redis: RedisServer) -> AsyncIterator[FleetStore]:
    store = FleetStore(redis.url, "shop")
    yield store
    await store.close()


async def test_the_lease_is_one_members_and_every_acquisition_raises_the_epoch(
    store: FleetStore,
) -> None:
    a, b = new_lease_value("a"), new_lease_value("b")
    assert await store.acquire(a, 0.3) == 1
    assert await store.acquire(b, 0.3) == 0  # held
    assert await store.leader() == "a"
    assert await store.extend(b, 5) is False  # not b's to extend
    assert await store.extend(a, 0.3) is True
    assert await store.release(b) is False
    assert await store.release(a) is True
    assert await store.acquire(b, 0.3) == 2
    assert await store.leader() == "b"
    # Not renewed: it expires on its own and the next holder gets a higher epoch.
    async with asyncio.timeout(5):
        while (epoch := await store.acquire(a, 5)) == 0:
            await asyncio.sleep(0.05)
    assert epoch == 3
    assert await store.extend(b, 5) is False


async def test_state_writes_are_compare_and_set_on_the_generation(store: FleetStore) -> None:
    assert await store.read() is None
    assert await store.generation() is None
    gen, _ = await store.commit(0, {"weights": {"shop": {"blue": 100}}})
    assert gen == 1
    assert await store.read() == (1, {"weights": {"shop": {"blue": 100}}})
    with pytest.raises(WriteRefused) as refused:
        await store.commit(0, {"weights": {"shop": {"blue": 0}}})  # written from a stale read
    assert (refused.value.kind, refused.value.generation) == ("stale", 1)
    assert await store.read() == (1, {"weights": {"shop": {"blue": 100}}})


async def test_a_deposed_leaders_write_is_refused_by_its_fencing_number(store: FleetStore) -> None:
    old = new_lease_value("old")
    epoch = await store.acquire(old, 0.2)
    fence = Fence(old, epoch)
    gen, _ = await store.commit(0, {"step": 1}, fence=fence)
    async with asyncio.timeout(5):  # old is paused past its lease; new takes over
        while (new_epoch := await store.acquire(new_lease_value("new"), 5)) == 0:
            await asyncio.sleep(0.05)
    assert new_epoch == epoch + 1
    with pytest.raises(WriteRefused) as refused:
        await store.commit(gen, {"step": 2}, [{"action": "step"}], fence=fence)
    assert refused.value.kind == "fenced"
    assert await store.read() == (gen, {"step": 1})
    assert await store.events_since(0) == []  # nothing of the refused write got in


async def test_events_share_one_id_sequence_and_keep_their_json(store: FleetStore) -> None:
    gen, ids = await store.commit(
        0, {"a": 1}, [{"action": "switch", "member": "a", "values": {"checks": []}}]
    )
    _, more = await store.commit(gen, None, [{"action": "reload", "member": "b"}] * 2)
    assert (ids, more) == ([1], [2, 3])
    found = await store.events_since(0)
    assert [e["id"] for e in found] == [1, 2, 3]
    assert found[0] == {"id": 1, "action": "switch", "member": "a", "values": {"checks": []}}
    assert [e["id"] for e in await store.events_since(2)] == [3]
    assert (await store.read()) == (1, {"a": 1})  # events alone do not move the generation


async def test_a_storm_of_noise_never_evicts_a_decision_from_the_fleets_record(
    store: FleetStore,
) -> None:
    gen, ids = await store.commit(0, {"a": 1}, [{"action": "switch", "member": "a"}])
    for _ in range(0, MAX_EVENTS + 10, 100):  # a thousand failed reloads, a hold every interval
        noise = [{"action": "reload_failed", "member": "b"}] * 50
        noise += [{"action": "hold", "member": "a", "actor": "auto"}] * 50
        await store.commit(gen, None, noise)
    found = await store.events_since(0)
    assert found[0] == {"id": ids[0], "action": "switch", "member": "a"}
    assert [e for e in found if e["action"] not in ("reload_failed", "hold")] == [found[0]]
    assert len(found) == 1 + MAX_NOISE_EVENTS  # the noise has its own, smaller cap
    assert [e["id"] for e in found] == sorted(e["id"] for e in found)
    assert found[-1]["id"] == await store.last_event_id()
    # Decisions are capped at MAX_EVENTS among themselves: the oldest go first.
    for _ in range(0, MAX_EVENTS, 250):
        await store.commit(gen, None, [{"action": "step", "member": "a", "actor": "auto"}] * 250)
    found = await store.events_since(0)
    decisions = [e for e in found if e["action"] == "step"]
    assert len(decisions) == MAX_EVENTS and found[0]["action"] != "switch"
    assert len(found) == MAX_EVENTS + MAX_NOISE_EVENTS
    # Paged by id, across both kinds.
    since = found[MAX_EVENTS // 2]["id"]
    assert await store.events_since(since) == [e for e in found if e["id"] > since]


async def test_a_reseeded_store_keeps_the_same_rule(redis: RedisServer) -> None:
    mirror = Mirror()
    events: list[dict[str, object]] = [{"id": 1, "action": "rollback", "member": "a"}]
    last = 1 + 2 * MAX_NOISE_EVENTS
    events += [{"id": i, "action": "reload", "member": "a"} for i in range(2, last + 1)]
    mirror.extend(events)
    mirror.extend([{"id": 3, "action": "switch"}])  # already past: not taken twice
    assert len(mirror) == 1 + MAX_NOISE_EVENTS
    assert mirror.since(0)[0]["action"] == "rollback"
    assert mirror.last_id == last
    store = FleetStore(redis.url, "shop")
    try:
        assert await store.seed(4, {"weights": {}}, mirror.since(0)) is True
        found = await store.events_since(0)
        assert found == mirror.since(0)
        _, ids = await store.commit(4, None, [{"action": "switch"}])
        assert ids == [mirror.last_id + 1]
    finally:
        await store.close()


async def test_an_empty_store_is_seeded_once_keeping_generation_and_event_ids(
    store: FleetStore,
) -> None:
    events = [{"id": 41, "action": "rollback", "values": {}}, {"id": 42, "action": "step"}]
    assert await store.seed(7, {"weights": {"shop": {"blue": 100}}}, events) is True
    assert await store.seed(3, {"weights": {}}, []) is False  # already seeded
    assert await store.read() == (7, {"weights": {"shop": {"blue": 100}}})
    assert [e["id"] for e in await store.events_since(0)] == [41, 42]
    _, ids = await store.commit(7, None, [{"action": "switch"}])
    assert ids == [43]


async def test_members_report_with_the_stores_clock(store: FleetStore) -> None:
    await store.heartbeat("b", {"admin": "http://127.0.0.1:2", "applied": 3})
    await store.heartbeat("a", {"admin": "http://127.0.0.1:1", "applied": 4})
    await asyncio.sleep(0.2)
    await store.heartbeat("a", {"admin": "http://127.0.0.1:1", "applied": 5})
    found = {m.member: m for m in await store.members()}
    assert list(found) == ["a", "b"]
    assert found["a"].info["applied"] == 5
    assert found["a"].age is not None and found["a"].age < 0.15
    assert found["b"].age is not None and found["b"].age >= 0.2


async def test_the_leader_takes_every_members_counts_whole_and_only_while_it_leads(
    store: FleetStore,
) -> None:
    def snap(ok: int, bad: int, bucket: int) -> StatsSnapshot:
        slots = [0] * counts.SLOTS
        slots[bucket] = ok + bad
        return StatsSnapshot({200: ok, 503: bad}, tuple(slots), 0.0, {}, 0, 0)

    leader = new_lease_value("a")
    fence = Fence(leader, await store.acquire(leader, 5))
    await store.add_counts({"shop": counts.encode("a", "shop", "green", snap(10, 1, 3))})
    await store.add_counts({"shop": counts.encode("b", "shop", "green", snap(5, 0, 3))})
    await store.add_counts(
        {
            "shop": counts.encode("a", "shop", "green", snap(2, 2, 16)),
            "cart": counts.encode("a", "cart", "v1", snap(7, 0, 0)),
        }
    )
    found = counts.decode([await store.take_counts("shop", fence)])
    total = counts.fleet_total(found, "shop", "green")
    assert total.requests == {200: 17, 503: 3}
    assert total.latency_buckets[3] == 16 and total.latency_buckets[16] == 4
    assert sum(total.latency_buckets) == total.total == 20
    assert {key.member for key in found} == {"a", "b"}
    # Taken means emptied: the next window holds only what was reported after it.
    assert await store.take_counts("shop", fence) == {}
    await store.add_counts({"shop": counts.encode("c", "shop", "green", snap(99, 0, 0))})
    again = counts.decode([await store.take_counts("shop", fence)])
    assert counts.fleet_total(again, "shop", "green").requests == {200: 99}
    # Another service's counts are its own window.
    cart = counts.decode([await store.take_counts("cart", fence)])
    assert counts.fleet_total(cart, "cart", "v1").requests == {200: 7}
    # A member that lost the lease cannot take (steal) the new leader's window.
    await store.add_counts({"shop": counts.encode("b", "shop", "green", snap(3, 0, 0))})
    assert await store.release(leader)
    other = new_lease_value("b")
    new_fence = Fence(other, await store.acquire(other, 5))
    with pytest.raises(WriteRefused) as refused:
        await store.take_counts("shop", fence)
    assert refused.value.kind == "fenced"
    kept = counts.decode([await store.take_counts("shop", new_fence)])
    assert counts.fleet_total(kept, "shop", "green").requests == {200: 3}


async def test_an_unreachable_store_is_reported_not_hung_on(redis: RedisServer) -> None:
    store = FleetStore(redis.url, "shop", timeout=0.5)
    await store.ping()
    await redis.stop()
    with pytest.raises(StoreUnavailable):
        await store.read()
    with pytest.raises(StoreUnavailable):
        await store.acquire(new_lease_value("a"), 1)
    await store.close()


def test_a_leader_stops_deciding_well_before_its_lease_can_pass() -> None:
    lead = Leadership(lease=5.0)
    assert not lead.deciding(0.0)
    lead.acquired(epoch=4, sent_at=100.0)
    assert lead.deciding(101.0)
    assert lead.renew_every * 3 < 5.0 * 0.5  # three renewals can fail before it stops
    lead.renewed(sent_at=101.0)
    assert lead.deciding(103.4)
    # It stops at 101 + 0.5 x 5; its key lives at least until 101 + 0.8 x 5: 1.5 s apart.
    assert not lead.deciding(103.5) and lead.expired(103.5)
    assert lead.ttl == 4.0
    lead.lost()
    assert lead.epoch is None and not lead.deciding(101.0)
