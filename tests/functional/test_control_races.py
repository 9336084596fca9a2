"""The control plane under races: admin calls, reloads, rollout ticks and the stop in between;
state-file writes that must not be lost or land out of order; restore after the config moved."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

import proxy.control.statefile
from proxy.config.loader import parse_config
from proxy.errors import ControlError
from proxy.routing.table import RouteTable
from proxy.server import Server
from proxy.state import load_state
from tests.e2e.test_rollout import canary_config, phase_is, start, two_upstreams
from tests.functional.test_admin import admin_proxy
from tests.functional.test_control import config_text, server_from_file
from tests.helpers import Client, RecordingUpstream, get


async def waiters_on(lock: asyncio.Lock, count: int) -> None:
    """Until `count` tasks are queued on `lock` (asyncio.Lock wakes them in that order)."""
    async with asyncio.timeout(5):
        while len(lock._waiters or ()) < count:  # type: ignore[attr-defined]
            await asyncio.sleep(0)


@pytest.mark.parametrize("call", ["switch", "weights"])
async def test_a_change_queued_behind_a_reload_that_renames_its_version_is_refused(
    tmp_path: Path, call: str
) -> None:
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    path = tmp_path / "laneswitch.yaml"
    path.write_text(config_text(blue.endpoint, green.endpoint, 100))
    try:
        async with server_from_file(path) as server:
            control = server.control
            # green is renamed teal; the call below was checked against the old config.
            path.write_text(
                config_text(blue.endpoint, green.endpoint, 100).replace("green", "teal")
            )
            lock = control._lock
            await lock.acquire()
            reload = asyncio.create_task(control.reload())
            await waiters_on(lock, 1)
            if call == "switch":
                change = asyncio.create_task(control.switch("shop", "green"))
            else:
                change = asyncio.create_task(control.set_weights("shop", {"blue": 50, "green": 50}))
            await waiters_on(lock, 2)
            lock.release()
            assert (await reload).ok
            with pytest.raises(ControlError) as refused:
                await change
            assert refused.value.status in (404, 409)
            # The weights in force still fit the config: blue keeps its traffic.
            assert control.weights["shop"] == {"blue": 100, "teal": 0}
            client = await Client.connect(server.addresses[0][1])
            try:
                async with asyncio.timeout(5):
                    response = await client.request(get())
                assert response.status == 200
                assert response.header("X-App-Version") == b"blue"
            finally:
                await client.close()
    finally:
        await blue.stop()
        await green.stop()


async def test_a_rejected_reload_is_kept_in_the_state_file(tmp_path: Path) -> None:
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    state_file = tmp_path / "state.json"
    path = tmp_path / "laneswitch.yaml"
    good = config_text(blue.endpoint, green.endpoint, 100, extra=f"state_file: {state_file}")
    path.write_text(good)
    try:
        async with server_from_file(path) as server:
            await server.control.switch("shop", "green")
            path.write_text(good + "    bogus_key: 1\n")
            assert not (await server.control.reload()).ok
        state = load_state(state_file)
        assert state is not None
        assert [e["action"] for e in state.events] == ["switch", "reload_failed"]
    finally:
        await blue.stop()
        await green.stop()


async def test_a_stop_during_a_rollout_step_keeps_its_event_and_state(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    async with two_upstreams() as (stable, canary):
        text = canary_config(stable.endpoint, canary.endpoint, top=f"state_file: {state_file}")
        path = tmp_path / "laneswitch.yaml"
        path.write_text(text)
        server = Server(parse_config(text, env={}), config_path=str(path), config_text=text)
        await server.start(watch=False)
        control = server.control
        # A serving process that is slow to acknowledge the step's table (a busy worker).
        acking = asyncio.Event()

        async def slow_ack(generation: int) -> None:
            acking.set()
            await asyncio.sleep(0.5)

        control.table_acks.append(slow_ack)
        stopped = False
        try:
            await control.rollouts.command("shop", "start")
            async with asyncio.timeout(5):
                await acking.wait()  # step 1's weights are installed, its ack is pending
            await server.stop(drain_timeout=1.0)
            stopped = True
        finally:
            if not stopped:
                await server.stop(drain_timeout=1.0)
        actions = [e.action for e in control.events.since(0)]
        assert actions == ["start", "step"], actions
        state = load_state(state_file)
        assert state is not None
        assert [e["action"] for e in state.events] == ["start", "step"]
        assert state.weights["shop"] == control.weights["shop"] == {"stable": 80, "canary": 20}
        assert state.rollouts["shop"]["step"] == 1
        # Nothing ticks after the stop.
        assert not control.rollouts._tasks


async def test_concurrent_state_saves_land_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    state_file = tmp_path / "state.json"
    path = tmp_path / "laneswitch.yaml"
    path.write_text(
        config_text(blue.endpoint, green.endpoint, 100, extra=f"state_file: {state_file}")
    )
    real = proxy.control.statefile.save_state
    calls = 0

    def uneven_save(target: Any, state: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            time.sleep(0.3)  # the first write is slow (a busy disk), the second is not
        real(target, state)

    try:
        async with server_from_file(path) as server:
            control = server.control
            monkeypatch.setattr(proxy.control.statefile, "save_state", uneven_save)
            # A save outside the lock (as a background webhook verdict makes) overlapping a
            # switch's own save.
            background = asyncio.create_task(control.save())
            await asyncio.sleep(0.05)
            await control.switch("shop", "green")
            await background
            saved = json.loads(state_file.read_text())
            assert saved["weights"]["shop"] == {"blue": 0, "green": 100}
            assert [e["action"] for e in saved["events"]] == ["switch"]
    finally:
        await blue.stop()
        await green.stop()


async def test_a_restart_after_the_roles_changed_does_not_resume_the_old_run(
    tmp_path: Path,
) -> None:
    state_file = tmp_path / "state.json"
    async with two_upstreams() as (stable, canary):
        text = canary_config(
            stable.endpoint, canary.endpoint, steps="[20, 40]", top=f"state_file: {state_file}"
        )
        async with admin_proxy(tmp_path, text) as proxy:
            await start(proxy)
            await phase_is(proxy.server.control, "progressing")
            async with asyncio.timeout(5):
                while proxy.server.control.rollouts.state("shop").step < 1:
                    await asyncio.sleep(0.01)
        # While down, the operator swaps the roles (the canary is the new stable).
        swapped = text.replace("stable: stable", "stable: TMP").replace(
            "canary: canary", "canary: stable"
        )
        swapped = swapped.replace("stable: TMP", "stable: canary")
        async with admin_proxy(tmp_path, swapped) as proxy:
            state = proxy.server.control.rollouts.state("shop")
            assert state.phase == "aborted", state
            assert not proxy.server.control.rollouts._tasks


async def test_a_reload_never_routes_to_an_endpoint_not_yet_checked(tmp_path: Path) -> None:
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    extra = await RecordingUpstream("blue").start()
    check = "    health_check: {path: /healthz, interval: 1h, timeout: 500ms}\n"
    path = tmp_path / "laneswitch.yaml"
    path.write_text(config_text(blue.endpoint, green.endpoint, 100) + check)
    try:
        async with server_from_file(path) as server:
            control = server.control
            pushed: list[RouteTable] = []
            control.table_subscribers.append(pushed.append)
            path.write_text(
                config_text(blue.endpoint, green.endpoint, 100).replace(
                    f'["{blue.endpoint}"]', f'["{blue.endpoint}", "{extra.endpoint}"]'
                )
                + check
            )
            assert (await control.reload()).ok
            assert pushed
            for table in pushed:
                [service] = table.services
                routed = {e.key for v in service.versions for e in v.endpoints}
                assert extra.endpoint not in routed, table.generation
    finally:
        await blue.stop()
        await green.stop()
        await extra.stop()
