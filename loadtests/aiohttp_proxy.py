"""A plain aiohttp reverse proxy: the obvious Python baseline for the benchmark.

One ``aiohttp.web`` server, one shared ``aiohttp.ClientSession`` with a keep-alive connector,
a smooth weighted round-robin pick between upstreams (as nginx does), and the upstream response
streamed back chunk by chunk. Runs under uvloop when it is installed.

    python loadtests/aiohttp_proxy.py --listen 127.0.0.1:18080 \
        --upstream 127.0.0.1:19001=9 --upstream 127.0.0.1:19002=1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
CHUNK_SIZE = 64 * 1024


@dataclass
class Upstream:
    address: str
    weight: int
    current: int = 0


class WeightedPicker:
    """Smooth weighted round-robin (nginx's algorithm): exact shares, no clustering."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        if not upstreams or sum(u.weight for u in upstreams) <= 0:
            raise ValueError("need at least one upstream with a positive weight")
        self._upstreams = upstreams
        self._total = sum(u.weight for u in upstreams)

    def pick(self) -> str:
        best = self._upstreams[0]
        for upstream in self._upstreams:
            upstream.current += upstream.weight
            if upstream.current > best.current:
                best = upstream
        best.current -= self._total
        return best.address


SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
PICKER_KEY = web.AppKey("picker", WeightedPicker)


def parse_upstream(text: str) -> Upstream:
    address, _, weight = text.partition("=")
    return Upstream(address=address, weight=int(weight or "1"))


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def forward_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """All end-to-end headers, repeated ones (Set-Cookie) included; hop-by-hop ones dropped."""
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP]


async def handle(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION_KEY]
    upstream = request.app[PICKER_KEY].pick()
    body = request.content if request.body_exists else None
    try:
        async with session.request(
            request.method,
            f"http://{upstream}{request.rel_url}",
            headers=forward_headers(request.headers),
            data=body,
            allow_redirects=False,
        ) as upstream_response:
            return await stream_back(request, upstream_response)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return web.Response(status=502, text=f"bad gateway: {exc.__class__.__name__}\n")


async def stream_back(
    request: web.Request, upstream_response: aiohttp.ClientResponse
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=upstream_response.status,
        reason=upstream_response.reason,
        headers=forward_headers(upstream_response.headers),
    )
    if upstream_response.content_length is not None:
        response.content_length = upstream_response.content_length
    await response.prepare(request)
    async for chunk in upstream_response.content.iter_chunked(CHUNK_SIZE):
        await response.write(chunk)
    await response.write_eof()
    return response


def build_app(upstreams: list[Upstream]) -> web.Application:
    app = web.Application()
    app[PICKER_KEY] = WeightedPicker(upstreams)

    async def session_context(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60)
        async with aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2, sock_read=30),
        ) as session:
            app[SESSION_KEY] = session
            yield

    app.cleanup_ctx.append(session_context)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(host: str, port: int, upstreams: list[Upstream]) -> None:
    runner = web.AppRunner(build_app(upstreams), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:18080", help="host:port to listen on")
    parser.add_argument(
        "--upstream",
        action="append",
        required=True,
        help="host:port=weight (repeat for each upstream)",
    )
    args = parser.parse_args(argv)
    host, port = parse_listen(args.listen)
    upstreams = [parse_upstream(u) for u in args.upstream]
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=loop_factory()) as runner,
    ):
        runner.run(serve(host, port, upstreams))


if __name__ == "__main__":
    main()
