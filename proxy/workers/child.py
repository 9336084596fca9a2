"""A worker process (`workers: N`, N > 1): one `DataPlane` on its own `SO_REUSEPORT` listeners.

It is steered by the parent over a socketpair (`proxy.workers.channel` has the messages).
Started by the parent as `python -m proxy.workers.child --channel-fd FD --parent-pid PID --index I`.
It reads no config: the listen addresses come in the INIT message, everything else with the
route tables. It ignores SIGINT and SIGHUP (the terminal sends them to the whole process group;
the parent decides), stops gracefully on SIGTERM or a STOP message, and when the parent goes
away (PR_SET_PDEATHSIG on Linux, and EOF on the channel anywhere) it drains and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import uvloop

from proxy.http.plane import DataPlane
from proxy.http.protocol import DownstreamProtocol
from proxy.routing.table import RouteTable
from proxy.workers.channel import (
    APPLIED,
    COUNTERS,
    INIT,
    LISTENING,
    LOADED,
    MAX_CHANNEL_BACKLOG,
    REPORT,
    REPORT_INTERVAL,
    SERVE,
    STOP,
    STOPPED,
    TABLE,
    Channel,
)
from proxy.workers.counters import CounterTracker

log = logging.getLogger("laneswitch.worker")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# How long the last report may take to reach the parent before the worker exits anyway.
FINAL_REPORT_TIMEOUT = 1.0
# Exit code when a listener cannot be bound (the parent restarts the worker later).
EXIT_CANNOT_LISTEN = 3


class Worker:
    """The worker's event-loop side: applies tables, serves, reports, stops."""

    def __init__(self, sock: socket.socket) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.channel = Channel(self.on_message, self.on_channel_lost)
        self.plane: DataPlane | None = None
        self.tracker: CounterTracker | None = None
        self.index = -1
        self.addresses: list[tuple[str, int]] = []
        self.backlog = 1024
        self.listeners: list[asyncio.Server] = []
        self.accepted = 0  # connections accepted since the last report
        self.stopping = False
        self.done: asyncio.Future[int] = self.loop.create_future()
        self.reporter: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        """Serve until stopped; the process's exit code."""
        await self.loop.create_unix_connection(lambda: self.channel, sock=self.sock)
        self.loop.add_signal_handler(signal.SIGTERM, self.on_sigterm)
        try:
            return await self.done
        finally:
            self.loop.remove_signal_handler(signal.SIGTERM)

    def finish(self, code: int) -> None:
        if not self.done.done():
            self.done.set_result(code)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- messages ---------------------------------------------------------------------------------

    def on_message(self, message: tuple[Any, ...]) -> None:
        tag = message[0]
        if tag == TABLE:
            self.install(message[1])
        elif tag == REPORT:
            self.report(message[1])
        elif tag == INIT:
            _, self.index, addresses, self.backlog = message
            self.addresses = [(str(host), int(port)) for host, port in addresses]
        elif tag == SERVE:
            self.spawn(self.serve())
        elif tag == STOP:
            self.spawn(self.stop(float(message[1])))
        else:
            log.warning("unknown message %r", tag)

    def install(self, table: RouteTable) -> None:
        """Apply `table` unless an equal or newer one is in force; ack what is in force."""
        plane = self.plane
        if plane is None:
            plane = self.plane = DataPlane(self.loop, table)
            self.tracker = CounterTracker(plane.stats)
            self.channel.send((APPLIED, table.generation))
            self.channel.send((LOADED,))
            return
        if table.generation > plane.table.generation:
            plane.install(table)
        self.channel.send((APPLIED, plane.table.generation))

    def report(self, seq: int = 0) -> None:
        """Send the counters' deltas (an answer to REPORT `seq`, or 0 when periodic)."""
        if self.channel.backlog > MAX_CHANNEL_BACKLOG:
            return  # the parent is not reading: the deltas keep adding up until it does
        entries = self.tracker.deltas() if self.tracker is not None else []
        if seq or entries or self.accepted:
            self.channel.send((COUNTERS, seq, entries, self.accepted))
            self.accepted = 0

    def _periodic_report(self) -> None:
        self.report()
        self.reporter = self.loop.call_later(REPORT_INTERVAL, self._periodic_report)

    # -- serving ----------------------------------------------------------------------------------

    async def serve(self) -> None:
        plane = self.plane
        if plane is None or self.stopping:
            return
        protocol = plane.protocol

        def accept() -> DownstreamProtocol:
            self.accepted += 1
            return protocol()

        for host, port in self.addresses:
            try:
                listener = await self.loop.create_server(
                    accept,
                    host,
                    port,
                    reuse_address=True,
                    reuse_port=True,
                    backlog=self.backlog,
                )
            except OSError as exc:
                log.error("cannot listen on %s:%d: %s", host, port, exc)
                for bound in self.listeners:
                    bound.close()
                self.finish(EXIT_CANNOT_LISTEN)
                return
            self.listeners.append(listener)
        if self.stopping:
            for listener in self.listeners:
                listener.close()
            return
        plane.start_ticker()
        self.reporter = self.loop.call_later(REPORT_INTERVAL, self._periodic_report)
        self.channel.send((LISTENING, self.addresses))

    # -- stopping ---------------------------------------------------------------------------------

    def on_sigterm(self) -> None:
        self.spawn(self.stop(self._drain_timeout()))

    def on_channel_lost(self) -> None:
        if not self.stopping:
            log.warning("the parent is gone: draining and exiting")
            self.spawn(self.stop(self._drain_timeout()))

    def _drain_timeout(self) -> float:
        return self.plane.table.settings.drain_timeout if self.plane is not None else 0.0

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting, let in-flight requests finish up to `drain_timeout` (keep-alive
        clients get `Connection: close`), cut what is left, report, exit 0."""
        if self.stopping:
            return
        self.stopping = True
        for listener in self.listeners:
            listener.close()
        cut = 0
        plane = self.plane
        if plane is not None:
            plane.begin_drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(plane.drained.wait(), drain_timeout)
            cut = plane.cut_all()
            plane.stop_ticker()
            plane.stop_drains()
            plane.pools.close()
        if self.reporter is not None:
            self.reporter.cancel()
        if self.channel.open:
            self.report()
            self.channel.send((STOPPED, cut))
            self.channel.close()  # after what is queued has been written
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.channel.lost), FINAL_REPORT_TIMEOUT)
        self.finish(0)


def die_with_parent(parent_pid: int) -> bool:
    """Ask Linux to SIGTERM us when the parent dies; False if it is already gone."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent_pid


async def _run(sock: socket.socket) -> int:
    return await Worker(sock).run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="laneswitch-worker")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not die_with_parent(args.parent_pid):
        return 1
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s [worker {args.index} pid %(process)d]: "
        "%(message)s",
        stream=sys.stderr,
    )
    sock = socket.socket(fileno=args.channel_fd)
    code: int = uvloop.run(_run(sock))
    return code


if __name__ == "__main__":
    sys.exit(main())
