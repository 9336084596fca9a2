"""The analysis of one interval: pure verdicts from the proxy's own counters.

Input is what the data plane counted for the judged version and its baseline over one interval
(`StatsSnapshot` deltas: later - earlier). Client-caused outcomes never count against a version:
4xx are answers (successes for the success rate) and client aborts are not answers at all (they
never reach `requests`); 5xx from the upstream and the proxy's own 502/503/504 for the version do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.config.rollout import RolloutMetrics
from proxy.latency_buckets import bucket_bound_index
from proxy.metrics import StatsSnapshot, quantile, success_rate

Verdict = Literal["pass", "fail", "inconclusive"]

# Float comparisons at a threshold: 99.0 measured against `min: 99` passes whatever rounding
# the division did.
EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Measured:
    """One version over one interval."""

    requests: int
    success_rate: float | None  # % not 5xx; None without answers
    p99: float | None  # seconds, interpolated in its bucket (reported); None without answers
    latency_buckets: tuple[int, ...] = ()  # per-bucket counts: what the latency check judges

    @classmethod
    def of(cls, window: StatsSnapshot | None) -> Measured:
        if window is None:
            return cls(0, None, None)
        return cls(
            requests=window.total,
            success_rate=success_rate(window.requests),
            p99=quantile(window.latency_buckets, 0.99),
            latency_buckets=tuple(window.latency_buckets),
        )

    def slower_than(self, limit: float) -> int:
        """How many requests took longer than `limit`, exactly (`limit` is a bucket bound:
        the bucket ending at it holds only requests that took at most `limit`)."""
        index = bucket_bound_index(limit)
        assert index is not None, "latency limits are bucket bounds (config validation)"
        return sum(self.latency_buckets[index + 1 :])


@dataclass(frozen=True, slots=True)
class Analysis:
    """A verdict with every value and threshold it was reached with (the decision record)."""

    verdict: Verdict
    reason: str
    values: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    failed: tuple[str, ...] = ()  # the metrics that failed

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "values": self.values,
            "thresholds": self.thresholds,
            "failed": list(self.failed),
        }


def thresholds_of(metrics: RolloutMetrics, min_requests: int) -> dict[str, Any]:
    thresholds: dict[str, Any] = {"min_requests": min_requests}
    if metrics.success_rate is not None:
        thresholds["success_rate_min"] = metrics.success_rate.min
    if metrics.latency_p99 is not None:
        thresholds["latency_p99_max_ms"] = _ms(metrics.latency_p99.max)
    if metrics.success_rate_vs_stable is not None:
        thresholds["success_rate_max_drop"] = metrics.success_rate_vs_stable.max_drop
    return thresholds


def analyse(
    candidate: Measured,
    baseline: Measured,
    metrics: RolloutMetrics,
    min_requests: int,
    *,
    baseline_rate: float | None = None,
) -> Analysis:
    """Judge `candidate` (the canary, or blue-green's new active) against the thresholds.

    `baseline` is the stable version over the same interval; `baseline_rate` overrides its
    success rate when the stable has no traffic of its own any more (blue-green after the
    switch: the old active's rate measured before it). Fewer than `min_requests` answers is
    `inconclusive` and nothing is judged; exactly `min_requests` is judged.
    """
    stable_rate = baseline.success_rate if baseline_rate is None else baseline_rate
    values: dict[str, Any] = {
        "requests": candidate.requests,
        "success_rate": _round(candidate.success_rate),
        "latency_p99_ms": _ms(candidate.p99),
        "stable_requests": baseline.requests,
        "stable_success_rate": _round(stable_rate),
        "stable_latency_p99_ms": _ms(baseline.p99),
    }
    thresholds = thresholds_of(metrics, min_requests)
    if candidate.requests < min_requests:
        return Analysis(
            "inconclusive",
            f"{candidate.requests} request(s) in the interval, fewer than min_requests "
            f"{min_requests}",
            values,
            thresholds,
        )
    failed: list[str] = []
    notes: list[str] = []
    rate = candidate.success_rate
    assert rate is not None and candidate.p99 is not None  # requests >= min_requests >= 1
    if metrics.success_rate is not None:
        minimum = metrics.success_rate.min
        if rate < minimum - EPSILON:
            failed.append("success_rate")
            notes.append(f"success rate {rate:.2f}% < {minimum:g}%")
        else:
            notes.append(f"success rate {rate:.2f}% >= {minimum:g}%")
    if metrics.latency_p99 is not None:
        # Judged on the count, not on the interpolated p99: a steady 110 ms against a 150 ms
        # limit interpolates to ~148 ms in the 100-150 ms bucket but has no request over it.
        limit = metrics.latency_p99.max
        slow = candidate.slower_than(limit)
        slow_percent = 100.0 * slow / candidate.requests
        values["slower_than_limit_percent"] = _round(slow_percent)
        if slow_percent > 1.0 + EPSILON:
            failed.append("latency_p99")
            notes.append(f"{slow_percent:.2f}% of requests slower than {_ms(limit):g}ms > 1%")
        else:
            notes.append(f"p99 <= {_ms(limit):g}ms ({slow_percent:.2f}% slower)")
    if metrics.success_rate_vs_stable is not None:
        max_drop = metrics.success_rate_vs_stable.max_drop
        if stable_rate is None:
            # Nothing to compare with: the absolute checks above still judge the canary.
            values["success_rate_drop"] = None
            notes.append("no stable traffic to compare with")
        else:
            drop = stable_rate - rate
            values["success_rate_drop"] = _round(drop)
            if drop > max_drop + EPSILON:
                failed.append("success_rate_vs_stable")
                notes.append(f"{drop:.2f} points below stable > {max_drop:g}")
            else:
                notes.append(f"{max(drop, 0.0):.2f} points below stable <= {max_drop:g}")
    verdict: Verdict = "fail" if failed else "pass"
    return Analysis(verdict, "; ".join(notes), values, thresholds, tuple(failed))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
