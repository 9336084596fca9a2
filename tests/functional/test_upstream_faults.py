"""Functional: upstreams that refuse, stall, die, lie or hang up; clients that leave.

Every fault is scripted on a real loopback socket; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from collections.abc import Iterator

import pytest

from proxy.upstream.connection import MAX_RESPONSE_HEAD_BYTES
from tests.helpers import (
    RecordingUpstream,
    Response,
    RunningProxy,
    Upstreams,
    count_upstream_reads,
    get,
    ok_response,
    only_blue,
    raw_upstream,
    read_request_head,
    read_response,
    refused_endpoint,
    reset_on_close,
    running_proxy,
    until,
)

KiB = 1024

# -- fixtures and helpers --------------------------------------------------------------------------


def proxy_config(blue: list[str], green: list[str], extra_top: str = "") -> str:
    """Service `shop`: all traffic to blue; `X-Canary: green` forces a request to green."""
    return f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
{extra_top}
services:
  shop:
    versions:
      blue: {{endpoints: {json.dumps(blue)}, weight: 100}}
      green: {{endpoints: {json.dumps(green)}, weight: 0}}
    version_header: X-App-Version
    force: {{header: X-Canary}}
"""


@pytest.fixture
def refusing_endpoint() -> Iterator[str]:
    with refused_endpoint() as endpoint:
        yield endpoint


@pytest.fixture
def unanswered_endpoint() -> Iterator[str]:
    """A listener whose accept queue is full: the kernel drops new SYNs, so connects hang.

    listen(0) leaves room for one connection that is never accepted; probes fill it until one
    handshake does not complete, which proves the next connect (the proxy's) will hang too.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    held: list[socket.socket] = []
    try:
        for _ in range(8):
            probe = socket.socket()
            held.append(probe)
            probe.setblocking(False)
            probe.connect_ex(address)
            _, writable, _ = select.select([], [probe], [], 0.2)
            if not writable:
                break  # this handshake hangs: the queue is full
        else:
            pytest.skip("this kernel completes handshakes beyond the listen backlog")
        yield f"{address[0]}:{address[1]}"
    finally:
        for sock in held:
            sock.close()
        listener.close()


async def read_until_gone(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    """Everything the peer sends until it closes (EOF) or resets the connection."""
    data = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return bytes(data)


async def parse_response(data: bytes) -> Response:
    """Parse bytes already received (the connection is over) as one response."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_response(reader, timeout=1.0)


def pool_sizes(proxy: RunningProxy, endpoint: str) -> tuple[int, int]:
    """(idle, busy) upstream connections the proxy holds to `endpoint`."""
    for pool in proxy.server.plane.pools.pools.values():
        if pool.endpoint.key == endpoint:
            return len(pool.idle), len(pool.busy)
    return 0, 0


def request_path(head: bytes) -> bytes:
    return head.split(b" ", 2)[1]


# -- connect failures ------------------------------------------------------------------------------


async def test_refused_endpoint_answers_502_and_counts_a_connect_error(
    refusing_endpoint: str, upstreams: Upstreams
) -> None:
    green = await upstreams.start("green")
    async with running_proxy(proxy_config([refusing_endpoint], [green.endpoint])) as proxy:
        client = await proxy.client()
        response = await client.request(get())
        assert response.status == 502
        assert response.complete
        stats = proxy.stats("shop", "blue")
        assert stats.requests == {502: 1}
        assert stats.upstream_errors["connect"] == 1
        assert stats.upstream_errors["timeout"] == stats.upstream_errors["reset"] == 0
        assert stats.in_flight == 0
        assert green.requests == []
        await client.close()


