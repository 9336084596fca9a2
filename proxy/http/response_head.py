"""The response head the client gets: the upstream's status and lines, and the proxy's own tail.

The upstream's lines are forwarded as they came, less those its Connection header names; the
proxy adds Via, the version header, the framing the client needs and its Connection header, and
decides there whether the client connection closes after this response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from proxy.codec import wire
from proxy.routing.table import ServiceRoute, VersionRoute

if TYPE_CHECKING:
    from proxy.upstream.connection import UpstreamConnection

_NO_BODY_STATUS = frozenset({204, 304})

# The proxy's Via entry on every response: they reach the client as HTTP/1.1.
_VIA_LINE = b"Via: 1.1 laneswitch\r\n"
_INTERIM_TAIL = _VIA_LINE + b"\r\n"


class Reply(Protocol):
    """What the final tail reads of the exchange, and the two decisions it writes back."""

    chunked_out: bool  # the body goes to the client chunked
    close_after: bool  # the client connection closes after this response

    @property
    def method(self) -> bytes: ...
    @property
    def http_10(self) -> bool: ...
    @property
    def upgrade(self) -> bool: ...
    @property
    def keep_alive(self) -> bool: ...
    @property
    def request_complete(self) -> bool: ...
    @property
    def content_length(self) -> int: ...
    @property
    def chunked_in(self) -> bool: ...
    @property
    def route(self) -> ServiceRoute | None: ...
    @property
    def version(self) -> VersionRoute | None: ...


def interim_head(conn: UpstreamConnection) -> bytes:
    """An interim (1xx) response's head, as the client gets it."""
    return b"".join(
        (wire.status_line(conn.status, conn.reason or None), *forwarded_lines(conn), _INTERIM_TAIL)
    )


def forwarded_lines(conn: UpstreamConnection) -> list[bytes]:
    """The upstream's header lines to forward, without those its Connection header names."""
    lines = conn.lines
    if conn.connection:
        named = wire.named_by_connection(conn.connection)
        if named:
            lines = wire.drop_named(lines, named)
    return lines


def final_tail(ex: Reply, conn: UpstreamConnection, draining: bool) -> bytes:
    """The headers the proxy adds to a final response, and the blank line: framing, Connection
    and the version header. Decides whether the client connection closes (`ex.close_after`) and
    whether the body goes chunked (`ex.chunked_out`)."""
    status = conn.status
    tail = _VIA_LINE
    route = ex.route
    version = ex.version
    if route is not None and version is not None and route.version_header is not None:
        tail += route.version_header + b": " + version.name_bytes + b"\r\n"
    if status == 101:
        upgrade = conn.upgrade or b""
        return tail + b"Upgrade: " + upgrade + b"\r\nConnection: upgrade\r\n\r\n"
    if ex.method != b"HEAD" and status not in _NO_BODY_STATUS and not conn.content_length:
        if ex.http_10:
            ex.close_after = True  # an HTTP/1.0 client reads to the end of the connection
        else:
            ex.chunked_out = True
            tail += b"Transfer-Encoding: chunked\r\n"
    if ex.upgrade:
        ex.close_after = True  # the client may already be talking the refused protocol
    if not ex.request_complete and (ex.content_length > 0 or ex.chunked_in):
        # The upstream answers before the whole body arrived: where that body ends is not
        # known any more, so the connection closes after this answer; say so.
        ex.close_after = True
    if ex.close_after or not ex.keep_alive or draining:
        ex.close_after = True
        return tail + b"Connection: close\r\n\r\n"
    if ex.http_10:
        return tail + b"Connection: keep-alive\r\n\r\n"
    return tail + b"\r\n"
