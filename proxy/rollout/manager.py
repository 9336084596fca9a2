"""The rollout driver: one task per service with a running rollout, beside the control plane.

Each `interval` it takes the window of the proxy's own counters since the last analysis, calls
the gating webhooks (and blue-green's pre-switch checks), asks the pure controller, and carries
out its decisions through the control plane: the same lock, table install, acknowledgement,
event and state-file write as a switch. Webhook and pre-switch I/O happens outside every lock, so
a person's `pause` or `abort` never waits for a slow hook; a result that comes back after the
rollout changed under it is dropped.

The manager owns every run's state, as plain JSON: the control plane saves it with the rest of
the runtime state (`saved`, `load`, `adopt`), so the state file carries it and a restart resumes
the phase and step it stopped at. It sees the control plane only through `port.ControlPort`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Collection, Mapping
from typing import Any

from proxy.config.model import Config
from proxy.config.rollout import BlueGreenRollout, CanaryRollout
from proxy.config.service import ServiceConfig
from proxy.errors import ControlError
from proxy.jsonfields import Unreadable, known_fields
from proxy.metrics import StatsSnapshot
from proxy.rollout import controller, release
from proxy.rollout.analysis import Measured, analyse, thresholds_of
from proxy.rollout.port import ControlPort
from proxy.rollout.release import roles
from proxy.rollout.values import (
    RUNNING,
    TICKING,
    CheckResult,
    Observation,
    Outcome,
    Rollout,
    RolloutState,
    TransitionRefused,
    Weights,
)
from proxy.rollout.webhooks import bounded_hooks, call_webhooks, pre_switch_checks

log = logging.getLogger("laneswitch.rollout")

ACTIONS = ("start", "pause", "resume", "promote", "abort")

# Immediate ticks in a row (start -> step 1, last step -> promotion): a bound, not a tuning knob;
# the state machine never asks for more than two.
MAX_IMMEDIATE_TICKS = 4


class RolloutManager:
    """Runs every service's rollout; `ControlPlane.rollouts`."""

    def __init__(self, control: ControlPort) -> None:
        self.control = control
        self._runs: dict[str, dict[str, Any]] = {}  # per service, as RolloutState.to_json()
        self.rollbacks: Counter[tuple[str, str]] = Counter()  # (service, reason) -> count
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Start of the window the next analysis judges: (Unix time, candidate's counters,
        # baseline's counters).
        self._marks: dict[str, tuple[float, StatsSnapshot, StatsSnapshot]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False  # the graceful stop began: no timer runs again

    # -- reading ----------------------------------------------------------------------------------

    def state(self, service: str) -> RolloutState:
        return RolloutState.from_json(self._runs.get(service, {}))

    def status(self, service: str) -> dict[str, Any] | None:
        """The rollout part of GET /status; None without a rollout block."""
        config = self.control.config.services[service]
        rollout = config.rollout
        if rollout is None:
            return None
        state = self.state(service)
        candidate, baseline = roles(rollout)
        result: dict[str, Any] = {
            "strategy": rollout.strategy,
            "phase": state.phase,
            "candidate": candidate,
            "baseline": baseline,
            "step": state.step,
            "steps": release.step_count(rollout),
            "weight": round(self.control.share(service, candidate), 4),
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

    def rollback_target(self, service: str) -> str | None:
        """After a promotion, the version that had the traffic before it."""
        state = self.state(service)
        versions = self.control.config.services[service].versions
        if state.phase == "promoted" and state.previous in versions:
            return state.previous
        return None

    # -- the admin calls --------------------------------------------------------------------------

    async def command(self, service: str, action: str, *, actor: str = "admin") -> dict[str, Any]:
        """start | pause | resume | promote | abort; the rollout's status after it.

        ControlError 404 for an unknown service or one without a rollout block, 409 when the
        phase does not allow the call.
        """
        config = self.control.config.services.get(service)
        if config is None:
            raise ControlError(404, f"no service {service!r}")
        rollout = config.rollout
        if rollout is None:
            raise ControlError(404, f"service {service!r} has no rollout block")
        if action not in ACTIONS:
            raise ControlError(404, f"no rollout action {action!r}")
        self.control.check_writable()
        try:
            if action == "start":
                await self.start(service, actor=actor, reason=f"started by {actor}")
            else:
                await self._transition(service, action, actor)
        except TransitionRefused as exc:
            raise ControlError(409, str(exc)) from None
        status = self.status(service)
        assert status is not None
        return status

    async def start(self, service: str, *, actor: str, reason: str, restart: bool = False) -> None:
        """A new run (TransitionRefused when one is going on, unless `restart`)."""
        async with self._lock(service):
            config, rollout = self._config(service)
            state = self.state(service)
            outcome = controller.start(
                state,
                rollout,
                config,
                self.control.weights[service],
                time.time(),
                reason=reason,
                restart=restart,
            )
            self._stop_task(service)
            await self._carry_out(service, state, outcome, actor)
            self._run(service, immediate=outcome.again)

    async def _transition(self, service: str, action: str, actor: str) -> None:
        async with self._lock(service):
            config, rollout = self._config(service)
            state = self.state(service)
            now = time.time()
            if action == "pause":
                outcome = controller.pause(state, now, f"paused by {actor}")
            elif action == "resume":
                outcome = controller.resume(state, now)
            elif action == "promote":
                outcome = controller.promote(state, rollout, now)
            else:
                weights = self.control.weights[service]
                outcome = controller.abort(
                    state, rollout, config, weights, now, f"aborted by {actor}"
                )
            self._stop_task(service)
            await self._carry_out(service, state, outcome, actor)
            if outcome.state.phase in TICKING:
                self._run(service, immediate=outcome.again)

    async def before_manual_change(self, service: str, action: str, actor: str) -> None:
        """A person sets weights by hand during a rollout: pause it, so it does not undo them."""
        rollout = self.control.config.services[service].rollout
        if rollout is None or self.state(service).phase not in TICKING:
            return
        async with self._lock(service):
            state = self.state(service)
            if state.phase not in TICKING:
                return
            reason = f"paused: {action} by {actor} (resume to let the rollout set weights again)"
            outcome = controller.pause(state, time.time(), reason)
            self._stop_task(service)
            await self._carry_out(service, state, outcome, actor)

    async def start_release(self, service: str, reason: str) -> None:
        """The config changed the release under a rollout (a reload, or an edit made while
        the proxy was down): a new run from weight 0, actor "config"."""
        try:
            await self.start(service, actor="config", reason=reason, restart=True)
        except TransitionRefused as exc:
            log.warning("%s: rollout not started: %s", service, exc)
            self.control.events.record(
                "config", "start_refused", service, reason=f"{reason}: {exc}"
            )
            await self.control.save()

    async def before_rollback(self, service: str, actor: str) -> None:
        """`rollback` by a person is counted, and ends a running (or promoted) rollout:
        phase rolled_back."""
        self.rollbacks[(service, "manual")] += 1
        rollout = self.control.config.services[service].rollout
        if rollout is None:
            return
        async with self._lock(service):
            state = self.state(service)
            if state.phase not in RUNNING and state.phase != "promoted":
                return
            self._stop_task(service)
            state.phase = "rolled_back"
            state.reason = f"rolled back by {actor}"
            state.paused_from = None
            self._store(service, state)  # saved with the rollback's own event

    # -- the runs' state, saved by the control plane --------------------------------------------

    def saved(self) -> dict[str, dict[str, Any]]:
        """The runs as plain JSON, per service (the state file's and the fleet's `rollouts`)."""
        return self._runs

    def load(self, saved: Mapping[str, Any]) -> int:
        """The runs of a state file; returns how many entries were unreadable and skipped."""
        self._runs = {}
        skipped = 0
        for name, entry in saved.items():
            try:
                # Only the fields this version knows, each of its type (see RolloutState).
                self._runs[name] = known_fields(RolloutState, entry)
            except Unreadable as exc:
                skipped += 1
                log.warning("state file: rollouts.%s skipped: %s", name, exc)
        return skipped

    def adopt(self, runs: Mapping[str, Any], behind: Collection[str]) -> dict[str, Any]:
        """The fleet's runs of this config's services, but for those `behind` (this member's
        config cannot take the fleet's state for them: they keep their own); returns the runs
        as they were before."""
        before = self._runs
        services = self.control.config.services
        adopted = {
            name: dict(value)
            for name, value in runs.items()
            if name in services and name not in behind and isinstance(value, dict)
        }
        for name in behind:
            if name in before:
                adopted[name] = before[name]
        self._runs = adopted
        return before

    # -- lifecycle --------------------------------------------------------------------------------

    async def restored(self) -> None:
        """After a restart: drop states of rollouts the config no longer has; resume the
        ticking ones at their step (the weights came back with the state file). A run whose
        candidate got a new revision or endpoints while the proxy was down is superseded by a
        new run from weight 0, exactly as a reload would start one (SPEC §6): the saved step's
        weight was earned by the old build, never by this one."""
        services = self.control.config.services
        for name in list(self._runs):
            if name not in services or services[name].rollout is None:
                del self._runs[name]
        superseded: list[tuple[str, str]] = []
        for name, service in services.items():
            rollout = service.rollout
            state = self.state(name)
            if rollout is None or state.phase not in RUNNING or state.fingerprint is None:
                continue
            # The file's roles changed while the proxy was down: resuming would move traffic
            # between versions in roles nobody started a rollout for. A reload aborts such a
            # run (`config_changed`); a restart must not do otherwise.
            if state.fingerprint.split("|", 1)[0] != roles(rollout)[0]:
                state.phase = "aborted"
                state.paused_from = None
                state.reason = "the rollout's roles changed while the proxy was down"
                self._store(name, state)
                log.warning("%s: %s", name, state.reason)
                continue
            change = release.describe_change(
                state.fingerprint, release.fingerprint(service, rollout)
            )
            if change is not None:
                superseded.append((name, f"{change} while the proxy was down"))
        for name, reason in superseded:
            if not self.control.backend.deciding():
                continue  # a fleet member: the fleet's state, not this file, has the run
            log.warning("%s: %s: a new rollout starts from weight 0", name, reason)
            await self.start_release(name, reason)
        restarted = {name for name, _ in superseded}
        for name, service in services.items():
            if name in restarted:
                continue
            if service.rollout is not None and self.state(name).phase in TICKING:
                log.info("%s: resuming the rollout (%s)", name, self.state(name).phase)
                self._run(name, immediate=False)

    def fleet_changed(self, before: Mapping[str, Any] | None = None) -> None:
        """The fleet's state was applied (`before`: the rollout states it replaced) or this
        member's leadership changed (None): the ticking rollouts' timers run here if this
        member decides, nowhere else. A run whose state another member changed restarts its
        interval; one it did not change keeps its timer."""
        deciding = self.control.backend.deciding()
        for name, service in self.control.config.services.items():
            state = self.state(name)
            if service.rollout is None or state.phase not in TICKING or not deciding:
                self._stop_task(name)
                continue
            changed = before is not None and before.get(name) != self._runs.get(name)
            if name not in self._tasks or changed:
                # Step 0 (hooks before any traffic) goes on at once; a step holds its interval.
                self._run(name, immediate=state.step == 0)

    def config_changed(
        self, old: Config, new: Config, weights_before: Mapping[str, Weights]
    ) -> list[tuple[str, str]]:
        """A reload was adopted (`weights_before`: the weights in force until then): stop rollouts
        whose block went away, carry edits of a running release's weights or steps into its
        run, and name the services whose candidate got a new revision or endpoints (the caller
        starts them, with the reason, once the control plane's lock is released)."""
        starts: list[tuple[str, str]] = []
        for name in list(self._runs):
            service = new.services.get(name)
            if service is None or service.rollout is None:
                self._stop_task(name)
                del self._runs[name]
        for name, service in new.services.items():
            rollout = service.rollout
            before = old.services.get(name)
            if rollout is None or before is None or before.rollout is None:
                continue
            if roles(before.rollout) != roles(rollout) or before.rollout.strategy != (
                rollout.strategy
            ):
                state = self.state(name)
                if state.phase in RUNNING:
                    self._stop_task(name)
                    state.phase = "aborted"
                    state.reason = "the rollout's roles changed in a reload"
                    self._store(name, state)
                continue
            change = release.describe_change(
                release.fingerprint(before, before.rollout),
                release.fingerprint(service, rollout),
            )
            if change is not None:
                starts.append((name, f"{change} in the config"))
            elif self.control.backend.deciding():  # in a fleet, the leader's run is the one
                self._edited_during_run(name, weights_before.get(name), before, service)
        return starts

    def _edited_during_run(
        self,
        name: str,
        weights_before: Mapping[str, int] | None,
        old: ServiceConfig,
        new: ServiceConfig,
    ) -> None:
        """A reload edited the file's weights or the canary's steps of a run that goes on
        (same release). Neither is left for the next tick to undo or misread:
        - new file weights are a person's change, like a `weights` call: they apply and the
          run pauses, so its next step does not override them (`resume` hands back);
        - new steps send the run back to step 1 of them, as Argo Rollouts restarts its steps
          when they change: a shortened list never skips to a promotion the canary did not
          reach, a longer one never skips a weight."""
        state = self.state(name)
        rollout = new.rollout
        if rollout is None or state.phase not in RUNNING:
            return
        old_steps = old.rollout.steps() if isinstance(old.rollout, CanaryRollout) else None
        new_steps = rollout.steps() if isinstance(rollout, CanaryRollout) else None
        file_moved = old.file_weights() != new.file_weights()
        steps_moved = new_steps is not None and old_steps != new_steps and state.step >= 1
        if not file_moved and not steps_moved:
            return  # e.g. a new interval or threshold: the next tick uses it
        now = time.time()
        weights = dict(self.control.weights[name])
        record = self.control.events.record
        said = []
        if file_moved:
            record(
                "config",
                "weights",
                name,
                from_=dict(weights_before) if weights_before is not None else None,
                to=weights,
                reason="the file's weights changed in a reload during the rollout",
            )
            if state.phase in TICKING:
                reason = (
                    "paused: the file's weights changed in a reload (resume to let the "
                    "rollout set weights again)"
                )
                record("config", "pause", name, from_=state.phase, to="paused", reason=reason)
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
                units = release.percent_units(new, new_steps[0])
                target = release.weights_with(new, weights, candidate, baseline, units)
                reason += f", {candidate} to {new_steps[0]:g}%"
                self.control.weights[name] = target
            record(
                "config",
                "step",
                name,
                from_=weights,
                to=target,
                reason=reason,
                values={
                    "step": 1,
                    "weight_percent": new_steps[0],
                    "steps": new_steps,
                    "steps_before": old_steps,
                },
            )
            if not file_moved:
                state.last_decision = {"action": "step", "reason": reason, "time": now}
            said.append(reason)
        self._store(name, state)
        log.warning("%s: %s", name, "; ".join(said) or "the file's weights changed")
        # The interval starts again at what is in force now (the caller installs it).
        self._stop_task(name)
        if state.phase in TICKING:
            self._run(name, immediate=False)

    async def shutdown(self) -> None:
        """Stop every timer for good. A tick's decision is carried out under its service's
        lock, so taking the lock first lets one in progress finish instead of cancelling it
        between its weights and its event."""
        self._closed = True
        for name in list(self._tasks):
            async with self._lock(name):
                self._stop_task(name)

    def close(self) -> None:
        self._closed = True
        for name in list(self._tasks):
            self._stop_task(name)
        for task in list(self._background):
            task.cancel()
        self._background.clear()

    # -- the timer --------------------------------------------------------------------------------

    def _run(self, service: str, *, immediate: bool) -> None:
        """(Re)start the service's timer task; the window starts now."""
        self._stop_task(service)
        if self._closed or not self.control.backend.deciding():
            return  # in a fleet, only the leader runs the timers
        self._mark(service)
        task = asyncio.get_running_loop().create_task(
            self._loop(service, immediate), name=f"rollout-{service}"
        )
        self._tasks[service] = task

    def _stop_task(self, service: str) -> None:
        task = self._tasks.pop(service, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _loop(self, service: str, immediate: bool) -> None:
        again = immediate
        try:
            while True:  # until the phase stops ticking (_drive returns None)
                if not again:
                    rollout = self.control.config.services.get(service)
                    if rollout is None or rollout.rollout is None:
                        return
                    await asyncio.sleep(rollout.rollout.interval)
                for _ in range(MAX_IMMEDIATE_TICKS):
                    result = await self._drive(service, timer=not again)
                    if result is None:
                        return
                    again = result
                    if not again:
                        break
                again = False
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: the rollout timer failed", service)
        finally:
            if self._tasks.get(service) is asyncio.current_task():
                del self._tasks[service]

    async def _drive(self, service: str, *, timer: bool) -> bool | None:
        """One tick: I/O, then the decision. True: tick again now; False: at the next
        interval; None: the phase no longer ticks."""
        service_config = self.control.config.services.get(service)
        if service_config is None or service_config.rollout is None:
            return None
        rollout = service_config.rollout
        state = self.state(service)
        if state.phase not in TICKING:
            return None
        needs = controller.needs(state, rollout, timer=timer)
        candidate, baseline = roles(rollout)
        since: float | None = None
        analysis = None
        if needs.analysis:
            since, analysis = await self._analyse(service, rollout, state)
        base = self._payload(service, service_config, rollout, state)
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
                endpoints = service_config.versions[candidate].endpoints
                checks += await pre_switch_checks(rollout.pre_switch, endpoints)
            if needs.confirm:
                confirm = await bounded_hooks(rollout.webhooks, "confirm-promotion", base, bound)
        baseline_rate = None
        if isinstance(rollout, BlueGreenRollout) and state.step == 0:
            baseline_rate = Measured.of(self.control.window.delta(service, baseline)).success_rate
        async with self._lock(service):
            now_config = self.control.config.services.get(service)
            current = self.state(service)
            if (
                now_config is None
                or now_config.rollout is None
                or (current.run, current.phase, current.step)
                != (state.run, state.phase, state.step)
            ):
                return None  # changed under us: whoever changed it runs the rollout now
            if not self.control.backend.deciding():
                return None  # lost the fleet's lease during the I/O: the next leader decides
            for check in [*checks, *(confirm or [])]:
                self._record_check(service, check)
            observation = Observation(
                now=time.time(),
                since=since,
                analysis=analysis,
                checks=tuple(checks),
                confirm=tuple(confirm) if confirm is not None else None,
                baseline_rate=baseline_rate,
            )
            outcome = controller.tick(
                current, now_config.rollout, now_config, self.control.weights[service], observation
            )
            await self._carry_out(service, current, outcome, "auto")
        if outcome.again:
            return True
        return False if outcome.state.phase in TICKING else None

    async def _analyse(
        self, service: str, rollout: Rollout, state: RolloutState
    ) -> tuple[float, Any]:
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

    def _mark(self, service: str) -> None:
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

    # -- carrying decisions out -------------------------------------------------------------------

    async def _carry_out(
        self, service: str, before: RolloutState, outcome: Outcome, actor: str
    ) -> None:
        """Apply each decision with the new state (state, weights, event, state file), or
        without one, store the new state alone (it moves no traffic)."""
        if not outcome.decisions:
            self._store(service, outcome.state)
            return
        phases = (before.phase, outcome.state.phase)
        decided_from = before

        def commit() -> bool:
            # Under the control plane's lock: the run must still be the one decided on.
            if self.state(service) != decided_from:
                return False
            self._store(service, outcome.state)
            return True

        for decision in outcome.decisions:
            applied = await self.control.apply_rollout(
                service,
                decision.weights,
                actor=actor,
                action=decision.action,
                reason=decision.reason,
                values=decision.values,
                thresholds=decision.thresholds,
                phases=phases,
                commit=commit,
            )
            if not applied:
                return
            decided_from = outcome.state
            if decision.weights is not None:
                self._mark(service)
            if decision.rollback is not None:
                self.rollbacks[(service, decision.rollback)] += 1
            if decision.notify is not None:
                self._notify(service, decision.notify, outcome.state)
            level = logging.WARNING if decision.action in ("rollback", "pause") else logging.INFO
            log.log(level, "%s: %s: %s", service, decision.action, decision.reason)

    def _store(self, service: str, state: RolloutState) -> None:
        self._runs[service] = state.to_json()

    def _notify(self, service: str, kind: str, state: RolloutState) -> None:
        """Call the non-gating hooks of `kind` in the background; their verdicts are events."""
        config = self.control.config.services[service]
        rollout = config.rollout
        if rollout is None or not any(hook.type == kind for hook in rollout.webhooks):
            return
        base = self._payload(service, config, rollout, state)

        async def call() -> None:
            results = await call_webhooks(rollout.webhooks, kind, base)
            for result in results:
                self._record_check(service, result)
            await self.control.save()

        task = asyncio.get_running_loop().create_task(call())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _record_check(self, service: str, check: CheckResult) -> None:
        verdict = "passed" if check.ok else f"failed: {check.detail}"
        self.control.events.record(
            "auto",
            "webhook",
            service,
            to="pass" if check.ok else "fail",
            reason=f"{check.kind} {check.name!r} {verdict}",
            values=check.to_json(),
        )

    def _payload(
        self, service: str, config: ServiceConfig, rollout: Rollout, state: RolloutState
    ) -> dict[str, Any]:
        candidate, baseline = roles(rollout)
        revision = config.versions[candidate].revision
        return {
            # Flagger's fields, so hooks written for Flagger (e.g. its load tester) work.
            "name": service,
            "namespace": "laneswitch",
            "phase": state.phase,
            "checksum": revision or "",
            # laneswitch's own.
            "service": service,
            "strategy": rollout.strategy,
            "candidate": candidate,
            "baseline": baseline,
            "revision": revision,
            "step": state.step,
            "weight": round(self.control.share(service, candidate), 4),
            "failed_checks": state.failed_checks,
        }

    # -- helpers ----------------------------------------------------------------------------------

    def _config(self, service: str) -> tuple[ServiceConfig, Rollout]:
        config = self.control.config.services[service]
        assert config.rollout is not None
        return config, config.rollout

    def _lock(self, service: str) -> asyncio.Lock:
        lock = self._locks.get(service)
        if lock is None:
            lock = self._locks[service] = asyncio.Lock()
        return lock


def _percents(steps: list[float] | None) -> str:
    return ", ".join(f"{step:g}%" for step in steps or [])
