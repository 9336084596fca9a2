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
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from proxy.codec import flow, wire
from proxy.codec.flow import (
    PEER_WRITE_BLOCKED,
    PIPELINE_FULL,
    TUNNEL_PENDING,
    ReadGate,
    reset,
    set_write_limits,
)
from proxy.errors import Failure
from proxy.http.context import (
    ANSWERED,
    CLIENT_ABORT,
    CUT,
    DONE,
    DRAIN_CUT,
    RESPONDING,
    ConnectionContext,
)
from proxy.http.exchange import NEVER, Exchange
from proxy.http.tunnel import Tunnel
from proxy.http.upstream_head import ForwardingCache

if TYPE_CHECKING:
    from proxy.upstream.connection import UpstreamConnection

log = logging.getLogger(__name__)

# Parsed requests allowed to wait behind the active one before the client's reads pause; bounds
# the memory a pipelining client can make us hold.
MAX_PIPELINE = 16

# Bytes a client may send after an Upgrade request before the upstream has answered it.
MAX_UPGRADE_EARLY_BYTES = 64 * 1024

# The two spaces and "HTTP/1.1" around method and target in a request line.
REQUEST_LINE_OVERHEAD = 10

# At least as long as any method llhttp parses (the longest, GET_PARAMETER, has 13 bytes).
LONGEST_METHOD = 16

# A connection closed after a local answer while the request body may still be arriving lingers:
# the answer is followed by a FIN, and the client's bytes are read and discarded for up to this
# long and this many bytes before the socket closes. Closed with unread bytes, the kernel sends a
# reset, which fails the client's upload and can destroy the answer before the client reads it
# (nginx's lingering_close). The bounds keep a client that never stops sending from holding it.
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 1024 * 1024

# What the connection's one deadline is for.
_HEADER = 1
_IDLE = 2
_BODY = 3  # the request body stalled: no byte of it for `timeouts.idle`


class _StopParsing(Exception):
    """Raised from a parser callback to stop httptools in the middle of a feed.

    httptools reports it as an HttpParserCallbackError whose __context__ is this exception.
    """


