"""The control plane under load: switches, weights, rollbacks and reloads never fail a request;
drains finish what was in flight and cut what outlives the bound; state survives restarts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.config.loader import parse_config
from proxy.control.status import status_json
from proxy.errors import ControlError
from proxy.server import Server
from tests.helpers import Client, Upstreams, get, ok_response, raw_upstream


def config_text(blue: str, green: str, blue_weight: int = 100, extra: str = "") -> str:
    return f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
drain_timeout: 5s
{extra}
services:
  shop:
    versions:
      blue: {{endpoints: ["{blue}"], weight: {blue_weight}}}
      green: {{endpoints: ["{green}"], weight: {100 - blue_weight}}}
    version_header: X-App-Version
"""


@contextlib.asynccontextmanager
async def server_from_file(path: Path) -> AsyncIterator[Server]:
    text = path.read_text()
    server = Server(parse_config(text, env={}), config_path=str(path), config_text=text)
    await server.start(watch=False)
    try:
        yield server
    finally:
        await server.stop(drain_timeout=1.0)


@dataclass
class LoadResult:
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    sent_ids: list[bytes] = field(default_factory=list)


async def keep_alive_client(port: int, stop: asyncio.Event, name: str, result: LoadResult) -> None:
    client = await Client.connect(port)
    n = 0
    try:
        while not stop.is_set():
            n += 1
            request_id = f"{name}-{n}".encode()
            result.sent_ids.append(request_id)
            try:
                response = await client.request(
                    get(extra=f"X-Request-Id: {request_id.decode()}\r\n")
                )
            except (ConnectionError, TimeoutError) as exc:
                result.errors.append(f"{request_id!r}: {exc!r}")
                return
            result.statuses[response.status] += 1
    finally:
        await client.close()


async def new_connection_client(
    port: int, stop: asyncio.Event, name: str, result: LoadResult
) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        request_id = f"{name}-{n}".encode()
        result.sent_ids.append(request_id)
        client = await Client.connect(port)
        try:
            response = await client.request(
                get(extra=f"X-Request-Id: {request_id.decode()}\r\nConnection: close\r\n")
            )
            result.statuses[response.status] += 1
        except (ConnectionError, TimeoutError) as exc:
            result.errors.append(f"{request_id!r}: {exc!r}")
        finally:
            await client.close()


