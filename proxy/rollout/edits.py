"""A reload's edits of a running release: new file weights pause the run, new steps restart it.

Pure: from the run's state, the service's config before and after, and the weights in force,
what the run becomes, the weights to put in force, and the events that say so (actor
"config"). The manager carries it out under the control plane's lock, in the reload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from proxy.config.rollout import CanaryRollout
from proxy.config.service import ServiceConfig
from proxy.rollout.release import percent_units, roles, weights_with
from proxy.rollout.values import RUNNING, TICKING, RolloutState, Weights


@dataclass(frozen=True, slots=True)
class RunEdit:
    """What a reload's edit does to a run that goes on."""

    state: RolloutState
    weights: Weights | None  # to put in force; None: those the reload applied stay
    events: tuple[tuple[str, dict[str, Any]], ...]  # (action, EventLog.record's keywords)
    said: tuple[str, ...]  # for the log


def edited_during_run(
    state: RolloutState,
    old: ServiceConfig,
    new: ServiceConfig,
    weights_in_force: Mapping[str, int],
    weights_before: Mapping[str, int] | None,
    now: float,
) -> RunEdit | None:
    """What a reload's edit of the file's weights or of the canary's steps does to a run that
    goes on (same release); None when it changes neither. Neither is left for the next tick
    to undo or misread:
    - new file weights are a person's change, like a `weights` call: they apply and the
      run pauses, so its next step does not override them (`resume` hands back);
    - new steps send the run back to step 1 of them, as Argo Rollouts restarts its steps
      when they change: a shortened list never skips to a promotion the canary did not
      reach, a longer one never skips a weight."""
    rollout = new.rollout
    if rollout is None or state.phase not in RUNNING:
        return None
    state = replace(state)  # a copy: the caller's stays as it was
    old_steps = old.rollout.steps() if isinstance(old.rollout, CanaryRollout) else None
    new_steps = rollout.steps() if isinstance(rollout, CanaryRollout) else None
    file_moved = old.file_weights() != new.file_weights()
    steps_moved = new_steps is not None and old_steps != new_steps and state.step >= 1
    if not file_moved and not steps_moved:
        return None  # e.g. a new interval or threshold: the next tick uses it
    weights = dict(weights_in_force)
    events: list[tuple[str, dict[str, Any]]] = []
    said = []
    new_weights = None
    if file_moved:
        events.append(
            (
                "weights",
                {
                    "from_": dict(weights_before) if weights_before is not None else None,
                    "to": weights,
                    "reason": "the file's weights changed in a reload during the rollout",
                },
            )
        )
        if state.phase in TICKING:
            reason = (
                "paused: the file's weights changed in a reload (resume to let the "
                "rollout set weights again)"
            )
            events.append(("pause", {"from_": state.phase, "to": "paused", "reason": reason}))
            state.paused_from, state.phase, state.reason = state.phase, "paused", reason
            state.last_decision = {"action": "pause", "reason": reason, "time": now}
            said.append(reason)
    if steps_moved and new_steps is not None:
        candidate, baseline = roles(rollout)
        state.step, state.step_at, state.holding_since = 1, now, None
        state.awaiting_promotion = False
        if state.phase == "promoting":
            state.phase = "progressing"
        if state.paused_from == "promoting":
            state.paused_from = "progressing"
        reason = (
            f"step_weights changed in a reload ({_percents(old_steps)} -> "
            f"{_percents(new_steps)}): back to step 1 of {len(new_steps)}"
        )
        target = weights
        if not file_moved:  # the file's own weights, just applied, stay while paused
            units = percent_units(new, new_steps[0])
            target = weights_with(new, weights, candidate, baseline, units)
            reason += f", {candidate} to {new_steps[0]:g}%"
            new_weights = target
        events.append(
            (
                "step",
                {
                    "from_": weights,
                    "to": target,
                    "reason": reason,
                    "values": {
                        "step": 1,
                        "weight_percent": new_steps[0],
                        "steps": new_steps,
                        "steps_before": old_steps,
                    },
                },
            )
        )
        if not file_moved:
            state.last_decision = {"action": "step", "reason": reason, "time": now}
        said.append(reason)
    return RunEdit(state, new_weights, tuple(events), tuple(said))


def _percents(steps: list[float] | None) -> str:
    return ", ".join(f"{step:g}%" for step in steps or [])
