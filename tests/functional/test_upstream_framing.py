"""Functional: upstream response framing is exact.

Bytes an upstream sends after the end of a response (past its Content-Length, after the last
chunk, a body on a HEAD/204/304 answer) are a protocol error: the response that was whole is
delivered, the connection is closed and never reused, and those bytes reach no client (no
response queue poisoning). Fake upstreams on raw loopback sockets; every wait is bounded.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from tests.helpers import (
    RecordingUpstream,
    get,
    only_blue,
    raw_upstream,
    read_request_head,
    read_until_closed,
    reset_on_close,
    running_proxy,
    until,
)


def path_of(head: bytes) -> bytes:
    return head.split(b" ", 2)[1]


def honest(head: bytes) -> bytes:
    body = b"honest " + path_of(head)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@dataclass
class LyingOnce:
    """An upstream whose first connection answers its first request with `first` (in one
    write) and then waits for the proxy to close it; every later connection is honest."""

    first: bytes
    connections: int = 0
    first_closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.connections == 1:
            try:
                await read_request_head(reader)
                writer.write(self.first)
                await writer.drain()
                while await reader.read(65536):  # whatever else comes, until the proxy closes
                    pass
            finally:
                self.first_closed.set()
            return
        while True:
            head = await read_request_head(reader)
            writer.write(honest(head))
            await writer.drain()


EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"


async def test_bytes_past_content_length_are_not_the_next_pipelined_answer() -> None:
    """Case a: the leftover is a whole response; the pipelined second request must not get it."""
    upstream = LyingOnce(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + EVIL)
    async with (
        raw_upstream(upstream) as endpoint,
        running_proxy(only_blue(endpoint)) as proxy,
    ):
        client = await proxy.client()
        await client.send(get("/a") + get("/b"))
        first = await client.response()
        second = await client.response()
        assert (first.status, first.body, first.complete) == (200, b"hello", True)
        assert (second.status, second.body) == (200, b"honest /b")
        async with asyncio.timeout(2):
            await upstream.first_closed.wait()
        stats = proxy.stats("shop", "blue")
        assert stats.upstream_errors["protocol"] == 1
        assert stats.requests == {200: 2}
        assert upstream.connections == 2
        await client.close()


async def test_a_leftover_head_never_reaches_another_client() -> None:
    """Case b: the leftover is a head announcing a body that never comes. The connection must
    not be pooled mid-message for another client's request."""
    upstream = LyingOnce(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n"
    )
    async with (
        raw_upstream(upstream) as endpoint,
        running_proxy(only_blue(endpoint, "timeouts: {response: 2s}")) as proxy,
    ):
        one = await proxy.client()
        response = await one.request(get("/a"))
        assert (response.status, response.body, response.complete) == (200, b"hello", True)
        async with asyncio.timeout(2):
            await upstream.first_closed.wait()
        other = await proxy.client()
        response = await other.request(get("/b"))
        assert (response.status, response.body, response.complete) == (200, b"honest /b", True)
        stats = proxy.stats("shop", "blue")
        assert stats.upstream_errors["protocol"] == 1
        assert stats.requests == {200: 2}
        await one.close()
        await other.close()


