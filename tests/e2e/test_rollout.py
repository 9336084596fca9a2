"""Functional: closed-loop rollouts on a real proxy with real upstreams.

Intervals are fractions of a second so a whole rollout runs in a few seconds; traffic comes from
keep-alive clients of the test, through the data plane, so every verdict is reached on what the
proxy itself measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.events import Event
from proxy.server import Server
from tests.functional.test_admin import AdminProxy, admin_proxy, value
from tests.helpers import Client, ReceivedRequest, RecordingUpstream, get, ok_response

INTERVAL = 0.5


def canary_config(
    stable: str,
    canary: str,
    *,
    steps: str = "[20, 50]",
    threshold: int = 2,
    min_requests: int = 10,
    deadline: str = "30s",
    promotion: str = "auto",
    webhooks: str = "[]",
    top: str = "",
    revision: str = "2.0",
) -> str:
    return f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
drain_timeout: 2s
{top}
services:
  shop:
    versions:
      stable: {{endpoints: ["{stable}"], weight: 100, revision: "1.0"}}
      canary: {{endpoints: ["{canary}"], weight: 0, revision: "{revision}"}}
    version_header: X-App-Version
    force: {{header: X-Canary}}
    rollout:
      strategy: canary
      stable: stable
      canary: canary
      step_weights: {steps}
      interval: {INTERVAL}s
      threshold: {threshold}
      min_requests: {min_requests}
      progress_deadline: {deadline}
      promotion: {promotion}
      metrics:
        success_rate: {{min: 95}}
        latency_p99: {{max: 1s}}
        success_rate_vs_stable: {{max_drop: 3}}
      webhooks: {webhooks}
"""


def failing_share(share: float) -> Callable[[ReceivedRequest], bytes]:
    """A responder whose answers are 503 for `share` of the requests, spread evenly."""
    counter = itertools.count()
    per_ten = round(share * 10)

    def respond(request: ReceivedRequest) -> bytes:
        if request.url == b"/healthz":
            return ok_response()
        if next(counter) % 10 < per_ten:
            return (
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nX-Own: yes\r\n\r\nbad\n"
            )
        return ok_response()

    return respond


@dataclass
class Load:
    statuses: Counter[tuple[int, str]] = field(default_factory=Counter)  # (status, version)
    errors: list[str] = field(default_factory=list)
    own_failures: int = 0  # 5xx answers the upstream itself sent (X-Own: yes)


@contextlib.asynccontextmanager
async def steady_load(
    port: int, clients: int = 4, path: Callable[[int], str] = lambda n: "/"
) -> AsyncIterator[Load]:
    """Keep-alive clients sending requests back to back until the block ends."""
    load = Load()
    stop = asyncio.Event()

    async def one() -> None:
        client = await Client.connect(port)
        try:
            for n in itertools.count():
                if stop.is_set():
                    return
                try:
                    response = await client.request(get(path(n)))
                except (ConnectionError, TimeoutError) as exc:
                    load.errors.append(repr(exc))
                    return
                version = (response.header("X-App-Version") or b"-").decode()
                load.statuses[(response.status, version)] += 1
                if response.status >= 500 and response.header("X-Own") == b"yes":
                    load.own_failures += 1
                await asyncio.sleep(0.002)  # steady, not a benchmark
        finally:
            await client.close()

    tasks = [asyncio.create_task(one()) for _ in range(clients)]
    try:
        yield load
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def phase_is(control: Any, wanted: str | set[str], timeout: float = 10.0) -> str:
    wanted = {wanted} if isinstance(wanted, str) else wanted
    async with asyncio.timeout(timeout):
        while (phase := control.rollouts.state("shop").phase) not in wanted:
            await asyncio.sleep(0.02)
    return phase


def actions(server: Server) -> list[str]:
    return [e.action for e in server.control.events.since(0) if e.action != "webhook"]


