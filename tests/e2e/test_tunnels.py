"""Tunnels (WebSocket and other Upgrades) after the upstream's 101: they belong to their version
(in-flight, drained and cut at `drain_timeout`, waited for by SIGTERM), a half-close in one
direction is passed on, and `timeouts.idle` bounds their silence. Real sockets on loopback; the
drain and SIGTERM tests run the `laneswitch` command, with one and with two worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.e2e.test_workers import Proxy, laneswitch
from tests.helpers import (
    Client,
    RunningProxy,
    raw_upstream,
    read_request_head,
    running_proxy,
    two_version_config,
    until,
)

UPGRADE = b"GET /tunnel HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: x-raw\r\n\r\n"
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x-raw\r\n\r\n"

Peer = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def upgrade_upstream() -> AsyncIterator[tuple[str, asyncio.Queue[Peer]]]:
    """An upstream that answers every Upgrade with 101 and hands its side of the tunnel to the
    test (through the queue), which then plays the upstream byte by byte."""
    accepted: asyncio.Queue[Peer] = asyncio.Queue()
    stop = asyncio.Event()
    live: set[asyncio.Task[None] | None] = set()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        live.add(task)
        try:
            await read_request_head(reader)
            writer.write(SWITCHING)
            await writer.drain()
            await accepted.put((reader, writer))
            await stop.wait()  # the test drives this connection until the upstream stops
        finally:
            live.discard(task)

    async with raw_upstream(handler) as endpoint:
        try:
            yield endpoint, accepted
        finally:
            stop.set()  # handlers end by themselves rather than being cancelled
            await until(lambda: not live)


async def open_tunnel(port: int, accepted: asyncio.Queue[Peer]) -> tuple[Client, Peer]:
    """A client through the proxy with its tunnel open, and the upstream's side of it."""
    client = await Client.connect(port)
    await client.send(UPGRADE)
    async with asyncio.timeout(5):
        head = await client.reader.readuntil(b"\r\n\r\n")  # the tunnel's bytes stay unread
        upstream = await accepted.get()
    assert head.startswith(b"HTTP/1.1 101 "), head
    return client, upstream


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything up to the peer's FIN (a reset ends it too)."""
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


def tunnel_config(endpoint: str, extra_top: str = "") -> str:
    return two_version_config(endpoint, endpoint, 100, 0, extra_top=extra_top)


async def no_tunnel_left(proxy: RunningProxy) -> None:
    stats = proxy.stats("shop", "blue")
    await until(lambda: stats.in_flight == 0 and proxy.server.plane.in_flight() == 0, 5)


# -- half-close ------------------------------------------------------------------------------------


async def test_a_client_half_close_is_passed_on_and_the_answer_still_flows_back() -> None:
    async with (
        upgrade_upstream() as (endpoint, accepted),
        running_proxy(tunnel_config(endpoint)) as proxy,
    ):
        client, (up_reader, up_writer) = await open_tunnel(proxy.port, accepted)
        await client.send(b"the whole question")
        client.writer.write_eof()  # done sending; still reading
        # The upstream reads to the client's FIN, then answers on the open direction.
        assert await read_to_eof(up_reader) == b"the whole question"
        up_writer.write(b"the answer, after the question ended")
        up_writer.write_eof()
        assert await read_to_eof(client.reader) == b"the answer, after the question ended"
        # Both directions closed: the tunnel is over and no longer in flight.
        await no_tunnel_left(proxy)
        stats = proxy.stats("shop", "blue")
        assert stats.requests == {101: 1}
        assert stats.client_aborts == 0 and stats.upstream_errors["reset"] == 0
        await client.close()


async def test_an_upstream_half_close_is_passed_on_and_the_client_can_still_send() -> None:
    async with (
        upgrade_upstream() as (endpoint, accepted),
        running_proxy(tunnel_config(endpoint)) as proxy,
    ):
        client, (up_reader, up_writer) = await open_tunnel(proxy.port, accepted)
        up_writer.write(b"banner")
        up_writer.write_eof()  # the upstream is done sending; still reading
        assert await read_to_eof(client.reader) == b"banner"
        await client.send(b"sent after the upstream's FIN")
        client.writer.write_eof()
        assert await read_to_eof(up_reader) == b"sent after the upstream's FIN"
        await no_tunnel_left(proxy)
        stats = proxy.stats("shop", "blue")
        assert stats.client_aborts == 0 and stats.upstream_errors["reset"] == 0
        await client.close()


# -- idle bound and vanished peers -----------------------------------------------------------------

IDLE = 0.3


