"""The request target and Host: absolute-form targets and `OPTIONS *` are forwarded, and a Host
(or a target's authority) that is not a valid `host[:port]` is a 400."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.codec import wire
from tests.helpers import (
    Client,
    ReceivedRequest,
    RecordingUpstream,
    running_proxy,
    two_version_config,
)

# shop serves app.test (any port), other serves other.test; any other host gets 404.
SERVICES = """    match: {host: app.test}
  other:
    match: {host: other.test}
    versions: {v: {endpoints: ["%s"], weight: 100}}
"""


class Upstreams:
    def __init__(self, shop: RecordingUpstream, other: RecordingUpstream) -> None:
        self.shop = shop
        self.other = other

    def config(self) -> str:
        return two_version_config(
            self.shop.endpoint,
            self.shop.endpoint,
            100,
            0,
            extra_service=SERVICES % self.other.endpoint,
        )


@pytest.fixture
async def ups() -> AsyncIterator[Upstreams]:
    shop = await RecordingUpstream("shop").start()
    other = await RecordingUpstream("other").start()
    yield Upstreams(shop, other)
    await shop.stop()
    await other.stop()


async def forwarded(ups: Upstreams, head: bytes) -> tuple[int, ReceivedRequest | None]:
    """Send one request head; the status and what an upstream received, if any."""
    async with running_proxy(ups.config()) as proxy:
        client = await proxy.client()
        response = await client.request(head)
        await client.close()
    received = ups.shop.requests + ups.other.requests
    assert len(received) <= 1
    return response.status, (received[0] if received else None)


# -- absolute-form targets and OPTIONS * -----------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "host", "url"),
    [
        (b"http://app.test/ok?x=1", b"app.test", b"/ok?x=1"),
        (b"http://app.test", b"app.test", b"/"),
        (b"http://app.test?x=1", b"app.test", b"/?x=1"),
        (b"HTTP://App.Test:8080/a/b", b"App.Test:8080", b"/a/b"),
        (b"https://other.test/x", b"other.test", b"/x"),
    ],
    ids=["path-and-query", "no-path", "query-only", "scheme-case-and-port", "routes-by-authority"],
)
async def test_absolute_form_target_routes_by_its_authority_and_forwards_its_path(
    ups: Upstreams, target: bytes, host: bytes, url: bytes
) -> None:
    # The Host header names the other service: the target's authority wins (RFC 9112 §3.2.2).
    decoy = b"app.test" if host == b"other.test" else b"other.test"
    status, received = await forwarded(
        ups, b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, decoy)
    )
    assert status == 200
    assert received is not None
    assert (received.method, received.url) == (b"GET", url)
    assert received.headers_named("Host") == [host]
    assert received.headers_named("X-Forwarded-Host") == [host]
    routed = ups.other.requests if host == b"other.test" else ups.shop.requests
    assert routed == [received]


async def test_absolute_form_without_host_on_http_10_is_forwarded_with_its_authority(
    ups: Upstreams,
) -> None:
    status, received = await forwarded(ups, b"GET http://other.test/x HTTP/1.0\r\n\r\n")
    assert status == 200
    assert received is not None and received.url == b"/x"
    assert received.headers_named("Host") == [b"other.test"]
    assert ups.other.requests == [received]


async def test_options_asterisk_is_forwarded_to_the_hosts_service(ups: Upstreams) -> None:
    status, received = await forwarded(ups, b"OPTIONS * HTTP/1.1\r\nHost: other.test\r\n\r\n")
    assert status == 200
    assert received is not None
    assert (received.method, received.url) == (b"OPTIONS", b"*")
    assert received.headers_named("Host") == [b"other.test"]
    assert ups.other.requests == [received]


@pytest.mark.parametrize(
    "line",
    [
        b"GET * HTTP/1.1",
        b"GET ftp://app.test/x HTTP/1.1",
        b"GET http:///x HTTP/1.1",
        b"GET http://user@app.test/x HTTP/1.1",
        b"GET http://app.test:port/x HTTP/1.1",
        b"GET http://[::1/x HTTP/1.1",
    ],
    ids=["asterisk-not-options", "scheme", "no-authority", "userinfo", "bad-port", "open-bracket"],
)
async def test_bad_request_target_is_400_and_closed(ups: Upstreams, line: bytes) -> None:
    await rejected_with_400(ups, line + b"\r\nHost: app.test\r\n\r\n")


# -- Host must be an authority ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        b"user@app.test",
        b"app.test/x",
        b"app.test:8080/x",
        b"app test",
        b"app.test:",
        b"app.test:99999",
        b"app.test:80:80",
        b":80",
        b"[::1",
        b"[not-ip]:80",
        b"[::1]x",
        b"[fe80::1%25eth0]",
        b"app%zz.test",
        b'app"test',
        b"app\\test",
    ],
)
async def test_host_that_is_not_an_authority_is_400_and_closed(ups: Upstreams, host: bytes) -> None:
    await rejected_with_400(ups, b"GET /x HTTP/1.1\r\nHost: %s\r\n\r\n" % host)


@pytest.mark.parametrize(
    "host",
    [b"app.test", b"APP.test", b"app.test:8080", b"app.te%41st", b"[::1]:8080", b"127.0.0.1"],
)
async def test_valid_hosts_are_routed_and_forwarded_unchanged(ups: Upstreams, host: bytes) -> None:
    status, received = await forwarded(ups, b"GET /x HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
    routed_to_shop = host.lower().startswith(b"app.test")
    assert status == (200 if routed_to_shop else 404)
    if routed_to_shop:
        assert received is not None
        assert received.headers_named("Host") == [host]


async def test_a_bad_host_later_on_a_kept_alive_connection_is_still_400(ups: Upstreams) -> None:
    async with running_proxy(ups.config()) as proxy:
        client = await proxy.client()
        ok = await client.request(b"GET /1 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert ok.status == 200
        bad = await client.request(b"GET /2 HTTP/1.1\r\nHost: app.test@evil\r\n\r\n")
        assert bad.status == 400
        assert await client.closed()
    assert [r.url for r in ups.shop.requests] == [b"/1"]


async def rejected_with_400(ups: Upstreams, data: bytes) -> None:
    async with running_proxy(ups.config()) as proxy:
        client: Client = await proxy.client()
        response = await client.request(data)
        assert response.status == 400
        assert response.header("Connection") == b"close"
        assert await client.closed()
    assert ups.shop.requests == [] and ups.other.requests == []


# -- units -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (b"", True),
        (b"a", True),
        (b"a.b-c_d~e:1", True),
        (b"!$&'()*+,;=", True),
        (b"a%2Fb", True),
        (b"[2001:db8::1]", True),
        (b"[::ffff:1.2.3.4]:65535", True),
        (b"a:65536", False),
        (b"a:0080", True),
        (b"a:", False),
        (b"a b", False),
        (b"a\tb", False),
        (b"a@b", False),
        (b"a/b", False),
        (b"a?b", False),
        (b"a#b", False),
        (b"[]", False),
        (b"[1.2.3.4]", False),
        (b"[::1]:", False),
        (b"[::1]]", False),
        (b"a%2", False),
        (b"\xc3\xa9.test", False),
    ],
)
def test_unit_valid_authority(value: bytes, valid: bool) -> None:
    assert wire.valid_authority(value) is valid


@pytest.mark.parametrize(
    ("target", "split"),
    [
        (b"http://a/b?c", (b"a", b"/b?c")),
        (b"https://a:1", (b"a:1", b"/")),
        (b"http://a?c/d", (b"a", b"/?c/d")),
        (b"http://[::1]:8/x", (b"[::1]:8", b"/x")),
        (b"HTTP://u@a/x", (b"u@a", b"/x")),  # the authority is checked apart
        (b"http:///x", None),
        (b"ws://a/x", None),
        (b"http:/a/x", None),
        (b"*", None),
    ],
)
def test_unit_split_absolute_target(target: bytes, split: tuple[bytes, bytes] | None) -> None:
    assert wire.split_absolute_target(target) == split
