"""The routing snapshot: what the data plane reads, once per request, to place it.

A `RouteTable` is plain, picklable data built by the control plane (config + runtime weights +
health) and swapped whole. The only mutable parts are the round-robin `Cursor`s, which are
process-local positions, not routing state: a new table starts them afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Cursor:
    """A process-local round-robin position."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __getstate__(self) -> int:
        return self.n

    def __setstate__(self, state: int) -> None:
        self.n = state

    def advance(self, modulo: int) -> int:
        n = self.n
        self.n = n + 1 if n + 1 < modulo else 0
        return n


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    # `host:port`, brackets around an IPv6 host, as in the config and the metrics labels. Also
    # the pools' dict key: a str hashes once, a dataclass would hash its fields on every lookup.
    key: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        key = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        object.__setattr__(self, "key", key)


@dataclass(frozen=True, slots=True)
class VersionRoute:
    name: str
    weight: int
    endpoints: tuple[Endpoint, ...]  # the healthy ones, in config order
    all_endpoints: tuple[Endpoint, ...]
    name_bytes: bytes = b""
    cursor: Cursor = field(default_factory=Cursor, compare=False)

    def next_endpoint(self) -> Endpoint | None:
        endpoints = self.endpoints
        if len(endpoints) <= 1:
            return endpoints[0] if endpoints else None  # the cursor would stay at 0
        return endpoints[self.cursor.advance(len(endpoints))]

    def other_endpoint(self, tried: Endpoint) -> Endpoint | None:
        """The next healthy endpoint that is not `tried`, for the one connect retry."""
        for _ in range(len(self.endpoints)):
            candidate = self.next_endpoint()
            if candidate is not None and candidate != tried:
                return candidate
        return None


@dataclass(frozen=True, slots=True)
class ServiceRoute:
    name: str
    host: bytes  # lower-cased exact host, or b"*"
    path_prefix: bytes
    weight_total: int
    versions: tuple[VersionRoute, ...]
    # One full cycle of a smooth weighted round-robin, as version indexes (exact long-run shares).
    schedule: tuple[int, ...]
    # Sticky buckets: version `sticky_order[i]` owns buckets below `sticky_bounds[i]`
    # (and at or above the previous bound); the rollout's canary comes first.
    sticky_order: tuple[int, ...]
    sticky_bounds: tuple[int, ...]
    sticky_header: bytes | None = None  # lower-cased
    sticky_cookie: bytes | None = None
    force_header: bytes | None = None  # lower-cased
    force_cookie: bytes | None = None
    force_values: dict[bytes, int] = field(default_factory=dict)  # value -> version index
    version_header: bytes | None = None
    # Seconds a client may wait for a response head before giving up counts against the
    # version as a timeout (the rollout's latency limit); 0: the response timeout.
    unanswered_limit: float = 0.0
    cursor: Cursor = field(default_factory=Cursor, compare=False)

    def version(self, name: str) -> VersionRoute | None:
        for version in self.versions:
            if version.name == name:
                return version
        return None


@dataclass(frozen=True, slots=True)
class Settings:
    """Timeouts (seconds) and limits (bytes, counts) the data plane enforces."""

    connect_timeout: float = 2.0
    header_timeout: float = 10.0
    response_timeout: float = 30.0
    idle_timeout: float = 60.0
    drain_timeout: float = 30.0
    max_request_line_bytes: int = 8192
    max_header_bytes: int = 65536
    max_body_bytes: int = 0  # 0 = unlimited
    max_connections: int = 10000
    trusted_hops: int = 0


@dataclass(frozen=True, slots=True)
class RouteTable:
    services: tuple[ServiceRoute, ...]
    settings: Settings = field(default_factory=Settings)
    generation: int = 0
    # Derived indexes, filled by __post_init__: exact host -> services by descending prefix length.
    by_host: dict[bytes, tuple[ServiceRoute, ...]] = field(default_factory=dict, compare=False)
    wildcard: tuple[ServiceRoute, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        by_host: dict[bytes, list[ServiceRoute]] = {}
        for service in self.services:
            by_host.setdefault(service.host, []).append(service)
        ordered = {
            host: tuple(sorted(routes, key=lambda s: len(s.path_prefix), reverse=True))
            for host, routes in by_host.items()
        }
        object.__setattr__(self, "wildcard", ordered.pop(b"*", ()))
        object.__setattr__(self, "by_host", ordered)

    def match(self, host: bytes, path: bytes) -> ServiceRoute | None:
        """The service for a request: an exact host beats "*", then the longest path prefix."""
        exact = self.by_host.get(host)
        if exact is not None:
            for service in exact:
                if path.startswith(service.path_prefix):
                    return service
        for service in self.wildcard:
            if path.startswith(service.path_prefix):
                return service
        return None

    def service(self, name: str) -> ServiceRoute | None:
        for service in self.services:
            if service.name == name:
                return service
        return None
