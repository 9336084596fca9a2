"""The proxy's own answers (404, 413, 502, 503, ...) on a connection whose request body is large,
still arriving, or already read: the client gets the whole answer, and a kept-alive connection
goes on to read the next request."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from proxy.config.loader import parse_config
from proxy.http import linger
from proxy.routing.build import build_table
from tests.helpers import (
    Client,
    Response,
    RunningProxy,
    Upstreams,
    fed_connection,
    get,
    ok_response,
    raw_upstream,
    read_request_head,
    read_response,
    refused_endpoint,
    running_proxy,
    two_version_config,
    until,
)

ONLY_APP = "    match: {host: app.test}"  # the service's match: other hosts get 404
BODY = b"x" * 100_000  # more than the proxy holds for an exchange waiting for its upstream


def post(host: str, body: bytes = BODY, path: str = "/up") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        path.encode(),
        host.encode(),
        len(body),
        body,
    )


async def next_request_is_read(client: Client, answer: Response) -> None:
    """After a local answer: either it said Connection: close and the connection closes (the
    body was not read to its end), or the connection was kept and the next request is read."""
    if answer.header("Connection") == b"close":
        assert await client.closed()
        return
    response = await client.request(get("/next", host="nowhere.test"))
    assert response.status == 404  # answered: the request was read and routed nowhere


@contextlib.asynccontextmanager
async def gated_upstream(release: asyncio.Event) -> AsyncIterator[str]:
    """An upstream that answers each request only once `release` is set."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request_head(reader)
            await release.wait()
            writer.write(ok_response(b"slow\n"))
            await writer.drain()

    async with raw_upstream(handler) as endpoint:
        yield endpoint


# -- finding: reads stay paused after a local answer ---------------------------------------------


async def test_502_after_a_whole_body_was_read_keeps_reading_the_connection(
    upstreams: Upstreams,
) -> None:
    green = await upstreams.start("green")
    with refused_endpoint() as blue:
        config = two_version_config(blue, green.endpoint, 100, 0, extra_service=ONLY_APP)
        async with running_proxy(config) as proxy:
            client = await proxy.client()
            answer = await client.request(post("app.test"))
            assert answer.status == 502
            await next_request_is_read(client, answer)
            await client.close()
    assert green.requests == []


@pytest.mark.parametrize(
    ("host", "status"),
    [("nowhere.test", 404), ("app.test", 503)],
    ids=["404-no-service", "503-no-healthy-endpoint"],
)
async def test_local_answer_to_a_queued_request_with_a_whole_body_keeps_reading(
    host: str, status: int
) -> None:
    release = asyncio.Event()
    async with gated_upstream(release) as slow:
        with refused_endpoint() as down:
            # The POST's service (/up) has no healthy endpoint: a 503.
            extra = (
                f"{ONLY_APP}\n  other:\n    match: {{host: app.test, path_prefix: /up}}\n"
                f'    versions: {{v: {{endpoints: ["{down}"], weight: 100}}}}\n'
            )
            config = two_version_config(slow, slow, 100, 0, extra_service=extra)
            async with running_proxy(config) as proxy:
                table = build_table(parse_config(config, env={}), unhealthy={("other", "v", down)})
                proxy.server.plane.install(table)
                await answers_a_queued_post(proxy, release, host, status)


async def answers_a_queued_post(
    proxy: RunningProxy, release: asyncio.Event, host: str, status: int
) -> None:
    """`GET /slow` waits for `release`; a POST with a large body queues behind it."""
    client = await proxy.client()
    await client.send(get("/slow") + post(host))
    release.set()
    first = await client.response()
    assert (first.status, first.body) == (200, b"slow\n")
    answer = await client.response()
    assert answer.status == status
    await next_request_is_read(client, answer)
    await client.close()


# -- protocol units: the same, fed through a fake transport ----------------------------------------


async def test_unit_502_after_the_whole_body_resumes_reading() -> None:
    with refused_endpoint() as blue:
        conn = fed_connection(two_version_config(blue, blue, 100, 0, extra_service=ONLY_APP))
        conn.feed(post("app.test"))  # head and whole body in one read
        assert not conn.transport.reading  # held for the upstream: over the bound, paused
        async with asyncio.timeout(5):
            while not conn.transport.written:
                await asyncio.sleep(0.005)
        [answer] = conn.transport.responses()
        assert answer.status == 502
        assert answer.header("Connection") is None  # the body was read: keep-alive
        assert conn.transport.reading
        conn.feed(get("/next", host="nowhere.test"))
        assert [r.status for r in conn.transport.responses()] == [502, 404]
        assert not conn.transport.is_closing()


# -- finding: no lingering close -------------------------------------------------------------------


