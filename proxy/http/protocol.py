"""A client connection: its exchanges in turn, its deadlines, local answers and its closing.

`DownstreamProtocol` is one `asyncio.Protocol` per client connection, with no task of its own:
httptools' callbacks (`request_parsing`) make each request head an `Exchange`. One exchange at a
time is *active* (its response is being written); pipelined ones queue behind it. The active
exchange reads the current `RouteTable` once, picks a version and an endpoint, takes a pooled
upstream connection (or opens one: the only await on the request path), streams the request body
up and the response back, with backpressure both ways.
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
from proxy.codec.held import HeldBytes
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
from proxy.http.linger import Linger
from proxy.http.request_parsing import (
    BODY_TIMER,
    HEAD_TIMER,
    IDLE_TIMER,
    RequestParsing,
)
from proxy.http.tunnel import Tunnel
from proxy.http.upstream_head import ForwardingCache

if TYPE_CHECKING:
    from proxy.upstream.connection import UpstreamConnection

log = logging.getLogger(__name__)

# Bytes a client may send after an Upgrade request before the upstream has answered it.
MAX_UPGRADE_EARLY_BYTES = 64 * 1024


class DownstreamProtocol(RequestParsing, asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "active",
        "closing",
        "deadline",
        "early_bytes",
        "forwarding",
        "gate",
        "head_bytes",
        "held",
        "host_name",
        "host_raw",
        "linger",
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
        self.held = HeldBytes()  # reads fed wholly inside a head or a body's framing
        self.closing = False  # no further request will be read or started
        self.write_blocked = False
        self.tunnel: Tunnel | None = None
        self.early_bytes: list[bytes] | None = None  # client bytes after an Upgrade request
        # The last Host value routed on this connection and its host part, lower-cased.
        self.host_raw = b""
        self.host_name = b""
        self.linger: Linger | None = None  # set while the connection lingers (see `close`)

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
        self._arm(HEAD_TIMER, self.settings.header_timeout)

    def eof_received(self) -> bool | None:
        if self.linger is not None:
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
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
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

    # -- answering --------------------------------------------------------------------------------

    def _reject(self, failure: Failure, ex: Exchange | None = None) -> None:
        """A request that cannot be parsed further: answer it in turn, then close."""
        if ex is None:
            ex = self.parsing or Exchange(self)
        self.parsing = None
        self.closing = True
        if self.timer_kind == HEAD_TIMER:
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
                self.timer_kind = IDLE_TIMER
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
        if transport is not None and not transport.is_closing() and self.linger is None:
            transport.write(data)

    def write_backlog(self) -> int:
        """Bytes written to the client that it has not read yet."""
        return flow.write_backlog(self.transport)

    def write_eof(self) -> None:
        """Send our FIN after what is queued (a tunnelled half-close)."""
        flow.write_eof(self.transport)

    def close(self, linger: bool = False) -> None:
        """Close after what was written; with `linger`, send a FIN after it and discard what
        the client still sends, within the bounds of `linger.Linger`, before closing."""
        self.closing = True
        self._disarm()
        transport = self.transport
        if transport is None:
            return
        if (
            linger
            and self.linger is None
            and not transport.is_closing()
            and transport.can_write_eof()
        ):
            transport.write_eof()
            self.early_bytes = None  # bytes after a refused Upgrade are discarded too
            self.linger = Linger(self.plane.loop, self._end_linger)
            if self.gate is not None:
                self.gate.clear()
            return
        transport.close()

    def _end_linger(self) -> None:
        linger = self.linger
        if linger is not None:
            linger.cancel()  # when ended by the byte bound, not by its timer
            self.linger = None
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
        if kind == HEAD_TIMER and self.parsing is not None and not self.parsing.method:
            # A client that started a request head and trickles it (slowloris): 408 in its
            # turn, behind any answer still owed on this connection, then close.
            self._reject(Failure.HEADER_TIMEOUT)
            return
        if kind == BODY_TIMER and self.parsing is not None:
            # 408 in its turn if none of its answer went out, else the connection is cut.
            self._reject(Failure.BODY_TIMEOUT)
            return
        if self.active is None and not self.pipeline:
            self.close()
