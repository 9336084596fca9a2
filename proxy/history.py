"""The series behind the console's charts: per version, one row every HISTORY_STEP seconds.

Each row is `(time, rps, success_rate, p99_ms, weight)` (SPEC §10): what happened since the
previous row, computed from the same cumulative counters the data plane already keeps (two
snapshots subtract into a window, as for the status window). Rows live in fixed-size rings, so
memory is bounded by versions x HISTORY_ROWS whatever the uptime; a version that leaves the
config loses its ring at the next sample.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping

from proxy.metrics import StatsRegistry, StatsSnapshot, quantile, success_rate

# How far back the console's charts reach, and how often a row is taken (SPEC: every 5 s or
# finer); the rings hold exactly that span.
HISTORY_SECONDS = 15 * 60
HISTORY_STEP = 2.0
HISTORY_ROWS = int(HISTORY_SECONDS / HISTORY_STEP) + 1

Row = tuple[float, float, float | None, float | None, int]
Key = tuple[str, str]


class History:
    """Bounded per-version rings of chart rows, fed by `sample()`."""

    __slots__ = ("_last", "_rings", "rows", "stats")

    def __init__(self, stats: StatsRegistry, rows: int = HISTORY_ROWS) -> None:
        self.stats = stats
        self.rows = rows
        self._rings: dict[Key, deque[Row]] = {}
        # Per version: the counters at the previous row and when they were read (monotonic).
        self._last: dict[Key, tuple[float, StatsSnapshot]] = {}

    def sample(
        self,
        weights: Mapping[str, Mapping[str, int]],
        now: float | None = None,
        clock: float | None = None,
    ) -> None:
        """One row for every version in `weights` ({service: {version: weight}}, the versions
        in force). `now` is the row's UNIX time, `clock` the monotonic time rates divide by."""
        now = time.time() if now is None else now
        clock = time.monotonic() if clock is None else clock
        keys: set[Key] = set()
        for service, versions in weights.items():
            for version, weight in versions.items():
                key = (service, version)
                keys.add(key)
                current = self.stats.peek(service, version).snapshot()
                previous = self._last.get(key)
                self._last[key] = (clock, current)
                if previous is None:
                    continue  # the first reading only sets the baseline of the next row
                ring = self._rings.get(key)
                if ring is None:
                    ring = self._rings[key] = deque(maxlen=self.rows)
                ring.append(_row(now, clock - previous[0], current - previous[1], weight))
        for gone in set(self._last) - keys:
            del self._last[gone]
            self._rings.pop(gone, None)

    def series(self, service: str, since: float = 0.0) -> dict[str, list[Row]]:
        """GET /history: {version: rows at or after `since`} of one service."""
        found: dict[str, list[Row]] = {}
        for (name, version), ring in self._rings.items():
            if name == service:
                found[version] = [row for row in ring if row[0] >= since]
        for name, version in self._last:
            if name == service:
                found.setdefault(version, [])
        return found


def _row(now: float, seconds: float, window: StatsSnapshot, weight: int) -> Row:
    total = window.total
    rate = success_rate(window.requests)
    p99 = quantile(window.latency_buckets, 0.99)
    return (
        round(now, 3),
        round(total / seconds, 3) if seconds > 0 else 0.0,
        round(rate, 3) if rate is not None else None,
        round(p99 * 1000, 3) if p99 is not None else None,
        weight,
    )
