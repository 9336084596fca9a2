"""The proxy's own answers (404, 413, 502, 503, ...) on a connection whose request body is large,
still arriving, or already read: the client gets the whole answer, and a kept-alive connection
goes on to read the next request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from proxy.config.loader import parse_config
from proxy.routing.build import build_table
from tests.helpers import (
    Client,
    RecordingUpstream,
    Response,
    RunningProxy,
    fed_connection,
    get,
    ok_response,
    raw_upstream,
    read_request_head,
    refused_endpoint,
    running_proxy,
    two_version_config,
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


async def test_502_after_a_whole_body_was_read_keeps_reading_the_connection() -> None:
    green = await RecordingUpstream("green").start()
    with refused_endpoint() as blue:
        config = two_version_config(blue, green.endpoint, 100, 0, extra_service=ONLY_APP)
        async with running_proxy(config) as proxy:
            client = await proxy.client()
            answer = await client.request(post("app.test"))
            assert answer.status == 502
            await next_request_is_read(client, answer)
            await client.close()
    assert green.requests == []
    await green.stop()


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
