"""HTTP/1.1 wire pieces shared by the data plane: header sets, heads, framing, local answers.

Pure functions over bytes; no I/O. Header names arrive from httptools as raw bytes and are compared
lower-cased.
"""

from __future__ import annotations

import ipaddress
from http import HTTPStatus

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"

# Kinds of headers the proxy handles itself (hop-by-hop ones per RFC 9110 §7.6.1 plus the
# de-facto Keep-Alive and Proxy-Connection), looked up once per header by lower-cased name;
# every header without a kind is forwarded verbatim.
HOP = 1  # hop-by-hop: dropped
CONNECTION = 2  # dropped, and the headers it names are dropped too
TRANSFER_ENCODING = 3  # dropped; the proxy frames bodies itself
UPGRADE = 4  # dropped, except on an Upgrade request and its 101 answer
CONTENT_LENGTH = 5  # forwarded, and tells the framing
HOST = 6  # forwarded unchanged, first; checked (missing or duplicate -> 400)
COOKIE = 7  # forwarded, minus the force cookie
FORWARDED_FOR = 8  # rebuilt from the socket peer
REQUEST_ID = 9  # kept, or generated when absent
REBUILT = 10  # X-Forwarded-Proto, X-Forwarded-Host and X-Real-IP: replaced
CONTROL = 11  # some service's force or sticky header (see `request_header_kinds`)
PROXY_OWN = 12  # a response header the proxy sets itself (the version header): dropped
FORWARDED = 13  # RFC 7239 Forwarded: rebuilt from the socket peer, like X-Forwarded-For
VIA = 14  # kept, with the proxy's own entry appended (RFC 9110 §7.6.3)
DROPPED = 15  # a request header whose name has "_": dropped, as nginx does by default

_HOP_KINDS = {
    b"connection": CONNECTION,
    b"keep-alive": HOP,
    b"proxy-connection": HOP,
    b"te": HOP,
    b"trailer": HOP,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"upgrade": UPGRADE,
    b"proxy-authenticate": HOP,
    b"proxy-authorization": HOP,
}
RESPONSE_HEADER_KINDS: dict[bytes, int] = {**_HOP_KINDS, b"content-length": CONTENT_LENGTH}
REQUEST_HEADER_KINDS: dict[bytes, int] = {
    **_HOP_KINDS,
    b"content-length": CONTENT_LENGTH,
    b"host": HOST,
    b"cookie": COOKIE,
    b"x-forwarded-for": FORWARDED_FOR,
    b"x-request-id": REQUEST_ID,
    b"x-forwarded-proto": REBUILT,
    b"x-forwarded-host": REBUILT,
    b"x-real-ip": REBUILT,
    b"forwarded": FORWARDED,
    b"via": VIA,
}

# Connection options that name no header: they need no second pass over the headers.
PLAIN_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close", b"upgrade"})

# Options never honoured as names of headers to drop: Content-Length frames the message the proxy
# forwards (as received), and dropping it would leave a keep-alive peer with no framing at all.
_NOT_DROPPED = PLAIN_CONNECTION_OPTIONS | {b"content-length"}


# Header names remembered as sent (any case) by a `HeaderKinds`: peers use a few spellings of a
# few dozen names, so the cache is nearly always hit; the bound keeps a peer that sends endless
# new names from growing it, and longer names are never remembered.
MAX_REMEMBERED_NAMES = 1024
MAX_REMEMBERED_NAME_BYTES = 64


class HeaderKinds(dict[bytes, int]):
    """Header name exactly as received -> its kind, 0 for a header forwarded verbatim.

    Looking a name up as sent skips lower-casing it for every header of every message; a name
    not seen before is lower-cased once and looked up in `kinds`. With `drop_underscores`, a
    name with "_" and no kind of its own is DROPPED: some frameworks read `X_Forwarded_For` as
    `X-Forwarded-For` (both become HTTP_X_FORWARDED_FOR), which would bypass its rebuilding.
    """

    __slots__ = ("drop_underscores", "kinds")

    def __init__(self, kinds: dict[bytes, int], drop_underscores: bool = False) -> None:
        super().__init__()
        self.kinds = kinds
        self.drop_underscores = drop_underscores

    def __missing__(self, name: bytes) -> int:
        kind = self.kinds.get(name.lower(), 0)
        if not kind and self.drop_underscores and b"_" in name:
            kind = DROPPED
        if len(self) < MAX_REMEMBERED_NAMES and len(name) <= MAX_REMEMBERED_NAME_BYTES:
            self[name] = kind
        return kind


