"""The analysis counters in the store: encoding the members' reports and summing windows.

envoyproxy/ratelimit style: every member adds what it served since its last report (one MULTI
of HINCRBYs) to one open hash per service, one field per (member, service, version, counter).
The leader takes that hash whole (read and delete in one script) when an analysis window starts
and when it ends, so a window holds exactly what the members reported in between: the fleet's
requests of the interval to within one report interval, with no time grid to round to. The
latency buckets are the fixed `LATENCY_BUCKETS`, so the members' histograms add up exactly.
Pure: encoding and summing only; `store.FleetStore` does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.metrics import LATENCY_BUCKETS, StatsSnapshot

# Latency slots: one per bucket bound plus +Inf.
SLOTS = len(LATENCY_BUCKETS) + 1

SEP = "|"


@dataclass(frozen=True, slots=True)
class CountKey:
    member: str
    service: str
    version: str


def encode(member: str, service: str, version: str, delta: StatsSnapshot) -> dict[str, int]:
    """The HINCRBY fields of one version's counters since the last report (zeros left out)."""
    prefix = f"{member}{SEP}{service}{SEP}{version}{SEP}"
    fields: dict[str, int] = {}
    for code, n in delta.requests.items():
        if n:
            fields[f"{prefix}r{code}"] = n
    for index, n in enumerate(delta.latency_buckets):
        if n:
            fields[f"{prefix}b{index}"] = n
    return fields


def decode(windows: Iterable[Mapping[str, str]]) -> dict[CountKey, StatsSnapshot]:
    """Sum the windows' fields into one snapshot per (member, service, version); fields that do
    not parse (another version of laneswitch) are skipped."""
    requests: dict[CountKey, dict[int, int]] = {}
    buckets: dict[CountKey, list[int]] = {}
    for window in windows:
        for name, raw in window.items():
            parts = name.split(SEP)
            if len(parts) != 4 or len(parts[3]) < 2:
                continue
            member, service, version, counter = parts
            try:
                value = int(raw)
                index = int(counter[1:])
            except ValueError:
                continue
            key = CountKey(member, service, version)
            if counter[0] == "r":
                codes = requests.setdefault(key, {})
                codes[index] = codes.get(index, 0) + value
            elif counter[0] == "b" and 0 <= index < SLOTS:
                buckets.setdefault(key, [0] * SLOTS)[index] += value
    found: dict[CountKey, StatsSnapshot] = {}
    for key in requests.keys() | buckets.keys():
        found[key] = StatsSnapshot(
            requests=requests.get(key, {}),
            latency_buckets=tuple(buckets.get(key, [0] * SLOTS)),
            latency_sum=0.0,
            upstream_errors={},
            client_aborts=0,
            drain_cut=0,
        )
    return found


def fleet_total(
    found: Mapping[CountKey, StatsSnapshot], service: str, version: str
) -> StatsSnapshot:
    """One version's counters summed over every member."""
    codes: dict[int, int] = {}
    slots = [0] * SLOTS
    for key, snapshot in found.items():
        if key.service != service or key.version != version:
            continue
        for code, n in snapshot.requests.items():
            codes[code] = codes.get(code, 0) + n
        for index, n in enumerate(snapshot.latency_buckets):
            slots[index] += n
    return StatsSnapshot(codes, tuple(slots), 0.0, {}, 0, 0)
