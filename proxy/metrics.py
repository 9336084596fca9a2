"""Per-(service, version) counters kept as plain numbers on the hot path (STYLE rule 5).

The data plane only increments integers here; Prometheus export and the rollout analysis read the
same objects at their own pace, so a request never pays for a label lookup or a lock.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass

from proxy.latency_buckets import LATENCY_BUCKETS

__all__ = ["LATENCY_BUCKETS"]  # re-exported: the histogram's users read it here

UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset", "protocol")


class VersionStats:
    """Counters of one version of one service, as seen by this process."""

    __slots__ = (
        "client_aborts",
        "drain_cut",
        "in_flight",
        "latency_buckets",
        "latency_count",
        "latency_sum",
        "requests",
        "service",
        "upstream_errors",
        "version",
    )

    def __init__(self, service: str, version: str) -> None:
        self.service = service
        self.version = version
        self.requests: dict[int, int] = {}  # status sent to the client -> count
        # One slot per bucket of LATENCY_BUCKETS plus the +Inf slot; not cumulative.
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.upstream_errors = dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)
        self.in_flight = 0
        self.client_aborts = 0
        self.drain_cut = 0

    def observe(self, status: int, seconds: float) -> None:
        """One finished request: the status the client got and how long it took."""
        requests = self.requests
        requests[status] = requests.get(status, 0) + 1
        self.latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(
            requests=dict(self.requests),
            latency_buckets=tuple(self.latency_buckets),
            latency_sum=self.latency_sum,
            upstream_errors=dict(self.upstream_errors),
            client_aborts=self.client_aborts,
            drain_cut=self.drain_cut,
        )


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """A copy of a version's cumulative counters; two of them subtract into a window."""

    requests: dict[int, int]
    latency_buckets: tuple[int, ...]
    latency_sum: float
    upstream_errors: dict[str, int]
    client_aborts: int
    drain_cut: int

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def __sub__(self, earlier: StatsSnapshot) -> StatsSnapshot:
        return StatsSnapshot(
            requests={
                code: count - earlier.requests.get(code, 0) for code, count in self.requests.items()
            },
            latency_buckets=tuple(
                a - b for a, b in zip(self.latency_buckets, earlier.latency_buckets, strict=True)
            ),
            latency_sum=self.latency_sum - earlier.latency_sum,
            upstream_errors={
                kind: count - earlier.upstream_errors.get(kind, 0)
                for kind, count in self.upstream_errors.items()
            },
            client_aborts=self.client_aborts - earlier.client_aborts,
            drain_cut=self.drain_cut - earlier.drain_cut,
        )


class StatsRegistry:
    """Every `VersionStats` of this process, created on first use and never removed.

    Counters are never removed so that Prometheus counters stay monotonic across reloads.
    """

    __slots__ = ("_stats",)

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], VersionStats] = {}

    def get(self, service: str, version: str) -> VersionStats:
        key = (service, version)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = VersionStats(service, version)
        return stats

    def peek(self, service: str, version: str) -> VersionStats:
        """The version's counters for reading: zeros (not registered) if none exist yet."""
        return self._stats.get((service, version)) or VersionStats(service, version)

    def all(self) -> list[VersionStats]:
        return list(self._stats.values())


def quantile(buckets: tuple[int, ...] | list[int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1), in seconds, of per-bucket counts over LATENCY_BUCKETS.

    Interpolates linearly inside the bucket, as Prometheus' histogram_quantile does, so a few
    samples never give NaN; a quantile in the +Inf bucket is reported as the last finite bound.
    None when there are no samples.
    """
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for index, count in enumerate(buckets):
        if index >= len(LATENCY_BUCKETS):
            return LATENCY_BUCKETS[-1]
        upper = LATENCY_BUCKETS[index]
        if count and seen + count >= rank:
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
        lower = upper
    return LATENCY_BUCKETS[-1]


def success_rate(requests: dict[int, int]) -> float | None:
    """% of responses that are not 5xx; None without responses."""
    total = sum(requests.values())
    if total == 0:
        return None
    errors = sum(count for code, count in requests.items() if code >= 500)
    return 100.0 * (total - errors) / total


class MetricsWindow:
    """Recent history of every version's counters, for "the last minute" views.

    `sample()` (called every `step` seconds by the control plane) keeps snapshots for `seconds`;
    `delta()` is what happened between the oldest kept snapshot and now.
    """

    def __init__(self, stats: StatsRegistry, seconds: float = 60.0, step: float = 5.0) -> None:
        self.stats = stats
        self.seconds = seconds
        self.step = step
        # Snapshots kept: one per step over the window, plus one.
        self._samples: deque[tuple[float, dict[tuple[str, str], StatsSnapshot]]] = deque(
            maxlen=int(seconds / step) + 1
        )

    def sample(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        snapshots = {(s.service, s.version): s.snapshot() for s in self.stats.all()}
        self._samples.append((now, snapshots))

    def delta(self, service: str, version: str) -> StatsSnapshot | None:
        """Counters of the window (None when nothing was ever counted for the version)."""
        current = self.stats.peek(service, version).snapshot()
        if not self._samples:
            return current if current.total or current.client_aborts else None
        _, oldest = self._samples[0]
        earlier = oldest.get((service, version))
        return current if earlier is None else current - earlier