@pytest.mark.parametrize("refusing_first", [True, False])
async def test_connect_failure_is_retried_on_the_other_endpoint_of_the_version(
    refusing_endpoint: str, refusing_first: bool, upstreams: Upstreams
) -> None:
    blue = await upstreams.start("blue")
    green = await upstreams.start("green")
    endpoints = [refusing_endpoint, blue.endpoint]
    if not refusing_first:
        endpoints.reverse()
    async with running_proxy(proxy_config(endpoints, [green.endpoint])) as proxy:
        client = await proxy.client()
        for _ in range(6):
            response = await client.request(get())
            assert response.status == 200
            assert response.header("X-App-Version") == b"blue"  # same version, never green
        assert len(blue.requests) == 6
        assert green.requests == []
        stats = proxy.stats("shop", "blue")
        assert stats.requests == {200: 6}
        assert stats.in_flight == 0
        await client.close()


async def test_both_endpoints_refusing_answers_502_after_one_retry(
    refusing_endpoint: str, upstreams: Upstreams
) -> None:
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other_endpoint = f"127.0.0.1:{other.getsockname()[1]}"
    green = await upstreams.start("green")
    try:
        config = proxy_config([refusing_endpoint, other_endpoint], [green.endpoint])
        async with running_proxy(config) as proxy:
            client = await proxy.client()
            response = await client.request(get())
            assert response.status == 502
            stats = proxy.stats("shop", "blue")
            assert stats.requests == {502: 1}
            assert stats.upstream_errors["connect"] >= 1
            assert green.requests == []  # a retry never leaves the version
            await client.close()
    finally:
        other.close()


async def test_connect_timeout_answers_504_in_bounded_time(
    unanswered_endpoint: str, upstreams: Upstreams
) -> None:
    green = await upstreams.start("green")
    config = proxy_config(
        [unanswered_endpoint], [green.endpoint], extra_top="timeouts: {connect: 300ms}"
    )
    async with running_proxy(config) as proxy:
        client = await proxy.client()
        started = time.monotonic()
        response = await client.request(get())
        elapsed = time.monotonic() - started
        assert response.status == 504
        assert 0.25 <= elapsed < 2.0
        stats = proxy.stats("shop", "blue")
        assert stats.requests == {504: 1}
        assert stats.upstream_errors["connect"] == 1
        assert stats.in_flight == 0
        await client.close()


async def test_connect_timeout_is_retried_on_the_other_endpoint(
    unanswered_endpoint: str, upstreams: Upstreams
) -> None:
    blue = await upstreams.start("blue")
    green = await upstreams.start("green")
    config = proxy_config(
        [unanswered_endpoint, blue.endpoint],
        [green.endpoint],
        extra_top="timeouts: {connect: 300ms}",
    )
    async with running_proxy(config) as proxy:
        client = await proxy.client()
        response = await client.request(get())
        assert response.status == 200
        assert response.header("X-App-Version") == b"blue"
        assert len(blue.requests) == 1
        await client.close()


