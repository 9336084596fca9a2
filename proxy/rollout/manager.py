"""The rollout driver: one task per service with a running rollout, beside the control plane.

Each `interval` it takes the window of the proxy's own counters since the last analysis, calls
the gating webhooks (and blue-green's pre-switch checks), asks the pure controller, and carries
out its decisions through the control plane: the same lock, table install, acknowledgement,
event and state-file write as a switch. Webhook and pre-switch I/O happens outside every lock, so
a person's `pause` or `abort` never waits for a slow hook; a result that comes back after the
rollout changed under it is dropped.

The manager owns every run's state (`runs`, plain JSON): the control plane saves it with the rest
of the runtime state, so the state file carries it and a restart resumes the phase and step it
stopped at. It sees the control plane only through `port.ControlPort`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from proxy.config.model import Config
from proxy.config.service import ServiceConfig
from proxy.errors import ControlError
from proxy.rollout import controller, release
from proxy.rollout.edits import edited_during_run
from proxy.rollout.observe import AnalysisWindows, observe
from proxy.rollout.port import ControlPort
from proxy.rollout.release import roles
from proxy.rollout.runs import Runs
from proxy.rollout.status import rollout_status
from proxy.rollout.values import (
    RUNNING,
    TICKING,
    CheckResult,
    Outcome,
    Rollout,
    RolloutState,
    TransitionRefused,
    Weights,
)
from proxy.rollout.webhooks import base_payload, call_webhooks

log = logging.getLogger("laneswitch.rollout")

ACTIONS = ("start", "pause", "resume", "promote", "abort")

# Immediate ticks in a row (start -> step 1, last step -> promotion): a bound, not a tuning knob;
# the state machine never asks for more than two.
MAX_IMMEDIATE_TICKS = 4


class RolloutManager:
    """Runs every service's rollout; `ControlPlane.rollouts`."""

    def __init__(self, control: ControlPort) -> None:
        self.control = control
        self.runs = Runs()  # saved by the control plane with the rest of the runtime state
        self.rollbacks: Counter[tuple[str, str]] = Counter()  # (service, reason) -> count
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.windows = AnalysisWindows(control)
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False  # the graceful stop began: no timer runs again

    # -- reading ----------------------------------------------------------------------------------

    def state(self, service: str) -> RolloutState:
        return self.runs.state(service)

    def status(self, service: str) -> dict[str, Any] | None:
        """The rollout part of GET /status; None without a rollout block."""
        rollout = self.control.config.services[service].rollout
        if rollout is None:
            return None
        candidate, _ = roles(rollout)
        return rollout_status(rollout, self.state(service), self.control.share(service, candidate))

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

    async def before_rollback(self, service: str, actor: str) -> Callable[[], None] | None:
        """`rollback` by a person is counted and stops a running (or promoted) rollout's task;
        the commit returned stores rolled_back, under the control lock with the weights."""
        self.rollbacks[(service, "manual")] += 1
        rollout = self.control.config.services[service].rollout
        if rollout is None:
            return None
        async with self._lock(service):
            if self.state(service).phase not in (*RUNNING, "promoted"):
                return None
            self._stop_task(service)

        def commit() -> None:
            ended = self.state(service)  # as it is by then: a reload may have edited it
            ended.phase = "rolled_back"
            ended.reason = f"rolled back by {actor}"
            ended.paused_from = None
            self.runs.store(service, ended)

        return commit

    # -- lifecycle --------------------------------------------------------------------------------

    async def restored(self) -> None:
        """After a restart: drop states of rollouts the config no longer has; resume the
        ticking ones at their step (the weights came back with the state file). A run whose
        candidate got a new revision or endpoints while the proxy was down is superseded by a
        new run from weight 0, exactly as a reload would start one (SPEC §6): the saved step's
        weight was earned by the old build, never by this one."""
        services = self.control.config.services
        self.runs.keep(name for name, service in services.items() if service.rollout is not None)
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
                self.runs.store(name, state)
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
            changed = before is not None and before.get(name) != self.runs.saved().get(name)
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
        for name in self.runs.keep(n for n, s in new.services.items() if s.rollout is not None):
            self._stop_task(name)
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
                    self.runs.store(name, state)
                continue
            change = release.describe_change(
                release.fingerprint(before, before.rollout),
                release.fingerprint(service, rollout),
            )
            if change is not None:
                starts.append((name, f"{change} in the config"))
            elif self.control.backend.deciding():  # in a fleet, the leader's run is the one
                self._edited(name, before, service, weights_before.get(name))
        return starts

    def _edited(
        self, name: str, old: ServiceConfig, new: ServiceConfig, weights_before: Weights | None
    ) -> None:
        """A reload edited the file's weights or the steps of a run that goes on (see
        `edits.edited_during_run`): its events, weights and state."""
        weights = self.control.weights[name]
        edit = edited_during_run(self.state(name), old, new, weights, weights_before, time.time())
        if edit is None:
            return
        for action, fields in edit.events:
            self.control.events.record("config", action, name, **fields)
        if edit.weights is not None:
            self.control.weights[name] = edit.weights
        self.runs.store(name, edit.state)
        log.warning("%s: %s", name, "; ".join(edit.said) or "the file's weights changed")
        # The interval starts again at what is in force now (the caller installs it).
        self._stop_task(name)
        if edit.state.phase in TICKING:
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
        self.windows.mark(service)
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
        observed = await observe(self.control, self.windows, service, service_config, state, needs)
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
            for check in [*observed.checks, *(observed.confirm or ())]:
                self._record_check(service, check)
            observation = replace(observed, now=time.time())
            outcome = controller.tick(
                current, now_config.rollout, now_config, self.control.weights[service], observation
            )
            await self._carry_out(service, current, outcome, "auto")
        if outcome.again:
            return True
        return False if outcome.state.phase in TICKING else None

    # -- carrying decisions out -------------------------------------------------------------------

    async def _carry_out(
        self, service: str, before: RolloutState, outcome: Outcome, actor: str
    ) -> None:
        """Apply each decision with the new state (state, weights, event, state file), or
        without one, store the new state alone (it moves no traffic)."""
        if not outcome.decisions:
            self.runs.store(service, outcome.state)
            return
        phases = (before.phase, outcome.state.phase)
        decided_from = before

        def commit() -> bool:
            # Under the control plane's lock: the run must still be the one decided on.
            if self.state(service) != decided_from:
                return False
            self.runs.store(service, outcome.state)
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
                self.windows.mark(service)
            if decision.rollback is not None:
                self.rollbacks[(service, decision.rollback)] += 1
            if decision.notify is not None:
                self._notify(service, decision.notify, outcome.state)
            level = logging.WARNING if decision.action in ("rollback", "pause") else logging.INFO
            log.log(level, "%s: %s: %s", service, decision.action, decision.reason)

    def _notify(self, service: str, kind: str, state: RolloutState) -> None:
        """Call the non-gating hooks of `kind` in the background; their verdicts are events."""
        config = self.control.config.services[service]
        rollout = config.rollout
        if rollout is None or not any(hook.type == kind for hook in rollout.webhooks):
            return
        candidate, _ = roles(rollout)
        weight = self.control.share(service, candidate)
        base = base_payload(service, config, rollout, state, weight)

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
