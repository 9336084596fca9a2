"""Functional: a streaming response is bounded by `timeouts.idle` and by its client.

An upstream that stops sending mid-body is cut at the idle timeout (an upstream timeout; the
client connection is cut, never ended cleanly), and a client that closes its side after the
response started ends the exchange at once, freeing the upstream connection. Fake upstreams on
raw loopback sockets; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from tests.helpers import (
    RunningProxy,
    get,
    only_blue,
    raw_upstream,
    read_request_head,
    read_until_closed,
    running_proxy,
    until,
)

HEADS = {
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n",
    "close-delimited": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
}


class Stalling:
    """Sends a response head and 3 body bytes, then goes silent until the proxy lets go."""

    def __init__(self, head: bytes) -> None:
        self.head = head
        self.released = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request_head(reader)
            writer.write(self.head + b"abc")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):
                    await reader.read()  # returns when the proxy closes the connection
        finally:
            self.released.set()


@pytest.mark.parametrize("framing", list(HEADS))
async def test_an_upstream_silent_mid_body_is_cut_at_the_idle_timeout(framing: str) -> None:
    upstream = Stalling(HEADS[framing])
    config = "timeouts: {idle: 600ms, response: 10s}"
    async with (
        raw_upstream(upstream) as endpoint,
        running_proxy(only_blue(endpoint, config)) as proxy,
    ):
        client = await proxy.client()
        # HTTP/1.0 for the close-delimited body: only a reset tells that client it is cut.
        version = "1.0" if framing == "close-delimited" else "1.1"
        await client.send(f"GET / HTTP/{version}\r\nHost: app.test\r\n\r\n".encode())
        started = time.monotonic()
        received, was_reset = await read_until_closed(client.reader, timeout=10)
        elapsed = time.monotonic() - started
        assert received.startswith(b"HTTP/1.1 200") and b"abc" in received
        assert was_reset
        assert 0.5 <= elapsed < 3.0  # at the idle timeout, not the response timeout
        async with asyncio.timeout(2):
            await upstream.released.wait()
        stats = proxy.stats("shop", "blue")
        await until(lambda: stats.in_flight == 0)
        assert stats.upstream_errors["timeout"] == 1
        assert 200 not in stats.requests
        await client.close()


async def test_a_slow_reading_client_is_not_an_upstream_timeout() -> None:
    """While the client does not read, the upstream's silence is the proxy's backpressure:
    the response streams on, however long the client takes."""
    size = 8 * 1024 * 1024

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()
        await reader.read()

    async with (
        raw_upstream(big) as endpoint,
        running_proxy(only_blue(endpoint, "timeouts: {idle: 300ms}")) as proxy,
    ):
        client = await proxy.client()
        await client.send(get())
        plane = proxy.server.plane
        await until(lambda: any(c.write_blocked for c in plane.connections), timeout=5)
        await asyncio.sleep(1.0)  # three idle timeouts with the client not reading
        response = await client.response(timeout=20)
        assert (response.status, len(response.body), response.complete) == (200, size, True)
        assert proxy.stats("shop", "blue").upstream_errors["timeout"] == 0
        await client.close()


async def assert_freed(proxy: RunningProxy, upstream: Stalling) -> None:
    async with asyncio.timeout(2):
        await upstream.released.wait()  # the upstream connection was let go at once
    stats = proxy.stats("shop", "blue")
    await until(lambda: stats.in_flight == 0)
    assert stats.client_aborts == 1
    assert not [status for status in stats.requests if status >= 500]
    assert sum(stats.upstream_errors.values()) == 0


@pytest.mark.parametrize("how", ["close", "half-close"])
async def test_a_client_closing_after_the_response_started_frees_the_upstream(how: str) -> None:
    upstream = Stalling(HEADS["content-length"])
    async with raw_upstream(upstream) as endpoint:
        config = only_blue(endpoint, "timeouts: {idle: 30s, response: 30s}")
        async with running_proxy(config) as proxy:
            client = await proxy.client()
            await client.send(get())
            async with asyncio.timeout(3):
                head = await client.reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            if how == "close":
                await client.close()
            else:
                client.writer.write_eof()
            await assert_freed(proxy, upstream)
            plane = proxy.server.plane
            plane.begin_drain()
            assert plane.drained.is_set()  # a SIGTERM has nothing to wait for
            assert plane.cut_all() == 0
            assert proxy.stats("shop", "blue").drain_cut == 0
            await client.close()
