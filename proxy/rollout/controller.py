"""The rollout state machine: pure transitions, no I/O, no clock of its own.

The driver (`manager.py`) asks `needs()` what to measure and which hooks to call, does that I/O,
and feeds the results to `tick()`; the admin calls map to `start`, `pause`, `resume`, `promote`
and `abort`. Each returns an `Outcome` (`values`): the next `RolloutState` and the `Decision`s to
carry out (new weights, an event with its values and thresholds, a notification hook to call).
What a passing interval leads to is each kind's own (`canary`, `bluegreen`); failed checks,
holds, deadlines and the promotion are judged here, the same for both.

Phases: idle -> progressing -> (promoting) -> promoted, or -> rolled_back (failed checks reached
`threshold`) or aborted (a person); progressing/promoting <-> paused.

Canary: step 0 is the canary at weight 0 while the pre-rollout hooks run; step k (1..n) is the
k-th entry of `steps()`. Blue-green: step 0 is before the switch (pre-rollout hooks and
pre-switch checks against the preview), step 1 is the bake of the new active version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from proxy.config.rollout import BlueGreenRollout, CanaryRollout
from proxy.config.service import ServiceConfig
from proxy.rollout import bluegreen, canary
from proxy.rollout.analysis import Analysis
from proxy.rollout.release import (
    fingerprint,
    progress_deadline,
    roles,
    rollout_thresholds,
    step_count,
    weights_with,
)
from proxy.rollout.values import (
    RUNNING,
    TICKING,
    CheckResult,
    Decision,
    Needs,
    Observation,
    Outcome,
    Rollout,
    RolloutState,
    TransitionRefused,
    checks_json,
    decided,
)


def needs(state: RolloutState, rollout: Rollout, *, timer: bool) -> Needs:
    """What to measure and call before the next `tick()`; `timer` is False for an immediate
    tick (right after start, or on entering promotion), which judges no interval."""
    if state.phase == "progressing":
        if state.step == 0:
            hooks = () if state.pre_rollout_passed else ("pre-rollout",)
            pre_switch = isinstance(rollout, BlueGreenRollout) and bool(rollout.pre_switch)
            return Needs(hooks=hooks, pre_switch=pre_switch)
        if not timer:
            return Needs()
        return Needs(analysis=True, hooks=("rollout",))
    if state.phase == "promoting":
        return Needs(analysis=timer, hooks=("rollout",) if timer else (), confirm=True)
    return Needs()


# -- the admin calls ------------------------------------------------------------------------------


def start(
    state: RolloutState,
    rollout: Rollout,
    service: ServiceConfig,
    weights: Mapping[str, int],
    now: float,
    *,
    reason: str,
    restart: bool = False,
) -> Outcome:
    """A new run: the candidate back to weight 0, pre-rollout checks next (`again`).

    Refused while a run is going on (unless `restart`: the release changed under it) and when
    the candidate already carries all the traffic (there would be nothing to roll out from).
    """
    candidate, baseline = roles(rollout)
    superseded = state.phase in RUNNING
    if superseded and not restart:
        raise TransitionRefused(f"a rollout is already {state.phase}; abort it first")
    # A run that put all the traffic on its candidate (a last step of 100 %) is replaced, not
    # refused: the new release of that candidate has earned none of it.
    full = weights.get(candidate, 0) == service.weight_total and weights.get(baseline, 0) == 0
    if full and not superseded:
        raise TransitionRefused(
            f"{candidate} already has all the traffic: roll back to {baseline} first, or swap "
            f"the roles in the config to roll out the next release"
        )
    target = weights_with(service, weights, candidate, baseline, 0)
    new = RolloutState(
        phase="progressing",
        run=state.run + 1,
        started_at=now,
        step_at=now,
        fingerprint=fingerprint(service, rollout),
        previous=state.previous,
        reason=reason,
    )
    kind = "blue-green" if isinstance(rollout, BlueGreenRollout) else "canary"
    values: dict[str, Any] = {}
    why = f"{kind} rollout of {candidate} started: {reason}"
    if superseded:
        # The old run is not resumed anywhere: the record says which one this replaces.
        values["superseded"] = {"run": state.run, "phase": state.phase, "step": state.step}
        why += f"; run {state.run} ({state.phase} at step {state.step}) superseded"
    decision = Decision(
        "start",
        why,
        weights=target if dict(weights) != target else None,
        values=values,
        thresholds=rollout_thresholds(rollout),
    )
    return Outcome(decided(new, decision, now), (decision,), again=True)


def pause(state: RolloutState, now: float, reason: str) -> Outcome:
    if state.phase not in TICKING:
        raise TransitionRefused(f"cannot pause a rollout that is {state.phase}")
    new = replace(state, phase="paused", paused_from=state.phase, reason=reason)
    decision = Decision("pause", reason)
    return Outcome(decided(new, decision, now), (decision,))


def resume(state: RolloutState, now: float) -> Outcome:
    if state.phase != "paused":
        raise TransitionRefused(f"cannot resume a rollout that is {state.phase}")
    phase = state.paused_from or "progressing"
    new = replace(state, phase=phase, paused_from=None, holding_since=None, reason="resumed")
    decision = Decision("resume", f"resumed ({phase})")
    return Outcome(decided(new, decision, now), (decision,), again=phase == "promoting")


def promote(state: RolloutState, rollout: Rollout, now: float) -> Outcome:
    """Skip the remaining steps (or the rest of the bake): confirm-promotion hooks next."""
    if state.phase not in ("progressing", "paused"):
        raise TransitionRefused(f"cannot promote a rollout that is {state.phase}")
    candidate, _ = roles(rollout)
    reason = f"promotion of {candidate} requested: remaining steps skipped"
    new = replace(state, phase="promoting", paused_from=None, awaiting_promotion=False)
    decision = Decision("promoting", reason)
    return Outcome(decided(new, decision, now), (decision,), again=True)


def abort(
    state: RolloutState,
    rollout: Rollout,
    service: ServiceConfig,
    weights: Mapping[str, int],
    now: float,
    reason: str,
) -> Outcome:
    """A person stops the run: all of the two roles' traffic back to the baseline."""
    if state.phase not in RUNNING:
        raise TransitionRefused(f"cannot abort a rollout that is {state.phase}")
    candidate, baseline = roles(rollout)
    target = weights_with(service, weights, candidate, baseline, 0)
    new = replace(state, phase="aborted", paused_from=None, reason=reason)
    decision = Decision(
        "abort",
        f"{reason}: all traffic back to {baseline}",
        weights=target,
        notify="rollback",
        rollback="abort",
    )
    return Outcome(decided(new, decision, now), (decision,))


