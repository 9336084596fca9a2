"""Feeds a client connection's bytes to httptools and sorts what it reports into exchanges.

`RequestParsing` is the part of `DownstreamProtocol` that httptools calls back: each request head
becomes an `Exchange` (started at once, or queued behind the active one), its body goes to it,
and the size and time limits of heads, trailers and bodies are applied as the bytes arrive.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import httptools

from proxy.codec import wire
from proxy.codec.flow import PIPELINE_FULL
from proxy.codec.held import HeldBytes
from proxy.errors import Failure
from proxy.http.exchange import NEVER, Exchange
from proxy.http.request_checks import LONGEST_METHOD, REQUEST_LINE_OVERHEAD, check_request

if TYPE_CHECKING:
    import asyncio

    from proxy.http.context import ClientConnection, ConnectionContext
    from proxy.http.linger import Linger
    from proxy.http.tunnel import Tunnel
    from proxy.routing.table import Settings

log = logging.getLogger(__name__)

# Parsed requests allowed to wait behind the active one before the client's reads pause; bounds
# the memory a pipelining client can make us hold.
MAX_PIPELINE = 16


# What the connection's one deadline is for.
HEAD_TIMER = 1
IDLE_TIMER = 2
BODY_TIMER = 3  # the request body stalled: no byte of it for `timeouts.idle`


class _StopParsing(Exception):
    """Raised from a parser callback to stop httptools in the middle of a feed.

    httptools reports it as an HttpParserCallbackError whose __context__ is this exception.
    """


if TYPE_CHECKING:

    class _Connection(ClientConnection[Exchange], Protocol):
        """What the parsing reads and writes of its client connection."""

        settings: Settings
        parser: httptools.HttpRequestParser
        transport: asyncio.Transport | None
        parsing: Exchange | None
        active: Exchange | None
        pipeline: deque[Exchange]
        tunnel: Tunnel | None
        early_bytes: list[bytes] | None
        linger: Linger | None
        closing: bool
        deadline: float
        timer_kind: int
        head_bytes: int
        held: HeldBytes
        host_raw: bytes
        host_name: bytes

        @property
        def plane(self) -> ConnectionContext[Any]: ...
        def _hold_early(self, data: bytes) -> None: ...
        def _end_linger(self) -> None: ...
        def _reject(self, failure: Failure, ex: Exchange | None = None) -> None: ...
        def _arm(self, kind: int, seconds: float) -> None: ...
        def _disarm(self) -> None: ...
        def _count_framing(self, ex: Exchange, received: int, size: int) -> None: ...


class RequestParsing:
    """The httptools callbacks of a client connection, and the feeding of its bytes."""

    __slots__ = ()

    # The types of what the callbacks assign (the connection's slots hold them).
    parsing: Exchange | None
    active: Exchange | None
    early_bytes: list[bytes] | None

    def data_received(self: _Connection, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.early_bytes is not None:
            self._hold_early(data)
            return
        if self.closing:
            linger = self.linger
            if linger is not None and linger.discard(len(data)):
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
                self._arm(BODY_TIMER, self.settings.idle_timeout)
            return
        # httptools buffers a header until it ends; a chunk fed wholly inside one head counts
        # against the limit, so a single endless header cannot grow without bound.
        if in_head and parsing is ex and self.held.over(len(data), self.settings.max_header_bytes):
            self._reject(Failure.HEADERS_TOO_LARGE)
            return
        if self.timer_kind != HEAD_TIMER:
            # This read began a head without ending it: its clock started with this read.
            self._arm(HEAD_TIMER, self.settings.header_timeout)

    def _count_framing(self: _Connection, ex: Exchange, received: int, size: int) -> None:
        """A chunked body's read that carried no body byte is chunk framing or trailer fields,
        and httptools holds a trailer field until it ends: such reads in a row count against
        the header limit, so an endless trailer cannot grow without bound either."""
        if ex.body_received != received:
            self.held.count = 0
        elif self.held.over(size, self.settings.max_header_bytes):
            self._reject(Failure.HEADERS_TOO_LARGE)

    def on_message_begin(self: _Connection) -> None:
        # The header deadline is armed by data_received, and only when a read ends inside a
        # head: most heads arrive in one read and never need it.
        if self.closing:
            raise _StopParsing
        self.parsing = Exchange(self)
        self.head_bytes = 0
        self.held.count = 0

    def on_url(self: _Connection, url: bytes) -> None:
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

    def on_header(self: _Connection, name: bytes, value: bytes) -> None:
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

    def on_headers_complete(self: _Connection) -> None:
        ex = self.parsing
        assert ex is not None
        if self.timer_kind:
            # Header deadline of this head, or the idle one of a connection whose next head
            # arrived whole: neither applies any more.
            self.deadline = NEVER
            self.timer_kind = 0
        self.held.count = 0  # from here on it counts a chunked body's framing
        parser = self.parser
        ex.method = parser.get_method()
        keep_alive = ex.keep_alive = parser.should_keep_alive()
        if not keep_alive or ex.special:
            ex.http_10 = parser.get_http_version() == "1.0"
        # Else it is HTTP/1.1, without asking for the version (a str formatted per call): llhttp
        # keeps a message alive by default only when it is HTTP/1.1, and without a Connection or
        # Proxy-Connection header (they would be in `special`) nothing else made it so.
        ex.upgrade = parser.should_upgrade()
        failure = check_request(ex, self.settings, self.host_raw)
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

    def on_body(self: _Connection, body: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.body(body)
        if self.closing:
            raise _StopParsing

    def on_message_complete(self: _Connection) -> None:
        ex = self.parsing
        self.parsing = None
        if self.timer_kind == BODY_TIMER:
            self._disarm()
        if ex is not None:
            ex.body_complete()
        if self.closing:
            raise _StopParsing
        if self.active is None and not self.pipeline:
            self._arm(IDLE_TIMER, self.settings.idle_timeout)
