"""The data plane: one `asyncio.Protocol` per client connection, httptools callbacks, no tasks.

A client connection parses requests with httptools; each complete request head becomes an
`Exchange`. One exchange at a time is *active* (its response is being written); pipelined ones
queue behind it. The active exchange reads the current `RouteTable` once, picks a version and an
endpoint, takes a pooled upstream connection (or opens one: the only await on the request path),
streams the request body up and the response back, with backpressure both ways.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from proxy.errors import Failure
from proxy.http import wire
from proxy.http.flow import (
    BODY_BUFFER_FULL,
    PEER_WRITE_BLOCKED,
    PIPELINE_FULL,
    TUNNEL_PENDING,
    ReadGate,
    set_write_limits,
)
from proxy.metrics import StatsRegistry, VersionStats
from proxy.routing.splitter import choose_version, pick_weighted
from proxy.routing.table import Endpoint, RouteTable, ServiceRoute, VersionRoute
from proxy.upstream.pool import UpstreamPool, UpstreamPools

if TYPE_CHECKING:
    from proxy.upstream.connection import UpstreamConnection

log = logging.getLogger(__name__)

# Parsed requests allowed to wait behind the active one before the client's reads pause; bounds
# the memory a pipelining client can make us hold.
MAX_PIPELINE = 16

# Request body bytes held while an exchange waits for its upstream connection (or its turn in the
# pipeline) before the client's reads pause.
MAX_BUFFERED_BODY = 64 * 1024

# Bytes a client may send after an Upgrade request before the upstream has answered it.
MAX_UPGRADE_EARLY_BYTES = 64 * 1024

# The two spaces and "HTTP/1.1" around method and target in a request line.
REQUEST_LINE_OVERHEAD = 10

# At least as long as any method llhttp parses (the longest, GET_PARAMETER, has 13 bytes).
LONGEST_METHOD = 16

_HEADER = 1
_IDLE = 2

NEVER = float("inf")

# The deadline ticker runs this often relative to the shortest timeout (and within the bounds
# below): a deadline fires at most a quarter of its timeout late, for one check of every
# connection per tick instead of a timer armed and cancelled per request.
TICKS_PER_TIMEOUT = 4
MIN_TICK = 0.05
MAX_TICK = 1.0
_NO_BODY_STATUS = frozenset({204, 304})

# The headers the proxy adds to every request it forwards (SPEC §7), filled in one formatting.
_FORWARDED = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\nX-Request-Id: %s\r\n"
_FORWARDED_WITH_HOST = (
    b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: %s\r\n"
    b"X-Request-Id: %s\r\n"
)


class _StopParsing(Exception):
    """Raised from a parser callback to stop httptools in the middle of a feed.

    httptools reports it as an HttpParserCallbackError whose __context__ is this exception.
    """


class RequestIds:
    """X-Request-Id values: a random per-process prefix and a counter, unique and cheap."""

    __slots__ = ("count", "prefix")

    def __init__(self) -> None:
        self.prefix = os.urandom(8).hex().encode()
        self.count = 0

    def next(self) -> bytes:
        self.count += 1
        return b"%s-%x" % (self.prefix, self.count)


def control_headers(table: RouteTable) -> set[bytes]:
    """Every service's force and sticky header names (lower-cased)."""
    names: set[bytes] = set()
    for service in table.services:
        if service.force_header is not None:
            names.add(service.force_header)
        if service.sticky_header is not None:
            names.add(service.sticky_header)
    return names


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
        self.pools.set_idle_timeout(table.settings.idle_timeout)
        self._drain_losers(old, table)

    def _drain_losers(self, old: RouteTable, new: RouteTable) -> None:
        """A version that lost all its traffic stops reusing its upstream connections now (idle
        ones close, busy ones after their exchange), and what is still in flight on it at
        `drain_timeout` is cut and counted (SPEC §8 promise 2)."""
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
        drain began (monotonic time); each is counted in the version's drain_cut."""
        cut = 0
        for conn in list(self.connections):
            ex = conn.active
            if (
                ex is not None
                and not ex.done
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


class Exchange:
    """One request and its response."""

    __slots__ = (
        "body_buffer",
        "body_buffered",
        "body_received",
        "chunked_in",
        "chunked_out",
        "close_after",
        "connect_task",
        "content_length",
        "done",
        "endpoint",
        "failure",
        "host",
        "host_line",
        "http_10",
        "keep_alive",
        "lines",
        "method",
        "named_by_connection",
        "out",
        "proto",
        "request_complete",
        "request_head",
        "request_sent",
        "response_deadline",
        "response_started",
        "retried",
        "route",
        "special",
        "started_at",
        "stats",
        "status",
        "upgrade",
        "upstream",
        "url",
        "version",
    )

    def __init__(self, proto: DownstreamProtocol) -> None:
        self.proto = proto
        # Request, as parsed.
        self.method = b""
        self.url = b""
        # The head, sorted as it is parsed: lines forwarded verbatim, and the headers the proxy
        # acts on as (kind, lower-cased name, name, value); see the kinds in `wire`.
        self.lines: list[bytes] = []
        self.special: list[tuple[int, bytes, bytes, bytes]] = []
        self.host: bytes | None = None
        # Without a Host (HTTP/1.0), an empty one: RFC 9112 §3.2, for the HTTP/1.1 upstream.
        self.host_line = b"Host: \r\n"
        self.named_by_connection: frozenset[bytes] = frozenset()
        self.http_10 = False
        self.keep_alive = True
        self.upgrade = False
        self.chunked_in = False
        self.content_length = -1
        self.body_received = 0
        self.request_complete = False
        self.failure: Failure | None = None  # set: answer this locally when the turn comes
        # Request body waiting for the upstream connection.
        self.body_buffer: list[bytes] = []
        self.body_buffered = 0
        # Placement.
        self.route: ServiceRoute | None = None
        self.version: VersionRoute | None = None
        self.stats: VersionStats | None = None
        self.endpoint: Endpoint | None = None
        self.started_at = 0.0
        self.request_head = b""
        self.upstream: UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.retried = False
        self.request_sent = False  # head and the whole body written to the upstream
        self.response_deadline = NEVER  # monotonic time by which the response must start
        # Response.
        self.response_started = False
        self.status = 0
        self.chunked_out = False
        self.close_after = False
        self.out: list[bytes] = []  # response bytes gathered during one upstream read
        self.done = False

    def __repr__(self) -> str:
        return f"<Exchange {self.method.decode()} {self.url[:60]!r} status={self.status}>"

    # -- request body, from the client -----------------------------------------------------------

    def body_unread(self) -> bool:
        """Part of the request body has not been read from the client yet."""
        return not self.request_complete and (self.content_length > 0 or self.chunked_in)

    def body(self, data: bytes) -> None:
        if self.done:
            return  # answered already; the rest of the body is dropped
        self.body_received += len(data)
        limit = self.proto.settings.max_body_bytes
        if limit and self.body_received > limit:
            self.proto.fail_request(self, Failure.BODY_TOO_LARGE)
            return
        upstream = self.upstream
        if upstream is not None:
            upstream.write(wire.chunk(data) if self.chunked_in else data)
            return
        self.body_buffer.append(data)
        self.body_buffered += len(data)
        if self.body_buffered > MAX_BUFFERED_BODY:
            self.proto.gate_pause(BODY_BUFFER_FULL)

    def body_complete(self) -> None:
        self.request_complete = True
        upstream = self.upstream
        if upstream is not None and not self.done:
            if self.chunked_in:
                upstream.write(wire.LAST_CHUNK)
            self._request_sent()

    # -- placement --------------------------------------------------------------------------------

    def start(self) -> None:
        """The exchange's turn: route it and send it upstream, or answer it locally."""
        proto = self.proto
        if self.failure is not None:
            proto.answer(self, self.failure)
            return
        plane = proto.plane
        if plane.draining:
            self.close_after = True
        table = plane.table
        host = self.host
        if host is None:
            hostname = b""
        elif host == proto.host_raw:
            hostname = proto.host_name  # a keep-alive client sends the same Host every time
        else:
            hostname = proto.host_name = wire.split_host_port(host)
            proto.host_raw = host
        url = self.url
        query = url.find(b"?")
        path = url if query == -1 else url[:query]
        route = table.match(hostname, path)
        if route is None:
            proto.answer(self, Failure.NO_SERVICE)
            return
        self.route = route
        settings = table.settings
        self.request_head = self._build_upstream_head(route, proto.peer, settings.trusted_hops)
        version = self.version
        assert version is not None
        stats = plane.stats.get(route.name, version.name)
        self.stats = stats
        stats.in_flight += 1
        self.started_at = time.monotonic()
        endpoint = version.next_endpoint()
        if endpoint is None:
            proto.answer(self, Failure.NO_HEALTHY_ENDPOINT)
            return
        self._dispatch(endpoint)

    def _build_upstream_head(self, route: ServiceRoute, peer: bytes, trusted_hops: int) -> bytes:
        """Pick the version and write the request head the upstream gets (SPEC §3, §7)."""
        force_value: bytes | None = None
        sticky_value: bytes | None = None
        cookies: list[bytes] = []
        xff: list[bytes] = []
        request_id: bytes | None = None
        upgrade: bytes | None = None
        lines = self.lines
        if self.named_by_connection:
            lines = wire.drop_named(lines, self.named_by_connection)
        # The head in pieces, joined once: request line, Host, the client's headers forwarded
        # verbatim, those the proxy handles, then its own.
        parts = [self.method, b" ", self.url, b" HTTP/1.1\r\n", self.host_line]
        parts += lines
        for kind, lname, name, value in self.special:
            if kind == wire.HOST:
                continue  # sent first, as host_line
            if kind == wire.CONTENT_LENGTH:
                parts.append(name + b": " + value + b"\r\n")
            elif kind == wire.COOKIE:
                cookies.append(value)
            elif kind == wire.FORWARDED_FOR:
                xff.append(value)
            elif kind == wire.REQUEST_ID:
                if value:
                    request_id = value
            elif kind == wire.CONTROL:
                if lname == route.force_header:
                    force_value = value  # a control header never reaches the upstream
                    continue
                if lname == route.sticky_header:
                    sticky_value = value
                if lname not in self.named_by_connection:
                    parts.append(name + b": " + value + b"\r\n")
            elif kind == wire.UPGRADE:
                upgrade = value
        force_cookie_value: bytes | None = None
        if cookies:
            force_cookie = route.force_cookie
            if force_cookie is not None:
                force_cookie_value = wire.cookie_value(cookies, force_cookie)
                cookies = [wire.remove_cookie(c, force_cookie) for c in cookies]
            if route.sticky_cookie is not None and sticky_value is None:
                sticky_value = wire.cookie_value(cookies, route.sticky_cookie)
            parts.extend(b"Cookie: " + c + b"\r\n" for c in cookies if c)
        if force_value is None and force_cookie_value is None and not sticky_value:
            self.version = pick_weighted(route)
        else:
            self.version = choose_version(route, force_value, force_cookie_value, sticky_value)
        if request_id is None:
            request_id = self.proto.plane.request_ids.next()
        client = wire.forwarded_for(xff, peer, trusted_hops) if xff else peer
        if self.host is not None:
            forwarded = _FORWARDED_WITH_HOST % (client, self.host, request_id)
        else:
            forwarded = _FORWARDED % (client, request_id)
        if self.chunked_in:
            forwarded += b"Transfer-Encoding: chunked\r\n"
        if self.upgrade and upgrade is not None:
            forwarded += b"Connection: upgrade\r\nUpgrade: " + upgrade + b"\r\n"
        parts.append(forwarded)
        parts.append(b"\r\n")
        return b"".join(parts)

    def _dispatch(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        pool = self.proto.plane.pools.get(endpoint)
        conn = pool.take_idle()
        if conn is not None:
            self._attach(conn)
        else:
            self.connect_task = self.proto.plane.loop.create_task(self._connect(pool))

    async def _connect(self, pool: UpstreamPool) -> None:
        settings = self.proto.plane.table.settings
        try:
            conn = await pool.connect(settings.connect_timeout)
        except (OSError, TimeoutError) as exc:
            self.connect_task = None
            if self.done:
                return
            failure = (
                Failure.UPSTREAM_CONNECT_TIMEOUT
                if isinstance(exc, TimeoutError)
                else Failure.UPSTREAM_CONNECT
            )
            self._count_upstream_error(failure)
            # Nothing was sent, so one more endpoint of the same version is safe for any method.
            version = self.version
            if not self.retried and version is not None and pool.endpoint is not None:
                self.retried = True
                other = version.other_endpoint(pool.endpoint)
                if other is not None:
                    self._dispatch(other)
                    return
            self.proto.answer(self, failure)
            return
        self.connect_task = None
        if self.done:
            conn.release(reusable=True)  # the client left while we connected; keep it warm
            return
        self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        conn.begin(self, head_only=self.method == b"HEAD")
        if self.body_buffer:
            body = self.body_buffer
            if self.chunked_in:
                body = [wire.chunk(data) for data in body]
            conn.write(b"".join([self.request_head, *body]))
            self.body_buffer = []
            self.body_buffered = 0
            self.proto.gate_resume(BODY_BUFFER_FULL)
        else:
            conn.write(self.request_head)
        if self.request_complete:
            if self.chunked_in:
                conn.write(wire.LAST_CHUNK)
            self._request_sent()
        if self.proto.write_blocked:
            conn.pause_reading(PEER_WRITE_BLOCKED)

    def _request_sent(self) -> None:
        self.request_sent = True
        if not self.response_started and self.response_deadline == NEVER:
            self.response_deadline = time.monotonic() + self.proto.settings.response_timeout

    def response_timed_out(self) -> None:
        self.response_deadline = NEVER
        if self.done or self.response_started:
            return
        self._count_upstream_error(Failure.UPSTREAM_TIMEOUT)
        self._drop_upstream()
        self.proto.answer(self, Failure.UPSTREAM_TIMEOUT)

    def _count_upstream_error(self, failure: Failure) -> None:
        stats = self.stats
        if stats is not None and failure.upstream_kind is not None:
            stats.upstream_errors[failure.upstream_kind] += 1

    # -- response, from the upstream (ResponseSink) -----------------------------------------------

    def upstream_head(self, conn: UpstreamConnection) -> None:
        status = conn.status
        if status < 200 and status != 101:
            if not self.http_10:  # HTTP/1.0 clients cannot take interim responses
                self.out.append(self._response_head(conn, b"\r\n"))
            return
        if status == 101 and not self.upgrade:
            self.upstream_failed(conn, Failure.UPSTREAM_PROTOCOL)
            conn.abort()
            return
        self.response_deadline = NEVER
        self.status = status
        self.response_started = True
        # In pieces: the flush at the end of this read joins them with the body in one go.
        out = self.out
        out.append(wire.status_line(status, conn.reason or None))
        out += self._response_lines(conn)
        out.append(self._response_tail(conn))

    def _response_head(self, conn: UpstreamConnection, tail: bytes) -> bytes:
        return b"".join(
            (wire.status_line(conn.status, conn.reason or None), *self._response_lines(conn), tail)
        )

    def _response_lines(self, conn: UpstreamConnection) -> list[bytes]:
        """The upstream's header lines to forward, without those its Connection header names."""
        lines = conn.lines
        if conn.connection:
            named = wire.named_by_connection(conn.connection)
            if named:
                lines = wire.drop_named(lines, named)
        return lines

    def _response_tail(self, conn: UpstreamConnection) -> bytes:
        """The headers the proxy adds to a final response, and the blank line: framing,
        Connection and the version header. Decides whether the client connection closes."""
        status = conn.status
        tail = b""
        route = self.route
        version = self.version
        if route is not None and version is not None and route.version_header is not None:
            tail = route.version_header + b": " + version.name_bytes + b"\r\n"
        if status == 101:
            upgrade = conn.upgrade or b""
            return tail + b"Upgrade: " + upgrade + b"\r\nConnection: upgrade\r\n\r\n"
        if self.method != b"HEAD" and status not in _NO_BODY_STATUS and not conn.content_length:
            if self.http_10:
                self.close_after = True  # an HTTP/1.0 client reads to the end of the connection
            else:
                self.chunked_out = True
                tail += b"Transfer-Encoding: chunked\r\n"
        if self.upgrade:
            self.close_after = True  # the client may already be talking the refused protocol
        if self.close_after or not self.keep_alive or self.proto.plane.draining:
            self.close_after = True
            return tail + b"Connection: close\r\n\r\n"
        if self.http_10:
            return tail + b"Connection: keep-alive\r\n\r\n"
        return tail + b"\r\n"

    def upstream_body(self, data: bytes) -> None:
        self.out.append(wire.chunk(data) if self.chunked_out else data)

    def upstream_flush(self) -> None:
        out = self.out
        if out:
            self.proto.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def upstream_complete(self, conn: UpstreamConnection) -> None:
        out = self.out
        if self.chunked_out:
            out.append(wire.LAST_CHUNK)
        if out:
            self.proto.write(b"".join(out))
            out.clear()
        self.upstream = None
        # Reused only after a clean exchange: whole request sent, whole response read.
        conn.release(reusable=self.request_sent and conn.keep_alive())
        if not self.request_complete and (self.content_length > 0 or self.chunked_in):
            self.close_after = True  # the upstream answered early; the body's end is unknown
        self.proto.finish(self, self.status)

    def upstream_upgraded(self, conn: UpstreamConnection, tail: bytes) -> None:
        if tail:
            self.out.append(tail)
        self.upstream_flush()
        self.proto.start_tunnel(self, conn)

    def upstream_tunnel_data(self, data: bytes) -> None:
        self.proto.write(data)

    def upstream_failed(self, conn: UpstreamConnection, failure: Failure) -> None:
        self.upstream = None
        if self.done:
            self.proto.close()  # a tunnel ended
            return
        self._count_upstream_error(failure)
        if self.response_started:
            # Never fake a clean end: the client must see that the body is incomplete.
            self.proto.abort(self)
            return
        if (
            failure is Failure.UPSTREAM_RESET
            and conn.exchanges > 0
            and not self.retried
            and self.content_length <= 0
            and not self.chunked_in
            and self.endpoint is not None
        ):
            # A pooled connection the upstream closed as we reused it: nothing was processed
            # (no response byte came back) and there is no body to replay, so retry once.
            self.retried = True
            self._dispatch(self.endpoint)
            return
        self.proto.answer(self, failure)

    def upstream_write_paused(self) -> None:
        self.proto.gate_pause(PEER_WRITE_BLOCKED)

    def upstream_write_resumed(self) -> None:
        self.proto.gate_resume(PEER_WRITE_BLOCKED)

    # -- ending -----------------------------------------------------------------------------------

    def _drop_upstream(self) -> None:
        """Cut the upstream side without reuse: the exchange is abandoned."""
        self.response_deadline = NEVER
        task = self.connect_task
        if task is not None:
            task.cancel()
            self.connect_task = None
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.abort()

    def settle(self, status: int | None) -> float:
        """Record the outcome once: the status sent, or None when no answer was completed.
        Returns the time it was recorded (monotonic), for the caller's next deadline.

        Callers of settle(None) count why (client abort, drain cut) themselves.
        """
        self.done = True
        self.response_deadline = NEVER
        now = time.monotonic()
        stats = self.stats
        if stats is not None:
            stats.in_flight -= 1
            if status is not None:
                stats.observe(status, now - self.started_at)
        return now


class DownstreamProtocol(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "active",
        "closing",
        "deadline",
        "early_bytes",
        "gate",
        "head_bytes",
        "head_fed",
        "host_name",
        "host_raw",
        "parser",
        "parsing",
        "peer",
        "pipeline",
        "plane",
        "settings",
        "timer_kind",
        "transport",
        "tunnel",
        "write_blocked",
    )

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.settings = plane.table.settings
        self.transport: asyncio.Transport | None = None
        self.gate: ReadGate | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = b""
        # One deadline per connection (request head, or keep-alive idle), checked by the
        # plane's ticker.
        self.deadline = NEVER
        self.timer_kind = 0
        self.active: Exchange | None = None  # the exchange whose response is being written
        self.parsing: Exchange | None = None  # the exchange whose request is being parsed
        self.pipeline: deque[Exchange] = deque()  # parsed, waiting for the active one
        self.head_bytes = 0  # exact size of the head's completed lines
        self.head_fed = 0  # bytes of chunks fed while inside one head
        self.closing = False  # no further request will be read or started
        self.write_blocked = False
        self.tunnel: UpstreamConnection | None = None
        self.early_bytes: list[bytes] | None = None  # client bytes after an Upgrade request
        # The last Host value routed on this connection and its host part, lower-cased.
        self.host_raw = b""
        self.host_name = b""

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.gate = ReadGate(transport)
        set_write_limits(transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if peer else b""
        plane = self.plane
        if plane.draining or len(plane.connections) >= self.settings.max_connections:
            failure = Failure.SHUTTING_DOWN if plane.draining else Failure.OVERLOADED
            self.closing = True
            transport.write(wire.local_answer(failure.status, close=True))
            transport.close()
            return
        plane.connections.add(self)
        self._arm(_HEADER, self.settings.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.early_bytes is not None:
            self._hold_early(data)
            return
        if self.closing:
            return
        ex = self.parsing
        in_head = ex is not None and not ex.method
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.early_bytes = []
            self._hold_early(data[upgrade.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _StopParsing):
                log.error("request handling failed", exc_info=exc.__context__)
                self.closing = True
                if self.transport is not None:
                    self.transport.abort()
            return
        except httptools.HttpParserError:
            self._reject(Failure.BAD_REQUEST)
            return
        parsing = self.parsing
        if parsing is None or parsing.method:
            return
        if in_head and parsing is ex:
            # httptools buffers a header until it ends; a chunk fed wholly inside one head counts
            # against the limit, so a single endless header cannot grow without bound.
            self.head_fed += len(data)
            if self.head_fed > self.settings.max_header_bytes:
                self._reject(Failure.HEADERS_TOO_LARGE)
                return
        if self.timer_kind != _HEADER:
            # This read began a head without ending it: its clock started with this read.
            self._arm(_HEADER, self.settings.header_timeout)

    def eof_received(self) -> bool | None:
        active = self.active
        if active is None and self.parsing is None:
            return None
        if active is not None and not active.response_started:
            # A client that leaves before its answer started cancels the exchange (what nginx
            # logs as 499): returning None closes the transport, and connection_lost cancels.
            return None
        # The answer is on its way: a half-closed client may still read it.
        self.closing = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.plane.connections.discard(self)
        self._disarm()
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.close()
        active = self.active
        if active is not None and not active.done:
            active._drop_upstream()
            if active.stats is not None:
                active.stats.client_aborts += 1
            active.settle(None)
        for queued in self.pipeline:
            queued.done = True
        self.pipeline.clear()
        self.active = None
        if self.plane.draining:
            self.plane.check_drained()

    def pause_writing(self) -> None:
        self.write_blocked = True
        upstream = self._upstream()
        if upstream is not None:
            upstream.pause_reading(PEER_WRITE_BLOCKED)

    def resume_writing(self) -> None:
        self.write_blocked = False
        upstream = self._upstream()
        if upstream is not None:
            upstream.resume_reading(PEER_WRITE_BLOCKED)

    def _upstream(self) -> UpstreamConnection | None:
        if self.tunnel is not None:
            return self.tunnel
        active = self.active
        return active.upstream if active is not None else None

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # The header deadline is armed by data_received, and only when a read ends inside a
        # head: most heads arrive in one read and never need it.
        if self.closing:
            raise _StopParsing
        self.parsing = Exchange(self)
        self.head_bytes = 0
        self.head_fed = 0

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.url += url
        limit = self.settings.max_request_line_bytes
        if len(ex.url) + REQUEST_LINE_OVERHEAD + LONGEST_METHOD <= limit:
            return  # short enough whatever the method: no need to ask the parser for it
        line_bytes = len(ex.url) + len(self.parser.get_method()) + REQUEST_LINE_OVERHEAD
        if line_bytes > limit:
            self._reject(Failure.URI_TOO_LONG)
            raise _StopParsing

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes + len(ex.url) > self.settings.max_header_bytes:
            self._reject(Failure.HEADERS_TOO_LARGE)
            raise _StopParsing
        kind = self.plane.header_kinds[name]
        if not kind:
            ex.lines.append(name + b": " + value + b"\r\n")
        else:
            ex.special.append((kind, name.lower(), name, value))

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        if self.timer_kind:
            # Header deadline of this head, or the idle one of a connection whose next head
            # arrived whole: neither applies any more.
            self.deadline = NEVER
            self.timer_kind = 0
        parser = self.parser
        ex.method = parser.get_method()
        ex.http_10 = parser.get_http_version() == "1.0"
        ex.keep_alive = parser.should_keep_alive()
        ex.upgrade = parser.should_upgrade()
        failure = self._inspect(ex)
        if failure is not None:
            self._reject(failure, ex)
            raise _StopParsing
        if self.active is None:
            self.active = ex
            ex.start()
        else:
            self.pipeline.append(ex)
            if len(self.pipeline) >= MAX_PIPELINE:
                self.gate_pause(PIPELINE_FULL)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.body(body)
        if self.closing:
            raise _StopParsing

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        if ex is not None:
            ex.body_complete()
        if self.closing:
            raise _StopParsing
        if self.active is None and not self.pipeline:
            self._arm(_IDLE, self.settings.idle_timeout)

    def _inspect(self, ex: Exchange) -> Failure | None:
        """Request checks the parser leaves to us (RFC 9112 §3.2, §6.1; SPEC §7 limits)."""
        if ex.method == b"CONNECT":
            return Failure.METHOD_NOT_ALLOWED
        line_bytes = len(ex.url) + len(ex.method) + REQUEST_LINE_OVERHEAD
        if line_bytes > self.settings.max_request_line_bytes:
            return Failure.URI_TOO_LONG
        hosts = 0
        connection: list[bytes] = []
        for kind, _, name, value in ex.special:
            if kind == wire.HOST:
                hosts += 1
                ex.host = value
                ex.host_line = name + b": " + value + b"\r\n"
            elif kind == wire.TRANSFER_ENCODING:
                # llhttp accepts any codings that end in chunked; the proxy forwards the body
                # re-chunked and cannot carry other codings, so it refuses them.
                if value.strip().lower() != b"chunked":
                    return Failure.BAD_REQUEST
                ex.chunked_in = True
            elif kind == wire.CONTENT_LENGTH:
                ex.content_length = int(value)  # llhttp has checked it is a single number
            elif kind == wire.CONNECTION:
                connection.append(value)
        if connection:
            ex.named_by_connection = wire.named_by_connection(connection)
        if hosts > 1 or (hosts == 0 and not ex.http_10):
            return Failure.BAD_REQUEST
        if ex.chunked_in and ex.http_10:
            return Failure.BAD_REQUEST  # chunked framing does not exist in HTTP/1.0
        limit = self.settings.max_body_bytes
        if limit and ex.content_length > limit:
            return Failure.BODY_TOO_LARGE
        return None

    # -- answering --------------------------------------------------------------------------------

    def _reject(self, failure: Failure, ex: Exchange | None = None) -> None:
        """A request that cannot be parsed further: answer it in turn, then close."""
        if ex is None:
            ex = self.parsing or Exchange(self)
        self.parsing = None
        self.closing = True
        if self.timer_kind == _HEADER:
            self._disarm()
        ex.failure = failure
        ex.close_after = True
        if ex is self.active or self.active is None:
            self.active = ex
            self.answer(ex, failure)
        else:
            self.pipeline.append(ex)

    def fail_request(self, ex: Exchange, failure: Failure) -> None:
        """The request broke a rule mid-body (size): abandon its upstream side and answer."""
        self.closing = True
        if ex is not self.active:
            ex.failure = failure
            return
        if ex.response_started:
            self.abort(ex)
            return
        ex._drop_upstream()
        self.answer(ex, failure)

    def answer(self, ex: Exchange, failure: Failure) -> None:
        """Answer `ex` ourselves. Without its whole body read, the connection must close."""
        if ex.done:
            return
        if ex.response_started:
            # Part of the upstream's answer is out: the only honest end is a cut connection.
            self.abort(ex)
            return
        ex._drop_upstream()
        close = (
            ex.close_after
            or ex.body_unread()
            or ex.upgrade  # the bytes after an Upgrade request are not parsed as HTTP
            or not ex.keep_alive
            or failure.status in (400, 405, 408, 413, 414, 431)
            or self.plane.draining
        )
        ex.close_after = close
        self.write(wire.local_answer(failure.status, close=close, head_only=ex.method == b"HEAD"))
        self.finish(ex, failure.status)

    def finish(self, ex: Exchange, status: int) -> None:
        """`ex` has been answered in full: record it and move to the next request."""
        now = ex.settle(status)
        if ex is not self.active:
            return
        self.active = None
        if ex.close_after:
            # Whatever was parsed behind it never runs (it may be a body's bytes, not a request).
            self.close()
        else:
            self._next(now)
        if self.plane.draining:
            self.plane.check_drained()

    def _next(self, now: float) -> None:
        """Start the next pipelined request, or wait for one (`now`: monotonic time)."""
        pipeline = self.pipeline
        while pipeline and self.active is None:
            ex = pipeline.popleft()
            self.gate_resume(PIPELINE_FULL)
            self.active = ex
            ex.start()
        if self.active is None and self.parsing is None and not self.pipeline:
            if self.closing or self.plane.draining:
                self.close()
            else:
                self.timer_kind = _IDLE
                self.deadline = now + self.settings.idle_timeout

    def start_tunnel(self, ex: Exchange, conn: UpstreamConnection) -> None:
        """The upstream switched protocols: from now on bytes flow both ways untouched."""
        self._disarm()
        self.tunnel = conn
        early = self.early_bytes or []
        self.early_bytes = None
        if early:
            conn.write(b"".join(early))
        self.gate_resume(TUNNEL_PENDING)
        ex.settle(101)
        self.active = None

    def _hold_early(self, data: bytes) -> None:
        early = self.early_bytes
        assert early is not None
        if data:
            early.append(data)
            if sum(len(d) for d in early) > MAX_UPGRADE_EARLY_BYTES:
                self.gate_pause(TUNNEL_PENDING)

    # -- connection-level helpers -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self) -> None:
        self.closing = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()

    def abort(self, ex: Exchange) -> None:
        """End the connection without a clean end of message (the response is cut)."""
        ex._drop_upstream()
        if not ex.done:
            ex.settle(502)
        self.closing = True
        self.active = None
        if self.transport is not None:
            self.transport.abort()

    def close_if_idle(self) -> None:
        if self.active is None and self.parsing is None and self.tunnel is None:
            self.close()

    def busy(self) -> int:
        return (self.active is not None) + len(self.pipeline)

    def cut(self) -> int:
        """Abort this connection; its unfinished request (if placed) is counted as cut."""
        cut = 0
        active = self.active
        if active is not None and not active.done:
            if active.stats is not None:
                active.stats.drain_cut += 1
            cut = 1
            active._drop_upstream()
            active.settle(None)
        self.closing = True
        self.active = None
        if self.tunnel is not None:
            self.tunnel.abort()
            self.tunnel = None
        if self.transport is not None:
            self.transport.abort()
        return cut

    def gate_pause(self, reason: int) -> None:
        if self.gate is not None:
            self.gate.pause(reason)

    def gate_resume(self, reason: int) -> None:
        if self.gate is not None:
            self.gate.resume(reason)

    def _arm(self, kind: int, seconds: float) -> None:
        self.timer_kind = kind
        self.deadline = time.monotonic() + seconds

    def _disarm(self) -> None:
        self.deadline = NEVER
        self.timer_kind = 0

    def check_deadlines(self, now: float) -> None:
        """Called by the plane's ticker: fire whatever deadline has passed."""
        if self.deadline <= now:
            self._timed_out()
        active = self.active
        if active is not None and active.response_deadline <= now:
            active.response_timed_out()

    def _timed_out(self) -> None:
        kind = self.timer_kind
        self.deadline = NEVER
        self.timer_kind = 0
        if kind == _HEADER and self.parsing is not None and not self.parsing.method:
            # A client that started a request head and trickles it (slowloris): 408 in its
            # turn, behind any answer still owed on this connection, then close.
            self._reject(Failure.HEADER_TIMEOUT)
            return
        if self.active is None and not self.pipeline:
            self.close()
