"""HTTP/1.1 wire pieces shared by the data plane: header sets, heads, framing, local answers.

Pure functions over bytes; no I/O. Header names arrive from httptools as raw bytes and are compared
lower-cased.
"""

from __future__ import annotations

from http import HTTPStatus

# RFC 9110 §7.6.1 plus the de-facto ones: never forwarded in either direction. `Connection` can
# name more, which are removed too (see `connection_tokens`).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# Request headers the proxy rebuilds itself; what the client sent is consumed, never forwarded.
REBUILT_REQUEST_HEADERS = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"}
)

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase, or a neutral one for codes the stdlib does not know."""
    try:
        return HTTPStatus(status).phrase.encode("latin-1")
    except ValueError:
        return b"Unknown"


def status_line(status: int, reason: bytes | None = None) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, reason or reason_phrase(status))


def connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    """The lower-cased option names of every `Connection` header value."""
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def local_answer(
    status: int,
    *,
    close: bool,
    body: bytes | None = None,
    head_only: bool = False,
    extra_headers: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """A complete response written by the proxy itself (errors, overload, 404 ...)."""
    if body is None:
        body = b"%d %s\n" % (status, reason_phrase(status))
    parts = [
        status_line(status),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    if status == 503:
        parts.append(b"Retry-After: 1\r\n")
    parts.extend(name + b": " + value + CRLF for name, value in extra_headers)
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(CRLF)
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def split_host_port(host: bytes) -> bytes:
    """The host part of a Host header value, lower-cased, without the port."""
    host = host.strip().lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end != -1 else host
    colon = host.rfind(b":")
    return host[:colon] if colon != -1 else host


def cookie_value(cookie_headers: list[bytes], name: bytes) -> bytes | None:
    """The value of cookie `name` in the request's Cookie headers (RFC 6265 §5.4 syntax)."""
    for header in cookie_headers:
        for pair in header.split(b";"):
            key, sep, value = pair.strip().partition(b"=")
            if sep and key == name:
                return value.strip().strip(b'"')
    return None


def remove_cookie(cookie_header: bytes, name: bytes) -> bytes:
    """`cookie_header` without the cookie `name`; b"" when nothing is left."""
    kept = [
        pair.strip()
        for pair in cookie_header.split(b";")
        if pair.strip() and pair.strip().partition(b"=")[0] != name
    ]
    return b"; ".join(kept)


def forwarded_for(client_values: list[bytes], peer: bytes, trusted_hops: int) -> bytes:
    """X-Forwarded-For rebuilt: the last `trusted_hops` client-sent entries, then the peer.

    Entries further left were written by whoever the client is and cannot be trusted.
    """
    if trusted_hops <= 0 or not client_values:
        return peer
    entries = [e.strip() for value in client_values for e in value.split(b",") if e.strip()]
    kept = entries[-trusted_hops:]
    kept.append(peer)
    return b", ".join(kept)
