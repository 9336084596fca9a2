"""Adversarial input: malformed, oversized, slow, smuggling and spoofing requests.

Every test checks the status the proxy answers with, exactly what the upstream received (usually
nothing), and whether the client connection was closed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httptools
import pytest

from tests.helpers import (
    Client,
    ReceivedRequest,
    RecordingUpstream,
    Response,
    RunningProxy,
    get,
    ok_response,
    raw_upstream,
    read_request_head,
    running_proxy,
    two_version_config,
)

# -- fixtures and helpers -------------------------------------------------------------------------


@dataclass
class Upstreams:
    blue: RecordingUpstream
    green: RecordingUpstream

    def received(self) -> list[ReceivedRequest]:
        return self.blue.requests + self.green.requests

    def config(self, top: str = "", service: str = "", weights: tuple[int, int] = (100, 0)) -> str:
        return two_version_config(
            self.blue.endpoint,
            self.green.endpoint,
            weights[0],
            weights[1],
            extra_service=service,
            extra_top=top,
        )


@pytest.fixture
async def ups() -> AsyncIterator[Upstreams]:
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    yield Upstreams(blue, green)
    await blue.stop()
    await green.stop()


class Responses:
    """The responses on one client connection, in order, however their bytes are split.

    `Client.response()` feeds a whole read to one parser, so answers that arrive in one segment
    (pipelining, or a local answer followed by anything else) would be merged; this keeps one
    parser for the connection and counts every response that even began.
    """

    def __init__(self, client: Client) -> None:
        self.reader = client.reader
        self.parser = httptools.HttpResponseParser(self)
        self.ready: deque[Response] = deque()
        self.begun = 0  # final responses whose first byte arrived
        self.taken = 0
        self.eof = False
        self.invalid = False  # bytes that are not an HTTP response arrived
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = b""
        self._headers_done = False

    def on_message_begin(self) -> None:
        self.begun += 1
        self._headers = []
        self._body = b""
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.begun -= 1  # interim: not an answer of its own
            return
        self.ready.append(Response(status, self._headers, self._body, True))

    async def _read(self) -> None:
        try:
            data = await self.reader.read(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return
        if self.invalid:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.invalid = True

    async def next(self, timeout: float = 5.0) -> Response:
        """The next final response; `complete` is False if the connection ended inside it."""
        async with asyncio.timeout(timeout):
            while not self.ready and not self.eof and not self.invalid:
                await self._read()
        if self.ready:
            self.taken += 1
            return self.ready.popleft()
        if self._headers_done and self.begun > self.taken:
            self.taken += 1
            status = self.parser.get_status_code()
            return Response(status, self._headers, self._body, False)
        raise ConnectionError("connection ended before a response head")

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the proxy has closed the connection; what else came is in `unread`."""
        async with asyncio.timeout(timeout):
            while not self.eof:
                await self._read()
        return True

    @property
    def unread(self) -> int:
        """Responses (or bytes that are none) that arrived but were not taken by `next`."""
        return self.begun - self.taken + self.invalid


async def rejected(proxy: RunningProxy, data: bytes, status: int) -> Responses:
    """Send `data` on a fresh connection: the proxy answers `status`, then closes, nothing else."""
    client = await proxy.client()
    responses = Responses(client)
    with contextlib.suppress(ConnectionError):
        await client.send(data)
    response = await responses.next()
    assert response.status == status
    assert response.complete
    assert await responses.closed()
    assert responses.unread == 0
    await client.close()
    return responses


async def trickle(client: Client, data: bytes, interval: float) -> None:
    """Send `data` one byte at a time; stop quietly once the proxy has hung up."""
    for i in range(len(data)):
        try:
            await client.send(data[i : i + 1])
        except ConnectionError:
            return
        await asyncio.sleep(interval)


@dataclass
class Capture:
    """What a scripted upstream received on its first connection, byte for byte."""

    data: bytearray = field(default_factory=bytearray)
    head: asyncio.Event = field(default_factory=asyncio.Event)
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    answer: bytes = b""  # written as soon as the request head has arrived

    def requests_completed(self) -> int:
        """How many complete requests (body ended by its framing) are in the captured bytes."""
        completed = 0

        class Sink:
            def on_message_complete(self) -> None:
                nonlocal completed
                completed += 1

        parser = httptools.HttpRequestParser(Sink())
        with contextlib.suppress(httptools.HttpParserError):
            parser.feed_data(bytes(self.data))
        return completed


