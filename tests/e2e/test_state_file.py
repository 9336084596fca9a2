"""The state file under adversity: one written by another laneswitch version never stops
start-up (unknown fields ignored, bad entries skipped and counted), and a write that fails is
an error an operator sees in GET /status and the metrics, not only a log line."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.functional.test_admin import admin_proxy, blue_green, config_text, parse_metrics, value
from tests.helpers import (
    RecordingUpstream,
    spawn_laneswitch,
    wait_for_line,
)


def state_from_another_version(damaged: bool) -> dict[str, object]:
    """What a newer (or older) laneswitch could have left: fields this one does not know, and
    entries whose shape changed (`damaged`: more of them, of every kind)."""
    switch = {
        "id": 7,
        "time": 1_700_000_000.0,
        "service": "shop",
        "actor": "admin",
        "action": "switch",
        "from": {"blue": 100, "green": 0},
        "to": {"blue": 0, "green": 100},
        "reason": "all traffic to green",
        "values": {},
        "thresholds": {},
        "member": "replica-2",  # a field of a later version: ignored
    }
    state: dict[str, object] = {
        "version": 1,
        "weights": {"shop": {"blue": 0, "green": 100}},
        "file_weights": {"shop": {"blue": 100, "green": 0}},
        "rollouts": {"shop": "x"},  # skipped
        "events": [switch],
        "leases": {"shop": 3},  # a top-level field of a later version: ignored
    }
    if damaged:
        state["previous_weights"] = {"shop": {"blue": "all", "green": 0}}  # skipped
        state["events"] = [
            {**switch, "id": "eight"},  # skipped
            "not an event",  # skipped
            switch,
        ]
    return state


@pytest.mark.parametrize(("damaged", "skipped"), [(False, 1), (True, 4)])
async def test_a_state_file_of_another_version_never_stops_start_up(
    tmp_path: Path, damaged: bool, skipped: int
) -> None:
    async with blue_green() as (blue, green):
        state = tmp_path / "state.json"
        state.write_text(json.dumps(state_from_another_version(damaged)))
        rollout = (
            "    rollout: {strategy: canary, stable: blue, canary: green, step_weights: [50],"
            " interval: 1m, threshold: 1, min_requests: 1,"
            " metrics: {success_rate: {min: 99}}}"
        )
        config = tmp_path / "laneswitch.yaml"
        config.write_text(
            config_text(
                blue.endpoint,
                green.endpoint,
                service_extra=rollout,
                top_extra=f"state_file: {state}",
            )
        )
        process = await spawn_laneswitch("run", "-c", str(config))
        assert process.stderr is not None
        try:
            line = await wait_for_line(process.stderr, r"admin API on 127\.0\.0\.1:(\d+)")
            match = re.search(r"127\.0\.0\.1:(\d+)", line)
            assert match is not None
            admin = f"http://127.0.0.1:{match.group(1)}"
            await wait_for_line(process.stderr, r"listening on")
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{admin}/status") as response:
                    assert response.status == 200
                    status = await response.json()
                async with session.get(f"{admin}/events") as response:
                    events = (await response.json())["events"]
                async with session.get(f"{admin}/metrics") as response:
                    metrics = parse_metrics(await response.text())
            shop = status["services"]["shop"]
            # What did parse is in force: the saved switch, its event, an idle rollout.
            assert shop["versions"]["green"]["weight"] == 100
            assert shop["rollout"]["phase"] == "idle"
            assert [(e["id"], e["action"]) for e in events] == [(7, "switch")]
            assert "member" not in events[0]
            assert status["state_file"]["entries_skipped"] == skipped
            counted = metrics["laneswitch_state_entries_skipped"]
            assert value(counted, "laneswitch_state_entries_skipped_total") == skipped
            # A new decision continues the saved numbering.
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{admin}/services/shop/rollback") as response:
                    assert response.status == 200, await response.text()
                async with session.get(f"{admin}/events?since=7") as response:
                    assert [e["id"] for e in (await response.json())["events"]] == [8]
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 15) == 0
        # The file it leaves behind is in this version's shape again.
        saved = json.loads(state.read_text())
        assert all(isinstance(entry, dict) for entry in saved["rollouts"].values())
        assert saved["weights"]["shop"] == {"blue": 100, "green": 0}
        assert [e["id"] for e in saved["events"]] == [7, 8]


async def test_a_failed_state_write_is_an_error_in_status_and_the_metrics(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the state file's directory should be")
    state = blocker / "state.json"
    async with (
        blue_green() as (blue, green),
        admin_proxy(
            tmp_path,
            config_text(blue.endpoint, green.endpoint, top_extra=f"state_file: {state}"),
        ) as proxy,
    ):
        switched = await proxy.call("POST", "/services/shop/switch", {"to": "green"})
        assert switched.status == 200  # the change itself is in force
        status = (await proxy.call("GET", "/status")).body["state_file"]
        assert status["write_failures"] >= 1
        assert "cannot write the state file" in status["last_write_error"]
        failures = (await proxy.metrics())["laneswitch_state_write_failures"]
        assert value(failures, "laneswitch_state_write_failures_total") >= 1
        # Once the directory can be made, the next write clears the error.
        blocker.unlink()
        assert (await proxy.call("POST", "/services/shop/rollback")).status == 200
        status = (await proxy.call("GET", "/status")).body["state_file"]
        assert status["last_write_error"] is None
        assert json.loads(state.read_text())["weights"]["shop"] == {"blue": 100, "green": 0}


async def test_a_state_file_that_is_not_json_is_ignored(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text('{"version": 1, "weights": ')
    upstream = await RecordingUpstream("blue").start()
    try:
        async with admin_proxy(
            tmp_path,
            config_text(upstream.endpoint, upstream.endpoint, top_extra=f"state_file: {state}"),
        ) as proxy:
            assert proxy.weights() == {"blue": 100, "green": 0}
    finally:
        await upstream.stop()
