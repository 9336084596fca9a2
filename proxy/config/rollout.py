"""The config of a service's rollout: canary or blue-green, its analysis and its webhooks."""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from proxy.config.base import ConfigModel, Loc, fail, fail_if_any
from proxy.config.scalars import Duration, HttpUrl, Percent, UrlPath
from proxy.latency_buckets import LATENCY_BUCKETS, bucket_bound_index


class SuccessRateCheck(ConfigModel):
    min: float = Field(ge=0, le=100)
    """Lowest acceptable % of responses that are not 5xx."""


class LatencyCheck(ConfigModel):
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


class RelativeSuccessRateCheck(ConfigModel):
    max_drop: float = Field(ge=0, le=100)
    """How many percentage points the new version may be below the stable one."""


class RolloutMetrics(ConfigModel):
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


class Webhook(ConfigModel):
    """A Flagger-style webhook called at a rollout event."""

    name: str = Field(min_length=1)
    """Name, for the log and the events."""
    type: Literal["pre-rollout", "rollout", "confirm-promotion", "post-rollout", "rollback"]
    """When it is called; a failing pre-rollout or confirm-promotion hook holds the rollout."""
    url: HttpUrl
    """http:// or https:// URL, called with POST."""
    timeout: Duration = Field(default=5.0, gt=0)
    """Per attempt."""
    retries: int = Field(default=2, ge=0)
    """Further attempts after a failure."""
    metadata: dict[str, str] = {}
    """Sent in the webhook's JSON body."""


class CanaryRollout(ConfigModel):
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
        fail_if_any("CanaryRollout", problems)
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


class PreSwitchCheck(ConfigModel):
    """A request sent to the preview version before a blue-green switch."""

    path: UrlPath
    """Path requested on the preview version."""
    expect_status: int = Field(default=200, ge=100, le=599)
    """The status that passes."""
    timeout: Duration = Field(default=2.0, gt=0)
    """A check not answered within this fails."""


class BlueGreenRollout(ConfigModel):
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
            fail("BlueGreenRollout", [(("preview",), "must differ from active")])
        return self


RolloutConfig = Annotated[CanaryRollout | BlueGreenRollout, Field(discriminator="strategy")]
