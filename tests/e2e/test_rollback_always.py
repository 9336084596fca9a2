"""Functional: a rollback is never refused and never waits for a webhook.

A rollback is what an operator (or the analysis) reaches for when things go wrong, so it must be
safe to send in any phase and must act at once: it ends a run still at step 0 (its pre-rollout
hooks unanswered), it answers "no change" rather than 409 when the weights are already there, and
a gating hook that never answers delays the automatic rollback by at most one interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.test_rollout import (
    INTERVAL,
    actions,
    canary_config,
    failing_share,
    phase_is,
    start,
    steady_load,
    two_upstreams,
)
from tests.functional.test_admin import admin_proxy
from tests.helpers import Client, admin_call, get, start_laneswitch


@dataclass
class StalledHook:
    """A webhook endpoint that reads each request and answers only once `release` is set
    (never, if the test does not set it)."""

    url: str = ""
    release: asyncio.Event = field(default_factory=asyncio.Event)
    requests: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


@contextlib.asynccontextmanager
async def stalled_hook() -> AsyncIterator[StalledHook]:
    hook = StalledHook()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hook.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            hook.requests += 1
            await hook.release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    hook.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield hook
    finally:
        for writer in hook.writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


def hook_entry(url: str, kind: str, timeout: str = "2s", retries: int = 1) -> str:
    entry = f"name: {kind}, type: {kind}, url: '{url}/{kind}', timeout: {timeout}"
    return f"[{{{entry}, retries: {retries}}}]"


async def test_rollback_during_step_0_ends_the_run_and_the_canary_never_gets_traffic(
    tmp_path: Path,
) -> None:
    async with stalled_hook() as hook, two_upstreams() as (stable, canary):
        text = canary_config(
            stable.endpoint, canary.endpoint, webhooks=hook_entry(hook.url, "pre-rollout", "10s")
        )
        async with admin_proxy(tmp_path, text) as proxy, steady_load(proxy.proxy_port) as load:
            control = proxy.server.control
            await start(proxy)
            async with asyncio.timeout(5):
                while hook.requests == 0:  # step 0: the pre-rollout hook is being asked
                    await asyncio.sleep(0.01)
            assert control.rollouts.state("shop").phase == "progressing"
            answer = await proxy.call("POST", "/services/shop/rollback")
            assert answer.status == 200, answer.body
            assert control.rollouts.state("shop").phase == "rolled_back"
            # The hook now says yes: nothing may move traffic to the canary any more.
            hook.release.set()
            served = sum(load.statuses.values())
            async with asyncio.timeout(10):
                while sum(load.statuses.values()) < served + 200:  # several intervals of traffic
                    await asyncio.sleep(0.02)
            assert proxy.weights() == {"stable": 100, "canary": 0}
            assert control.rollouts.state("shop").phase == "rolled_back"
            assert "step" not in actions(proxy.server)
        assert canary.requests == []
        assert load.errors == []


async def test_rollback_is_idempotent_and_never_409(tmp_path: Path) -> None:
    async with two_upstreams() as (stable, canary):
        text = canary_config(stable.endpoint, canary.endpoint)
        async with admin_proxy(tmp_path, text) as proxy:
            for _ in range(2):  # idle, all traffic already on stable: "no change", twice
                answer = await proxy.call("POST", "/services/shop/rollback")
                assert answer.status == 200, answer.body
                assert answer.body["to"] == {"stable": 100, "canary": 0}
            reasons = [e.reason for e in proxy.server.control.events.since(0)]
            assert reasons.count("no change") == 2
            assert (await proxy.call("POST", "/services/nope/rollback")).status == 404


async def test_rollback_without_a_rollout_and_nothing_to_undo_is_no_change(tmp_path: Path) -> None:
    async with two_upstreams() as (stable, canary):
        text = f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
services:
  shop:
    versions:
      stable: {{endpoints: ["{stable.endpoint}"], weight: 90}}
      canary: {{endpoints: ["{canary.endpoint}"], weight: 10}}
"""
        async with admin_proxy(tmp_path, text) as proxy:
            answer = await proxy.call("POST", "/services/shop/rollback")
            assert answer.status == 200, answer.body
            assert proxy.weights() == {"stable": 90, "canary": 10}
            assert (
                await proxy.call("PUT", "/services/shop/weights", {"weights": {"stable": 100}})
            ).status == 200
            assert (await proxy.call("POST", "/services/shop/rollback")).status == 200
            assert proxy.weights() == {"stable": 90, "canary": 10}


async def test_a_hook_that_never_answers_delays_the_rollback_by_at_most_an_interval(
    tmp_path: Path,
) -> None:
    """Promise 6 with a gating `rollout` hook that never answers (2 s timeout, 1 retry: 4 s of
    waiting per tick if it were not bounded) and a canary that fails every request."""
    threshold = 2
    async with (
        stalled_hook() as hook,
        two_upstreams(canary_responder=failing_share(1.0)) as (stable, canary),
    ):
        text = canary_config(
            stable.endpoint,
            canary.endpoint,
            threshold=threshold,
            min_requests=5,
            webhooks=hook_entry(hook.url, "rollout"),
        )
        async with admin_proxy(tmp_path, text) as proxy, steady_load(proxy.proxy_port):
            began = time.monotonic()
            await start(proxy)
            await phase_is(proxy.server.control, "rolled_back", timeout=15)
            took = time.monotonic() - began
            assert took <= (threshold + 1) * INTERVAL + 1.0, took
            assert proxy.weights() == {"stable": 100, "canary": 0}
            assert actions(proxy.server).count("rollback") == 1


