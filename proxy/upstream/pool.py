"""Keep-alive connections to upstream endpoints, one pool per endpoint.

Hand-out and return are plain state transitions with no awaiting; only opening a new connection
awaits. Retiring an endpoint (after a switch or a reload) bumps the pool's generation: idle
connections close at once and busy ones close when their exchange ends instead of coming back.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque

from proxy.routing.table import Endpoint
from proxy.upstream.connection import IDLE, UpstreamConnection

# Idle connections kept per endpoint: bounds the sockets and memory a traffic burst leaves behind.
MAX_IDLE_PER_ENDPOINT = 256

# How often idle connections are checked for expiry.
SWEEP_INTERVAL = 1.0


class UpstreamPool:
    __slots__ = ("busy", "endpoint", "generation", "idle", "idle_timeout", "loop")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, endpoint: Endpoint, idle_timeout: float
    ) -> None:
        self.loop = loop
        self.endpoint = endpoint
        self.idle_timeout = idle_timeout
        self.generation = 0
        self.idle: deque[UpstreamConnection] = deque()
        self.busy: set[UpstreamConnection] = set()

    def __repr__(self) -> str:
        return (
            f"<UpstreamPool {self.endpoint.key} idle={len(self.idle)} busy={len(self.busy)} "
            f"gen={self.generation}>"
        )

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection that is still good, now ACTIVE; else None."""
        idle = self.idle
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # LIFO: the warmest connection, the least likely to be closed
            if conn.state is IDLE and now - conn.idle_since < self.idle_timeout:
                conn.take()
                self.busy.add(conn)
                return conn
            conn.close()
        return None

    async def connect(self, within: float) -> UpstreamConnection:
        """A new ACTIVE connection within `within` seconds; raises OSError or TimeoutError."""
        endpoint = self.endpoint
        async with asyncio.timeout(within):
            transport, conn = await self.loop.create_connection(
                lambda: UpstreamConnection(self, self.generation, endpoint.key),
                endpoint.host,
                endpoint.port,
            )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.take()
        self.busy.add(conn)
        return conn

    def put_idle(self, conn: UpstreamConnection) -> None:
        self.busy.discard(conn)
        if conn.generation != self.generation or len(self.idle) >= MAX_IDLE_PER_ENDPOINT:
            conn.close()
            return
        conn.park(time.monotonic())
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """`conn` closed: it is in neither set any more."""
        self.busy.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def sweep(self, now: float) -> None:
        """Close idle connections past the idle timeout (oldest are at the left)."""
        idle = self.idle
        while idle and now - idle[0].idle_since >= self.idle_timeout:
            idle.popleft().close()

    def retire(self) -> None:
        """Stop reusing every current connection: idle ones close now, busy ones after use."""
        self.generation += 1
        while self.idle:
            self.idle.popleft().close()


class UpstreamPools:
    """Every endpoint's pool in this process, with the periodic idle sweep."""

    __slots__ = ("_sweeper", "idle_timeout", "loop", "pools")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float) -> None:
        self.loop = loop
        self.idle_timeout = idle_timeout
        self.pools: dict[str, UpstreamPool] = {}  # by endpoint key
        self._sweeper: asyncio.TimerHandle | None = None

    def get(self, endpoint: Endpoint) -> UpstreamPool:
        pool = self.pools.get(endpoint.key)
        if pool is None:
            pool = self.pools[endpoint.key] = UpstreamPool(self.loop, endpoint, self.idle_timeout)
            if self._sweeper is None:
                self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        return pool

    def set_idle_timeout(self, seconds: float) -> None:
        self.idle_timeout = seconds
        for pool in self.pools.values():
            pool.idle_timeout = seconds

    def retire(self, endpoints: set[Endpoint]) -> None:
        for endpoint in endpoints:
            pool = self.pools.get(endpoint.key)
            if pool is not None:
                pool.retire()

    def drop(self, keys: set[str]) -> None:
        """Forget the pools of endpoints no table names any more (removed by a reload): their
        idle connections close now, busy ones when their exchange ends (they still hold their
        pool, whose generation no longer matches), and the pool itself is let go."""
        for key in keys:
            pool = self.pools.pop(key, None)
            if pool is not None:
                pool.retire()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for pool in self.pools.values():
            pool.retire()

    def _sweep(self) -> None:
        now = time.monotonic()
        for pool in self.pools.values():
            pool.sweep(now)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
