"""Picking a version for a request: force, then sticky key, then weighted. Pure.

The sticky hash is blake2b over `service NUL key`, so every process, restart and replica agrees
on a user's bucket, which Python's randomised `hash()` would not.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from math import gcd

from proxy.routing.table import ServiceRoute, VersionRoute


def stable_hash(service: str, key: bytes) -> int:
    """A 64-bit hash of (service, key) that is the same everywhere, forever."""
    digest = hashlib.blake2b(service.encode() + b"\0" + key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def smooth_weighted_schedule(weights: list[int]) -> tuple[int, ...]:
    """One cycle of nginx's smooth weighted round-robin, as indexes into `weights`.

    The cycle is as long as the sum of the weights divided by their gcd, and every index appears
    exactly weight/gcd times in it, spread out rather than in runs.
    """
    positive = [w for w in weights if w > 0]
    if not positive:
        return ()
    divisor = 0
    for w in positive:
        divisor = gcd(divisor, w)
    reduced = [w // divisor for w in weights]
    total = sum(reduced)
    current = [0] * len(reduced)
    schedule: list[int] = []
    for _ in range(total):
        best = -1
        for index, weight in enumerate(reduced):
            if weight <= 0:
                continue
            current[index] += weight
            if best == -1 or current[index] > current[best]:
                best = index
        current[best] -= total
        schedule.append(best)
    return tuple(schedule)


def sticky_ranges(weights: list[int], first: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Contiguous bucket ranges: (version order, cumulative upper bounds), `first` leading.

    With the canary first, raising its weight only grows its range at the expense of the ones
    after it, so a user only ever moves from stable to canary, never back.
    """
    order = list(range(len(weights)))
    if first is not None:
        order.remove(first)
        order.insert(0, first)
    bounds: list[int] = []
    upper = 0
    for index in order:
        upper += weights[index]
        bounds.append(upper)
    return tuple(order), tuple(bounds)


def pick_weighted(route: ServiceRoute) -> VersionRoute:
    schedule = route.schedule
    cursor = route.cursor  # Cursor.advance, inlined: this runs for every request
    n = cursor.n
    cursor.n = n + 1 if n + 1 < len(schedule) else 0
    return route.versions[schedule[n]]


def pick_sticky(route: ServiceRoute, key: bytes) -> VersionRoute:
    bucket = stable_hash(route.name, key) % route.weight_total
    position = bisect_right(route.sticky_bounds, bucket)
    return route.versions[route.sticky_order[position]]


def choose_version(
    route: ServiceRoute,
    force_header: bytes | None = None,
    force_cookie: bytes | None = None,
    sticky_key: bytes | None = None,
) -> VersionRoute:
    """The version for one request; an unknown force value falls through."""
    if force_header is not None:
        index = route.force_values.get(force_header.strip())
        if index is not None:
            return route.versions[index]
    if force_cookie is not None:
        index = route.force_values.get(force_cookie)
        if index is not None:
            return route.versions[index]
    if sticky_key:
        return pick_sticky(route, sticky_key)
    return pick_weighted(route)
