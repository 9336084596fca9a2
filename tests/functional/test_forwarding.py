"""Functional: requests through a real proxy to real upstreams on loopback."""

from __future__ import annotations

import asyncio

from tests.helpers import (
    Client,
    RecordingUpstream,
    Upstreams,
    get,
    ok_response,
    running_proxy,
    two_version_config,
)


async def test_get_is_forwarded_with_host_and_forwarding_headers(upstreams: Upstreams) -> None:
    blue = await upstreams.start("blue")
    green = await upstreams.start("green")
    async with running_proxy(two_version_config(blue.endpoint, green.endpoint, 100, 0)) as proxy:
        client = await proxy.client()
        response = await client.request(get("/a/b?c=1", extra="X-Request-Id: abc\r\n"))
        assert response.status == 200
        assert response.body == b"ok\n"
        assert response.header("X-App-Version") == b"blue"
        [received] = blue.requests
        assert received.method == b"GET"
        assert received.url == b"/a/b?c=1"
        assert received.header("Host") == b"app.test"
        assert received.header("X-Forwarded-For") == b"127.0.0.1"
        assert received.header("X-Forwarded-Proto") == b"http"
        assert received.header("X-Forwarded-Host") == b"app.test"
        assert received.header("X-Request-Id") == b"abc"
        assert green.requests == []
        await client.close()


async def test_keep_alive_reuses_one_upstream_connection(upstreams: Upstreams) -> None:
    blue = await upstreams.start("blue")
    green = await upstreams.start("green")
    async with running_proxy(two_version_config(blue.endpoint, green.endpoint, 100, 0)) as proxy:
        client = await proxy.client()
        for _ in range(20):
            response = await client.request(get())
            assert response.status == 200
        assert len(blue.requests) == 20
        assert blue.connections == 1
        ids = {r.header("X-Request-Id") for r in blue.requests}
        assert len(ids) == 20  # generated, unique
        await client.close()


async def test_post_body_content_length_and_chunked_reach_upstream_intact(
    upstreams: Upstreams,
) -> None:
    blue = await upstreams.start("blue")
    green = await upstreams.start("green")
    async with running_proxy(two_version_config(blue.endpoint, green.endpoint, 100, 0)) as proxy:
        client = await proxy.client()
        body = b"x" * 200_000
        response = await client.request(
            b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert response.status == 200
        chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        response = await client.request(
            b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
        )
        assert response.status == 200
        first, second = blue.requests
        assert first.body == body
        assert first.header("Content-Length") == b"%d" % len(body)
        assert second.body == b"hello world"
        assert second.header("Transfer-Encoding") == b"chunked"
        await client.close()


async def test_chunked_response_is_rechunked_and_pipelined_answers_keep_order(
    upstreams: Upstreams,
) -> None:
    def respond(request):  # type: ignore[no-untyped-def]
        body = request.url
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            len(body),
            body,
        )

    blue = await upstreams.start("blue", responder=respond)
    green = await upstreams.start("green")
    async with running_proxy(two_version_config(blue.endpoint, green.endpoint, 100, 0)) as proxy:
        client = await proxy.client()
        await client.send(b"".join(get(f"/{i}") for i in range(10)))
        for i in range(10):
            response = await client.response()
            assert response.status == 200
            assert response.header("Transfer-Encoding") == b"chunked"
            assert response.body == f"/{i}".encode()
        await client.close()


async def test_weighted_split_is_exact_over_a_cycle(upstreams: Upstreams) -> None:
    blue = await upstreams.start("blue")
    green = await upstreams.start("green")
    async with running_proxy(two_version_config(blue.endpoint, green.endpoint, 90, 10)) as proxy:
        client = await proxy.client()
        for _ in range(200):
            assert (await client.request(get())).status == 200
        assert (len(blue.requests), len(green.requests)) == (180, 20)
        stats = proxy.stats("shop", "green")
        assert stats.requests == {200: 20}
        assert stats.in_flight == 0
        await client.close()


async def test_head_response_ends_without_body_and_connection_is_reused(
    upstreams: Upstreams,
) -> None:
    blue = await RecordingUpstream(
        "blue",
        responder=lambda r: (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
            if r.method == b"HEAD"
            else ok_response(b"0123456789")
        ),
    ).start()
    green = await upstreams.start("green")
    async with running_proxy(two_version_config(blue.endpoint, green.endpoint, 100, 0)) as proxy:
        client = await proxy.client()
        response = await client.request(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", head_request=True)
        assert response.status == 200
        assert response.header("Content-Length") == b"10"
        response = await client.request(get())
        assert response.body == b"0123456789"
        assert blue.connections == 1
        await client.close()
    await blue.stop()


async def test_unknown_service_gets_404_and_keeps_the_connection(upstreams: Upstreams) -> None:
    blue = await upstreams.start("blue")
    green = await upstreams.start("green")
    config = two_version_config(blue.endpoint, green.endpoint).replace(
        "    version_header: X-App-Version",
        "    version_header: X-App-Version\n    match: {host: shop.test}",
    )
    async with running_proxy(config) as proxy:
        client = await proxy.client()
        response = await client.request(get(host="other.test"))
        assert response.status == 404
        response = await client.request(get(host="shop.test:8080"))
        assert response.status == 200
        await client.close()


async def test_many_concurrent_clients(upstreams: Upstreams) -> None:
    blue = await upstreams.start("blue")
    green = await upstreams.start("green")
    async with running_proxy(two_version_config(blue.endpoint, green.endpoint, 50, 50)) as proxy:

        async def one_client() -> int:
            client = await Client.connect(proxy.port)
            ok = 0
            for _ in range(25):
                ok += (await client.request(get())).status == 200
            await client.close()
            return ok

        results = await asyncio.gather(*(one_client() for _ in range(40)))
        assert sum(results) == 1000
        assert len(blue.requests) + len(green.requests) == 1000


async def test_the_version_header_is_the_proxys_even_when_the_upstream_sends_one(
    upstreams: Upstreams,
) -> None:
    blue = await RecordingUpstream(
        "blue", responder=lambda r: ok_response(extra=b"x-app-version: 9.9-from-upstream\r\n")
    ).start()
    green = await upstreams.start("green")
    async with running_proxy(two_version_config(blue.endpoint, green.endpoint, 100, 0)) as proxy:
        client = await proxy.client()
        response = await client.request(get())
        versions = [v for k, v in response.headers if k.lower() == b"x-app-version"]
        assert versions == [b"blue"]
        await client.close()
    await blue.stop()
