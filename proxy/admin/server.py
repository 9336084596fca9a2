"""The admin API's listener: an aiohttp runner on `admin.listen`, next to the data plane."""

from __future__ import annotations

from aiohttp import web

from proxy.admin.app import create_admin_app
from proxy.config.scalars import parse_endpoint
from proxy.control import ControlPlane
from proxy.rollout.manager import RolloutManager
from proxy.workers.supervisor import WorkerPool

# How long `stop()` lets an admin call in progress finish before closing its connection.
SHUTDOWN_TIMEOUT = 2.0


class AdminServer:
    """A started admin listener; `port` is the bound one (useful with port 0)."""

    def __init__(self, runner: web.AppRunner, site: web.TCPSite) -> None:
        self.runner = runner
        self.site = site

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(address[0], address[1]) for address in self.runner.addresses]

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def url(self) -> str:
        host, port = self.addresses[0]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_admin(
    control: ControlPlane,
    rollouts: RolloutManager,
    listen: str,
    token: str | None,
    metrics_public: bool,
    *,
    workers: WorkerPool | None = None,
) -> AdminServer:
    """Bind the admin API of `control` and its `rollouts` on `listen` ("host:port", port 0
    picks a free one); with `workers`, /metrics and /status first collect the worker
    processes' counters."""
    host, port = parse_endpoint(listen)
    app = create_admin_app(control, rollouts, token, metrics_public, workers=workers)
    # Access logs off: scrapes and status polls every few seconds would drown the event log.
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return AdminServer(runner, site)
