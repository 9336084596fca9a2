"""The active health checker against real aiohttp upstreams on loopback.

Every wait is for a condition (an `on_change` call or a request arriving at an upstream), bounded
by a timeout; nothing sleeps "long enough". Exact threshold counts use a scripted upstream that
answers each check only when the test hands it a status, so the test decides every result.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from proxy.config.loader import parse_config
from proxy.config.service import HealthCheckConfig
from proxy.health import (
    USER_AGENT,
    EndpointKey,
    HealthChecker,
    HealthState,
    HealthTarget,
    targets_from_config,
)

WAIT = 5.0  # upper bound of every wait for a condition


class Waker:
    """One event that every interesting thing sets: a callback, a request arriving."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def set(self) -> None:
        self.event.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.event.clear()
                await self.event.wait()


@dataclass
class Recorder:
    """The checker's `on_change` callback: keeps every call."""

    waker: Waker
    calls: list[tuple[set[EndpointKey], bool]] = field(default_factory=list)

    def __call__(self, unhealthy: set[EndpointKey], first_round_done: bool) -> None:
        self.calls.append((unhealthy, first_round_done))
        self.waker.set()

    @property
    def last(self) -> tuple[set[EndpointKey], bool]:
        return self.calls[-1]


@dataclass
class Upstream:
    """An aiohttp upstream whose health endpoint the test flips.

    Each request answers `status`, after `delay` seconds when set; with `scripted`, each request
    instead waits for the test to put its status into `script`.
    """

    waker: Waker
    status: int = 200
    delay: float = 0.0
    scripted: bool = False
    script: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    served: list[int] = field(default_factory=list)  # statuses answered, in order
    arrivals: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    paths: list[str] = field(default_factory=list)
    user_agents: list[str] = field(default_factory=list)
    # Called as each request arrives, before it is answered.
    on_arrival: Callable[[], None] | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends slow handlers early
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        self.arrivals += 1
        self.paths.append(request.path_qs)
        self.user_agents.append(request.headers.get("User-Agent", ""))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.on_arrival is not None:
            self.on_arrival()
        self.waker.set()
        try:
            if self.scripted:
                status = await self.script.get()
            else:
                if self.delay:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.release.wait(), self.delay)
                status = self.status
        finally:
            self.in_flight -= 1
        self.served.append(status)
        self.waker.set()
        headers = {"Location": "/elsewhere"} if 300 <= status < 400 else {}
        return web.Response(status=status, text=f"{status}\n", headers=headers)

    async def start(self) -> Upstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
def waker() -> Waker:
    return Waker()


async def start_upstream(waker: Waker, **kwargs: object) -> Upstream:
    return await Upstream(waker, **kwargs).start()  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def serving(waker: Waker, **kwargs: object) -> AsyncIterator[Upstream]:
    upstream = await start_upstream(waker, **kwargs)
    try:
        yield upstream
    finally:
        await upstream.stop()


@contextlib.asynccontextmanager
async def checking(recorder: Recorder) -> AsyncIterator[HealthChecker]:
    checker = HealthChecker(recorder)
    try:
        yield checker
    finally:
        await checker.stop()


