"""Blue-green's own steps: all traffic to the preview at once, then the bake it must pass.

The state machine (`controller`) has judged the checks and the interval (failures, holds and
deadlines are its); these decide the switch and when a bake has passed enough to promote.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from proxy.config.rollout import BlueGreenRollout
from proxy.config.service import ServiceConfig
from proxy.rollout.analysis import Analysis
from proxy.rollout.release import roles, rollout_thresholds, weights_with
from proxy.rollout.values import Decision, Observation, Outcome, RolloutState, checks_json, decided


def switch(
    state: RolloutState,
    rollout: BlueGreenRollout,
    service: ServiceConfig,
    weights: Mapping[str, int],
    obs: Observation,
) -> Outcome:
    """The checks before the switch passed: all of the two roles' traffic to the preview, and
    the bake begins (none configured: the promotion at once)."""
    candidate, baseline = roles(rollout)
    target = weights_with(service, weights, candidate, baseline, service.weight_total)
    new = replace(
        state,
        step=1,
        step_at=obs.now,
        holding_since=None,
        passes=0,
        baseline_rate=obs.baseline_rate,
    )
    bake = rollout.bake_time
    needed = rollout.min_passing_intervals
    decision = Decision(
        "switch",
        f"all traffic to {candidate}"
        + (" (pre-switch checks passed)" if obs.checks else "")
        + (f"; baking for {bake:g}s and {_intervals(needed)}" if bake or needed else ""),
        weights=target,
        values={"checks": checks_json(obs.checks), "baseline_success_rate": obs.baseline_rate},
        thresholds=rollout_thresholds(rollout),
    )
    if bake == 0 and needed == 0:
        promoting = replace(new, phase="promoting")
        return Outcome(decided(promoting, decision, obs.now), (decision,), again=True)
    return Outcome(decided(new, decision, obs.now), (decision,))


def bake_passed(
    state: RolloutState, rollout: BlueGreenRollout, analysis: Analysis, obs: Observation
) -> Outcome:
    """A passing interval of the bake: promotion once the bake time is over *and* enough
    intervals passed (SPEC §6), so one lucky interval never promotes a version."""
    candidate, _ = roles(rollout)
    state = replace(state, passes=state.passes + 1)
    baked = obs.now - (state.step_at if state.step_at is not None else obs.now)
    needed = rollout.min_passing_intervals
    values = {**analysis.values, "passing_intervals": state.passes}
    thresholds = {**analysis.thresholds, "min_passing_intervals": needed}
    if baked >= rollout.bake_time - 1e-6 and state.passes >= needed:
        new = replace(state, phase="promoting")
        decision = Decision(
            "promoting",
            f"bake of {rollout.bake_time:g}s passed with {_intervals(state.passes)} "
            f"({analysis.reason}); promoting {candidate}",
            values=values,
            thresholds=thresholds,
        )
        return Outcome(decided(new, decision, obs.now), (decision,), again=True)
    left = []
    if baked < rollout.bake_time - 1e-6:
        left.append(f"{rollout.bake_time - baked:.0f}s of the bake")
    if state.passes < needed:
        left.append(f"{_intervals(needed - state.passes)}")
    decision = Decision(
        "bake",
        f"analysis passed ({analysis.reason}); {' and '.join(left)} left",
        values=values,
        thresholds=thresholds,
    )
    return Outcome(decided(state, decision, obs.now), (decision,))


def _intervals(count: int) -> str:
    return f"{count} passing interval" + ("" if count == 1 else "s")
