"""What a rollout block says of its release: the roles, the steps as weights, the fingerprint.

Pure functions of the config: who is the candidate and who the baseline, how many steps, what a
step's percent is in weight units, and what identifies the candidate's build (a new one starts a
new run).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.config.rollout import CanaryRollout
from proxy.config.service import ServiceConfig
from proxy.rollout.analysis import thresholds_of
from proxy.rollout.values import Rollout, Weights


def roles(rollout: Rollout) -> tuple[str, str]:
    """(candidate, baseline): the canary and the stable, or the preview and the active."""
    if isinstance(rollout, CanaryRollout):
        return rollout.canary, rollout.stable
    return rollout.preview, rollout.active


def step_count(rollout: Rollout) -> int:
    return len(rollout.steps()) if isinstance(rollout, CanaryRollout) else 1


def progress_deadline(rollout: Rollout) -> float:
    return rollout.progress_deadline


def fingerprint(service: ServiceConfig, rollout: Rollout) -> str:
    """What identifies the release being rolled out: a change (same role) starts a new run."""
    candidate, _ = roles(rollout)
    version = service.versions[candidate]
    endpoints = ",".join(sorted(version.endpoints))
    return f"{candidate}|{version.revision or ''}|{endpoints}"


def describe_change(old: str, new: str) -> str | None:
    """What differs between two fingerprints of the same candidate, for an event's reason
    ("canary revision 2.0 -> 2.1"); None when they are the same release."""
    if old == new:
        return None
    candidate, old_revision, old_endpoints = [*old.split("|", 2), "", ""][:3]
    _, new_revision, new_endpoints = [*new.split("|", 2), "", ""][:3]
    changes = []
    if old_revision != new_revision:
        changes.append(f"revision {old_revision or '-'} -> {new_revision or '-'}")
    if old_endpoints != new_endpoints:
        changes.append(f"endpoints {old_endpoints or '-'} -> {new_endpoints or '-'}")
    return f"{candidate} {', '.join(changes) or 'changed'}"


def percent_units(service: ServiceConfig, percent: float) -> int:
    """Percent of traffic -> weight units (validation makes every step representable)."""
    return round(percent * service.weight_total / 100)


def weights_with(
    service: ServiceConfig, current: Mapping[str, int], candidate: str, baseline: str, units: int
) -> Weights:
    """`units` to the candidate, the rest of the two roles' traffic to the baseline; any other
    version keeps its weight."""
    others = {n: current.get(n, 0) for n in service.versions if n not in (candidate, baseline)}
    free = service.weight_total - sum(others.values())
    units = max(0, min(units, free))
    result = dict(others)
    result[candidate] = units
    result[baseline] = free - units
    return {name: result[name] for name in service.versions}


def rollout_thresholds(rollout: Rollout) -> dict[str, Any]:
    """What every interval of the run is judged against, with the threshold and interval."""
    thresholds = thresholds_of(rollout.metrics, rollout.min_requests)
    thresholds["threshold"] = rollout.threshold
    thresholds["interval_s"] = rollout.interval
    return thresholds
