"""The control plane's state and its changes, each published as one new route table.

`ControlPlane` owns the validated config, the runtime weights (what a switch, a weights call or a
rollback set), the endpoints' health and the decision record. Every change builds a new
`RouteTable` from those and publishes it whole to the subscribers (this process's data plane, or
the worker pool); versions that lost all their traffic are drained: their idle upstream
connections close at once, busy ones after their exchange, and whatever is still in flight on
them at `drain_timeout` is cut and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from proxy.config.loader import config_digest
from proxy.config.model import Config
from proxy.config.service import ServiceConfig
from proxy.control.reload import Coalescing, ReloadResult, read_config, reload_reason
from proxy.control.rollouts import Rollouts
from proxy.control.statefile import StateWrites
from proxy.control.weights import (
    Weights,
    adopted_weights,
    fleet_weights,
    mapping_of,
    restored_weights,
    rollback_weights,
    validate_weights,
)
from proxy.errors import ControlError
from proxy.events import Event, EventLog
from proxy.fleet.backend import STORE_UNAVAILABLE, StateBackend
from proxy.history import History
from proxy.metrics import MetricsWindow, StatsRegistry
from proxy.routing.build import build_table, rollout_roles
from proxy.routing.table import RouteTable
from proxy.state import RuntimeState

log = logging.getLogger("laneswitch.control")

EndpointKey = tuple[str, str, str]  # (service, version, "host:port")


class ControlPlane:
    """Config, runtime weights, health and events; builds route tables and publishes them."""

    # Every service's rollout runs; set by the wiring (proxy/server.py) right after the
    # control plane is built, since the manager is built on the control plane.
    rollouts: Rollouts

    def __init__(
        self,
        config: Config,
        stats: StatsRegistry,
        *,
        config_path: str | None = None,
        config_text: str = "",
    ) -> None:
        self.config = config
        self.stats = stats
        self.config_path = config_path
        self.config_hash = config_digest(config_text)
        self.loaded_at = time.time()
        self.last_reload_error: list[str] | None = None
        self.reloads = {"success": 0, "failure": 0}
        self.events = EventLog()
        # Weights in force per service; the file's weights until something changes them.
        self.weights: dict[str, Weights] = {
            name: service.file_weights() for name, service in config.services.items()
        }
        # The file's weights as last applied: a reload moves a service's weights only when
        # these change, so an unrelated edit never undoes a runtime switch.
        self.file_weights: dict[str, Weights] = {name: dict(w) for name, w in self.weights.items()}
        # Weights before the last switch/weights change, for `rollback` without a rollout.
        self.previous_weights: dict[str, Weights] = {}
        self.unhealthy: set[EndpointKey] = set()
        self.health_ready = True  # no health checks configured -> every endpoint healthy
        self.listening = False
        self.draining = False
        # The table in force, the first one from the file; each change publishes a new one.
        self.generation = 1
        self.table = build_table(config, self.weights, self.unhealthy, self.generation)
        # The state file: entries of the saved one left out at start-up (another version's,
        # or damaged), and its writes.
        self.state_entries_skipped = 0
        self.state_writes = StateWrites()
        self.window = MetricsWindow(stats)
        # Where the runtime state is shared: this process alone, or a fleet's store (SPEC §9).
        self.backend = StateBackend()
        # Services whose fleet state this member's config cannot apply, with why (config skew).
        self.config_behind: dict[str, str] = {}
        self.history = History(stats)  # the console's charts (GET /history)
        # Called with each new table as it is installed: the data plane of this process, or
        # the worker pool that pushes it to the worker processes; and with each new config
        # (health checks).
        self.table_subscribers: list[Callable[[RouteTable], None]] = []
        self.config_listeners: list[Callable[[Config], None]] = []
        # Awaited with a table generation before a change is acknowledged to its caller: they
        # return once every process serving traffic has applied that table (or a later one).
        self.table_acks: list[Callable[[int], Awaitable[None]]] = []
        self._lock = asyncio.Lock()
        self._reloads = Coalescing(self._reload_once)

    # -- start-up ---------------------------------------------------------------------------------

    async def restore(self, state: RuntimeState) -> None:
        """Put back the runtime state saved by an earlier run, on top of the file's config (the
        weights where they still fit: see `weights.restored_weights`)."""
        self.events = EventLog(Event.from_json(e) for e in state.events)
        self.state_entries_skipped += state.skipped
        weights, previous = restored_weights(self.config.services, self.file_weights, state)
        self.weights.update(weights)
        self.previous_weights.update(previous)
        self.state_entries_skipped += self.rollouts.runs.load(state.rollouts)
        self.install()
        await self.rollouts.restored()

    def runtime_state(self) -> RuntimeState:
        return RuntimeState(
            weights=self.weights,
            file_weights=self.file_weights,
            previous_weights=self.previous_weights,
            events=[event.to_json() for event in self.events.since(0)],
            rollouts=self.rollouts.runs.saved(),
        )

    # -- reading ----------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """/readyz: listeners bound, config loaded, first health round done, not draining."""
        return self.listening and self.health_ready and not self.draining and self.backend.ready

    def share(self, service: str, version: str) -> float:
        """The version's share of its service's traffic, in percent."""
        total = self.config.services[service].weight_total
        return 100.0 * self.weights[service].get(version, 0) / total

    def sample_history(self) -> None:
        """One chart row per version in force (called every HISTORY_STEP seconds)."""
        self.history.sample(self.weights)

    # -- changing ---------------------------------------------------------------------------------

    async def switch(
        self,
        service: str,
        to: str,
        *,
        force: bool = False,
        dry_run: bool = False,
        actor: str = "admin",
    ) -> dict[str, Any]:
        """All traffic of `service` to version `to` at once (blue-green).

        404 unknown service or version; 409 when `to` has no healthy endpoint (unless `force`).
        Returns {"service", "from": weights before, "to": weights after, "dry_run"}.
        """
        self.check_writable()
        self.refuse_while_draining()
        config = self._service(service)
        if to not in config.versions:
            raise ControlError(404, f"service {service!r} has no version {to!r}")
        if not force and not self.has_healthy_endpoint(service, to):
            raise ControlError(
                409, f"version {to!r} has no healthy endpoint (use force to switch anyway)"
            )
        after = {name: (config.weight_total if name == to else 0) for name in config.versions}
        if not dry_run:
            await self.rollouts.before_manual_change(service, "switch", actor)
        return await self._apply(
            service,
            after,
            "switch",
            actor,
            dry_run,
            f"all traffic to {to}",
            healthy=None if force else to,
        )

    async def set_weights(
        self, service: str, weights: Mapping[str, int], *, actor: str = "admin"
    ) -> dict[str, Any]:
        """Set every version's weight (a version left out gets 0).

        400 when they break the config file's weight rules (unknown version: 404); returns as
        `switch`.
        """
        self.check_writable()
        self.refuse_while_draining()
        config = self._service(service)
        unknown = sorted(set(weights) - set(config.versions))
        if unknown:
            raise ControlError(404, f"service {service!r} has no version {unknown[0]!r}")
        after = {name: weights.get(name, 0) for name in config.versions}
        problem = validate_weights(config, after)
        if problem is not None:
            raise ControlError(400, problem)
        await self.rollouts.before_manual_change(service, "weights", actor)
        return await self._apply(service, after, "weights", actor, False, "")

    async def rollback(self, service: str, *, actor: str = "admin") -> dict[str, Any]:
        """All traffic back to the stable/active version (after a promotion: the version that
        had it before), or without a rollout block, back to the weights in force before the
        last switch or weights change. Never refused while the service exists (but for the
        503 of the drain at shutdown): it ends a rollout in any phase (step 0 included, while
        its pre-rollout hooks still run), and when the weights are already the rollback's it
        answers "no change"."""
        self.refuse_while_draining()
        config = self._service(service)
        _, stable = rollout_roles(config)
        if stable is not None:
            stable = self.rollouts.rollback_target(service) or stable
        target, reason = rollback_weights(
            config, stable, self.previous_weights.get(service), self.weights[service]
        )
        # The run ends first, even when the weights need not move: a run at step 0 (its
        # pre-rollout hooks still running) would otherwise give the canary traffic afterwards.
        commit = await self.rollouts.before_rollback(service, actor)
        return await self._apply(service, target, "rollback", actor, False, reason, commit=commit)

    async def apply_rollout(
        self,
        service: str,
        weights: Weights | None,
        *,
        actor: str,
        action: str,
        reason: str,
        values: dict[str, Any],
        thresholds: dict[str, Any],
        phases: tuple[str, str],
        commit: Callable[[], bool],
    ) -> bool:
        """Carry out one rollout decision: `commit` stores the run's new state (False: the run
        moved since the decision was computed) together with its weights (if any), installed
        through the same acknowledgement and drain as a switch, then its event and the state
        file. The event's from/to are the weights when they change, else the rollout's
        phases. False: dropped, nothing changed."""
        async with self._lock:
            # The decision was computed before the lock: a reload in between may have removed
            # the service or renamed its versions, or moved the run itself (a new run, a
            # pause, steps edited), and such a stale decision must never be installed (that
            # reload already dealt with the rollout).
            current = self.config.services.get(service)
            if (
                current is None
                or (weights is not None and validate_weights(current, weights) is not None)
                # Only now, with the weights: whatever saves the state file while the decision
                # waits for the lock must not persist a step whose weights were never applied.
                or not commit()
            ):
                log.warning("%s: %s dropped: the config changed under it", service, action)
                return False
            before = dict(self.weights[service])
            from_: Any = phases[0]
            to: Any = phases[1]
            if weights is not None:
                from_, to = before, dict(weights)
                if weights != before:
                    self.weights[service] = dict(weights)
                    self.install()
                    await self.applied()
            self.events.record(
                actor,
                action,
                service,
                from_=from_,
                to=to,
                reason=reason,
                values=values,
                thresholds=thresholds,
            )
            await self.save()
            return True

    async def _apply(
        self,
        service: str,
        after: Weights,
        action: str,
        actor: str,
        dry_run: bool,
        reason: str,
        *,
        healthy: str | None = None,
        commit: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Install `after` for `service` and record it; with `healthy`, refused (409) when that
        version has no healthy endpoint at the moment the change is made. `commit` stores the
        rollout state that goes with `after`, under the same lock and in the same save."""
        async with self._lock:
            # `after` was computed from the config before the lock: a reload that got the lock
            # first may have removed the service or renamed its versions or weight_total.
            self._service(service)
            self.refuse_while_draining()
            if validate_weights(self.config.services[service], after) is not None:
                raise ControlError(409, f"the config of {service!r} changed under the call; retry")
            # Read under the lock: the health verdict may have changed while the call waited.
            if healthy is not None and not self.has_healthy_endpoint(service, healthy):
                raise ControlError(
                    409, f"version {healthy!r} has no healthy endpoint (use force to switch anyway)"
                )
            before = dict(self.weights[service])
            result = {"service": service, "from": before, "to": after, "dry_run": dry_run}
            if dry_run:
                return result
            if commit is not None:
                commit()
            if after == before:
                # Recorded (every call is), but it must not overwrite the undo point.
                self.events.record(
                    actor, action, service, from_=before, to=after, reason="no change"
                )
                if commit is not None:
                    await self.save()  # the run's end, even with no weight to move
                return result
            if action != "rollback":
                self.previous_weights[service] = before
            self.weights[service] = after
            self.install()
            await self.applied()
            self.events.record(actor, action, service, from_=before, to=after, reason=reason)
            await self.save()
            return result

    async def reload(self, *, actor: str = "admin") -> ReloadResult:
        """Re-read the config file; all-or-nothing. A new revision or new endpoints of a
        rollout's canary (blue-green: preview) start a new rollout of it (actor "config").

        Requests that arrive while a reload runs are coalesced (see `reload.Coalescing`): a
        storm of SIGHUPs is at most two reloads deep, and a rollback never queues behind it."""
        self.refuse_while_draining()
        return await self._reloads(actor)

    async def _reload_once(self, actor: str) -> ReloadResult:
        # Read and parsed outside the lock: switches and rollbacks never wait for the disk.
        # Reloads run one at a time (see `reload`), so nothing else adopts a config meanwhile.
        read = await read_config(self.config_path)
        if isinstance(read, list):
            return await self._reload_failed(read, actor)
        config, digest = read
        starts: list[tuple[str, str]] = []
        async with self._lock:
            self.reloads["success"] += 1
            if digest == self.config_hash:
                # The file in force: nothing changes, nothing is recorded (SPEC §6), except
                # that an edit rejected earlier is gone, which clears its error.
                if self.last_reload_error is not None:
                    self.last_reload_error = None
                    self.events.record(
                        actor, "reload", None, to=digest, reason="the rejected edit was undone"
                    )
                    await self.save()
                return ReloadResult(ok=True, changed=False)
            self.last_reload_error = None
            old = self.config
            before = {name: dict(weights) for name, weights in self.weights.items()}
            self._adopt(config)
            starts = self.rollouts.config_changed(old, config, before)
            self.config_hash = digest
            self.loaded_at = time.time()
            # Listeners first: the health checker marks new endpoints unknown (no traffic
            # until a check passes), so no table, pushed to workers or not, routes to them.
            for listener in self.config_listeners:
                listener(config)
            self.install()
            await self.applied()
            self.events.record(actor, "reload", None, to=digest, reason=reload_reason(old, config))
            await self.save()
        # In a fleet, a new release of the canary starts one run for the fleet: the leader's,
        # when its own file has it (every member reloads the same file sooner or later).
        for service, reason in starts if self.backend.deciding() else []:
            await self.rollouts.start_release(service, reason)
        return ReloadResult(ok=True, changed=True)

    async def _reload_failed(self, errors: list[str], actor: str) -> ReloadResult:
        async with self._lock:
            self.reloads["failure"] += 1
            self.last_reload_error = errors
            for line in errors:
                log.error("reload rejected: %s", line)
            self.events.record(actor, "reload_failed", None, reason="; ".join(errors[:5]))
            await self.save()  # the decision record is kept in the state file (SPEC §6)
            return ReloadResult(ok=False, errors=errors)

    def _adopt(self, config: Config) -> None:
        """Take a new config's services, keeping runtime weights where the file did not move."""
        self.weights, self.file_weights, self.previous_weights = adopted_weights(
            config, self.weights, self.file_weights, self.previous_weights
        )
        self.config = config
        self.unhealthy = {key for key in self.unhealthy if _still_exists(config, key)}

    def set_health(self, unhealthy: set[EndpointKey], first_round_done: bool = True) -> None:
        """The health checker's verdict changed: rebuild the table without those endpoints."""
        self.health_ready = first_round_done
        if unhealthy != self.unhealthy:
            self.unhealthy = set(unhealthy)
            self.install()

    def has_healthy_endpoint(self, service: str, version: str) -> bool:
        endpoints = self.config.services[service].versions[version].endpoints
        return any((service, version, e) not in self.unhealthy for e in endpoints)

    # -- the table --------------------------------------------------------------------------------

    def install(self) -> None:
        """Build a table from config + weights + health and publish it to the subscribers
        (each data plane drains what lost its traffic)."""
        self.generation += 1
        self.table = build_table(self.config, self.weights, self.unhealthy, self.generation)
        for subscriber in self.table_subscribers:
            subscriber(self.table)

    async def applied(self) -> None:
        """Wait until every serving process has the table in force (see `table_acks`)."""
        for ack in self.table_acks:
            await ack(self.generation)

    # -- the fleet --------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """503 for a change other than a rollback while the fleet's store cannot be reached."""
        if not self.backend.writable:
            raise ControlError(503, STORE_UNAVAILABLE)

    def fleet_state(self) -> dict[str, Any]:
        """The shared part of the runtime state (SPEC §9): weights, undo points, rollout runs."""
        return {
            "weights": self.weights,
            "previous_weights": self.previous_weights,
            "rollouts": self.rollouts.runs.saved(),
        }

    async def apply_fleet(self, state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Adopt the fleet's state, written by any member. A service this member's config
        cannot take it for (unknown service, versions or total) keeps its table and is
        `config_behind`. Returns the rollout states as they were before."""
        async with self._lock:
            services = self.config.services
            weights, previous, behind = fleet_weights(state, services, self.weights)
            before = self.rollouts.runs.adopt(mapping_of(state.get("rollouts")), services, behind)
            self.config_behind = behind
            self.previous_weights = previous
            if weights != self.weights:
                self.weights = weights
                self.install()
                await self.applied()
            await self._save_file()
            return before

    # -- persistence ------------------------------------------------------------------------------

    async def save(self) -> None:
        """Write the state file (if configured) off the event loop, then share the change."""
        await self._save_file()
        await self.backend.saved()

    async def _save_file(self) -> None:
        await self.state_writes.write(self.config.state_file, self.runtime_state)

    async def shutdown(self) -> None:
        """The graceful stop began: no rollout decision from now on (one being carried out
        finishes first, so its weights, event and state file stay together); then the state
        is saved a last time."""
        await self.rollouts.shutdown()
        async with self._lock:
            await self.save()

    def close(self) -> None:
        self.rollouts.close()

    def refuse_while_draining(self) -> None:
        """ControlError 503 once the graceful stop began: the state file has had its last
        word, so a change accepted now would be lost at the next start."""
        if self.draining:
            raise ControlError(
                503,
                "shutting down: changes are refused while the proxy drains; retry on the "
                "process that replaces it",
            )

    def _service(self, name: str) -> ServiceConfig:
        service = self.config.services.get(name)
        if service is None:
            raise ControlError(404, f"no service {name!r}")
        return service


def _still_exists(config: Config, key: EndpointKey) -> bool:
    service = config.services.get(key[0])
    if service is None or key[1] not in service.versions:
        return False
    return key[2] in service.versions[key[1]].endpoints