@pytest.mark.parametrize(
    ("half_closed", "counted_as"),
    [("none", "timeout"), ("client", "timeout"), ("upstream", "client_abort")],
)
async def test_a_silent_tunnel_is_cut_at_the_idle_timeout(
    half_closed: str, counted_as: str
) -> None:
    config = tunnel_config("{endpoint}", extra_top=f"timeouts: {{idle: {int(IDLE * 1000)}ms}}")
    async with (
        upgrade_upstream() as (endpoint, accepted),
        running_proxy(config.replace("{endpoint}", endpoint)) as proxy,
    ):
        client, (up_reader, up_writer) = await open_tunnel(proxy.port, accepted)
        # Bytes keep it open, whichever way they go, for longer than the idle timeout in all.
        started = time.monotonic()
        for turn in range(8):
            await asyncio.sleep(IDLE / 3)  # pacing the traffic, not waiting for a condition
            if turn % 2:
                await client.send(b"ping")
                assert await asyncio.wait_for(up_reader.readexactly(4), 2) == b"ping"
            else:
                up_writer.write(b"pong")
                assert await asyncio.wait_for(client.reader.readexactly(4), 2) == b"pong"
        assert time.monotonic() - started > 2 * IDLE
        if half_closed == "client":
            client.writer.write_eof()
            assert await read_to_eof(up_reader) == b""
        elif half_closed == "upstream":
            up_writer.write_eof()
            assert await read_to_eof(client.reader) == b""
        silent_since = time.monotonic()
        # Then silence both ways: both connections are cut, the proxy's own doing.
        await read_to_eof(up_reader)
        assert await client.closed()
        waited = time.monotonic() - silent_since
        assert IDLE * 0.9 <= waited < IDLE + 2, waited
        await no_tunnel_left(proxy)
        stats = proxy.stats("shop", "blue")
        expected_timeouts = 1 if counted_as == "timeout" else 0
        assert stats.upstream_errors["timeout"] == expected_timeouts
        assert stats.client_aborts == (1 if counted_as == "client_abort" else 0)
        assert stats.requests == {101: 1}
        await client.close()


async def test_a_client_that_does_not_read_yet_is_no_silence() -> None:
    """Bytes queued for a peer that has not read them are backpressure, not an idle tunnel."""
    config = tunnel_config("{endpoint}", extra_top=f"timeouts: {{idle: {int(IDLE * 1000)}ms}}")
    body = bytes(range(256)) * (16 * 4096)  # 16 MiB: far more than every buffer on the way
    async with (
        upgrade_upstream() as (endpoint, accepted),
        running_proxy(config.replace("{endpoint}", endpoint)) as proxy,
    ):
        sock = socket.socket()
        # A small receive window, so the bytes wait in the proxy, not in this kernel.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port))
        client = Client(*await asyncio.open_connection(sock=sock))
        await client.send(UPGRADE)
        async with asyncio.timeout(5):
            assert (await client.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
            _, up_writer = await accepted.get()
        up_writer.write(body)
        await asyncio.sleep(4 * IDLE)  # the client reads nothing for longer than the idle bound
        async with asyncio.timeout(10):
            assert await client.reader.readexactly(len(body)) == body
        stats = proxy.stats("shop", "blue")
        assert stats.upstream_errors["timeout"] == 0 and stats.client_aborts == 0
        assert stats.in_flight == 1
        await client.close()


async def test_a_vanished_client_frees_the_upstream_connection_at_once() -> None:
    async with (
        upgrade_upstream() as (endpoint, accepted),
        running_proxy(
            tunnel_config(endpoint)  # timeouts.idle is the default 60 s
        ) as proxy,
    ):
        client, (up_reader, _) = await open_tunnel(proxy.port, accepted)
        await client.send(b"hello")
        assert await asyncio.wait_for(up_reader.readexactly(5), 2) == b"hello"
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.writer.transport.abort()  # a reset: the client is gone, not half-closed
        assert await read_to_eof(up_reader, timeout=2) == b""
        await no_tunnel_left(proxy)
        assert proxy.stats("shop", "blue").client_aborts == 1


# -- drain and SIGTERM, in the `laneswitch` command ------------------------------------------------


@contextlib.asynccontextmanager
async def websocket_echo(name: str) -> AsyncIterator[str]:
    """An aiohttp WebSocket upstream that answers every text message with `name:message`."""

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"{name}:{message.data}")
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"{host}:{port}"
    finally:
        await runner.cleanup()


