"""The config of one service: its match, versions, weights, stickiness, force and health checks.

The service's rollout is checked here against the service's versions and weight_total.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from proxy.config.base import ConfigModel, Loc, fail_if_any, relocate
from proxy.config.rollout import BlueGreenRollout, CanaryRollout, RolloutConfig
from proxy.config.scalars import (
    Duration,
    Endpoint,
    MatchHost,
    OptionalToken,
    Token,
    UrlPath,
    VersionName,
)

if TYPE_CHECKING:
    from pydantic_core import InitErrorDetails


class MatchConfig(ConfigModel):
    """Which requests a service takes: exact host beats "*", then the longest path prefix."""

    host: MatchHost = "*"
    """Host to match, without port (case-insensitive; stored lower-case), or "*" for any."""
    path_prefix: UrlPath = "/"
    """Path prefix to match; must start with "/"."""


class VersionConfig(ConfigModel):
    """One deployed version of the application."""

    endpoints: list[Endpoint] = Field(min_length=1)
    """Upstream addresses, "host:port" or "[v6]:port"; requests go round-robin."""
    weight: int = Field(ge=0)
    """Share of traffic in units of the service's weight_total."""
    revision: str | None = Field(default=None, coerce_numbers_to_str=True)
    """Free-form release label (e.g. "2.4.0"); a change restarts the rollout."""


class StickyConfig(ConfigModel):
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


class ForceConfig(ConfigModel):
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


class HealthCheckConfig(ConfigModel):
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


def _is_representable(percent: float, weight_total: int) -> bool:
    """True when `percent` of traffic is a whole number of weight units."""
    units = percent * weight_total / 100
    return abs(units - round(units)) <= 1e-9 * max(1.0, units)


class ServiceConfig(ConfigModel):
    """One application with several versions, and how traffic is split between them."""

    match: MatchConfig = MatchConfig()
    weight_total: int = Field(default=100, ge=1, le=1_000_000)
    """Weight resolution: 100 = 1 %, 10000 = 0.01 %."""
    versions: dict[VersionName, VersionConfig] = Field(min_length=1)
    """Versions in file order (the sticky bucket order without a rollout)."""
    sticky: StickyConfig | None = None
    force: ForceConfig | None = None
    version_header: OptionalToken = ""
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
            fail_if_any("ServiceConfig", _rollout_problems(rollout, info.data))
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
            details.append(relocate(err, err["loc"][1:]))
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
