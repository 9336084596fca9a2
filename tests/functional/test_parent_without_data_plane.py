"""Functional: the control plane publishes tables; with workers, the parent serves nothing.

With `workers: N` (N > 1) the data plane runs only in the worker processes: the parent builds no
`DataPlane` and binds no listener of its own, yet every change it makes reaches the workers.
With one process, the one data plane is the control plane's subscriber.
"""

from __future__ import annotations

import pytest

from proxy.config.loader import parse_config
from proxy.http.plane import DataPlane
from proxy.server import Server
from tests.helpers import Client, RecordingUpstream, get


def config_text(blue: str, green: str) -> str:
    return f"""
listen: 127.0.0.1:0
drain_timeout: 1s
services:
  shop:
    versions:
      blue: {{endpoints: ["{blue}"], weight: 100}}
      green: {{endpoints: ["{green}"], weight: 0}}
    version_header: X-App-Version
"""


def record_data_planes(monkeypatch: pytest.MonkeyPatch) -> list[DataPlane]:
    """Every DataPlane built in this process from now on."""
    built: list[DataPlane] = []
    original = DataPlane.__init__

    def recording(self: DataPlane, *args: object, **kwargs: object) -> None:
        built.append(self)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(DataPlane, "__init__", recording)
    return built


async def answered_by(port: int) -> bytes | None:
    client = await Client.connect(port)
    try:
        response = await client.request(get())
    finally:
        await client.close()
    return response.header("X-App-Version")


@pytest.mark.parametrize("workers", [1, 2])
async def test_only_a_single_process_builds_a_data_plane_of_its_own(
    monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    built = record_data_planes(monkeypatch)
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    text = config_text(blue.endpoint, green.endpoint)
    server = Server(parse_config(text, env={}), config_text=text, workers=workers)
    try:
        await server.start(admin=False, watch=False)
        port = server.addresses[0][1]
        assert await answered_by(port) == b"blue"
        await server.control.switch("shop", "green")
        assert await answered_by(port) == b"green"  # the new table reached whoever serves
        if workers == 1:
            assert built == [server.plane] and len(server.listeners) == 1
            assert server.control.table_subscribers == [server.plane.install]
        else:
            assert built == [] and server.plane is None and server.listeners == []
            assert server.pool is not None
            assert server.control.table_subscribers == [server.pool.push]
    finally:
        await server.stop(drain_timeout=1.0)
        await blue.stop()
        await green.stop()
