"""The fleet as a member reports it: the members table, who acknowledged a change, the metrics."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from proxy.fleet.store import MemberRecord

# Bounds of `laneswitch_fleet_apply_seconds` (write in the store -> applied by this member).
APPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def is_live(record: MemberRecord, lease: float) -> bool:
    """A member is live while its last heartbeat is younger than the lease."""
    return record.age is not None and record.age < lease


def member_row(record: MemberRecord, leader: str | None, lease: float) -> dict[str, Any]:
    """One member's row in the `fleet` part of GET /status."""
    info = record.info
    return {
        "id": record.member,
        "leader": record.member == leader,
        "live": is_live(record, lease),
        "admin": info.get("admin"),
        "config_hash": info.get("config_hash"),
        "applied": info.get("applied"),
        "last_seen": round(record.age, 3) if record.age is not None else None,
        "store_up": info.get("store_up"),
        "config_behind": info.get("config_behind", {}),
        "unhealthy": info.get("unhealthy", []),
    }


def acknowledgement(
    records: Iterable[MemberRecord],
    member: str,
    target: int,
    lease: float,
    own_behind: Mapping[str, Any],
) -> dict[str, Any]:
    """Who applied generation `target` and who has yet to (`pending`: live members only).

    This member counts as acknowledged: it wrote the change. Envoy's NACK: a member that
    applied the generation but could not take the fleet's state for some service says so, with
    why, under `config_behind`.
    """
    acknowledged: list[str] = []
    pending: list[str] = []
    behind: dict[str, Any] = {}
    for record in records:
        if record.member == member:
            acknowledged.append(record.member)
        elif is_live(record, lease):
            applied = record.info.get("applied")
            done = isinstance(applied, int) and applied >= target
            (acknowledged if done else pending).append(record.member)
            if done and record.info.get("config_behind"):
                behind[record.member] = record.info["config_behind"]
    if member not in acknowledged:
        acknowledged.append(member)
    if own_behind:
        behind[member] = dict(own_behind)
    answer: dict[str, Any] = {"acknowledged": sorted(acknowledged), "pending": sorted(pending)}
    if behind:
        answer["config_behind"] = behind
    return answer


class ApplyLatency:
    """From a change written to the store to this member serving it: a fixed-bucket histogram."""

    def __init__(self) -> None:
        self.buckets = [0] * (len(APPLY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(APPLY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def metric(self) -> Metric:
        apply = HistogramMetricFamily(
            "laneswitch_fleet_apply_seconds",
            "From a change written to the store to this member serving it.",
        )
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*APPLY_BUCKETS, float("inf")), self.buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        apply.add_metric([], buckets, self.sum)
        return apply


def fleet_metrics(live: int, deciding: bool, store_up: bool, apply: ApplyLatency) -> list[Metric]:
    """The fleet's gauges as this member sees them, and its apply-latency histogram."""
    members = GaugeMetricFamily(
        "laneswitch_fleet_members", "Live members of the fleet (heartbeat within the lease)."
    )
    members.add_metric([], live)
    leader = GaugeMetricFamily(
        "laneswitch_fleet_leader", "1 on the member that leads the fleet (decides)."
    )
    leader.add_metric([], 1.0 if deciding else 0.0)
    up = GaugeMetricFamily("laneswitch_fleet_store_up", "1 while the fleet's store answers.")
    up.add_metric([], 1.0 if store_up else 0.0)
    return [members, leader, up, apply.metric()]
