"""Functional: bodies streamed both ways with backpressure, 100-continue, Upgrade, HTTP/1.0 clients
and bodiless responses, on real loopback sockets."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import socket
import struct
import sys
import termios
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import (
    ReceivedRequest,
    RunningProxy,
    Upstreams,
    get,
    ok_response,
    only_blue,
    raw_upstream,
    read_request_head,
    running_proxy,
    until,
)

MiB = 1024 * 1024

# What the proxy may hold of a body in its own memory while a peer is blocked: its write
# high-water mark (256 KiB) plus a read or two; far below any whole large body.
PROXY_HOLD_LIMIT = 1 * MiB

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts kernel socket queues with Linux ioctls"
)

# -- helpers -------------------------------------------------------------------------------------


def chunked(body: bytes, size: int) -> bytes:
    """`body` in chunked framing, `size` bytes a chunk, with the last chunk."""
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length in {head!r}")


def head_has(head: bytes, name: bytes) -> bool:
    return any(
        line.partition(b":")[0].strip().lower() == name.lower() for line in head.split(b"\r\n")[1:]
    )


@dataclass
class Stream:
    """A body of `total` bytes made of distinct blocks, hashed as it is produced."""

    total: int
    block: int = 256 * 1024
    handed: int = 0  # bytes given to the transport so far
    moved: int = 0  # bytes given to the transport whose write (drain) has completed
    _base: bytes = field(default_factory=lambda: os.urandom(256 * 1024))

    def make(self, index: int) -> bytes:
        return struct.pack(">Q", index) + self._base[8 : self.block]


async def write_stream(writer: asyncio.StreamWriter, stream: Stream) -> str:
    digest = hashlib.sha256()
    for index in range(stream.total // stream.block):
        data = stream.make(index)
        digest.update(data)
        stream.handed += len(data)
        writer.write(data)
        await writer.drain()
        stream.moved += len(data)
    return digest.hexdigest()


async def stalled(stream: Stream, quiet: float = 0.3, timeout: float = 4.0) -> int:
    """Bytes moved once `stream` has made no progress for `quiet` seconds (writes are blocked).

    Seeing that nothing moves needs a time window; there is no event for "blocked".
    """
    async with asyncio.timeout(timeout):
        last = -1
        while stream.moved != last:
            last = stream.moved
            await asyncio.sleep(quiet)
    return last


def kernel_queued(sock: socket.socket) -> int:
    """Bytes the kernel holds for a TCP socket: received but unread, plus not yet sent/acked."""
    fd = sock.fileno()
    unread: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    unsent: int = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0]
    return unread + unsent


def proxy_kernel_queued(proxy: RunningProxy) -> int:
    """Bytes in the kernel buffers of every socket the proxy has open (both sides)."""
    plane = proxy.server.plane
    transports = [conn.transport for conn in plane.connections]
    for pool in plane.pools.pools.values():
        transports += [conn.transport for conn in [*pool.busy, *pool.idle]]
    return sum(kernel_queued(t.get_extra_info("socket")) for t in transports if t is not None)


async def recv_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """A response head read from a raw socket, and the bytes read past it."""
    loop = asyncio.get_running_loop()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise ConnectionError(f"closed before the end of a head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


async def recv_digest(sock: socket.socket, total: int, already: bytes = b"") -> str:
    """Read the rest of a `total`-byte body from a raw socket; its sha256."""
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256(already)
    remaining = total - len(already)
    while remaining:
        data = await loop.sock_recv(sock, min(remaining, MiB))
        if not data:
            raise ConnectionError(f"body cut with {remaining} bytes missing")
        digest.update(data)
        remaining -= len(data)
    return digest.hexdigest()


async def raw_connect(port: int) -> socket.socket:
    """A client socket the test reads only when it wants to (no stream buffer in between)."""
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


# -- large bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1 * MiB, 10 * MiB], ids=["1MiB", "10MiB"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_response_passes_intact(size: int, framing: str, upstreams: Upstreams) -> None:
    body = os.urandom(size)
    if framing == "content-length":
        answer = ok_response(body)
    else:
        answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(body, 100_003)
    blue = await upstreams.start("blue", responder=lambda request: answer)
    async with running_proxy(only_blue(blue.endpoint)) as proxy:
        client = await proxy.client()
        response = await client.request(get())
        assert response.status == 200
        assert response.complete
        assert len(response.body) == size
        assert response.body == body
        response = await client.request(get())  # and the connection goes on
        assert response.body == body
        await client.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_request_body_reaches_the_upstream_intact(
    framing: str, upstreams: Upstreams
) -> None:
    body = os.urandom(10 * MiB)
    blue = await upstreams.start("blue")
    async with running_proxy(only_blue(blue.endpoint)) as proxy:
        client = await proxy.client()
        if framing == "content-length":
            request = (
                b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
        else:
            request = (
                b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                + chunked(body, 65_537)
            )
        response = await client.request(request)
        assert response.status == 200
        [received] = blue.requests
        assert len(received.body) == len(body)
        assert received.body == body
        await client.close()


# -- backpressure ------------------------------------------------------------------------------


@linux_only
async def test_slow_client_blocks_the_upstream_instead_of_being_buffered() -> None:
    stream = Stream(total=64 * MiB)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % stream.total
    upstream: list[asyncio.StreamWriter] = []
    sent: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def streaming(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        upstream.append(writer)
        writer.write(head)
        sent.set_result(await write_stream(writer, stream))
        await reader.read()

    loop = asyncio.get_running_loop()
    async with raw_upstream(streaming) as endpoint, running_proxy(only_blue(endpoint)) as proxy:
        with await raw_connect(proxy.port) as client:
            await loop.sock_sendall(client, get())
            moved = await stalled(stream)  # the client reads nothing meanwhile
            assert moved < stream.total, (
                "the upstream wrote the whole body to a client reading nothing"
            )
            # Whatever the upstream wrote and no kernel buffer holds is inside the proxy process.
            writer = upstream[0]
            in_kernels = (
                kernel_queued(writer.get_extra_info("socket"))
                + proxy_kernel_queued(proxy)
                + kernel_queued(client)
            )
            held = len(head) + stream.handed - writer.transport.get_write_buffer_size() - in_kernels
            assert held < PROXY_HOLD_LIMIT, f"the proxy holds {held} bytes of the response body"
            async with asyncio.timeout(5):
                response_head, rest = await recv_head(client)
                assert response_head.startswith(b"HTTP/1.1 200 ")
                assert content_length(response_head) == stream.total
                assert await recv_digest(client, stream.total, rest) == await sent


@linux_only
async def test_slow_upstream_blocks_the_client_upload_instead_of_being_buffered() -> None:
    loop = asyncio.get_running_loop()
    stream = Stream(total=64 * MiB)
    go = asyncio.Event()
    body_read = 0  # body bytes the upstream application has read
    accepted: list[socket.socket] = []

    async def lazy_upstream(listener: socket.socket) -> str:
        nonlocal body_read
        conn, _ = await loop.sock_accept(listener)
        with conn:
            accepted.append(conn)
            conn.setblocking(False)
            head, early = await recv_head(conn)
            body_read = len(early)
            await go.wait()  # reads nothing more of the body until told
            digest = await recv_digest(conn, content_length(head), early)
            await loop.sock_sendall(conn, ok_response(b"got it\n"))
            return digest

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        upstream = asyncio.create_task(lazy_upstream(listener))
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
        async with running_proxy(only_blue(endpoint)) as proxy:
            client = await proxy.client()
            await client.send(
                b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % stream.total
            )
            upload = asyncio.create_task(write_stream(client.writer, stream))
            moved = await stalled(stream)
            assert not upload.done(), (
                "the client uploaded everything to an upstream reading nothing"
            )
            assert moved < stream.total
            # Whatever the client wrote and no kernel buffer holds is inside the proxy process.
            client_buffered = client.writer.transport.get_write_buffer_size()
            in_kernels = (
                kernel_queued(client.writer.get_extra_info("socket"))
                + proxy_kernel_queued(proxy)
                + kernel_queued(accepted[0])
            )
            held = stream.handed - client_buffered - in_kernels - body_read
            assert held < PROXY_HOLD_LIMIT, f"the proxy holds {held} bytes of the request body"
            go.set()
            async with asyncio.timeout(5):
                sent = await upload
                response = await client.response()
                assert response.status == 200
                assert response.body == b"got it\n"
                assert await upstream == sent
            await client.close()


# -- Expect: 100-continue --------------------------------------------------------------------------


async def test_expect_100_continue_passes_the_interim_response_before_the_body() -> None:
    upstream_heads: list[bytes] = []

    async def continue_then_echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await read_request_head(reader)
        upstream_heads.append(head)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        body = await reader.readexactly(content_length(head))
        writer.write(ok_response(b"echo:" + body))
        await writer.drain()
        while True:  # then plain keep-alive
            upstream_heads.append(await read_request_head(reader))
            writer.write(ok_response())
            await writer.drain()

    async with (
        raw_upstream(continue_then_echo) as endpoint,
        running_proxy(only_blue(endpoint)) as proxy,
    ):
        client = await proxy.client()
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n"
        )
        async with asyncio.timeout(3):
            interim = await client.reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100 ")
        await client.send(b"hello world")
        response = await client.response()
        assert response.status == 200
        assert response.body == b"echo:hello world"
        response = await client.request(get())  # the connection is still in step
        assert response.status == 200
        assert len(upstream_heads) == 2
        await client.close()


# -- Upgrade -----------------------------------------------------------------------------------


async def test_websocket_is_tunnelled_both_ways() -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("hello from upstream")  # likely in the same segment as the 101
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
            elif message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with running_proxy(only_blue(f"{host}:{port}")) as proxy:
            url = f"http://127.0.0.1:{proxy.port}/ws"
            async with (
                aiohttp.ClientSession() as session,
                asyncio.timeout(5),
                session.ws_connect(url) as ws,
            ):
                assert await ws.receive_str() == "hello from upstream"
                for text in ("one", "two", "three"):
                    await ws.send_str(text)
                    assert await ws.receive_str() == "echo:" + text
                big = os.urandom(2 * MiB)
                await ws.send_bytes(big)
                assert await ws.receive_bytes() == big
                await ws.close()
            stats = proxy.stats("shop", "blue")
            assert stats.requests == {101: 1}
            # In flight until both peers have closed the tunnel, then no longer.
            await until(lambda: stats.in_flight == 0)
    finally:
        await runner.cleanup()


async def test_refused_upgrade_closes_and_never_tunnels_early_bytes() -> None:
    seen: list[bytes] = []  # request lines, in the order the upstream read them
    started = 0
    finished = 0

    async def refuses_upgrades(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal started, finished
        started += 1
        try:
            while True:
                head = await read_request_head(reader)
                seen.append(head)
                writer.write(ok_response(b"no upgrade here\n"))
                await writer.drain()
        finally:
            finished += 1

    async with raw_upstream(refuses_upgrades) as endpoint:
        async with running_proxy(only_blue(endpoint)) as proxy:
            client = await proxy.client()
            smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
            await client.send(
                b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                + smuggled
            )
            response = await client.response()
            assert response.status == 200
            assert response.complete
            assert response.body == b"no upgrade here\n"
            assert response.header("Upgrade") is None
            assert await client.closed()
            other = await proxy.client()
            assert (await other.request(get("/next"))).status == 200
            await other.close()
        # The proxy is stopped: every upstream connection is closed and fully read.
        async with asyncio.timeout(2):
            while finished < started:
                await asyncio.sleep(0.005)
    assert [head.split(b"\r\n", 1)[0] for head in seen] == [
        b"GET /ws HTTP/1.1",
        b"GET /next HTTP/1.1",
    ]
    assert head_has(seen[0], b"upgrade")


# -- HTTP/1.0 clients ----------------------------------------------------------------------------


def chunked_or_plain(request: ReceivedRequest) -> bytes:
    if request.url == b"/chunked":
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(
            b"abcdefghij" * 50, 7
        )
    return ok_response(b"plain\n")


async def test_http_10_client_without_keep_alive_gets_its_answer_then_close(
    upstreams: Upstreams,
) -> None:
    blue = await upstreams.start("blue", responder=chunked_or_plain)
    async with running_proxy(only_blue(blue.endpoint)) as proxy:
        client = await proxy.client()
        response = await client.request(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        assert response.status == 200
        assert response.body == b"plain\n"
        assert await client.closed()


async def test_http_10_client_with_keep_alive_is_kept_alive(upstreams: Upstreams) -> None:
    blue = await upstreams.start("blue", responder=chunked_or_plain)
    async with running_proxy(only_blue(blue.endpoint)) as proxy:
        client = await proxy.client()
        for _ in range(3):
            response = await client.request(
                b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"
            )
            assert response.status == 200
            assert response.complete
            assert response.body == b"plain\n"
            assert (response.header("Connection") or b"").lower() == b"keep-alive"
        assert len(blue.requests) == 3
        await client.close()


@pytest.mark.parametrize("keep_alive", [False, True])
async def test_chunked_response_to_http_10_client_is_unframed_and_ends_with_close(
    keep_alive: bool, upstreams: Upstreams
) -> None:
    blue = await upstreams.start("blue", responder=chunked_or_plain)
    async with running_proxy(only_blue(blue.endpoint)) as proxy:
        client = await proxy.client()
        extra = b"Connection: keep-alive\r\n" if keep_alive else b""
        await client.send(b"GET /chunked HTTP/1.0\r\nHost: a\r\n" + extra + b"\r\n")
        async with asyncio.timeout(3):
            data = await client.reader.read()  # until the proxy closes: the end of the body
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") or head.startswith(b"HTTP/1.0 200 ")
        assert not head_has(head, b"transfer-encoding")
        assert body == b"abcdefghij" * 50
        await client.close()


# -- bodiless responses ----------------------------------------------------------------------------


def bodiless(request: ReceivedRequest) -> bytes:
    answers = {
        b"/204": b"HTTP/1.1 204 No Content\r\n\r\n",
        b"/204-length": b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        b"/304": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n',
        b"/304-length": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 10\r\n\r\n',
    }
    return answers.get(request.url, ok_response(b"0123456789"))


async def test_204_and_304_end_without_a_body_and_the_connection_is_reused(
    upstreams: Upstreams,
) -> None:
    blue = await upstreams.start("blue", responder=bodiless)
    async with running_proxy(only_blue(blue.endpoint)) as proxy:
        client = await proxy.client()
        for path, status in [
            ("/204", 204),
            ("/204-length", 204),
            ("/304", 304),
            ("/304-length", 304),
        ]:
            response = await client.request(get(path))
            assert response.status == status
            assert response.body == b""
            assert response.complete
            assert response.header("Transfer-Encoding") is None
            after = await client.request(get("/after"))  # in step: no stray bytes in between
            assert after.status == 200
            assert after.body == b"0123456789"
        # Pipelined too: the bodiless answers must not swallow or shift the next response.
        await client.send(get("/304-length") + get("/204") + get("/after"))
        assert [(await client.response()).status for _ in range(3)] == [304, 204, 200]
        assert blue.connections == 1
        await client.close()


async def test_head_with_a_chunked_upstream_answer_ends_at_the_head(upstreams: Upstreams) -> None:
    def respond(request: ReceivedRequest) -> bytes:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head if request.method == b"HEAD" else head + chunked(b"the body\n", 4)

    blue = await upstreams.start("blue", responder=respond)
    async with running_proxy(only_blue(blue.endpoint)) as proxy:
        client = await proxy.client()
        for _ in range(2):
            response = await client.request(
                b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", head_request=True
            )
            assert response.status == 200
            assert response.body == b""
            response = await client.request(get())
            assert response.status == 200
            assert response.complete
            assert response.body == b"the body\n"
        assert blue.connections == 1
        await client.close()


async def test_an_answer_before_the_whole_body_says_connection_close_and_closes() -> None:
    async def refuses_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\n\r\nbig!")
        await writer.drain()
        await reader.read()  # whatever follows is not read as a request

    async with (
        raw_upstream(refuses_early) as endpoint,
        running_proxy(only_blue(endpoint)) as proxy,
    ):
        client = await proxy.client()
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000
        )
        response = await client.response()
        assert response.status == 413
        assert response.body == b"big!"
        # The rest of the body would otherwise be read as the next request: the connection
        # closes, and the answer says so.
        assert response.header("Connection") == b"close"
        assert await client.closed()
