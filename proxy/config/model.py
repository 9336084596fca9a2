"""The config file as pydantic models (layer L0: stdlib + pydantic only).

Contract: a `Config` that exists is valid. Every rule of the config file is enforced
here, so a config built from a dict, from the YAML loader or by the admin API obeys the same
rules. Durations are float seconds and sizes int bytes after validation, whatever the user wrote.

Validators report cross-field problems by raising `ValidationError` with a location relative to
the field they validate, so every problem is reported at the field it is about
(`services.shop.versions: ...`, `admin.token: ...`) and all of them at once. The wording of
pydantic's built-in errors is the loader's business (`loader.format_validation_error`).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from itertools import pairwise
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from proxy.latency_buckets import LATENCY_BUCKETS, bucket_bound_index

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails, InitErrorDetails

__all__ = [
    "AdminConfig",
    "BlueGreenRollout",
    "CanaryRollout",
    "Config",
    "Duration",
    "ForceConfig",
    "HealthCheckConfig",
    "LatencyCheck",
    "Limits",
    "MatchConfig",
    "PreSwitchCheck",
    "RelativeSuccessRateCheck",
    "RolloutConfig",
    "RolloutMetrics",
    "ServiceConfig",
    "Size",
    "StickyConfig",
    "SuccessRateCheck",
    "Timeouts",
    "VersionConfig",
    "Webhook",
    "is_loopback_host",
    "parse_duration",
    "parse_endpoint",
    "parse_size",
]

Loc = tuple[str | int, ...]

# --------------------------------------------------------------------------------------------
# Scalars: durations, sizes, endpoints, names
# --------------------------------------------------------------------------------------------

_DURATION_RE = re.compile(r"(?P<number>-?(?:\d+(?:\.\d*)?|\.\d+))\s*(?P<unit>ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HELP = 'must be a duration such as "500ms", "2s", "1m", "1h" or a number of seconds'

_SIZE_RE = re.compile(r"(?P<number>-?\d+)\s*(?P<unit>B|KiB|MiB|GiB)?")
_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_SIZE_HELP = 'must be a size in bytes such as 512, "64KiB", "16MiB" or "1GiB"'


def parse_duration(value: object) -> float:
    """Return `value` in seconds: a number of seconds, or a string `<number><ms|s|m|h>`.

    A bare numeric string counts as seconds, so `${INTERVAL}` substituted from the environment
    works. Raises ValueError for negative, non-finite or malformed input.
    """
    if isinstance(value, bool):  # YAML `yes`/`true` is a bool, and bool is an int subclass
        raise ValueError(_DURATION_HELP)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value.strip())):
        seconds = float(match["number"]) * _DURATION_UNITS[match["unit"] or "s"]
    else:
        raise ValueError(_DURATION_HELP)
    if not math.isfinite(seconds):
        raise ValueError(_DURATION_HELP)
    if seconds < 0:
        raise ValueError("must be >= 0")
    return seconds


def parse_size(value: object) -> int:
    """Return `value` in bytes: an integer, or a string `<integer><B|KiB|MiB|GiB>`.

    Raises ValueError for negative, fractional or malformed input.
    """
    if isinstance(value, bool):
        raise ValueError(_SIZE_HELP)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value.strip())):
        size = int(match["number"]) * _SIZE_UNITS[match["unit"] or "B"]
    else:
        raise ValueError(_SIZE_HELP)
    if size < 0:
        raise ValueError("must be >= 0")
    return size


# The JSON Schema describes what a user may write, not the normalised Python value.
_DURATION_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*(\d+(\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$"},
    ]
}
_SIZE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+\s*(B|KiB|MiB|GiB)?\s*$"},
    ]
}

Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
"""Seconds as a float; written as `"500ms"`, `"2s"`, `"1m"`, `"1h"` or a number of seconds."""

Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(_SIZE_SCHEMA)]
"""Bytes as an int; written as a number of bytes or `"64KiB"`, `"16MiB"`, `"1GiB"`."""

# RFC 9110 `token`: header and cookie names. Hostnames and IPv4 literals use the narrower set.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
# Service and version names end up in URLs (/services/{svc}), metric labels and force values.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")
# Values of the force header/cookie that select a role rather than a version.
_FORCE_KEYWORDS = frozenset({"always", "never"})


def parse_endpoint(text: str) -> tuple[str, int]:
    """Split `"host:port"` or `"[v6]:port"` into `(host, port)`; IPv6 hosts lose the brackets.

    Port 0 is accepted: a listener on port 0 binds a free port (tests do this). Upstream
    endpoints, which must be connectable, additionally reject it (see `_check_upstream`).
    Raises ValueError with a message naming what is wrong (missing port, bad port, IPv6
    without brackets, invalid host).
    """
    text = text.strip()
    if "://" in text:  # a URL where an address belongs: the most common slip
        raise ValueError(f'must be "host:port" without a scheme, got {text!r}')
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f'must be "[v6]:port", got {text!r}')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f'must be "host:port" or "[v6]:port", got {text!r}')
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets, as in [::1]:8080; got {text!r}")
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"{host!r} is not a valid host name or address")
    if not (port_text.isascii() and port_text.isdigit() and int(port_text) <= 65535):
        raise ValueError(f"port must be a number from 1 to 65535, got {port_text!r}")
    return host, int(port_text)


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1: addresses other machines cannot reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_listen(text: str) -> str:
    parse_endpoint(text)
    return text.strip()


def _check_upstream(text: str) -> str:
    if parse_endpoint(text)[1] == 0:
        raise ValueError("port must be a number from 1 to 65535, got '0'")
    return text.strip()


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            'must be 1-63 letters, digits, "_", "." or "-", starting with a letter or digit'
        )
    return name


def _check_version_name(name: str) -> str:
    if name in _FORCE_KEYWORDS:
        raise ValueError(f'"{name}" is reserved: it is a value of the force header')
    return _check_name(name)


def _check_token(name: str) -> str:
    if not _TOKEN_RE.fullmatch(name):
        raise ValueError("must be a header or cookie name (letters, digits and !#$%&'*+-.^_`|~)")
    return name


def _check_optional_token(name: str) -> str:
    return _check_token(name) if name else name


def _check_match_host(host: str) -> str:
    if host != "*" and not _HOSTNAME_RE.fullmatch(host):
        raise ValueError('must be "*" or a host name without port')
    return host.lower()


def _check_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError('must start with "/"')
    return path


def _check_http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return url


def _blank_to_none(value: object) -> object:
    """`${VAR:-}` substitutes to "": treat an empty optional string as not set."""
    return None if isinstance(value, str) and not value.strip() else value


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


ListenAddress = Annotated[str, AfterValidator(_check_listen)]
"""host:port to bind; port 0 binds a free port."""
Endpoint = Annotated[str, AfterValidator(_check_upstream)]
"""host:port of an upstream; port 1..65535."""
Name = Annotated[str, AfterValidator(_check_name)]
VersionName = Annotated[str, AfterValidator(_check_version_name)]
Token = Annotated[str, AfterValidator(_check_token)]
UrlPath = Annotated[str, AfterValidator(_check_path)]
OptionalStr = Annotated[str | None, BeforeValidator(_blank_to_none)]
Percent = Annotated[float, Field(gt=0, le=100)]

_LISTEN_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]
}
ListenList = Annotated[
    list[ListenAddress],
    BeforeValidator(_as_list),
    Field(min_length=1),
    WithJsonSchema(_LISTEN_SCHEMA),
]

# --------------------------------------------------------------------------------------------
# Reporting cross-field problems at their own field paths
# --------------------------------------------------------------------------------------------


def _fail(title: str, problems: Iterable[tuple[Loc, str]]) -> NoReturn:
    """Raise one ValidationError holding every `(relative location, message)` problem.

    pydantic prefixes the location of the field or model being validated, so a validator on
    `ServiceConfig.versions` reporting `(("blue",), "...")` surfaces as
    `services.shop.versions.blue`.
    """
    details: list[InitErrorDetails] = [
        {"type": "value_error", "loc": loc, "input": None, "ctx": {"error": ValueError(msg)}}
        for loc, msg in problems
    ]
    raise ValidationError.from_exception_data(title, details)


def _fail_if_any(title: str, problems: list[tuple[Loc, str]]) -> None:
    if problems:
        _fail(title, problems)


def _relocate(err: ErrorDetails, loc: Loc) -> InitErrorDetails:
    detail: InitErrorDetails = {"type": err["type"], "loc": loc, "input": err["input"]}
    if "ctx" in err:
        detail["ctx"] = err["ctx"]
    return detail


class _Model(BaseModel):
    # Frozen: a validated config is shared by the control plane and tests; nobody patches it.
    # Attribute docstrings become descriptions in `laneswitch schema`.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# --------------------------------------------------------------------------------------------
# Top-level blocks
# --------------------------------------------------------------------------------------------


class AdminConfig(_Model):
    """The admin API listener. A token is mandatory once it listens beyond loopback."""

    listen: ListenAddress = "127.0.0.1:9901"
    """host:port of the admin API."""
    token: OptionalStr = None
    """Bearer token for every admin call except /healthz and /readyz; empty means none."""
    metrics_public: bool = False
    """true: GET /metrics needs no token."""

    @model_validator(mode="after")
    def _token_off_loopback(self) -> AdminConfig:
        host, _ = parse_endpoint(self.listen)
        if self.token is None and not is_loopback_host(host):
            _fail(
                "AdminConfig",
                [(("token",), "required when admin.listen is not a loopback address")],
            )
        return self


class Timeouts(_Model):
    """Network timeouts, in seconds after validation."""

    connect: Duration = Field(default=2.0, gt=0)
    """TCP connect to an upstream endpoint."""
    header: Duration = Field(default=10.0, gt=0)
    """A client must deliver its whole request head within this."""
    response: Duration = Field(default=30.0, gt=0)
    """The upstream must start its response within this after the request."""
    idle: Duration = Field(default=60.0, gt=0)
    """Keep-alive idle time, both sides; also the longest pause inside a request body (408)."""


class Limits(_Model):
    """Size and count limits that protect the proxy's memory and file descriptors."""

    max_request_line_bytes: Size = Field(default=8192, ge=1)
    """Method + target + version; above -> 414."""
    max_header_bytes: Size = Field(default=65536, ge=1)
    """Request line + headers; above -> 431."""
    max_body_bytes: Size = Field(default=0, ge=0)
    """0 = unlimited; above -> 413."""
    max_connections: int = Field(default=10000, ge=1)
    """Downstream connections; above -> 503 and close."""


