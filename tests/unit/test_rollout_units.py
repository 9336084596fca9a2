"""Units: the analysis verdicts from hand-built windows, and the rollout state machine's
transitions, both pure (no sockets, no clock)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from proxy.config.loader import parse_config
from proxy.config.rollout import CanaryRollout, RolloutMetrics
from proxy.config.service import ServiceConfig
from proxy.metrics import StatsSnapshot, VersionStats
from proxy.rollout import controller, release, values
from proxy.rollout.analysis import Measured, analyse
from proxy.rollout.values import (
    CheckResult,
    Observation,
    RolloutState,
    TransitionRefused,
)

METRICS = RolloutMetrics.model_validate(
    {
        "success_rate": {"min": 99},
        "latency_p99": {"max": "500ms"},
        "success_rate_vs_stable": {"max_drop": 1},
    }
)


def window(*answers: tuple[int, float, int], aborts: int = 0) -> StatsSnapshot:
    """A version's counters over one interval: (status, seconds, how many) triples."""
    stats = VersionStats("shop", "v")
    for status, seconds, count in answers:
        for _ in range(count):
            stats.observe(status, seconds)
    stats.client_aborts = aborts
    return stats.snapshot()


def judged(
    canary: StatsSnapshot | None, stable: StatsSnapshot | None, min_requests: int = 50
) -> Any:
    return analyse(Measured.of(canary), Measured.of(stable), METRICS, min_requests)


HEALTHY_STABLE = window((200, 0.010, 1000))


def test_no_traffic_is_inconclusive_with_the_values() -> None:
    result = judged(None, HEALTHY_STABLE)
    assert result.verdict == "inconclusive"
    assert result.values["requests"] == 0
    assert result.values["success_rate"] is None
    assert result.thresholds["min_requests"] == 50
    assert "fewer than min_requests 50" in result.reason


def test_exactly_min_requests_is_judged_one_fewer_is_not() -> None:
    assert judged(window((200, 0.01, 49)), HEALTHY_STABLE).verdict == "inconclusive"
    result = judged(window((200, 0.01, 50)), HEALTHY_STABLE)
    assert result.verdict == "pass"
    assert result.values["requests"] == 50
    failing = judged(window((200, 0.01, 45), (503, 0.01, 5)), HEALTHY_STABLE)
    assert failing.verdict == "fail"
    assert failing.failed == ("success_rate", "success_rate_vs_stable")
    assert failing.values["success_rate"] == 90.0


def test_p99_with_few_samples_is_a_number_never_nan() -> None:
    result = judged(window((200, 0.003, 1)), HEALTHY_STABLE, min_requests=1)
    p99 = result.values["latency_p99_ms"]
    assert isinstance(p99, float) and math.isfinite(p99)
    assert 2.5 <= p99 <= 5.0  # inside the sample's bucket
    assert result.verdict == "pass"
    slow = judged(window((200, 0.7, 2)), HEALTHY_STABLE, min_requests=1)
    assert slow.verdict == "fail" and slow.failed == ("latency_p99",)
    assert math.isfinite(slow.values["latency_p99_ms"])


def test_a_canary_worse_only_relative_to_stable_fails_that_check_alone() -> None:
    relaxed = RolloutMetrics.model_validate(
        {"success_rate": {"min": 90}, "success_rate_vs_stable": {"max_drop": 1}}
    )
    canary = window((200, 0.01, 97), (500, 0.01, 3))  # 97 %: fine on its own
    stable = window((200, 0.01, 1000))  # 100 %
    result = analyse(Measured.of(canary), Measured.of(stable), relaxed, 50)
    assert result.verdict == "fail"
    assert result.failed == ("success_rate_vs_stable",)
    assert result.values["success_rate_drop"] == 3.0
    assert result.thresholds == {
        "min_requests": 50,
        "success_rate_min": 90,
        "success_rate_max_drop": 1,
    }
    # The same canary next to an equally bad stable passes: the drop is what is judged.
    worse_stable = window((200, 0.01, 970), (502, 0.01, 30))
    assert analyse(Measured.of(canary), Measured.of(worse_stable), relaxed, 50).verdict == "pass"