def command_config(tmp_path: Path, blue: str, green: str, drain: str, workers: int) -> Path:
    config = tmp_path / "laneswitch.yaml"
    config.write_text(
        f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
drain_timeout: {drain}
workers: {workers}
services:
  shop:
    versions:
      blue: {{endpoints: ["{blue}"], weight: 100}}
      green: {{endpoints: ["{green}"], weight: 0}}
"""
    )
    return config


async def status_in_flight(proxy: Proxy, version: str) -> int:
    status, text = await proxy.get("/status")
    assert status == 200
    in_flight: int = json.loads(text)["services"]["shop"]["versions"][version]["in_flight"]
    return in_flight


async def eventually(proxy: Proxy, name: str, expected: float, timeout: float = 5.0) -> None:
    """Until the /metrics sample `name` has the value `expected` (workers report in batches)."""
    async with asyncio.timeout(timeout):
        while (await proxy.metrics()).get(name) != expected:
            await asyncio.sleep(0.05)


BLUE = 'service="shop",version="blue"'


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
async def test_a_websocket_outliving_the_drain_of_its_version_is_cut_and_counted(
    tmp_path: Path, workers: int
) -> None:
    drain = 1.0
    async with websocket_echo("blue") as blue, websocket_echo("green") as green:
        config = command_config(tmp_path, blue, green, f"{drain}s", workers)
        async with laneswitch(config) as proxy, aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{proxy.port}/ws"
            async with asyncio.timeout(20), session.ws_connect(url) as ws:
                await ws.send_str("one")
                assert await ws.receive_str() == "blue:one"
                # The tunnel is in flight on blue, in /status and in the gauge.
                async with asyncio.timeout(5):
                    while await status_in_flight(proxy, "blue") != 1:
                        await asyncio.sleep(0.05)
                await eventually(proxy, f"laneswitch_in_flight_requests{{{BLUE}}}", 1)
                status, body = await proxy.post("/services/shop/switch", {"to": "green"})
                assert status == 200, body
                switched_at = time.monotonic()
                # Within drain_timeout it keeps working on blue; new tunnels go to green.
                await ws.send_str("two")
                assert await ws.receive_str() == "blue:two"
                async with session.ws_connect(url) as fresh:
                    await fresh.send_str("three")
                    assert await fresh.receive_str() == "green:three"
                # At drain_timeout it is cut.
                message = await asyncio.wait_for(ws.receive(), drain + 3)
                cut_after = time.monotonic() - switched_at
                assert message.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ), message
                assert drain * 0.5 <= cut_after < drain + 2, cut_after
            await eventually(proxy, f"laneswitch_drain_cut_requests_total{{{BLUE}}}", 1)
            await eventually(proxy, f"laneswitch_in_flight_requests{{{BLUE}}}", 0)
            assert await status_in_flight(proxy, "blue") == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_waits_for_tunnels_up_to_the_drain_timeout_then_cuts_and_counts(
    tmp_path: Path, workers: int
) -> None:
    drain = 2.0
    async with upgrade_upstream() as (endpoint, accepted):
        config = command_config(tmp_path, endpoint, endpoint, f"{drain}s", workers)
        async with laneswitch(config) as proxy:
            ending, (end_reader, end_writer) = await open_tunnel(proxy.port, accepted)
            lasting, (last_reader, last_writer) = await open_tunnel(proxy.port, accepted)
            async with asyncio.timeout(5):
                while await status_in_flight(proxy, "blue") != 2:
                    await asyncio.sleep(0.05)
            mark = len(proxy.lines)
            stopped_at = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            await proxy.line(r"SIGTERM: draining", mark)
            # While the stop drains, both tunnels still carry bytes both ways.
            for client, reader, writer in (
                (ending, end_reader, end_writer),
                (lasting, last_reader, last_writer),
            ):
                await client.send(b"still there?")
                assert await asyncio.wait_for(reader.readexactly(12), 2) == b"still there?"
                writer.write(b"yes")
                assert await asyncio.wait_for(client.reader.readexactly(3), 2) == b"yes"
            # One ends by itself (both FINs); the other outlives the drain and is cut.
            ending.writer.write_eof()
            assert await read_to_eof(end_reader) == b""
            end_writer.write_eof()
            assert await read_to_eof(ending.reader) == b""
            assert await lasting.closed(timeout=drain + 2)
            # The drain timeout governs when the cut happens; the processes' own teardown
            # (slower with workers on a loaded machine) is bounded by the wait below.
            cut_after = time.monotonic() - stopped_at
            assert drain * 0.9 <= cut_after < drain + 1, cut_after
            assert await asyncio.wait_for(proxy.process.wait(), drain + 1) == 0
            await proxy.line(r"stopped \(1 request\(s\) cut at the drain timeout\)", mark)
            await ending.close()
            await lasting.close()
