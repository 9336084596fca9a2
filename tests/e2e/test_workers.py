"""Worker processes (`workers: N`): the `laneswitch` command run with two workers, as a user runs
it, under load; and the pieces (frames, counter deltas) on their own.

The end-to-end tests tell the workers apart by what the proxy itself reports: each worker counts
the connections it accepted and the requests it has in flight (`laneswitch_worker_*{worker}` in
/metrics), and the parent logs every worker's pid when it starts listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from proxy.config.loader import parse_config
from proxy.metrics import StatsRegistry
from proxy.routing.build import build_table
from proxy.routing.table import RouteTable
from proxy.workers.channel import MAX_MESSAGE_BYTES, TABLE, Channel, encode
from proxy.workers.counters import CounterTracker, fold
from proxy.workers.supervisor import WorkerPool, resolve_workers, usable_cores
from tests.helpers import (
    Client,
    RecordingUpstream,
    Response,
    get,
    raw_upstream,
    spawn_laneswitch,
)

# -- the pieces ------------------------------------------------------------------------------------


def test_counter_deltas_fold_into_the_same_totals() -> None:
    worker = StatsRegistry()
    tracker = CounterTracker(worker)
    parent = StatsRegistry()
    blue = worker.get("shop", "blue")
    blue.observe(200, 0.004)
    blue.observe(503, 0.2)
    blue.upstream_errors["connect"] += 1
    blue.in_flight = 3
    fold(parent, tracker.deltas())
    blue.observe(200, 0.002)
    blue.client_aborts += 1
    blue.drain_cut += 2
    fold(parent, tracker.deltas())
    got = parent.get("shop", "blue")
    assert got.requests == {200: 2, 503: 1}
    assert got.latency_buckets == blue.latency_buckets
    assert got.latency_count == 3 and got.latency_sum == pytest.approx(blue.latency_sum)
    assert got.upstream_errors["connect"] == 1
    assert (got.client_aborts, got.drain_cut) == (1, 2)
    assert got.in_flight == 0  # a gauge: the pool sums the workers' current values, fold doesn't
    assert tracker.deltas() == []  # nothing changed since the last report


def test_an_in_flight_change_alone_is_reported() -> None:
    worker = StatsRegistry()
    tracker = CounterTracker(worker)
    worker.get("shop", "blue").in_flight = 1
    (entry,) = tracker.deltas()
    assert entry.key == ("shop", "blue") and entry.latency_count == 0 and entry.in_flight == 1


def test_workers_setting() -> None:
    assert resolve_workers(3) == 3
    assert resolve_workers("auto") == usable_cores() == len(os.sched_getaffinity(0))


async def test_channel_frames_survive_any_split_and_refuse_oversized_ones() -> None:
    received: list[tuple[object, ...]] = []
    lost: list[bool] = []
    channel = Channel(received.append, lambda: lost.append(True))
    table = RouteTable(services=(), generation=7)
    stream = encode((TABLE, table)) + encode(("report", 1)) + encode(("stop", 2.5))
    for i in range(0, len(stream), 3):  # three bytes at a time
        channel.data_received(stream[i : i + 3])
    assert [m[0] for m in received] == [TABLE, "report", "stop"]
    first = received[0][1]
    assert isinstance(first, RouteTable) and first.generation == 7

    class Transport(asyncio.Transport):
        aborted = False

        def abort(self) -> None:
            self.aborted = True

    transport = Transport()
    channel.connection_made(transport)
    channel.data_received((MAX_MESSAGE_BYTES + 1).to_bytes(4, "big") + b"x")
    assert transport.aborted
    assert len(received) == 3


# -- running the command ---------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


class Proxy:
    """`laneswitch run` in its own process; its stderr is collected line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.new_line = asyncio.Event()
        self.reader = asyncio.create_task(self._read())
        self.port = 0
        self.admin = ""
        self.seen_workers: set[int] = set()

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.lines.append(line.decode(errors="replace"))
            self.new_line.set()

    async def line(self, pattern: str, start: int = 0, timeout: float = 15) -> re.Match[str]:
        """The first line from index `start` on that matches `pattern` (waiting for it)."""
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while True:
                for text in self.lines[start:]:
                    if found := regex.search(text):
                        return found
                if self.reader.done():
                    raise AssertionError(f"exited before logging {pattern!r}:\n{self.log}")
                self.new_line.clear()
                await self.new_line.wait()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid, from the latest "worker I (pid P) listening" line of each."""
        pids: dict[int, int] = {}
        for text in self.lines:
            if found := re.search(r"worker (\d+) \(pid (\d+)\) listening", text):
                pids[int(found.group(1))] = int(found.group(2))
        self.seen_workers.update(pids.values())
        return pids

    async def get(self, path: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.admin + path, timeout=aiohttp.ClientTimeout(total=5)) as response,
        ):
            return response.status, await response.text()

    async def post(self, path: str, body: dict[str, object]) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                self.admin + path, json=body, timeout=aiohttp.ClientTimeout(total=10)
            ) as response,
        ):
            return response.status, await response.text()

    async def metrics(self) -> dict[str, float]:
        """Every sample of GET /metrics, keyed by its name and labels as written."""
        status, text = await self.get("/metrics")
        assert status == 200
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    async def kill_tree(self) -> None:
        """SIGKILL the parent and every worker it ever had; wait until all are gone."""
        pids = {*children_of(self.process.pid), *self.seen_workers, *self.worker_pids().values()}
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(5):
            while any(running(pid) for pid in pids):
                await asyncio.sleep(0.02)
        # With every holder of the stderr pipe gone, the reader ends at its EOF and the pipe is
        # closed; cancelled instead, the pipe would be left open past the test's event loop.
        await asyncio.wait_for(self.reader, 5)


@contextlib.asynccontextmanager
async def laneswitch(config: Path, *args: str) -> AsyncIterator[Proxy]:
    process = await spawn_laneswitch("run", "-c", str(config), *args)
    proxy = Proxy(process)
    try:
        found = await proxy.line(r"admin API on 127\.0\.0\.1:(\d+)")
        proxy.admin = f"http://127.0.0.1:{found.group(1)}"
        found = await proxy.line(r"INFO laneswitch: listening on 127\.0\.0\.1:(\d+)")
        proxy.port = int(found.group(1))
        proxy.worker_pids()
        yield proxy
    finally:
        await proxy.kill_tree()


def write_config(tmp_path: Path, blue: str, green: str, extra: str = "") -> Path:
    config = tmp_path / "laneswitch.yaml"
    config.write_text(
        f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
drain_timeout: 3s
{extra}
services:
  shop:
    versions:
      blue: {{endpoints: ["{blue}"], weight: 100}}
      green: {{endpoints: ["{green}"], weight: 0}}
    version_header: X-App-Version
"""
    )
    return config


