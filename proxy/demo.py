"""`laneswitch demo`: two small upstreams (blue, green) and the proxy in front of them.

Everything runs in this one process on loopback, so a newcomer sees a split with nothing to
install or configure.
"""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.config.loader import parse_config
from proxy.server import Server, serve_until_signalled

log = logging.getLogger("laneswitch.demo")

DEMO_CONFIG = """
listen: 127.0.0.1:8080
admin: {listen: 127.0.0.1:9901}
drain_timeout: 2s
services:
  shop:
    versions:
      blue: {endpoints: ["127.0.0.1:9001"], weight: 90, revision: "1.0.0"}
      green: {endpoints: ["127.0.0.1:9002"], weight: 10, revision: "1.1.0"}
    sticky: {header: X-User-Id}
    force: {header: X-Canary, cookie: canary}
    version_header: X-App-Version
"""

DEMO_UPSTREAMS = {"blue": 9001, "green": 9002}

TRY_IT = """
laneswitch demo: blue (90 %) and green (10 %) behind http://127.0.0.1:8080
admin API on http://127.0.0.1:9901

  curl -i http://127.0.0.1:8080/                          # weighted: mostly blue
  for i in $(seq 20); do curl -s http://127.0.0.1:8080/; done | sort | uniq -c
  curl -s -H 'X-User-Id: alice' http://127.0.0.1:8080/    # sticky: alice always gets the same one
  curl -s -H 'X-Canary: green' http://127.0.0.1:8080/     # forced to a version by header
  curl -s -b 'canary=blue' http://127.0.0.1:8080/         # ... or by cookie

  laneswitch status                                       # weights, health, traffic per version
  laneswitch switch shop green                            # blue-green: all traffic to green now
  laneswitch rollback shop                                # and back
  curl -s http://127.0.0.1:9901/metrics | grep laneswitch_requests_total

Ctrl-C stops it.
"""


def demo_app(version: str) -> web.Application:
    """An upstream that answers every request with its version name."""

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(
            text=f"{version}\n", headers={"X-Served-By": version, "X-Body-Bytes": str(len(body))}
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def start_upstream(version: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(demo_app(version), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def demo() -> None:
    config = parse_config(DEMO_CONFIG, source="<demo>")
    runners = [await start_upstream(name, port) for name, port in DEMO_UPSTREAMS.items()]
    server = Server(config, config_text=DEMO_CONFIG)
    await server.start()
    print(TRY_IT, flush=True)
    try:
        await serve_until_signalled(server)
    finally:
        for runner in runners:
            await runner.cleanup()
