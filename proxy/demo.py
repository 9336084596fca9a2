"""`laneswitch demo`: a canary rollout to watch, with its upstreams and traffic, in one process.

Two small upstreams (blue, green), the proxy in front of them, some traffic, and a canary
rollout of green to watch.

Everything runs in this one process on loopback, so a newcomer sees a split and a closed-loop
rollout with nothing to install or configure. The tour: green is rolled out step by step and
promoted; then green is told to fail 30 % of its requests, rolled out again, and rolled back by
the proxy on its own. The green upstream takes `POST /demo/fail?rate=R` to fail a share R of its
requests (0 heals it), so the failing case can be replayed by hand.

A newcomer's first minute: a port already taken is one line naming it and the flags that pick
others (`--port`, `--admin-port`, 0 for free ones), with nothing left running; the console's URL
is the first line printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from string import Template

import aiohttp
from aiohttp import web

from proxy.config.loader import parse_config
from proxy.control import ControlPlane
from proxy.rollout.manager import RolloutManager
from proxy.server import ListenError, Server, serve_until_signalled

log = logging.getLogger("laneswitch.demo")

# The proxy's and the admin API's ports unless --port / --admin-port say otherwise (SPEC §1).
DEFAULT_PORT = 8080
DEFAULT_ADMIN_PORT = 9901

DEMO_CONFIG = Template("""
listen: "127.0.0.1:$port"
admin: {listen: "127.0.0.1:$admin_port"}
drain_timeout: 2s
$extra
services:
  shop:
    versions:
      blue: {endpoints: ["127.0.0.1:$blue"], weight: 100, revision: "1.0.0"}
      green: {endpoints: ["127.0.0.1:$green"], weight: 0, revision: "1.1.0"}
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
""")

# Where the upstreams listen when these ports are free; else any free port (they are only
# named in the printed commands, which show the port in use).
DEMO_UPSTREAMS = {"blue": 9001, "green": 9002}

# The demo's own traffic: this many clients, each sending a request every TRAFFIC_PAUSE seconds
# (about 50 requests/s: enough for min_requests at the first 10 % step of a 5 s interval).
TRAFFIC_CLIENTS = 2
TRAFFIC_PAUSE = 0.04

TRY_IT = Template("""
laneswitch demo: blue and green behind http://127.0.0.1:$port, admin API on http://127.0.0.1:$admin
The demo sends about 50 requests/s through the proxy itself, so the rollout has traffic to judge.
$admin_env
  laneswitch status --watch                               # the rollout live, step by step
  curl -s http://127.0.0.1:$admin/events | python3 -m json.tool   # the decision record

  curl -i http://127.0.0.1:$port/                         # weighted: blue, green as it rolls out
  curl -s -H 'X-User-Id: alice' http://127.0.0.1:$port/   # sticky: alice always gets the same one
  curl -s -H 'X-Canary: green' http://127.0.0.1:$port/    # forced to a version by header
  curl -s -b 'canary=blue' http://127.0.0.1:$port/        # ... or by cookie

  curl -X POST 'http://127.0.0.1:$green/demo/fail?rate=0.3' # make green fail 30 % (rate=0 heals it)
  laneswitch rollback shop                                # all traffic back to blue
  laneswitch rollout start shop                           # ... and roll green out again
  laneswitch rollout pause|resume|promote|abort shop      # steer a running rollout
  curl -s http://127.0.0.1:$admin/metrics | grep -E 'laneswitch_(rollout|analysis|rollbacks)'

Ctrl-C stops it.
""")


class DemoStartError(Exception):
    """The demo could not start; the message is the one line printed (nothing is left running)."""


def demo_config(
    port: int | str, admin_port: int | str, upstreams: Mapping[str, int], extra: str = ""
) -> str:
    """The demo's config text: proxy and admin on these loopback ports (0: any free one; or a
    `${NAME}` reference), in front of the upstreams' ports; `extra` goes in at the top level."""
    return DEMO_CONFIG.substitute(
        port=port,
        admin_port=admin_port,
        blue=upstreams["blue"],
        green=upstreams["green"],
        extra=extra,
    )


def console_line(admin_port: int) -> str:
    """The first line the demo prints: where the web console is."""
    return (
        f"laneswitch demo: the console is on http://127.0.0.1:{admin_port}/ (open it in a browser)"
    )


def admin_env(admin_port: int) -> str:
    """A line pointing the client commands at a demo on another admin port than their default."""
    if admin_port == DEFAULT_ADMIN_PORT:
        return ""
    return (
        f"\n  export LANESWITCH_ADMIN=http://127.0.0.1:{admin_port}"
        "   # the laneswitch commands below talk to this demo\n"
    )


def taken_port_message(port: str, role: str, problem: str, *, fleet: bool = False) -> str:
    """One line: which port cannot be used, by what, and how to pick others."""
    command = "laneswitch demo --fleet" if fleet else "laneswitch demo"
    replicas = " (the replicas take N, N+1 and N+2)" if fleet else ""
    return (
        f"port {port} ({role}) {problem}; pick others with --port N and --admin-port N{replicas} "
        f"(0 = any free port, printed), e.g. {command} --port 0 --admin-port 0"
    )


