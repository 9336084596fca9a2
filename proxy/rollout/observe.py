"""What a rollout tick measures and calls before its decision: windows, hooks, checks.

Each service's analysis window runs from its mark (the start of a step, or the last analysis)
to now, over the proxy's own counters, or in a fleet the members' summed counters (the
backend's). The gating webhooks and blue-green's pre-switch checks are called here too, outside
every lock, each bounded by the interval.
"""

from __future__ import annotations

import time

from proxy.config.rollout import BlueGreenRollout
from proxy.config.service import ServiceConfig
from proxy.metrics import StatsSnapshot
from proxy.rollout import controller
from proxy.rollout.analysis import Analysis, Measured, analyse
from proxy.rollout.port import ControlPort
from proxy.rollout.release import roles
from proxy.rollout.values import CheckResult, Needs, Observation, Rollout, RolloutState
from proxy.rollout.webhooks import base_payload, bounded_hooks, pre_switch_checks


class AnalysisWindows:
    """Every service's analysis window."""

    def __init__(self, control: ControlPort) -> None:
        self.control = control
        # Start of the window the next analysis judges: (Unix time, candidate's counters,
        # baseline's counters).
        self._marks: dict[str, tuple[float, StatsSnapshot, StatsSnapshot]] = {}

    async def analyse(
        self, service: str, rollout: Rollout, state: RolloutState
    ) -> tuple[float, Analysis]:
        """The verdict on `service`'s window since its mark (and the window's start); the
        next window starts now."""
        candidate, baseline = roles(rollout)
        fleet = await self.control.backend.window(service, (candidate, baseline))
        if fleet is not None:  # the fleet's summed counters
            since, (candidate_window, baseline_window) = fleet
        else:
            stats = self.control.stats
            now_candidate = stats.peek(service, candidate).snapshot()
            now_baseline = stats.peek(service, baseline).snapshot()
            since, then_candidate, then_baseline = self._marks.get(
                service, (time.time(), now_candidate, now_baseline)
            )
            self._marks[service] = (time.time(), now_candidate, now_baseline)
            candidate_window = now_candidate - then_candidate
            baseline_window = now_baseline - then_baseline
        baseline_rate = None
        if isinstance(rollout, BlueGreenRollout) and state.step >= 1:
            baseline_rate = state.baseline_rate
        analysis = analyse(
            Measured.of(candidate_window),
            Measured.of(baseline_window),
            rollout.metrics,
            rollout.min_requests,
            baseline_rate=baseline_rate,
        )
        return since, analysis

    def mark(self, service: str) -> None:
        """`service`'s next window starts now."""
        rollout = self.control.config.services[service].rollout
        if rollout is None:
            return
        candidate, baseline = roles(rollout)
        stats = self.control.stats
        self.control.backend.mark(service)
        self._marks[service] = (
            time.time(),
            stats.peek(service, candidate).snapshot(),
            stats.peek(service, baseline).snapshot(),
        )


async def observe(
    control: ControlPort,
    windows: AnalysisWindows,
    service: str,
    config: ServiceConfig,
    state: RolloutState,
    needs: Needs,
) -> Observation:
    """The I/O a tick of `state` needs. Its `now` is the time it began: the caller sets the
    decision's own when it takes it."""
    rollout = config.rollout
    assert rollout is not None
    candidate, baseline = roles(rollout)
    began = time.time()
    since: float | None = None
    analysis = None
    if needs.analysis:
        since, analysis = await windows.analyse(service, rollout, state)
    base = base_payload(service, config, rollout, state, control.share(service, candidate))
    checks: list[CheckResult] = []
    confirm: list[CheckResult] | None = None
    if not controller.rolls_back_on(state, rollout, analysis):
        # Every gating call is bounded by the interval, whatever the hooks' own timeouts
        # and retries add up to: a hook that never answers delays a decision by one
        # interval at most, and counts as a failed check.
        bound = rollout.interval
        for kind in needs.hooks:
            checks += await bounded_hooks(rollout.webhooks, kind, base, bound)
        if needs.pre_switch and isinstance(rollout, BlueGreenRollout):
            endpoints = config.versions[candidate].endpoints
            checks += await pre_switch_checks(rollout.pre_switch, endpoints)
        if needs.confirm:
            confirm = await bounded_hooks(rollout.webhooks, "confirm-promotion", base, bound)
    baseline_rate = None
    if isinstance(rollout, BlueGreenRollout) and state.step == 0:
        baseline_rate = Measured.of(control.window.delta(service, baseline)).success_rate
    return Observation(
        now=began,
        since=since,
        analysis=analysis,
        checks=tuple(checks),
        confirm=tuple(confirm) if confirm is not None else None,
        baseline_rate=baseline_rate,
    )
