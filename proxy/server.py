"""Wiring: config -> route table -> data plane listeners; signals and the graceful stop.

`Server` owns one process's data plane. It binds the listeners, swaps route tables in, and on
stop closes the listeners, lets in-flight exchanges finish within `drain_timeout` and then cuts
what is left, counting every cut request against its version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from proxy.config.model import Config, parse_endpoint
from proxy.http.protocol import DataPlane
from proxy.metrics import StatsRegistry
from proxy.routing.build import build_table
from proxy.routing.table import RouteTable

log = logging.getLogger("laneswitch")

# Pending connections the kernel queues per listener before accepting; nginx's default is 511.
LISTEN_BACKLOG = 1024


class Server:
    def __init__(self, config: Config, stats: StatsRegistry | None = None) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.generation = 1
        self.plane = DataPlane(self.loop, build_table(config, generation=self.generation), stats)
        self.listeners: list[asyncio.Server] = []

    @property
    def table(self) -> RouteTable:
        return self.plane.table

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) of every listener (useful with port 0)."""
        found: list[tuple[str, int]] = []
        for listener in self.listeners:
            for sock in listener.sockets:
                host, port = sock.getsockname()[:2]
                found.append((host, port))
        return found

    async def start(self) -> None:
        for address in self.config.listen:
            host, port = parse_endpoint(address)
            listener = await self.loop.create_server(
                self.plane.protocol, host, port, reuse_address=True, backlog=LISTEN_BACKLOG
            )
            self.listeners.append(listener)
        self.plane.start_ticker()
        log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in self.addresses))

    def install(self, table: RouteTable) -> None:
        self.plane.install(table)

    async def stop(self, drain_timeout: float | None = None) -> int:
        """Stop accepting, drain, cut what is left. Returns how many requests were cut."""
        if drain_timeout is None:
            drain_timeout = self.config.drain_timeout
        for listener in self.listeners:
            listener.close()
        self.plane.begin_drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.plane.drained.wait(), drain_timeout)
        cut = self.plane.cut_all()
        self.plane.stop_ticker()
        self.plane.pools.close()
        for listener in self.listeners:
            await listener.wait_closed()
        return cut


async def run(config: Config) -> None:
    """Run the proxy of `config` until SIGTERM/SIGINT."""
    server = Server(config)
    await server.start()
    await serve_until_signalled(server)


async def serve_until_signalled(server: Server) -> None:
    """Wait for SIGTERM/SIGINT, then stop gracefully; a second signal stops at once."""
    stop = asyncio.Event()
    signals = 0
    drain_timeout = server.config.drain_timeout

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s: draining (up to %ss)", signal.Signals(signum).name, drain_timeout)
            stop.set()
        else:
            log.warning("second signal: stopping now")
            server.plane.cut_all()
            raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        server.loop.add_signal_handler(signum, on_signal, signum)
    try:
        await stop.wait()
        cut = await server.stop()
        log.info("stopped (%d request(s) cut at the drain timeout)", cut)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            server.loop.remove_signal_handler(signum)