def listen_problem(exc: ListenError) -> tuple[str, str, str]:
    """(port, role, problem) of a listener that could not be bound, for `taken_port_message`."""
    role = "the proxy" if exc.field == "listen" else "the admin API"
    problem = "is already in use" if exc.in_use else f"cannot be used ({exc})"
    return exc.address.rpartition(":")[2], role, problem


@contextlib.contextmanager
def quiet_start() -> Iterator[None]:
    """No INFO lines while the proxy starts: the demo prints its ports itself, and the console
    URL is the first line a newcomer sees (or the one-line error is the only one)."""
    logger = logging.getLogger("laneswitch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


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


@dataclass
class Upstreams:
    """The demo's blue and green upstreams, running; `ports` are the bound ones."""

    runners: list[web.AppRunner] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


async def start_upstreams(green: Failing) -> Upstreams:
    """Blue and green on DEMO_UPSTREAMS' ports, or any free ones where those are taken."""
    started = Upstreams()
    try:
        for name, port in DEMO_UPSTREAMS.items():
            runner = web.AppRunner(
                demo_app(name, green if name == "green" else None), access_log=None
            )
            await runner.setup()
            started.runners.append(runner)
            try:
                await web.TCPSite(runner, "127.0.0.1", port).start()
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                await web.TCPSite(runner, "127.0.0.1", 0).start()
            started.ports[name] = int(runner.addresses[0][1])
    except BaseException:
        await started.stop()
        raise
    return started


async def traffic(urls: Sequence[str], clients: int = TRAFFIC_CLIENTS) -> None:
    """A small steady client load, so the rollout's analysis has requests to judge: `clients`
    clients per URL."""

    async def one(session: aiohttp.ClientSession, url: str) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as response:
                    await response.read()
            await asyncio.sleep(TRAFFIC_PAUSE)

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(session, url) for url in urls for _ in range(clients)))


def tour_acts(fail_rate: float | None) -> list[float]:
    """Green's failure rate in each act of the tour: healthy, then 30 %; or once, as asked."""
    return [fail_rate] if fail_rate is not None else [0.0, 0.3]


def act_state(rate: float) -> str:
    return "healthy" if rate == 0 else f"failing {rate:.0%} of its requests"


STEPS = "10 %, 25 %, 50 %, every 5 s"

# The phases a rollout of the tour ends in (paused: by hand, from the CLI or the console).
SETTLED = ("promoted", "rolled_back", "aborted", "paused")


async def settled(rollouts: RolloutManager, service: str) -> str:
    """Wait for the service's rollout to end; its final phase."""
    while True:
        phase = rollouts.state(service).phase
        if phase in SETTLED:
            return phase
        await asyncio.sleep(0.2)


async def tour(
    control: ControlPlane, rollouts: RolloutManager, green: Failing, fail_rate: float | None
) -> None:
    """Roll green out while it is healthy, then again while it fails (or once, failing)."""
    await asyncio.sleep(1.0)
    for number, rate in enumerate(tour_acts(fail_rate), start=1):
        green.rate = rate
        if control.weights["shop"].get("green", 0) == control.config.services["shop"].weight_total:
            await control.rollback("shop", actor="admin")
        print(f"[demo] act {number}: rolling out green ({act_state(rate)}): {STEPS}")
        await rollouts.start("shop", actor="admin", reason="started by laneswitch demo")
        phase = await settled(rollouts, "shop")
        last = rollouts.state("shop").last_decision or {}
        print(f"[demo] act {number}: {phase}: {last.get('reason', '')}", flush=True)
        await asyncio.sleep(3.0)
    print("[demo] your turn: see the commands above; Ctrl-C stops the demo", flush=True)


async def demo(
    fail_rate: float | None = None, port: int = DEFAULT_PORT, admin_port: int = DEFAULT_ADMIN_PORT
) -> None:
    """Run the demo until SIGINT/SIGTERM; DemoStartError (one line) when it cannot start."""
    green = Failing(rate=fail_rate or 0.0)
    upstreams = await start_upstreams(green)
    try:
        text = demo_config(port, admin_port, upstreams.ports)
        server = Server(parse_config(text, source="<demo>"), config_text=text)
        try:
            with quiet_start():
                await server.start()
        except ListenError as exc:
            raise DemoStartError(taken_port_message(*listen_problem(exc))) from None
        data_port = server.addresses[0][1]
        admin = server.admin_port
        assert admin is not None
        print(console_line(admin), flush=True)
        print(
            TRY_IT.substitute(
                admin_env=admin_env(admin),
                port=data_port,
                admin=admin,
                green=upstreams.ports["green"],
            ),
            flush=True,
        )
        loop = asyncio.get_running_loop()
        background = [
            loop.create_task(traffic([f"http://127.0.0.1:{data_port}/"])),
            loop.create_task(tour(server.control, server.rollouts, green, fail_rate)),
        ]
        try:
            await serve_until_signalled(server)
        finally:
            for task in background:
                task.cancel()
            for task in background:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
    finally:
        await upstreams.stop()
