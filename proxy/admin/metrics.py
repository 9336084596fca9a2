"""Prometheus export of the data plane's counters, built at scrape time.

The request path only increments plain integers (`proxy.metrics`); this collector turns them into
metric families when Prometheus scrapes, so no request ever pays for a label lookup. Each admin
app registers one collector in its own `CollectorRegistry`: two proxies in one process (tests)
never share series, and the global registry's process metrics stay out of the way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.config.scalars import parse_endpoint
from proxy.control import ControlPlane
from proxy.metrics import LATENCY_BUCKETS, UPSTREAM_ERROR_KINDS, VersionStats
from proxy.rollout.manager import RolloutManager
from proxy.rollout.release import roles
from proxy.rollout.values import PHASES
from proxy.routing.table import Endpoint
from proxy.workers.supervisor import WorkerPool

SV = ["service", "version"]
# Reasons of `laneswitch_rollbacks_total`, exported from zero so rate() works from the start.
ROLLBACK_REASONS = ("failed_checks", "progress_deadline", "abort", "manual")
# The `le` labels never change: format them once (repr of a float is what Prometheus' own
# histograms write for bounds like these: "0.005", "1.0", "30.0").
_BUCKET_BOUNDS: tuple[str, ...] = (*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf")


def endpoint_key(text: str) -> str:
    """The endpoint as the health checker and the route table name it (`host:port`, `[v6]:port`)."""
    return Endpoint(*parse_endpoint(text)).key


class LaneswitchCollector(Collector):
    """Every `laneswitch_*` family (docs/metrics.md's metrics table), read from `control` and
    its `rollouts`."""

    def __init__(
        self, control: ControlPlane, rollouts: RolloutManager, workers: WorkerPool | None = None
    ) -> None:
        self.control = control
        self.rollouts = rollouts
        self.workers = workers

    def describe(self) -> list[Metric]:
        # An empty description keeps `register()` from calling collect() before the proxy runs.
        return []

    def collect(self) -> Iterator[Metric]:
        control = self.control
        stats = {(s.service, s.version): s for s in control.stats.all()}
        # Versions in the config get series from the start (rate() needs a first zero); versions
        # a reload removed keep theirs, so counters stay monotonic.
        pairs = list(stats)
        for service_name, service in control.config.services.items():
            for version_name in service.versions:
                if (service_name, version_name) not in stats:
                    pairs.append((service_name, version_name))

        requests = CounterMetricFamily(
            "laneswitch_requests",
            "Requests answered, by the status sent to the client.",
            labels=[*SV, "code"],
        )
        duration = HistogramMetricFamily(
            "laneswitch_request_duration_seconds",
            "Time from the request head to the end of the response.",
            labels=SV,
        )
        upstream_errors = CounterMetricFamily(
            "laneswitch_upstream_errors",
            "Failed upstream exchanges, by kind (connect, timeout, reset, protocol).",
            labels=[*SV, "kind"],
        )
        in_flight = GaugeMetricFamily(
            "laneswitch_in_flight_requests", "Requests being served right now.", labels=SV
        )
        client_aborts = CounterMetricFamily(
            "laneswitch_client_aborts",
            "Requests whose client left before the response ended.",
            labels=SV,
        )
        drain_cut = CounterMetricFamily(
            "laneswitch_drain_cut_requests",
            "Requests cut because they outlived drain_timeout.",
            labels=SV,
        )
        for pair in pairs:
            labels = list(pair)
            version_stats = stats.get(pair)
            if version_stats is None:
                version_stats = VersionStats(*pair)  # all zero: nothing was served yet
            for code, count in sorted(version_stats.requests.items()):
                requests.add_metric([*labels, str(code)], count)
            duration.add_metric(
                labels, _cumulative(version_stats.latency_buckets), version_stats.latency_sum
            )
            for kind in UPSTREAM_ERROR_KINDS:
                upstream_errors.add_metric(
                    [*labels, kind], version_stats.upstream_errors.get(kind, 0)
                )
            in_flight.add_metric(labels, version_stats.in_flight)
            client_aborts.add_metric(labels, version_stats.client_aborts)
            drain_cut.add_metric(labels, version_stats.drain_cut)

        weight = GaugeMetricFamily(
            "laneswitch_weight", "Share of the service's traffic in percent.", labels=SV
        )
        healthy = GaugeMetricFamily(
            "laneswitch_endpoint_healthy",
            "1 when the endpoint takes traffic, 0 when health checks took it out.",
            labels=[*SV, "endpoint"],
        )
        unhealthy = control.unhealthy
        for service_name, service in control.config.services.items():
            weights = control.weights.get(service_name, {})
            for version_name, version in service.versions.items():
                share = weights.get(version_name, 0) * 100 / service.weight_total
                weight.add_metric([service_name, version_name], share)
                for text in version.endpoints:
                    key = endpoint_key(text)
                    up = (service_name, version_name, key) not in unhealthy
                    healthy.add_metric([service_name, version_name, key], 1 if up else 0)

        reloads = CounterMetricFamily(
            "laneswitch_config_reloads",
            "Config reloads, by result (success, failure).",
            labels=["result"],
        )
        for result in ("success", "failure"):
            reloads.add_metric([result], control.reloads.get(result, 0))

        state_skipped = CounterMetricFamily(
            "laneswitch_state_entries_skipped",
            "Entries of the state file left out at start-up because they did not parse.",
        )
        state_skipped.add_metric([], control.state_entries_skipped)
        state_failures = CounterMetricFamily(
            "laneswitch_state_write_failures",
            "State file writes that failed (the last error is in GET /status).",
        )
        state_failures.add_metric([], control.state_writes.failures)

        phase = GaugeMetricFamily(
            "laneswitch_rollout_phase",
            "1 for the rollout's current phase, 0 for the others.",
            labels=["service", "phase"],
        )
        analysis = GaugeMetricFamily(
            "laneswitch_analysis_value",
            "What the last rollout analysis measured, per version.",
            labels=[*SV, "metric"],
        )
        for service_name, service in control.config.services.items():
            rollout = service.rollout
            if rollout is None:
                continue
            state = self.rollouts.state(service_name)
            for name in PHASES:
                phase.add_metric([service_name, name], 1 if name == state.phase else 0)
            last = state.last_analysis
            if last:
                candidate, baseline = roles(rollout)
                for role, metric, value in _analysis_values(last.get("values") or {}):
                    who = candidate if role == "candidate" else baseline
                    analysis.add_metric([service_name, who, metric], value)
        rollbacks = CounterMetricFamily(
            "laneswitch_rollbacks",
            "Rollbacks, by reason (automatic: failed_checks, progress_deadline; by a person: "
            "abort, manual).",
            labels=["service", "reason"],
        )
        counted = self.rollouts.rollbacks
        for service_name in control.config.services:
            for reason in ROLLBACK_REASONS:
                rollbacks.add_metric([service_name, reason], counted.get((service_name, reason), 0))

        yield requests
        yield duration
        yield upstream_errors
        yield in_flight
        yield weight
        yield healthy
        yield reloads
        yield state_skipped
        yield state_failures
        yield client_aborts
        yield drain_cut
        yield phase
        yield rollbacks
        yield analysis
        yield from self._workers()
        yield from control.backend.metrics()

    def _workers(self) -> Iterator[Metric]:
        """Supervision of the worker processes; none with `workers: 1` (one process)."""
        workers = self.workers
        if workers is None:
            return
        restarts = CounterMetricFamily(
            "laneswitch_worker_restarts", "Worker processes that died and were restarted."
        )
        restarts.add_metric([], workers.restarts)
        yield restarts
        up = GaugeMetricFamily(
            "laneswitch_worker_up", "1 while the worker process listens.", labels=["worker"]
        )
        connections = CounterMetricFamily(
            "laneswitch_worker_connections",
            "Client connections the worker process accepted (its restarts included).",
            labels=["worker"],
        )
        in_flight = GaugeMetricFamily(
            "laneswitch_worker_in_flight_requests",
            "Requests being served by the worker process right now.",
            labels=["worker"],
        )
        for slot in workers.slots:
            label = [str(slot.index)]
            up.add_metric(label, 1 if slot.up else 0)
            connections.add_metric(label, slot.connections)
            in_flight.add_metric(label, slot.in_flight)
        yield up
        yield connections
        yield in_flight


# `laneswitch_analysis_value`: (version role, metric label, key in the analysis' values, scale).
_ANALYSIS_METRICS = (
    ("candidate", "requests", "requests", 1.0),
    ("candidate", "success_rate", "success_rate", 1.0),
    ("candidate", "latency_p99_seconds", "latency_p99_ms", 0.001),
    ("candidate", "success_rate_drop", "success_rate_drop", 1.0),
    ("baseline", "requests", "stable_requests", 1.0),
    ("baseline", "success_rate", "stable_success_rate", 1.0),
    ("baseline", "latency_p99_seconds", "stable_latency_p99_ms", 0.001),
)


def _analysis_values(values: dict[str, Any]) -> Iterator[tuple[str, str, float]]:
    for role, metric, key, scale in _ANALYSIS_METRICS:
        value = values.get(key)
        if isinstance(value, int | float):
            yield role, metric, value * scale


def _cumulative(per_bucket: list[int]) -> list[tuple[str, float]]:
    total = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip(_BUCKET_BOUNDS, per_bucket, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets


def metrics_registry(
    control: ControlPlane, rollouts: RolloutManager, workers: WorkerPool | None = None
) -> CollectorRegistry:
    """A registry holding only this proxy's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LaneswitchCollector(control, rollouts, workers))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of `registry`."""
    return generate_latest(registry)