def refused_endpoint() -> str:
    """A loopback port nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


def check(**overrides: object) -> HealthCheckConfig:
    settings: dict[str, object] = {
        "path": "/healthz",
        "interval": "50ms",
        "timeout": "1s",
        "healthy_threshold": 2,
        "unhealthy_threshold": 3,
    }
    settings.update(overrides)
    return HealthCheckConfig.model_validate(settings)


def target(endpoint: str, version: str = "blue", **overrides: object) -> HealthTarget:
    return HealthTarget("shop", version, endpoint, check(**overrides))


def key(endpoint: str, version: str = "blue") -> EndpointKey:
    return ("shop", version, endpoint)


# --------------------------------------------------------------------------------------------
# The first round
# --------------------------------------------------------------------------------------------


async def test_first_round_checks_every_target_once_before_start_returns(waker: Waker) -> None:
    recorder = Recorder(waker)
    async with (
        serving(waker) as good,
        serving(waker, status=503) as failing,
        checking(recorder) as checker,
    ):
        refused = refused_endpoint()
        checker.configure(
            [
                target(good.endpoint, "blue", interval="1h"),
                target(failing.endpoint, "green", interval="1h"),
                target(refused, "green", interval="1h"),
            ]
        )
        everything = {key(good.endpoint), key(failing.endpoint, "green"), key(refused, "green")}
        # Before the first round nothing has passed a check: nothing gets traffic.
        assert checker.unhealthy == everything
        assert checker.state(key(good.endpoint)) is HealthState.UNKNOWN
        assert not checker.first_round_done
        assert recorder.calls == [(everything, False)]

        async with asyncio.timeout(WAIT):
            await checker.start()

        assert checker.first_round_done
        assert good.arrivals == 1 and failing.arrivals == 1
        assert checker.is_healthy(key(good.endpoint))
        assert not checker.is_healthy(key(failing.endpoint, "green"))
        assert not checker.is_healthy(key(refused, "green"))
        assert checker.state(key(refused, "green")) is HealthState.UNHEALTHY
        assert checker.unhealthy == {key(failing.endpoint, "green"), key(refused, "green")}
        assert recorder.last == (checker.unhealthy, True)
        assert [done for _, done in recorder.calls].count(True) == 1


async def test_check_is_a_get_of_the_path_with_the_user_agent(waker: Waker) -> None:
    recorder = Recorder(waker)
    async with serving(waker) as upstream, checking(recorder) as checker:
        checker.configure([target(upstream.endpoint, path="/ready?deep=1", interval="1h")])
        async with asyncio.timeout(WAIT):
            await checker.start()
        assert upstream.paths == ["/ready?deep=1"]
        assert upstream.user_agents == [USER_AGENT]


async def test_no_targets_first_round_done_at_once(waker: Waker) -> None:
    recorder = Recorder(waker)
    async with checking(recorder) as checker:
        checker.configure([])
        async with asyncio.timeout(1):
            await checker.start()
        assert checker.first_round_done
        assert checker.unhealthy == set()
        assert recorder.calls == [(set(), True)]
        # An endpoint the checker does not check is not its business: healthy.
        assert checker.is_healthy(key("127.0.0.1:1"))
        assert checker.state(key("127.0.0.1:1")) is None


async def test_a_slow_endpoint_does_not_delay_the_others(waker: Waker) -> None:
    recorder = Recorder(waker)
    async with (
        serving(waker) as fast,
        serving(waker, delay=3.0) as slow,
        checking(recorder) as checker,
    ):
        checker.configure(
            [target(fast.endpoint, "blue"), target(slow.endpoint, "green", timeout="4s")]
        )
        start = asyncio.create_task(checker.start())
        # The fast endpoint is healthy, and checked again and again, while the slow endpoint's
        # first check is still waiting for its answer and the first round is not complete.
        await waker.until(lambda: fast.arrivals >= 5 and slow.arrivals >= 1)
        assert slow.served == []
        assert checker.is_healthy(key(fast.endpoint))
        # ... and on_change already gave it traffic, before the first round is done.
        assert recorder.last == ({key(slow.endpoint, "green")}, False)
        assert not start.done() and not checker.first_round_done
        # Checks of one endpoint never overlap, however short the interval.
        assert slow.arrivals == 1 and slow.max_in_flight == 1
        slow.release.set()
        async with asyncio.timeout(WAIT):
            await start
        assert checker.first_round_done and checker.unhealthy == set()
        assert fast.max_in_flight == 1


# --------------------------------------------------------------------------------------------
# Pass and fail
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (204, True), (302, True)])
async def test_2xx_and_3xx_pass(waker: Waker, status: int, healthy: bool) -> None:
    recorder = Recorder(waker)
    async with serving(waker, status=status) as upstream, checking(recorder) as checker:
        checker.configure([target(upstream.endpoint, interval="1h")])
        await checker.start()
        assert checker.is_healthy(key(upstream.endpoint)) is healthy
        assert upstream.arrivals == 1  # the redirect was not followed


@pytest.mark.parametrize("status", [404, 429, 500, 503])
async def test_4xx_and_5xx_fail(
    waker: Waker, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder(waker)
    caplog.set_level(logging.INFO, "laneswitch.health")
    async with serving(waker, status=status) as upstream, checking(recorder) as checker:
        checker.configure([target(upstream.endpoint, interval="1h")])
        await checker.start()
        assert not checker.is_healthy(key(upstream.endpoint))
    assert f"unknown -> unhealthy (first check failed: HTTP {status})" in caplog.text


async def test_a_check_slower_than_timeout_fails(
    waker: Waker, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder(waker)
    caplog.set_level(logging.INFO, "laneswitch.health")
    async with serving(waker, delay=3.0) as upstream, checking(recorder) as checker:
        checker.configure([target(upstream.endpoint, timeout="100ms", interval="1h")])
        began = time.monotonic()
        async with asyncio.timeout(2):
            await checker.start()
        assert time.monotonic() - began < 2
        assert not checker.is_healthy(key(upstream.endpoint))
        assert upstream.served == []  # the check gave up before the answer
    assert "first check failed: timed out after 100ms" in caplog.text


async def test_refused_and_closed_connections_fail(
    waker: Waker, caplog: pytest.LogCaptureFixture
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    caplog.set_level(logging.INFO, "laneswitch.health")
    recorder = Recorder(waker)
    closer = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    liar = await asyncio.start_server(garbage, "127.0.0.1", 0)
    try:
        closed = f"127.0.0.1:{closer.sockets[0].getsockname()[1]}"
        invalid = f"127.0.0.1:{liar.sockets[0].getsockname()[1]}"
        refused = refused_endpoint()
        async with checking(recorder) as checker:
            checker.configure([target(e, interval="1h") for e in (closed, invalid, refused)])
            async with asyncio.timeout(WAIT):
                await checker.start()
            assert checker.unhealthy == {key(closed), key(invalid), key(refused)}
    finally:
        closer.close()
        liar.close()
    assert f"shop/blue {refused}: unknown -> unhealthy (first check failed: connect refused)" in (
        caplog.text
    )
    assert f"shop/blue {closed}: unknown -> unhealthy (first check failed: connection" in (
        caplog.text
    )
    assert f"shop/blue {invalid}: unknown -> unhealthy (first check failed: " in caplog.text


# --------------------------------------------------------------------------------------------
# Thresholds, with every check's result chosen by the test
# --------------------------------------------------------------------------------------------


class Scripted:
    """Drives a scripted upstream one check at a time and records what the checker believed."""

    def __init__(self, upstream: Upstream, checker: HealthChecker, k: EndpointKey) -> None:
        self.upstream = upstream
        self.checker = checker
        self.key = k
        # The checker's verdict when each check arrived, i.e. after all the previous results.
        self.seen: list[bool] = []
        upstream.on_arrival = lambda: self.seen.append(checker.is_healthy(k))

    async def answer(self, status: int) -> None:
        """Answer the check in flight (waiting for it to arrive) with `status`."""
        n = len(self.upstream.served)
        await self.upstream.waker.until(lambda: self.upstream.arrivals > n)
        self.upstream.script.put_nowait(status)
        await self.upstream.waker.until(lambda: len(self.upstream.served) > n)

    async def recorded(self) -> bool:
        """The verdict after every answer so far: read when the next check arrives (checks of
        one endpoint never overlap, so the previous result is in by then)."""
        n = len(self.upstream.served)
        await self.upstream.waker.until(lambda: self.upstream.arrivals > n)
        return self.seen[-1]


async def test_unhealthy_after_exactly_unhealthy_threshold_failures(
    waker: Waker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "laneswitch.health")
    recorder = Recorder(waker)
    async with serving(waker, scripted=True) as upstream, checking(recorder) as checker:
        k = key(upstream.endpoint)
        checker.configure([target(upstream.endpoint, interval="10ms", timeout="5s")])
        script = Scripted(upstream, checker, k)
        start = asyncio.create_task(checker.start())
        await script.answer(200)
        await start
        assert checker.is_healthy(k)
        await script.answer(500)
        assert await script.recorded() is True  # 1 failure
        await script.answer(500)
        assert await script.recorded() is True  # 2 failures: still healthy
        await script.answer(500)
        assert await script.recorded() is False  # the third flips it
        assert recorder.last == ({k}, True)
    assert (
        f"shop/blue {upstream.endpoint}: healthy -> unhealthy (3 consecutive failures: HTTP 500)"
        in caplog.text
    )


async def test_healthy_again_after_exactly_healthy_threshold_passes(waker: Waker) -> None:
    recorder = Recorder(waker)
    async with serving(waker, scripted=True) as upstream, checking(recorder) as checker:
        k = key(upstream.endpoint)
        checker.configure(
            [
                target(
                    upstream.endpoint,
                    interval="10ms",
                    timeout="5s",
                    unhealthy_threshold=1,
                    healthy_threshold=3,
                )
            ]
        )
        script = Scripted(upstream, checker, k)
        start = asyncio.create_task(checker.start())
        await script.answer(200)
        await start
        await script.answer(503)
        assert await script.recorded() is False  # threshold 1: one failure is enough
        await script.answer(200)
        await script.answer(200)
        assert await script.recorded() is False  # 2 of 3 passes
        await script.answer(503)  # a failure resets the count of passes
        await script.answer(200)
        await script.answer(200)
        assert await script.recorded() is False
        await script.answer(200)
        assert await script.recorded() is True
        assert recorder.last == (set(), True)


async def test_first_pass_of_a_never_healthy_endpoint_makes_it_healthy(waker: Waker) -> None:
    """Healthy once a check has passed, whatever the healthy threshold."""
    recorder = Recorder(waker)
    async with serving(waker, scripted=True) as upstream, checking(recorder) as checker:
        k = key(upstream.endpoint)
        checker.configure(
            [target(upstream.endpoint, interval="10ms", timeout="5s", healthy_threshold=5)]
        )
        script = Scripted(upstream, checker, k)
        start = asyncio.create_task(checker.start())
        await script.answer(500)
        await start
        assert checker.first_round_done
        assert recorder.last == ({k}, True)
        await script.answer(500)
        await script.answer(200)
        assert await script.recorded() is True
        assert recorder.last == (set(), True)


# --------------------------------------------------------------------------------------------
# Reconfiguration
# --------------------------------------------------------------------------------------------


async def test_reconfigure_keeps_state_and_counters_and_drops_removed(waker: Waker) -> None:
    recorder = Recorder(waker)
    async with (
        serving(waker, scripted=True) as kept,
        serving(waker) as removed,
        serving(waker) as added,
        checking(recorder) as checker,
    ):
        settings = {"interval": "10ms", "timeout": "5s"}
        checker.configure(
            [target(kept.endpoint, **settings), target(removed.endpoint, "green", **settings)]
        )
        script = Scripted(kept, checker, key(kept.endpoint))
        start = asyncio.create_task(checker.start())
        await script.answer(200)
        await start
        await script.answer(500)
        await script.answer(500)
        assert await script.recorded() is True  # 2 of 3 failures

        calls = len(recorder.calls)
        checker.configure([target(kept.endpoint, **settings), target(added.endpoint, **settings)])
        # The kept endpoint stays healthy; the removed one is gone; the new one is unknown,
        # so it is without traffic until its first check.
        assert checker.is_healthy(key(kept.endpoint))
        assert checker.state(key(removed.endpoint, "green")) is None
        assert checker.state(key(added.endpoint)) is HealthState.UNKNOWN
        assert recorder.calls[calls] == ({key(added.endpoint)}, True)

        await waker.until(lambda: checker.is_healthy(key(added.endpoint)))
        hits_when_removed = removed.arrivals
        # The kept endpoint's two failures still count: the third makes it unhealthy.
        await script.answer(500)
        assert await script.recorded() is False
        assert checker.unhealthy == {key(kept.endpoint)}
        # Checks of the removed endpoint stopped (the added one was checked meanwhile).
        before = added.arrivals
        await waker.until(lambda: added.arrivals >= before + 3)
        assert removed.arrivals == hits_when_removed


async def test_changed_settings_apply_from_the_next_check(waker: Waker) -> None:
    recorder = Recorder(waker)
    async with serving(waker) as upstream, checking(recorder) as checker:
        k = key(upstream.endpoint)
        checker.configure([target(upstream.endpoint, interval="1h")])
        await checker.start()
        assert upstream.arrivals == 1 and checker.is_healthy(k)
        # A shorter interval re-times the next check (it does not wait out the hour), and a
        # lower unhealthy threshold applies to it.
        upstream.status = 500
        checker.configure([target(upstream.endpoint, interval="20ms", unhealthy_threshold=1)])
        assert checker.is_healthy(k)
        await waker.until(lambda: not checker.is_healthy(k))
        assert upstream.served[1:] == [500]
        # A new path applies as well.
        upstream.status = 200
        checker.configure([target(upstream.endpoint, interval="20ms", path="/other")])
        await waker.until(lambda: checker.is_healthy(k))
        assert upstream.paths[-1] == "/other"


# --------------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------------


async def test_stop_is_clean_and_idempotent(waker: Waker, recwarn: pytest.WarningsRecorder) -> None:
    recorder = Recorder(waker)
    before = asyncio.all_tasks()
    async with serving(waker) as fast, serving(waker, delay=3.0) as slow:
        checker = HealthChecker(recorder)
        checker.configure(
            [target(fast.endpoint), target(slow.endpoint, "green", interval="1h", timeout="5s")]
        )
        start = asyncio.create_task(checker.start())
        await waker.until(lambda: fast.arrivals >= 2 and slow.arrivals == 1)
        # Stopping in the middle of the first round (a check in flight) releases start().
        async with asyncio.timeout(WAIT):
            await checker.stop()
            await start
        assert not checker.first_round_done
        await checker.stop()
        calls, tasks = len(recorder.calls), asyncio.all_tasks()
        # Nothing checks any more: a reconfigure after stop starts nothing.
        checker.configure([target(fast.endpoint, "other")])
        assert asyncio.all_tasks() == tasks
        assert len(recorder.calls) == calls + 1  # the new endpoint is unknown
        with pytest.raises(RuntimeError):
            await checker.start()
    # With the upstreams gone too, nothing the test started is left running.
    assert asyncio.all_tasks() - before == set()
    del checker
    gc.collect()
    assert [str(w.message) for w in recwarn.list] == []


async def test_stop_after_a_normal_run_leaves_nothing_behind(
    waker: Waker, recwarn: pytest.WarningsRecorder
) -> None:
    recorder = Recorder(waker)
    before = asyncio.all_tasks()
    async with serving(waker) as upstream:
        checker = HealthChecker(recorder)
        checker.configure([target(upstream.endpoint, "blue"), target(upstream.endpoint, "green")])
        await checker.start()
        await waker.until(lambda: upstream.arrivals >= 6)
        await checker.stop()
        assert asyncio.all_tasks() - before == set()
    del checker
    gc.collect()
    assert [str(w.message) for w in recwarn.list] == []


# --------------------------------------------------------------------------------------------
# From the config
# --------------------------------------------------------------------------------------------


def test_targets_from_config_covers_every_endpoint_of_checked_services() -> None:
    config = parse_config(
        """
listen: 127.0.0.1:0
services:
  shop:
    versions:
      stable: {endpoints: ["127.0.0.1:9001", "127.0.0.1:9003"], weight: 100}
      canary: {endpoints: ["[::1]:09002"], weight: 0}
    health_check: {path: /ready, interval: 2s}
  api:
    match: {path_prefix: /api}
    versions:
      v1: {endpoints: ["127.0.0.1:9100"], weight: 100}
""",
        env={},
    )
    targets = targets_from_config(config)
    assert [t.key for t in targets] == [
        ("shop", "stable", "127.0.0.1:9001"),
        ("shop", "stable", "127.0.0.1:9003"),
        ("shop", "canary", "[::1]:9002"),  # spelled as the route table keys it
    ]
    assert {t.check.path for t in targets} == {"/ready"}
    assert {t.check.interval for t in targets} == {2.0}