RESPONSE_KINDS = HeaderKinds(RESPONSE_HEADER_KINDS)


def request_header_kinds(control_headers: set[bytes]) -> HeaderKinds:
    """REQUEST_HEADER_KINDS plus the services' force and sticky headers (lower-cased)."""
    kinds = dict(REQUEST_HEADER_KINDS)
    for name in control_headers:
        kinds.setdefault(name, CONTROL)
    return HeaderKinds(kinds, drop_underscores=True)


def response_header_kinds(own_headers: set[bytes]) -> HeaderKinds:
    """RESPONSE_HEADER_KINDS plus the services' version headers (lower-cased): the proxy names
    the version that served, so an upstream's header of that name must not reach the client."""
    kinds = dict(RESPONSE_HEADER_KINDS)
    for name in own_headers:
        kinds.setdefault(name, PROXY_OWN)
    return HeaderKinds(kinds)


def named_by_connection(values: list[bytes]) -> frozenset[bytes]:
    """Header names a message's Connection headers declare hop-by-hop (usually none).

    Only headers forwarded verbatim are dropped for being named: a header the proxy reads or
    writes itself (every one with a kind: Host, framing, Cookie, the X-Forwarded-* family,
    Forwarded, X-Real-IP, Via, X-Request-Id, force and sticky headers) is never removed by a
    Connection option, so a client cannot strip what the upstream relies on the proxy for."""
    if len(values) == 1 and values[0].lower() in PLAIN_CONNECTION_OPTIONS:
        return frozenset()
    return connection_tokens(values) - _NOT_DROPPED


def drop_named(lines: list[bytes], names: frozenset[bytes]) -> list[bytes]:
    """`lines` (each "Name: value\\r\\n") without the headers called `names`."""
    return [line for line in lines if line.partition(b":")[0].strip().lower() not in names]


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase, or a neutral one for codes the stdlib does not know."""
    try:
        return HTTPStatus(status).phrase.encode("latin-1")
    except ValueError:
        return b"Unknown"


_STATUS_LINES: dict[tuple[int, bytes | None], bytes] = {}
_STATUS_LINE_CACHE_SIZE = 256  # distinct (status, reason) pairs remembered; upstreams use few


def status_line(status: int, reason: bytes | None = None) -> bytes:
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason or reason_phrase(status))
        if len(_STATUS_LINES) < _STATUS_LINE_CACHE_SIZE:
            _STATUS_LINES[key] = line
    return line


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


def local_answer(status: int, *, close: bool, head_only: bool = False) -> bytes:
    """A complete response written by the proxy itself (errors, overload, 404 ...)."""
    body = b"%d %s\n" % (status, reason_phrase(status))
    parts = [
        status_line(status),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    if status == 503:
        parts.append(b"Retry-After: 1\r\n")
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(CRLF)
    if not head_only:
        parts.append(body)
    return b"".join(parts)


# RFC 3986 reg-name: unreserved, sub-delims and the "%" of pct-encoded (checked apart).
_REG_NAME_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=%"
_DIGITS = b"0123456789"
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_MAX_PORT = 65535


def valid_authority(value: bytes) -> bool:
    """`value` is `host[:port]` (RFC 9110 §7.2, RFC 3986 §3.2.2): a reg-name, an IPv4 address or
    a bracketed IPv6 literal, then at most a port of 1-5 digits. Nothing else: no userinfo, path,
    whitespace or zone id. The empty value is valid (a target without authority)."""
    if not value:
        return True
    if value[0] == 0x5B:  # "[": an IP literal
        end = value.find(b"]")
        literal = value[1:end]
        if end == -1 or not literal or literal.translate(None, _HEX_DIGITS + b":."):
            return False
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            return False
        port = value[end + 1 :]
        if not port:
            return True
        if port[0] != 0x3A:  # ":"
            return False
        port = port[1:]
    else:
        host, colon, port = value.partition(b":")
        if not host or host.translate(None, _REG_NAME_CHARS):
            return False
        if b"%" in host and not _pct_encoded(host):
            return False
        if not colon:
            return True
    return 0 < len(port) <= 5 and not port.translate(None, _DIGITS) and int(port) <= _MAX_PORT


def _pct_encoded(host: bytes) -> bool:
    """Every "%" in `host` starts a pct-encoded octet (two hex digits)."""
    parts = host.split(b"%")
    return all(len(part) >= 2 and not part[:2].translate(None, _HEX_DIGITS) for part in parts[1:])


def split_absolute_target(target: bytes) -> tuple[bytes, bytes] | None:
    """An absolute-form request target (RFC 9112 §3.2.2, `http://host/path?q`) as (authority,
    origin-form target), or None when it is not an http(s) URI with an authority. The authority
    is not checked here (see `valid_authority`)."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in _TARGET_SCHEMES:
        return None
    end = len(rest)
    for delimiter in b"/?#":
        found = rest.find(delimiter)
        if found != -1 and found < end:
            end = found
    authority = rest[:end]
    if not authority:
        return None  # an http URI has a host (RFC 9110 §4.2.1)
    path = rest[end:]
    if not path.startswith(b"/"):
        path = b"/" + path  # an empty path is "/" in origin form (RFC 9112 §3.2.1)
    return authority, path


