"""Wiring: config -> control plane -> data plane listeners, admin API, signals, graceful stop.

Health checks and reloads are started here too.

Start-up order matters to a load balancer in front: the admin API comes up first (so /healthz
answers and /readyz says 503), then the first round of health checks, then the data listeners;
/readyz turns 200 only then. On stop it is the reverse: /readyz goes 503, the listeners close,
keep-alive clients are told `Connection: close`, in-flight work gets `drain_timeout`, then what is
left is cut and counted.

The control plane publishes each new table to its subscribers: this process's `DataPlane`, or,
with `workers: N` (N > 1), a `WorkerPool` that runs the data plane in N processes. This process
is then the control plane only, with no data plane of its own: the pool pushes every new table
to the workers (`table_subscribers`), holds back each acknowledgement until every worker has
applied the change (`table_acks`), feeds the workers' counters into this process's stats, and
`/readyz` is 200 only while every worker is listening. The rollout manager is built here too,
on the control plane, and handed to it (the two never import each other).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
from typing import TYPE_CHECKING

from proxy.admin.server import AdminServer, start_admin
from proxy.config.model import Config
from proxy.config.scalars import parse_endpoint
from proxy.control import ControlPlane
from proxy.health import HealthChecker, targets_from_config
from proxy.history import HISTORY_STEP
from proxy.http.plane import DataPlane
from proxy.metrics import StatsRegistry
from proxy.rollout.manager import RolloutManager
from proxy.routing.table import RouteTable
from proxy.state import load_state
from proxy.watch import ConfigWatcher
from proxy.workers.supervisor import WorkerPool, resolve_workers

if TYPE_CHECKING:
    from proxy.fleet.coordinator import FleetCoordinator

log = logging.getLogger("laneswitch")

# Pending connections the kernel queues per listener before accepting; nginx's default is 511.
LISTEN_BACKLOG = 1024


class ListenError(Exception):
    """An address of the config could not be bound: the field, the address and why, in one
    line (e.g. `listen 127.0.0.1:8080: Address already in use`)."""

    def __init__(self, field: str, address: str, exc: OSError) -> None:
        self.field = field  # "listen" or "admin.listen"
        self.address = address
        self.in_use = exc.errno == errno.EADDRINUSE
        # uvloop's message repeats the address; the errno's own text is the reason.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        super().__init__(f"{field} {address}: {reason}")


class Server:
    def __init__(
        self,
        config: Config,
        stats: StatsRegistry | None = None,
        *,
        config_path: str | None = None,
        config_text: str = "",
        workers: int | str | None = None,
    ) -> None:
        """`workers` (N or "auto") overrides the config's `workers` (the command line's)."""
        self.config = config
        self.workers_override = workers
        self.workers = resolve_workers(workers if workers is not None else config.workers)
        self.loop = asyncio.get_running_loop()
        self.stats = stats if stats is not None else StatsRegistry()
        self.control = ControlPlane(
            config, self.stats, config_path=config_path, config_text=config_text
        )
        # Progressive rollouts: their timers, decisions and run state.
        self.rollouts = RolloutManager(self.control)
        self.control.rollouts = self.rollouts
        # Fleet mode: this process is a member; its coordinator is the control plane's backend
        # before anything is restored, so no rollout timer starts on a member that does not lead.
        self.coordinator: FleetCoordinator | None = None
        if config.fleet is not None:
            from proxy.fleet.coordinator import FleetCoordinator

            self.coordinator = FleetCoordinator(self.control, config.fleet)
            self.control.backend = self.coordinator
        self.listeners: list[asyncio.Server] = []
        self.admin: AdminServer | None = None
        self.health: HealthChecker | None = None
        self.watcher: ConfigWatcher | None = None
        self._sampler: asyncio.TimerHandle | None = None
        self._history_sampler: asyncio.TimerHandle | None = None
        self._hurry = asyncio.Event()  # a second signal: stop without waiting for the drain
        # N > 1: the data plane runs in worker processes (see the module's docstring).
        self.pool: WorkerPool | None = None
        self.plane: DataPlane | None = None
        if self.workers > 1:
            self.pool = WorkerPool(
                self.workers,
                [parse_endpoint(address) for address in config.listen],
                self.control.table,
                self.stats,
                backlog=LISTEN_BACKLOG,
                on_ready=self._workers_ready,
            )
        else:
            self.plane = DataPlane(self.loop, self.control.table, self.stats)
            self.control.table_subscribers.append(self.plane.install)

    @property
    def table(self) -> RouteTable:
        """The route table in force."""
        return self.control.table

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) of every data listener (useful with port 0)."""
        if self.pool is not None:
            return list(self.pool.addresses)
        found: list[tuple[str, int]] = []
        for listener in self.listeners:
            for sock in listener.sockets:
                host, port = sock.getsockname()[:2]
                found.append((host, port))
        return found

    @property
    def admin_port(self) -> int | None:
        return self.admin.port if self.admin is not None else None

    async def start(self, *, admin: bool = True, watch: bool = True) -> None:
        """Start everything in order; if any part fails (a taken port: `ListenError`), what
        had started is stopped again before the error goes on, so a failed start leaves
        nothing running, nothing unclosed and the state file as it was."""
        try:
            await self._start(admin=admin, watch=watch)
        except BaseException:
            await self._abandon()
            raise

    async def _start(self, *, admin: bool, watch: bool) -> None:
        config = self.config
        control = self.control
        if config.state_file is not None:
            state = await asyncio.to_thread(load_state, config.state_file)
            if state is not None:
                await control.restore(state)
                log.info("runtime state restored from %s", config.state_file)
        if admin:
            admin_cfg = config.admin
            try:
                self.admin = await start_admin(
                    control,
                    self.rollouts,
                    admin_cfg.listen,
                    admin_cfg.token,
                    admin_cfg.metrics_public,
                    workers=self.pool,
                )
            except OSError as exc:
                raise ListenError("admin.listen", admin_cfg.listen, exc) from exc
            log.info("admin API on %s:%d", parse_endpoint(admin_cfg.listen)[0], self.admin.port)
        if self.coordinator is not None:
            # Before the listeners: the first request already follows the fleet, not the file.
            await self.coordinator.start(self.admin.url if self.admin is not None else None)
        await self._start_health()
        control.config_listeners.append(self._config_changed)
        if self.pool is not None:
            try:
                await self._start_workers()
            except OSError as exc:  # the parent binds every address before any worker starts
                raise ListenError("listen", ", ".join(config.listen), exc) from exc
        else:
            plane = self.plane
            assert plane is not None
            for address in config.listen:
                host, port = parse_endpoint(address)
                try:
                    listener = await self.loop.create_server(
                        plane.protocol, host, port, reuse_address=True, backlog=LISTEN_BACKLOG
                    )
                except OSError as exc:
                    raise ListenError("listen", address, exc) from exc
                self.listeners.append(listener)
            plane.start_ticker()
            control.listening = True
        self._sample_window()
        self._sample_history()
        if watch and control.config_path is not None:
            self.watcher = ConfigWatcher(control.config_path, self._reload_from_file)
            self.watcher.start()
        log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in self.addresses))

    async def _abandon(self) -> None:
        """Undo a start that failed part way, in the reverse order. Nothing is saved: the
        state file keeps what the last run wrote."""
        self.control.draining = True
        self.control.listening = False
        for listener in self.listeners:
            listener.close()
        if self.watcher is not None:
            await self.watcher.stop()
        if self.pool is not None:
            await self.pool.kill_all()
            self.pool.close_reservations()
        if self.coordinator is not None:
            await self.coordinator.stop()  # hands a lease it took back to the fleet
        await self._release()

    async def _release(self) -> None:
        """The end of both a stop and an abandoned start: timers, pools, health checks, the
        admin API, then the listeners' last close."""
        if self.plane is not None:
            self.plane.stop_ticker()
            self.plane.stop_drains()
            self.plane.pools.close()
        self.control.close()
        for sampler in (self._sampler, self._history_sampler):
            if sampler is not None:
                sampler.cancel()
        if self.health is not None:
            await self.health.stop()
        if self.admin is not None:
            await self.admin.stop()
        for listener in self.listeners:
            await listener.wait_closed()

    async def _start_workers(self) -> None:
        """Start the worker processes with the table in force; returns once all listen."""
        pool = self.pool
        assert pool is not None
        # Tables installed from now on go to the workers; the pool starts them with this one.
        pool.push(self.control.table)
        self.control.table_subscribers.append(pool.push)
        self.control.table_acks.append(pool.wait_applied)
        log.info("starting %d worker processes", self.workers)
        await pool.start()

    def _workers_ready(self, ready: bool) -> None:
        self.control.listening = ready

    async def _start_health(self) -> None:
        """Run the first round of health checks (if any service has them) before serving."""
        targets = targets_from_config(self.config)
        self.health = HealthChecker(self.control.set_health)
        self.health.configure(targets)
        if targets:
            self.control.health_ready = False
        await self.health.start()
        if targets:
            log.info(
                "first health round: %d of %d endpoints healthy",
                len(targets) - len(self.health.unhealthy),
                len(targets),
            )

    def _config_changed(self, config: Config) -> None:
        if self.workers_override is None and resolve_workers(config.workers) != self.workers:
            log.warning(
                "workers: %s in the file takes effect at the next start (running %d)",
                config.workers,
                self.workers,
            )
        if config.fleet != self.config.fleet:
            log.warning("the fleet block in the file takes effect at the next start")
        self.config = config
        if self.health is not None:
            # New endpoints start unknown (no traffic) until their first check passes.
            self.health.configure(targets_from_config(config))

    async def _reload_from_file(self) -> None:
        if not self.control.draining:
            await self.control.reload(actor="config")

    def _sample_window(self) -> None:
        self.control.window.sample()
        self._sampler = self.loop.call_later(self.control.window.step, self._sample_window)

    def _sample_history(self) -> None:
        self.control.sample_history()
        self._history_sampler = self.loop.call_later(HISTORY_STEP, self._sample_history)

    async def stop(self, drain_timeout: float | None = None) -> int:
        """Stop accepting, drain, cut what is left. Returns how many requests were cut."""
        if drain_timeout is None:
            drain_timeout = self.config.drain_timeout
        self.control.draining = True
        for listener in self.listeners:
            listener.close()
        # No new decisions once the stop began; the state file gets the last word.
        await self.control.shutdown()
        if self.coordinator is not None:
            await self.coordinator.stop()
        if self.watcher is not None:
            await self.watcher.stop()
        if self.pool is not None:
            cut = await self.pool.stop(drain_timeout)
        else:
            assert self.plane is not None
            self.plane.begin_drain()
            await self._drained_or_hurried(self.plane, drain_timeout)
            cut = self.plane.cut_all()
        await self._release()
        return cut

    async def _drained_or_hurried(self, plane: DataPlane, drain_timeout: float) -> None:
        """Until nothing is in flight, `kill_now()` is called, or `drain_timeout` passes."""
        waiters = [
            self.loop.create_task(plane.drained.wait()),
            self.loop.create_task(self._hurry.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=drain_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def kill_now(self) -> None:
        """A second signal: cut everything at once (workers are SIGKILLed); stop() goes on."""
        self._hurry.set()
        if self.pool is not None:
            self.pool.kill_now()
        if self.plane is not None:
            self.plane.cut_all()


async def run(
    config: Config,
    config_path: str | None = None,
    config_text: str = "",
    workers: int | str | None = None,
) -> None:
    """Run the proxy of `config` until SIGTERM/SIGINT; SIGHUP reloads the config file.
    `workers` (N or "auto") overrides the config's."""
    server = Server(config, config_path=config_path, config_text=config_text, workers=workers)
    await server.start()  # a failed start stops what it had started
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
            if server.pool is not None:
                server.pool.begin_stop()
            stop.set()
        else:
            log.warning("second signal: stopping now")
            server.kill_now()

    reloads: set[asyncio.Task[object]] = set()  # referenced until done (asyncio keeps weak ones)

    def on_hangup() -> None:
        if server.control.draining:
            log.info("SIGHUP ignored: the proxy is draining")
            return
        # Coalesced by the control plane: a burst of signals is at most two reloads.
        task: asyncio.Task[object] = server.loop.create_task(server.control.reload(actor="admin"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        server.loop.add_signal_handler(signum, on_signal, signum)
    server.loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await stop.wait()
        cut = await server.stop()
        log.info("stopped (%d request(s) cut at the drain timeout)", cut)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            server.loop.remove_signal_handler(signum)