@contextlib.asynccontextmanager
async def capturing_upstream(capture: Capture) -> AsyncIterator[str]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            capture.data += await read_request_head(reader)
            capture.head.set()
            if capture.answer:
                writer.write(capture.answer)
                await writer.drain()
            while data := await reader.read(65536):
                capture.data += data
        finally:
            capture.eof.set()

    async with raw_upstream(handler) as endpoint:
        yield endpoint


def capture_config(endpoint: str, top: str = "") -> str:
    return two_version_config(endpoint, endpoint, 100, 0, extra_top=top)


def post(body: bytes, headers: str, version: str = "1.1") -> bytes:
    return f"POST /up HTTP/{version}\r\nHost: app.test\r\n{headers}\r\n".encode() + body


CHUNKED = "Transfer-Encoding: chunked\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n"


# -- 1-3: message framing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    ],
    ids=["cl-then-te", "te-then-cl"],
)
async def test_content_length_with_transfer_encoding_is_400(ups: Upstreams, headers: str) -> None:
    async with running_proxy(ups.config()) as proxy:
        await rejected(proxy, post(b"0\r\n\r\n" + SMUGGLED, headers), 400)
    assert ups.received() == []


@pytest.mark.parametrize(
    "headers",
    [
        "Content-Length: +5\r\n",
        "Content-Length: 5, 5\r\n",
        "Content-Length: abc\r\n",
        "Content-Length: -5\r\n",
        "Content-Length: \r\n",
        "Content-Length: 99999999999999999999999\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
    ],
    ids=["plus", "list", "alpha", "negative", "empty", "overflow", "dup-equal", "dup-different"],
)
async def test_bad_content_length_is_400(ups: Upstreams, headers: str) -> None:
    async with running_proxy(ups.config()) as proxy:
        await rejected(proxy, post(b"hello!", headers), 400)
    assert ups.received() == []


@pytest.mark.parametrize(
    "headers",
    [
        "Transfer-Encoding: gzip\r\n",
        "Transfer-Encoding: xchunked\r\n",
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    ],
    ids=["gzip", "xchunked", "chunked-twice", "two-te-headers"],
)
async def test_unknown_or_repeated_transfer_coding_is_400(ups: Upstreams, headers: str) -> None:
    async with running_proxy(ups.config()) as proxy:
        await rejected(proxy, post(b"5\r\nhello\r\n0\r\n\r\n", headers), 400)
    assert ups.received() == []


async def test_unknown_coding_before_chunked_is_refused_not_silently_dropped(
    ups: Upstreams,
) -> None:
    # llhttp accepts "gzip, chunked" (chunked is last). Forwarding only "chunked" would hand the
    # upstream a gzip-coded body as if it were plain: RFC 9112 §6.1 says refuse (501; 400 is ok).
    async with running_proxy(ups.config()) as proxy:
        client = await proxy.client()
        responses = Responses(client)
        await client.send(post(b"5\r\nhello\r\n0\r\n\r\n", "Transfer-Encoding: gzip, chunked\r\n"))
        response = await responses.next()
        assert response.status in (400, 501)
        assert await responses.closed()
        assert responses.unread == 0
        await client.close()
    assert ups.received() == []


async def test_http_10_with_chunked_is_400_and_closed(ups: Upstreams) -> None:
    async with running_proxy(ups.config()) as proxy:
        await rejected(proxy, post(b"5\r\nhello\r\n0\r\n\r\n" + SMUGGLED, CHUNKED, "1.0"), 400)
    assert ups.received() == []


# -- 4: chunk framing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
        b"5;a\nb\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["non-hex", "0x-prefix", "negative", "overflow", "no-crlf-after-data", "lf-in-extension"],
)
async def test_bad_chunk_framing_before_anything_forwarded_is_400(
    ups: Upstreams, body: bytes
) -> None:
    async with running_proxy(ups.config()) as proxy:
        await rejected(proxy, post(body + SMUGGLED, CHUNKED), 400)
    assert ups.received() == []