def events(server: Server, action: str) -> list[Event]:
    return [e for e in server.control.events.since(0) if e.action == action]


@contextlib.asynccontextmanager
async def two_upstreams(
    stable_responder: Callable[[ReceivedRequest], bytes] | None = None,
    canary_responder: Callable[[ReceivedRequest], bytes] | None = None,
) -> AsyncIterator[tuple[RecordingUpstream, RecordingUpstream]]:
    stable = RecordingUpstream("stable", stable_responder or (lambda r: ok_response()))
    canary = RecordingUpstream("canary", canary_responder or (lambda r: ok_response()))
    await stable.start()
    await canary.start()
    try:
        yield stable, canary
    finally:
        await stable.stop()
        await canary.stop()


async def start(proxy: AdminProxy) -> dict[str, Any]:
    answer = await proxy.call("POST", "/services/shop/rollout/start")
    assert answer.status == 200, answer.body
    assert isinstance(answer.body, dict)
    return answer.body


# -- canary ---------------------------------------------------------------------------------------


async def test_a_healthy_canary_walks_every_step_and_is_promoted(tmp_path: Path) -> None:
    async with (
        two_upstreams() as (stable, canary),
        admin_proxy(tmp_path, canary_config(stable.endpoint, canary.endpoint)) as proxy,
        steady_load(proxy.proxy_port) as load,
    ):
        status = await start(proxy)
        assert status["phase"] == "progressing" and status["steps"] == 2
        await phase_is(proxy.server.control, "promoted")
        assert proxy.weights() == {"stable": 0, "canary": 100}
        steps = events(proxy.server, "step")
        assert [e.to for e in steps] == [
            {"stable": 80, "canary": 20},
            {"stable": 50, "canary": 50},
        ]
        assert actions(proxy.server) == ["start", "step", "step", "promoting", "promote"]
        assert steps[1].values["success_rate"] == 100.0
        assert steps[1].values["requests"] >= 10
        assert steps[1].thresholds["success_rate_min"] == 95
        status = (await proxy.call("GET", "/status")).body["services"]["shop"]["rollout"]
        assert status["phase"] == "promoted" and status["step"] == 2
        assert status["last_analysis"]["verdict"] == "pass"
        assert status["last_analysis"]["thresholds"]["latency_p99_max_ms"] == 1000
        metrics = await proxy.metrics()
        phases = metrics["laneswitch_rollout_phase"]
        assert value(phases, "laneswitch_rollout_phase", service="shop", phase="promoted") == 1
        assert value(phases, "laneswitch_rollout_phase", service="shop", phase="idle") == 0
        analysed = metrics["laneswitch_analysis_value"]
        labels = {"service": "shop", "version": "canary", "metric": "success_rate"}
        assert value(analysed, "laneswitch_analysis_value", **labels) == 100.0
        # After a promotion, `rollback` returns all traffic to the version it came from.
        rolled = await proxy.call("POST", "/services/shop/rollback")
        assert rolled.status == 200 and proxy.weights() == {"stable": 100, "canary": 0}
        assert proxy.server.control.rollouts.state("shop").phase == "rolled_back"
    assert load.errors == []
    assert {status for status, _ in load.statuses} == {200}
    assert canary.requests and stable.requests