@dataclass
class Load:
    """Keep-alive clients sending GET / one after the other until `stop`."""

    port: int
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # (monotonic time the request was sent, its response)
    answered: list[tuple[float, Response]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    connections: int = 0
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    # A client whose connection failed connects again once this is set.
    reconnect: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.reconnect.set()

    async def client(self) -> None:
        client: Client | None = None
        try:
            while not self.stop.is_set():
                if client is None:
                    client = await Client.connect(self.port)
                    self.connections += 1
                sent_at = time.monotonic()
                try:
                    response = await client.request(get())
                except (ConnectionError, TimeoutError) as exc:
                    self.failures.append(repr(exc))
                    await client.close()
                    client = None
                    await self.reconnect.wait()
                    continue
                self.answered.append((sent_at, response))
                self.progress.set()
                if not response.complete or response.header("Connection") == b"close":
                    await client.close()
                    client = None
        finally:
            if client is not None:
                await client.close()

    async def answers(self, count: int, timeout: float = 15) -> None:
        """Wait until `count` more responses than now have arrived."""
        target = len(self.answered) + count
        async with asyncio.timeout(timeout):
            while len(self.answered) < target:
                self.progress.clear()
                await self.progress.wait()

    @contextlib.asynccontextmanager
    async def running(self, clients: int) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self.client()) for _ in range(clients)]
        try:
            yield self
        finally:
            self.stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)


