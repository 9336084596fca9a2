"""Request trailers (fields after a chunked body's last chunk) are dropped: they never reach the
upstream and are never merged into a request head, where they could route or rewrite it."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.helpers import (
    RecordingUpstream,
    Upstreams,
    fed_connection,
    get,
    only_blue,
    refused_endpoint,
    running_proxy,
    two_version_config,
)

KiB = 1024
FORCE = "    force: {header: X-Canary}"

CHUNKED_WITH_TRAILERS = (
    b"POST /up HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n"
    b"Host: evil.example\r\nX-Canary: green\r\nX-Trailer: 1\r\n\r\n"
)


@pytest.mark.parametrize("pipelined", [True, False], ids=["behind-a-get", "alone"])
async def test_request_trailers_never_route_nor_reach_the_upstream(
    pipelined: bool, upstreams: Upstreams
) -> None:
    blue = await upstreams.start("blue")
    green = await upstreams.start("green")
    config = two_version_config(blue.endpoint, green.endpoint, 100, 0, extra_service=FORCE)
    async with running_proxy(config) as proxy:
        client = await proxy.client()
        await client.send((get("/ok") if pipelined else b"") + CHUNKED_WITH_TRAILERS)
        for _ in range(1 + pipelined):
            response = await client.response()
            assert response.status == 200
            assert response.header("X-App-Version") == b"blue"
        await client.close()
    assert green.requests == []
    post = blue.requests[-1]
    assert post.method == b"POST"
    assert post.body == b"hello"
    assert post.headers_named("Host") == [b"app.test"]
    assert post.header("X-Trailer") is None
    assert post.header("X-Canary") is None
    assert all(b"evil" not in value for _, value in post.headers)


async def test_unit_trailers_of_a_queued_request_leave_its_head_as_parsed() -> None:
    with refused_endpoint() as blue:
        conn = fed_connection(two_version_config(blue, blue, 100, 0, extra_service=FORCE))
        conn.feed(get("/ok") + CHUNKED_WITH_TRAILERS)  # the GET waits for its connect
        [queued] = conn.protocol.pipeline
        assert queued.method == b"POST"
        assert queued.request_complete
        assert (queued.hosts, queued.host) == (1, b"app.test")
        assert [name for _, name, _, _ in queued.special] == [b"transfer-encoding"]
        assert not any(b"X-Trailer" in line for line in queued.lines)


async def test_endless_request_trailer_is_431_not_buffered() -> None:
    """httptools holds a trailer field until it ends: a client streaming one must be stopped at
    the header limit, as in the head, not buffered without bound."""
    blue = await RecordingUpstream("blue").start()
    try:
        config = only_blue(blue.endpoint, "limits: {max_header_bytes: 8KiB}")
        async with running_proxy(config) as proxy:
            client = await proxy.client()
            await client.send(
                b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\nX-Trailer: "
            )

            async def flood() -> None:
                with contextlib.suppress(ConnectionError):
                    for _ in range(256):  # 4 MiB in all, far above the limit
                        await client.send(b"a" * 16 * KiB)
                        await asyncio.sleep(0)

            sender = asyncio.create_task(flood())
            try:
                response = await client.response(timeout=3)
                assert response.status == 431
                assert await client.closed()
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
            await client.close()
    finally:
        await blue.stop()
    assert blue.requests == []  # the request never completed upstream
