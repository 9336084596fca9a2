"""Functional: a rollout's step is stored together with its weights, never ahead of them.

A decision is computed outside the control plane's lock and carried out under it. While it
waits for the lock, whatever holds it may write the state file (any change does); that file,
and GET /status, must still show the run's step that goes with the weights in force, or a
restart would resume a step whose weights were never applied.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from proxy.control import ControlPlane
from tests.e2e.test_rollback_always import hook_entry, stalled_hook
from tests.e2e.test_rollout import canary_config, two_upstreams
from tests.functional.test_admin import admin_proxy


class WatchedLock(asyncio.Lock):
    """The control plane's lock, saying when a caller starts waiting for it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = asyncio.Event()

    async def acquire(self) -> bool:
        if self.locked():
            self.waited.set()
        return await super().acquire()


def saved(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The state file's rollout of shop and its weights."""
    state = json.loads(path.read_text())
    return state["rollouts"]["shop"], state["weights"]["shop"]


def one_step_config(stable: str, canary: str, state_file: Path) -> str:
    """A canary with a state file and a long interval: after the immediate step 1, no other
    tick comes during a test."""
    return canary_config(stable, canary, top=f"state_file: {state_file}").replace(
        "interval: 0.5s", "interval: 60s"
    )


async def test_a_decision_waiting_for_the_lock_is_not_saved_before_its_weights(
    tmp_path: Path,
) -> None:
    state_file = tmp_path / "state.json"
    async with two_upstreams() as (stable, canary):
        text = one_step_config(stable.endpoint, canary.endpoint, state_file)
        async with admin_proxy(tmp_path, text) as proxy:
            control: ControlPlane = proxy.server.control
            lock = WatchedLock()
            control._lock = lock
            await control.rollouts.start("shop", actor="admin", reason="test")
            # The start is carried out; its immediate tick (step 1: canary to 20 %) is about
            # to run. Held here, the lock stands for any change in progress meanwhile.
            async with lock:
                async with asyncio.timeout(5):
                    await lock.waited.wait()
                await control.save()  # what every change does before it releases the lock
                rollout, weights = saved(state_file)
                assert weights == {"stable": 100, "canary": 0}
                assert (rollout["phase"], rollout["step"]) == ("progressing", 0)
                answer = await proxy.call("GET", "/status")
                shop = answer.body["services"]["shop"]
                assert shop["rollout"]["step"] == 0
                assert shop["versions"]["canary"]["weight"] == 0
            # The file is written last, after the table is installed and acknowledged.
            async with asyncio.timeout(5):
                while saved(state_file)[0]["step"] < 1:
                    await asyncio.sleep(0.01)
            assert proxy.weights() == {"stable": 80, "canary": 20}
            rollout, weights = saved(state_file)
            assert (rollout["step"], weights) == (1, {"stable": 80, "canary": 20})


async def test_a_rollback_waiting_for_the_lock_is_not_saved_before_its_weights(
    tmp_path: Path,
) -> None:
    state_file = tmp_path / "state.json"
    async with two_upstreams() as (stable, canary):
        text = one_step_config(stable.endpoint, canary.endpoint, state_file)
        async with admin_proxy(tmp_path, text) as proxy:
            control: ControlPlane = proxy.server.control
            await control.rollouts.start("shop", actor="admin", reason="test")
            async with asyncio.timeout(5):
                while control.rollouts.state("shop").step < 1:
                    await asyncio.sleep(0.01)
            lock = WatchedLock()
            control._lock = lock
            async with lock:
                rollback = asyncio.ensure_future(control.rollback("shop"))
                async with asyncio.timeout(5):
                    await lock.waited.wait()
                await control.save()  # a change in progress while the rollback waits
                rollout, weights = saved(state_file)
                # Either the run and its weights, or the rollback and its: never "rolled
                # back" with the canary still holding traffic (a restart would keep it so).
                assert (rollout["phase"], weights) == (
                    "progressing",
                    {"stable": 80, "canary": 20},
                )
            async with asyncio.timeout(5):
                await rollback
            rollout, weights = saved(state_file)
            assert (rollout["phase"], weights) == ("rolled_back", {"stable": 100, "canary": 0})


async def test_a_rollback_that_moves_no_weight_is_saved_at_once(tmp_path: Path) -> None:
    """At step 0 (its pre-rollout hook unanswered) the weights are already the rollback's:
    the run's end must still reach the state file, or a restart resumes the run."""
    state_file = tmp_path / "state.json"
    async with stalled_hook() as hook, two_upstreams() as (stable, canary):
        text = canary_config(
            stable.endpoint,
            canary.endpoint,
            top=f"state_file: {state_file}",
            webhooks=hook_entry(hook.url, "pre-rollout", "10s"),
        )
        async with admin_proxy(tmp_path, text) as proxy:
            control: ControlPlane = proxy.server.control
            await control.rollouts.start("shop", actor="admin", reason="test")
            async with asyncio.timeout(5):
                while hook.requests == 0:  # step 0: the pre-rollout hook is being asked
                    await asyncio.sleep(0.01)
            answer = await proxy.call("POST", "/services/shop/rollback")
            assert answer.status == 200, answer.body
            rollout, weights = saved(state_file)
            assert (rollout["phase"], weights) == ("rolled_back", {"stable": 100, "canary": 0})