def total(samples: dict[str, float], name: str) -> float:
    return sum(value for key, value in samples.items() if key.split("{")[0] == name)


@pytest.mark.timeout(60)
async def test_two_workers_share_connections_sum_counters_and_switch_without_errors(
    tmp_path: Path,
) -> None:
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    # The command line's --workers overrides the file's.
    config = write_config(tmp_path, blue.endpoint, green.endpoint, "workers: 1")
    try:
        async with laneswitch(config, "--workers", "2") as proxy:
            assert sorted(proxy.worker_pids()) == [0, 1]
            assert (await proxy.get("/readyz"))[0] == 200
            load = Load(proxy.port)
            async with load.running(clients=16):
                await load.answers(300)
                status, body = await proxy.post("/services/shop/switch", {"to": "green"})
                acked_at = time.monotonic()
                assert status == 200, body
                await load.answers(300)
            assert load.failures == []
            statuses = Counter(response.status for _, response in load.answered)
            assert statuses == {200: len(load.answered)}
            assert all(response.complete for _, response in load.answered)
            after = [r.header("X-App-Version") for sent, r in load.answered if sent > acked_at]
            assert len(after) >= 300
            assert set(after) == {b"green"}, "a request sent after the ack reached blue"
            assert blue.requests and green.requests

            samples = await proxy.metrics()
            assert total(samples, "laneswitch_requests_total") == len(load.answered)
            assert samples['laneswitch_requests_total{code="200",service="shop",version="green"}']
            assert total(samples, "laneswitch_in_flight_requests") == 0
            per_worker = [
                samples[f'laneswitch_worker_connections_total{{worker="{i}"}}'] for i in (0, 1)
            ]
            assert sum(per_worker) == load.connections == 16
            assert min(per_worker) > 0, f"one worker got every connection: {per_worker}"
            assert samples["laneswitch_worker_restarts_total"] == 0
    finally:
        await blue.stop()
        await green.stop()


@dataclass
class GatedUpstream:
    """Answers at once while the gate is open; while it is closed, holds each request."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            if not self.gate.is_set():
                self.held += 1
                self.changed.set()
                try:
                    await self.gate.wait()
                finally:
                    self.held -= 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            await writer.drain()

    async def wait_held(self, count: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while self.held < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.mark.timeout(60)
async def test_a_killed_worker_comes_back_and_only_its_in_flight_requests_fail(
    tmp_path: Path,
) -> None:
    upstream = GatedUpstream()
    upstream.gate.set()
    clients = 12
    async with raw_upstream(upstream.handle) as endpoint:
        config = write_config(tmp_path, endpoint, endpoint, "workers: 2")
        async with laneswitch(config) as proxy:
            load = Load(proxy.port)
            async with load.running(clients):
                await load.answers(200)
                # Hold every client's next request at the upstream: all are in flight.
                upstream.gate.clear()
                await upstream.wait_held(clients)
                samples = await proxy.metrics()
                in_flight = [
                    int(samples[f'laneswitch_worker_in_flight_requests{{worker="{i}"}}'])
                    for i in (0, 1)
                ]
                assert sum(in_flight) == clients
                victim = 0 if in_flight[0] >= in_flight[1] else 1
                pids = proxy.worker_pids()
                mark = len(proxy.lines)
                # Clients of the killed worker reconnect once the parent has seen it die: by
                # then its listening socket is closed. A connection the kernel queues on the
                # listener of a dying process is lost with it (see docs/workers.md).
                load.reconnect.clear()
                os.kill(pids[victim], signal.SIGKILL)
                await proxy.line(
                    rf"worker {victim} \(pid {pids[victim]}\) was killed by SIGKILL", mark
                )
                load.reconnect.set()
                upstream.gate.set()
                await load.answers(50)  # the other worker serves meanwhile
                found = await proxy.line(rf"worker {victim} \(pid (\d+)\) listening", mark)
                assert int(found.group(1)) != pids[victim]
                proxy.worker_pids()
                await load.answers(300)
            assert len(load.failures) == in_flight[victim], (load.failures, in_flight)
            assert {r.status for _, r in load.answered} == {200}
            samples = await proxy.metrics()
            assert samples["laneswitch_worker_restarts_total"] == 1
            assert samples[f'laneswitch_worker_up{{worker="{victim}"}}'] == 1
            assert (await proxy.get("/readyz"))[0] == 200
            assert not running(pids[victim])


@pytest.mark.timeout(60)
async def test_sigterm_with_two_workers_answers_every_in_flight_request(tmp_path: Path) -> None:
    upstream = GatedUpstream()
    clients = 16
    async with raw_upstream(upstream.handle) as endpoint:
        config = write_config(tmp_path, endpoint, endpoint, "workers: 2")
        async with laneswitch(config) as proxy:
            pids = proxy.worker_pids()
            connections = [await Client.connect(proxy.port) for _ in range(clients)]
            for client in connections:
                await client.send(get())
            await upstream.wait_held(clients)
            samples = await proxy.metrics()
            in_flight = [
                samples[f'laneswitch_worker_in_flight_requests{{worker="{i}"}}'] for i in (0, 1)
            ]
            assert sum(in_flight) == clients and min(in_flight) > 0, in_flight
            stopped_at = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            await proxy.line(r"SIGTERM: draining")
            # Both workers stop accepting (the parent's reserved socket does not listen)...
            async with asyncio.timeout(3):
                while await accepts(proxy.port):
                    await asyncio.sleep(0.02)
            # ... and still answer what they had in flight.
            upstream.gate.set()
            responses = await asyncio.gather(*(client.response() for client in connections))
            assert [r.status for r in responses] == [200] * clients
            assert all(r.header("Connection") == b"close" for r in responses)
            assert await asyncio.wait_for(proxy.process.wait(), 3 + 1) == 0
            assert time.monotonic() - stopped_at < 3 + 1
            assert not any(running(pid) for pid in pids.values())
            assert "stopped (0 request(s) cut" in proxy.log
            await asyncio.gather(*(client.close() for client in connections))


async def accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def test_readiness_follows_the_workers_and_a_dead_one_is_replaced() -> None:
    config = parse_config(
        """