class DownstreamProtocol(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "active",
        "closing",
        "deadline",
        "early_bytes",
        "forwarding",
        "gate",
        "head_bytes",
        "head_fed",
        "host_name",
        "host_raw",
        "linger_left",
        "linger_timer",
        "parser",
        "parsing",
        "pipeline",
        "plane",
        "settings",
        "timer_kind",
        "transport",
        "tunnel",
        "write_blocked",
    )

    def __init__(self, plane: ConnectionContext[DownstreamProtocol]) -> None:
        self.plane = plane
        self.settings = plane.table.settings
        self.transport: asyncio.Transport | None = None
        self.gate: ReadGate | None = None
        self.parser = httptools.HttpRequestParser(self)
        # The peer's address for the forwarding headers, and those of its last plain request
        # (set by connection_made, before any request).
        self.forwarding: ForwardingCache
        # One deadline per connection (request head, or keep-alive idle), checked by the
        # plane's ticker.
        self.deadline = NEVER
        self.timer_kind = 0
        self.active: Exchange | None = None  # the exchange whose response is being written
        self.parsing: Exchange | None = None  # the exchange whose request is being parsed
        self.pipeline: deque[Exchange] = deque()  # parsed, waiting for the active one
        self.head_bytes = 0  # exact size of the head's completed lines
        # Bytes of reads fed wholly inside one head, or inside a chunked body's framing and
        # trailer fields (reads that carried no body byte).
        self.head_fed = 0
        self.closing = False  # no further request will be read or started
        self.write_blocked = False
        self.tunnel: Tunnel | None = None
        self.early_bytes: list[bytes] | None = None  # client bytes after an Upgrade request
        # The last Host value routed on this connection and its host part, lower-cased.
        self.host_raw = b""
        self.host_name = b""
        # Lingering close (see LINGER_SECONDS): what may still be discarded, and the timer.
        self.linger_left = 0
        self.linger_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.gate = ReadGate(transport)
        set_write_limits(transport)
        peer = transport.get_extra_info("peername")
        self.forwarding = ForwardingCache(str(peer[0]).encode() if peer else b"")
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
            self.tunnel.from_client(data)
            return
        if self.early_bytes is not None:
            self._hold_early(data)
            return
        if self.closing:
            if self.linger_timer is not None:
                self.linger_left -= len(data)
                if self.linger_left <= 0:
                    self._end_linger()
            return
        ex = self.parsing
        in_head = ex is not None and not ex.method
        received = ex.body_received if ex is not None else 0
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
        if parsing is None:
            return
        if parsing.method:
            if parsing is ex and not in_head and ex.chunked_in:
                self._count_framing(ex, received, len(data))
            # Inside a body: it may pause, but not for longer than the idle timeout (what nginx
            # calls client_body_timeout), or a stalled upload would hold both connections.
            if not self.closing:
                self._arm(_BODY, self.settings.idle_timeout)
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

    def _count_framing(self, ex: Exchange, received: int, size: int) -> None:
        """A chunked body's read that carried no body byte is chunk framing or trailer fields,
        and httptools holds a trailer field until it ends: such reads in a row count against
        the header limit, so an endless trailer cannot grow without bound either."""
        if ex.body_received != received:
            self.head_fed = 0
            return
        self.head_fed += size
        if self.head_fed > self.settings.max_header_bytes:
            self._reject(Failure.HEADERS_TOO_LARGE)

    def eof_received(self) -> bool | None:
        if self.linger_timer is not None:
            return None  # the client has stopped sending: the lingering is over
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.client_eof()  # a half-close: passed on, the other direction keeps flowing
            return True
        active = self.active
        if active is None and self.parsing is None:
            return None
        if active is not None and active.phase is not DONE:
            # A client that leaves cancels its exchange (what nginx logs as 499), before or
            # after its answer started: returning None closes the transport, and
            # connection_lost frees the upstream connection and counts a client abort. Kept
            # open, the exchange would wait on an upstream nobody reads any more.
            return None
        # Mid-request: what arrived is still answered in turn, then the connection closes.
        self.closing = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.plane.connections.discard(self)
        self._disarm()
        if self.linger_timer is not None:
            self.linger_timer.cancel()
            self.linger_timer = None
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.client_lost()
        active = self.active
        if active is not None and active.phase is not DONE:
            active.end(CLIENT_ABORT)
        for queued in self.pipeline:
            queued.end(CLIENT_ABORT)  # never placed: nothing to count
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
            return self.tunnel.upstream
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
        if ex.method:
            # A trailer field of a chunked body (its head is complete): counted against the
            # head's limit above, and dropped. Merged into the head it could smuggle a second
            # Host or a force header into a request still queued behind another.
            return
        kind = self.plane.header_kinds[name]
        if not kind:
            ex.lines.append(b"".join((name, b": ", value, b"\r\n")))  # one allocation, not three
        elif kind == wire.HOST:
            # Sent first, as received; how many there were is checked when the head ends.
            ex.hosts += 1
            ex.host = value
            ex.host_line = b"".join((name, b": ", value, b"\r\n"))
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
        self.head_fed = 0  # from here on it counts a chunked body's framing
        parser = self.parser
        ex.method = parser.get_method()
        keep_alive = ex.keep_alive = parser.should_keep_alive()
        if not keep_alive or ex.special:
            ex.http_10 = parser.get_http_version() == "1.0"
        # Else it is HTTP/1.1, without asking for the version (a str formatted per call): llhttp
        # keeps a message alive by default only when it is HTTP/1.1, and without a Connection or
        # Proxy-Connection header (they would be in `special`) nothing else made it so.
        ex.upgrade = parser.should_upgrade()
        failure = self._inspect(ex)
        if failure is not None:
            self._reject(failure, ex)
            raise _StopParsing
        host = ex.host
        if host is not None:
            if host != self.host_raw:  # a keep-alive client sends the same Host every time
                self.host_name = wire.split_host_port(host)
                self.host_raw = host
            ex.hostname = self.host_name
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
        if self.timer_kind == _BODY:
            self._disarm()
        if ex is not None:
            ex.body_complete()
        if self.closing:
            raise _StopParsing
        if self.active is None and not self.pipeline:
            self._arm(_IDLE, self.settings.idle_timeout)

    def _inspect(self, ex: Exchange) -> Failure | None:
        """Request checks the parser leaves to us (RFC 9112 §3.2, §6.1) and the size limits."""
        if ex.method == b"CONNECT":
            return Failure.METHOD_NOT_ALLOWED
        line_bytes = len(ex.url) + len(ex.method) + REQUEST_LINE_OVERHEAD
        if line_bytes > self.settings.max_request_line_bytes:
            return Failure.URI_TOO_LONG
        if ex.special:
            connection: list[bytes] = []
            for kind, _, _, value in ex.special:
                if kind == wire.TRANSFER_ENCODING:
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
        hosts = ex.hosts
        if hosts > 1 or (hosts == 0 and not ex.http_10):
            return Failure.BAD_REQUEST
        host = ex.host
        # A keep-alive client sends the same Host every time, and the last one routed on this
        # connection was valid: only a new value is checked.
        if host is not None and host != self.host_raw and not wire.valid_authority(host):
            return Failure.BAD_REQUEST
        if ex.url[0] != 0x2F and not self._other_target_form(ex):  # not "/...": origin form
            return Failure.BAD_REQUEST
        if ex.chunked_in and ex.http_10:
            return Failure.BAD_REQUEST  # chunked framing does not exist in HTTP/1.0
        limit = self.settings.max_body_bytes
        if limit and ex.content_length > limit:
            return Failure.BODY_TOO_LARGE
        return None

    def _other_target_form(self, ex: Exchange) -> bool:
        """Accept `OPTIONS *` as it is, and an absolute-form target (RFC 9112 §3.2.2) as its
        path, with its authority as the Host (routed and forwarded; the Host header, checked
        all the same, is ignored). False: the target is not a valid request target."""
        url = ex.url
        if url == b"*":
            return ex.method == b"OPTIONS"
        split = wire.split_absolute_target(url)
        if split is None or not wire.valid_authority(split[0]):
            return False
        authority, ex.url = split
        ex.host = authority
        ex.host_line = b"Host: " + authority + b"\r\n"
        return True

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
        elif ex not in self.pipeline:  # a queued request failing in its body is queued already
            self.pipeline.append(ex)

    def fail_request(self, ex: Exchange, failure: Failure) -> None:
        """The request broke a rule mid-body (size): abandon its upstream side and answer."""
        self.closing = True
        if ex is not self.active:
            ex.failure = failure
            return
        if ex.phase is RESPONDING:
            self.abort(ex, None)  # the client's fault, not the version's
            return
        self.answer(ex, failure)

    def answer(self, ex: Exchange, failure: Failure) -> None:
        """Answer `ex` ourselves. Without its whole body read, the connection must close."""
        phase = ex.phase
        if phase is DONE:
            return
        if phase is RESPONDING:
            # Part of the upstream's answer is out: the only honest end is a cut connection.
            # Only the client's faults (bad framing, a stalled or oversized body) come here once
            # the response started: a client outcome, never a 5xx for the version.
            self.abort(ex, failure.status if failure.status >= 500 else None)
            return
        close = (
            ex.close_after
            or ex.body_unread()
            or ex.upgrade  # the bytes after an Upgrade request are not parsed as HTTP
            or not ex.keep_alive
            or failure.status in (400, 405, 408, 413, 414, 431)
            or self.plane.draining
        )
        ex.close_after = close
        answer = wire.local_answer(failure.status, close=close, head_only=ex.method == b"HEAD")
        self.finish(ex, failure.status, answer)

    def finish(self, ex: Exchange, status: int, answer: bytes = b"") -> None:
        """`ex` has been answered in full (`answer`: the local answer still to write, after
        its upstream side is gone): end it and move to the next request."""
        now = ex.end(ANSWERED, status)
        if answer:
            self.write(answer)
        if ex is not self.active:
            return
        self.active = None
        if ex.close_after:
            # Whatever was parsed behind it never runs (it may be a body's bytes, not a request).
            # A request not read to its end may still be arriving: linger.
            self.close(linger=not ex.request_complete)
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
        ex.upgraded()
        tunnel = Tunnel(self, conn, ex.stats, ex.started_at, self.settings.idle_timeout)
        ex.tunnel = tunnel
        self.tunnel = tunnel
        self.active = None
        early = self.early_bytes or []
        self.early_bytes = None
        if early:
            conn.write(b"".join(early))
        self.gate_resume(TUNNEL_PENDING)

    def tunnel_ended(self, tunnel: Tunnel, abort: bool) -> None:
        """`tunnel` is over (both directions closed, or cut): so is this connection."""
        if self.tunnel is not tunnel:
            return  # the connection is gone already (connection_lost ended it)
        self.tunnel = None
        self.closing = True
        transport = self.transport
        if transport is not None:
            if abort:
                reset(transport)  # a FIN would tell the client the tunnel ended cleanly
            else:
                transport.close()
        if self.plane.draining:
            self.plane.check_drained()

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
        if transport is not None and not transport.is_closing() and self.linger_timer is None:
            transport.write(data)

    def write_backlog(self) -> int:
        """Bytes written to the client that it has not read yet."""
        return flow.write_backlog(self.transport)

    def write_eof(self) -> None:
        """Send our FIN after what is queued (a tunnelled half-close)."""
        flow.write_eof(self.transport)

    def close(self, linger: bool = False) -> None:
        """Close after what was written; with `linger`, send a FIN after it and discard what
        the client still sends, within LINGER_SECONDS and LINGER_MAX_BYTES, before closing."""
        self.closing = True
        self._disarm()
        transport = self.transport
        if transport is None:
            return
        if (
            linger
            and self.linger_timer is None
            and not transport.is_closing()
            and transport.can_write_eof()
        ):
            transport.write_eof()
            self.early_bytes = None  # bytes after a refused Upgrade are discarded too
            self.linger_left = LINGER_MAX_BYTES
            self.linger_timer = self.plane.loop.call_later(LINGER_SECONDS, self._end_linger)
            if self.gate is not None:
                self.gate.clear()
            return
        transport.close()

    def _end_linger(self) -> None:
        timer = self.linger_timer
        if timer is not None:
            timer.cancel()  # when ended by the byte bound, not by itself
            self.linger_timer = None
        if self.transport is not None:
            self.transport.close()

    def abort(self, ex: Exchange, status: int | None = 502) -> None:
        """End the connection without a clean end of message (the response is cut), with a
        reset. `status` is the outcome recorded for `ex`; None: the client caused the cut, which
        counts as a client abort and never against the version."""
        if ex.phase is not DONE:
            if status is None:
                ex.end(CLIENT_ABORT)
            else:
                ex.end(CUT, status)
        self.closing = True
        self.active = None
        if self.transport is not None:
            reset(self.transport)

    def close_if_idle(self) -> None:
        if self.active is None and self.parsing is None and self.tunnel is None:
            self.close()

    def busy(self) -> int:
        """Requests in flight on this connection: an open tunnel is one."""
        return (self.active is not None) + len(self.pipeline) + (self.tunnel is not None)

    def cut(self) -> int:
        """Abort this connection; its unfinished request (if placed) is counted as cut."""
        cut = 0
        active = self.active
        if active is not None and active.phase is not DONE:
            cut = 1
            active.end(DRAIN_CUT)
        self.closing = True
        self.active = None
        tunnel = self.tunnel
        if tunnel is not None:
            cut += tunnel.cut()  # aborts this connection too
        if self.transport is not None:
            reset(self.transport)  # a FIN could end an HTTP/1.0 body cleanly
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
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.check_idle(now)
            return
        if self.deadline <= now:
            self._timed_out()
        active = self.active
        if active is not None:
            if active.phase is RESPONDING:
                active.check_stream(now, self.settings.idle_timeout, self.write_blocked)
            elif active.response_deadline <= now:
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
        if kind == _BODY and self.parsing is not None:
            # 408 in its turn if none of its answer went out, else the connection is cut.
            self._reject(Failure.BODY_TIMEOUT)
            return
        if self.active is None and not self.pipeline:
            self.close()