async def test_switches_weights_rollbacks_and_reloads_under_load_fail_nothing(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    blue = await upstreams.start("blue")
    green = await upstreams.start("green")
    path = tmp_path / "laneswitch.yaml"
    path.write_text(config_text(blue.endpoint, green.endpoint))
    result = LoadResult()
    async with server_from_file(path) as server:
        port = server.addresses[0][1]
        stop = asyncio.Event()
        clients = [
            *(keep_alive_client(port, stop, f"ka{i}", result) for i in range(6)),
            *(new_connection_client(port, stop, f"new{i}", result) for i in range(2)),
        ]
        load = asyncio.gather(*clients)
        control = server.control
        deadline = time.monotonic() + 10
        step = 10 / 38
        for i in range(20):
            await control.switch("shop", "green" if i % 2 == 0 else "blue")
            await asyncio.sleep(step)
        for i in range(10):
            await control.set_weights("shop", {"blue": 10 * i, "green": 100 - 10 * i})
            await asyncio.sleep(step)
            if i % 3 == 2:
                await control.rollback("shop")  # back to the weights before that change
                await asyncio.sleep(step)
        for i in range(5):
            # Valid edits the proxy must apply without dropping anything.
            path.write_text(config_text(blue.endpoint, green.endpoint, extra=f"trusted_hops: {i}"))
            assert (await control.reload()).ok
            await asyncio.sleep(step)
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        stop.set()
        await load
    assert result.errors == []
    assert set(result.statuses) == {200}, result.statuses
    assert sum(result.statuses.values()) > 500
    received = Counter(
        r.header("X-Request-Id") for upstream in (blue, green) for r in upstream.requests
    )
    assert len(received) == len(result.sent_ids)
    assert set(received.values()) == {1}, "a request reached an upstream twice"
    assert set(received) == set(result.sent_ids)
    assert blue.requests and green.requests


async def slow_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request with 20 chunks, 100 ms apart (2 s in all)."""
    while True:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(20):
            writer.write(b"%x\r\n%s\r\n" % (len(b"part%02d;" % i), b"part%02d;" % i))
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def test_stream_in_flight_during_a_switch_completes_on_its_version(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    green = await upstreams.start("green")
    async with raw_upstream(slow_stream) as blue:
        path = tmp_path / "laneswitch.yaml"
        path.write_text(config_text(blue, green.endpoint))
        async with server_from_file(path) as server:
            client = await Client.connect(server.addresses[0][1])
            await client.send(get())
            response_task = asyncio.create_task(client.response(timeout=10))
            await asyncio.sleep(0.3)  # the stream is under way
            await server.control.switch("shop", "green")
            response = await response_task
            assert response.complete
            assert response.header("X-App-Version") == b"blue"
            assert response.body == b"".join(b"part%02d;" % i for i in range(20))
            # New requests go to green now, on a fresh connection and on the same one.
            assert (await client.request(get())).header("X-App-Version") == b"green"
            stats = server.control.stats.get("shop", "blue")
            assert stats.drain_cut == 0
            assert stats.in_flight == 0
            await client.close()


async def test_stream_outliving_the_drain_timeout_is_cut_and_counted(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    green = await upstreams.start("green")
    async with raw_upstream(slow_stream) as blue:
        path = tmp_path / "laneswitch.yaml"
        path.write_text(
            config_text(blue, green.endpoint).replace("drain_timeout: 5s", "drain_timeout: 500ms")
        )
        async with server_from_file(path) as server:
            client = await Client.connect(server.addresses[0][1])
            await client.send(get())
            response_task = asyncio.create_task(client.response(timeout=10))
            await asyncio.sleep(0.2)
            switched_at = time.monotonic()
            await server.control.switch("shop", "green")
            response = await response_task
            cut_after = time.monotonic() - switched_at
            assert not response.complete  # cut, never a fake clean end
            assert 0.4 < cut_after < 1.5
            assert server.control.stats.get("shop", "blue").drain_cut == 1


BAD_CONFIGS = {
    "bad yaml": "services: [unclosed\n",
    "bad weights": (
        "services:\n  shop:\n    versions:\n"
        "      blue: {endpoints: ['127.0.0.1:1'], weight: 60}\n"
        "      green: {endpoints: ['127.0.0.1:2'], weight: 60}\n"
    ),
    "unknown key": "servics: {}\n",
    "truncated": None,  # filled from the good file below
}


@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
async def test_invalid_reload_changes_nothing_and_is_visible(
    tmp_path: Path, kind: str, upstreams: Upstreams
) -> None:
    blue = await upstreams.start("blue")
    green = await upstreams.start("green")
    path = tmp_path / "laneswitch.yaml"
    good = config_text(blue.endpoint, green.endpoint, blue_weight=100)
    path.write_text(good)
    result = LoadResult()
    async with server_from_file(path) as server:
        port = server.addresses[0][1]
        stop = asyncio.Event()
        load = asyncio.gather(*(keep_alive_client(port, stop, f"c{i}", result) for i in range(3)))
        bad = BAD_CONFIGS[kind]
        path.write_text(bad if bad is not None else good[: len(good) // 2])
        outcome = await server.control.reload()
        await asyncio.sleep(0.3)
        stop.set()
        await load
        assert not outcome.ok and outcome.errors
        status = status_json(server.control)
        assert status["config"]["last_reload_error"] == outcome.errors
        assert server.control.reloads["failure"] == 1
        assert server.control.events.since(0)[-1].action == "reload_failed"
        # Old config still serving: all traffic on blue.
        assert server.control.weights["shop"] == {"blue": 100, "green": 0}
    assert result.errors == [] and set(result.statuses) == {200}
    assert green.requests == []


async def test_reload_keeps_a_runtime_switch_unless_the_file_weights_change(
    tmp_path: Path,
) -> None:
    path = tmp_path / "laneswitch.yaml"
    path.write_text(config_text("127.0.0.1:9", "127.0.0.1:10", blue_weight=100))
    async with server_from_file(path) as server:
        control = server.control
        await control.switch("shop", "green", force=True)
        path.write_text(config_text("127.0.0.1:9", "127.0.0.1:10", 100, extra="trusted_hops: 1"))
        assert (await control.reload()).ok
        assert control.weights["shop"] == {"blue": 0, "green": 100}  # unrelated edit: kept
        path.write_text(config_text("127.0.0.1:9", "127.0.0.1:10", 70, extra="trusted_hops: 1"))
        assert (await control.reload()).ok
        assert control.weights["shop"] == {"blue": 70, "green": 30}  # the file's weights moved
        assert [e.action for e in control.events.since(0)] == ["switch", "reload", "reload"]


async def test_the_file_watch_sees_a_kubernetes_style_symlink_swap(tmp_path: Path) -> None:
    # ConfigMap layout: laneswitch.yaml -> ..data/laneswitch.yaml, ..data -> ..v1
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "laneswitch.yaml").write_text(
        config_text("127.0.0.1:9", "127.0.0.1:10", 100)
    )
    (tmp_path / "..data").symlink_to("..v1")
    path = tmp_path / "laneswitch.yaml"
    path.symlink_to("..data/laneswitch.yaml")
    text = path.read_text()
    server = Server(parse_config(text, env={}), config_path=str(path), config_text=text)
    await server.start()
    try:
        (tmp_path / "..v2").mkdir()
        (tmp_path / "..v2" / "laneswitch.yaml").write_text(
            config_text("127.0.0.1:9", "127.0.0.1:10", 60)
        )
        (tmp_path / "..data_tmp").symlink_to("..v2")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # the atomic swap
        async with asyncio.timeout(5):
            while server.control.weights["shop"] != {"blue": 60, "green": 40}:
                await asyncio.sleep(0.05)
        assert server.control.events.since(0)[-1].actor == "config"
    finally:
        await server.stop(drain_timeout=0.5)


async def test_restart_with_state_file_resumes_the_weights(tmp_path: Path) -> None:
    path = tmp_path / "laneswitch.yaml"
    state = tmp_path / "state" / "state.json"
    path.write_text(config_text("127.0.0.1:9", "127.0.0.1:10", 100, extra=f"state_file: {state}"))
    async with server_from_file(path) as server:
        await server.control.set_weights("shop", {"blue": 25, "green": 75})
    assert state.exists()
    async with server_from_file(path) as server:
        assert server.control.weights["shop"] == {"blue": 25, "green": 75}
        assert [e.action for e in server.control.events.since(0)] == ["weights"]
        shares = {v.name: v.weight for v in server.table.services[0].versions}
        assert shares == {"blue": 25, "green": 75}


async def test_weights_in_force_are_the_table_the_data_plane_reads(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    blue = await upstreams.start("blue", responder=lambda r: ok_response(b"blue"))
    green = await upstreams.start("green", responder=lambda r: ok_response(b"green"))
    path = tmp_path / "laneswitch.yaml"
    path.write_text(config_text(blue.endpoint, green.endpoint, 100))
    async with server_from_file(path) as server:
        client = await Client.connect(server.addresses[0][1])
        await server.control.set_weights("shop", {"blue": 50, "green": 50})
        bodies = Counter([(await client.request(get())).body for _ in range(100)])
        assert bodies == {b"blue": 50, b"green": 50}
        await server.control.rollback("shop")
        bodies = Counter([(await client.request(get())).body for _ in range(10)])
        assert bodies == {b"blue": 10}
        await client.close()


async def test_unhealthy_version_refuses_a_switch_and_gets_503_when_forced(
    tmp_path: Path, upstreams: Upstreams
) -> None:
    def blue_respond(request):  # type: ignore[no-untyped-def]
        return ok_response(b"blue")

    def green_respond(request):  # type: ignore[no-untyped-def]
        if request.url == b"/healthz":
            return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        return ok_response(b"green")

    blue = await upstreams.start("blue", responder=blue_respond)
    green = await upstreams.start("green", responder=green_respond)
    path = tmp_path / "laneswitch.yaml"
    path.write_text(
        config_text(blue.endpoint, green.endpoint, 100)
        + "    health_check: {path: /healthz, interval: 100ms, timeout: 500ms}\n"
    )
    async with server_from_file(path) as server:
        control = server.control
        assert control.ready
        assert control.unhealthy == {("shop", "green", green.endpoint)}
        with pytest.raises(ControlError) as refused:
            await control.switch("shop", "green")
        assert refused.value.status == 409
        assert control.weights["shop"] == {"blue": 100, "green": 0}
        await control.switch("shop", "green", force=True)
        client = await Client.connect(server.addresses[0][1])
        async with asyncio.timeout(2):
            response = await client.request(get())
        assert response.status == 503
        assert response.header("Retry-After") is not None
        assert not [r for r in green.requests if r.url != b"/healthz"]
        await client.close()


async def test_a_repeated_switch_keeps_the_undo_point(tmp_path: Path) -> None:
    path = tmp_path / "laneswitch.yaml"
    path.write_text(config_text("127.0.0.1:9", "127.0.0.1:10", blue_weight=90))
    async with server_from_file(path) as server:
        control = server.control
        await control.switch("shop", "green", force=True)
        await control.switch("shop", "green", force=True)  # a no-op, still recorded
        await control.rollback("shop")
        assert control.weights["shop"] == {"blue": 90, "green": 10}
        actions = [(e.action, e.reason) for e in control.events.since(0)]
        assert actions[1] == ("switch", "no change")
        assert actions[2][0] == "rollback"