def test_client_errors_and_aborts_never_count_against_a_version() -> None:
    canary = window((200, 0.01, 50), (404, 0.01, 40), (499, 0.01, 0), aborts=30)
    result = judged(canary, HEALTHY_STABLE)
    assert result.verdict == "pass"
    assert result.values["success_rate"] == 100.0


def test_the_proxys_own_gateway_errors_count() -> None:
    canary = window((200, 0.01, 90), (502, 0.01, 5), (504, 0.01, 5))
    assert judged(canary, HEALTHY_STABLE).verdict == "fail"


def test_at_the_threshold_passes() -> None:
    canary = window((200, 0.01, 99), (500, 0.01, 1))  # 99.0 %, 1 point below stable
    result = judged(canary, HEALTHY_STABLE)
    assert result.verdict == "pass", result.reason


def test_no_stable_traffic_skips_only_the_relative_check() -> None:
    result = judged(window((200, 0.01, 60)), None)
    assert result.verdict == "pass"
    assert result.values["success_rate_drop"] is None
    assert "no stable traffic" in result.reason


# -- the state machine ----------------------------------------------------------------------------

SERVICE_YAML = """
services:
  shop:
    versions:
      stable: {endpoints: ["127.0.0.1:1"], weight: 100}
      canary: {endpoints: ["127.0.0.1:2"], weight: 0}
    rollout:
      strategy: canary
      stable: stable
      canary: canary
      step_weights: [10, 50]
      interval: 1s
      threshold: 2
      min_requests: 5
      progress_deadline: 3s
      progress_deadline_action: ACTION
      promotion: PROMOTION
      metrics: {success_rate: {min: 99}}
"""


def service(
    promotion: str = "auto", deadline_action: str = "rollback"
) -> tuple[ServiceConfig, CanaryRollout]:
    text = SERVICE_YAML.replace("PROMOTION", promotion).replace("ACTION", deadline_action)
    config = parse_config(text, env={})
    shop = config.services["shop"]
    assert isinstance(shop.rollout, CanaryRollout)
    return shop, shop.rollout


def passing(now: float) -> Observation:
    canary = window((200, 0.01, 10))
    return Observation(
        now=now,
        since=now - 1,
        analysis=analyse(Measured.of(canary), Measured.of(canary), METRICS, 5),
    )


def test_a_passing_canary_walks_every_step_then_promotes() -> None:
    shop, rollout = service()
    weights = {"stable": 100, "canary": 0}
    out = controller.start(RolloutState(), rollout, shop, weights, 0.0, reason="test")
    assert out.again and out.state.phase == "progressing" and out.state.step == 0
    assert controller.needs(out.state, rollout, timer=False).hooks == ("pre-rollout",)
    out = controller.tick(out.state, rollout, shop, weights, Observation(now=0.0))
    assert out.decisions[0].weights == {"stable": 90, "canary": 10}
    weights = out.decisions[0].weights
    out = controller.tick(out.state, rollout, shop, weights, passing(1.0))
    assert (out.state.step, out.decisions[0].weights) == (2, {"stable": 50, "canary": 50})
    out = controller.tick(out.state, rollout, shop, weights, passing(2.0))
    assert out.state.phase == "promoting" and out.again
    confirm = Observation(now=2.0, confirm=())
    out = controller.tick(out.state, rollout, shop, weights, confirm)
    assert out.state.phase == "promoted"
    assert out.decisions[0].weights == {"stable": 0, "canary": 100}
    assert out.decisions[0].notify == "post-rollout"
    assert out.state.previous == "stable"


