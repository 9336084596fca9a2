"""Functional: data-plane faults found in review (smuggling, framing, bounds, retries).

Real loopback sockets, bounded waits; each test states the behaviour the fix guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from proxy.upstream.connection import MAX_RESPONSE_HEAD_BYTES
from tests.helpers import (
    RecordingUpstream,
    count_upstream_reads,
    get,
    ok_response,
    raw_upstream,
    read_request_head,
    running_proxy,
    two_version_config,
)

KiB = 1024


def only_blue(endpoint: str, extra_top: str = "") -> str:
    """All traffic to one upstream (green shares the endpoint but gets weight 0)."""
    return two_version_config(endpoint, endpoint, 100, 0, extra_top=extra_top)


async def test_non_idempotent_request_is_not_replayed_after_a_reused_connection_dies() -> None:
    """RFC 9112 §9.3.1.1: a proxy MUST NOT automatically retry non-idempotent requests. A
    pooled connection that dies after the request went out may have been processed."""
    handled: list[bytes] = []

    async def second_request_kills_the_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        for number in (1, 2):
            head = await read_request_head(reader)
            handled.append(head.split(b" ", 1)[0])
            if number == 2:
                writer.close()  # processed, then died before answering
                return
            writer.write(ok_response())
            await writer.drain()

    async with (
        raw_upstream(second_request_kills_the_connection) as endpoint,
        running_proxy(only_blue(endpoint)) as proxy,
    ):
        client = await proxy.client()
        assert (await client.request(get())).status == 200
        response = await client.request(
            b"POST /pay HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0\r\n\r\n"
        )
        assert response.status == 502
        assert handled == [b"GET", b"POST"]  # the POST ran once
        await client.close()


async def test_response_connection_naming_content_length_keeps_the_framing() -> None:
    """`Connection: content-length` from an upstream must not leave the client a response
    without framing on a kept-alive connection (the next answer would be read as body)."""
    blue = await RecordingUpstream(
        "blue",
        responder=lambda request: (
            b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"
        ),
    ).start()
    try:
        async with running_proxy(only_blue(blue.endpoint)) as proxy:
            client = await proxy.client()
            for _ in range(2):
                await client.send(get())
                response = await client.response(timeout=2)
                assert (response.status, response.body, response.complete) == (200, b"hello", True)
            await client.close()
    finally:
        await blue.stop()


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


# The most asyncio and uvloop read from a socket at a time.
MAX_READ = 256 * KiB


async def test_endless_upstream_response_head_is_502_not_buffered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read = count_upstream_reads(monkeypatch)

    async def endless_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(1024):  # 16 MiB if nobody stops it
            writer.write(b"a" * 16 * KiB)
            await writer.drain()
        await asyncio.sleep(30)

    async with (
        raw_upstream(endless_header) as endpoint,
        running_proxy(only_blue(endpoint, "timeouts: {response: 30s}")) as proxy,
    ):
        client = await proxy.client()
        response = await client.request(get())
        assert response.status == 502
        # Cut at the bound, with the read that crossed it: not buffered on.
        assert read.total <= MAX_RESPONSE_HEAD_BYTES + MAX_READ
        assert proxy.stats("shop", "blue").in_flight == 0
        await client.close()


async def test_endless_upstream_response_trailer_cuts_the_response_not_buffered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read = count_upstream_reads(monkeypatch)

    async def endless_trailer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        writer.write(b"0\r\nX-Endless: ")
        for _ in range(1024):  # 16 MiB of one trailer field if nobody stops it
            writer.write(b"a" * 16 * KiB)
            await writer.drain()
        await asyncio.sleep(30)

    async with (
        raw_upstream(endless_trailer) as endpoint,
        running_proxy(only_blue(endpoint, "timeouts: {response: 30s}")) as proxy,
    ):
        client = await proxy.client()
        await client.send(get())
        async with asyncio.timeout(10):
            response = await client.response()
        assert response.status == 200
        assert not response.complete  # cut: never a clean end without the trailer's end
        # Cut at the bound: the read that carried the head and the body, reads of trailer up to
        # the bound, and the one that crossed it.
        assert read.total <= MAX_READ + MAX_RESPONSE_HEAD_BYTES + MAX_READ
        assert proxy.stats("shop", "blue").upstream_errors["protocol"] == 1
        await client.close()


async def test_101_without_upgrade_headers_is_502_not_a_cut_connection() -> None:
    async def bad_switch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with (
        raw_upstream(bad_switch) as endpoint,
        running_proxy(only_blue(endpoint)) as proxy,
    ):
        client = await proxy.client()
        response = await client.request(
            b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n"
        )
        assert response.status == 502
        assert response.complete
        assert await client.closed()
        await client.close()


async def test_client_reads_resume_after_an_upstream_dropped_while_write_blocked() -> None:
    """The client's reads pause while the upstream's write buffer is full; an upstream dropped
    in that state (here: 504, the body was complete) must not leave them paused, or the kept-alive
    client's next request is never read."""
    connections = 0

    async def first_stops_reading(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal connections
        connections += 1
        await read_request_head(reader)
        if connections == 1:
            await asyncio.sleep(30)  # reads no body: the proxy's write buffer fills
        writer.write(ok_response())
        await writer.drain()

    async with (
        raw_upstream(first_stops_reading) as endpoint,
        running_proxy(only_blue(endpoint, "timeouts: {response: 500ms}")) as proxy,
    ):
        client = await proxy.client()
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        async with asyncio.timeout(3):
            while not (conns := list(proxy.server.plane.connections)) or conns[0].active is None:
                await asyncio.sleep(0.005)
        ex = conns[0].active
        assert ex is not None
        async with asyncio.timeout(3):
            while ex.upstream is None:
                await asyncio.sleep(0.005)
        upstream = ex.upstream
        assert upstream.transport is not None
        sent = 0
        # Fill the kernel queues, then the proxy's write buffer to just under its high-water
        # mark (256 KiB), so that the body's last chunk is what pauses the client's reads.
        async with asyncio.timeout(10):
            while True:
                buffered = upstream.transport.get_write_buffer_size()
                if buffered > 252 * KiB:
                    break
                piece = 16 * KiB if buffered < 128 * KiB else KiB
                await client.send(b"%x\r\n%s\r\n" % (piece, b"x" * piece))
                sent += piece
                while ex.body_received < sent:
                    await asyncio.sleep(0.001)
        await client.send(b"%x\r\n%s\r\n0\r\n\r\n" % (4 * KiB, b"x" * 4 * KiB))
        response = await client.response(timeout=3)
        assert response.status == 504
        response = await client.request(get("/next"))
        assert response.status == 200
        await client.close()