services:
  shop:
    versions:
      v1: {endpoints: ["127.0.0.1:9"], weight: 100}
""",
        env={},
    )
    changes: list[bool] = []
    changed = asyncio.Event()

    def on_ready(ready: bool) -> None:
        changes.append(ready)
        changed.set()

    pool = WorkerPool(
        2,
        [("127.0.0.1", 0)],
        build_table(config, generation=1),
        StatsRegistry(),
        backlog=16,
        on_ready=on_ready,
    )
    try:
        await pool.start()
        assert changes == [True] and pool.ready
        first = pool.slots[1].link
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        async with asyncio.timeout(15):
            while changes != [True, False, True]:
                changed.clear()
                await changed.wait()
        assert pool.restarts == 1 and pool.slots[1].restarts == 1
        second = pool.slots[1].link
        assert second is not None and second.pid != first.pid
        # A table pushed now is applied by both before the ack returns.
        pool.push(build_table(config, generation=2))
        await pool.wait_applied(2)
        assert [link.applied for link in pool.links()] == [2, 2]
    finally:
        await pool.kill_all()
    assert not any(link.alive for link in [first, second])


async def test_a_taken_port_stops_the_start_cleanly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "laneswitch.yaml"
        config.write_text(
            f"""
listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:0}}
workers: 2
services:
  shop:
    versions:
      v1: {{endpoints: ["127.0.0.1:9"], weight: 100}}
"""
        )
        process = await spawn_laneswitch("run", "-c", str(config))
        try:
            _, err = await asyncio.wait_for(process.communicate(), 15)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 1
        assert "cannot start" in err.decode() and "Address already in use" in err.decode()
        assert "worker 0" not in err.decode()  # the parent found out before starting any


async def test_workers_flag_is_validated() -> None:
    process = await spawn_laneswitch("run", "--workers", "0")
    _, err = await asyncio.wait_for(process.communicate(), 15)
    assert process.returncode == 2
    assert 'must be an integer >= 1 or "auto"' in err.decode()
