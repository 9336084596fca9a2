"""Functional: the admin API and its metrics on a real proxy on loopback.

Every call goes over a real socket to the admin listener of a `Server` started in-process, and
traffic goes through the real data plane to recording upstreams, so "traffic moved" is what the
upstreams saw, not what the control plane says.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy.config.loader import parse_config
from proxy.metrics import LATENCY_BUCKETS
from proxy.server import Server
from tests.helpers import Client, RecordingUpstream, get, raw_upstream, read_request_head

TOKEN = "s3cret-token"


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def config_text(
    blue: str,
    green: str,
    *,
    blue_weight: int = 100,
    weight_total: int = 100,
    token: str | None = None,
    metrics_public: bool = False,
    service_extra: str = "",
    top_extra: str = "",
) -> str:
    admin = "{listen: 127.0.0.1:0"
    if token is not None:
        admin += f", token: {token}"
    if metrics_public:
        admin += ", metrics_public: true"
    admin += "}"
    return f"""
listen: 127.0.0.1:0
admin: {admin}
drain_timeout: 5s
{top_extra}
services:
  shop:
    weight_total: {weight_total}
    versions:
      blue: {{endpoints: ["{blue}"], weight: {blue_weight}}}
      green: {{endpoints: ["{green}"], weight: {weight_total - blue_weight}}}
    version_header: X-App-Version
{service_extra}
"""


@dataclass
class Answer:
    status: int
    body: Any  # decoded JSON, or the text when the answer is not JSON
    headers: Any

    @property
    def error(self) -> str:
        assert isinstance(self.body, dict), self.body
        message = self.body["error"]
        assert isinstance(message, str)
        return message


@dataclass
class AdminProxy:
    """A proxy with its admin API, both on loopback port 0, and a client for the admin API."""

    server: Server
    session: aiohttp.ClientSession
    config_path: Path
    token: str | None

    @property
    def admin_url(self) -> str:
        port = self.server.admin_port
        assert port is not None
        return f"http://127.0.0.1:{port}"

    @property
    def proxy_port(self) -> int:
        return self.server.addresses[0][1]

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        auth: str | None = "default",
    ) -> Answer:
        headers: dict[str, str] = {}
        if auth == "default":
            if self.token is not None:
                headers["Authorization"] = f"Bearer {self.token}"
        elif auth is not None:
            headers["Authorization"] = auth
        kwargs: dict[str, Any] = {"headers": headers}
        if raw is not None:
            kwargs["data"] = raw
            headers["Content-Type"] = "application/json"
        elif body is not None:
            kwargs["json"] = body
        async with self.session.request(method, self.admin_url + path, **kwargs) as response:
            text = await response.text()
            decoded: Any = text
            if response.content_type == "application/json":
                decoded = await response.json()
            return Answer(response.status, decoded, response.headers)

    async def metrics(self) -> dict[str, list[Sample]]:
        answer = await self.call("GET", "/metrics")
        assert answer.status == 200, answer.body
        assert answer.headers["Content-Type"].startswith("text/plain")
        return parse_metrics(answer.body)

    def weights(self) -> dict[str, int]:
        return dict(self.server.control.weights["shop"])


def parse_metrics(text: str) -> dict[str, list[Sample]]:
    """Samples by family name, as Prometheus would read them."""
    families: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        families.setdefault(family.name, []).extend(family.samples)
    return families


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample called `name` whose labels are exactly `labels`."""
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples in {samples}"
    return found[0]


@contextlib.asynccontextmanager
async def admin_proxy(tmp_path: Path, text: str) -> AsyncIterator[AdminProxy]:
    path = tmp_path / "laneswitch.yaml"
    path.write_text(text)
    server = Server(parse_config(text, env={}), config_path=str(path), config_text=text)
    await server.start(watch=False)
    token = server.config.admin.token
    try:
        async with aiohttp.ClientSession() as session:
            yield AdminProxy(server, session, path, token)
    finally:
        await server.stop(drain_timeout=1.0)


@contextlib.asynccontextmanager
async def blue_green() -> AsyncIterator[tuple[RecordingUpstream, RecordingUpstream]]:
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    try:
        yield blue, green
    finally:
        await blue.stop()
        await green.stop()