@pytest.mark.parametrize(
    "bad", [b"zz\r\n", b"5\r\nhelloXX", b"5;a\nb\r\n"], ids=["non-hex", "no-crlf", "lf-in-ext"]
)
async def test_bad_chunk_framing_mid_body_never_completes_the_upstream_body(bad: bytes) -> None:
    capture = Capture()
    async with (
        capturing_upstream(capture) as endpoint,
        running_proxy(capture_config(endpoint)) as proxy,
    ):
        client = await proxy.client()
        await client.send(post(b"5\r\nfirst\r\n", CHUNKED))
        async with asyncio.timeout(5):
            await capture.head.wait()  # the head (and maybe the first chunk) went upstream
        responses = Responses(client)
        with contextlib.suppress(ConnectionError):
            await client.send(bad + b"0\r\n\r\n" + SMUGGLED)
        with contextlib.suppress(ConnectionError):  # no answer at all is fine: it was cut
            response = await responses.next()
            assert response.status == 400
        assert await responses.closed()
        assert responses.unread == 0
        async with asyncio.timeout(5):
            await capture.eof.wait()  # the upstream side of the broken exchange is dropped
        await client.close()
    assert capture.data.startswith(b"POST /up HTTP/1.1\r\n")
    assert capture.requests_completed() == 0
    assert b"/smuggled" not in capture.data


async def test_bad_chunk_after_the_response_started_cuts_it_without_a_400() -> None:
    # The upstream answers as soon as it has the head; the client's body then turns out broken.
    # The response in progress must be cut, never continued with the proxy's own "400" bytes.
    capture = Capture(answer=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
    async with (
        capturing_upstream(capture) as endpoint,
        running_proxy(capture_config(endpoint)) as proxy,
    ):
        client = await proxy.client()
        await client.send(post(b"5\r\nfirst\r\n", CHUNKED))
        seen = b""
        async with asyncio.timeout(5):
            while b"0123456789" not in seen:
                data = await client.reader.read(65536)
                assert data, "connection closed before the partial response arrived"
                seen += data
        await client.send(b"zz\r\n")
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionError):
                while data := await client.reader.read(65536):
                    seen += data
        await client.close()
    head, _, body = seen.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"400" not in body
    assert len(body) < 100  # the client can tell the body is incomplete
    assert capture.requests_completed() == 0


# -- 5: header syntax -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: app.test\r\nX-A: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: app.test\r\nX-A: a\r\n\tb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: app.test\r\nX-A : a\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: app.test\r\nX-A\t: a\r\n\r\n",
        b"GET / HTTP/1.1\nHost: app.test\n\n",
        b"GET / HTTP/1.1\r\nHost: app.test\nX-A: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: app.test\r\nX-A: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: app.test\r\nX-A: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\n Host: app.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: app.test\r\nNoColon\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: app.test\r\n\r\n",
    ],
    ids=[
        "obs-fold-space",
        "obs-fold-tab",
        "space-before-colon",
        "space-before-colon-te",
        "tab-before-colon",
        "bare-lf",
        "bare-lf-in-headers",
        "nul-in-value",
        "bare-cr-in-value",
        "leading-space-header",
        "no-colon",
        "space-in-target",
    ],
)
async def test_malformed_head_is_400(ups: Upstreams, data: bytes) -> None:
    async with running_proxy(ups.config()) as proxy:
        await rejected(proxy, data, 400)
    assert ups.received() == []


# -- 6: Host --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: app.test\r\nHost: app.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: app.test\r\nhost: evil.test\r\n\r\n",
    ],
    ids=["missing", "duplicate-equal", "duplicate-different"],
)
async def test_missing_or_duplicate_host_is_400(ups: Upstreams, data: bytes) -> None:
    async with running_proxy(ups.config()) as proxy:
        await rejected(proxy, data, 400)
    assert ups.received() == []


async def test_http_10_without_host_is_accepted(ups: Upstreams) -> None:
    async with running_proxy(ups.config()) as proxy:
        client = await proxy.client()
        response = await client.request(b"GET /old HTTP/1.0\r\n\r\n")
        assert response.status == 200
        assert response.body == b"ok\n"
        await client.close()
    [received] = ups.blue.requests
    assert received.url == b"/old"


async def test_http_10_without_host_reaches_the_upstream_as_valid_http_11(ups: Upstreams) -> None:
    # The proxy speaks HTTP/1.1 upstream, where a request without Host is invalid (RFC 9112 §3.2:
    # send an empty Host when there is no authority); strict servers (Go net/http) answer 400.
    async with running_proxy(ups.config()) as proxy:
        client = await proxy.client()
        assert (await client.request(b"GET /old HTTP/1.0\r\n\r\n")).status == 200
        await client.close()
    [received] = ups.blue.requests
    assert len(received.headers_named("Host")) == 1


# -- 7: request line and head size ----------------------------------------------------------------

LINE_LIMIT = "limits: {max_request_line_bytes: 1KiB}"


