"""The upstream request head and the version it is for, written from a parsed request head."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.codec import wire
from proxy.config.loader import parse_config
from proxy.http.upstream_head import (
    ForwardingCache,
    RequestIds,
    plain_upstream_head,
    upstream_head,
)
from proxy.routing.build import build_table
from proxy.routing.table import ServiceRoute

PEER = b"192.0.2.7"


def route(extra: str = "", blue: int = 100) -> ServiceRoute:
    config = parse_config(
        "services:\n  app:\n    versions:\n"
        f'      blue: {{endpoints: ["127.0.0.1:9001"], weight: {blue}}}\n'
        f'      green: {{endpoints: ["127.0.0.1:9002"], weight: {100 - blue}}}\n' + extra
    )
    return build_table(config).services[0]


@dataclass
class Head:
    """A request head sorted the way the client connection's parser callbacks sort it."""

    method: bytes = b"GET"
    url: bytes = b"/"
    host: bytes | None = b"app.test"
    host_line: bytes = b"Host: app.test\r\n"
    lines: list[bytes] = field(default_factory=list)
    special: list[tuple[int, bytes, bytes, bytes]] = field(default_factory=list)
    named_by_connection: frozenset[bytes] = frozenset()
    http_10: bool = False
    chunked_in: bool = False
    upgrade: bool = False


def head(*headers: tuple[bytes, bytes], control: frozenset[bytes] = frozenset()) -> Head:
    kinds = wire.request_header_kinds(set(control))
    parsed = Head()
    connection: list[bytes] = []
    for name, value in headers:
        kind = kinds[name]
        if not kind:
            parsed.lines.append(name + b": " + value + b"\r\n")
        else:
            parsed.special.append((kind, name.lower(), name, value))
            if kind == wire.CONNECTION:
                connection.append(value)
    parsed.named_by_connection = wire.named_by_connection(connection)
    return parsed


def fields(upstream: bytes) -> list[tuple[str, str]]:
    """The head's header fields as (lower-cased name, value), in order."""
    text = upstream.decode()
    assert text.endswith("\r\n\r\n")
    return [
        (name.lower(), value)
        for name, _, value in (line.partition(": ") for line in text.split("\r\n")[1:-2])
    ]


def build(req: Head, service: ServiceRoute | None = None, hops: int = 0) -> tuple[str, bytes]:
    version, upstream = upstream_head(
        req, service or route(), ForwardingCache(PEER), hops, RequestIds()
    )
    return version.name, upstream


def test_a_plain_request_gets_its_request_line_host_and_the_forwarding_headers() -> None:
    ids = RequestIds()
    version, upstream = plain_upstream_head(
        head((b"Accept", b"*/*")), route(), ForwardingCache(PEER), ids
    )
    assert version.name == "blue"
    assert upstream.startswith(b"GET / HTTP/1.1\r\nHost: app.test\r\nAccept: */*\r\n")
    assert fields(upstream)[2:] == [
        ("x-forwarded-for", "192.0.2.7"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "app.test"),
        ("x-real-ip", "192.0.2.7"),
        ("forwarded", 'for=192.0.2.7;host="app.test";proto=http'),
        ("via", "1.1 laneswitch"),
        ("x-request-id", f"{ids.prefix.decode()}-1"),
    ]


def test_the_plain_path_writes_what_the_full_one_writes() -> None:
    req = head((b"Accept", b"*/*"), (b"User-Agent", b"t"))
    for host in (b"app.test", None):
        req.host = host
        req.host_line = b"Host: \r\n" if host is None else b"Host: app.test\r\n"
        for http_10 in (False, True):
            req.http_10 = http_10
            plain_ids, full_ids = RequestIds(), RequestIds()
            full_ids.prefix = plain_ids.prefix
            _, plain = plain_upstream_head(req, route(), ForwardingCache(PEER), plain_ids)
            _, full = upstream_head(req, route(), ForwardingCache(PEER), 0, full_ids)
            assert plain == full


