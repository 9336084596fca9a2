"""Fleet mode with real `laneswitch run` processes and a real redis-server: a change through any
member reaches every member before the call answers; a member joining late serves the fleet's
state, not its file's; /status and /events show the fleet."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import Fleet, admin_call, running_fleet, served_by


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    async with running_fleet(tmp_path) as found:
        yield found


async def test_a_switch_through_one_member_reaches_every_member_before_it_answers(
    fleet: Fleet,
) -> None:
    a, b, c = (fleet.member(name) for name in ("a", "b", "c"))
    await asyncio.gather(a.start(), b.start(), c.start())
    for member in (a, b, c):
        assert await served_by(member.data_port) == {b"blue"}
    status, answer = await admin_call(
        b.admin_port, "POST", "/services/shop/switch", {"to": "green"}
    )
    assert status == 200, answer
    assert answer["members"] == {"acknowledged": ["a", "b", "c"], "pending": []}
    # Answered after every member applied it: each one routes 100 % to green right now.
    for member in (a, b, c):
        assert await served_by(member.data_port) == {b"green"}
    # The decision record is the fleet's: the same on every member, naming the member.
    records = [(await admin_call(m.admin_port, "GET", "/events"))[1]["events"] for m in (a, b, c)]
    assert records[0] == records[1] == records[2]
    switches = [e for e in records[0] if e["action"] == "switch"]
    assert [(e["member"], e["to"]) for e in switches] == [("b", {"blue": 0, "green": 100})]
    assert len({e["id"] for e in records[0]}) == len(records[0])
    # /status on any member shows the fleet: members, one leader, what each applied.
    _, state = await admin_call(c.admin_port, "GET", "/status")
    fleet_status = state["fleet"]
    assert sorted(m["id"] for m in fleet_status["members"]) == ["a", "b", "c"]
    assert fleet_status["leader"] in {"a", "b", "c"}
    assert all(m["live"] for m in fleet_status["members"])


async def test_a_member_started_late_serves_the_fleets_state_not_its_files(fleet: Fleet) -> None:
    a = await fleet.member("a").start()
    status, answer = await admin_call(
        a.admin_port, "PUT", "/services/shop/weights", {"weights": {"blue": 0, "green": 100}}
    )
    assert status == 200, answer
    late = await fleet.member("late", weights=(100, 0)).start()  # its file says blue
    # Ready means it applied the fleet's state: its very first requests go to green.
    assert await served_by(late.data_port) == {b"green"}
    _, state = await admin_call(late.admin_port, "GET", "/status")
    assert state["services"]["shop"]["versions"]["green"]["weight"] == 100


async def test_the_command_line_exits_1_naming_a_member_that_did_not_apply(
    fleet: Fleet,
) -> None:
    import signal
    import sys

    # b is frozen but still live (its last heartbeat younger than the lease) for longer than
    # the change waits for it.
    a = fleet.member("a", lease="6s", ack_timeout="1s")
    b = fleet.member("b", lease="6s", ack_timeout="1s")
    await asyncio.gather(a.start(), b.start())
    b.signal(signal.SIGSTOP)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "switch",
            "shop",
            "green",
            "--admin",
            a.admin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 20)
    finally:
        b.signal(signal.SIGCONT)
    assert process.returncode == 1, (out, err)
    assert b"not yet applied by 1 member(s): b" in err
    # b applies it once it runs again: the change is in the store.
    async with asyncio.timeout(10):
        while await served_by(b.data_port, 5) != {b"green"}:
            await asyncio.sleep(0.05)


async def test_a_member_whose_config_cannot_take_the_fleets_weights_reports_config_behind(
    fleet: Fleet,
) -> None:
    a = fleet.member("a")
    # b's file has a third version: the fleet's weights (blue and green) do not fit it.
    b = fleet.member("b", versions_extra='      purple: {endpoints: ["127.0.0.1:9"], weight: 0}')
    await asyncio.gather(a.start(), b.start())
    status, answer = await admin_call(
        a.admin_port, "POST", "/services/shop/switch", {"to": "green"}
    )
    assert status == 200, answer
    # b applied the generation and said it could not take the service's weights (a NACK).
    assert answer["members"]["acknowledged"] == ["a", "b"]
    assert "weights must name exactly" in answer["members"]["config_behind"]["b"]["shop"]
    assert await served_by(a.data_port) == {b"green"}
    assert await served_by(b.data_port) == {b"blue"}  # its last table, not a crash
    _, state = await admin_call(b.admin_port, "GET", "/status")
    assert "weights must name exactly" in state["services"]["shop"]["config_behind"]
    assert "shop" in state["fleet"]["config_behind"]
    async with asyncio.timeout(5):  # a sees it in b's record at b's next heartbeat
        while True:
            _, seen = await admin_call(a.admin_port, "GET", "/status")
            others = {m["id"]: m for m in seen["fleet"]["members"]}
            if "shop" in others["b"]["config_behind"]:
                break
            await asyncio.sleep(0.05)


async def test_fleet_metrics_and_the_members_table_of_laneswitch_status(fleet: Fleet) -> None:
    import sys

    a, b = fleet.member("a"), fleet.member("b")
    await asyncio.gather(a.start(), b.start())
    status, answer = await admin_call(
        b.admin_port, "POST", "/services/shop/switch", {"to": "green"}
    )
    assert status == 200, answer
    texts = {}
    for member in (a, b):
        reader, writer = await asyncio.open_connection("127.0.0.1", member.admin_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        texts[member.name] = (await reader.read()).decode()
        writer.close()

    def value(text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not exported")

    for text in texts.values():
        assert value(text, "laneswitch_fleet_members") == 2
        assert value(text, "laneswitch_fleet_store_up") == 1
    assert sum(value(t, "laneswitch_fleet_leader") for t in texts.values()) == 1
    assert value(texts["a"], "laneswitch_fleet_apply_seconds_count") >= 1  # b's switch
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "status",
        "--admin",
        a.admin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err
    table = out.decode()
    assert "fleet shop: leader " in table and "store up" in table
    header = next(line for line in table.splitlines() if line.startswith("MEMBER"))
    assert header.split() == [
        "MEMBER",
        "LEADER",
        "CONFIG",
        "APPLIED",
        "LAST",
        "SEEN",
        "STORE",
        "ADMIN",
    ]
    rows = {
        line.split()[0]: line for line in table.splitlines()[table.splitlines().index(header) + 1 :]
    }
    assert set(rows) == {"a", "b"}
    assert a.admin in rows["a"] and b.admin in rows["b"]


async def test_with_workers_the_parent_is_the_member_and_its_workers_follow_the_fleet(
    fleet: Fleet,
) -> None:
    a = fleet.member("a")
    b = fleet.member("b", top_extra="workers: 2")
    await asyncio.gather(a.start(), b.start())
    status, answer = await admin_call(
        a.admin_port, "POST", "/services/shop/switch", {"to": "green"}
    )
    assert status == 200, answer
    assert answer["members"] == {"acknowledged": ["a", "b"], "pending": []}
    # Acknowledged by b means applied by both of its workers: every connection sees green.
    seen = set()
    for _ in range(12):  # a new connection each time: the kernel spreads them over the workers
        seen |= await served_by(b.data_port, 3)
    assert seen == {b"green"}
    _, state = await admin_call(a.admin_port, "GET", "/status")
    assert sorted(m["id"] for m in state["fleet"]["members"]) == ["a", "b"]
