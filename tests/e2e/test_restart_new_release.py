"""Functional, real `laneswitch run` processes: a restart resumes a rollout only for the release
it was started for.

A run's weight was earned by the build that was analysed. When the canary's revision or
endpoints change while the proxy is down, the restart must not hand the saved step's weight to
a build nobody analysed: the old run is superseded and a new one starts from weight 0 (actor
`config`), exactly as a reload would. An unchanged file still resumes at the saved step.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_rollback_always import hook_entry, stalled_hook
from tests.e2e.test_rollout import INTERVAL, canary_config, two_upstreams
from tests.helpers import Client, RecordingUpstream, admin_call, get, start_laneswitch


async def rollout_of(admin_url: str) -> dict[str, Any]:
    status, body = await admin_call(int(admin_url.rsplit(":", 1)[1]), "GET", "/status")
    assert status == 200, body
    rollout: dict[str, Any] = body["services"]["shop"]["rollout"]
    return rollout


async def events_of(admin_url: str) -> list[dict[str, Any]]:
    status, body = await admin_call(int(admin_url.rsplit(":", 1)[1]), "GET", "/events")
    assert status == 200, body
    found: list[dict[str, Any]] = body["events"]
    return found


@pytest.mark.parametrize("edit", ["unchanged", "revision", "endpoints"])
async def test_a_restart_supersedes_the_run_of_a_changed_canary(tmp_path: Path, edit: str) -> None:
    state_file = tmp_path / "state.json"
    config = tmp_path / "laneswitch.yaml"
    other = await RecordingUpstream("canary").start()  # the canary's new address, if moved
    try:
        async with stalled_hook() as hook, two_upstreams() as (stable, canary):
            hook.release.set()  # run 1: the pre-rollout hook says yes at once
            text = canary_config(
                stable.endpoint,
                canary.endpoint,
                steps="[20, 50]",
                deadline="10m",
                top=f"state_file: {state_file}",
                webhooks=hook_entry(hook.url, "pre-rollout", timeout="10s", retries=0),
            ).replace(f"interval: {INTERVAL}s", "interval: 1m")  # step 1 stays put
            config.write_text(text)
            proxy = await start_laneswitch(config)
            try:
                port = int(proxy.admin_url.rsplit(":", 1)[1])
                status, body = await admin_call(port, "POST", "/services/shop/rollout/start")
                assert status == 200, body
                async with asyncio.timeout(10):
                    while (await rollout_of(proxy.admin_url))["step"] < 1:
                        await asyncio.sleep(0.02)
            finally:
                assert await proxy.stop() == 0
            saved = json.loads(state_file.read_text())
            assert saved["weights"]["shop"] == {"stable": 80, "canary": 20}
            old_run = saved["rollouts"]["shop"]["run"]

            # While the proxy is down the operator edits the canary (or nothing), and the
            # pre-rollout hook of any new run will not answer: a new run stays at weight 0.
            if edit == "revision":
                text = text.replace('revision: "2.0"', 'revision: "2.1"')
            elif edit == "endpoints":
                text = text.replace(f'["{canary.endpoint}"]', f'["{other.endpoint}"]')
            config.write_text(text)
            hook.release.clear()
            canary_seen = len(canary.requests)
            proxy = await start_laneswitch(config)
            try:
                rollout = await rollout_of(proxy.admin_url)
                served = [await stable_or_canary(proxy.port) for _ in range(40)]
                events = await events_of(proxy.admin_url)
            finally:
                assert await proxy.stop() == 0
            if edit == "unchanged":
                assert (rollout["phase"], rollout["step"], rollout["weight"]) == (
                    "progressing",
                    1,
                    20.0,
                )
                assert "canary" in served
                assert [e["action"] for e in events].count("start") == 1
                return
            assert (rollout["phase"], rollout["step"], rollout["weight"]) == (
                "progressing",
                0,
                0.0,
            ), rollout
            assert set(served) == {"stable"}
            assert len(canary.requests) == canary_seen and other.requests == []
            starts = [e for e in events if e["action"] == "start"]
            assert len(starts) == 2, events
            start = starts[-1]
            assert start["actor"] == "config"
            assert start["from"] == {"stable": 80, "canary": 20}
            assert start["to"] == {"stable": 100, "canary": 0}
            assert "while the proxy was down" in start["reason"]
            if edit == "revision":
                assert "canary revision 2.0 -> 2.1" in start["reason"]
            else:
                assert f"endpoints {canary.endpoint} -> {other.endpoint}" in start["reason"]
            assert start["values"]["superseded"] == {
                "run": old_run,
                "phase": "progressing",
                "step": 1,
            }
            assert json.loads(state_file.read_text())["rollouts"]["shop"]["run"] == old_run + 1
    finally:
        await other.stop()


async def stable_or_canary(port: int) -> str:
    """The version that answered one request through the proxy (its X-App-Version)."""
    client = await Client.connect(port)
    try:
        response = await client.request(get())
        assert response.status == 200
        return (response.header("X-App-Version") or b"-").decode()
    finally:
        await client.close()