# -- the timer ------------------------------------------------------------------------------------


def tick(
    state: RolloutState,
    rollout: Rollout,
    service: ServiceConfig,
    weights: Mapping[str, int],
    obs: Observation,
) -> Outcome:
    """One decision from what was measured; a no-op in a phase that does not tick."""
    if state.phase == "progressing":
        if state.step == 0:
            return _before_traffic(state, rollout, service, weights, obs)
        return _judge_step(state, rollout, service, weights, obs)
    if state.phase == "promoting":
        return _promotion(state, rollout, service, weights, obs)
    return Outcome(state)


def _before_traffic(
    state: RolloutState,
    rollout: Rollout,
    service: ServiceConfig,
    weights: Mapping[str, int],
    obs: Observation,
) -> Outcome:
    """Step 0: the pre-rollout hooks (and blue-green's pre-switch checks) must pass."""
    failed = [check for check in obs.checks if not check.ok]
    pre_rollout_ok = not [c for c in failed if c.kind == "pre-rollout"]
    state = replace(state, pre_rollout_passed=state.pre_rollout_passed or pre_rollout_ok)
    if failed:
        return _failed_check(state, rollout, service, weights, obs, _describe_checks(failed))
    if isinstance(rollout, CanaryRollout):
        return canary.first_step(state, rollout, service, weights, obs)
    return bluegreen.switch(state, rollout, service, weights, obs)


def _judge_step(
    state: RolloutState,
    rollout: Rollout,
    service: ServiceConfig,
    weights: Mapping[str, int],
    obs: Observation,
) -> Outcome:
    analysis = obs.analysis
    if analysis is None:
        return Outcome(state)
    state = replace(state, last_analysis={"time": obs.now, **analysis.to_json()})
    failure = _failure(analysis, obs.checks)
    if failure is not None:
        return _failed_check(state, rollout, service, weights, obs, failure)
    if analysis.verdict == "inconclusive":
        since = state.holding_since
        if since is None:
            since = obs.since if obs.since is not None else obs.now
        state = replace(state, holding_since=since)
        deadline = progress_deadline(rollout)
        held = obs.now - since
        if held >= deadline - 1e-6:
            reason = (
                f"no conclusive analysis for {held:.0f}s (progress deadline {deadline:g}s): "
                f"{analysis.reason}"
            )
            if rollout.progress_deadline_action == "rollback":
                # Holding would leave an unproven version its weight indefinitely; a version
                # that stopped answering looks inconclusive when its clients give up first.
                return _roll_back(
                    state,
                    rollout,
                    service,
                    weights,
                    obs.now,
                    reason,
                    dict(analysis.values),
                    dict(analysis.thresholds),
                    "progress_deadline",
                )
            reason += "; waiting for a person (resume, promote or abort)"
            new = replace(state, phase="paused", paused_from="progressing", reason=reason)
            decision = Decision(
                "pause", reason, values=analysis.values, thresholds=analysis.thresholds
            )
            return Outcome(decided(new, decision, obs.now), (decision,))
        decision = Decision(
            "hold",
            f"inconclusive at step {state.step} of {step_count(rollout)}: {analysis.reason}",
            values=analysis.values,
            thresholds=analysis.thresholds,
        )
        return Outcome(decided(state, decision, obs.now), (decision,))
    state = replace(state, holding_since=None)
    if isinstance(rollout, BlueGreenRollout):
        return bluegreen.bake_passed(state, rollout, analysis, obs)
    return canary.step_passed(state, rollout, service, weights, analysis, obs)