def test_manual_promotion_waits_at_the_last_step_and_still_judges() -> None:
    shop, rollout = service("manual")
    state = RolloutState(phase="progressing", step=2)
    weights = {"stable": 50, "canary": 50}
    out = controller.tick(state, rollout, shop, weights, passing(1.0))
    assert out.state.phase == "progressing" and out.state.awaiting_promotion
    assert out.decisions[0].action == "hold"
    again = controller.tick(out.state, rollout, shop, weights, passing(2.0))
    assert again.decisions == ()  # said once
    out = controller.promote(again.state, rollout, 3.0)
    assert out.state.phase == "promoting" and out.again


def test_inconclusive_holds_then_rolls_back_at_the_deadline() -> None:
    shop, rollout = service()
    state = RolloutState(phase="progressing", step=1)
    weights = {"stable": 90, "canary": 10}
    empty = analyse(Measured.of(None), Measured.of(None), METRICS, 5)
    out = controller.tick(state, rollout, shop, weights, Observation(1.0, 0.0, empty))
    assert out.decisions[0].action == "hold"
    out = controller.tick(out.state, rollout, shop, weights, Observation(2.0, 1.0, empty))
    assert out.state.phase == "progressing"
    out = controller.tick(out.state, rollout, shop, weights, Observation(3.0, 2.0, empty))
    assert out.state.phase == "rolled_back"
    [decision] = out.decisions
    assert decision.action == "rollback" and decision.rollback == "progress_deadline"
    assert "progress deadline 3s" in decision.reason
    assert decision.weights == {"stable": 100, "canary": 0}


def test_inconclusive_holds_then_pauses_at_the_deadline_when_told_to() -> None:
    shop, rollout = service(deadline_action="pause")
    state = RolloutState(phase="progressing", step=1)
    weights = {"stable": 90, "canary": 10}
    empty = analyse(Measured.of(None), Measured.of(None), METRICS, 5)
    out = controller.tick(state, rollout, shop, weights, Observation(1.0, 0.0, empty))
    assert out.decisions[0].action == "hold" and out.state.holding_since == 0.0
    out = controller.tick(out.state, rollout, shop, weights, Observation(2.0, 1.0, empty))
    assert out.state.phase == "progressing"
    out = controller.tick(out.state, rollout, shop, weights, Observation(3.0, 2.0, empty))
    assert out.state.phase == "paused"
    assert "progress deadline 3s" in out.decisions[0].reason
    assert out.decisions[0].weights is None  # holds its weight; never promoted


def test_failed_checks_accumulate_and_roll_back_at_the_threshold() -> None:
    shop, rollout = service()
    weights = {"stable": 90, "canary": 10}
    bad = window((200, 0.01, 5), (500, 0.01, 5))
    failing = analyse(Measured.of(bad), Measured.of(None), METRICS, 5)
    state = RolloutState(phase="progressing", step=1)
    out = controller.tick(state, rollout, shop, weights, Observation(1.0, 0.0, failing))
    assert out.decisions[0].action == "check_failed" and out.state.failed_checks == 1
    out = controller.tick(out.state, rollout, shop, weights, passing(2.0))  # a pass in between
    assert out.state.failed_checks == 1  # cumulative in the run
    weights = {"stable": 50, "canary": 50}
    out = controller.tick(out.state, rollout, shop, weights, Observation(3.0, 2.0, failing))
    decision = out.decisions[0]
    assert out.state.phase == "rolled_back"
    assert decision.action == "rollback" and decision.weights == {"stable": 100, "canary": 0}
    assert decision.values["failed_checks"] == 2 and decision.thresholds["threshold"] == 2
    assert decision.rollback == "failed_checks"
    assert controller.needs(out.state, rollout, timer=True) == values.Needs()


def test_a_failing_pre_rollout_hook_counts_and_keeps_the_canary_at_zero() -> None:
    shop, rollout = service()
    weights = {"stable": 100, "canary": 0}
    start = controller.start(RolloutState(), rollout, shop, weights, 0.0, reason="t")
    hook = CheckResult("load", "pre-rollout", False, 500, 3, "HTTP 500", 0.1)
    out = controller.tick(start.state, rollout, shop, weights, Observation(0.0, checks=(hook,)))
    assert out.state.failed_checks == 1 and out.state.step == 0
    assert out.decisions[0].weights is None
    assert "pre-rollout 'load' failed: HTTP 500" in out.decisions[0].reason