def request_line_of(length: int) -> bytes:
    """A GET whose request line (method SP target SP version, without CRLF) is `length` bytes."""
    target = "/" + "a" * (length - len("GET  HTTP/1.1") - 1)
    line = f"GET {target} HTTP/1.1"
    assert len(line) == length
    return f"{line}\r\nHost: app.test\r\n\r\n".encode()


async def test_request_line_just_under_the_limit_passes(ups: Upstreams) -> None:
    async with running_proxy(ups.config(top=LINE_LIMIT)) as proxy:
        client = await proxy.client()
        # 1022 bytes + CRLF = 1024: within the limit however the line is counted.
        response = await client.request(request_line_of(1022))
        assert response.status == 200
        response = await client.request(request_line_of(1000))
        assert response.status == 200
        await client.close()
    assert [len(r.url) for r in ups.blue.requests] == [1022 - 13, 1000 - 13]


@pytest.mark.parametrize("length", [1025, 1100, 20_000])
async def test_request_line_over_the_limit_is_414(ups: Upstreams, length: int) -> None:
    async with running_proxy(ups.config(top=LINE_LIMIT)) as proxy:
        await rejected(proxy, request_line_of(length), 414)
    assert ups.received() == []


async def test_endless_request_target_in_several_writes_is_414(ups: Upstreams) -> None:
    async with running_proxy(ups.config(top=LINE_LIMIT)) as proxy:
        client = await proxy.client()
        responses = Responses(client)
        await client.send(b"GET /" + b"a" * 600)
        for _ in range(3):
            with contextlib.suppress(ConnectionError):
                await client.send(b"a" * 600)
        response = await responses.next()
        assert response.status == 414
        assert await responses.closed()
        assert responses.unread == 0
        await client.close()
    assert ups.received() == []


HEADER_LIMIT = "limits: {max_header_bytes: 1KiB}"


async def test_headers_under_the_limit_pass(ups: Upstreams) -> None:
    async with running_proxy(ups.config(top=HEADER_LIMIT)) as proxy:
        client = await proxy.client()
        extra = "".join(f"X-H{i:02}: {'v' * 20}\r\n" for i in range(20))  # 20 x 29 bytes
        response = await client.request(get(extra=extra))
        assert response.status == 200
        await client.close()
    [received] = ups.blue.requests
    assert received.header("X-H19") == b"v" * 20


async def test_many_headers_over_the_limit_are_431(ups: Upstreams) -> None:
    async with running_proxy(ups.config(top=HEADER_LIMIT)) as proxy:
        extra = "".join(f"X-H{i:02}: {'v' * 20}\r\n" for i in range(60))  # 60 x 29 bytes
        await rejected(proxy, get(extra=extra), 431)
    assert ups.received() == []