class SilentUpstream:
    """Reads a request head and never answers; `released` once the proxy drops the connection."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.released = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request_head(reader)
            self.arrived.set()
            await reader.read()  # returns when the proxy drops the connection
        finally:
            self.released.set()


# -- response timeout ------------------------------------------------------------------------------


async def test_silent_upstream_gets_504_and_the_client_connection_stays_usable(
    upstreams: Upstreams,
) -> None:
    silent = SilentUpstream()
    green = await upstreams.start("green")
    async with raw_upstream(silent) as endpoint:
        config = proxy_config([endpoint], [green.endpoint], "timeouts: {response: 300ms}")
        async with running_proxy(config) as proxy:
            client = await proxy.client()
            started = time.monotonic()
            response = await client.request(get())
            elapsed = time.monotonic() - started
            assert silent.arrived.is_set()
            assert response.status == 504
            assert response.complete
            assert 0.25 <= elapsed < 2.0
            # The abandoned exchange's connection is closed, not kept for reuse.
            async with asyncio.timeout(2):
                await silent.released.wait()
            assert pool_sizes(proxy, endpoint) == (0, 0)
            stats = proxy.stats("shop", "blue")
            assert stats.upstream_errors["timeout"] == 1
            assert stats.requests == {504: 1}
            assert stats.in_flight == 0
            # The whole request was read: the same client connection carries the next one.
            response = await client.request(get(extra="X-Canary: green\r\n"))
            assert response.status == 200
            assert response.header("X-App-Version") == b"green"
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


# -- upstream dying mid-response -------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["fin", "rst"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_upstream_dying_mid_body_aborts_the_client_connection(framing: str, cut: str) -> None:
    part = b"a" * 1000
    client_has_part = asyncio.Event()

    async def dying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        if framing == "content-length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + part)
        else:
            # One whole chunk, then the connection dies inside the second one.
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3e8\r\n" + part + b"\r\n3e8\r\n" + b"b" * 10
            )
        await writer.drain()
        await client_has_part.wait()  # the response head is out: the failure is mid-body
        if cut == "rst":
            reset_on_close(writer)
        writer.close()

    async with (
        raw_upstream(dying) as endpoint,
        running_proxy(proxy_config([endpoint], [endpoint])) as proxy,
    ):
        client = await proxy.client()
        await client.send(get())
        received = b""
        async with asyncio.timeout(3):
            while part not in received:
                chunk = await client.reader.read(65536)
                assert chunk, "the proxy closed before forwarding the first part"
                received += chunk
        client_has_part.set()
        received += await read_until_gone(client.reader)
        response = await parse_response(received)
        assert response.status == 200
        assert not response.complete  # never a clean end of message
        assert len(response.body) < 100000
        if framing == "chunked":
            assert not received.endswith(b"0\r\n\r\n")
        stats = proxy.stats("shop", "blue")
        assert stats.upstream_errors["reset"] == 1
        await until(lambda: stats.in_flight == 0)
        assert pool_sizes(proxy, endpoint) == (0, 0)


# -- invalid responses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello",
    ],
    ids=["not-http", "length-and-chunked", "bad-length"],
)
async def test_invalid_response_answers_502_and_discards_the_connection(garbage: bytes) -> None:
    connections = 0
    first_closed = asyncio.Event()

    async def lying_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            try:
                await read_request_head(reader)
                writer.write(garbage)
                await writer.drain()
                await reader.read()  # returns when the proxy drops this connection
            finally:
                first_closed.set()
            return
        while True:
            await read_request_head(reader)
            writer.write(ok_response())
            await writer.drain()

    async with (
        raw_upstream(lying_once) as endpoint,
        running_proxy(proxy_config([endpoint], [endpoint])) as proxy,
    ):
        client = await proxy.client()
        response = await client.request(get())
        assert response.status == 502
        assert response.complete
        stats = proxy.stats("shop", "blue")
        assert stats.upstream_errors["protocol"] == 1
        assert stats.requests == {502: 1}
        async with asyncio.timeout(2):
            await first_closed.wait()
        assert pool_sizes(proxy, endpoint) == (0, 0)
        await client.close()
        client = await proxy.client()
        response = await client.request(get())
        assert response.status == 200
        assert connections == 2  # a new connection, not the one that lied
        await client.close()


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


# -- the upstream closing keep-alive connections ---------------------------------------------------


async def test_upstream_closing_an_idle_pooled_connection_is_not_a_failure() -> None:
    connections = 0
    close_now = asyncio.Event()

    async def answer_then_close_when_told(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal connections
        connections += 1
        await read_request_head(reader)
        writer.write(ok_response())  # keep-alive (HTTP/1.1 default, nothing announced)
        await writer.drain()
        await close_now.wait()
        writer.close()

    async with (
        raw_upstream(answer_then_close_when_told) as endpoint,
        running_proxy(proxy_config([endpoint], [endpoint])) as proxy,
    ):
        client = await proxy.client()
        assert (await client.request(get())).status == 200
        assert pool_sizes(proxy, endpoint) == (1, 0)
        close_now.set()
        await until(lambda: pool_sizes(proxy, endpoint) == (0, 0))  # the proxy noticed
        response = await client.request(get())
        assert response.status == 200
        assert connections == 2
        stats = proxy.stats("shop", "blue")
        assert stats.requests == {200: 2}
        await client.close()


async def test_upstream_closing_right_after_answering_is_retried_transparently() -> None:
    handled: list[bytes] = []

    async def answer_once_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        path = request_path(await read_request_head(reader))
        handled.append(path)
        writer.write(ok_response(path))  # no `Connection: close` announced
        await writer.drain()
        writer.close()

    async with (
        raw_upstream(answer_once_then_close) as endpoint,
        running_proxy(proxy_config([endpoint], [endpoint])) as proxy,
    ):
        client = await proxy.client()
        # Back to back: each request may land on the connection the upstream just closed.
        for i in range(10):
            response = await client.request(get(f"/seq{i}"))
            assert (response.status, response.body) == (200, f"/seq{i}".encode())
        # Pipelined: the second request is dispatched from the callback that completes the
        # first response, before the upstream's FIN is read, so it surely hits the dead one.
        for i in range(5):
            await client.send(get(f"/a{i}") + get(f"/b{i}"))
            for path in (f"/a{i}", f"/b{i}"):
                response = await client.response()
                assert (response.status, response.body) == (200, path.encode())
        expected = [f"/seq{i}".encode() for i in range(10)]
        expected += [p.encode() for i in range(5) for p in (f"/a{i}", f"/b{i}")]
        assert handled == expected  # each request processed exactly once
        stats = proxy.stats("shop", "blue")
        assert stats.requests == {200: 20}
        await client.close()


async def test_a_retry_on_a_stale_pooled_connection_that_succeeds_counts_no_error() -> None:
    """The upstream closing a kept-alive connection as the proxy reuses it is the keep-alive
    race, not a failure of the version: when the retry succeeds, nothing counts against it."""
    handled = 0

    async def answer_once_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal handled
        await read_request_head(reader)
        handled += 1
        writer.write(ok_response())  # no `Connection: close` announced
        await writer.drain()
        writer.close()

    async with (
        raw_upstream(answer_once_then_close) as endpoint,
        running_proxy(proxy_config([endpoint], [endpoint])) as proxy,
    ):
        client = await proxy.client()
        # Pipelined: the second request is dispatched as the first response completes, before
        # the upstream's FIN is read, so it goes out on the dead connection and is retried.
        await client.send(get("/a") + get("/b"))
        for _ in range(2):
            assert (await client.response()).status == 200
        assert handled == 2
        stats = proxy.stats("shop", "blue")
        assert stats.requests == {200: 2}
        assert stats.upstream_errors == {"connect": 0, "timeout": 0, "reset": 0, "protocol": 0}
        await client.close()


async def test_upstream_connection_close_is_not_reused() -> None:
    blue = await RecordingUpstream(
        "blue", responder=lambda request: ok_response(extra=b"Connection: close\r\n")
    ).start()
    async with running_proxy(proxy_config([blue.endpoint], [blue.endpoint])) as proxy:
        client = await proxy.client()
        for _ in range(3):
            response = await client.request(get())
            assert response.status == 200
            assert response.header("Connection") is None  # hop-by-hop: not the client's business
        # RecordingUpstream never closes by itself: only the proxy can have opened three.
        assert blue.connections == 3
        assert len(blue.requests) == 3
        assert pool_sizes(proxy, blue.endpoint) == (0, 0)
        await client.close()
    await blue.stop()


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


# -- the client leaving ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_disconnect_cancels_the_upstream_exchange(how: str) -> None:
    silent = SilentUpstream()
    async with raw_upstream(silent) as endpoint:
        config = proxy_config([endpoint], [endpoint], "timeouts: {response: 20s}")
        async with running_proxy(config) as proxy:
            client = await proxy.client()
            await client.send(get())
            async with asyncio.timeout(2):
                await silent.arrived.wait()
            if how == "reset":
                reset_on_close(client.writer)
            await client.close()
            async with asyncio.timeout(2):
                await silent.released.wait()
            stats = proxy.stats("shop", "blue")
            await until(lambda: stats.in_flight == 0)
            assert stats.client_aborts == 1
            assert not [status for status in stats.requests if status >= 500]
            assert sum(stats.upstream_errors.values()) == 0
            assert pool_sizes(proxy, endpoint) == (0, 0)  # cancelled, not pooled