# --------------------------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------------------------


class MatchConfig(_Model):
    """Which requests a service takes: exact host beats "*", then the longest path prefix."""

    host: Annotated[str, AfterValidator(_check_match_host)] = "*"
    """Host to match, without port (case-insensitive; stored lower-case), or "*" for any."""
    path_prefix: UrlPath = "/"
    """Path prefix to match; must start with "/"."""


class VersionConfig(_Model):
    """One deployed version of the application."""

    endpoints: list[Endpoint] = Field(min_length=1)
    """Upstream addresses, "host:port" or "[v6]:port"; requests go round-robin."""
    weight: int = Field(ge=0)
    """Share of traffic in units of the service's weight_total."""
    revision: str | None = Field(default=None, coerce_numbers_to_str=True)
    """Free-form release label (e.g. "2.4.0"); a change restarts the rollout."""


class StickyConfig(_Model):
    """Where the sticky user key is read from: exactly one of header or cookie."""

    header: Token | None = None
    """Request header holding the user key (e.g. X-User-Id)."""
    cookie: Token | None = None
    """Cookie holding the user key."""

    @model_validator(mode="after")
    def _exactly_one(self) -> StickyConfig:
        if (self.header is None) == (self.cookie is None):
            raise ValueError("set exactly one of header or cookie")
        return self