@pytest.mark.parametrize(
    ("phase", "allowed"),
    [
        ("idle", {"start"}),
        ("progressing", {"pause", "promote", "abort"}),
        ("paused", {"resume", "promote", "abort"}),
        ("promoting", {"pause", "abort"}),
        ("promoted", set()),  # start: refused while the canary has all the traffic
        ("rolled_back", {"start"}),
        ("aborted", {"start"}),
    ],
)
def test_which_calls_each_phase_allows(phase: str, allowed: set[str]) -> None:
    shop, rollout = service()
    weights = {"stable": 0, "canary": 100} if phase == "promoted" else {"stable": 100, "canary": 0}
    state = RolloutState(phase=phase, step=1, paused_from="progressing")
    calls = {
        "start": lambda: controller.start(state, rollout, shop, weights, 0.0, reason="t"),
        "pause": lambda: controller.pause(state, 0.0, "t"),
        "resume": lambda: controller.resume(state, 0.0),
        "promote": lambda: controller.promote(state, rollout, 0.0),
        "abort": lambda: controller.abort(state, rollout, shop, weights, 0.0, "t"),
    }
    for name, call in calls.items():
        if name in allowed:
            call()
        else:
            with pytest.raises(TransitionRefused):
                call()


def test_state_survives_json() -> None:
    state = RolloutState(phase="paused", step=2, failed_checks=1, paused_from="progressing")
    assert RolloutState.from_json(state.to_json()) == state
    assert RolloutState.from_json({"phase": "bogus", "unknown": 1}).phase == "idle"


@pytest.mark.parametrize(
    ("limit", "steady", "verdict"),
    [
        ("150ms", 0.110, "pass"),  # interpolated, this read 148 ms (and 248.5 ms before)
        ("300ms", 0.260, "pass"),
        ("2s", 1.1, "pass"),
        ("150ms", 0.160, "fail"),
        ("2s", 2.2, "fail"),
    ],
)
def test_latency_p99_is_judged_exactly_against_its_limit(
    limit: str, steady: float, verdict: str
) -> None:
    metrics = RolloutMetrics.model_validate({"latency_p99": {"max": limit}})
    canary = window((200, steady, 200))
    result = analyse(Measured.of(canary), Measured.of(None), metrics, 50)
    assert result.verdict == verdict, result.reason
    assert result.values["slower_than_limit_percent"] == (0.0 if verdict == "pass" else 100.0)


def test_latency_p99_allows_exactly_one_percent_over_the_limit() -> None:
    metrics = RolloutMetrics.model_validate({"latency_p99": {"max": "150ms"}})
    one_percent = window((200, 0.01, 99), (200, 0.9, 1))
    assert analyse(Measured.of(one_percent), Measured.of(None), metrics, 50).verdict == "pass"
    two_percent = window((200, 0.01, 98), (200, 0.9, 2))
    assert analyse(Measured.of(two_percent), Measured.of(None), metrics, 50).verdict == "fail"


def test_a_latency_limit_between_bucket_bounds_is_a_config_error_naming_the_bounds() -> None:
    with pytest.raises(ValueError, match=r"latency histogram's bounds.*150ms"):
        RolloutMetrics.model_validate({"latency_p99": {"max": "120ms"}})


def test_a_new_release_supersedes_a_run_that_gave_its_candidate_all_the_traffic() -> None:
    """A last step of 100 %: the new build of the canary starts at 0, it is not refused (that
    refusal is for a start after a promotion, where the roles must be swapped first)."""
    shop, rollout = service()
    weights = {"stable": 0, "canary": 100}
    running = RolloutState(phase="progressing", step=2, run=4)
    out = controller.start(running, rollout, shop, weights, 0.0, reason="t", restart=True)
    [decision] = out.decisions
    assert decision.weights == {"stable": 100, "canary": 0}
    assert decision.values["superseded"] == {"run": 4, "phase": "progressing", "step": 2}
    assert "run 4 (progressing at step 2) superseded" in decision.reason
    assert (out.state.run, out.state.step) == (5, 0)
    with pytest.raises(TransitionRefused):  # after a promotion: still refused
        controller.start(
            RolloutState(phase="promoted"), rollout, shop, weights, 0.0, reason="t", restart=True
        )


