"""Routing units: the splitter's shares, sticky monotonicity, force precedence, host matching."""

from __future__ import annotations

import pickle
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.loader import parse_config
from proxy.routing.build import build_table
from proxy.routing.splitter import (
    choose_version,
    smooth_weighted_schedule,
    stable_hash,
)
from proxy.routing.table import RouteTable, ServiceRoute

CANARY_ROLLOUT = (
    "    rollout: {strategy: canary, stable: stable, canary: canary, step_weights: [50],"
    " metrics: {success_rate: {min: 99}}}"
)


def service_config(
    weights: dict[str, int],
    weight_total: int = 100,
    extra: str = "",
    rollout: str = "",
) -> str:
    versions = "\n".join(
        f'      {name}: {{endpoints: ["127.0.0.1:{9000 + i}"], weight: {w}}}'
        for i, (name, w) in enumerate(weights.items())
    )
    return f"""
services:
  shop:
    weight_total: {weight_total}
    versions:
{versions}
{extra}
{rollout}
"""


def route(
    weights: dict[str, int], weight_total: int = 100, extra: str = "", rollout: str = ""
) -> ServiceRoute:
    table = build_table(parse_config(service_config(weights, weight_total, extra, rollout), env={}))
    service = table.service("shop")
    assert service is not None
    return service


def test_weighted_shares_within_one_point_over_10000_picks() -> None:
    for weights in ({"stable": 90, "canary": 10}, {"a": 33, "b": 33, "c": 34}, {"s": 99, "c": 1}):
        service = route(weights)
        counts = Counter(choose_version(service).name for _ in range(10_000))
        for name, weight in weights.items():
            assert abs(counts[name] / 100 - weight) <= 1, (weights, counts)


def test_fine_weight_resolution_is_exact() -> None:
    service = route({"stable": 9999, "canary": 1}, weight_total=10_000)
    counts = Counter(choose_version(service).name for _ in range(20_000))
    assert counts == {"stable": 19_998, "canary": 2}


def test_smooth_schedule_spreads_picks() -> None:
    schedule = smooth_weighted_schedule([5, 1, 1])
    assert schedule == (0, 0, 1, 0, 2, 0, 0)
    assert smooth_weighted_schedule([90, 10]).count(1) == 1  # reduced by the gcd
    assert smooth_weighted_schedule([0, 0]) == ()


def test_zero_weight_version_gets_no_weighted_traffic() -> None:
    service = route({"stable": 100, "canary": 0})
    assert {choose_version(service).name for _ in range(500)} == {"stable"}


def test_stable_hash_is_fixed_across_processes() -> None:
    # A literal: if this changes, every replica and restart would reshuffle users.
    # blake2b-64 of b"shop\0alice", big-endian.
    assert stable_hash("shop", b"alice") == 0xE8C8D5E9C1AB2573


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.binary(min_size=1, max_size=16), min_size=1, max_size=50),
    low=st.integers(min_value=0, max_value=100),
    high=st.integers(min_value=0, max_value=100),
)
def test_raising_canary_weight_never_moves_a_key_from_canary_to_stable(
    keys: list[bytes], low: int, high: int
) -> None:
    low, high = sorted((low, high))
    rollout = CANARY_ROLLOUT
    extra = "    sticky: {header: X-User-Id}"

    def service(canary: int) -> ServiceRoute:
        weights = {"stable": 100 - canary, "canary": canary}
        if canary == 0:
            weights = {"stable": 100, "canary": 0}
        return route(weights, extra=extra, rollout=rollout)

    before, after = service(low), service(high)
    for key in keys:
        if choose_version(before, sticky_key=key).name == "canary":
            assert choose_version(after, sticky_key=key).name == "canary"


def test_sticky_share_matches_weight_and_canary_owns_the_first_buckets() -> None:
    rollout = CANARY_ROLLOUT
    service = route(
        {"stable": 80, "canary": 20}, extra="    sticky: {header: X-User-Id}", rollout=rollout
    )
    assert service.versions[service.sticky_order[0]].name == "canary"
    counts = Counter(choose_version(service, sticky_key=b"user-%d" % i).name for i in range(10_000))
    assert abs(counts["canary"] / 100 - 20) <= 2
    # the same key always lands on the same version
    assert len({choose_version(service, sticky_key=b"bob").name for _ in range(50)}) == 1


def test_force_precedence_header_then_cookie_then_sticky() -> None:
    rollout = CANARY_ROLLOUT
    extra = "    sticky: {header: X-User-Id}\n    force: {header: X-Canary, cookie: canary}"
    service = route({"stable": 100, "canary": 0}, extra=extra, rollout=rollout)
    pick = choose_version
    assert pick(service, force_header=b"always").name == "canary"
    assert pick(service, force_header=b"never", force_cookie=b"always").name == "stable"
    assert pick(service, force_header=b"bogus", force_cookie=b"canary").name == "canary"
    assert pick(service, force_cookie=b"always", sticky_key=b"u1").name == "canary"
    assert pick(service, force_header=b"bogus", sticky_key=b"u1").name == "stable"


def test_without_rollout_only_version_names_force() -> None:
    extra = "    force: {header: X-Canary}"
    service = route({"blue": 100, "green": 0}, extra=extra)
    assert choose_version(service, force_header=b"green").name == "green"
    assert choose_version(service, force_header=b"always").name == "blue"


def test_host_match_exact_beats_wildcard_then_longest_prefix() -> None:
    config = parse_config(
        """
services:
  any:
    versions: {v: {endpoints: ["127.0.0.1:1"], weight: 100}}
  api:
    match: {host: "*", path_prefix: /api}
    versions: {v: {endpoints: ["127.0.0.1:2"], weight: 100}}
  shop:
    match: {host: Shop.Example, path_prefix: /}
    versions: {v: {endpoints: ["127.0.0.1:3"], weight: 100}}
  shop-api:
    match: {host: shop.example, path_prefix: /api/v2}
    versions: {v: {endpoints: ["127.0.0.1:4"], weight: 100}}
""",
        env={},
    )
    table = build_table(config)

    def name(host: bytes, path: bytes) -> str | None:
        service = table.match(host, path)
        return service.name if service else None

    assert name(b"other", b"/") == "any"
    assert name(b"other", b"/api/x") == "api"
    assert name(b"shop.example", b"/api/x") == "shop"
    assert name(b"shop.example", b"/api/v2/x") == "shop-api"


def test_route_table_is_picklable_for_workers() -> None:
    table = build_table(parse_config(service_config({"a": 50, "b": 50}), env={}))
    clone = pickle.loads(pickle.dumps(table))
    assert isinstance(clone, RouteTable)
    assert clone.services == table.services
    assert clone.match(b"x", b"/") is not None


def test_endpoint_round_robin_and_unhealthy_endpoints_skipped() -> None:
    config = parse_config(
        """
services:
  shop:
    versions:
      v: {endpoints: ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], weight: 100}
""",
        env={},
    )
    service = build_table(config).services[0]
    picks = [service.versions[0].next_endpoint() for _ in range(6)]
    assert [p.port for p in picks if p] == [1, 2, 3, 1, 2, 3]
    degraded = build_table(config, unhealthy={("shop", "v", "127.0.0.1:2")}).services[0]
    assert {e.port for e in degraded.versions[0].endpoints} == {1, 3}
