"""The checks a request head must pass before it is routed, beyond what httptools checks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.codec import wire
from proxy.errors import Failure

if TYPE_CHECKING:
    from proxy.http.exchange import Exchange
    from proxy.routing.table import Settings

# The two spaces and "HTTP/1.1" around method and target in a request line.
REQUEST_LINE_OVERHEAD = 10

# At least as long as any method llhttp parses (the longest, GET_PARAMETER, has 13 bytes).
LONGEST_METHOD = 16


def check_request(ex: Exchange, settings: Settings, known_host: bytes) -> Failure | None:
    """Request checks the parser leaves to us (RFC 9112 §3.2, §6.1) and the size limits, and
    the framing and target they read into `ex`. `known_host`: a Host value found valid
    before on this connection."""
    if ex.method == b"CONNECT":
        return Failure.METHOD_NOT_ALLOWED
    line_bytes = len(ex.url) + len(ex.method) + REQUEST_LINE_OVERHEAD
    if line_bytes > settings.max_request_line_bytes:
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
    if host is not None and host != known_host and not wire.valid_authority(host):
        return Failure.BAD_REQUEST
    if ex.url[0] != 0x2F and not _other_target_form(ex):  # not "/...": origin form
        return Failure.BAD_REQUEST
    if ex.chunked_in and ex.http_10:
        return Failure.BAD_REQUEST  # chunked framing does not exist in HTTP/1.0
    limit = settings.max_body_bytes
    if limit and ex.content_length > limit:
        return Failure.BODY_TOO_LARGE
    return None


def _other_target_form(ex: Exchange) -> bool:
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