def test_a_change_of_the_release_is_named() -> None:
    describe = release.describe_change
    assert describe("canary|2.0|a:1", "canary|2.0|a:1") is None
    assert describe("canary|2.0|a:1", "canary|2.1|a:1") == "canary revision 2.0 -> 2.1"
    assert describe("canary||a:1", "canary||a:1,b:2") == "canary endpoints a:1 -> a:1,b:2"


BLUE_GREEN_YAML = """
services:
  shop:
    versions:
      blue: {endpoints: ["127.0.0.1:1"], weight: 100}
      green: {endpoints: ["127.0.0.1:2"], weight: 0}
    rollout:
      strategy: blue-green
      active: blue
      preview: green
      bake_time: BAKE
      interval: 1s
      EXTRA
      metrics: {success_rate: {min: 99}}
"""


def blue_green(bake: str, extra: str = "") -> tuple[ServiceConfig, Any]:
    config = parse_config(BLUE_GREEN_YAML.replace("BAKE", bake).replace("EXTRA", extra), env={})
    shop = config.services["shop"]
    assert shop.rollout is not None
    return shop, shop.rollout


def switched(shop: ServiceConfig, rollout: Any) -> tuple[Any, dict[str, int]]:
    weights = {"blue": 100, "green": 0}
    out = controller.start(RolloutState(), rollout, shop, weights, 0.0, reason="t")
    out = controller.tick(out.state, rollout, shop, weights, Observation(now=0.0))
    assert out.decisions[0].action == "switch"
    return out, {"blue": 0, "green": 100}


def test_a_bake_promotes_only_after_its_time_and_two_passing_intervals() -> None:
    """One passing interval is one sample: a bake shorter than two intervals still needs two."""
    shop, rollout = blue_green("500ms")
    assert rollout.min_passing_intervals == 2
    out, weights = switched(shop, rollout)
    out = controller.tick(out.state, rollout, shop, weights, passing(1.0))  # bake time is over
    assert out.state.phase == "progressing"
    [bake] = out.decisions
    assert bake.action == "bake" and "1 passing interval left" in bake.reason
    assert (bake.values["passing_intervals"], bake.thresholds["min_passing_intervals"]) == (1, 2)
    out = controller.tick(out.state, rollout, shop, weights, passing(2.0))
    assert out.state.phase == "promoting" and out.again
    assert "with 2 passing intervals" in out.decisions[0].reason


def test_the_passing_intervals_a_bake_needs_are_configurable() -> None:
    shop, rollout = blue_green("1s", "min_passing_intervals: 3")
    out, weights = switched(shop, rollout)
    for now in (1.0, 2.0):
        out = controller.tick(out.state, rollout, shop, weights, passing(now))
        assert out.state.phase == "progressing"
    out = controller.tick(out.state, rollout, shop, weights, passing(3.0))
    assert out.state.phase == "promoting"
    # No bake at all: promoted at the switch, as before.
    shop, rollout = blue_green("0s", "min_passing_intervals: 0")
    weights = {"blue": 100, "green": 0}
    out = controller.start(RolloutState(), rollout, shop, weights, 0.0, reason="t")
    out = controller.tick(out.state, rollout, shop, weights, Observation(now=0.0))
    assert out.state.phase == "promoting"
    # bake_time 0 alone still asks for the passing intervals.
    shop, rollout = blue_green("0s")
    out, weights = switched(shop, rollout)
    assert out.state.phase == "progressing"
    assert "baking for 0s and 2 passing intervals" in out.decisions[0].reason
