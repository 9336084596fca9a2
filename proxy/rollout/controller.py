"""The rollout state machine: pure transitions, no I/O, no clock of its own.

The driver (`manager.py`) asks `needs()` what to measure and which hooks to call, does that I/O,
and feeds the results to `tick()`; the admin calls map to `start`, `pause`, `resume`, `promote`
and `abort`. Each returns an `Outcome`: the next `RolloutState` and the `Decision`s to carry out
(new weights, an event with its values and thresholds, a notification hook to call).

Phases: idle -> progressing -> (promoting) -> promoted, or -> rolled_back (failed checks reached
`threshold`) or aborted (a person); progressing/promoting <-> paused.

Canary: step 0 is the canary at weight 0 while the pre-rollout hooks run; step k (1..n) is the
k-th entry of `steps()`. Blue-green: step 0 is before the switch (pre-rollout hooks and
pre-switch checks against the preview), step 1 is the bake of the new active version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from proxy.config.rollout import BlueGreenRollout, CanaryRollout
from proxy.config.service import ServiceConfig
from proxy.rollout.analysis import Analysis, thresholds_of

Rollout = CanaryRollout | BlueGreenRollout
Weights = dict[str, int]

PHASES = ("idle", "progressing", "paused", "promoting", "promoted", "rolled_back", "aborted")
# Phases in which the timer runs analyses.
TICKING = frozenset({"progressing", "promoting"})
# Phases of a run that has not ended.
RUNNING = frozenset({"progressing", "paused", "promoting"})

# Blue-green has no progress_deadline field: holding (no conclusive analysis) this long during
# the bake pauses it, as a canary's default deadline would.


class TransitionRefused(Exception):
    """The call is not allowed in the current phase (the admin API's 409)."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The verdict of one webhook or pre-switch check."""

    name: str
    kind: str  # the webhook type, or "pre-switch"
    ok: bool
    status: int | None  # the last HTTP status; None when no answer came
    attempts: int
    detail: str  # why it failed; "" when it passed
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind,
            "ok": self.ok,
            "status": self.status,
            "attempts": self.attempts,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class RolloutState:
    """One service's rollout, as persisted in the state file (plain JSON values only)."""

    phase: str = "idle"
    step: int = 0
    failed_checks: int = 0
    run: int = 0  # +1 at each start: results of I/O begun in an earlier run are dropped
    started_at: float | None = None
    step_at: float | None = None  # when the current step (blue-green: the switch) began
    holding_since: float | None = None  # start of the first inconclusive interval in a row
    paused_from: str | None = None
    awaiting_promotion: bool = False  # manual promotion: the last step passed
    pre_rollout_passed: bool = False
    passes: int = 0  # passing analyses in the bake (blue-green)
    baseline_rate: float | None = None  # blue-green: the old active's success rate
    previous: str | None = None  # the version that had the traffic before the promotion
    fingerprint: str | None = None  # the candidate's role, revision and endpoints, last seen
    reason: str = ""  # why the phase is what it is (paused, rolled back, ...)
    last_analysis: dict[str, Any] | None = None
    last_decision: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutState:
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        if state.phase not in PHASES:
            state.phase = "idle"
        return state


@dataclass(frozen=True, slots=True)
class Observation:
    """What the driver measured and called for one tick."""

    now: float  # Unix time
    since: float | None = None  # start of the analysed window
    analysis: Analysis | None = None  # None: no analysis this tick
    checks: tuple[CheckResult, ...] = ()  # gating hooks (pre-rollout, rollout) and pre-switch
    confirm: tuple[CheckResult, ...] | None = None  # confirm-promotion hooks, when called
    baseline_rate: float | None = None  # blue-green: the active's recent success rate


@dataclass(frozen=True, slots=True)
class Needs:
    """The I/O a tick needs before `tick()` can decide."""

    analysis: bool = False
    hooks: tuple[str, ...] = ()  # webhook types to call, gating
    pre_switch: bool = False
    confirm: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # start, step, switch, hold, check_failed, pause, resume, promoting, promote, ...
    reason: str
    weights: Weights | None = None  # the weights to apply; None leaves them as they are
    values: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    notify: str | None = None  # a non-gating webhook type to call afterwards
    rollback: str | None = None  # counts in laneswitch_rollbacks_total with this reason


@dataclass(frozen=True, slots=True)
class Outcome:
    state: RolloutState
    decisions: tuple[Decision, ...] = ()
    again: bool = False  # run the next tick now (e.g. the promotion's confirm hooks)


# -- reading --------------------------------------------------------------------------------------


def roles(rollout: Rollout) -> tuple[str, str]:
    """(candidate, baseline): the canary and the stable, or the preview and the active."""
    if isinstance(rollout, CanaryRollout):
        return rollout.canary, rollout.stable
    return rollout.preview, rollout.active


def step_count(rollout: Rollout) -> int:
    return len(rollout.steps()) if isinstance(rollout, CanaryRollout) else 1


def progress_deadline(rollout: Rollout) -> float:
    return rollout.progress_deadline


def fingerprint(service: ServiceConfig, rollout: Rollout) -> str:
    """What identifies the release being rolled out: a change (same role) starts a new run."""
    candidate, _ = roles(rollout)
    version = service.versions[candidate]
    endpoints = ",".join(sorted(version.endpoints))
    return f"{candidate}|{version.revision or ''}|{endpoints}"


def describe_change(old: str, new: str) -> str | None:
    """What differs between two fingerprints of the same candidate, for an event's reason
    ("canary revision 2.0 -> 2.1"); None when they are the same release."""
    if old == new:
        return None
    candidate, old_revision, old_endpoints = [*old.split("|", 2), "", ""][:3]
    _, new_revision, new_endpoints = [*new.split("|", 2), "", ""][:3]
    changes = []
    if old_revision != new_revision:
        changes.append(f"revision {old_revision or '-'} -> {new_revision or '-'}")
    if old_endpoints != new_endpoints:
        changes.append(f"endpoints {old_endpoints or '-'} -> {new_endpoints or '-'}")
    return f"{candidate} {', '.join(changes) or 'changed'}"


def percent_units(service: ServiceConfig, percent: float) -> int:
    """Percent of traffic -> weight units (validation makes every step representable)."""
    return round(percent * service.weight_total / 100)


def weights_with(
    service: ServiceConfig, current: Mapping[str, int], candidate: str, baseline: str, units: int
) -> Weights:
    """`units` to the candidate, the rest of the two roles' traffic to the baseline; any other
    version keeps its weight."""
    others = {n: current.get(n, 0) for n in service.versions if n not in (candidate, baseline)}
    free = service.weight_total - sum(others.values())
    units = max(0, min(units, free))
    result = dict(others)
    result[candidate] = units
    result[baseline] = free - units
    return {name: result[name] for name in service.versions}


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
        thresholds=_thresholds(rollout),
    )
    return Outcome(_decided(new, decision, now), (decision,), again=True)


