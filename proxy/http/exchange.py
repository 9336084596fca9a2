"""One request and its response: routing, the upstream side, and the answer.

An `Exchange` is created by the client connection (`proxy.http.protocol`) for every request
head; it picks a version and an endpoint from the route table, takes a pooled upstream
connection (or opens one: the only await on the request path), streams the body up and the
response back, and is the upstream connection's `ResponseSink`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from proxy.codec import wire
from proxy.codec.flow import (
    BODY_BUFFER_FULL,
    PEER_WRITE_BLOCKED,
)
from proxy.errors import Failure
from proxy.http.context import (
    DONE,
    DRAIN_CUT,
    PLACED,
    RESPONDING,
    TUNNEL,
    WAITING,
    ClientConnection,
    End,
)
from proxy.http.response_head import final_tail, forwarded_lines, interim_head
from proxy.http.upstream_head import plain_upstream_head, upstream_head
from proxy.metrics import VersionStats
from proxy.routing.table import Endpoint, ServiceRoute, VersionRoute
from proxy.upstream.pool import UpstreamPool

if TYPE_CHECKING:
    from proxy.http.tunnel import Tunnel
    from proxy.upstream.connection import UpstreamConnection

log = logging.getLogger(__name__)

# Request body bytes held while an exchange waits for its upstream connection (or its turn in the
# pipeline) before the client's reads pause.
MAX_BUFFERED_BODY = 64 * 1024

NEVER = float("inf")  # a deadline that is not armed

# Methods a dead reused connection may be retried for (RFC 9110 §9.2.2): the upstream may have
# processed the request before it died, and a proxy must not replay any other (RFC 9112 §9.3.1.1).
_IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


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
        "endpoint",
        "failure",
        "heard",
        "host",
        "host_line",
        "hostname",
        "hosts",
        "http_10",
        "keep_alive",
        "lines",
        "method",
        "named_by_connection",
        "out",
        "phase",
        "proto",
        "request_complete",
        "request_head",
        "request_sent",
        "response_deadline",
        "retried",
        "route",
        "special",
        "started_at",
        "stats",
        "status",
        "tunnel",
        "upgrade",
        "upstream",
        "url",
        "version",
    )

    def __init__(self, proto: ClientConnection[Exchange]) -> None:
        self.proto = proto
        self.phase = WAITING
        # Request, as parsed.
        self.method = b""
        self.url = b""
        # The head, sorted as it is parsed: lines forwarded verbatim, the Host header (counted,
        # kept as value and line), and the other headers the proxy acts on as
        # (kind, lower-cased name, name, value); see the kinds in `wire`.
        self.lines: list[bytes] = []
        self.special: list[tuple[int, bytes, bytes, bytes]] = []
        self.hosts = 0
        self.host: bytes | None = None
        # Without a Host (HTTP/1.0), an empty one: RFC 9112 §3.2, for the HTTP/1.1 upstream.
        self.host_line = b"Host: \r\n"
        self.hostname = b""  # the Host's host part, lower-cased: set once the checks passed
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
        self.status = 0
        self.chunked_out = False
        self.close_after = False
        self.out: list[bytes] = []  # response bytes gathered during one upstream read
        # A response read arrived since the last deadline check: while the response streams,
        # timeouts.idle is counted from the check that found it set (one store per read, not
        # a clock read).
        self.heard = False
        self.tunnel: Tunnel | None = None  # set once the upstream switched protocols

    def __repr__(self) -> str:
        return f"<Exchange {self.method.decode()} {self.url[:60]!r} status={self.status}>"

    # -- request body, from the client -----------------------------------------------------------

    def body_unread(self) -> bool:
        """Part of the request body has not been read from the client yet."""
        return not self.request_complete and (self.content_length > 0 or self.chunked_in)

    def body(self, data: bytes) -> None:
        if self.phase is DONE:
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
        if upstream is not None and self.phase is not DONE:
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
        url = self.url
        query = url.find(b"?")
        path = url if query == -1 else url[:query]
        if path[0] != 0x2F:
            path = b"/"  # OPTIONS *: the whole host's service
        route = table.match(self.hostname, path)
        if route is None:
            proto.answer(self, Failure.NO_SERVICE)
            return
        self.route = route
        if self.special:
            version, self.request_head = upstream_head(
                self, route, proto.forwarding, table.settings.trusted_hops, plane.request_ids
            )
        else:
            version, self.request_head = plain_upstream_head(
                self, route, proto.forwarding, plane.request_ids
            )
        self.version = version
        stats = plane.stats.get(route.name, version.name)
        self.stats = stats
        stats.in_flight += 1
        self.phase = PLACED
        self.started_at = time.monotonic()
        endpoint = version.next_endpoint()
        if endpoint is None:
            proto.answer(self, Failure.NO_HEALTHY_ENDPOINT)
            return
        self._dispatch(endpoint)

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
            if self.phase is DONE:
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
        if self.phase is DONE:
            conn.release(reusable=True)  # the client left while we connected; keep it warm
            return
        self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        conn.begin(self, self.method == b"HEAD", self.proto.plane.response_kinds)
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
        if self.phase is not RESPONDING and self.response_deadline == NEVER:
            self.response_deadline = time.monotonic() + self.proto.settings.response_timeout

    def response_timed_out(self) -> None:
        self.response_deadline = NEVER
        if self.phase is not PLACED:
            return
        self._count_upstream_error(Failure.UPSTREAM_TIMEOUT)
        self.proto.answer(self, Failure.UPSTREAM_TIMEOUT)

    def check_stream(self, now: float, idle: float, client_blocked: bool) -> None:
        """The response streams: cut it when the upstream has been silent for `idle` seconds
        while the client waits (counted as an upstream timeout; never a fake clean end). A
        client that does not read is the reason of the silence, not the upstream."""
        if self.heard or client_blocked:
            self.heard = False
            self.response_deadline = now + idle
        elif self.response_deadline <= now:
            self._count_upstream_error(Failure.UPSTREAM_TIMEOUT)
            self.proto.abort(self, Failure.UPSTREAM_TIMEOUT.status)

    def _count_upstream_error(self, failure: Failure) -> None:
        stats = self.stats
        if stats is not None and failure.upstream_kind is not None:
            stats.upstream_errors[failure.upstream_kind] += 1

    # -- response, from the upstream (ResponseSink) -----------------------------------------------

    def upstream_head(self, conn: UpstreamConnection) -> None:
        status = conn.status
        if status < 200 and status != 101:
            if not self.http_10:  # HTTP/1.0 clients cannot take interim responses
                self.out.append(interim_head(conn))
            return
        if status == 101 and not self.upgrade:
            self.upstream_failed(conn, Failure.UPSTREAM_PROTOCOL)
            conn.abort()
            return
        self.response_deadline = NEVER
        self.status = status
        self.phase = RESPONDING
        # In pieces: the flush at the end of this read joins them with the body in one go.
        out = self.out
        out.append(wire.status_line(status, conn.reason or None))
        out += forwarded_lines(conn) if conn.connection else conn.lines
        out.append(final_tail(self, conn, self.proto.plane.draining))

    def upstream_body(self, data: bytes) -> None:
        self.out.append(wire.chunk(data) if self.chunked_out else data)

    def upstream_flush(self) -> None:
        self.heard = True
        out = self.out
        if out:
            self.proto.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def upstream_complete(self, conn: UpstreamConnection) -> None:
        if conn.overrun:
            # The response is whole and goes out; what the upstream sent after it does not.
            self._count_upstream_error(Failure.UPSTREAM_PROTOCOL)
            log.warning("%s: upstream sent more data than its response framing says", conn)
        out = self.out
        if self.chunked_out:
            out.append(wire.LAST_CHUNK)
        if out:
            self.proto.write(b"".join(out))
            out.clear()
        self.upstream = None
        self.proto.gate_resume(PEER_WRITE_BLOCKED)  # see _drop_upstream
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
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.from_upstream(data)

    def upstream_tunnel_eof(self) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.upstream_eof()

    def upstream_failed(self, conn: UpstreamConnection, failure: Failure) -> None:
        self.upstream = None
        self.proto.gate_resume(PEER_WRITE_BLOCKED)  # see _drop_upstream
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.upstream_lost()
            return
        phase = self.phase
        if phase is DONE:
            return
        if phase is RESPONDING:
            self._count_upstream_error(failure)
            # Never fake a clean end: the client must see that the body is incomplete.
            self.proto.abort(self)
            return
        if (
            failure is Failure.UPSTREAM_RESET
            and conn.exchanges > 0
            and not self.retried
            and self.content_length <= 0
            and not self.chunked_in
            and self.method in _IDEMPOTENT_METHODS
            and self.endpoint is not None
        ):
            # A pooled connection the upstream closed as we reused it: no response byte came
            # back and there is no body to replay. The upstream may still have processed the
            # request, so only an idempotent one is retried, once.
            # Not counted: that connection's death is the keep-alive race, not the upstream
            # failing this request; the retry counts if it fails too.
            self.retried = True
            self._dispatch(self.endpoint)
            return
        self._count_upstream_error(failure)
        self.proto.answer(self, failure)

    def upstream_write_paused(self) -> None:
        self.proto.gate_pause(PEER_WRITE_BLOCKED)

    def upstream_write_resumed(self) -> None:
        self.proto.gate_resume(PEER_WRITE_BLOCKED)

    # -- ending -----------------------------------------------------------------------------------

    def _drop_upstream(self) -> None:
        """Cut the upstream side without reuse: the exchange is abandoned."""
        task = self.connect_task
        if task is not None:
            task.cancel()
            self.connect_task = None
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.abort()
            # Its write buffer may have paused the client's reads, and a released or aborted
            # connection never calls resume_writing: left paused, a kept-alive client's next
            # request would never be read.
            self.proto.gate_resume(PEER_WRITE_BLOCKED)

    def _drop_body_buffer(self) -> None:
        """Forget the body bytes held for an upstream that will never get them. Their bound may
        have paused the client's reads, and nothing else resumes them: left paused, a kept-alive
        client's next request would never be read."""
        self.body_buffer = []
        self.body_buffered = 0
        parsing = self.proto.parsing
        if parsing is None or parsing is self or parsing.body_buffered <= MAX_BUFFERED_BODY:
            self.proto.gate_resume(BODY_BUFFER_FULL)

    def upgraded(self) -> None:
        """The upstream switched protocols: the 101 and the time it took are recorded now (a
        tunnel's lifetime is no latency), and the exchange stays in the in-flight gauge as a
        tunnel until `Tunnel` ends it."""
        self.phase = TUNNEL
        self.response_deadline = NEVER
        stats = self.stats
        if stats is not None:
            stats.observe(101, time.monotonic() - self.started_at)

    def end(self, reason: End, status: int | None = None) -> float:
        """End the exchange, the one way it ends: free its upstream side without reuse (a
        connection read to the end of a clean response went back to its pool already) and
        record the outcome for `reason`: the status sent (ANSWERED) or cut with (CUT), a client
        abort, a drain cut. Returns the time it was recorded (monotonic), for the client
        connection's next deadline."""
        phase = self.phase
        self.phase = DONE
        self.response_deadline = NEVER
        if self.upstream is not None or self.connect_task is not None:
            self._drop_upstream()
        if self.body_buffered:
            self._drop_body_buffer()
        now = time.monotonic()
        stats = self.stats
        if stats is None:
            return now
        stats.in_flight -= 1
        if status is not None:  # answered, or cut for the upstream's sake
            stats.observe(status, now - self.started_at)
        elif reason is DRAIN_CUT:
            stats.drain_cut += 1
        else:
            self._count_client_abort(stats, now, phase is PLACED)
        return now

    def _count_client_abort(self, stats: VersionStats, now: float, unanswered: bool) -> None:
        """A client abort never counts against the version, except one that came after waiting
        longer than the latency limit for a response head that never came: a version that stops
        answering must be seen even when its clients give up first. That wait is a timeout (504,
        the answer the proxy gives at its own limit) with its duration in the latency histogram.
        """
        if unanswered:
            route = self.route
            limit = route.unanswered_limit if route is not None else 0.0
            if not limit:
                limit = self.proto.settings.response_timeout
            if now - self.started_at > limit:
                failure = Failure.UPSTREAM_TIMEOUT
                stats.upstream_errors[failure.upstream_kind or "timeout"] += 1
                stats.observe(failure.status, now - self.started_at)
                return
        stats.client_aborts += 1
