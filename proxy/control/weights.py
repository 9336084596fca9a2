"""The weight rules: what a service's weights must be, and which survive a reload or the fleet.

A switch, a weights call, a reload, a restored state file and the fleet's state all go through
`validate_weights`, so the proxy never installs weights the config file itself could not hold;
`restored_weights`, `adopted_weights` and `fleet_weights` are what a restart, a reload and the
fleet's shared state leave in force.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.config.model import Config
from proxy.config.service import ServiceConfig
from proxy.state import RuntimeState

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


def restored_weights(
    services: Mapping[str, ServiceConfig], file_weights: Mapping[str, Weights], state: RuntimeState
) -> tuple[dict[str, Weights], dict[str, Weights]]:
    """The weights and undo points of a saved `state` that come back at start-up. A service's
    saved weights are used only when they still fit the file (same versions, same total) and
    the file's own weights have not changed since they were saved: an edit made while the
    proxy was down wins, as it would on a reload."""
    weights: dict[str, Weights] = {}
    previous: dict[str, Weights] = {}
    for name, service in services.items():
        saved = state.weights.get(name)
        if saved is None or state.file_weights.get(name) != file_weights[name]:
            continue
        if validate_weights(service, saved) is None:
            weights[name] = dict(saved)
            undo = state.previous_weights.get(name)
            if undo is not None and validate_weights(service, undo) is None:
                previous[name] = dict(undo)
    return weights, previous


def adopted_weights(
    config: Config,
    weights: Mapping[str, Weights],
    file_weights: Mapping[str, Weights],
    previous: Mapping[str, Weights],
) -> tuple[dict[str, Weights], dict[str, Weights], dict[str, Weights]]:
    """A reload's `config` taken: the weights in force, the file's and the undo points. A
    service keeps its runtime weights where the file's own did not move (so an unrelated edit
    never undoes a switch) and they still fit; an undo point stays while it fits."""
    adopted: dict[str, Weights] = {}
    in_files: dict[str, Weights] = {}
    for name, service in config.services.items():
        in_file = service.file_weights()
        in_files[name] = in_file
        current = weights.get(name)
        keep = (
            current is not None
            and file_weights.get(name) == in_file
            and validate_weights(service, current) is None
        )
        adopted[name] = dict(current) if keep and current is not None else in_file
    undo = {
        name: w
        for name, w in previous.items()
        if name in config.services and validate_weights(config.services[name], w) is None
    }
    return adopted, in_files, undo


def fleet_weights(
    state: Mapping[str, Any],
    services: Mapping[str, ServiceConfig],
    current: Mapping[str, Weights],
) -> tuple[dict[str, Weights], dict[str, Weights], dict[str, str]]:
    """The fleet's shared `state` as this member's config can take it: the weights in force
    (`current` for a service whose fleet weights do not fit), the undo points, and the
    services behind (with why)."""
    behind: dict[str, str] = {}
    weights = {name: dict(w) for name, w in current.items()}
    for name, raw in mapping_of(state.get("weights")).items():
        service = services.get(name)
        if service is None:
            continue  # a service only other members' configs have
        theirs = weights_of(raw)
        problem = (
            validate_weights(service, theirs) if theirs is not None else "not a weights object"
        )
        if problem is not None:
            behind[name] = f"the fleet's weights do not fit this config: {problem}"
            continue
        assert theirs is not None
        weights[name] = theirs
    previous: dict[str, Weights] = {}
    for name, raw in mapping_of(state.get("previous_weights")).items():
        undo = weights_of(raw)
        if name in services and undo is not None and validate_weights(services[name], undo) is None:
            previous[name] = undo
    return weights, previous, behind


def rollback_weights(
    service: ServiceConfig, stable: str | None, previous: Weights | None, current: Weights
) -> tuple[Weights, str]:
    """What a rollback installs, and why: all traffic to `stable` (a rollout's stable or
    active version, or the version a promotion took it from), else, without a rollout, the
    weights before the last change."""
    if stable is not None:
        target = {
            name: (service.weight_total if name == stable else 0) for name in service.versions
        }
        return target, f"all traffic back to {stable}"
    # Nothing to undo is "no change", not a refusal: a rollback must always be safe to send
    # (an operator or a script repeating it in a panic).
    return dict(previous if previous is not None else current), "weights before the last change"
