"""The rollout part of GET /status: a run's state beside its rollout block's settings.

The console and `laneswitch status` read it; the field names are part of the admin API.
"""

from __future__ import annotations

from typing import Any

from proxy.config.rollout import CanaryRollout
from proxy.rollout.analysis import thresholds_of
from proxy.rollout.release import roles, step_count
from proxy.rollout.values import Rollout, RolloutState


def rollout_status(rollout: Rollout, state: RolloutState, weight: float) -> dict[str, Any]:
    """`state` of a run of `rollout`, whose candidate has `weight` percent of the traffic."""
    candidate, baseline = roles(rollout)
    result: dict[str, Any] = {
        "strategy": rollout.strategy,
        "phase": state.phase,
        "candidate": candidate,
        "baseline": baseline,
        "step": state.step,
        "steps": step_count(rollout),
        "weight": round(weight, 4),
        "failed_checks": state.failed_checks,
        "threshold": rollout.threshold,
        "interval": rollout.interval,
        "min_requests": rollout.min_requests,
        # What every interval is judged against (the console draws them on its charts).
        "thresholds": thresholds_of(rollout.metrics, rollout.min_requests),
        "reason": state.reason,
        "started_at": state.started_at,
        "step_at": state.step_at,
        "holding_since": state.holding_since,
        "awaiting_promotion": state.awaiting_promotion,
        "last_analysis": state.last_analysis,
        "last_decision": state.last_decision,
    }
    if isinstance(rollout, CanaryRollout):
        result.update(
            canary=rollout.canary,
            stable=rollout.stable,
            step_weights=rollout.steps(),
            promotion=rollout.promotion,
            progress_deadline=rollout.progress_deadline,
        )
    else:
        result.update(
            active=rollout.active,
            preview=rollout.preview,
            bake_time=rollout.bake_time,
            baseline_success_rate=state.baseline_rate,
        )
    return result
