"""The latency histogram's bucket bounds: one fixed list for every process and replica.

Fixed so that histograms of workers and fleet members add up exactly, and dense around the
values operators set as a rollout's latency limit: a `latency_p99.max` must be one of them, so
the analysis counts exactly how many requests took longer than the limit.
"""

from __future__ import annotations

# Upper bounds (seconds) of the buckets; +Inf is implied after the last one.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    2.5,
    3.0,
    5.0,
    10.0,
    30.0,
)


def bucket_bound_index(seconds: float) -> int | None:
    """The index of the bound equal to `seconds` (within float noise), else None."""
    for index, bound in enumerate(LATENCY_BUCKETS):
        if abs(bound - seconds) <= 1e-9:
            return index
    return None