def _promotion(
    state: RolloutState,
    rollout: Rollout,
    service: ServiceConfig,
    weights: Mapping[str, int],
    obs: Observation,
) -> Outcome:
    analysis = obs.analysis
    if analysis is not None:
        state = replace(state, last_analysis={"time": obs.now, **analysis.to_json()})
    failure = _failure(analysis, obs.checks)
    if failure is not None:
        return _failed_check(state, rollout, service, weights, obs, failure)
    if obs.confirm is None:
        return Outcome(state)
    refused = [check for check in obs.confirm if not check.ok]
    values = {"checks": checks_json(obs.confirm)}
    if refused:
        decision = Decision("hold", f"promotion held: {_describe_checks(refused)}", values=values)
        return Outcome(decided(state, decision, obs.now), (decision,))
    candidate, baseline = roles(rollout)
    target = weights_with(service, weights, candidate, baseline, service.weight_total)
    new = replace(
        state,
        phase="promoted",
        previous=baseline,
        awaiting_promotion=False,
        reason=f"{candidate} promoted",
    )
    decision = Decision(
        "promote",
        f"all traffic to {candidate}"
        + (" (confirm-promotion hooks passed)" if obs.confirm else ""),
        weights=target,
        values=values if obs.confirm else {},
        notify="post-rollout",
    )
    return Outcome(decided(new, decision, obs.now), (decision,))


def rolls_back_on(state: RolloutState, rollout: Rollout, analysis: Analysis | None) -> bool:
    """Whether this analysis alone ends the run (its failed check reaches `threshold`): the
    driver then calls no gating hook, since no hook's answer could change the decision and a
    rollback must never wait for one."""
    return (
        analysis is not None
        and analysis.verdict == "fail"
        and state.failed_checks + 1 >= rollout.threshold
    )


def _failed_check(
    state: RolloutState,
    rollout: Rollout,
    service: ServiceConfig,
    weights: Mapping[str, int],
    obs: Observation,
    why: str,
) -> Outcome:
    """One more failed check; at `threshold`, back to the baseline at once, no retry."""
    failed = state.failed_checks + 1
    state = replace(state, failed_checks=failed, holding_since=None)
    analysis = obs.analysis
    values: dict[str, Any] = dict(analysis.values) if analysis is not None else {}
    values["failed_checks"] = failed
    if obs.checks:
        values["checks"] = checks_json(obs.checks)
    thresholds = dict(analysis.thresholds) if analysis is not None else rollout_thresholds(rollout)
    thresholds["threshold"] = rollout.threshold
    if failed < rollout.threshold:
        decision = Decision(
            "check_failed",
            f"failed check {failed} of {rollout.threshold} at step {state.step}: {why}",
            values=values,
            thresholds=thresholds,
        )
        return Outcome(decided(state, decision, obs.now), (decision,))
    reason = f"{failed} failed checks (threshold {rollout.threshold}): {why}"
    return _roll_back(
        state, rollout, service, weights, obs.now, reason, values, thresholds, "failed_checks"
    )


def _roll_back(
    state: RolloutState,
    rollout: Rollout,
    service: ServiceConfig,
    weights: Mapping[str, int],
    now: float,
    reason: str,
    values: dict[str, Any],
    thresholds: dict[str, Any],
    kind: str,
) -> Outcome:
    """The run ends: the candidate back to weight 0 at once, phase rolled_back, no retry.
    `kind` is the reason label of laneswitch_rollbacks_total."""
    candidate, baseline = roles(rollout)
    target = weights_with(service, weights, candidate, baseline, 0)
    new = replace(state, phase="rolled_back", reason=reason, awaiting_promotion=False)
    decision = Decision(
        "rollback",
        f"all traffic back to {baseline}: {reason}",
        weights=target,
        values=values,
        thresholds=thresholds,
        notify="rollback",
        rollback=kind,
    )
    return Outcome(decided(new, decision, now), (decision,))


# -- helpers --------------------------------------------------------------------------------------


def _failure(analysis: Analysis | None, checks: Sequence[CheckResult]) -> str | None:
    """Why an interval counts as a failed check (the analysis failed, a gating hook or a
    pre-switch check failed), or None when it does not."""
    why = []
    if analysis is not None and analysis.verdict == "fail":
        why.append(f"analysis failed: {analysis.reason}")
    failed = [check for check in checks if not check.ok]
    if failed:
        why.append(_describe_checks(failed))
    return "; ".join(why) or None


def _describe_checks(failed: Sequence[CheckResult]) -> str:
    return "; ".join(f"{c.kind} {c.name!r} failed: {c.detail}" for c in failed)