class ForceConfig(_Model):
    """Header and/or cookie whose value (always | never | a version name) forces a version."""

    header: Token | None = None
    """Request header whose value forces a version (removed before forwarding)."""
    cookie: Token | None = None
    """Cookie whose value forces a version (removed before forwarding); the header wins."""

    @model_validator(mode="after")
    def _at_least_one(self) -> ForceConfig:
        if self.header is None and self.cookie is None:
            raise ValueError("set header, cookie or both")
        return self


class HealthCheckConfig(_Model):
    """Active HTTP health checks of every endpoint of every version."""

    path: UrlPath = "/healthz"
    """Path requested; 2xx and 3xx pass."""
    interval: Duration = Field(default=5.0, gt=0)
    """Time between two checks of an endpoint."""
    timeout: Duration = Field(default=1.0, gt=0)
    """A check not answered within this fails."""
    healthy_threshold: int = Field(default=2, ge=1)
    """Consecutive passes before an endpoint counts as healthy."""
    unhealthy_threshold: int = Field(default=3, ge=1)
    """Consecutive failures before an endpoint counts as unhealthy."""


class SuccessRateCheck(_Model):
    min: float = Field(ge=0, le=100)
    """Lowest acceptable % of responses that are not 5xx."""


class LatencyCheck(_Model):
    max: Duration = Field(gt=0)
    """Highest acceptable 99th percentile response time: passes when at most 1 % of the
    interval's requests took longer. One of the latency histogram's bounds (1ms, 2.5ms, 5ms,
    10ms, 25ms, 50ms, 75ms, 100ms, 150ms, 200ms, 250ms, 300ms, 400ms, 500ms, 750ms, 1s, 1.5s,
    2s, 2.5s, 3s, 5s, 10s, 30s), so it is judged exactly."""

    @field_validator("max")
    @classmethod
    def _a_bucket_bound(cls, value: float) -> float:
        if bucket_bound_index(value) is None:
            bounds = ", ".join(f"{bound * 1000:g}ms" for bound in LATENCY_BUCKETS)
            raise ValueError(
                f"must be one of the latency histogram's bounds ({bounds}), so that the p99 "
                "is judged exactly"
            )
        return value


