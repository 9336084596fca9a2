"""The parent's side of worker processes: start, supervise, restart, push tables, fold counters."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from proxy.metrics import StatsRegistry
from proxy.routing.table import RouteTable
from proxy.workers.channel import (
    APPLIED,
    COUNTERS,
    INIT,
    LISTENING,
    LOADED,
    REPORT,
    SERVE,
    STOP,
    STOPPED,
    TABLE,
    Channel,
    encode,
)
from proxy.workers.counters import CounterDelta, StatsKey, fold
from proxy.workers.link import ADMITTED, WorkerLink, WorkerSlot, WorkerState

log = logging.getLogger("laneswitch.workers")

# How long a scrape waits for fresh counters from the workers before serving what it has.
REFRESH_TIMEOUT = 0.2
# How long a change waits for every worker to apply its table; a worker that has not by then is
# killed and restarted with the table in force, so "acknowledged" keeps its meaning.
ACK_TIMEOUT = 5.0
# How long the first start of all workers may take (process start, imports, bind).
START_TIMEOUT = 30.0
# After SIGTERM: how long past drain_timeout a worker may take to exit before it is killed.
STOP_GRACE = 0.5
# Restart delays for a worker that keeps dying young: from the first to the last, doubling.
RESTART_DELAY_MIN = 0.1
RESTART_DELAY_MAX = 5.0
# A worker whose channel closed but whose process still runs after this long (s) is killed.
CHANNEL_LOST_GRACE = 1.0
# A worker that lived this long (seconds) is restarted at once; the delay starts over.
STABLE_AFTER = 5.0


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask), for `workers: auto`."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(setting: int | str) -> int:
    """A `workers` setting (N or "auto") as a number of processes."""
    if setting == "auto":
        return usable_cores()
    return int(setting)


class WorkerStartError(Exception):
    """The workers could not all start (e.g. a listener could not be bound)."""


class WorkerPool:
    """N worker processes, their channels and their supervision."""

    def __init__(
        self,
        count: int,
        listen: Sequence[tuple[str, int]],
        table: RouteTable,
        stats: StatsRegistry,
        *,
        backlog: int,
        on_ready: Callable[[bool], None] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError("a pool needs at least one worker")
        self.loop = asyncio.get_running_loop()
        self.count = count
        self.listen = list(listen)
        self.stats = stats
        self.backlog = backlog
        self.on_ready = on_ready
        self.slots = [WorkerSlot(i) for i in range(count)]
        self.addresses: list[tuple[str, int]] = []  # what the workers bind (ports resolved)
        self.generation = table.generation
        self._table_frame = encode((TABLE, table))
        self._reservations: list[socket.socket] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._report_seq = 0
        self._started = False
        self._stopping = False
        self._start_failure: str | None = None
        self._ready = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._restarts: dict[int, asyncio.TimerHandle] = {}

    # -- reading ------------------------------------------------------------------------------

    @property
    def restarts(self) -> int:
        return sum(slot.restarts for slot in self.slots)

    @property
    def ready(self) -> bool:
        """Every worker is up and has bound its listeners."""
        return all(slot.up for slot in self.slots)

    def links(self) -> list[WorkerLink]:
        return [s.link for s in self.slots if s.link is not None and s.link.alive]

    def _admitted(self) -> list[WorkerLink]:
        return [link for link in self.links() if link.state in ADMITTED]

    # -- start and stop ------------------------------------------------------------------------

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Reserve the listen addresses, start every worker, wait until all are listening.

        Raises OSError when an address cannot be bound, WorkerStartError when a worker exits
        before listening or they are not all listening within `timeout`.
        """
        self._reserve()
        try:
            for slot in self.slots:
                await self._spawn(slot)
            done = await self._wait_for(
                lambda: self.ready or self._start_failure is not None, timeout
            )
            if self._start_failure is not None:
                raise WorkerStartError(self._start_failure)
            if not done:
                raise WorkerStartError(f"the workers were not all listening after {timeout:g}s")
        except BaseException:
            await self.kill_all()
            raise
        self._started = True

    def _reserve(self) -> None:
        """Bind (without listening) one SO_REUSEPORT socket per address, in the parent.

        It resolves port 0 to one port that every worker then binds, keeps the port ours while
        workers restart, and makes a taken address fail here, before any worker starts. A socket
        that does not listen takes no connections: the kernel spreads them over the workers'.
        """
        for host, port in self.listen:
            infos = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            seen: set[tuple[int, str]] = set()
            chosen = port
            for family, kind, proto, _, sockaddr in infos:
                ip = str(sockaddr[0])
                if (family, ip) in seen:
                    continue
                seen.add((family, ip))
                sock = socket.socket(family, kind, proto)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind((ip, chosen, *sockaddr[2:]))
                except BaseException:
                    sock.close()
                    self.close_reservations()
                    raise
                chosen = sock.getsockname()[1]
                self._reservations.append(sock)
                self.addresses.append((ip, chosen))

    def close_reservations(self) -> None:
        for sock in self._reservations:
            sock.close()
        self._reservations.clear()

    def begin_stop(self) -> None:
        """No more restarts from now on (called from the signal handler, before `stop()`, so
        that workers which got the same SIGTERM from their process group are not replaced)."""
        self._stopping = True
        for timer in self._restarts.values():
            timer.cancel()
        self._restarts.clear()
        self._set_ready()

    async def stop(self, drain_timeout: float) -> int:
        """Graceful stop of every worker (each drains up to `drain_timeout`); a worker still
        running `STOP_GRACE` after that is killed. Returns the requests cut at the bound."""
        self.begin_stop()
        for link in self.links():
            link.state = WorkerState.STOPPING
            link.send((STOP, drain_timeout))
        links = [s.link for s in self.slots if s.link is not None]
        exited = await self._wait_for(
            lambda: not any(link.alive for link in links), drain_timeout + STOP_GRACE
        )
        if not exited:
            for link in links:
                if link.alive:
                    log.warning(
                        "worker %d (pid %d) did not stop: killing it", link.slot.index, link.pid
                    )
            await self.kill_all()
        self.close_reservations()
        return sum(link.cut for link in links)

    async def kill_all(self) -> None:
        """SIGKILL every worker and wait (briefly) for them to be gone."""
        self._stopping = True
        for timer in self._restarts.values():
            timer.cancel()
        self._restarts.clear()
        links = self.links()
        for link in links:
            link.kill()
        await self._wait_for(lambda: not any(link.alive for link in links), 2.0)
        self.close_reservations()

    def kill_now(self) -> None:
        """From a signal handler: SIGKILL every worker, no waiting."""
        self._stopping = True
        for link in self.links():
            link.kill()

    # -- processes -----------------------------------------------------------------------------

    async def _spawn(self, slot: WorkerSlot) -> None:
        parent_end, child_end = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy.workers.child",
                "--channel-fd",
                str(child_end.fileno()),
                "--parent-pid",
                str(os.getpid()),
                "--index",
                str(slot.index),
                pass_fds=(child_end.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=_child_env(),
            )
        except OSError as exc:
            parent_end.close()
            log.error("worker %d: cannot start a process: %s", slot.index, exc)
            if self._started:
                self._schedule_restart(slot)
            else:
                self._start_failure = f"worker {slot.index}: cannot start a process: {exc}"
                self._notify()
            return
        finally:
            child_end.close()
        link = WorkerLink(slot, process)
        slot.link = link
        channel = Channel(
            lambda message: self._on_message(link, message), lambda: self._on_channel_lost(link)
        )
        link.channel = channel
        await self.loop.create_unix_connection(lambda: channel, sock=parent_end)
        link.send((INIT, slot.index, self.addresses, self.backlog))
        link.send_frame(self._table_frame)
        task = self.loop.create_task(self._watch(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, link: WorkerLink) -> None:
        code = await link.process.wait()
        self._exited(link, code)

    def _exited(self, link: WorkerLink, code: int) -> None:
        slot = link.slot
        link.state = WorkerState.EXITED
        if link.channel is not None:
            link.channel.abort()
        self._sum_in_flight(list(link.in_flight))
        self._set_ready()
        self._notify()
        how = _describe_exit(code)
        if self._stopping:
            level = logging.INFO if code == 0 else logging.WARNING
            log.log(level, "worker %d (pid %d) %s", slot.index, link.pid, how)
            return
        if not self._started:
            self._start_failure = (
                f"worker {slot.index} (pid {link.pid}) {how} before listening (see its log)"
            )
            log.error("%s", self._start_failure)
            self._notify()
            return
        slot.restarts += 1
        lived = time.monotonic() - link.started_at
        if lived >= STABLE_AFTER:
            slot.delay = 0.0  # not a crash loop: back at once
        log.error(
            "worker %d (pid %d) %s after %.1fs (%d in flight): restarting it%s",
            slot.index,
            link.pid,
            how,
            lived,
            link.total_in_flight,
            f" in {slot.delay:g}s" if slot.delay else "",
        )
        self._schedule_restart(slot)

    def _schedule_restart(self, slot: WorkerSlot) -> None:
        delay = slot.delay
        slot.delay = min(max(delay * 2, RESTART_DELAY_MIN), RESTART_DELAY_MAX)
        self._restarts[slot.index] = self.loop.call_later(delay, self._restart, slot)

    def _restart(self, slot: WorkerSlot) -> None:
        self._restarts.pop(slot.index, None)
        if self._stopping:
            return
        task = self.loop.create_task(self._spawn(slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_channel_lost(self, link: WorkerLink) -> None:
        # Usually the worker has just died and its exit is about to be seen; one whose channel
        # broke while it lives cannot be steered, so it is replaced.
        if link.alive:
            self.loop.call_later(CHANNEL_LOST_GRACE, self._channel_lost_check, link)

    def _channel_lost_check(self, link: WorkerLink) -> None:
        if link.alive and link.state is not WorkerState.STOPPING:
            log.error("worker %d (pid %d): channel closed; killing it", link.slot.index, link.pid)
            link.kill()

    # -- messages ------------------------------------------------------------------------------

    def _on_message(self, link: WorkerLink, message: tuple[Any, ...]) -> None:
        tag = message[0]
        if tag == COUNTERS:
            _, seq, entries, connections = message
            self._fold(link, entries, connections)
            if seq > link.answered:
                link.answered = seq
                self._notify()
        elif tag == APPLIED:
            if message[1] > link.applied:
                link.applied = message[1]
                self._notify()
        elif tag == LOADED:
            if link.state is WorkerState.STARTING and not self._stopping:
                # Every table pushed so far is ahead of this message in the stream.
                link.state = WorkerState.JOINING
                link.send((SERVE,))
        elif tag == LISTENING:
            if link.state is WorkerState.JOINING:
                link.state = WorkerState.LISTENING
                bound = ", ".join(f"{h}:{p}" for h, p in message[1])
                log.info("worker %d (pid %d) listening on %s", link.slot.index, link.pid, bound)
                self._set_ready()
                self._notify()
        elif tag == STOPPED:
            link.cut = message[1]
        else:
            log.warning("worker %d: unknown message %r", link.slot.index, tag)

    def _fold(self, link: WorkerLink, entries: list[CounterDelta], connections: int) -> None:
        link.slot.connections += connections
        if not entries:
            return
        fold(self.stats, entries)
        keys: list[StatsKey] = []
        for delta in entries:
            link.in_flight[delta.key] = delta.in_flight
            keys.append(delta.key)
        self._sum_in_flight(keys)

    def _sum_in_flight(self, keys: list[StatsKey]) -> None:
        """in_flight is a gauge: the parent's value is the sum of the live workers' values."""
        links = self.links()
        for key in keys:
            self.stats.get(*key).in_flight = sum(link.in_flight.get(key, 0) for link in links)

    def _set_ready(self) -> None:
        ready = self.ready and not self._stopping
        if ready != self._ready:
            self._ready = ready
            if self.on_ready is not None:
                self.on_ready(ready)

    # -- the control plane's hooks -------------------------------------------------------------

    def push(self, table: RouteTable) -> None:
        """`ControlPlane.table_subscribers`: send a new table to every worker (pickled once)."""
        self.generation = table.generation
        self._table_frame = encode((TABLE, table))
        for link in self.links():
            link.send_frame(self._table_frame)

    async def wait_applied(self, generation: int) -> None:
        """`ControlPlane.table_acks`: return once every worker that may place requests has
        applied `generation` (or a later table). A worker that has not within ACK_TIMEOUT is
        killed (and restarted with the table in force), so no worker serves the old table."""

        def applied() -> bool:
            return all(link.applied >= generation for link in self._admitted())

        if await self._wait_for(applied, ACK_TIMEOUT):
            return
        late = [link for link in self._admitted() if link.applied < generation]
        for link in late:
            log.error(
                "worker %d (pid %d) did not apply table %d within %gs: restarting it",
                link.slot.index,
                link.pid,
                generation,
                ACK_TIMEOUT,
            )
            link.kill()
        await self._wait_for(lambda: not any(link.alive for link in late), 2.0)

    async def refresh(self, timeout: float = REFRESH_TIMEOUT) -> bool:
        """Ask every serving worker for its counters now and wait (up to `timeout`) for the
        answers, so a scrape sees what was answered before it. False if some did not answer."""
        self._report_seq += 1
        seq = self._report_seq
        links = self._admitted()
        for link in links:
            link.send((REPORT, seq))
        return await self._wait_for(
            lambda: all(link.answered >= seq or not link.alive for link in links), timeout
        )

    # -- waiting -------------------------------------------------------------------------------

    async def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` holds (re-checked on every worker event); False on timeout."""
        if predicate():
            return True
        future: asyncio.Future[None] = self.loop.create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await future
            return True
        except TimeoutError:
            return predicate()
        finally:
            self._waiters.remove(entry)

    def _notify(self) -> None:
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _child_env() -> dict[str, str]:
    """The environment of a worker: ours, with this package importable from anywhere."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not path else f"{root}{os.pathsep}{path}"
    return env