async def send(port: int, count: int) -> Counter[str]:
    """`count` requests through the proxy on one keep-alive connection: who answered, by the
    version header, and the status when it is not 200."""
    seen: Counter[str] = Counter()
    client = await Client.connect(port)
    try:
        for _ in range(count):
            response = await client.request(get())
            version = response.header("X-App-Version")
            seen[version.decode() if version else f"status {response.status}"] += 1
    finally:
        await client.close()
    return seen


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition on the proxy's own state, which has no event to await."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# -- health and readiness -------------------------------------------------------------------------


async def test_healthz_and_readyz_need_no_token_and_readyz_follows_the_drain(
    tmp_path: Path,
) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint, token=TOKEN)) as proxy,
    ):
        for path in ("/healthz", "/readyz"):
            answer = await proxy.call("GET", path, auth=None)
            assert answer.status == 200, (path, answer.body)
        # What Server.stop() does first: /readyz turns 503 so a load balancer stops sending.
        proxy.server.control.draining = True
        answer = await proxy.call("GET", "/readyz", auth=None)
        assert answer.status == 503
        assert answer.body == {"status": "draining"}
        assert (await proxy.call("GET", "/healthz", auth=None)).status == 200


# -- authentication -------------------------------------------------------------------------------

MUTATIONS: list[tuple[str, str, Any]] = [
    ("POST", "/services/shop/switch", {"to": "green"}),
    ("PUT", "/services/shop/weights", {"weights": {"blue": 50, "green": 50}}),
    ("POST", "/services/shop/rollback", None),
    ("POST", "/reload", None),
]
READS: list[tuple[str, str, Any]] = [
    ("GET", "/status", None),
    ("GET", "/events", None),
    ("GET", "/metrics", None),
]


@pytest.mark.parametrize(
    "auth",
    [None, "Bearer wrong-token", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer"],
    ids=["missing", "wrong", "longer", "basic-scheme", "no-scheme", "empty"],
)
async def test_every_call_without_the_right_token_is_401_and_changes_nothing(
    tmp_path: Path, auth: str | None
) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(
            tmp_path, config_text(blue.endpoint, green.endpoint, blue_weight=90, token=TOKEN)
        ) as proxy,
    ):
        # A weights change first, so that a rollback would have something to undo.
        assert (await proxy.call("PUT", *MUTATIONS[1][1:])).status == 200
        # And a file that differs, so that a reload would change the config.
        proxy.config_path.write_text(config_text(blue.endpoint, green.endpoint, blue_weight=10))
        control = proxy.server.control
        before = (proxy.weights(), len(control.events), dict(control.reloads), control.config_hash)
        for method, path, body in MUTATIONS + READS:
            answer = await proxy.call(method, path, body, auth=auth)
            assert answer.status == 401, (method, path, answer.body)
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
            assert "token" in answer.error
        after = (proxy.weights(), len(control.events), dict(control.reloads), control.config_hash)
        assert after == before
        assert await send(proxy.proxy_port, 4) == {"blue": 2, "green": 2}


async def test_the_right_token_opens_every_call(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint, token=TOKEN)) as proxy,
    ):
        for method, path, body in READS + MUTATIONS:
            answer = await proxy.call(method, path, body, auth=f"Bearer {TOKEN}")
            assert answer.status == 200, (method, path, answer.body)
        # The scheme is case-insensitive (RFC 9110), the token is not.
        assert (await proxy.call("GET", "/status", auth=f"bearer {TOKEN}")).status == 200
        assert (await proxy.call("GET", "/status", auth=f"Bearer {TOKEN.upper()}")).status == 401


async def test_unknown_paths_are_401_before_404_with_a_token(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint, token=TOKEN)) as proxy,
    ):
        assert (await proxy.call("GET", "/nope", auth=None)).status == 401
        answer = await proxy.call("GET", "/nope")
        assert answer.status == 404
        assert answer.error == "Not Found"


