"""Functional: a client that breaks its request after the response started is cut, and that is
the client's outcome, never a 5xx for the version (a client must not be able to push a canary
into rollback).

A fake upstream answers at once and streams its body slowly while the request body is still
coming; the client then breaks a rule of its body. Real loopback sockets; bounded waits.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.helpers import (
    RunningProxy,
    raw_upstream,
    read_request_head,
    running_proxy,
    two_version_config,
    until,
)

POST_CHUNKED = b"POST /up HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"


async def answers_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers as soon as the head arrives, then trickles its body (never silent for long)."""
    await read_request_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(200):  # at most 10 s
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.05)


async def response_started(client_reader: asyncio.StreamReader) -> None:
    async with asyncio.timeout(3):
        head = await client_reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")


async def cut(client_reader: asyncio.StreamReader) -> None:
    """Wait (bounded) until the proxy ends the connection."""
    async with asyncio.timeout(5):
        with contextlib.suppress(ConnectionResetError):
            while await client_reader.read(65536):
                pass


async def assert_client_outcome(proxy: RunningProxy) -> None:
    stats = proxy.stats("shop", "blue")
    await until(lambda: stats.in_flight == 0)
    assert not [status for status in stats.requests if status >= 500]
    assert stats.client_aborts == 1
    assert sum(stats.upstream_errors.values()) == 0


@pytest.mark.parametrize("fault", ["bad-chunk", "too-large", "stalled"])
async def test_a_client_breaking_its_body_after_the_response_started_is_a_client_outcome(
    fault: str,
) -> None:
    extra = "timeouts: {idle: 500ms}" if fault == "stalled" else "limits: {max_body_bytes: 1KiB}"
    async with raw_upstream(answers_early) as endpoint:
        config = two_version_config(endpoint, endpoint, 100, 0, extra_top=extra)
        async with running_proxy(config) as proxy:
            client = await proxy.client()
            await client.send(POST_CHUNKED + b"3\r\nabc\r\n")
            await response_started(client.reader)
            if fault == "bad-chunk":
                await client.send(b"zz\r\nnot a chunk\r\n")
            elif fault == "too-large":
                await client.send(b"800\r\n" + b"a" * 0x800 + b"\r\n")
            # "stalled": nothing more; the body times out after timeouts.idle.
            await cut(client.reader)
            await assert_client_outcome(proxy)
            await client.close()
