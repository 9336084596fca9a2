"""Picks the version a request goes to and writes the request head the upstream gets.

Pure functions of the parsed request (`RequestHead`), its route and the client's address; the
only state they touch is what they are handed: the process's `RequestIds` and the client
connection's `ForwardingCache`.
"""

from __future__ import annotations

import os
from typing import Protocol

from proxy.codec import wire
from proxy.routing.splitter import choose_version, pick_weighted
from proxy.routing.table import ServiceRoute, VersionRoute

# The headers the proxy adds to every request it forwards, filled in one formatting:
# X-Forwarded-For, -Proto, -Host, X-Real-IP, Forwarded, Via, X-Request-Id.
_FORWARDED = (
    b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\nX-Real-IP: %s\r\nForwarded: %s\r\n"
    b"Via: %s\r\nX-Request-Id: %s\r\n"
)
_FORWARDED_WITH_HOST = (
    b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: %s\r\n"
    b"X-Real-IP: %s\r\nForwarded: %s\r\nVia: %s\r\nX-Request-Id: %s\r\n"
)
# The same for the plain path, where the client sent none of them: the peer stands for the
# client everywhere (`wire.forwarded_element` spelled out), and the blank line that ends the head
# follows a new request id (`RequestIds.next` spelled out: prefix and counter). All but the id
# are the same for every request of a keep-alive connection: the connection keeps them made
# (`ForwardingCache`), and a request formats only its id.
_PLAIN_FORWARDED = (
    b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\nX-Real-IP: %s\r\n"
    b"Forwarded: for=%s;proto=http\r\nVia: %s\r\n"
)
_PLAIN_FORWARDED_WITH_HOST = (
    b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: %s\r\n"
    b'X-Real-IP: %s\r\nForwarded: for=%s;host="%s";proto=http\r\nVia: %s\r\n'
)
_NEW_REQUEST_ID = b"X-Request-Id: %s-%x\r\n\r\n"

# The proxy's Via entry (RFC 9110 §7.6.3): the protocol the message was received with, and the
# proxy's pseudonym. Responses reach the client as HTTP/1.1 (see `response_head`).
VIA_11 = b"1.1 laneswitch"
VIA_10 = b"1.0 laneswitch"


class RequestIds:
    """X-Request-Id values: a random per-process prefix and a counter, unique and cheap."""

    __slots__ = ("count", "prefix")

    def __init__(self) -> None:
        self.prefix = os.urandom(8).hex().encode()
        self.count = 0

    def next(self) -> bytes:
        # Spelled out in plain_upstream_head: keep the two the same.
        self.count += 1
        return b"%s-%x" % (self.prefix, self.count)


class ForwardingCache:
    """One client connection's address as the forwarding headers name it, and the forwarding
    headers of its last plain request with the Host and protocol version they were made for."""

    __slots__ = ("block", "host", "http_10", "node", "peer")

    def __init__(self, peer: bytes) -> None:
        self.peer = peer
        self.node = wire.forwarded_node(peer)  # the peer as an RFC 7239 node, for Forwarded
        self.block = b""
        self.host: bytes | None = None
        self.http_10 = False


class RequestHead(Protocol):
    """The parsed request head the upstream head is written from (an `Exchange` is one)."""

    @property
    def method(self) -> bytes: ...
    @property
    def url(self) -> bytes: ...
    @property
    def host(self) -> bytes | None: ...
    @property
    def host_line(self) -> bytes: ...
    @property
    def lines(self) -> list[bytes]: ...
    @property
    def special(self) -> list[tuple[int, bytes, bytes, bytes]]: ...
    @property
    def named_by_connection(self) -> frozenset[bytes]: ...
    @property
    def http_10(self) -> bool: ...
    @property
    def chunked_in(self) -> bool: ...
    @property
    def upgrade(self) -> bool: ...


def plain_forwarded(peer: bytes, node: bytes, host: bytes | None, via: bytes) -> bytes:
    """The forwarding headers of a plain request (see `_PLAIN_FORWARDED`), but its id."""
    if host is None:
        return _PLAIN_FORWARDED % (peer, peer, node, via)
    return _PLAIN_FORWARDED_WITH_HOST % (peer, host, peer, node, host, via)