async def test_metrics_public_opens_only_metrics(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(
            tmp_path, config_text(blue.endpoint, green.endpoint, token=TOKEN, metrics_public=True)
        ) as proxy,
    ):
        answer = await proxy.call("GET", "/metrics", auth=None)
        assert answer.status == 200
        assert "laneswitch_weight{" in answer.body
        assert (await proxy.call("GET", "/status", auth=None)).status == 401
        assert (await proxy.call("POST", *MUTATIONS[0][1:], auth=None)).status == 401


async def test_without_a_token_every_call_is_open(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        assert proxy.token is None
        for method, path, body in READS:
            assert (await proxy.call(method, path, body, auth=None)).status == 200


# -- switch ---------------------------------------------------------------------------------------


async def test_switch_moves_all_traffic_and_records_the_event(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        assert await send(proxy.proxy_port, 5) == {"blue": 5}
        answer = await proxy.call("POST", "/services/shop/switch", {"to": "green"})
        assert answer.status == 200, answer.body
        assert answer.body == {
            "service": "shop",
            "from": {"blue": 100, "green": 0},
            "to": {"blue": 0, "green": 100},
            "dry_run": False,
        }
        assert await send(proxy.proxy_port, 5) == {"green": 5}
        assert len(blue.requests) == 5 and len(green.requests) == 5

        events = (await proxy.call("GET", "/events")).body["events"]
        [event] = events
        assert event["actor"] == "admin"
        assert event["action"] == "switch"
        assert event["service"] == "shop"
        assert event["from"] == {"blue": 100, "green": 0}
        assert event["to"] == {"blue": 0, "green": 100}
        status = (await proxy.call("GET", "/status")).body
        assert status["services"]["shop"]["versions"]["green"]["weight"] == 100
        assert status["services"]["shop"]["last_decision"]["id"] == event["id"]


async def test_switch_dry_run_changes_nothing(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        answer = await proxy.call("POST", "/services/shop/switch", {"to": "green", "dry_run": True})
        assert answer.status == 200
        assert answer.body["dry_run"] is True
        assert answer.body["to"] == {"blue": 0, "green": 100}
        assert proxy.weights() == {"blue": 100, "green": 0}
        assert (await proxy.call("GET", "/events")).body == {"events": []}
        assert await send(proxy.proxy_port, 3) == {"blue": 3}


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/services/nope/switch", {"to": "green"}, "nope"),
        ("/services/shop/switch", {"to": "purple"}, "purple"),
    ],
    ids=["unknown-service", "unknown-version"],
)
async def test_switch_to_unknown_service_or_version_is_404(
    tmp_path: Path, path: str, body: dict[str, Any], needle: str
) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        answer = await proxy.call("POST", path, body)
        assert answer.status == 404
        assert needle in answer.error
        assert proxy.weights() == {"blue": 100, "green": 0}
        assert len(proxy.server.control.events) == 0


HEALTH = "    health_check: {path: /healthz, interval: 30s, timeout: 1s}"


async def test_switch_to_a_version_without_healthy_endpoint_is_409_unless_forced(
    tmp_path: Path,
) -> None:
    blue = await RecordingUpstream("blue").start()
    dead = f"127.0.0.1:{free_port()}"
    try:
        async with admin_proxy(
            tmp_path, config_text(blue.endpoint, dead, service_extra=HEALTH)
        ) as proxy:
            answer = await proxy.call("POST", "/services/shop/switch", {"to": "green"})
            assert answer.status == 409
            assert "healthy" in answer.error
            assert proxy.weights() == {"blue": 100, "green": 0}
            assert len(proxy.server.control.events) == 0
            families = await proxy.metrics()
            healthy = families["laneswitch_endpoint_healthy"]
            assert (
                value(
                    healthy,
                    "laneswitch_endpoint_healthy",
                    service="shop",
                    version="green",
                    endpoint=dead,
                )
                == 0
            )
            assert (
                value(
                    healthy,
                    "laneswitch_endpoint_healthy",
                    service="shop",
                    version="blue",
                    endpoint=blue.endpoint,
                )
                == 1
            )

            answer = await proxy.call(
                "POST", "/services/shop/switch", {"to": "green", "force": True}
            )
            assert answer.status == 200, answer.body
            assert proxy.weights() == {"blue": 0, "green": 100}
            # Forced onto a version with no healthy endpoint: the proxy says so itself.
            assert await send(proxy.proxy_port, 2) == {"status 503": 2}
    finally:
        await blue.stop()


# -- weights --------------------------------------------------------------------------------------


async def test_weights_split_the_traffic_as_set(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(
            tmp_path,
            config_text(blue.endpoint, green.endpoint, weight_total=1000, blue_weight=1000),
        ) as proxy,
    ):
        answer = await proxy.call(
            "PUT", "/services/shop/weights", {"weights": {"blue": 750, "green": 250}}
        )
        assert answer.status == 200, answer.body
        assert answer.body["to"] == {"blue": 750, "green": 250}
        # A smooth weighted round-robin is exact over whole cycles.
        assert await send(proxy.proxy_port, 40) == {"blue": 30, "green": 10}
        [event] = proxy.server.control.events.since(0)
        assert (event.actor, event.action) == ("admin", "weights")


@pytest.mark.parametrize(
    ("raw", "status", "needle"),
    [
        (b'{"weights": {"blue": 110, "green": -10}}', 400, ">= 0"),
        (b'{"weights": {"blue": 50, "green": 40}}', 400, "sum"),
        (b'{"weights": {"blue": 0, "green": 0}}', 400, "above 0"),
        (b'{"weights": {"blue": 50, "purple": 50}}', 404, "purple"),
        (b'{"weights": {"blue": 50, "green": 50}', 400, "malformed JSON"),
        (b"", 400, "JSON object"),
        (b'[{"blue": 50}]', 400, "JSON object"),
        (b'{"weights": [50, 50]}', 400, "weights"),
        (b'{"weights": {"blue": "50", "green": 50}}', 400, "weights.blue"),
        (b'{"weights": {"blue": 50.5, "green": 49.5}}', 400, "weights.blue"),
        (b'{"weights": {"blue": true, "green": 0}}', 400, "weights.blue"),
        (b'{"weights": {"blue": 50, "green": 50}, "force": true}', 400, "force: unknown key"),
        (b'{"wieghts": {"blue": 50, "green": 50}}', 400, "wieghts: unknown key"),
    ],
    ids=[
        "negative",
        "wrong-sum",
        "all-zero",
        "unknown-version",
        "malformed-json",
        "empty-body",
        "array-body",
        "weights-not-object",
        "string-weight",
        "float-weight",
        "bool-weight",
        "unknown-key",
        "typo-key",
    ],
)
async def test_bad_weights_are_refused_and_change_nothing(
    tmp_path: Path, raw: bytes, status: int, needle: str
) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        answer = await proxy.call("PUT", "/services/shop/weights", raw=raw)
        assert answer.status == status, answer.body
        assert needle in answer.error
        assert proxy.weights() == {"blue": 100, "green": 0}
        assert len(proxy.server.control.events) == 0
        assert await send(proxy.proxy_port, 2) == {"blue": 2}


async def test_weights_of_an_unknown_service_is_404(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        answer = await proxy.call("PUT", "/services/nope/weights", {"weights": {"blue": 100}})
        assert answer.status == 404
        assert "nope" in answer.error


@pytest.mark.parametrize(
    "raw",
    [b'{"to": 5}', b'{"to": "green", "force": "yes"}', b'{"force": true}', b"{to: green}"],
    ids=["int-target", "string-bool", "missing-to", "not-json"],
)
async def test_bad_switch_bodies_are_400(tmp_path: Path, raw: bytes) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        answer = await proxy.call("POST", "/services/shop/switch", raw=raw)
        assert answer.status == 400
        assert answer.error
        assert proxy.weights() == {"blue": 100, "green": 0}


# -- rollback -------------------------------------------------------------------------------------


async def test_rollback_restores_the_weights_before_the_last_change(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint, blue_weight=90)) as proxy,
    ):
        answer = await proxy.call("POST", "/services/shop/rollback")
        assert answer.status == 200  # nothing to undo yet: "no change", never a refusal
        assert answer.body["to"] == {"blue": 90, "green": 10}

        await proxy.call("POST", "/services/shop/switch", {"to": "green"})
        assert await send(proxy.proxy_port, 3) == {"green": 3}
        answer = await proxy.call("POST", "/services/shop/rollback")
        assert answer.status == 200, answer.body
        assert answer.body["to"] == {"blue": 90, "green": 10}
        assert await send(proxy.proxy_port, 10) == {"blue": 9, "green": 1}
        actions = [(e.actor, e.action) for e in proxy.server.control.events.since(0)]
        assert actions == [("admin", "rollback"), ("admin", "switch"), ("admin", "rollback")]

        assert (await proxy.call("POST", "/services/nope/rollback")).status == 404


