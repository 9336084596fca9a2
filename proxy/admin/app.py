"""The admin API: JSON over HTTP, served by aiohttp off the request path.

Handlers only translate HTTP to `ControlPlane` calls and back: the control plane decides, records
the event and raises `ControlError(status, message)` on a refusal, whose status is sent as is.
Every error answer is JSON `{"error": "..."}`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, ValidationError

from proxy.admin.access import (
    AccessPolicy,
    auth_middleware,
    browser_safety_middleware,
    error,
)
from proxy.admin.console import add_console_routes
from proxy.admin.metrics import metrics_registry, render
from proxy.control import ControlPlane
from proxy.control.status import status_json
from proxy.errors import ControlError
from proxy.rollout.manager import RolloutManager
from proxy.workers.supervisor import WorkerPool

log = logging.getLogger("laneswitch.admin")

# Admin bodies are a few hundred bytes; this bounds what a client can make the proxy buffer.
MAX_BODY_BYTES = 64 * 1024

# Reads that must include what the worker processes counted up to now.
COUNTER_READS = frozenset({"/metrics", "/status"})

ACTOR = "admin"

CONTROL: web.AppKey[ControlPlane] = web.AppKey("control", ControlPlane)
ROLLOUTS: web.AppKey[RolloutManager] = web.AppKey("rollouts", RolloutManager)
ACCESS: web.AppKey[AccessPolicy] = web.AppKey("access", AccessPolicy)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)


# -- request bodies -------------------------------------------------------------------------------


class _Body(BaseModel):
    # Unknown keys are errors (usually typos); no coercion: "yes" is not a bool, "10" not an int.
    model_config = ConfigDict(extra="forbid", strict=True)


class SwitchBody(_Body):
    to: str
    force: bool = False
    dry_run: bool = False


class WeightsBody(_Body):
    weights: dict[str, int]


class BadBody(Exception):
    """The request body is not JSON or not the expected shape: a 400 with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def read_body(request: web.Request, model: type[M]) -> M:
    raw = await request.read()
    try:
        data = json.loads(raw) if raw.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadBody(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadBody("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadBody("; ".join(_describe(err) for err in exc.errors())) from None


def _describe(err: Any) -> str:
    loc = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    return f"{loc}: {err['msg']}" if loc else str(err["msg"])


# -- middleware -----------------------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (404 route, 405, 413) and refused control calls, as JSON."""
    try:
        return await handler(request)
    except ControlError as exc:
        return error(exc.status, exc.message)
    except BadBody as exc:
        return error(400, exc.reason)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error(exc.status, exc.reason)
        for name in ("Allow", "WWW-Authenticate"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception:
        log.exception("admin %s %s failed", request.method, request.path)
        return error(500, "internal error (see the proxy's log)")


def refresh_middleware(workers: WorkerPool) -> Middleware:
    """Before /metrics and /status, collect the workers' counters (bounded wait; see
    `WorkerPool.refresh`). Placed after the token check: only callers allowed to read do this."""

    @web.middleware
    async def refresh(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "GET" and request.path in COUNTER_READS:
            await workers.refresh()
        return await handler(request)

    return refresh


# -- handlers -------------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    if control.ready:
        return web.json_response({"status": "ready"})
    return web.json_response(
        {"status": "draining" if control.draining else "not ready"}, status=503
    )


async def status(request: web.Request) -> web.Response:
    return web.json_response(status_json(request.app[CONTROL]))


async def events(request: web.Request) -> web.Response:
    text = request.query.get("since", "0")
    try:
        since = int(text)
    except ValueError:
        return error(400, f"since must be an event id (an integer), got {text!r}")
    control = request.app[CONTROL]
    fleet = await control.backend.events(since)
    if fleet is not None:
        return web.json_response({"events": fleet})
    found = control.events.since(since)
    return web.json_response({"events": [event.to_json() for event in found]})


async def changed(control: ControlPlane, result: dict[str, Any]) -> web.Response:
    """A change's answer; in a fleet, once every live member applied it, with
    `"members": {"acknowledged": [...], "pending": [...]}` (SPEC §9)."""
    members = await control.backend.acknowledged()
    if members is not None:
        result = {**result, "members": members}
    return web.json_response(result)


async def history(request: web.Request) -> web.Response:
    """GET /history?service=NAME&since=UNIX: the console's chart rows (SPEC §10)."""
    control = request.app[CONTROL]
    service = request.query.get("service", "")
    if service not in control.config.services:
        return error(404, f"no service {service!r}")
    text = request.query.get("since", "0")
    try:
        since = float(text)
    except ValueError:
        since = float("nan")
    if since != since or since in (float("inf"), float("-inf")):
        return error(400, f"since must be a UNIX time in seconds, got {text!r}")
    return web.json_response(control.history.series(service, since))


async def switch(request: web.Request) -> web.Response:
    body = await read_body(request, SwitchBody)
    result = await request.app[CONTROL].switch(
        request.match_info["svc"], body.to, force=body.force, dry_run=body.dry_run, actor=ACTOR
    )
    if body.dry_run:
        return web.json_response(result)
    return await changed(request.app[CONTROL], result)


async def weights(request: web.Request) -> web.Response:
    body = await read_body(request, WeightsBody)
    result = await request.app[CONTROL].set_weights(
        request.match_info["svc"], body.weights, actor=ACTOR
    )
    return await changed(request.app[CONTROL], result)


async def rollback(request: web.Request) -> web.Response:
    result = await request.app[CONTROL].rollback(request.match_info["svc"], actor=ACTOR)
    return await changed(request.app[CONTROL], result)


async def rollout(request: web.Request) -> web.Response:
    request.app[CONTROL].refuse_while_draining()
    result = await request.app[ROLLOUTS].command(
        request.match_info["svc"], request.match_info["action"], actor=ACTOR
    )
    return await changed(request.app[CONTROL], result)


async def reload(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    result = await control.reload(actor=ACTOR)
    if not result.ok:
        return error(400, "config rejected", errors=result.errors)
    return await changed(
        control, {"ok": True, "changed": result.changed, "config_hash": control.config_hash}
    )


def create_admin_app(
    control: ControlPlane,
    rollouts: RolloutManager,
    token: str | None,
    metrics_public: bool,
    *,
    workers: WorkerPool | None = None,
) -> web.Application:
    """The admin API of `control` and its `rollouts`; `token` None or "" means no
    authentication. With `workers` (N > 1), counters are collected from the worker processes
    before they are read.

    The browser-safety checks come before everything else (every route, present and future,
    gets them); a reload's new `admin.token` and `metrics_public` apply at once."""
    policy = AccessPolicy(token, metrics_public)
    control.config_listeners.append(lambda config: policy.configure(config.admin))
    middlewares = [
        error_middleware,
        browser_safety_middleware(policy),
        auth_middleware(policy),
    ]
    if workers is not None:
        middlewares.append(refresh_middleware(workers))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[CONTROL] = control
    app[ROLLOUTS] = rollouts
    app[ACCESS] = policy
    registry = metrics_registry(control, rollouts, workers)

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=render(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    app.router.add_get("/events", events)
    app.router.add_get("/history", history)
    app.router.add_post("/reload", reload)
    app.router.add_post("/services/{svc}/switch", switch)
    app.router.add_put("/services/{svc}/weights", weights)
    app.router.add_post("/services/{svc}/rollback", rollback)
    # 200 with the rollout's status, 409 when the phase does not allow it, 404 without a rollout.
    app.router.add_post("/services/{svc}/rollout/{action}", rollout)
    add_console_routes(app)
    return app
