"""A canary's own steps: the first once its checks passed, then one per passing interval.

The state machine (`controller`) has judged the interval (failures, holds and deadlines are
its); these decide where a canary that passed goes next.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from proxy.config.rollout import CanaryRollout
from proxy.config.service import ServiceConfig
from proxy.rollout.analysis import Analysis
from proxy.rollout.release import (
    percent_units,
    roles,
    rollout_thresholds,
    step_count,
    weights_with,
)
from proxy.rollout.values import Decision, Observation, Outcome, RolloutState, checks_json, decided


def first_step(
    state: RolloutState,
    rollout: CanaryRollout,
    service: ServiceConfig,
    weights: Mapping[str, int],
    obs: Observation,
) -> Outcome:
    """The checks before any traffic passed: the canary to the first step's weight."""
    candidate, baseline = roles(rollout)
    percent = rollout.steps()[0]
    target = weights_with(service, weights, candidate, baseline, percent_units(service, percent))
    new = replace(state, step=1, step_at=obs.now, holding_since=None)
    decision = Decision(
        "step",
        f"step 1 of {step_count(rollout)}: {candidate} to {percent:g}%"
        + (" (pre-rollout checks passed)" if obs.checks else ""),
        weights=target,
        values={"step": 1, "weight_percent": percent, "checks": checks_json(obs.checks)},
        thresholds=rollout_thresholds(rollout),
    )
    return Outcome(decided(new, decision, obs.now), (decision,))


def step_passed(
    state: RolloutState,
    rollout: CanaryRollout,
    service: ServiceConfig,
    weights: Mapping[str, int],
    analysis: Analysis,
    obs: Observation,
) -> Outcome:
    """A step's interval passed: the next step, or after the last one the promotion (auto) or
    the wait for a person's `promote` (manual)."""
    candidate, baseline = roles(rollout)
    n = step_count(rollout)
    steps = rollout.steps()
    if state.step < n:
        percent = steps[state.step]
        target = weights_with(
            service, weights, candidate, baseline, percent_units(service, percent)
        )
        new = replace(state, step=state.step + 1, step_at=obs.now)
        decision = Decision(
            "step",
            f"step {new.step} of {n}: {candidate} to {percent:g}% ({analysis.reason})",
            weights=target,
            values={**analysis.values, "step": new.step, "weight_percent": percent},
            thresholds=analysis.thresholds,
        )
        return Outcome(decided(new, decision, obs.now), (decision,))
    if rollout.promotion == "auto":
        new = replace(state, phase="promoting")
        decision = Decision(
            "promoting",
            f"last step passed ({analysis.reason}); promoting {candidate}",
            values=analysis.values,
            thresholds=analysis.thresholds,
        )
        return Outcome(decided(new, decision, obs.now), (decision,), again=True)
    if state.awaiting_promotion:
        # Already said; the analyses go on (a failure still rolls back) without a new event.
        return Outcome(state)
    new = replace(state, awaiting_promotion=True)
    decision = Decision(
        "hold",
        f"last step passed ({analysis.reason}); promotion: manual, waiting for "
        f"`laneswitch rollout promote`",
        values=analysis.values,
        thresholds=analysis.thresholds,
    )
    return Outcome(decided(new, decision, obs.now), (decision,))