async def test_a_canary_failing_30_percent_is_rolled_back_in_time(tmp_path: Path) -> None:
    threshold = 2
    async with (
        two_upstreams(canary_responder=failing_share(0.3)) as (stable, canary),
        admin_proxy(
            tmp_path, canary_config(stable.endpoint, canary.endpoint, threshold=threshold)
        ) as proxy,
        steady_load(proxy.proxy_port) as load,
    ):
        await start(proxy)
        await phase_is(proxy.server.control, "rolled_back")
        assert proxy.weights() == {"stable": 100, "canary": 0}
        [first_step] = events(proxy.server, "step")
        [rollback] = events(proxy.server, "rollback")
        # The promise: within (threshold + 1) x interval of the canary getting traffic.
        assert rollback.time - first_step.time <= (threshold + 1) * INTERVAL
        assert rollback.actor == "auto"
        assert rollback.from_ == {"stable": 80, "canary": 20}
        assert rollback.to == {"stable": 100, "canary": 0}
        assert 60 <= rollback.values["success_rate"] <= 80
        assert rollback.values["failed_checks"] == threshold
        assert rollback.values["stable_success_rate"] == 100.0
        assert rollback.thresholds["success_rate_min"] == 95
        assert rollback.thresholds["threshold"] == threshold
        assert actions(proxy.server) == ["start", "step", "check_failed", "rollback"]
        metrics = await proxy.metrics()
        rollbacks = metrics["laneswitch_rollbacks"]
        labels = {"service": "shop", "reason": "failed_checks"}
        assert value(rollbacks, "laneswitch_rollbacks_total", **labels) == 1
        # No automatic retry.
        served = len(canary.requests)
        await asyncio.sleep(2 * INTERVAL)
        assert proxy.server.control.rollouts.state("shop").phase == "rolled_back"
        assert len(canary.requests) == served
    assert load.errors == []
    failed = {key: n for key, n in load.statuses.items() if key[0] != 200}
    assert set(failed) == {(503, "canary")} and sum(failed.values()) == load.own_failures


async def test_a_canary_with_no_traffic_is_never_promoted(tmp_path: Path) -> None:
    async with (
        two_upstreams() as (stable, canary),
        admin_proxy(
            tmp_path, canary_config(stable.endpoint, canary.endpoint, deadline="1500ms")
        ) as proxy,
    ):
        await start(proxy)
        await phase_is(proxy.server.control, "rolled_back")
        assert proxy.weights() == {"stable": 100, "canary": 0}
        holds = events(proxy.server, "hold")
        assert holds and all(e.values["requests"] == 0 for e in holds)
        [rollback] = events(proxy.server, "rollback")
        assert "progress deadline 1.5s" in rollback.reason
        assert rollback.values["requests"] == 0 and rollback.thresholds["min_requests"] == 10
        status = (await proxy.call("GET", "/status")).body["services"]["shop"]["rollout"]
        assert status["phase"] == "rolled_back" and "progress deadline" in status["reason"]
        assert "promote" not in actions(proxy.server)


async def test_client_errors_and_client_aborts_never_fail_a_canary(tmp_path: Path) -> None:
    def canary_respond(request: ReceivedRequest) -> bytes:
        if request.url == b"/hang":
            return b""  # never answers: the client gives up first
        if request.url == b"/missing":
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        return ok_response()

    def stable_respond(request: ReceivedRequest) -> bytes:
        if request.url == b"/missing":
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        return ok_response()

    async def aborting_client(port: int, stop: asyncio.Event) -> None:
        while not stop.is_set():
            client = await Client.connect(port)
            await client.send(get("/hang", extra="X-Canary: canary\r\n"))
            await asyncio.sleep(0.05)
            await client.close()

    config = canary_config("S", "C", min_requests=10)
    async with two_upstreams(stable_respond, canary_respond) as (stable, canary):
        config = config.replace('"S"', f'"{stable.endpoint}"').replace(
            '"C"', f'"{canary.endpoint}"'
        )
        async with (
            admin_proxy(tmp_path, config) as proxy,
            steady_load(proxy.proxy_port, path=lambda n: "/missing" if n % 2 else "/") as load,
        ):
            stop = asyncio.Event()
            aborts = asyncio.create_task(aborting_client(proxy.proxy_port, stop))
            await start(proxy)
            await phase_is(proxy.server.control, "promoted")
            stop.set()
            await aborts
            assert proxy.server.control.stats.get("shop", "canary").client_aborts > 0
            judged = [
                e for e in events(proxy.server, "step")[1:] + events(proxy.server, "promoting")
            ]
            assert judged and all(e.values["success_rate"] == 100.0 for e in judged)
            assert "check_failed" not in actions(proxy.server)
    assert load.errors == []
    assert {(404, "canary"), (200, "canary")} <= set(load.statuses)


