"""Compile a validated `Config` (plus runtime weights and health) into a `RouteTable`.

This is the only place that reads the config model on behalf of the data plane: the data plane
sees plain snapshots, never pydantic objects (STYLE rule 7).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from proxy.config.model import Config
from proxy.config.rollout import BlueGreenRollout, CanaryRollout
from proxy.config.scalars import parse_endpoint
from proxy.config.service import ServiceConfig
from proxy.routing.splitter import smooth_weighted_schedule, sticky_ranges
from proxy.routing.table import Endpoint, RouteTable, ServiceRoute, Settings, VersionRoute


def settings_from(config: Config) -> Settings:
    return Settings(
        connect_timeout=config.timeouts.connect,
        header_timeout=config.timeouts.header,
        response_timeout=config.timeouts.response,
        idle_timeout=config.timeouts.idle,
        drain_timeout=config.drain_timeout,
        max_request_line_bytes=config.limits.max_request_line_bytes,
        max_header_bytes=config.limits.max_header_bytes,
        max_body_bytes=config.limits.max_body_bytes,
        max_connections=config.limits.max_connections,
        trusted_hops=config.trusted_hops,
    )


def rollout_roles(service: ServiceConfig) -> tuple[str | None, str | None]:
    """(canary, stable) of the service's rollout: who `always` and `never` mean."""
    rollout = service.rollout
    if isinstance(rollout, CanaryRollout):
        return rollout.canary, rollout.stable
    if isinstance(rollout, BlueGreenRollout):
        return rollout.preview, rollout.active
    return None, None


def build_service(
    name: str,
    service: ServiceConfig,
    weights: Mapping[str, int] | None = None,
    unhealthy: Collection[tuple[str, str, str]] = (),
) -> ServiceRoute:
    """One service's route; `weights` overrides the file's (a runtime switch or weights call)."""
    versions: list[VersionRoute] = []
    for version_name, version in service.versions.items():
        endpoints = tuple(Endpoint(*parse_endpoint(text)) for text in version.endpoints)
        healthy = tuple(e for e in endpoints if (name, version_name, e.key) not in unhealthy)
        weight = version.weight if weights is None else weights.get(version_name, 0)
        versions.append(
            VersionRoute(
                name=version_name,
                weight=weight,
                endpoints=healthy,
                all_endpoints=endpoints,
                name_bytes=version_name.encode(),
            )
        )
    index = {version.name: i for i, version in enumerate(versions)}
    canary, stable = rollout_roles(service)
    weight_list = [version.weight for version in versions]
    order, bounds = sticky_ranges(weight_list, index.get(canary) if canary else None)

    force_values: dict[bytes, int] = {}
    force = service.force
    if force is not None:
        force_values = {version.name_bytes: i for i, version in enumerate(versions)}
        if canary is not None and stable is not None:
            force_values[b"always"] = index[canary]
            force_values[b"never"] = index[stable]
    sticky = service.sticky
    latency = service.rollout.metrics.latency_p99 if service.rollout is not None else None
    return ServiceRoute(
        name=name,
        host=service.match.host.lower().encode(),
        path_prefix=service.match.path_prefix.encode(),
        weight_total=service.weight_total,
        versions=tuple(versions),
        schedule=smooth_weighted_schedule(weight_list),
        sticky_order=order,
        sticky_bounds=bounds,
        sticky_header=_lower(sticky.header) if sticky is not None else None,
        sticky_cookie=_raw(sticky.cookie) if sticky is not None else None,
        force_header=_lower(force.header) if force is not None else None,
        force_cookie=_raw(force.cookie) if force is not None else None,
        force_values=force_values,
        version_header=service.version_header.encode() if service.version_header else None,
        unanswered_limit=latency.max if latency is not None else 0.0,
    )


def build_table(
    config: Config,
    weights: Mapping[str, Mapping[str, int]] | None = None,
    unhealthy: Collection[tuple[str, str, str]] = (),
    generation: int = 0,
) -> RouteTable:
    """The whole snapshot. `unhealthy` holds (service, version, endpoint key) triples."""
    weights = weights or {}
    services = tuple(
        build_service(name, service, weights.get(name), unhealthy)
        for name, service in config.services.items()
    )
    return RouteTable(services=services, settings=settings_from(config), generation=generation)


def _lower(name: str | None) -> bytes | None:
    return name.lower().encode() if name else None


def _raw(name: str | None) -> bytes | None:
    return name.encode() if name else None