class Uploader:
    """A raw client socket that uploads a request body and reads the proxy's answer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.received = bytearray()

    @classmethod
    async def connect(cls, port: int) -> Uploader:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def answer(self, timeout: float = 5.0) -> Response:
        """Read until one whole response has arrived (the connection stays as it is)."""
        async with asyncio.timeout(timeout):
            while True:
                head, sep, body = bytes(self.received).partition(b"\r\n\r\n")
                if sep:
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    if len(body) >= length:
                        return await parse_response(bytes(self.received))
                data = await self.loop.sock_recv(self.sock, 65536)
                assert data, "the connection ended before the whole answer"
                self.received += data

    async def end(self, timeout: float = 5.0) -> bytes:
        """Stop sending, then read until the proxy ends the connection: b"" for a clean end
        (the bytes after the answer otherwise); a reset raises ConnectionResetError."""
        self.sock.shutdown(socket.SHUT_WR)
        rest = bytearray()
        async with asyncio.timeout(timeout):
            while data := await self.loop.sock_recv(self.sock, 65536):
                rest += data
        return bytes(rest)

    def close(self) -> None:
        self.sock.close()


async def parse_response(data: bytes) -> Response:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_response(reader, timeout=1.0)


PIECE = b"x" * 16384
LIMIT = "limits: {max_body_bytes: 1000}"


def lingering_cases() -> list[tuple[str, bytes, int]]:
    return [
        (LIMIT, b"POST /up HTTP/1.1\r\nHost: app.test\r\nContent-Length: 10000000\r\n\r\n", 413),
        (LIMIT, b"POST /up HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n", 413),
        ("", b"POST /up HTTP/1.1\r\nHost: app.test\r\nContent-Length: 10000000\r\n\r\n", 502),
    ]


@pytest.mark.parametrize(
    ("top", "head", "status"),
    lingering_cases(),
    ids=["413-declared", "413-streamed-chunked", "502-refused"],
)
async def test_a_client_still_uploading_reads_the_whole_answer_and_a_clean_end(
    top: str, head: bytes, status: int
) -> None:
    chunked = b"chunked" in head
    piece = b"%x\r\n%s\r\n" % (len(PIECE), PIECE) if chunked else PIECE
    with refused_endpoint() as blue:
        config = two_version_config(blue, blue, 100, 0, extra_top=top)
        async with running_proxy(config) as proxy:
            client = await Uploader.connect(proxy.port)
            await client.send(head + piece * 4)
            answer = await client.answer()
            assert answer.status == status
            assert answer.header("Connection") == b"close"
            # The upload goes on after the answer: the proxy reads and discards it rather than
            # resetting the connection under the client's writes.
            for _ in range(16):
                await client.send(piece)
            assert await client.end() == b""  # a FIN after the answer, not a reset
            client.close()
            await until(lambda: not proxy.server.plane.connections)


async def test_lingering_stops_at_its_byte_bound(
    monkeypatch: pytest.MonkeyPatch, upstreams: Upstreams
) -> None:
    monkeypatch.setattr(linger, "LINGER_SECONDS", 60.0)  # only the byte bound can end it
    blue = await upstreams.start("blue")
    config = two_version_config(blue.endpoint, blue.endpoint, 100, 0, extra_top=LIMIT)
    async with running_proxy(config) as proxy:
        client = await Uploader.connect(proxy.port)
        await client.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n\r\n")
        assert (await client.answer()).status == 413
        sent = 0
        with pytest.raises(ConnectionError):  # an endless upload is cut in the end
            async with asyncio.timeout(10):
                while True:
                    await client.send(PIECE * 4)
                    sent += len(PIECE) * 4
        assert sent >= linger.LINGER_MAX_BYTES
        client.close()
        await until(lambda: not proxy.server.plane.connections)
    assert blue.requests == []


async def test_lingering_stops_at_its_time_bound(
    monkeypatch: pytest.MonkeyPatch, upstreams: Upstreams
) -> None:
    monkeypatch.setattr(linger, "LINGER_SECONDS", 0.3)
    blue = await upstreams.start("blue")
    config = two_version_config(blue.endpoint, blue.endpoint, 100, 0, extra_top=LIMIT)
    async with running_proxy(config) as proxy:
        client = await Uploader.connect(proxy.port)
        await client.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
        assert (await client.answer()).status == 413
        # The client neither sends nor closes: the proxy lets go at the time bound.
        await until(lambda: not proxy.server.plane.connections, timeout=3.0)
        client.close()


async def test_unit_lingering_close_discards_up_to_its_bound() -> None:
    conn = fed_connection(two_version_config("127.0.0.1:1", "127.0.0.1:1", 100, 0, LIMIT))
    conn.feed(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5000000\r\n\r\n" + PIECE)
    [answer] = conn.transport.responses()
    assert answer.status == 413
    written = len(conn.transport.written)
    assert conn.transport.eof_written  # the answer, then a FIN
    assert conn.transport.reading and not conn.transport.is_closing()
    fed = 0  # what arrives after the answer
    while fed + len(PIECE) < linger.LINGER_MAX_BYTES:
        conn.feed(PIECE)
        fed += len(PIECE)
    assert not conn.transport.is_closing()  # still discarding
    conn.feed(PIECE)
    assert conn.transport.closed  # the bound: closed now
    assert len(conn.transport.written) == written  # nothing else was answered
    conn.protocol.connection_lost(None)
    assert conn.protocol.linger is None


async def test_unit_lingering_ends_when_the_client_stops_sending() -> None:
    conn = fed_connection(two_version_config("127.0.0.1:1", "127.0.0.1:1", 100, 0, LIMIT))
    conn.feed(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5000000\r\n\r\n" + PIECE)
    assert conn.transport.eof_written and not conn.transport.is_closing()
    assert conn.protocol.eof_received() is None  # None: the transport closes itself