class RelativeSuccessRateCheck(_Model):
    max_drop: float = Field(ge=0, le=100)
    """How many percentage points the new version may be below the stable one."""


class RolloutMetrics(_Model):
    """What the analysis checks each interval; at least one metric."""

    success_rate: SuccessRateCheck | None = None
    """Absolute success rate check."""
    latency_p99: LatencyCheck | None = None
    """99th percentile latency check."""
    success_rate_vs_stable: RelativeSuccessRateCheck | None = None
    """Success rate compared with the stable (active) version's."""

    @model_validator(mode="after")
    def _not_empty(self) -> RolloutMetrics:
        # A rollout that measures nothing would promote any release that gets traffic.
        metrics = (self.success_rate, self.latency_p99, self.success_rate_vs_stable)
        if all(metric is None for metric in metrics):
            raise ValueError(
                "set at least one of success_rate, latency_p99, success_rate_vs_stable"
            )
        return self


class Webhook(_Model):
    """A Flagger-style webhook called at a rollout event."""

    name: str = Field(min_length=1)
    """Name, for the log and the events."""
    type: Literal["pre-rollout", "rollout", "confirm-promotion", "post-rollout", "rollback"]
    """When it is called; a failing pre-rollout or confirm-promotion hook holds the rollout."""
    url: Annotated[str, AfterValidator(_check_http_url)]
    """http:// or https:// URL, called with POST."""
    timeout: Duration = Field(default=5.0, gt=0)
    """Per attempt."""
    retries: int = Field(default=2, ge=0)
    """Further attempts after a failure."""
    metadata: dict[str, str] = {}
    """Sent in the webhook's JSON body."""


