"""The data plane of one process: what every client connection shares.

`DataPlane` holds the current `RouteTable`, the upstream pools, the counters and the set of
client connections; it swaps tables in (draining versions that lost their traffic), runs the one
deadline ticker for every connection, and drains or cuts everything on stop.
"""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.codec import wire
from proxy.http.context import DONE
from proxy.http.protocol import DownstreamProtocol
from proxy.http.upstream_head import RequestIds
from proxy.metrics import StatsRegistry
from proxy.routing.table import RouteTable
from proxy.upstream.pool import UpstreamPools

log = logging.getLogger(__name__)

# The deadline ticker runs this often relative to the shortest timeout (and within the bounds
# below): a deadline fires at most a quarter of its timeout late, for one check of every
# connection per tick instead of a timer armed and cancelled per request.
TICKS_PER_TIMEOUT = 4
MIN_TICK = 0.05
MAX_TICK = 1.0


def version_headers(table: RouteTable) -> set[bytes]:
    """Every service's version header name (lower-cased)."""
    return {s.version_header.lower() for s in table.services if s.version_header is not None}


def control_headers(table: RouteTable) -> set[bytes]:
    """Every service's force and sticky header names (lower-cased)."""
    names: set[bytes] = set()
    for service in table.services:
        if service.force_header is not None:
            names.add(service.force_header)
        if service.sticky_header is not None:
            names.add(service.sticky_header)
    return names


def endpoint_keys(table: RouteTable) -> set[str]:
    """Every endpoint the table names ("host:port"), in any version of any service."""
    return {
        endpoint.key
        for service in table.services
        for version in service.versions
        for endpoint in version.all_endpoints
    }


class DataPlane:
    """What every client connection of this process shares."""

    __slots__ = (
        "connections",
        "drained",
        "draining",
        "drains",
        "header_kinds",
        "loop",
        "pools",
        "request_ids",
        "response_kinds",
        "stats",
        "table",
        "ticker",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        table: RouteTable,
        stats: StatsRegistry | None = None,
    ) -> None:
        self.loop = loop
        self.table = table
        self.stats = stats if stats is not None else StatsRegistry()
        self.pools = UpstreamPools(loop, table.settings.idle_timeout)
        self.connections: set[DownstreamProtocol] = set()
        self.request_ids = RequestIds()
        self.draining = False
        self.drained = asyncio.Event()  # set once draining and nothing is in flight
        self.header_kinds = wire.request_header_kinds(control_headers(table))
        self.response_kinds = wire.response_header_kinds(version_headers(table))
        self.ticker: asyncio.TimerHandle | None = None
        # Versions draining after they lost all their traffic -> the timer that cuts what is
        # left on them at drain_timeout.
        self.drains: dict[tuple[str, str], asyncio.TimerHandle] = {}

    def install(self, table: RouteTable) -> None:
        """Swap in a new routing snapshot; requests already placed keep their version, and
        versions that lost all their traffic are drained."""
        old = self.table
        self.table = table
        self.header_kinds = wire.request_header_kinds(control_headers(table))
        self.response_kinds = wire.response_header_kinds(version_headers(table))
        self.pools.set_idle_timeout(table.settings.idle_timeout)
        self._drain_losers(old, table)
        self.pools.drop(endpoint_keys(old) - endpoint_keys(table))

    def _drain_losers(self, old: RouteTable, new: RouteTable) -> None:
        """A version that lost all its traffic stops reusing its upstream connections now (idle
        ones close, busy ones after their exchange), and what is still in flight on it at
        `drain_timeout` is cut and counted."""
        for service in old.services:
            new_service = new.service(service.name)
            for version in service.versions:
                key = (service.name, version.name)
                now = new_service.version(version.name) if new_service is not None else None
                if now is not None and now.weight > 0:
                    timer = self.drains.pop(key, None)
                    if timer is not None:
                        timer.cancel()  # traffic came back before the drain ended
                    continue
                if version.weight == 0:
                    continue
                self.pools.retire(set(version.all_endpoints))
                timer = self.drains.pop(key, None)
                if timer is not None:
                    timer.cancel()
                self.drains[key] = self.loop.call_later(
                    new.settings.drain_timeout, self._cut_drained, key, time.monotonic()
                )

    def _cut_drained(self, key: tuple[str, str], began: float) -> None:
        self.drains.pop(key, None)
        cut = self.cut_version(key[0], key[1], began)
        if cut:
            log.warning("%s/%s: %d request(s) cut at the drain timeout", key[0], key[1], cut)

    def stop_drains(self) -> None:
        for timer in self.drains.values():
            timer.cancel()
        self.drains.clear()

    def start_ticker(self) -> None:
        """Start checking every connection's deadlines (header, idle, response timeouts)."""
        if self.ticker is None:
            self.ticker = self.loop.call_later(self.tick_interval(), self._tick)

    def stop_ticker(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
            self.ticker = None

    def tick_interval(self) -> float:
        settings = self.table.settings
        shortest = min(settings.header_timeout, settings.response_timeout, settings.idle_timeout)
        return min(MAX_TICK, max(MIN_TICK, shortest / TICKS_PER_TIMEOUT))

    def _tick(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            conn.check_deadlines(now)
        self.ticker = self.loop.call_later(self.tick_interval(), self._tick)

    def protocol(self) -> DownstreamProtocol:
        return DownstreamProtocol(self)

    def begin_drain(self) -> None:
        """Stop taking requests: idle clients are closed now, busy ones after their answer."""
        self.draining = True
        for conn in list(self.connections):
            conn.close_if_idle()
        self.check_drained()

    def check_drained(self) -> None:
        if self.draining and not self.in_flight():
            self.drained.set()

    def in_flight(self) -> int:
        return sum(conn.busy() for conn in self.connections)

    def cut_version(self, service: str, version: str, started_before: float) -> int:
        """Cut the requests still in flight on `service`/`version` that started before the
        drain began (monotonic time), tunnels included; each is counted in the version's
        drain_cut."""
        cut = 0
        for conn in list(self.connections):
            tunnel = conn.tunnel
            if tunnel is not None:
                if tunnel.belongs_to(service, version, started_before):
                    cut += conn.cut()
                continue
            ex = conn.active
            if (
                ex is not None
                and ex.phase is not DONE
                and ex.route is not None
                and ex.version is not None
                and ex.route.name == service
                and ex.version.name == version
                and ex.started_at <= started_before
            ):
                cut += conn.cut()
        return cut

    def cut_all(self) -> int:
        """Abort every connection still busy (the drain timed out); count each cut request."""
        cut = 0
        for conn in list(self.connections):
            cut += conn.cut()
        return cut
