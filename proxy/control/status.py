"""GET /status: the control plane's state as one JSON document, read by the console and CLI.

Per service and version: the weight in force and its share, the endpoints' health, the recent
window of the proxy's own counters, the rollout's run and the last decision; then the config,
the state file and, in a fleet, the members.
"""

from __future__ import annotations

from typing import Any

from proxy.control.plane import ControlPlane
from proxy.metrics import StatsSnapshot, quantile, success_rate


def status_json(control: ControlPlane) -> dict[str, Any]:
    """The JSON of GET /status."""
    services: dict[str, Any] = {}
    for name, service in control.config.services.items():
        versions: dict[str, Any] = {}
        for version_name, version in service.versions.items():
            stats = control.stats.peek(name, version_name)
            window = control.window.delta(name, version_name)
            versions[version_name] = {
                "weight": control.weights[name].get(version_name, 0),
                "share": round(control.share(name, version_name), 4),
                "revision": version.revision,
                "in_flight": stats.in_flight,
                "endpoints": [
                    {
                        "address": endpoint,
                        "healthy": (name, version_name, endpoint) not in control.unhealthy,
                    }
                    for endpoint in version.endpoints
                ],
                "window": window_summary(window, control.window.seconds),
            }
        last = control.events.last(name)
        services[name] = {
            "weight_total": service.weight_total,
            "versions": versions,
            "rollout": control.rollouts.status(name),
            "last_decision": last.to_json() if last is not None else None,
        }
    result: dict[str, Any] = {
        "ready": control.ready,
        "draining": control.draining,
        "generation": control.generation,
        "config": {
            "path": control.config_path,
            "hash": control.config_hash,
            "loaded_at": control.loaded_at,
            "last_reload_error": control.last_reload_error,
        },
        "state_file": {
            "path": control.config.state_file,
            "entries_skipped": control.state_entries_skipped,
            "write_failures": control.state_writes.failures,
            "last_write_error": control.state_writes.error,
        },
        "services": services,
    }
    fleet = control.backend.status()
    if fleet is not None:
        result["fleet"] = fleet
        for name, why in control.config_behind.items():
            if name in services:
                services[name]["config_behind"] = why
    return result


def window_summary(window: StatsSnapshot | None, seconds: float) -> dict[str, Any]:
    """Request count, success rate and p99 of a version over the status window."""
    if window is None:
        return {"seconds": seconds, "requests": 0, "success_rate": None, "p99_ms": None}
    p99 = quantile(window.latency_buckets, 0.99)
    rate = success_rate(window.requests)
    return {
        "seconds": seconds,
        "requests": window.total,
        "success_rate": round(rate, 3) if rate is not None else None,
        "p99_ms": round(p99 * 1000, 3) if p99 is not None else None,
        "upstream_errors": window.upstream_errors,
        "client_aborts": window.client_aborts,
    }
