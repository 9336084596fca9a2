"""A reload that removes an endpoint lets go of its upstream connections: idle ones are closed at
once, a busy one after its exchange, and the endpoint's pool is dropped (in worker processes
too, which install the same tables)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.functional.test_admin import admin_proxy, config_text, until
from tests.helpers import Client, RecordingUpstream, get, raw_upstream, read_request_head


async def test_a_removed_endpoint_loses_its_idle_connections_and_its_pool(tmp_path: Path) -> None:
    closed = asyncio.Event()

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request_head(reader)
            except asyncio.IncompleteReadError:
                closed.set()  # the proxy closed its pooled connection
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-App-Version: old\r\n\r\nold")
            await writer.drain()

    replacement = await RecordingUpstream("new").start()
    try:
        async with (
            raw_upstream(keep_alive) as old,
            admin_proxy(tmp_path, config_text(old, replacement.endpoint, blue_weight=100)) as proxy,
        ):
            pools = proxy.server.plane.pools.pools
            client = await Client.connect(proxy.proxy_port)
            assert (await client.request(get())).status == 200
            await until(lambda: old in pools and len(pools[old].idle) == 1)
            # The file now names another endpoint for blue: the old one is gone.
            proxy.config_path.write_text(
                config_text(replacement.endpoint, replacement.endpoint, blue_weight=100)
            )
            assert (await proxy.call("POST", "/reload")).status == 200
            await asyncio.wait_for(closed.wait(), 5)
            assert old not in pools
            assert (await client.request(get())).status == 200
            assert replacement.requests
            await client.close()
    finally:
        await replacement.stop()


async def test_a_busy_connection_of_a_removed_endpoint_closes_after_its_exchange(
    tmp_path: Path,
) -> None:
    connections: list[asyncio.Event] = []
    held = asyncio.Event()
    release = asyncio.Event()

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gone = asyncio.Event()
        connections.append(gone)
        while True:
            try:
                await read_request_head(reader)
            except asyncio.IncompleteReadError:
                gone.set()
                return
            held.set()
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nold")
            await writer.drain()

    replacement = await RecordingUpstream("new").start()
    try:
        async with (
            raw_upstream(keep_alive) as old,
            admin_proxy(tmp_path, config_text(old, replacement.endpoint, blue_weight=100)) as proxy,
        ):
            client = await Client.connect(proxy.proxy_port)
            await client.send(get())
            await asyncio.wait_for(held.wait(), 5)
            proxy.config_path.write_text(
                config_text(replacement.endpoint, replacement.endpoint, blue_weight=100)
            )
            assert (await proxy.call("POST", "/reload")).status == 200
            assert old not in proxy.server.plane.pools.pools
            release.set()
            response = await client.response()
            assert response.status == 200 and response.body == b"old"
            # Not returned to any pool: the upstream sees its connection closed.
            await asyncio.wait_for(connections[0].wait(), 5)
            await client.close()
    finally:
        await replacement.stop()