def plain_upstream_head(
    req: RequestHead, route: ServiceRoute, client: ForwardingCache, ids: RequestIds
) -> tuple[VersionRoute, bytes]:
    """`upstream_head` for the usual request, with no header the proxy acts on but Host: no
    control header or cookie (a weighted pick), no X-Forwarded-For or X-Request-Id to carry
    over, no Connection header, no body framing or upgrade to restate."""
    host = req.host
    http_10 = req.http_10
    forwarded = client.block
    if not forwarded or host != client.host or http_10 != client.http_10:
        forwarded = client.block = plain_forwarded(
            client.peer, client.node, host, VIA_10 if http_10 else VIA_11
        )
        client.host = host
        client.http_10 = http_10
    ids.count += 1
    head = b"".join(
        (
            req.method,
            b" ",
            req.url,
            b" HTTP/1.1\r\n",
            req.host_line,
            *req.lines,
            forwarded,
            _NEW_REQUEST_ID % (ids.prefix, ids.count),
        )
    )
    return pick_weighted(route), head


def upstream_head(
    req: RequestHead,
    route: ServiceRoute,
    client: ForwardingCache,
    trusted_hops: int,
    ids: RequestIds,
) -> tuple[VersionRoute, bytes]:
    """Pick the version and write the request head the upstream gets."""
    force_value: bytes | None = None
    sticky_value: bytes | None = None
    cookies: list[bytes] = []
    xff: list[bytes] = []
    client_forwarded: list[bytes] = []
    vias: list[bytes] = []
    request_id: bytes | None = None
    upgrade: bytes | None = None
    lines = req.lines
    if req.named_by_connection:
        lines = wire.drop_named(lines, req.named_by_connection)
    # The head in pieces, joined once: request line, Host, the client's headers forwarded
    # verbatim, those the proxy handles, then its own.
    parts = [req.method, b" ", req.url, b" HTTP/1.1\r\n", req.host_line]
    parts += lines
    for kind, lname, name, value in req.special:
        if kind == wire.CONTENT_LENGTH:
            parts.append(name + b": " + value + b"\r\n")
        elif kind == wire.COOKIE:
            cookies.append(value)
        elif kind == wire.FORWARDED_FOR:
            xff.append(value)
        elif kind == wire.FORWARDED:
            client_forwarded.append(value)
        elif kind == wire.VIA:
            if value:
                vias.append(value)
        elif kind == wire.REQUEST_ID:
            if value:
                request_id = value
        elif kind == wire.CONTROL:
            if lname == route.force_header:
                force_value = value  # a control header never reaches the upstream
                continue
            if lname == route.sticky_header:
                sticky_value = value
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
        version = pick_weighted(route)
    else:
        version = choose_version(route, force_value, force_cookie_value, sticky_value)
    if request_id is None:
        request_id = ids.next()
    peer = client.peer
    forwarded_for = wire.forwarded_for(xff, peer, trusted_hops) if xff else peer
    real_ip = wire.real_ip(xff, peer, trusted_hops) if xff else peer
    host = req.host
    rebuilt = wire.forwarded(client_forwarded, client.node, host, trusted_hops)
    vias.append(VIA_10 if req.http_10 else VIA_11)
    via = b", ".join(vias)
    if host is not None:
        forwarded = _FORWARDED_WITH_HOST % (forwarded_for, host, real_ip, rebuilt, via, request_id)
    else:
        forwarded = _FORWARDED % (forwarded_for, real_ip, rebuilt, via, request_id)
    if req.chunked_in:
        forwarded += b"Transfer-Encoding: chunked\r\n"
    if req.upgrade and upgrade is not None:
        forwarded += b"Connection: upgrade\r\nUpgrade: " + upgrade + b"\r\n"
    parts.append(forwarded)
    parts.append(b"\r\n")
    return version, b"".join(parts)
