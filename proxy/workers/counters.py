"""Counter deltas from a worker to its parent, so every reader of the counters sees one process.

A delta is taken from the worker's `StatsRegistry` since the last report and folded into the
parent's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from proxy.metrics import StatsRegistry

StatsKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class CounterDelta:
    """One version's counters since the worker's last report; `in_flight` is its current value
    (a gauge), everything else is a difference."""

    service: str
    version: str
    requests: dict[int, int]  # status code -> n
    buckets: tuple[int, ...]  # latency histogram, per bucket
    latency_sum: float
    latency_count: int
    upstream_errors: dict[str, int]  # kind -> n
    client_aborts: int
    drain_cut: int
    in_flight: int

    @property
    def key(self) -> StatsKey:
        return (self.service, self.version)


class _Sent:
    """What a worker last reported of one version's counters (cumulative)."""

    __slots__ = (
        "buckets",
        "client_aborts",
        "drain_cut",
        "errors",
        "in_flight",
        "latency_count",
        "latency_sum",
        "requests",
    )

    def __init__(self, bucket_slots: int) -> None:
        self.requests: dict[int, int] = {}
        self.buckets = [0] * bucket_slots
        self.latency_sum = 0.0
        self.latency_count = 0
        self.errors: dict[str, int] = {}
        self.client_aborts = 0
        self.drain_cut = 0
        self.in_flight = 0


class CounterTracker:
    """A worker's side: the deltas of its `StatsRegistry` since the last call of `deltas()`."""

    __slots__ = ("_sent", "stats")

    def __init__(self, stats: StatsRegistry) -> None:
        self.stats = stats
        self._sent: dict[StatsKey, _Sent] = {}

    def deltas(self) -> list[CounterDelta]:
        entries: list[CounterDelta] = []
        for vs in self.stats.all():
            key = (vs.service, vs.version)
            sent = self._sent.get(key)
            if sent is None:
                sent = self._sent[key] = _Sent(len(vs.latency_buckets))
            errors_now = vs.upstream_errors
            if (
                vs.latency_count == sent.latency_count
                and vs.in_flight == sent.in_flight
                and vs.client_aborts == sent.client_aborts
                and vs.drain_cut == sent.drain_cut
                and errors_now == sent.errors
            ):
                continue  # requests only change with latency_count (one observe() each)
            requests = {
                code: n - sent.requests.get(code, 0)
                for code, n in vs.requests.items()
                if n != sent.requests.get(code, 0)
            }
            buckets = tuple(
                now - before for now, before in zip(vs.latency_buckets, sent.buckets, strict=True)
            )
            errors = {
                kind: n - sent.errors.get(kind, 0)
                for kind, n in errors_now.items()
                if n != sent.errors.get(kind, 0)
            }
            entries.append(
                CounterDelta(
                    service=vs.service,
                    version=vs.version,
                    requests=requests,
                    buckets=buckets,
                    latency_sum=vs.latency_sum - sent.latency_sum,
                    latency_count=vs.latency_count - sent.latency_count,
                    upstream_errors=errors,
                    client_aborts=vs.client_aborts - sent.client_aborts,
                    drain_cut=vs.drain_cut - sent.drain_cut,
                    in_flight=vs.in_flight,
                )
            )
            sent.requests = dict(vs.requests)
            sent.buckets = list(vs.latency_buckets)
            sent.latency_sum = vs.latency_sum
            sent.latency_count = vs.latency_count
            sent.errors = dict(errors_now)
            sent.client_aborts = vs.client_aborts
            sent.drain_cut = vs.drain_cut
            sent.in_flight = vs.in_flight
        return entries


def fold(stats: StatsRegistry, entries: Sequence[CounterDelta]) -> None:
    """Add a worker's deltas to the parent's counters (in_flight is handled by the caller)."""
    for delta in entries:
        vs = stats.get(delta.service, delta.version)
        counts = vs.requests
        for code, n in delta.requests.items():
            counts[code] = counts.get(code, 0) + n
        slots = vs.latency_buckets
        for index, n in enumerate(delta.buckets):
            if n:
                slots[index] += n
        vs.latency_sum += delta.latency_sum
        vs.latency_count += delta.latency_count
        kinds = vs.upstream_errors
        for kind, n in delta.upstream_errors.items():
            kinds[kind] = kinds.get(kind, 0) + n
        vs.client_aborts += delta.client_aborts
        vs.drain_cut += delta.drain_cut