def test_a_keep_alive_connection_reuses_its_forwarding_block_until_host_or_version_changes() -> (
    None
):
    cache = ForwardingCache(PEER)
    ids = RequestIds()
    req = head()
    _, first = plain_upstream_head(req, route(), cache, ids)
    block = cache.block
    _, second = plain_upstream_head(req, route(), cache, ids)
    assert cache.block is block  # made once for the connection, not per request
    assert first.replace(b"-1\r\n", b"-2\r\n") == second  # only the request id differs
    req.host, req.host_line = b"other.test", b"Host: other.test\r\n"
    _, third = plain_upstream_head(req, route(), cache, ids)
    assert (b"X-Forwarded-Host", b"other.test") in [
        tuple(line.split(b": ", 1)) for line in third.split(b"\r\n")
    ]
    req.http_10 = True
    _, fourth = plain_upstream_head(req, route(), cache, ids)
    assert b"Via: 1.0 laneswitch\r\n" in fourth


def test_the_clients_forwarding_headers_are_extended_and_its_request_id_kept() -> None:
    req = head(
        (b"X-Forwarded-For", b"198.51.100.1"),
        (b"Forwarded", b"for=198.51.100.1"),
        (b"Via", b"1.1 edge"),
        (b"X-Request-Id", b"abc"),
    )
    _, upstream = build(req, hops=1)
    got = dict(fields(upstream))
    assert got["x-forwarded-for"] == "198.51.100.1, 192.0.2.7"
    assert got["x-real-ip"] == "198.51.100.1"
    assert got["forwarded"] == 'for=198.51.100.1, for=192.0.2.7;host="app.test";proto=http'
    assert got["via"] == "1.1 edge, 1.1 laneswitch"
    assert got["x-request-id"] == "abc"


def test_hop_by_hop_headers_and_those_connection_names_are_not_forwarded() -> None:
    req = head(
        (b"Connection", b"keep-alive, X-Secret"),
        (b"X-Secret", b"s"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Accept", b"*/*"),
    )
    _, upstream = build(req)
    names = [name for name, _ in fields(upstream)]
    assert "accept" in names
    assert not {"connection", "x-secret", "keep-alive"} & set(names)


def test_the_force_header_picks_the_version_and_never_reaches_the_upstream() -> None:
    service = route("    force: {header: X-Canary}\n")
    req = head((b"X-Canary", b"green"), control=frozenset({b"x-canary"}))
    version, upstream = build(req, service)
    assert version == "green"
    assert b"x-canary" not in upstream.lower()


def test_the_force_cookie_picks_the_version_and_is_cut_from_the_cookies() -> None:
    service = route("    force: {header: X-Canary, cookie: canary}\n")
    version, upstream = build(head((b"Cookie", b"a=1; canary=green")), service)
    assert version == "green"
    assert dict(fields(upstream))["cookie"] == "a=1"


def test_the_sticky_header_is_forwarded_and_keeps_a_client_on_one_version() -> None:
    service = route("    sticky: {header: X-User}\n", blue=50)
    versions = set()
    for _ in range(20):
        req = head((b"X-User", b"u-42"), control=frozenset({b"x-user"}))
        version, upstream = build(req, service)
        versions.add(version)
        assert dict(fields(upstream))["x-user"] == "u-42"
    assert len(versions) == 1


def test_an_http_10_request_without_host_goes_up_as_http_11_with_an_empty_host() -> None:
    req = head()
    req.host, req.host_line, req.http_10 = None, b"Host: \r\n", True
    _, upstream = build(req)
    assert upstream.startswith(b"GET / HTTP/1.1\r\nHost: \r\n")
    got = dict(fields(upstream))
    assert "x-forwarded-host" not in got
    assert got["forwarded"] == "for=192.0.2.7;proto=http"
    assert got["via"] == "1.0 laneswitch"


def test_a_chunked_body_and_an_upgrade_are_restated() -> None:
    req = head((b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"websocket"))
    req.chunked_in = req.upgrade = True
    _, upstream = build(req)
    got = dict(fields(upstream))
    assert got["transfer-encoding"] == "chunked"
    assert got["connection"] == "upgrade"
    assert got["upgrade"] == "websocket"


def test_request_ids_are_unique_and_share_the_process_prefix() -> None:
    ids = RequestIds()
    first, second = ids.next(), ids.next()
    assert first != second
    assert first.split(b"-")[0] == second.split(b"-")[0] == ids.prefix
    assert RequestIds().prefix != ids.prefix