async def test_a_body_on_a_head_answer_is_not_the_next_answer() -> None:
    """Case c: the body of a HEAD answer, then a pipelined GET."""
    upstream = LyingOnce(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    async with (
        raw_upstream(upstream) as endpoint,
        running_proxy(only_blue(endpoint)) as proxy,
    ):
        client = await proxy.client()
        head = get("/a").replace(b"GET", b"HEAD", 1)
        await client.send(head + get("/b"))
        first = await client.response(head_request=True)
        second = await client.response()
        assert (first.status, first.header("Content-Length"), first.body) == (200, b"5", b"")
        assert (second.status, second.body, second.complete) == (200, b"honest /b", True)
        async with asyncio.timeout(2):
            await upstream.first_closed.wait()
        assert proxy.stats("shop", "blue").upstream_errors["protocol"] == 1
        assert upstream.connections == 2
        await client.close()


@pytest.mark.parametrize(
    "first",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloX",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello" + EVIL,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + EVIL,
        b"HTTP/1.1 204 No Content\r\n\r\nhello",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["length-then-crlf", "length-then-byte", "close-then-more", "chunked", "204", "304"],
)
async def test_bytes_after_the_end_close_the_connection_and_reach_nobody(first: bytes) -> None:
    upstream = LyingOnce(first)
    async with (
        raw_upstream(upstream) as endpoint,
        running_proxy(only_blue(endpoint)) as proxy,
    ):
        client = await proxy.client()
        await client.send(get("/a") + get("/b"))
        response = await client.response()
        status = int(first[9:12])
        assert response.status == status
        assert response.complete
        assert b"evil" not in response.body and b"X" not in response.body
        second = await client.response()
        assert (second.status, second.body) == (200, b"honest /b")
        async with asyncio.timeout(2):
            await upstream.first_closed.wait()
        stats = proxy.stats("shop", "blue")
        assert stats.upstream_errors["protocol"] == 1
        assert upstream.connections == 2
        await client.close()


async def test_an_exact_response_keeps_its_connection() -> None:
    """The check costs honest upstreams nothing: exact responses reuse one connection, in any
    framing, whether they arrive whole or split across reads."""
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",  # to HEAD
    ]
    connections = 0

    async def exact(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for split in (False, True):
            for answer in answers:
                await read_request_head(reader)
                if split:  # the response ends in a later read than it began
                    writer.write(answer[:-2])
                    await writer.drain()
                    await asyncio.sleep(0.01)
                    answer = answer[-2:]
                writer.write(answer)
                await writer.drain()
        await reader.read()

    async with (
        raw_upstream(exact) as endpoint,
        running_proxy(only_blue(endpoint)) as proxy,
    ):
        client = await proxy.client()
        for _ in range(2):
            for _ in answers[:-1]:
                response = await client.request(get())
                assert response.complete
            head = await client.request(get().replace(b"GET", b"HEAD", 1), head_request=True)
            assert (head.status, head.header("Content-Length")) == (200, b"5")
        stats = proxy.stats("shop", "blue")
        assert stats.upstream_errors["protocol"] == 0
        assert stats.requests == {200: 10, 204: 2}
        assert connections == 1
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


# -- the end of a close-delimited body ---------------------------------------------------------


@pytest.mark.parametrize("client_version", ["1.1", "1.0"])
@pytest.mark.parametrize("end", ["fin", "rst"])
async def test_a_reset_does_not_end_a_close_delimited_body(client_version: str, end: str) -> None:
    """A body without Content-Length or chunking ends with the upstream's FIN (RFC 9112 §6.3);
    a reset is a failure. An HTTP/1.1 client must not get the last chunk, and an HTTP/1.0
    client, for which a FIN is the clean end of such a body, must get a reset."""
    client_has_part = asyncio.Event()

    async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart of it")
        await writer.drain()
        await client_has_part.wait()
        if end == "rst":
            reset_on_close(writer)
        writer.close()

    async with (
        raw_upstream(close_delimited) as endpoint,
        running_proxy(only_blue(endpoint)) as proxy,
    ):
        client = await proxy.client()
        await client.send(
            f"GET / HTTP/{client_version}\r\nHost: app.test\r\nConnection: close\r\n\r\n".encode()
        )
        received = b""
        async with asyncio.timeout(3):
            while b"part of it" not in received:
                piece = await client.reader.read(65536)
                assert piece, "the proxy closed before forwarding the body"
                received += piece
        client_has_part.set()
        rest, was_reset = await read_until_closed(client.reader)
        received += rest
        stats = proxy.stats("shop", "blue")
        await until(lambda: stats.in_flight == 0)
        last_chunk = received.endswith(b"0\r\n\r\n")
        if end == "fin":
            assert stats.requests == {200: 1}
            assert stats.upstream_errors["reset"] == 0
            assert not was_reset
            assert last_chunk == (client_version == "1.1")
        else:
            assert stats.upstream_errors["reset"] == 1
            assert 200 not in stats.requests
            assert not last_chunk
            if client_version == "1.0":
                assert was_reset  # a FIN would tell this client the body is whole
        await client.close()