class CanaryRollout(_Model):
    """Progressive canary: raise the canary's weight step by step while the analysis passes.

    Steps are percentages of traffic, given as `step_weights` or as `step_weight` up to
    `max_weight`; exactly one form.
    """

    strategy: Literal["canary"]
    """Which kind of rollout."""
    stable: str
    """The version that carries traffic now."""
    canary: str
    """The version being rolled out."""
    step_weights: list[Percent] | None = Field(default=None, min_length=1)
    """Canary share (%) at each step, increasing; then promotion to 100 %."""
    step_weight: Percent | None = None
    """Canary share (%) added per step (with max_weight)."""
    max_weight: Percent | None = None
    """Last step's canary share (%) (with step_weight)."""
    interval: Duration = Field(default=60.0, gt=0)
    """One analysis per interval and, when it passes, one step."""
    threshold: int = Field(default=3, ge=1)
    """Failed checks (cumulative in a run) that trigger a rollback."""
    min_requests: int = Field(default=50, ge=1)
    """Fewer canary requests in an interval -> inconclusive: hold."""
    progress_deadline: Duration = Field(default=600.0, gt=0)
    """Inconclusive this long -> progress_deadline_action."""
    progress_deadline_action: Literal["rollback", "pause"] = "rollback"
    """At the progress deadline: roll back, or pause and wait for a person."""
    promotion: Literal["auto", "manual"] = "auto"
    """auto: promote after the last step; manual: wait for `laneswitch rollout promote`."""
    metrics: RolloutMetrics
    webhooks: list[Webhook] = []
    """Flagger-style webhooks called at rollout events."""

    @model_validator(mode="after")
    def _check(self) -> CanaryRollout:
        problems = self._step_problems()
        if self.canary == self.stable:
            problems.append((("canary",), "must differ from stable"))
        _fail_if_any("CanaryRollout", problems)
        return self

    def _step_problems(self) -> list[tuple[Loc, str]]:
        linear = self.step_weight is not None or self.max_weight is not None
        if self.step_weights is not None and linear:
            return [((), "use either step_weights or step_weight + max_weight, not both")]
        if self.step_weights is not None:
            return [
                (("step_weights", i), f"must be greater than the previous step ({prev:g})")
                for i, (prev, step) in enumerate(pairwise(self.step_weights), start=1)
                if step <= prev
            ]
        if self.step_weight is None and self.max_weight is None:
            return [((), "set step_weights, or step_weight and max_weight")]
        if self.max_weight is None:
            return [(("max_weight",), "required with step_weight")]
        if self.step_weight is None:
            return [(("step_weight",), "required with max_weight")]
        if self.max_weight < self.step_weight:
            return [(("max_weight",), "must be >= step_weight")]
        return []

    def steps(self) -> list[float]:
        """The traffic percentages the canary walks through, in order."""
        if self.step_weights is not None:
            return list(self.step_weights)
        assert self.step_weight is not None and self.max_weight is not None  # by validation
        count = math.ceil(self.max_weight / self.step_weight - 1e-9)
        # Rounded so that 0.1 * 3 is 0.3, a representable weight, not 0.30000000000000004.
        return [round(min(self.step_weight * i, self.max_weight), 9) for i in range(1, count + 1)]


class PreSwitchCheck(_Model):
    """A request sent to the preview version before a blue-green switch."""

    path: UrlPath
    """Path requested on the preview version."""
    expect_status: int = Field(default=200, ge=100, le=599)
    """The status that passes."""
    timeout: Duration = Field(default=2.0, gt=0)
    """A check not answered within this fails."""


class BlueGreenRollout(_Model):
    """Blue-green: switch all traffic to the preview, bake, roll back if the analysis fails."""

    strategy: Literal["blue-green"]
    """Which kind of rollout."""
    active: str
    """The version that carries traffic now."""
    preview: str
    """The version that takes over at the switch."""
    bake_time: Duration = Field(default=120.0, ge=0)
    """How long the new active version is watched after the switch."""
    min_passing_intervals: int = Field(default=2, ge=0)
    """Passing analyses the bake needs, besides bake_time, before the promotion."""
    interval: Duration = Field(default=10.0, gt=0)
    """One analysis per interval."""
    threshold: int = Field(default=2, ge=1)
    """Failed analyses (cumulative in a run) that trigger a rollback."""
    min_requests: int = Field(default=20, ge=1)
    """Fewer requests to the judged version in an interval -> inconclusive: hold."""
    progress_deadline: Duration = Field(default=600.0, gt=0)
    """Inconclusive this long -> progress_deadline_action."""
    progress_deadline_action: Literal["rollback", "pause"] = "rollback"
    """At the progress deadline: roll back, or pause and wait for a person."""
    metrics: RolloutMetrics
    pre_switch: list[PreSwitchCheck] = []
    """Requests sent to the preview before the switch; any unexpected answer holds it."""
    webhooks: list[Webhook] = []
    """Flagger-style webhooks called at rollout events."""

    @model_validator(mode="after")
    def _check(self) -> BlueGreenRollout:
        if self.preview == self.active:
            _fail("BlueGreenRollout", [(("preview",), "must differ from active")])
        return self


RolloutConfig = Annotated[CanaryRollout | BlueGreenRollout, Field(discriminator="strategy")]


def _is_representable(percent: float, weight_total: int) -> bool:
    """True when `percent` of traffic is a whole number of weight units."""
    units = percent * weight_total / 100
    return abs(units - round(units)) <= 1e-9 * max(1.0, units)