def pause(state: RolloutState, now: float, reason: str) -> Outcome:
    if state.phase not in TICKING:
        raise TransitionRefused(f"cannot pause a rollout that is {state.phase}")
    new = replace(state, phase="paused", paused_from=state.phase, reason=reason)
    decision = Decision("pause", reason)
    return Outcome(_decided(new, decision, now), (decision,))


def resume(state: RolloutState, now: float) -> Outcome:
    if state.phase != "paused":
        raise TransitionRefused(f"cannot resume a rollout that is {state.phase}")
    phase = state.paused_from or "progressing"
    new = replace(state, phase=phase, paused_from=None, holding_since=None, reason="resumed")
    decision = Decision("resume", f"resumed ({phase})")
    return Outcome(_decided(new, decision, now), (decision,), again=phase == "promoting")


def promote(state: RolloutState, rollout: Rollout, now: float) -> Outcome:
    """Skip the remaining steps (or the rest of the bake): confirm-promotion hooks next."""
    if state.phase not in ("progressing", "paused"):
        raise TransitionRefused(f"cannot promote a rollout that is {state.phase}")
    candidate, _ = roles(rollout)
    reason = f"promotion of {candidate} requested: remaining steps skipped"
    new = replace(state, phase="promoting", paused_from=None, awaiting_promotion=False)
    decision = Decision("promoting", reason)
    return Outcome(_decided(new, decision, now), (decision,), again=True)


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
    return Outcome(_decided(new, decision, now), (decision,))


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
    candidate, baseline = roles(rollout)
    if isinstance(rollout, CanaryRollout):
        percent = rollout.steps()[0]
        target = weights_with(
            service, weights, candidate, baseline, percent_units(service, percent)
        )
        new = replace(state, step=1, step_at=obs.now, holding_since=None)
        decision = Decision(
            "step",
            f"step 1 of {step_count(rollout)}: {candidate} to {percent:g}%"
            + (" (pre-rollout checks passed)" if obs.checks else ""),
            weights=target,
            values={"step": 1, "weight_percent": percent, "checks": _checks_json(obs.checks)},
            thresholds=_thresholds(rollout),
        )
        return Outcome(_decided(new, decision, obs.now), (decision,))
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
        values={"checks": _checks_json(obs.checks), "baseline_success_rate": obs.baseline_rate},
        thresholds=_thresholds(rollout),
    )
    if bake == 0 and needed == 0:
        promoting = replace(new, phase="promoting")
        return Outcome(_decided(promoting, decision, obs.now), (decision,), again=True)
    return Outcome(_decided(new, decision, obs.now), (decision,))


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
    candidate, baseline = roles(rollout)
    n = step_count(rollout)
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
            return Outcome(_decided(new, decision, obs.now), (decision,))
        decision = Decision(
            "hold",
            f"inconclusive at step {state.step} of {n}: {analysis.reason}",
            values=analysis.values,
            thresholds=analysis.thresholds,
        )
        return Outcome(_decided(state, decision, obs.now), (decision,))
    state = replace(state, holding_since=None)
    if isinstance(rollout, BlueGreenRollout):
        return _bake_passed(state, rollout, analysis, obs)
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
        return Outcome(_decided(new, decision, obs.now), (decision,))
    if rollout.promotion == "auto":
        new = replace(state, phase="promoting")
        decision = Decision(
            "promoting",
            f"last step passed ({analysis.reason}); promoting {candidate}",
            values=analysis.values,
            thresholds=analysis.thresholds,
        )
        return Outcome(_decided(new, decision, obs.now), (decision,), again=True)
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
    return Outcome(_decided(new, decision, obs.now), (decision,))


