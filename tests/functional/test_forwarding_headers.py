"""Headers that say who the client is and which proxies a message passed: the client cannot forge
them (Forwarded, X-Real-IP, names with "_"), cannot strip what the proxy relies on by naming it
in Connection, and the proxy adds its Via entry both ways."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.codec import wire
from tests.helpers import (
    ReceivedRequest,
    RecordingUpstream,
    get,
    ok_response,
    running_proxy,
    two_version_config,
)

STICKY = "    sticky: {header: X-User}"


class Upstreams:
    def __init__(self, blue: RecordingUpstream, green: RecordingUpstream) -> None:
        self.blue = blue
        self.green = green

    def config(self, top: str = "", service: str = "") -> str:
        return two_version_config(
            self.blue.endpoint, self.green.endpoint, 100, 0, extra_service=service, extra_top=top
        )


@pytest.fixture
async def ups() -> AsyncIterator[Upstreams]:
    def respond(request: ReceivedRequest) -> bytes:
        return ok_response(extra=b"Via: 1.1 app-sidecar\r\n" if request.url == b"/via" else b"")

    blue = await RecordingUpstream("blue", responder=respond).start()
    green = await RecordingUpstream("green").start()
    yield Upstreams(blue, green)
    await blue.stop()
    await green.stop()


async def one_request(ups: Upstreams, data: bytes, top: str = "", service: str = "") -> int:
    async with running_proxy(ups.config(top, service)) as proxy:
        client = await proxy.client()
        response = await client.request(data)
        await client.close()
    return response.status


SPOOFING = (
    "Forwarded: for=6.6.6.6;host=evil.test;proto=https\r\n"
    "X-Real-IP: 6.6.6.6\r\n"
    "X_Forwarded_For: 6.6.6.6\r\n"
    "X_Real_IP: 6.6.6.6\r\n"
    "Some_Other_Name: x\r\n"
)


async def test_client_forwarded_and_real_ip_are_rebuilt_and_underscore_names_dropped(
    ups: Upstreams,
) -> None:
    assert await one_request(ups, get(extra=SPOOFING)) == 200
    [received] = ups.blue.requests
    assert received.headers_named("Forwarded") == [b'for=127.0.0.1;host="app.test";proto=http']
    assert received.headers_named("X-Real-IP") == [b"127.0.0.1"]
    assert received.headers_named("X-Forwarded-For") == [b"127.0.0.1"]
    assert not [name for name, _ in received.headers if b"_" in name]


async def test_a_plain_request_gets_every_forwarding_header_once(ups: Upstreams) -> None:
    assert await one_request(ups, get()) == 200
    [received] = ups.blue.requests
    assert received.headers_named("Forwarded") == [b'for=127.0.0.1;host="app.test";proto=http']
    assert received.headers_named("X-Real-IP") == [b"127.0.0.1"]
    assert received.headers_named("Via") == [b"1.1 laneswitch"]


async def test_http_10_without_host_gets_forwarded_without_host_and_a_1_0_via(
    ups: Upstreams,
) -> None:
    assert await one_request(ups, b"GET / HTTP/1.0\r\n\r\n") == 200
    [received] = ups.blue.requests
    assert received.headers_named("Forwarded") == [b"for=127.0.0.1;proto=http"]
    assert received.headers_named("Via") == [b"1.0 laneswitch"]


async def test_trusted_hops_keep_the_last_forwarded_elements_and_the_real_ip(
    ups: Upstreams,
) -> None:
    extra = (
        "X-Forwarded-For: 6.6.6.6, 10.0.0.1\r\n"
        'Forwarded: for=6.6.6.6;host="a,b", for="[2001:db8::1]";proto=https\r\n'
        "X-Real-IP: 6.6.6.6\r\n"
    )
    assert await one_request(ups, get(extra=extra), top="trusted_hops: 1") == 200
    [received] = ups.blue.requests
    assert received.headers_named("X-Forwarded-For") == [b"10.0.0.1, 127.0.0.1"]
    assert received.headers_named("X-Real-IP") == [b"10.0.0.1"]
    assert received.headers_named("Forwarded") == [
        b'for="[2001:db8::1]";proto=https, for=127.0.0.1;host="app.test";proto=http'
    ]


async def test_client_via_is_kept_and_the_proxy_appends_its_own(ups: Upstreams) -> None:
    assert await one_request(ups, get(extra="Via: 1.0 edge, 1.1 cdn\r\n")) == 200
    [received] = ups.blue.requests
    assert received.headers_named("Via") == [b"1.0 edge, 1.1 cdn, 1.1 laneswitch"]


async def test_responses_get_the_proxys_via_after_the_upstreams(ups: Upstreams) -> None:
    async with running_proxy(ups.config(service="    match: {host: app.test}")) as proxy:
        client = await proxy.client()
        plain = await client.request(get("/"))
        chained = await client.request(get("/via"))
        local = await client.request(get("/", host="nowhere.test"))
        await client.close()
    assert [v for k, v in plain.headers if k.lower() == b"via"] == [b"1.1 laneswitch"]
    assert [v for k, v in chained.headers if k.lower() == b"via"] == [
        b"1.1 app-sidecar",
        b"1.1 laneswitch",
    ]
    assert local.status == 404
    assert local.header("Via") is None  # the proxy's own answer was not forwarded


async def test_connection_cannot_strip_headers_the_proxy_reads_or_sets(ups: Upstreams) -> None:
    named = "Cookie, X-Request-Id, X-Forwarded-For, Forwarded, Via, X-User, Host, X-Plain"
    extra = (
        f"Connection: {named}\r\n"
        "Cookie: session=1\r\n"
        "X-Request-Id: req-7\r\n"
        "X-User: alice\r\n"
        "Via: 1.1 edge\r\n"
        "X-Plain: dropped\r\n"
    )
    assert await one_request(ups, get(extra=extra), service=STICKY) == 200
    [received] = ups.blue.requests + ups.green.requests
    assert received.headers_named("Cookie") == [b"session=1"]
    assert received.headers_named("X-Request-Id") == [b"req-7"]
    assert received.headers_named("X-User") == [b"alice"]
    assert received.headers_named("Host") == [b"app.test"]
    assert received.headers_named("X-Forwarded-For") == [b"127.0.0.1"]
    assert received.headers_named("Via") == [b"1.1 edge, 1.1 laneswitch"]
    assert received.header("X-Plain") is None  # forwarded verbatim, so Connection drops it
    assert received.header("Connection") is None


# -- units ----------------------------------------------------------------------------------------


def test_unit_forwarded_elements_split_outside_quoted_strings() -> None:
    values = [b'for=a;host="x,y", for="[::1]"', b' ,for="q\\",r" ', b"for=b"]
    assert wire.forwarded_elements(values) == [
        b'for=a;host="x,y"',
        b'for="[::1]"',
        b'for="q\\",r"',
        b"for=b",
    ]


@pytest.mark.parametrize(
    ("peer", "node"),
    [(b"192.0.2.1", b"192.0.2.1"), (b"2001:db8::1", b'"[2001:db8::1]"'), (b"", b"unknown")],
)
def test_unit_forwarded_node(peer: bytes, node: bytes) -> None:
    assert wire.forwarded_node(peer) == node


def test_unit_underscore_names_are_dropped_unless_configured() -> None:
    kinds = wire.request_header_kinds({b"x_user"})
    assert kinds[b"X_Forwarded_For"] == wire.DROPPED
    assert kinds[b"X_User"] == wire.CONTROL  # a configured sticky or force header is honoured
    assert kinds[b"X-Plain"] == 0
    assert wire.RESPONSE_KINDS[b"X_Up"] == 0  # only request headers (nginx's rule)