class ServiceConfig(_Model):
    """One application with several versions, and how traffic is split between them."""

    match: MatchConfig = MatchConfig()
    weight_total: int = Field(default=100, ge=1, le=1_000_000)
    """Weight resolution: 100 = 1 %, 10000 = 0.01 %."""
    versions: dict[VersionName, VersionConfig] = Field(min_length=1)
    """Versions in file order (the sticky bucket order without a rollout)."""
    sticky: StickyConfig | None = None
    force: ForceConfig | None = None
    version_header: Annotated[str, AfterValidator(_check_optional_token)] = ""
    """Response header naming the version that served; "" = off."""
    health_check: HealthCheckConfig | None = None
    rollout: RolloutConfig | None = None
    """A progressive rollout with laneswitch's own analysis."""

    def file_weights(self) -> dict[str, int]:
        """Each version's weight as the file gives it (the runtime's may differ)."""
        return {name: version.weight for name, version in self.versions.items()}

    @field_validator("versions")
    @classmethod
    def _weights_fill_total(
        cls, versions: dict[str, VersionConfig], info: ValidationInfo
    ) -> dict[str, VersionConfig]:
        total = info.data.get("weight_total")  # absent when weight_total itself is invalid
        weights = sum(v.weight for v in versions.values())
        if weights == 0:
            raise ValueError("every version has weight 0; at least one must carry traffic")
        if total is not None and weights != total:
            raise ValueError(f"weights sum to {weights}, must equal weight_total {total}")
        return versions

    @field_validator("rollout", mode="wrap")
    @classmethod
    def _rollout(
        cls, value: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> CanaryRollout | BlueGreenRollout | None:
        try:
            rollout: CanaryRollout | BlueGreenRollout | None = handler(value)
        except ValidationError as exc:
            raise _without_union_tag(exc) from None
        if rollout is not None:
            _fail_if_any("ServiceConfig", _rollout_problems(rollout, info.data))
        return rollout


def _without_union_tag(exc: ValidationError) -> ValidationError:
    """Drop the strategy tag pydantic puts first in the location of a tagged union's errors.

    Users wrote `rollout.step_weights`, not `rollout.canary.step_weights`; and a bad or
    missing `strategy` is reported at `rollout.strategy`.
    """
    details: list[InitErrorDetails] = []
    for err in exc.errors():
        if err["type"] == "union_tag_not_found":
            details.append({"type": "missing", "loc": ("strategy",), "input": err["input"]})
        elif err["type"] == "union_tag_invalid":
            message = "must be 'canary' or 'blue-green'"
            details.append(
                {
                    "type": "value_error",
                    "loc": ("strategy",),
                    "input": err["input"],
                    "ctx": {"error": ValueError(message)},
                }
            )
        else:
            details.append(_relocate(err, err["loc"][1:]))
    return ValidationError.from_exception_data(exc.title, details)


def _rollout_problems(
    rollout: CanaryRollout | BlueGreenRollout, fields: Mapping[str, Any]
) -> list[tuple[Loc, str]]:
    """Problems that need the service's versions and weight_total (when those are valid)."""
    versions: dict[str, VersionConfig] | None = fields.get("versions")
    total: int | None = fields.get("weight_total")
    if isinstance(rollout, CanaryRollout):
        roles = {"stable": rollout.stable, "canary": rollout.canary}
    else:
        roles = {"active": rollout.active, "preview": rollout.preview}
    problems: list[tuple[Loc, str]] = []
    if versions is not None:
        problems += [
            ((role,), f'no version named "{name}" in versions')
            for role, name in roles.items()
            if name not in versions
        ]
    if total is not None and isinstance(rollout, CanaryRollout):
        problems += _resolution_problems(rollout, total)
    return problems


def _resolution_problems(rollout: CanaryRollout, total: int) -> list[tuple[Loc, str]]:
    if rollout.step_weights is not None:
        steps: list[tuple[Loc, float]] = [
            (("step_weights", i), w) for i, w in enumerate(rollout.step_weights)
        ]
    else:
        steps = [(("step_weight",), rollout.step_weight or 0.0)]
        steps.append((("max_weight",), rollout.max_weight or 0.0))
    resolution = 100 / total
    return [
        (loc, f"{w:g} is not a multiple of {resolution:g} (100 / weight_total {total})")
        for loc, w in steps
        if not _is_representable(w, total)
    ]


# Redis URL schemes the fleet store accepts (redis-py's `from_url`): plain TCP or TLS.
_REDIS_SCHEMES = frozenset({"redis", "rediss"})


def _check_redis_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in _REDIS_SCHEMES or not parts.hostname:
        raise ValueError("must be a redis://[:password@]host:port/db or rediss:// URL")
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise ValueError("the port must be a number") from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError("the database (the URL's path) must be a number")
    return url


RedisUrl = Annotated[str, AfterValidator(_check_redis_url)]


class FleetConfig(_Model):
    """Several replicas sharing one runtime state in Redis, with one leader deciding."""

    redis: RedisUrl
    """The store: redis://[:password@]host:port/db or rediss:// (TLS)."""
    name: Name
    """Replicas with the same store and name form one fleet."""
    member: OptionalStr = None
    """This replica's id in the fleet; empty = hostname:pid."""
    lease: Duration = Field(default=5.0, ge=0.5)
    """Leadership lease; a dead leader is replaced within it."""
    ack_timeout: Duration = Field(default=2.0, gt=0)
    """How long a change waits for every live member to apply it."""

    @field_validator("member")
    @classmethod
    def _member_name(cls, member: str | None) -> str | None:
        if member is not None and not _MEMBER_RE.fullmatch(member):
            raise ValueError("letters, digits and . _ - : only, at most 128")
        return member


# Member ids appear in events, metrics and the store's key names.
_MEMBER_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


# --------------------------------------------------------------------------------------------
# The whole file
# --------------------------------------------------------------------------------------------


class Config(_Model):
    """A whole laneswitch config file, validated.

    `laneswitch schema` and the README's configuration reference describe each key.
    """

    listen: ListenList = ["127.0.0.1:8080"]
    """Data-plane listeners: one "host:port" or a list of them."""
    admin: AdminConfig = AdminConfig()
    state_file: OptionalStr = None
    """Where runtime state (weights, rollout phase, events) survives restarts."""
    drain_timeout: Duration = Field(default=30.0, ge=0)
    """How long in-flight work may finish after a switch or SIGTERM."""
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    trusted_hops: int = Field(default=0, ge=0)
    """Keep the last N client-sent X-Forwarded-For entries, then append the peer."""
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    """Worker processes; "auto" = one per CPU."""
    fleet: FleetConfig | None = None
    """Fleet mode: share the runtime state with other replicas (absent: this replica alone)."""
    services: dict[Name, ServiceConfig] = Field(min_length=1)
    """Services in file order."""

    @field_validator("workers", mode="wrap")
    @classmethod
    def _workers(cls, value: object, handler: ValidatorFunctionWrapHandler) -> int | str:
        # One plain message instead of one error per member of the union.
        try:
            workers: int | str = handler(value)
        except ValidationError:
            raise ValueError('must be an integer >= 1 or "auto"') from None
        return workers

    @field_validator("listen")
    @classmethod
    def _distinct_listeners(cls, listen: list[str]) -> list[str]:
        seen: dict[tuple[str, int], int] = {}
        problems: list[tuple[Loc, str]] = []
        for i, text in enumerate(listen):
            address = parse_endpoint(text)
            first = seen.setdefault(address, i) if address[1] else i  # port 0: a fresh port
            if first != i:
                problems.append(((i,), f"same address as listen.{first}"))
        _fail_if_any("Config", problems)
        return listen

    @field_validator("services")
    @classmethod
    def _distinct_matches(cls, services: dict[str, ServiceConfig]) -> dict[str, ServiceConfig]:
        owner: dict[tuple[str, str], str] = {}
        problems: list[tuple[Loc, str]] = []
        for name, service in services.items():
            key = (service.match.host, service.match.path_prefix)
            first = owner.setdefault(key, name)
            if first != name:
                problems.append(((name, "match"), f'same host and path_prefix as "{first}"'))
        _fail_if_any("Config", problems)
        return services

    @model_validator(mode="after")
    def _admin_apart(self) -> Config:
        admin = parse_endpoint(self.admin.listen)
        for i, text in enumerate(self.listen):
            if admin[1] and parse_endpoint(text) == admin:  # port 0: a fresh port, no clash
                _fail("Config", [(("admin", "listen"), f"same address as listen.{i}")])
        return self