async def test_one_endless_header_value_in_several_writes_is_431_not_buffered(
    ups: Upstreams,
) -> None:
    async with running_proxy(ups.config(top=HEADER_LIMIT)) as proxy:
        client = await proxy.client()
        responses = Responses(client)

        async def endless() -> None:
            await client.send(b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: " + b"v" * 400)
            for _ in range(2000):  # up to ~1 MB if the proxy never stops us
                try:
                    await client.send(b"v" * 512)
                except ConnectionError:
                    return
                await asyncio.sleep(0.001)

        sender = asyncio.create_task(endless())
        try:
            response = await responses.next(timeout=3)
            assert response.status == 431
            assert await responses.closed(timeout=3)
            assert responses.unread == 0
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            await client.close()
    assert ups.received() == []


# -- 8: body size ---------------------------------------------------------------------------------

BODY_LIMIT = "limits: {max_body_bytes: 1000}"


async def test_body_at_the_limit_passes_both_framings(ups: Upstreams) -> None:
    async with running_proxy(ups.config(top=BODY_LIMIT)) as proxy:
        client = await proxy.client()
        body = b"b" * 1000
        response = await client.request(post(body, "Content-Length: 1000\r\n"))
        assert response.status == 200
        response = await client.request(post(b"3e8\r\n" + body + b"\r\n0\r\n\r\n", CHUNKED))
        assert response.status == 200
        await client.close()
    assert [r.body for r in ups.blue.requests] == [body, body]


async def test_declared_content_length_over_the_limit_is_413(ups: Upstreams) -> None:
    async with running_proxy(ups.config(top=BODY_LIMIT)) as proxy:
        await rejected(proxy, post(b"b" * 1001, "Content-Length: 1001\r\n"), 413)
    assert ups.received() == []
    assert ups.blue.connections == 0


async def test_chunked_body_over_the_limit_in_one_write_is_413(ups: Upstreams) -> None:
    async with running_proxy(ups.config(top=BODY_LIMIT)) as proxy:
        chunks = b"200\r\n" + b"b" * 512 + b"\r\n"
        await rejected(proxy, post(chunks * 3 + b"0\r\n\r\n" + SMUGGLED, CHUNKED), 413)
    assert ups.received() == []


async def test_streamed_chunked_body_over_the_limit_never_completes_upstream() -> None:
    capture = Capture()
    async with (
        capturing_upstream(capture) as endpoint,
        running_proxy(capture_config(endpoint, BODY_LIMIT)) as proxy,
    ):
        client = await proxy.client()
        responses = Responses(client)
        chunk = b"200\r\n" + b"b" * 512 + b"\r\n"
        await client.send(post(chunk, CHUNKED))
        async with asyncio.timeout(5):
            await capture.head.wait()
        with contextlib.suppress(ConnectionError):
            await client.send(chunk * 2 + b"0\r\n\r\n" + SMUGGLED)
        with contextlib.suppress(ConnectionError):
            response = await responses.next()
            assert response.status == 413
        assert await responses.closed()
        assert responses.unread == 0
        async with asyncio.timeout(5):
            await capture.eof.wait()
        await client.close()
    assert capture.requests_completed() == 0
    assert b"/smuggled" not in capture.data
    body = capture.data.partition(b"\r\n\r\n")[2]
    assert body.count(b"b") <= 1000  # never more than the limit went upstream


# -- 9: slow clients ------------------------------------------------------------------------------

HEADER_TIMEOUT = "timeouts: {header: 300ms}"


async def test_trickled_request_head_gets_408_and_is_closed(ups: Upstreams) -> None:
    async with running_proxy(ups.config(top=HEADER_TIMEOUT)) as proxy:
        client = await proxy.client()
        responses = Responses(client)
        loop = asyncio.get_running_loop()
        started = loop.time()
        head = get(extra="X-Slow: " + "s" * 200 + "\r\n")  # ~12 s at 50 ms a byte
        sender = asyncio.create_task(trickle(client, head, 0.05))
        try:
            response = await responses.next(timeout=3)
            assert response.status == 408
            assert await responses.closed(timeout=2)
            assert responses.unread == 0
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            await client.close()
        assert loop.time() - started < 1.5
    assert ups.received() == []


async def test_silent_connection_is_closed(ups: Upstreams) -> None:
    async with running_proxy(ups.config(top=HEADER_TIMEOUT)) as proxy:
        client = await proxy.client()
        responses = Responses(client)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await responses.closed(timeout=2)
        assert responses.unread == 0
        assert loop.time() - started < 1.5
        await client.close()
    assert ups.received() == []


async def test_pipelined_head_trickled_behind_a_slow_request_still_times_out() -> None:
    # The head of request 2 trickles in while request 1 waits on a slow upstream; the header
    # timeout fires during request 1. Request 2's head must still be cut off (408), not wait
    # forever because the timer went off while another exchange was active.
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        await release.wait()
        writer.write(ok_response(extra=b"Connection: close\r\n"))
        await writer.drain()

    async with (
        raw_upstream(slow) as endpoint,
        running_proxy(capture_config(endpoint, HEADER_TIMEOUT)) as proxy,
    ):
        client = await proxy.client()
        responses = Responses(client)
        await client.send(get("/1"))
        head = get("/2", extra="X-Slow: " + "s" * 200 + "\r\n")
        sender = asyncio.create_task(trickle(client, head, 0.05))
        try:
            await asyncio.sleep(0.6)  # the slow upstream: twice the header timeout
            release.set()
            first = await responses.next()
            assert first.status == 200
            second = await responses.next(timeout=2)
            assert second.status == 408
            assert await responses.closed(timeout=2)
            assert responses.unread == 0
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            await client.close()


# -- 10: a local answer never runs the bytes behind an unread body ---------------------------------


@pytest.mark.parametrize(
    ("top", "service", "data", "status"),
    [
        (
            "",
            "    match: {host: shop.test}",
            b"POST / HTTP/1.1\r\nHost: other.test\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
            + SMUGGLED,
            404,
        ),
        (
            "",
            "    match: {host: shop.test}",
            b"POST / HTTP/1.1\r\nHost: other.test\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
            404,
        ),
        (
            "",
            "    match: {host: shop.test}",
            b"POST / HTTP/1.1\r\nHost: other.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
            404,
        ),
        (
            BODY_LIMIT,
            "",
            b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 2000\r\n\r\n" + SMUGGLED,
            413,
        ),
        (
            "",
            "",
            b"CONNECT shop.test:443 HTTP/1.1\r\nHost: shop.test:443\r\n\r\n" + SMUGGLED,
            405,
        ),
        (
            "",
            "    match: {host: shop.test}",
            b"GET /ws HTTP/1.1\r\nHost: other.test\r\nConnection: upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n" + SMUGGLED,
            404,
        ),
    ],
    ids=["404-content-length", "404-expect", "404-chunked", "413", "405-connect", "404-upgrade"],
)
async def test_local_answer_with_unread_bytes_never_runs_a_smuggled_request(
    ups: Upstreams, top: str, service: str, data: bytes, status: int
) -> None:
    async with running_proxy(ups.config(top=top, service=service)) as proxy:
        client = await proxy.client()
        responses = Responses(client)
        await client.send(data)
        response = await responses.next()
        assert response.status == status
        assert await responses.closed()
        assert responses.unread == 0
        await client.close()
    assert ups.received() == []


# -- 11: hop-by-hop headers -----------------------------------------------------------------------

REQUEST_HOP_BY_HOP = (
    "Connection: keep-alive, X-Secret\r\n"
    "connection: X-Other-Secret\r\n"
    "X-Secret: 1\r\n"
    "X-Other-Secret: 1\r\n"
    "Keep-Alive: timeout=5\r\n"
    "TE: trailers\r\n"
    "Proxy-Authorization: Basic eDp5\r\n"
    "Proxy-Connection: keep-alive\r\n"
    "Trailer: X-Checksum\r\n"
    "Upgrade: h2c\r\n"
    "X-Kept: yes\r\n"
)


async def test_request_hop_by_hop_headers_never_reach_the_upstream(ups: Upstreams) -> None:
    async with running_proxy(ups.config()) as proxy:
        client = await proxy.client()
        response = await client.request(get(extra=REQUEST_HOP_BY_HOP))
        assert response.status == 200
        response = await client.request(
            post(b"hello", "Content-Length: 5\r\n" + REQUEST_HOP_BY_HOP)
        )
        assert response.status == 200
        await client.close()
    assert len(ups.blue.requests) == 2
    for received in ups.blue.requests:
        names = {name.lower() for name, _ in received.headers}
        for hop in (
            b"connection",
            b"x-secret",
            b"x-other-secret",
            b"keep-alive",
            b"te",
            b"proxy-authorization",
            b"proxy-connection",
            b"trailer",
            b"upgrade",
        ):
            assert hop not in names, hop
        assert received.header("X-Kept") == b"yes"
    assert ups.blue.requests[1].body == b"hello"


async def test_response_hop_by_hop_headers_never_reach_the_client() -> None:
    def respond(request: ReceivedRequest) -> bytes:
        return ok_response(
            b"up\n",
            extra=b"Connection: close, X-Up-Secret\r\n"
            b"X-Up-Secret: 1\r\n"
            b"Keep-Alive: timeout=5, max=100\r\n"
            b"Proxy-Authenticate: Basic realm=x\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Trailer: X-Checksum\r\n"
            b"Upgrade: h2c\r\n"
            b"X-Up-Kept: yes\r\n",
        )

    blue = await RecordingUpstream("blue", responder=respond).start()
    green = await RecordingUpstream("green").start()
    async with running_proxy(two_version_config(blue.endpoint, green.endpoint, 100, 0)) as proxy:
        client = await proxy.client()
        for _ in range(2):
            response = await client.request(get())
            assert response.status == 200
            assert response.body == b"up\n"
            names = {name.lower() for name, _ in response.headers}
            for hop in (
                b"x-up-secret",
                b"keep-alive",
                b"proxy-authenticate",
                b"proxy-connection",
                b"trailer",
                b"upgrade",
            ):
                assert hop not in names, hop
            connection = response.header("Connection") or b""
            assert b"x-up-secret" not in connection.lower()
            assert response.header("X-Up-Kept") == b"yes"
        await client.close()
    # The upstream said "Connection: close": its connection is not reused for the second request.
    assert len(blue.requests) == 2
    assert blue.connections == 2
    await blue.stop()
    await green.stop()


# -- 12: X-Forwarded-* spoofing -------------------------------------------------------------------

SPOOFED = (
    "X-Forwarded-For: 6.6.6.6, 10.0.0.1\r\n"
    "X-Forwarded-Proto: https\r\n"
    "X-Forwarded-Host: evil.test\r\n"
)


async def test_spoofed_forwarded_headers_without_trusted_hops(ups: Upstreams) -> None:
    async with running_proxy(ups.config(top="trusted_hops: 0")) as proxy:
        client = await proxy.client()
        assert (await client.request(get(extra=SPOOFED))).status == 200
        await client.close()
    [received] = ups.blue.requests
    assert received.headers_named("X-Forwarded-For") == [b"127.0.0.1"]
    assert received.headers_named("X-Forwarded-Proto") == [b"http"]
    assert received.headers_named("X-Forwarded-Host") == [b"app.test"]


@pytest.mark.parametrize(
    "xff",
    [
        "X-Forwarded-For: 6.6.6.6, 10.0.0.1\r\n",
        "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 10.0.0.1\r\n",
        "X-Forwarded-For: 6.6.6.6 ,  10.0.0.1 \r\n",
    ],
    ids=["one-line", "two-lines", "odd-spacing"],
)
async def test_trusted_hops_keeps_only_the_last_client_entries(ups: Upstreams, xff: str) -> None:
    async with running_proxy(ups.config(top="trusted_hops: 1")) as proxy:
        client = await proxy.client()
        extra = xff + "X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n"
        assert (await client.request(get(extra=extra))).status == 200
        await client.close()
    [received] = ups.blue.requests
    assert received.headers_named("X-Forwarded-For") == [b"10.0.0.1, 127.0.0.1"]
    assert received.headers_named("X-Forwarded-Proto") == [b"http"]
    assert received.headers_named("X-Forwarded-Host") == [b"app.test"]


# -- 13: force header and cookie ------------------------------------------------------------------

FORCE = "    force: {header: X-Canary, cookie: canary}"


@pytest.mark.parametrize(
    ("extra", "cookie"),
    [
        ("X-Canary: green\r\nCookie: a=1; b=2\r\n", b"a=1; b=2"),
        ("x-canary: green\r\n", None),
        ("Cookie: a=1; canary=green; b=2\r\n", b"a=1; b=2"),
        ("Cookie: canary=green\r\n", None),
        ("Cookie: a=1\r\nCookie: canary=green; b=2\r\n", b"a=1"),
    ],
    ids=["header", "header-lower-case", "cookie-middle", "cookie-only", "cookie-second-line"],
)
async def test_force_header_and_cookie_route_and_are_stripped(
    ups: Upstreams, extra: str, cookie: bytes | None
) -> None:
    async with running_proxy(ups.config(service=FORCE)) as proxy:
        client = await proxy.client()
        response = await client.request(get(extra=extra))
        assert response.status == 200
        assert response.header("X-App-Version") == b"green"
        await client.close()
    assert ups.blue.requests == []
    [received] = ups.green.requests
    assert received.header("X-Canary") is None
    cookies = received.headers_named("Cookie")
    for value in cookies:
        assert b"canary" not in value
    if cookie is None:
        assert cookies == []
    elif extra.count("Cookie:") == 2:
        assert cookies == [cookie, b"b=2"]
    else:
        assert cookies == [cookie]


async def test_without_force_config_the_canary_header_is_plain_data(ups: Upstreams) -> None:
    async with running_proxy(ups.config()) as proxy:
        client = await proxy.client()
        extra = "X-Canary: green\r\nCookie: a=1; canary=green; b=2\r\n"
        for _ in range(3):
            response = await client.request(get(extra=extra))
            assert response.status == 200
            assert response.header("X-App-Version") == b"blue"
        await client.close()
    assert ups.green.requests == []
    assert len(ups.blue.requests) == 3
    for received in ups.blue.requests:
        assert received.headers_named("X-Canary") == [b"green"]
        assert received.headers_named("Cookie") == [b"a=1; canary=green; b=2"]


# -- 14: CONNECT ----------------------------------------------------------------------------------


async def test_connect_is_405_and_closed(ups: Upstreams) -> None:
    async with running_proxy(ups.config()) as proxy:
        await rejected(proxy, b"CONNECT app.test:443 HTTP/1.1\r\nHost: app.test:443\r\n\r\n", 405)
    assert ups.received() == []
    assert ups.blue.connections == 0


# -- 15: connection limit -------------------------------------------------------------------------


async def test_connection_over_the_limit_gets_503_and_is_closed(ups: Upstreams) -> None:
    async with running_proxy(ups.config(top="limits: {max_connections: 2}")) as proxy:
        first = await proxy.client()
        second = await proxy.client()
        assert (await first.request(get("/1"))).status == 200
        assert (await second.request(get("/2"))).status == 200
        third = await proxy.client()
        responses = Responses(third)
        with contextlib.suppress(ConnectionError):
            await third.send(get("/3"))
        response = await responses.next()
        assert response.status == 503
        assert response.header("Retry-After") is not None
        assert await responses.closed()
        assert responses.unread == 0
        await third.close()
        assert (await first.request(get("/4"))).status == 200
        assert (await second.request(get("/5"))).status == 200
        await first.close()
        await second.close()
    assert [r.url for r in ups.blue.requests] == [b"/1", b"/2", b"/4", b"/5"]


# -- 16: pipelining into a bad request ------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /3 HTTP/1.1\r\nHost: app.test\r\nX-A: a\r\n b\r\n\r\n",
        b"POST /3 HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n0\r\n\r\n",
        b"GET /3 HTTP/1.1\r\n\r\n",
    ],
    ids=["obs-fold", "cl-and-te", "no-host"],
)
async def test_pipelined_good_requests_are_answered_in_order_before_the_400(bad: bytes) -> None:
    blue = await RecordingUpstream("blue", responder=lambda r: ok_response(r.url)).start()
    async with running_proxy(two_version_config(blue.endpoint, blue.endpoint, 100, 0)) as proxy:
        client = await proxy.client()
        responses = Responses(client)
        await client.send(get("/1") + get("/2") + bad + SMUGGLED)
        for path in (b"/1", b"/2"):
            response = await responses.next()
            assert (response.status, response.body, response.complete) == (200, path, True)
        response = await responses.next()
        assert response.status == 400
        assert await responses.closed()
        assert responses.unread == 0
        await client.close()
    assert [r.url for r in blue.requests] == [b"/1", b"/2"]
    await blue.stop()