def saved_step(path: Path) -> int:
    try:
        step: int = json.loads(path.read_text())["rollouts"]["shop"]["step"]
    except (OSError, ValueError, KeyError):
        return 0
    return step


async def test_a_restart_mid_rollout_resumes_at_the_same_step(tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    text = ""
    async with two_upstreams() as (stable, canary):
        text = canary_config(
            stable.endpoint,
            canary.endpoint,
            steps="[20, 40, 60, 80]",
            top=f"state_file: {state_file}",
        )
        async with admin_proxy(tmp_path, text) as proxy, steady_load(proxy.proxy_port):
            await start(proxy)
            async with asyncio.timeout(10):
                while saved_step(state_file) < 2:
                    await asyncio.sleep(0.02)
        saved = json.loads(state_file.read_text())
        step = saved["rollouts"]["shop"]["step"]
        assert saved["rollouts"]["shop"]["phase"] == "progressing" and step >= 2
        percent = [20, 40, 60, 80][step - 1]
        assert saved["weights"]["shop"] == {"stable": 100 - percent, "canary": percent}
        async with admin_proxy(tmp_path, text) as proxy:
            control = proxy.server.control
            status = control.rollouts.status("shop")
            assert status is not None
            assert (status["phase"], status["step"]) == ("progressing", step)
            assert proxy.weights() == {"stable": 100 - percent, "canary": percent}
            routed = {v.name: v.weight for v in proxy.server.table.services[0].versions}
            assert routed == {"stable": 100 - percent, "canary": percent}
            before = len(events(proxy.server, "step"))
            async with steady_load(proxy.proxy_port):
                await phase_is(control, "promoted")
            later = events(proxy.server, "step")[before:]
            assert [e.values["step"] for e in later] == list(range(step + 1, 5))


# -- blue-green -----------------------------------------------------------------------------------


def blue_green_config(blue: str, green: str, bake: str = "5s") -> str:
    return f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
drain_timeout: 2s
services:
  shop:
    versions:
      blue: {{endpoints: ["{blue}"], weight: 100, revision: "1"}}
      green: {{endpoints: ["{green}"], weight: 0, revision: "2"}}
    version_header: X-App-Version
    rollout:
      strategy: blue-green
      active: blue
      preview: green
      pre_switch: [{{path: /healthz, expect_status: 200}}]
      bake_time: {bake}
      interval: {INTERVAL}s
      threshold: 2
      min_requests: 10
      metrics: {{success_rate: {{min: 95}}}}
"""


async def test_a_blue_green_bake_that_fails_switches_back_failing_nothing_itself(
    tmp_path: Path,
) -> None:
    async with (
        two_upstreams(canary_responder=failing_share(0.3)) as (blue, green),
        admin_proxy(tmp_path, blue_green_config(blue.endpoint, green.endpoint)) as proxy,
        steady_load(proxy.proxy_port, clients=6) as load,
    ):
        await start(proxy)
        await phase_is(proxy.server.control, "rolled_back")
        assert proxy.weights() == {"blue": 100, "green": 0}
        assert actions(proxy.server) == ["start", "switch", "check_failed", "rollback"]
        [switch] = events(proxy.server, "switch")
        assert switch.to == {"blue": 0, "green": 100}
        assert switch.values["checks"][0]["ok"] is True
        [rollback] = events(proxy.server, "rollback")
        assert rollback.to == {"blue": 100, "green": 0}
        assert rollback.values["success_rate"] < 95
        served_by_blue = len(blue.requests)
        async with asyncio.timeout(5):
            while len(blue.requests) < served_by_blue + 20:
                await asyncio.sleep(0.02)
    assert load.errors == []  # no connection failed across either switch
    failed = {key: n for key, n in load.statuses.items() if key[0] != 200}
    # The only failures are green's own answers: none from the switches themselves.
    assert set(failed) == {(503, "green")}
    assert sum(failed.values()) == load.own_failures


async def test_a_healthy_blue_green_bake_is_promoted_after_the_bake_time(tmp_path: Path) -> None:
    async with (
        two_upstreams() as (blue, green),
        admin_proxy(tmp_path, blue_green_config(blue.endpoint, green.endpoint, "1s")) as proxy,
        steady_load(proxy.proxy_port) as load,
    ):
        await start(proxy)
        await phase_is(proxy.server.control, "promoted")
        assert proxy.weights() == {"blue": 0, "green": 100}
        [switch] = events(proxy.server, "switch")
        [promote] = events(proxy.server, "promote")
        assert promote.time - switch.time >= 1.0
        assert "bake" in actions(proxy.server)
    assert load.errors == [] and {s for s, _ in load.statuses} == {200}


async def test_a_bake_shorter_than_an_interval_still_needs_two_passing_intervals(
    tmp_path: Path,
) -> None:
    """SPEC §6: bake_time *and* at least 2 passing intervals; one interval is one sample."""
    async with (
        two_upstreams() as (blue, green),
        admin_proxy(tmp_path, blue_green_config(blue.endpoint, green.endpoint, "100ms")) as proxy,
        steady_load(proxy.proxy_port),
    ):
        await start(proxy)
        await phase_is(proxy.server.control, "promoted")
        judged = [
            e for e in proxy.server.control.events.since(0) if e.action in ("bake", "promoting")
        ]
        assert [e.action for e in judged] == ["bake", "promoting"]
        assert [e.values["passing_intervals"] for e in judged] == [1, 2]
        assert judged[1].thresholds["min_passing_intervals"] == 2
        [switch] = events(proxy.server, "switch")
        assert judged[1].time - switch.time >= 2 * INTERVAL - 0.05


# -- webhooks -------------------------------------------------------------------------------------


@dataclass
class Hooks:
    url: str
    statuses: dict[str, int] = field(default_factory=dict)  # path -> status to answer
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def hook_server() -> AsyncIterator[Hooks]:
    hooks = Hooks("")

    async def handle(request: web.Request) -> web.Response:
        hooks.received.append((request.path, await request.json()))
        return web.Response(status=hooks.statuses.get(request.path, 200), text="hook says no")

    app = web.Application()
    app.router.add_post("/{name}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    hooks.url = f"http://127.0.0.1:{port}"
    try:
        yield hooks
    finally:
        await runner.cleanup()


def webhooks(url: str, *kinds: str) -> str:
    entries = [
        f"{{name: {kind}, type: {kind}, url: '{url}/{kind}', timeout: 1s, retries: 1, "
        f"metadata: {{team: shop}}}}"
        for kind in kinds
    ]
    return "[" + ", ".join(entries) + "]"


async def test_a_failing_confirm_promotion_hook_holds_the_promotion(tmp_path: Path) -> None:
    async with (
        hook_server() as hooks,
        two_upstreams() as (stable, canary),
    ):
        hooks.statuses["/confirm-promotion"] = 503
        text = canary_config(
            stable.endpoint,
            canary.endpoint,
            steps="[50]",
            webhooks=webhooks(hooks.url, "confirm-promotion", "post-rollout"),
        )
        async with admin_proxy(tmp_path, text) as proxy, steady_load(proxy.proxy_port):
            control = proxy.server.control
            await start(proxy)
            await phase_is(control, "promoting")
            async with asyncio.timeout(5):
                while len(events(proxy.server, "hold")) < 2:
                    await asyncio.sleep(0.02)
            assert proxy.weights() == {"stable": 50, "canary": 50}  # held at the last step
            hold = events(proxy.server, "hold")[0]
            assert "promotion held" in hold.reason and "HTTP 503" in hold.reason
            verdicts = [e for e in events(proxy.server, "webhook") if e.to == "fail"]
            assert verdicts and verdicts[0].values["attempts"] == 2  # retries: 1
            hooks.statuses["/confirm-promotion"] = 200
            await phase_is(control, "promoted")
            assert proxy.weights() == {"stable": 0, "canary": 100}
            async with asyncio.timeout(5):
                while not any(path == "/post-rollout" for path, _ in hooks.received):
                    await asyncio.sleep(0.02)
        path, body = hooks.received[0]
        assert path == "/confirm-promotion"
        assert body["name"] == "shop" and body["type"] == "confirm-promotion"
        assert body["metadata"] == {"team": "shop"} and body["checksum"] == "2.0"
        assert body["phase"] == "promoting" and body["candidate"] == "canary"


async def test_a_failing_pre_rollout_hook_counts_as_a_failed_check(tmp_path: Path) -> None:
    async with hook_server() as hooks, two_upstreams() as (stable, canary):
        hooks.statuses["/pre-rollout"] = 500
        text = canary_config(
            stable.endpoint,
            canary.endpoint,
            threshold=2,
            webhooks=webhooks(hooks.url, "pre-rollout", "rollback"),
        )
        async with admin_proxy(tmp_path, text) as proxy, steady_load(proxy.proxy_port):
            await start(proxy)
            await phase_is(proxy.server.control, "rolled_back")
            assert actions(proxy.server) == ["start", "check_failed", "rollback"]
            [failed] = events(proxy.server, "check_failed")
            assert failed.values["checks"][0]["status"] == 500
            assert "pre-rollout 'pre-rollout' failed: HTTP 500" in failed.reason
            async with asyncio.timeout(5):
                while not any(path == "/rollback" for path, _ in hooks.received):
                    await asyncio.sleep(0.02)
        assert canary.requests == []  # never got traffic


# -- the admin calls, reloads ---------------------------------------------------------------------


async def test_rollout_calls_answer_409_when_the_phase_does_not_allow_them(
    tmp_path: Path,
) -> None:
    async with (
        two_upstreams() as (stable, canary),
        admin_proxy(
            tmp_path, canary_config(stable.endpoint, canary.endpoint, promotion="manual")
        ) as proxy,
    ):
        for action in ("pause", "resume", "promote", "abort"):
            answer = await proxy.call("POST", f"/services/shop/rollout/{action}")
            assert answer.status == 409, (action, answer.body)
            assert "idle" in answer.error
        assert (await proxy.call("POST", "/services/nope/rollout/start")).status == 404
        assert (await proxy.call("POST", "/services/shop/rollout/jump")).status == 404
        await start(proxy)
        again = await proxy.call("POST", "/services/shop/rollout/start")
        assert again.status == 409 and "already progressing" in again.error
        paused = await proxy.call("POST", "/services/shop/rollout/pause")
        assert paused.status == 200 and paused.body["phase"] == "paused"
        assert (await proxy.call("POST", "/services/shop/rollout/pause")).status == 409
        resumed = await proxy.call("POST", "/services/shop/rollout/resume")
        assert resumed.status == 200 and resumed.body["phase"] == "progressing"
        aborted = await proxy.call("POST", "/services/shop/rollout/abort")
        assert aborted.status == 200 and aborted.body["phase"] == "aborted"
        assert proxy.weights() == {"stable": 100, "canary": 0}
        assert (await proxy.call("POST", "/services/shop/rollout/promote")).status == 409
        # A new run after an abort; `promote` skips the remaining steps.
        await start(proxy)
        promoted = await proxy.call("POST", "/services/shop/rollout/promote")
        assert promoted.status == 200 and promoted.body["phase"] in ("promoting", "promoted")
        await phase_is(proxy.server.control, "promoted")
        assert proxy.weights() == {"stable": 0, "canary": 100}
        admin_actions = [
            e.action for e in proxy.server.control.events.since(0) if e.actor == "admin"
        ]
        assert admin_actions[:5] == ["start", "pause", "resume", "abort", "start"]
        refused = await proxy.call("POST", "/services/shop/rollout/start")
        assert refused.status == 409 and "already has all the traffic" in refused.error


async def test_a_service_without_a_rollout_block_has_no_rollout_calls(tmp_path: Path) -> None:
    from tests.functional.test_admin import config_text

    async with admin_proxy(tmp_path, config_text("127.0.0.1:9", "127.0.0.1:10")) as proxy:
        answer = await proxy.call("POST", "/services/shop/rollout/start")
        assert answer.status == 404 and "no rollout block" in answer.error


async def test_a_manual_weights_change_pauses_a_running_rollout(tmp_path: Path) -> None:
    async with (
        two_upstreams() as (stable, canary),
        admin_proxy(tmp_path, canary_config(stable.endpoint, canary.endpoint)) as proxy,
    ):
        await start(proxy)
        answer = await proxy.call(
            "PUT", "/services/shop/weights", {"weights": {"stable": 70, "canary": 30}}
        )
        assert answer.status == 200
        assert proxy.server.control.rollouts.state("shop").phase == "paused"
        await asyncio.sleep(2 * INTERVAL)
        assert proxy.weights() == {"stable": 70, "canary": 30}  # the rollout did not undo it


async def test_a_reload_with_a_new_canary_revision_starts_a_rollout(tmp_path: Path) -> None:
    async with (
        two_upstreams() as (stable, canary),
        admin_proxy(tmp_path, canary_config(stable.endpoint, canary.endpoint)) as proxy,
        steady_load(proxy.proxy_port),
    ):
        control = proxy.server.control
        proxy.config_path.write_text(
            canary_config(stable.endpoint, canary.endpoint, revision="2.0", top="trusted_hops: 1")
        )
        assert (await control.reload()).ok
        assert control.rollouts.state("shop").phase == "idle"  # unrelated edit
        proxy.config_path.write_text(
            canary_config(stable.endpoint, canary.endpoint, revision="2.1")
        )
        assert (await control.reload()).ok
        [started] = events(proxy.server, "start")
        assert started.actor == "config"
        assert "canary revision 2.0 -> 2.1 in the config" in started.reason
        await phase_is(control, "promoted")


# -- the command line -----------------------------------------------------------------------------


async def test_the_rollout_command_drives_a_rollout_that_status_shows(tmp_path: Path) -> None:
    from tests.e2e.test_client_cli import client_env, run_cli

    async with (
        two_upstreams() as (stable, canary),
        admin_proxy(
            tmp_path, canary_config(stable.endpoint, canary.endpoint, promotion="manual")
        ) as proxy,
        steady_load(proxy.proxy_port),
    ):
        env = client_env(LANESWITCH_ADMIN=proxy.admin_url)
        code, out, err = await run_cli("rollout", "start", "shop", env=env)
        assert code == 0, err
        assert "shop: rollout start: phase progressing" in out
        control = proxy.server.control
        async with asyncio.timeout(10):
            while not control.rollouts.state("shop").awaiting_promotion:
                await asyncio.sleep(0.02)
        code, out, err = await run_cli("status", env=env)
        assert code == 0, err
        assert "rollout canary stable -> canary: [##########----------] step 2 of 2" in out
        assert "waiting for `laneswitch rollout promote`" in out
        assert "last analysis (pass): canary 100% ok" in out
        code, out, err = await run_cli("rollout", "promote", "shop", env=env)
        assert code == 0, err
        await phase_is(control, "promoted")
        code, out, err = await run_cli("rollout", "pause", "shop", env=env)
        assert code == 1
        assert "refused (409): cannot pause a rollout that is promoted" in err
