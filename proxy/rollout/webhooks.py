"""Flagger-style webhooks and blue-green pre-switch checks: outbound control traffic (aiohttp).

A webhook is a JSON POST; a 2xx answer within `timeout` is a pass, anything else (another status,
a timeout, a refused connection) is retried up to `retries` times and then a failure. What a
failure means is the controller's business: on `pre-rollout` and `rollout` hooks it is a failed
check, on `confirm-promotion` it holds the promotion, on `post-rollout` and `rollback` it is only
recorded.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from proxy.config.rollout import PreSwitchCheck, Webhook
from proxy.config.service import ServiceConfig
from proxy.rollout.release import roles
from proxy.rollout.values import CheckResult, Rollout, RolloutState

# Pause between two attempts of a webhook: long enough not to hammer a hook that is restarting.
RETRY_PAUSE = 0.2
# Bytes of an answer read (and thrown away) before the connection is let go: bounds what a
# hook can make the proxy buffer. Answers are never recorded verbatim (they may hold secrets):
# the record says how long the answer was, up to this bound.
MAX_ANSWER_BYTES = 4096

# A URL in an error text: its query string, fragment and userinfo are what secrets live in.
_URL = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/\s@'\"<>]*@)?(?P<rest>[^\s'\"<>?#]*)(?:[?#][^\s'\"<>]*)?"
)


def redact(text: str) -> str:
    """`text` with every URL in it cut to scheme, host and path (aiohttp's errors quote the
    URL; userinfo, query strings and fragments are where secrets live)."""
    return _URL.sub(lambda m: m["scheme"] + m["rest"], text)


def _answer_detail(status: int, length: int) -> str:
    size = f"{length} bytes" if length < MAX_ANSWER_BYTES else f"over {MAX_ANSWER_BYTES} bytes"
    if 300 <= status < 400:
        return f"HTTP {status} (redirects are not followed; answer {size})"
    return f"HTTP {status} (answer {size}, not recorded)" if length else f"HTTP {status}"


def payload(hook: Webhook, base: dict[str, Any]) -> dict[str, Any]:
    """The body sent to a webhook: Flagger's fields (name, namespace, phase, type, checksum,
    metadata), plus laneswitch's own (service, canary, stable, revision, step, weight)."""
    return {**base, "type": hook.type, "metadata": dict(hook.metadata)}


async def call_webhook(
    session: aiohttp.ClientSession, hook: Webhook, body: dict[str, Any]
) -> CheckResult:
    began = time.monotonic()
    status: int | None = None
    detail = ""
    attempts = 0
    for attempt in range(hook.retries + 1):
        attempts = attempt + 1
        if attempt:
            await asyncio.sleep(RETRY_PAUSE)
        try:
            # A redirect is an answer, not a pass: following it would send the payload (and
            # any credentials in the URL) to wherever the hook points.
            async with session.post(
                hook.url,
                json=body,
                timeout=aiohttp.ClientTimeout(total=hook.timeout),
                allow_redirects=False,
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    return CheckResult(
                        hook.name, hook.type, True, status, attempts, "", time.monotonic() - began
                    )
                answer = await response.content.read(MAX_ANSWER_BYTES)
                detail = _answer_detail(status, len(answer))
        except TimeoutError:
            status = None
            detail = f"no answer within {hook.timeout:g}s"
        except aiohttp.ClientError as exc:
            status = None
            detail = redact(f"{type(exc).__name__}: {exc}")
    return CheckResult(
        hook.name, hook.type, False, status, attempts, detail, time.monotonic() - began
    )


async def call_webhooks(
    hooks: Sequence[Webhook], kind: str, base: dict[str, Any]
) -> list[CheckResult]:
    """Call every hook of type `kind` concurrently; their results in config order."""
    chosen = [hook for hook in hooks if hook.type == kind]
    if not chosen:
        return []
    async with aiohttp.ClientSession() as session:
        calls = [call_webhook(session, hook, payload(hook, base)) for hook in chosen]
        return list(await asyncio.gather(*calls))


async def bounded_hooks(
    hooks: Sequence[Webhook], kind: str, base: dict[str, Any], bound: float
) -> list[CheckResult]:
    """`call_webhooks`, given up after `bound` seconds: every hook still unanswered then is
    a failure ("no answer within the interval")."""
    chosen = [hook for hook in hooks if hook.type == kind]
    try:
        return await asyncio.wait_for(call_webhooks(chosen, kind, base), bound)
    except TimeoutError:
        detail = f"no answer within the rollout interval ({bound:g}s)"
        return [CheckResult(hook.name, hook.type, False, None, 1, detail, bound) for hook in chosen]


async def pre_switch_checks(
    checks: Sequence[PreSwitchCheck], endpoints: Sequence[str]
) -> list[CheckResult]:
    """Every check against every endpoint of the preview (`GET path`, expecting a status)."""
    if not checks:
        return []
    async with aiohttp.ClientSession() as session:
        return list(
            await asyncio.gather(
                *(
                    _pre_switch(session, check, endpoint)
                    for check in checks
                    for endpoint in endpoints
                )
            )
        )


async def _pre_switch(
    session: aiohttp.ClientSession, check: PreSwitchCheck, endpoint: str
) -> CheckResult:
    name = f"GET {check.path} on {endpoint}"
    began = time.monotonic()
    try:
        async with session.get(
            f"http://{endpoint}{check.path}",
            timeout=aiohttp.ClientTimeout(total=check.timeout),
            allow_redirects=False,
        ) as response:
            status = response.status
            await response.content.read(MAX_ANSWER_BYTES)
    except TimeoutError:
        return CheckResult(
            name,
            "pre-switch",
            False,
            None,
            1,
            f"no answer within {check.timeout:g}s",
            time.monotonic() - began,
        )
    except aiohttp.ClientError as exc:
        return CheckResult(
            name,
            "pre-switch",
            False,
            None,
            1,
            redact(f"{type(exc).__name__}: {exc}"),
            time.monotonic() - began,
        )
    ok = status == check.expect_status
    detail = "" if ok else f"HTTP {status}, expected {check.expect_status}"
    return CheckResult(name, "pre-switch", ok, status, 1, detail, time.monotonic() - began)


def base_payload(
    service: str, config: ServiceConfig, rollout: Rollout, state: RolloutState, weight: float
) -> dict[str, Any]:
    """The fields every webhook of a run gets, before `payload` adds the hook's own (the
    candidate has `weight` percent of the traffic)."""
    candidate, baseline = roles(rollout)
    revision = config.versions[candidate].revision
    return {
        # Flagger's fields, so hooks written for Flagger (e.g. its load tester) work.
        "name": service,
        "namespace": "laneswitch",
        "phase": state.phase,
        "checksum": revision or "",
        # laneswitch's own.
        "service": service,
        "strategy": rollout.strategy,
        "candidate": candidate,
        "baseline": baseline,
        "revision": revision,
        "step": state.step,
        "weight": round(weight, 4),
        "failed_checks": state.failed_checks,
    }