# -- a request body that stalls ------------------------------------------------------------------


async def test_a_stalled_request_body_gets_408_and_the_upstream_never_sees_it_complete() -> None:
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    config = two_version_config(
        blue.endpoint, green.endpoint, 100, 0, extra_top="timeouts: {idle: 300ms}"
    )
    async with running_proxy(config) as proxy:
        client = await proxy.client()
        await client.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
        async with asyncio.timeout(3):
            response = await client.response()
        assert response.status == 408
        assert await client.closed()
        assert blue.requests == []  # the body never completed upstream
        assert proxy.stats("shop", "blue").in_flight == 0
    await blue.stop()
    await green.stop()


async def test_a_slow_but_steady_request_body_is_not_cut() -> None:
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    config = two_version_config(
        blue.endpoint, green.endpoint, 100, 0, extra_top="timeouts: {idle: 300ms}"
    )
    async with running_proxy(config) as proxy:
        client = await proxy.client()
        await client.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
        for byte in b"0123456789":  # 1 s in all, never 300 ms without a byte
            await asyncio.sleep(0.1)
            await client.send(bytes([byte]))
        response = await client.response()
        assert response.status == 200
        assert blue.requests[0].body == b"0123456789"
        await client.close()
    await blue.stop()
    await green.stop()


async def test_an_upstream_that_stops_reading_the_body_is_let_go_at_the_idle_timeout() -> None:
    upstream_gone = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.5)  # reads nothing: the proxy's writes to it block
        with contextlib.suppress(ConnectionError):
            while await reader.read(1024 * 1024):  # then sees the proxy give up
                pass
        upstream_gone.set()

    async with raw_upstream(never_reads) as blue:
        green = await RecordingUpstream("green").start()
        timeouts = "timeouts: {idle: 300ms}"
        config = two_version_config(blue, green.endpoint, 100, 0, extra_top=timeouts)
        async with running_proxy(config) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            size = 256 * 1024 * 1024  # far more than every buffer on the way can hold
            writer.write(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
            sent = 0

            async def upload() -> None:
                nonlocal sent
                chunk = b"x" * (1024 * 1024)
                with contextlib.suppress(ConnectionError):
                    while sent < size:
                        writer.write(chunk)
                        await writer.drain()  # blocks once the proxy stops reading us
                        sent += len(chunk)

            uploading = asyncio.create_task(upload())
            async with asyncio.timeout(10):
                # The client is let go: 408, or a reset if its unread upload was still arriving
                # when the proxy closed (the kernel resets a socket closed with unread data).
                with contextlib.suppress(ConnectionError):
                    answer = await reader.read()
                    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")
                await upstream_gone.wait()  # and the upstream connection is dropped
                await uploading
            writer.close()
            assert sent < size  # the upload was stopped, not swallowed
            assert proxy.stats("shop", "blue").in_flight == 0
        await green.stop()
