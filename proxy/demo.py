"""`laneswitch demo`: two small upstreams (blue, green), the proxy in front of them, some traffic,
and a canary rollout of green to watch.

Everything runs in this one process on loopback, so a newcomer sees a split and a closed-loop
rollout with nothing to install or configure. The tour: green is rolled out step by step and
promoted; then green is told to fail 30 % of its requests, rolled out again, and rolled back by
the proxy on its own. The green upstream takes `POST /demo/fail?rate=R` to fail a share R of its
requests (0 heals it), so the failing case can be replayed by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.config.loader import parse_config
from proxy.control import ControlPlane
from proxy.server import Server, serve_until_signalled

log = logging.getLogger("laneswitch.demo")

DEMO_CONFIG = """
listen: 127.0.0.1:8080
admin: {listen: 127.0.0.1:9901}
drain_timeout: 2s
services:
  shop:
    versions:
      blue: {endpoints: ["127.0.0.1:9001"], weight: 100, revision: "1.0.0"}
      green: {endpoints: ["127.0.0.1:9002"], weight: 0, revision: "1.1.0"}
    sticky: {header: X-User-Id}
    force: {header: X-Canary, cookie: canary}
    version_header: X-App-Version
    rollout:
      strategy: canary
      stable: blue
      canary: green
      step_weights: [10, 25, 50]
      interval: 5s
      threshold: 2
      min_requests: 10
      progress_deadline: 1m
      promotion: auto
      metrics:
        success_rate: {min: 95}
        latency_p99: {max: 500ms}
        success_rate_vs_stable: {max_drop: 3}
"""

DEMO_UPSTREAMS = {"blue": 9001, "green": 9002}

# The demo's own traffic: this many clients, each sending a request every TRAFFIC_PAUSE seconds
# (about 50 requests/s: enough for min_requests at the first 10 % step of a 5 s interval).
TRAFFIC_CLIENTS = 2
TRAFFIC_PAUSE = 0.04

TRY_IT = """
laneswitch demo: blue and green behind http://127.0.0.1:8080, admin API on http://127.0.0.1:9901
The demo sends about 50 requests/s through the proxy itself, so the rollout has traffic to judge.

  laneswitch status --watch                               # the rollout live, step by step
  curl -s http://127.0.0.1:9901/events | python3 -m json.tool   # the decision record

  curl -i http://127.0.0.1:8080/                          # weighted: blue, green as it rolls out
  curl -s -H 'X-User-Id: alice' http://127.0.0.1:8080/    # sticky: alice always gets the same one
  curl -s -H 'X-Canary: green' http://127.0.0.1:8080/     # forced to a version by header
  curl -s -b 'canary=blue' http://127.0.0.1:8080/         # ... or by cookie

  curl -X POST 'http://127.0.0.1:9002/demo/fail?rate=0.3' # make green fail 30 % (rate=0 heals it)
  laneswitch rollback shop                                # all traffic back to blue
  laneswitch rollout start shop                           # ... and roll green out again
  laneswitch rollout pause|resume|promote|abort shop      # steer a running rollout
  curl -s http://127.0.0.1:9901/metrics | grep -E 'laneswitch_(rollout|analysis|rollbacks)'

Ctrl-C stops it.
"""


@dataclass
class Failing:
    """Share of requests an upstream answers with 500, spread evenly (0.3: 3 in every 10)."""

    rate: float = 0.0
    seen: int = 0

    def next_fails(self) -> bool:
        before = int(self.seen * self.rate)
        self.seen += 1
        return int(self.seen * self.rate) > before


def demo_app(version: str, failing: Failing | None = None) -> web.Application:
    """An upstream that answers every request with its version name (or, for the share set by
    `POST /demo/fail?rate=R`, with a 500)."""
    failing = failing if failing is not None else Failing()

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        if failing.next_fails():
            return web.Response(status=500, text=f"{version} failed (demo)\n")
        return web.Response(
            text=f"{version}\n", headers={"X-Served-By": version, "X-Body-Bytes": str(len(body))}
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def fail(request: web.Request) -> web.Response:
        try:
            rate = float(request.query.get("rate", "0.3"))
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            return web.Response(status=400, text="rate must be a number from 0 to 1\n")
        failing.rate = rate
        return web.Response(text=f"{version} now fails {rate:.0%} of its requests\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/demo/fail", fail)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def start_upstream(version: str, port: int, failing: Failing | None = None) -> web.AppRunner:
    runner = web.AppRunner(demo_app(version, failing), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def traffic(url: str) -> None:
    """A small steady client load, so the rollout's analysis has requests to judge."""

    async def one(session: aiohttp.ClientSession) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as response:
                    await response.read()
            await asyncio.sleep(TRAFFIC_PAUSE)

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(session) for _ in range(TRAFFIC_CLIENTS)))


async def settled(control: ControlPlane, service: str) -> str:
    """Wait for the service's rollout to end; its final phase."""
    while True:
        phase = control.rollouts.state(service).phase
        if phase in ("promoted", "rolled_back", "aborted", "paused"):
            return phase
        await asyncio.sleep(0.2)


async def tour(control: ControlPlane, green: Failing, fail_rate: float | None) -> None:
    """Roll green out while it is healthy, then again while it fails (or once, failing)."""
    await asyncio.sleep(1.0)
    acts = [fail_rate] if fail_rate is not None else [0.0, 0.3]
    for number, rate in enumerate(acts, start=1):
        green.rate = rate
        state = "healthy" if rate == 0 else f"failing {rate:.0%} of its requests"
        if control.weights["shop"].get("green", 0) == control.config.services["shop"].weight_total:
            await control.rollback("shop", actor="admin")
        print(f"[demo] act {number}: rolling out green ({state}): 10 %, 25 %, 50 %, every 5 s")
        await control.rollouts.start("shop", actor="admin", reason="started by laneswitch demo")
        phase = await settled(control, "shop")
        last = control.rollouts.state("shop").last_decision or {}
        print(f"[demo] act {number}: {phase}: {last.get('reason', '')}", flush=True)
        await asyncio.sleep(3.0)
    print("[demo] your turn: see the commands above; Ctrl-C stops the demo", flush=True)


async def demo(fail_rate: float | None = None) -> None:
    config = parse_config(DEMO_CONFIG, source="<demo>")
    green = Failing(rate=fail_rate or 0.0)
    runners = [
        await start_upstream(name, port, green if name == "green" else None)
        for name, port in DEMO_UPSTREAMS.items()
    ]
    server = Server(config, config_text=DEMO_CONFIG)
    await server.start()
    print(TRY_IT, flush=True)
    loop = asyncio.get_running_loop()
    background = [
        loop.create_task(traffic("http://127.0.0.1:8080/")),
        loop.create_task(tour(server.control, green, fail_rate)),
    ]
    try:
        await serve_until_signalled(server)
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for runner in runners:
            await runner.cleanup()
