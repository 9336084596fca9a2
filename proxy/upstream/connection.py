"""One keep-alive HTTP/1.1 connection to an upstream endpoint, as an explicit state machine.

The connection parses responses with httptools and hands every event to its current `sink` (the
downstream exchange that owns it). It goes back to its pool only after a clean, fully read
exchange; anything unexpected closes it.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Protocol, cast

import httptools

from proxy.codec import flow
from proxy.codec.flow import ReadGate, set_write_limits
from proxy.codec.held import HeldBytes
from proxy.codec.wire import (
    CONNECTION,
    CONTENT_LENGTH,
    PLAIN_CONNECTION_OPTIONS,
    RESPONSE_KINDS,
    TRANSFER_ENCODING,
    UPGRADE,
    HeaderKinds,
)
from proxy.errors import Failure

# Bytes of reads an upstream may send inside one response head (and its interim responses)
# before the response is refused as invalid: httptools holds a header until it ends, so this
# bounds what a broken or hostile upstream can make us buffer before its body starts.
MAX_RESPONSE_HEAD_BYTES = 64 * 1024

# How a response's last read ends when nothing follows it (or what it is, when that read is
# shorter): its head (no body, or HEAD), or the blank line after the last chunk or trailers.
_HEAD_END = b"\r\n\r\n"


class _Overrun(Exception):
    """Raised from a parser callback: bytes follow the end of the response (see `ended`)."""


class State(enum.Enum):
    NEW = "new"  # connecting
    ACTIVE = "active"  # owned by an exchange
    IDLE = "idle"  # in its pool, waiting to be reused
    CLOSED = "closed"


# The members as module constants: reading `State.ACTIVE` goes through the enum class's
# attribute machinery (~0.1 µs on CPython 3.11), and the pool's hand-out and return read them
# several times per request.
NEW = State.NEW
ACTIVE = State.ACTIVE
IDLE = State.IDLE
CLOSED = State.CLOSED


class ResponseSink(Protocol):
    """What an upstream connection tells the exchange that owns it."""

    def upstream_head(self, conn: UpstreamConnection) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_complete(self, conn: UpstreamConnection) -> None: ...
    def upstream_flush(self) -> None: ...
    def upstream_upgraded(self, conn: UpstreamConnection, tail: bytes) -> None: ...
    def upstream_tunnel_data(self, data: bytes) -> None: ...
    def upstream_tunnel_eof(self) -> None: ...
    def upstream_failed(self, conn: UpstreamConnection, failure: Failure) -> None: ...
    def upstream_write_paused(self) -> None: ...
    def upstream_write_resumed(self) -> None: ...


class ConnectionOwner(Protocol):
    """What a connection tells the pool it belongs to; the connection alone sets its state."""

    def put_idle(self, conn: UpstreamConnection) -> None:
        """`conn` may be reused: keep it idle, or close it if the pool wants no more."""

    def forget(self, conn: UpstreamConnection) -> None:
        """`conn` closed: drop it."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "body_seen",
        "chunked",
        "connection",
        "content_length",
        "ended",
        "exchanges",
        "gate",
        "generation",
        "head_only",
        "held",
        "idle_since",
        "keep",
        "kinds",
        "label",
        "last_body",
        "lines",
        "overrun",
        "parser",
        "pool",
        "reason",
        "response_started",
        "sink",
        "state",
        "status",
        "transport",
        "tunnel",
        "upgrade",
    )

    def __init__(self, pool: ConnectionOwner, generation: int, label: str) -> None:
        # Per connection.
        self.pool = pool
        self.generation = generation  # the pool's when opened: a retired one is not reused
        self.label = label  # the endpoint, for logs
        self.state = NEW
        self.transport: asyncio.Transport | None = None
        self.gate: ReadGate | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchanges = 0  # completed exchanges: > 0 means this connection was reused
        self.idle_since = 0.0
        self.tunnel = False
        # Per exchange.
        self.sink: ResponseSink | None = None
        self.kinds = RESPONSE_KINDS  # how response headers are sorted (see `begin`)
        self.body_seen = False  # a body byte arrived in the current read (chunked framing bound)
        self.head_only = False  # the request was HEAD: the response has no body, whatever it says
        self.response_started = False
        self.held = HeldBytes()  # reads fed wholly inside this exchange's response head
        # The response ended inside the current read. Its exchange is told only once that read
        # has been parsed to its end, so that no byte of it can be parsed as the next exchange's
        # response; a byte after the end is an overrun and closes the connection.
        self.ended = False
        self.overrun = False
        self.keep = False  # the ended response allows keep-alive
        self.last_body = b""  # the latest body piece: where a Content-Length body's read ends
        self.status = 0
        self.reason = b""
        # The response head, sorted as it is parsed: lines to forward verbatim, and the values
        # the proxy acts on (hop-by-hop headers are in neither).
        self.lines: list[bytes] = []
        self.connection: list[bytes] = []  # Connection values that may name other headers
        self.upgrade: bytes | None = None
        self.content_length = False
        self.chunked = False

    def __repr__(self) -> str:
        return (
            f"<UpstreamConnection {self.label} {self.state.value} "
            f"gen={self.generation} exchanges={self.exchanges}>"
        )

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.gate = ReadGate(transport)
        set_write_limits(transport)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if self.tunnel:
            if sink is not None:
                sink.upstream_tunnel_data(data)
            return
        if sink is None:
            # Bytes on an idle connection are a protocol violation; it cannot be reused safely.
            self.close()
            return
        started = self.response_started
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self.status == 101 and self.sink is not None:
                self.tunnel = True
                self.sink.upstream_upgraded(self, data[upgrade.args[0] :])
            else:
                self._fail(Failure.UPSTREAM_PROTOCOL)
            return
        except httptools.HttpParserError:
            if self.ended:
                self._end(overrun=True)  # also what llhttp says of data after `Connection: close`
            else:
                self._fail(Failure.UPSTREAM_PROTOCOL)
            return
        if self.ended:
            if self.content_length and not self.chunked and self.last_body:
                self._end(overrun=not data.endswith(self.last_body))
            else:
                # A CRLF after the end fires no callback (llhttp skips blank lines between
                # messages): the read's last bytes say whether anything followed.
                self._end(overrun=not data.endswith(_HEAD_END) and not _HEAD_END.endswith(data))
            return
        if self.sink is not None:
            if self.sink is sink and not started and not self.response_started:
                if self.held.over(len(data), MAX_RESPONSE_HEAD_BYTES):
                    self._fail(Failure.UPSTREAM_PROTOCOL)
                    return
            elif started and self.chunked and self.sink is sink:
                # Reads of a chunked body that carry no body byte are chunk framing or trailer
                # fields, which httptools holds until they end: in a row they are bounded like
                # a head, so an endless trailer cannot grow without bound.
                if self.body_seen:
                    self.held.count = 0
                elif self.held.over(len(data), MAX_RESPONSE_HEAD_BYTES):
                    self._fail(Failure.UPSTREAM_PROTOCOL)
                    return
                self.body_seen = False
            elif self.chunked:
                # The head ended in this read: the body's framing is counted from the next read
                # on, which must not pass for one with a body byte because this one had one.
                self.body_seen = False
            self.sink.upstream_flush()

    def eof_received(self) -> bool | None:
        if self.tunnel and self.sink is not None:
            # A tunnel's half-close: the other direction may still flow (the sink passes it on).
            self.sink.upstream_tunnel_eof()
            return True
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        previous = self.state
        self.state = CLOSED
        self.pool.forget(self)
        sink = self.sink
        if sink is None or previous is not ACTIVE:
            return
        self.sink = None
        if self.tunnel:
            sink.upstream_failed(self, Failure.UPSTREAM_RESET)
        elif self.response_started and not self.content_length and not self.chunked and not exc:
            # A close-delimited body ends with the connection (RFC 9112 §6.3 rule 8); a reset
            # (`exc`) is no end of it, it is a failure.
            sink.upstream_complete(self)
        else:
            sink.upstream_failed(self, Failure.UPSTREAM_RESET)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_write_paused()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_write_resumed()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.ended:
            raise _Overrun

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        kind = self.kinds[name]
        if not kind:
            # One join of a tuple allocates once; `name + b": " + value + b"\r\n"` three times.
            self.lines.append(b"".join((name, b": ", value, b"\r\n")))
        elif kind == CONTENT_LENGTH:
            self.lines.append(b"".join((name, b": ", value, b"\r\n")))
            self.content_length = True
        elif kind == CONNECTION:
            # The usual "keep-alive" or "close" names no header: nothing to drop for it.
            if value.lower() not in PLAIN_CONNECTION_OPTIONS:
                self.connection.append(value)
        elif kind == TRANSFER_ENCODING:
            self.chunked = True
        elif kind == UPGRADE:
            self.upgrade = value

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.status = status
        sink = self.sink
        if sink is None:
            return
        if status < 200 and status != 101:
            return  # interim responses are forwarded at message complete
        if status == 101 and not self.parser.should_upgrade():
            # No `Upgrade` with `Connection: upgrade`: llhttp fails the message right after
            # this callback. Nothing reached the client yet, so it gets a clean 502.
            self._fail(Failure.UPSTREAM_PROTOCOL)
            return
        self.response_started = True
        self.held.count = 0  # from here on it counts a chunked body's framing (data_received)
        self.body_seen = False
        sink.upstream_head(self)
        if self.head_only:
            # The parser cannot know the request was HEAD and would wait for the announced body:
            # the response ends here, and any byte after the head is an overrun (`_end` gives
            # the next exchange a fresh parser).
            self.keep = self.parser.should_keep_alive()
            self.ended = True

    def on_body(self, body: bytes) -> None:
        if self.ended:
            raise _Overrun  # a body on a HEAD answer
        self.body_seen = True
        self.last_body = body
        if self.sink is not None:
            self.sink.upstream_body(body)

    def on_message_complete(self) -> None:
        if self.ended:
            raise _Overrun  # a whole (empty) chunked body on a HEAD answer
        status = self.status
        sink = self.sink
        if sink is None or status == 101:
            return
        if status < 200:
            # 100 Continue and friends: forward as-is, then wait for the final response.
            sink.upstream_head(self)
            self._reset_response()
            return
        # Read here: llhttp forgets the message's flags once this callback returns.
        self.keep = self.parser.should_keep_alive()
        self.ended = True

    # -- used by the exchange -----------------------------------------------------------------

    def begin(
        self, sink: ResponseSink, head_only: bool, kinds: HeaderKinds = RESPONSE_KINDS
    ) -> None:
        """Hand the connection to `sink` for one exchange; `kinds` sorts the response headers
        (the data plane's, which knows the route table's version headers)."""
        self.state = ACTIVE
        self.sink = sink
        self.kinds = kinds
        self.head_only = head_only
        self.held.count = 0
        self.ended = False
        self._reset_response()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def write_backlog(self) -> int:
        """Bytes written to the upstream that it has not read yet."""
        return flow.write_backlog(self.transport)

    def write_eof(self) -> None:
        """Send our FIN after what is queued (a tunnelled half-close)."""
        flow.write_eof(self.transport)

    def keep_alive(self) -> bool:
        """The response that just ended lets the connection be reused."""
        return self.keep and not self.overrun and not self.tunnel

    def pause_reading(self, reason: int) -> None:
        if self.gate is not None:
            self.gate.pause(reason)

    def resume_reading(self, reason: int) -> None:
        if self.gate is not None:
            self.gate.resume(reason)

    def take(self) -> None:
        """Handed out by the pool (new or reused): an exchange owns it now."""
        self.state = ACTIVE

    def park(self, now: float) -> None:
        """Back in the pool's idle list since `now` (monotonic)."""
        self.state = IDLE
        self.idle_since = now

    def release(self, reusable: bool) -> None:
        """The exchange is over: back to the pool when `reusable`, else closed."""
        self.sink = None
        gate = self.gate
        if reusable and self.state is ACTIVE and gate is not None:
            if gate.reasons:
                gate.resume(gate.reasons)
            self.pool.put_idle(self)
        else:
            self.close()

    def close(self) -> None:
        self._shut(flush=True)

    def abort(self) -> None:
        """Close without flushing: the exchange was cancelled and nothing more must be sent."""
        self._shut(flush=False)

    def _shut(self, flush: bool) -> None:
        self.sink = None
        if self.state is not CLOSED:
            self.state = CLOSED
            self.pool.forget(self)
            if self.transport is not None:
                if flush:
                    self.transport.close()
                else:
                    self.transport.abort()

    # -- internals ----------------------------------------------------------------------------

    def _reset_response(self) -> None:
        self.response_started = False
        self.status = 0
        self.reason = b""
        self.lines = []
        self.connection = []
        self.upgrade = None
        self.content_length = False
        self.chunked = False
        self.last_body = b""

    def _end(self, overrun: bool) -> None:
        """The response ended in the read just parsed: tell its exchange, which may hand the
        connection on. After an overrun the connection is closed first: the bytes that followed
        reach nobody and the connection is never reused (nginx: "upstream sent more data than
        specified"). The response itself was whole and is delivered."""
        self.ended = False
        sink = self.sink
        if sink is None:
            return
        if overrun:
            self.overrun = True
            self.abort()
        elif self.head_only:
            self.parser = httptools.HttpResponseParser(self)
        self.exchanges += 1
        sink.upstream_complete(self)

    def _fail(self, failure: Failure) -> None:
        sink = self.sink
        self.abort()
        if sink is not None:
            sink.upstream_failed(self, failure)
