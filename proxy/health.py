"""Active HTTP health checks of upstream endpoints (layer L2: config model, routing, aiohttp).

Contract, in the terms an Envoy or nginx operator expects:

- A check is `GET http://{endpoint}{path}` with `User-Agent: laneswitch-health`, on a fresh
  connection (no keep-alive reuse, so a dead listener is never masked by a pooled socket), through
  one `aiohttp.ClientSession` per checker that ignores `HTTP_PROXY` and never follows redirects.
  `timeout` bounds the whole check: connect, request, and the response read to its end.
  A 2xx or 3xx status passes; any other status, a timeout, a refused or reset connection or an
  invalid response fails.
- Every endpoint starts *unknown*, which counts as not healthy: it gets no traffic until a check
  has passed ("an endpoint counts as healthy only once a check has passed"). An endpoint that
  has never been healthy becomes healthy on its first pass, whatever failed before it (Envoy does
  the same for new hosts); an unknown endpoint whose check fails becomes unhealthy at once, so the
  log says why it gets no traffic.
- From healthy, `unhealthy_threshold` consecutive failures make an endpoint unhealthy; from
  unhealthy, `healthy_threshold` consecutive passes make it healthy again. Each transition is
  logged on one line (logger `laneswitch.health`) with the service, version, endpoint, old and new
  state and the reason, e.g. `3 consecutive failures: connect refused`.
- Each endpoint is checked every `interval`, measured start to start, by its own task: checks of
  one endpoint never overlap (a check slower than `interval` delays only that endpoint's next
  one), and a slow endpoint never delays another.
- `start()` runs the first round (the first check of every target, all at once) and returns when
  it is complete; `first_round_done` is then True and stays True (it drives `/readyz`). A checker
  started without targets completes its first round at once.
- `on_change(unhealthy, first_round_done)` is called synchronously on the event loop whenever the
  set of endpoints that must get no traffic changes (from a check, or from `configure()` itself,
  which may call it before returning), and once when the first round completes. It receives a
  fresh set; an exception it raises is logged and does not stop the checks.
- `configure()` may be called at any time (a reload): endpoints that stay keep their state and
  counters, new ones start unknown and are checked at once (while started), removed ones are
  dropped (a check in flight is abandoned). Changed settings apply from the next check; a changed
  `interval` re-times the next check from the start of the last one.
- Endpoints the checker was not given (services without `health_check`) are not its business:
  they are never in `unhealthy`, and `is_healthy()` is True for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from proxy.config.model import Config
from proxy.config.scalars import parse_endpoint
from proxy.config.service import HealthCheckConfig
from proxy.routing.table import Endpoint

__all__ = [
    "USER_AGENT",
    "EndpointKey",
    "HealthChecker",
    "HealthState",
    "HealthTarget",
    "targets_from_config",
]

log = logging.getLogger("laneswitch.health")

EndpointKey = tuple[str, str, str]  # (service, version, "host:port")
OnChange = Callable[[set[EndpointKey], bool], None]

USER_AGENT = "laneswitch-health"
# The response body is read to its end (a check must see the whole response) and thrown away
# chunk by chunk: this bounds the memory one check holds, whatever the endpoint sends.
_READ_CHUNK_BYTES = 16 * 1024


class HealthState(enum.StrEnum):
    UNKNOWN = "unknown"  # not checked yet: no traffic
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class HealthTarget:
    """One endpoint of one version of one service, with its check settings."""

    service: str
    version: str
    endpoint: str  # "host:port" or "[v6]:port", as `routing.table.Endpoint.key` spells it
    check: HealthCheckConfig

    @property
    def key(self) -> EndpointKey:
        return (self.service, self.version, self.endpoint)


def targets_from_config(config: Config) -> list[HealthTarget]:
    """Every endpoint of every version of every service that has a `health_check`.

    Endpoints are spelled as the route table keys them, so the checker's keys match the ones
    `routing.build` looks up.
    """
    targets: list[HealthTarget] = []
    for service_name, service in config.services.items():
        check = service.health_check
        if check is None:
            continue
        for version_name, version in service.versions.items():
            for text in version.endpoints:
                key = Endpoint(*parse_endpoint(text)).key
                targets.append(HealthTarget(service_name, version_name, key, check))
    return targets


def _format_seconds(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


class _Endpoint:
    """The state of one checked endpoint; owned by the checker, mutated only on the loop."""

    __slots__ = (
        "checking",
        "ever_healthy",
        "failures",
        "last_reason",
        "last_start",
        "next_due",
        "passes",
        "state",
        "target",
        "task",
        "url",
        "wake",
    )

    def __init__(self, target: HealthTarget) -> None:
        self.target = target
        self.url = URL(f"http://{target.endpoint}{target.check.path}")
        self.state = HealthState.UNKNOWN
        self.ever_healthy = False
        self.passes = 0  # consecutive
        self.failures = 0  # consecutive
        self.last_reason = ""
        self.last_start: float | None = None  # loop time the last check started
        self.next_due = 0.0  # loop time of the next check; 0 = at once
        self.checking = False
        self.wake = asyncio.Event()  # set when `next_due` moved earlier than the task sleeps
        self.task: asyncio.Task[None] | None = None

    def retarget(self, target: HealthTarget) -> None:
        old = self.target.check
        self.target = target
        self.url = URL(f"http://{target.endpoint}{target.check.path}")
        # A running check re-times the next one itself when it ends.
        changed = target.check.interval != old.interval
        if changed and self.last_start is not None and not self.checking:
            self.next_due = self.last_start + target.check.interval
            self.wake.set()


class HealthChecker:
    """Active health checks of a set of `HealthTarget`s; see the module docstring."""

    def __init__(self, on_change: OnChange) -> None:
        self._on_change = on_change
        self._endpoints: dict[EndpointKey, _Endpoint] = {}
        self._session: aiohttp.ClientSession | None = None
        self._started = False
        self._stopped = False
        # Keys whose first check has not completed yet, while the first round runs.
        self._pending: set[EndpointKey] = set()
        self._first_round_done = False
        self._first_round = asyncio.Event()
        # Tasks of removed endpoints that were cancelled but may not have finished yet.
        self._retired: set[asyncio.Task[None]] = set()
        self._notified: tuple[frozenset[EndpointKey], bool] = (frozenset(), False)

    # -- reading -----------------------------------------------------------------------------

    @property
    def unhealthy(self) -> set[EndpointKey]:
        """Endpoints that must get no traffic right now (unknown or unhealthy)."""
        return {key for key, ep in self._endpoints.items() if ep.state is not HealthState.HEALTHY}

    def is_healthy(self, key: EndpointKey) -> bool:
        """False only for a checked endpoint that is unknown or unhealthy."""
        ep = self._endpoints.get(key)
        return ep is None or ep.state is HealthState.HEALTHY

    def state(self, key: EndpointKey) -> HealthState | None:
        """The endpoint's state, or None when the checker does not check it."""
        ep = self._endpoints.get(key)
        return None if ep is None else ep.state

    @property
    def first_round_done(self) -> bool:
        return self._first_round_done

    def __repr__(self) -> str:
        counts = {state.value: 0 for state in HealthState}
        for ep in self._endpoints.values():
            counts[ep.state.value] += 1
        phase = "stopped" if self._stopped else "running" if self._started else "new"
        summary = " ".join(f"{name}={n}" for name, n in counts.items())
        return f"<HealthChecker {phase} first_round_done={self._first_round_done} {summary}>"

    # -- control -----------------------------------------------------------------------------

    def configure(self, targets: Iterable[HealthTarget]) -> None:
        """Check exactly `targets` from now on; see the module docstring for what is kept."""
        wanted = {target.key: target for target in targets}
        for key in self._endpoints.keys() - wanted.keys():
            ep = self._endpoints.pop(key)
            self._pending.discard(key)
            if ep.task is not None:
                ep.task.cancel()
                self._retired.add(ep.task)
                ep.task.add_done_callback(self._retired.discard)
        for key, target in wanted.items():
            known = self._endpoints.get(key)
            if known is not None:
                if known.target != target:
                    known.retarget(target)
                continue
            ep = self._endpoints[key] = _Endpoint(target)
            if self._started and not self._stopped:
                if not self._first_round_done:
                    self._pending.add(key)
                self._spawn(ep)
        if self._started and not self._stopped and not self._pending:
            self._complete_first_round()
        self._notify()

    async def start(self) -> None:
        """Run the first round of checks, return once it is complete, keep checking after."""
        if self._started:
            raise RuntimeError("HealthChecker.start() called twice")
        self._started = True
        if self._stopped:
            return
        self._session = aiohttp.ClientSession(
            # force_close: a fresh connection per check. limit=0: the number of endpoints is
            # bounded by the config, and a pool limit would queue checks behind each other,
            # eating their timeouts.
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            headers={"User-Agent": USER_AGENT},
            timeout=aiohttp.ClientTimeout(total=None),  # each check is bounded by its own timeout
            trust_env=False,  # health checks never go through HTTP_PROXY
        )
        self._pending = set(self._endpoints)
        for ep in self._endpoints.values():
            self._spawn(ep)
        if not self._pending:
            self._complete_first_round()
            self._notify()
        await self._first_round.wait()  # set by the last first check, or by stop()

    async def stop(self) -> None:
        """Cancel every check and close the session. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        tasks = [ep.task for ep in self._endpoints.values() if ep.task is not None]
        tasks.extend(self._retired)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ep in self._endpoints.values():
            ep.task = None
        self._retired.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._first_round.set()  # release a start() still waiting

    # -- checking ----------------------------------------------------------------------------

    def _spawn(self, ep: _Endpoint) -> None:
        service, version, endpoint = ep.target.key
        ep.task = asyncio.get_running_loop().create_task(
            self._run(ep), name=f"health {service}/{version} {endpoint}"
        )

    async def _run(self, ep: _Endpoint) -> None:
        """Check `ep` every interval until cancelled (stop, or removed by configure)."""
        loop = asyncio.get_running_loop()
        key = ep.target.key
        while self._endpoints.get(key) is ep:
            delay = ep.next_due - loop.time()
            if delay > 0:
                ep.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await ep.wake.wait()
                continue  # woken early: `next_due` moved, so compute the delay again
            ep.last_start = loop.time()
            ep.checking = True
            try:
                passed, reason = await self._probe(ep)
            finally:
                ep.checking = False
            if self._endpoints.get(key) is not ep:
                return  # removed while its check ran
            ep.next_due = ep.last_start + ep.target.check.interval
            self._record(ep, passed, reason)

    async def _probe(self, ep: _Endpoint) -> tuple[bool, str]:
        """One check: (passed, reason). Never raises except CancelledError."""
        session = self._session
        assert session is not None
        timeout = ep.target.check.timeout
        try:
            async with (
                asyncio.timeout(timeout),
                session.get(ep.url, allow_redirects=False) as response,
            ):
                async for _chunk in response.content.iter_chunked(_READ_CHUNK_BYTES):
                    pass
                status = response.status
        except TimeoutError:
            return False, f"timed out after {_format_seconds(timeout)}"
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                return False, "connect refused"
            return False, f"connect failed: {exc.os_error.strerror or exc.os_error}"
        except aiohttp.ServerDisconnectedError:
            return False, "connection closed before a response"
        except aiohttp.ClientPayloadError:
            return False, "response cut short"
        except aiohttp.ClientResponseError as exc:
            return False, f"invalid response: {exc.message}"
        except aiohttp.ClientOSError as exc:
            if exc.errno == errno.ECONNRESET:
                return False, "connection reset"
            return False, f"connection error: {exc.strerror or exc}"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        if 200 <= status < 400:
            return True, f"HTTP {status}"
        return False, f"HTTP {status}"

    def _record(self, ep: _Endpoint, passed: bool, reason: str) -> None:
        """Count one result, move the state machine, log a transition, finish the first round."""
        check = ep.target.check
        old = ep.state
        new = old
        why = ""
        ep.last_reason = reason
        if passed:
            ep.passes += 1
            ep.failures = 0
            if old is not HealthState.HEALTHY:
                if not ep.ever_healthy:
                    new, why = HealthState.HEALTHY, f"first check passed: {reason}"
                elif ep.passes >= check.healthy_threshold:
                    new, why = HealthState.HEALTHY, f"{ep.passes} consecutive passes"
        else:
            ep.failures += 1
            ep.passes = 0
            if old is HealthState.UNKNOWN:
                new, why = HealthState.UNHEALTHY, f"first check failed: {reason}"
            elif old is HealthState.HEALTHY and ep.failures >= check.unhealthy_threshold:
                plural = "failure" if ep.failures == 1 else "failures"
                new, why = HealthState.UNHEALTHY, f"{ep.failures} consecutive {plural}: {reason}"
        if new is not old:
            ep.state = new
            if new is HealthState.HEALTHY:
                ep.ever_healthy = True
            service, version, endpoint = ep.target.key
            level = logging.INFO if new is HealthState.HEALTHY else logging.WARNING
            log.log(level, "%s/%s %s: %s -> %s (%s)", service, version, endpoint, old, new, why)
        if not self._first_round_done:
            self._pending.discard(ep.target.key)
            if not self._pending:
                self._complete_first_round()
        self._notify()

    def _complete_first_round(self) -> None:
        if self._first_round_done:
            return
        self._first_round_done = True
        self._first_round.set()
        unhealthy = len(self.unhealthy)
        log.info(
            "first round of health checks done: %d endpoints, %d without traffic",
            len(self._endpoints),
            unhealthy,
        )

    def _notify(self) -> None:
        """Call `on_change` if the unhealthy set or `first_round_done` changed since last time."""
        current = (frozenset(self.unhealthy), self._first_round_done)
        if current == self._notified:
            return
        self._notified = current
        try:
            self._on_change(set(current[0]), current[1])
        except Exception:
            log.exception("health on_change callback failed")