# -- reload ---------------------------------------------------------------------------------------


async def test_reload_applies_a_valid_file_and_rejects_an_invalid_one(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        proxy.config_path.write_text(config_text(blue.endpoint, green.endpoint, blue_weight=0))
        answer = await proxy.call("POST", "/reload")
        assert answer.status == 200, answer.body
        assert answer.body["ok"] is True and answer.body["changed"] is True
        assert await send(proxy.proxy_port, 3) == {"green": 3}

        proxy.config_path.write_text(
            config_text(blue.endpoint, green.endpoint).replace("weight: 100", "weight: -1")
        )
        answer = await proxy.call("POST", "/reload")
        assert answer.status == 400
        assert answer.error == "config rejected"
        assert any("services.shop.versions.blue.weight" in line for line in answer.body["errors"])
        assert await send(proxy.proxy_port, 3) == {"green": 3}

        status = (await proxy.call("GET", "/status")).body
        assert status["config"]["last_reload_error"] == answer.body["errors"]
        families = await proxy.metrics()
        reloads = families["laneswitch_config_reloads"]
        assert value(reloads, "laneswitch_config_reloads_total", result="success") == 1
        assert value(reloads, "laneswitch_config_reloads_total", result="failure") == 1
        actions = [(e.actor, e.action) for e in proxy.server.control.events.since(0)]
        assert actions == [("admin", "reload"), ("admin", "reload_failed")]


# -- events, errors -------------------------------------------------------------------------------


async def test_events_since_returns_only_newer_events_oldest_first(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        await proxy.call("POST", "/services/shop/switch", {"to": "green"})
        await proxy.call("POST", "/services/shop/switch", {"to": "blue"})
        await proxy.call("PUT", "/services/shop/weights", {"weights": {"blue": 60, "green": 40}})
        every = (await proxy.call("GET", "/events")).body["events"]
        assert [e["action"] for e in every] == ["switch", "switch", "weights"]
        ids = [e["id"] for e in every]
        assert ids == sorted(ids)
        newer = (await proxy.call("GET", f"/events?since={ids[0]}")).body["events"]
        assert [e["id"] for e in newer] == ids[1:]
        assert (await proxy.call("GET", f"/events?since={ids[-1]}")).body == {"events": []}
        answer = await proxy.call("GET", "/events?since=yesterday")
        assert answer.status == 400
        assert "since" in answer.error


async def test_errors_are_json(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        answer = await proxy.call("GET", "/services/shop/switch")
        assert answer.status == 405
        assert answer.error == "Method Not Allowed"
        assert "POST" in answer.headers["Allow"]
        huge = b'{"to": "' + b"g" * 100_000 + b'"}'
        answer = await proxy.call("POST", "/services/shop/switch", raw=huge)
        assert answer.status == 413
        assert answer.error


# -- metrics --------------------------------------------------------------------------------------

SERVICE_VERSION_FAMILIES = {
    "laneswitch_requests": ("counter", {"service", "version", "code"}),
    "laneswitch_request_duration_seconds": ("histogram", {"service", "version"}),
    "laneswitch_upstream_errors": ("counter", {"service", "version", "kind"}),
    "laneswitch_in_flight_requests": ("gauge", {"service", "version"}),
    "laneswitch_weight": ("gauge", {"service", "version"}),
    "laneswitch_endpoint_healthy": ("gauge", {"service", "version", "endpoint"}),
    "laneswitch_config_reloads": ("counter", {"result"}),
    "laneswitch_client_aborts": ("counter", {"service", "version"}),
    "laneswitch_drain_cut_requests": ("counter", {"service", "version"}),
    # Process-wide (no labels).
    "laneswitch_state_entries_skipped": ("counter", set()),
    "laneswitch_state_write_failures": ("counter", set()),
}
# Rollout families: series only for services with a rollout block (rollbacks: every service,
# since `rollback` works without one).
ROLLOUT_FAMILIES = {
    "laneswitch_rollout_phase": ("gauge", {"service", "phase"}),
    "laneswitch_rollbacks": ("counter", {"service", "reason"}),
    "laneswitch_analysis_value": ("gauge", {"service", "version", "metric"}),
}


async def test_metrics_have_every_family_with_its_type_and_labels(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint, blue_weight=50)) as proxy,
    ):
        await send(proxy.proxy_port, 4)
        answer = await proxy.call("GET", "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(answer.body)}
        assert set(families) == set(SERVICE_VERSION_FAMILIES) | set(ROLLOUT_FAMILIES)
        for name, (kind, labels) in {**SERVICE_VERSION_FAMILIES, **ROLLOUT_FAMILIES}.items():
            family = families[name]
            assert family.type == kind, name
            assert family.samples or name in ROLLOUT_FAMILIES, name
            for sample in family.samples:
                own = set(sample.labels) - {"le"}
                assert own == labels, (name, sample)


async def test_metrics_count_the_traffic_sent(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(
            tmp_path, config_text(blue.endpoint, green.endpoint, blue_weight=75, weight_total=1000)
        ) as proxy,
    ):
        families = await proxy.metrics()
        # Before any traffic: every configured version has its zero series already.
        assert (
            value(
                families["laneswitch_request_duration_seconds"],
                "laneswitch_request_duration_seconds_count",
                service="shop",
                version="green",
            )
            == 0
        )
        assert families["laneswitch_requests"] == []

        assert await send(proxy.proxy_port, 40) == {"blue": 3, "green": 37}
        families = await proxy.metrics()
        requests = families["laneswitch_requests"]
        sv = {"service": "shop"}
        assert value(requests, "laneswitch_requests_total", **sv, version="blue", code="200") == 3
        assert value(requests, "laneswitch_requests_total", **sv, version="green", code="200") == 37

        duration = families["laneswitch_request_duration_seconds"]
        for version, count in (("blue", 3), ("green", 37)):
            buckets = [
                s for s in duration if s.name.endswith("_bucket") and s.labels["version"] == version
            ]
            bounds = [s.labels["le"] for s in buckets]
            assert bounds == [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
            counts = [s.value for s in buckets]
            assert counts == sorted(counts)  # cumulative
            assert counts[-1] == count
            labels = {**sv, "version": version}
            assert value(duration, "laneswitch_request_duration_seconds_count", **labels) == count
            total = value(duration, "laneswitch_request_duration_seconds_sum", **labels)
            assert 0 < total < count * 5

        weight = families["laneswitch_weight"]
        assert value(weight, "laneswitch_weight", **sv, version="blue") == pytest.approx(7.5)
        assert value(weight, "laneswitch_weight", **sv, version="green") == pytest.approx(92.5)
        await proxy.call("POST", "/services/shop/switch", {"to": "blue"})
        weight = (await proxy.metrics())["laneswitch_weight"]
        assert value(weight, "laneswitch_weight", **sv, version="blue") == 100
        assert value(weight, "laneswitch_weight", **sv, version="green") == 0

        healthy = families["laneswitch_endpoint_healthy"]
        for version, upstream in (("blue", blue), ("green", green)):
            labels = {**sv, "version": version, "endpoint": upstream.endpoint}
            assert value(healthy, "laneswitch_endpoint_healthy", **labels) == 1

        errors = families["laneswitch_upstream_errors"]
        for kind in ("connect", "timeout", "reset", "protocol"):
            labels = {**sv, "version": "blue", "kind": kind}
            assert value(errors, "laneswitch_upstream_errors_total", **labels) == 0
        for family in ("laneswitch_client_aborts", "laneswitch_drain_cut_requests"):
            assert value(families[family], family + "_total", **sv, version="blue") == 0
        assert (
            value(
                families["laneswitch_config_reloads"],
                "laneswitch_config_reloads_total",
                result="failure",
            )
            == 0
        )


async def test_metrics_count_upstream_errors_by_kind_and_the_status_sent(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    blue = await RecordingUpstream("blue").start()
    try:
        async with admin_proxy(tmp_path, config_text(blue.endpoint, dead, blue_weight=0)) as proxy:
            assert await send(proxy.proxy_port, 3) == {"status 502": 3}
            families = await proxy.metrics()
            sv = {"service": "shop", "version": "green"}
            errors = families["laneswitch_upstream_errors"]
            assert value(errors, "laneswitch_upstream_errors_total", **sv, kind="connect") == 3
            assert value(errors, "laneswitch_upstream_errors_total", **sv, kind="reset") == 0
            requests = families["laneswitch_requests"]
            assert value(requests, "laneswitch_requests_total", **sv, code="502") == 3
    finally:
        await blue.stop()


@contextlib.asynccontextmanager
async def held_upstream() -> AsyncIterator[tuple[str, asyncio.Event, asyncio.Event]]:
    """An upstream that reads a request head, says so, and answers only when released."""
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        arrived.set()
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        await writer.drain()

    async with raw_upstream(handler) as endpoint:
        yield endpoint, arrived, release


async def test_metrics_in_flight_and_client_aborts(tmp_path: Path) -> None:
    green = await RecordingUpstream("green").start()
    try:
        async with (
            held_upstream() as (slow, arrived, release),
            admin_proxy(tmp_path, config_text(slow, green.endpoint)) as proxy,
        ):
            sv = {"service": "shop", "version": "blue"}
            client = await Client.connect(proxy.proxy_port)
            await client.send(get())
            await arrived.wait()
            families = await proxy.metrics()
            in_flight = families["laneswitch_in_flight_requests"]
            assert value(in_flight, "laneswitch_in_flight_requests", **sv) == 1

            await client.close()  # the client leaves before its answer
            stats = proxy.server.plane.stats.get("shop", "blue")
            await until(lambda: stats.in_flight == 0)
            families = await proxy.metrics()
            assert (
                value(families["laneswitch_client_aborts"], "laneswitch_client_aborts_total", **sv)
                == 1
            )
            assert (
                value(
                    families["laneswitch_in_flight_requests"], "laneswitch_in_flight_requests", **sv
                )
                == 0
            )
            release.set()
    finally:
        await green.stop()


async def test_metrics_count_requests_cut_at_the_drain_timeout(tmp_path: Path) -> None:
    green = await RecordingUpstream("green").start()
    try:
        async with (
            held_upstream() as (slow, arrived, release),
            admin_proxy(
                tmp_path,
                config_text(slow, green.endpoint).replace(
                    "drain_timeout: 5s", "drain_timeout: 200ms"
                ),
            ) as proxy,
        ):
            client = await Client.connect(proxy.proxy_port)
            await client.send(get())
            await arrived.wait()
            answer = await proxy.call("POST", "/services/shop/switch", {"to": "green"})
            assert answer.status == 200
            stats = proxy.server.plane.stats.get("shop", "blue")
            await until(lambda: stats.drain_cut == 1)
            families = await proxy.metrics()
            cut = families["laneswitch_drain_cut_requests"]
            assert (
                value(cut, "laneswitch_drain_cut_requests_total", service="shop", version="blue")
                == 1
            )
            assert (
                value(cut, "laneswitch_drain_cut_requests_total", service="shop", version="green")
                == 0
            )
            assert await client.closed()
            await client.close()
            release.set()
    finally:
        await green.stop()


async def test_each_admin_app_has_its_own_registry(tmp_path: Path) -> None:
    async with blue_green() as (blue, green):
        first_dir = tmp_path / "a"
        second_dir = tmp_path / "b"
        first_dir.mkdir()
        second_dir.mkdir()
        text = config_text(blue.endpoint, green.endpoint)
        async with admin_proxy(first_dir, text) as first, admin_proxy(second_dir, text) as second:
            await send(first.proxy_port, 2)
            one = (await first.metrics())["laneswitch_requests"]
            two = (await second.metrics())["laneswitch_requests"]
            labels = {"service": "shop", "version": "blue", "code": "200"}
            assert value(one, "laneswitch_requests_total", **labels) == 2
            assert two == []