async def impatient_client(port: int, stop: asyncio.Event, outcomes: list[str]) -> None:
    """Until `stop`: one request per connection, given up after 400 ms (recorded as "gave up",
    else the status)."""
    while not stop.is_set():
        client = await Client.connect(port)
        try:
            response = await asyncio.wait_for(client.request(get("/")), 0.4)
            outcomes.append(str(response.status))
        except TimeoutError:
            outcomes.append("gave up")
        finally:
            await client.close()


@pytest.mark.parametrize("with_hook", [False, True], ids=["analysis", "analysis-and-stalled-hook"])
async def test_a_canary_that_never_answers_is_rolled_back_though_its_clients_give_up_first(
    tmp_path: Path, with_hook: bool
) -> None:
    """The worst case of promise 6: the canary accepts requests and never answers, its clients
    give up long before `timeouts.response` (but after the latency limit), and the gating
    `rollout` hook never answers either."""
    threshold = 2
    async with (
        stalled_hook() as hook,
        stalled_hook() as silent_canary,
        two_upstreams() as (stable, _),
    ):
        endpoint = silent_canary.url.removeprefix("http://")
        text = canary_config(
            stable.endpoint,
            endpoint,
            steps="[50]",
            threshold=threshold,
            min_requests=3,
            webhooks=hook_entry(hook.url, "rollout") if with_hook else "[]",
        ).replace("latency_p99: {max: 1s}", "latency_p99: {max: 200ms}")
        async with admin_proxy(tmp_path, text) as proxy:
            stop = asyncio.Event()
            outcomes: list[str] = []
            clients = [
                asyncio.create_task(impatient_client(proxy.proxy_port, stop, outcomes))
                for _ in range(8)
            ]
            try:
                began = time.monotonic()
                await start(proxy)
                await phase_is(proxy.server.control, "rolled_back", timeout=15)
                took = time.monotonic() - began
            finally:
                stop.set()
                await asyncio.gather(*clients)
            assert took <= (threshold + 1) * INTERVAL + 1.0, took
            assert proxy.weights() == {"stable": 100, "canary": 0}
            assert "gave up" in outcomes  # the canary was never seen answering
            [rollback] = [e for e in proxy.server.control.events.since(0) if e.action == "rollback"]
            assert rollback.actor == "auto" and "failed checks" in rollback.reason
            if not with_hook:
                assert "success rate 0.00%" in rollback.reason
            timeouts = proxy.server.control.stats.peek("shop", "canary").upstream_errors["timeout"]
            assert timeouts >= 3


async def test_promise_6_worst_case_with_the_real_command(tmp_path: Path) -> None:
    """The same worst case as above, measured on `laneswitch run` as an operator runs it: a
    canary that accepts requests and never answers, clients that give up after 400 ms (past the
    200 ms latency limit, long before `timeouts.response`), and a gating `rollout` hook that
    never answers (2 s timeout, 1 retry). Rolled back within (threshold + 1) x interval + 1 s
    of the start, by the analysis."""
    threshold = 2
    async with (
        stalled_hook() as hook,
        stalled_hook() as silent_canary,
        two_upstreams() as (stable, _),
    ):
        text = canary_config(
            stable.endpoint,
            silent_canary.url.removeprefix("http://"),
            steps="[50]",
            threshold=threshold,
            min_requests=3,
            webhooks=hook_entry(hook.url, "rollout"),
        ).replace("latency_p99: {max: 1s}", "latency_p99: {max: 200ms}")
        config = tmp_path / "laneswitch.yaml"
        config.write_text(text)
        proxy = await start_laneswitch(config)
        logs = asyncio.create_task(proxy.stderr.read())  # a full pipe would stall the proxy
        admin = int(proxy.admin_url.rsplit(":", 1)[1])
        stop = asyncio.Event()
        outcomes: list[str] = []
        clients = [
            asyncio.create_task(impatient_client(proxy.port, stop, outcomes)) for _ in range(8)
        ]
        try:
            began = time.monotonic()
            status, body = await admin_call(admin, "POST", "/services/shop/rollout/start")
            assert status == 200, body
            async with asyncio.timeout(15):
                while True:
                    _, body = await admin_call(admin, "GET", "/status")
                    if body["services"]["shop"]["rollout"]["phase"] == "rolled_back":
                        break
                    await asyncio.sleep(0.02)
            took = time.monotonic() - began
            versions = body["services"]["shop"]["versions"]
            _, record = await admin_call(admin, "GET", "/events")
        finally:
            stop.set()
            await asyncio.gather(*clients)
            assert await proxy.stop() == 0
            await logs
        assert took <= (threshold + 1) * INTERVAL + 1.0, took
        assert {name: v["weight"] for name, v in versions.items()} == {"stable": 100, "canary": 0}
        assert "gave up" in outcomes  # the canary was never seen answering
        assert hook.requests >= 1  # the gating hook was asked, and never answered
        [rollback] = [e for e in record["events"] if e["action"] == "rollback"]
        assert rollback["actor"] == "auto" and "failed checks" in rollback["reason"]
