"""Reload storms: an unchanged file changes nothing and records nothing, reloads that arrive
while one runs are coalesced, a rollback is never queued behind them, and records that are not
decisions never push a decision out of the record (SPEC §6)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import aiohttp

from proxy.events import MAX_EVENTS, MAX_NOISE_EVENTS
from tests.functional.test_admin import admin_proxy, blue_green, config_text
from tests.helpers import start_laneswitch

SIGNALS = 1000


async def test_a_thousand_sighups_of_an_unchanged_file_change_nothing(tmp_path: Path) -> None:
    async with blue_green() as (blue, green):
        state = tmp_path / "state.json"
        config = tmp_path / "laneswitch.yaml"
        config.write_text(
            config_text(blue.endpoint, green.endpoint, top_extra=f"state_file: {state}")
        )
        proxy = await start_laneswitch(config)
        try:
            async with aiohttp.ClientSession() as session:
                url = proxy.admin_url
                async with session.post(
                    f"{url}/services/shop/switch", json={"to": "green"}
                ) as answer:
                    assert answer.status == 200
                for n in range(SIGNALS):
                    proxy.process.send_signal(signal.SIGHUP)
                    if n % 10 == 0:
                        await asyncio.sleep(0)  # let some arrive one by one, not all coalesced
                began = time.monotonic()
                async with session.post(f"{url}/services/shop/rollback") as answer:
                    assert answer.status == 200, await answer.text()
                acknowledged = time.monotonic() - began
                async with session.get(f"{url}/events") as answer:
                    events = (await answer.json())["events"]
                async with session.get(f"{url}/status") as answer:
                    status = await answer.json()
            assert acknowledged < 2.0, f"rollback acknowledged after {acknowledged:.1f}s"
            assert [e["action"] for e in events] == ["switch", "rollback"]
            assert status["config"]["last_reload_error"] is None
            saved = json.loads(state.read_text())
            assert [e["action"] for e in saved["events"]] == ["switch", "rollback"]
        finally:
            assert await proxy.stop() == 0


async def test_reloads_arriving_while_one_runs_are_coalesced_into_one_more(
    tmp_path: Path,
) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        proxy.config_path.write_text(config_text(blue.endpoint, green.endpoint, blue_weight=50))
        control = proxy.server.control
        # 50 requests made at the same moment (as 50 SIGHUPs handled in one loop pass are).
        results = await asyncio.gather(*(control.reload(actor="admin") for _ in range(50)))
        assert all(result.ok for result in results)
        # The first applies the edit; the 49 others get one more reload, which finds the
        # file unchanged. Never one reload per request.
        assert [result.changed for result in results] == [True] + [False] * 49
        assert control.reloads["success"] == 2
        assert [e.action for e in control.events.since(0)] == ["reload"]
        assert proxy.weights() == {"blue": 50, "green": 50}
        # Over HTTP as well: every caller is answered, and an unchanged file records nothing.
        answers = await asyncio.gather(*(proxy.call("POST", "/reload") for _ in range(20)))
        assert {a.status for a in answers} == {200}
        assert [e.action for e in control.events.since(0)] == ["reload"]


async def test_a_storm_of_failed_reloads_never_evicts_a_decision(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        switched = await proxy.call("POST", "/services/shop/switch", {"to": "green"})
        assert switched.status == 200
        proxy.config_path.write_text("services: [not, a, map]\n")
        # More than the whole record holds: without a separate cap the switch would be gone.
        for _ in range(MAX_EVENTS + 10):
            assert (await proxy.call("POST", "/reload")).status == 400
        events = (await proxy.call("GET", "/events")).body["events"]
        assert events[0]["action"] == "switch"
        assert len(events) == MAX_NOISE_EVENTS + 1
        assert {e["action"] for e in events[1:]} == {"reload_failed"}
        last = (await proxy.call("GET", "/status")).body["services"]["shop"]["last_decision"]
        assert last["action"] == "switch"
