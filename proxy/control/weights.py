"""The weight rules: what a service's weights must be, and reading weights from shared JSON.

A switch, a weights call, a reload, a restored state file and the fleet's state all go through
`validate_weights`, so the proxy never installs weights the config file itself could not hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.config.service import ServiceConfig

Weights = dict[str, int]


def validate_weights(service: ServiceConfig, weights: Mapping[str, int]) -> str | None:
    """Why `weights` break the config file's weight rules for `service`, or None when they don't."""
    if set(weights) != set(service.versions):
        return "weights must name exactly the service's versions"
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int):
            return f"{name}: weight must be an integer"
        if weight < 0:
            return f"{name}: weight must be >= 0"
    total = sum(weights.values())
    if total == 0:
        return "at least one version needs a weight above 0"
    if total != service.weight_total:
        return f"weights sum to {total}, must equal weight_total {service.weight_total}"
    return None


def mapping_of(value: Any) -> dict[str, Any]:
    """A JSON object's entries, keyed by string; {} for anything but an object."""
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def weights_of(value: Any) -> Weights | None:
    """A JSON object of integer weights, or None when `value` is not one."""
    if not isinstance(value, dict):
        return None
    if not all(isinstance(w, int) and not isinstance(w, bool) for w in value.values()):
        return None
    return {str(k): int(w) for k, w in value.items()}
