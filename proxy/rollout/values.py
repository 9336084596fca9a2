"""A rollout's values: a run's persisted state, what a tick observed, and what it decided.

Plain data, no behaviour beyond (de)serialising: the state machine (`controller`) and the
driver (`manager`) pass these between them, and the state file and the fleet's store hold
`RolloutState.to_json()`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from proxy.config.rollout import BlueGreenRollout, CanaryRollout
from proxy.rollout.analysis import Analysis

Rollout = CanaryRollout | BlueGreenRollout
Weights = dict[str, int]

PHASES = ("idle", "progressing", "paused", "promoting", "promoted", "rolled_back", "aborted")
# Phases in which the timer runs analyses.
TICKING = frozenset({"progressing", "promoting"})
# Phases of a run that has not ended.
RUNNING = frozenset({"progressing", "paused", "promoting"})


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


def decided(state: RolloutState, decision: Decision, now: float) -> RolloutState:
    """`state` with `decision` as its last one (GET /status shows it)."""
    return replace(
        state, last_decision={"action": decision.action, "reason": decision.reason, "time": now}
    )


def checks_json(checks: Sequence[CheckResult]) -> list[dict[str, Any]]:
    """The checks as an event's values hold them."""
    return [check.to_json() for check in checks]