_TARGET_SCHEMES = frozenset({b"http", b"https"})


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


def trusted_entries(client_values: list[bytes], trusted_hops: int) -> list[bytes]:
    """The last `trusted_hops` entries of the client's X-Forwarded-For values: those the trusted
    proxies in front of us wrote. Entries further left were written by whoever the client is."""
    if trusted_hops <= 0 or not client_values:
        return []
    entries = [e.strip() for value in client_values for e in value.split(b",") if e.strip()]
    return entries[-trusted_hops:]


def forwarded_for(client_values: list[bytes], peer: bytes, trusted_hops: int) -> bytes:
    """X-Forwarded-For rebuilt: the last `trusted_hops` client-sent entries, then the peer."""
    kept = trusted_entries(client_values, trusted_hops)
    if not kept:
        return peer
    kept.append(peer)
    return b", ".join(kept)


def real_ip(client_values: list[bytes], peer: bytes, trusted_hops: int) -> bytes:
    """X-Real-IP rebuilt: the client as the first trusted proxy saw it (the leftmost trusted
    X-Forwarded-For entry), else the socket peer; what nginx's realip module computes."""
    kept = trusted_entries(client_values, trusted_hops)
    return kept[0] if kept else peer


def forwarded_node(peer: bytes) -> bytes:
    """The socket peer as an RFC 7239 node: an IPv6 address bracketed and quoted (§6)."""
    if not peer:
        return b"unknown"
    return b'"[' + peer + b']"' if b":" in peer else peer


def forwarded_element(node: bytes, host: bytes | None) -> bytes:
    """The proxy's own Forwarded element: `for=<peer>;host="<Host>";proto=http`. The host is
    always a quoted-string (a port's ":" is not a token character); a valid Host holds no quote
    or backslash."""
    if host is None:
        return b"for=" + node + b";proto=http"
    return b"for=" + node + b';host="' + host + b'";proto=http'


def forwarded_elements(values: list[bytes]) -> list[bytes]:
    """The forwarded-elements of Forwarded values (RFC 7239 §4): split at commas outside
    quoted strings, stripped, empty ones left out."""
    elements: list[bytes] = []
    for value in values:
        start = 0
        quoted = escaped = False
        for i, byte in enumerate(value):
            if escaped:
                escaped = False
            elif quoted and byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # double quote
                quoted = not quoted
            elif byte == 0x2C and not quoted:  # comma
                elements.append(value[start:i])
                start = i + 1
        elements.append(value[start:])
    return [element.strip() for element in elements if element.strip()]


def forwarded(
    client_values: list[bytes], node: bytes, host: bytes | None, trusted_hops: int
) -> bytes:
    """Forwarded rebuilt like X-Forwarded-For: the last `trusted_hops` elements the client sent,
    then the proxy's own."""
    own = forwarded_element(node, host)
    if trusted_hops <= 0 or not client_values:
        return own
    kept = forwarded_elements(client_values)[-trusted_hops:]
    kept.append(own)
    return b", ".join(kept)