def _bake_passed(
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
        return Outcome(_decided(new, decision, obs.now), (decision,), again=True)
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
    return Outcome(_decided(state, decision, obs.now), (decision,))


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
    values = {"checks": _checks_json(obs.confirm)}
    if refused:
        decision = Decision("hold", f"promotion held: {_describe_checks(refused)}", values=values)
        return Outcome(_decided(state, decision, obs.now), (decision,))
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
    return Outcome(_decided(new, decision, obs.now), (decision,))


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
        values["checks"] = _checks_json(obs.checks)
    thresholds = dict(analysis.thresholds) if analysis is not None else _thresholds(rollout)
    thresholds["threshold"] = rollout.threshold
    if failed < rollout.threshold:
        decision = Decision(
            "check_failed",
            f"failed check {failed} of {rollout.threshold} at step {state.step}: {why}",
            values=values,
            thresholds=thresholds,
        )
        return Outcome(_decided(state, decision, obs.now), (decision,))
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
    return Outcome(_decided(new, decision, now), (decision,))


# -- helpers --------------------------------------------------------------------------------------


def _decided(state: RolloutState, decision: Decision, now: float) -> RolloutState:
    return replace(
        state, last_decision={"action": decision.action, "reason": decision.reason, "time": now}
    )


def _intervals(count: int) -> str:
    return f"{count} passing interval" + ("" if count == 1 else "s")


def _thresholds(rollout: Rollout) -> dict[str, Any]:
    thresholds = thresholds_of(rollout.metrics, rollout.min_requests)
    thresholds["threshold"] = rollout.threshold
    thresholds["interval_s"] = rollout.interval
    return thresholds


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


def _checks_json(checks: Sequence[CheckResult]) -> list[dict[str, Any]]:
    return [check.to_json() for check in checks]


def _describe_checks(failed: Sequence[CheckResult]) -> str:
    return "; ".join(f"{c.kind} {c.name!r} failed: {c.detail}" for c in failed)
