"""Functional: a reload that edits a running rollout's weights or steps (same release).

The file's new weights are a person's change: they apply, and the run pauses so its next step
does not silently override them. New steps send the run back to step 1 of them (as Argo
Rollouts restarts its steps when they change): a shortened list never jumps to a promotion the
canary did not reach. Each is an event with actor `config`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.e2e.test_rollout import (
    INTERVAL,
    canary_config,
    events,
    phase_is,
    start,
    steady_load,
    two_upstreams,
)
from tests.functional.test_admin import admin_proxy


async def test_file_weights_edited_during_a_run_apply_and_pause_it(tmp_path: Path) -> None:
    async with two_upstreams() as (stable, canary):
        text = canary_config(stable.endpoint, canary.endpoint, steps="[20, 40, 60, 80]")
        async with admin_proxy(tmp_path, text) as proxy, steady_load(proxy.proxy_port):
            control = proxy.server.control
            await start(proxy)
            async with asyncio.timeout(5):
                while control.rollouts.state("shop").step < 1:
                    await asyncio.sleep(0.01)
            edited = text.replace("weight: 100,", "weight: 70,").replace(
                "weight: 0,", "weight: 30,"
            )
            proxy.config_path.write_text(edited)
            assert (await control.reload()).ok
            assert proxy.weights() == {"stable": 70, "canary": 30}
            state = control.rollouts.state("shop")
            assert (state.phase, state.paused_from) == ("paused", "progressing")
            [weights] = events(proxy.server, "weights")
            assert weights.actor == "config" and weights.to == {"stable": 70, "canary": 30}
            [pause] = events(proxy.server, "pause")
            assert pause.actor == "config" and "file's weights changed" in pause.reason
            steps = len(events(proxy.server, "step"))
            served = len(canary.requests)
            loop = asyncio.get_running_loop()
            until = loop.time() + 3 * INTERVAL  # three intervals, each of which would step
            async with asyncio.timeout(10):
                while len(canary.requests) < served + 100 or loop.time() < until:
                    await asyncio.sleep(0.02)
            assert proxy.weights() == {"stable": 70, "canary": 30}  # not undone by a step
            assert len(events(proxy.server, "step")) == steps
            answer = await proxy.call("POST", "/services/shop/rollout/resume")
            assert answer.status == 200, answer.body
            await phase_is(control, "promoted")


async def test_shortened_steps_go_back_to_step_1_never_on_to_the_promotion(
    tmp_path: Path,
) -> None:
    async with two_upstreams() as (stable, canary):
        text = canary_config(stable.endpoint, canary.endpoint, steps="[20, 40, 60, 80]")
        async with admin_proxy(tmp_path, text) as proxy, steady_load(proxy.proxy_port):
            control = proxy.server.control
            await start(proxy)
            async with asyncio.timeout(10):
                while control.rollouts.state("shop").step < 3:
                    await asyncio.sleep(0.01)
            answer = await proxy.call("POST", "/services/shop/rollout/pause")
            assert answer.status == 200, answer.body
            assert proxy.weights() == {"stable": 40, "canary": 60}
            proxy.config_path.write_text(text.replace("[20, 40, 60, 80]", "[20, 40]"))
            assert (await control.reload()).ok
            state = control.rollouts.state("shop")
            assert (state.phase, state.step) == ("paused", 1)
            assert proxy.weights() == {"stable": 80, "canary": 20}
            restart = events(proxy.server, "step")[-1]
            assert restart.actor == "config"
            assert restart.from_ == {"stable": 40, "canary": 60}
            assert restart.to == {"stable": 80, "canary": 20}
            assert "20%, 40%, 60%, 80% -> 20%, 40%" in restart.reason
            assert "back to step 1 of 2" in restart.reason
            before = len(control.events.since(0))
            answer = await proxy.call("POST", "/services/shop/rollout/resume")
            assert answer.status == 200, answer.body
            await phase_is(control, "promoted")
            later = [e for e in control.events.since(0)[before:] if e.action != "webhook"]
            assert [e.action for e in later] == ["resume", "step", "promoting", "promote"]
            assert later[1].to == {"stable": 60, "canary": 40}  # the 40 % step is not skipped
