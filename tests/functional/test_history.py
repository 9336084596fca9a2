"""The console's chart series: bounded per-version rings (unit) and GET /history (API)."""

from __future__ import annotations

import asyncio
import gc
import resource
from pathlib import Path

from proxy.history import HISTORY_ROWS, HISTORY_SECONDS, HISTORY_STEP, History
from proxy.metrics import StatsRegistry
from tests.functional.test_admin import TOKEN, admin_proxy, blue_green, config_text, send

# -- unit -----------------------------------------------------------------------------------------


def test_the_rings_cover_fifteen_minutes_at_five_seconds_or_finer() -> None:
    assert HISTORY_STEP <= 5.0
    assert (HISTORY_ROWS - 1) * HISTORY_STEP >= HISTORY_SECONDS == 15 * 60


def test_a_row_is_what_happened_since_the_previous_one() -> None:
    stats = StatsRegistry()
    history = History(stats)
    weights = {"shop": {"blue": 90, "green": 10}}
    history.sample(weights, now=1000.0, clock=10.0)  # baseline only
    assert history.series("shop") == {"blue": [], "green": []}
    blue = stats.get("shop", "blue")
    for _ in range(18):
        blue.observe(200, 0.004)
    for _ in range(2):
        blue.observe(503, 0.004)
    history.sample(weights, now=1002.0, clock=12.0)
    rows = history.series("shop")
    assert rows["blue"] == [(1002.0, 10.0, 90.0, rows["blue"][0][3], 90)]
    assert 2.5 <= (rows["blue"][0][3] or 0) <= 5.0  # p99 in ms, inside the 4 ms sample's bucket
    # No requests: success rate and p99 are null, not 0 (a chart must show a gap, not a drop).
    assert rows["green"] == [(1002.0, 0.0, None, None, 10)]
    history.sample(weights, now=1004.0, clock=14.0)
    assert history.series("shop")["blue"][-1] == (1004.0, 0.0, None, None, 90)
    assert [row[0] for row in history.series("shop", since=1004.0)["blue"]] == [1004.0]
    assert history.series("shop", since=1004.5) == {"blue": [], "green": []}


def test_a_ring_keeps_its_fixed_number_of_rows_and_gone_versions_are_dropped() -> None:
    stats = StatsRegistry()
    history = History(stats, rows=5)
    for second in range(20):
        history.sample({"shop": {"blue": 100, "green": 0}}, now=float(second), clock=float(second))
    assert [row[0] for row in history.series("shop")["blue"]] == [15.0, 16.0, 17.0, 18.0, 19.0]
    history.sample({"shop": {"blue": 100}}, now=20.0, clock=20.0)
    assert set(history.series("shop")) == {"blue"}
    assert history.series("other") == {}


def _rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() // 1024


def test_memory_stays_flat_over_many_services_and_versions() -> None:
    stats = StatsRegistry()
    history = History(stats)
    weights = {f"svc{s}": {f"v{v}": 10 for v in range(5)} for s in range(50)}
    for s in range(50):
        for v in range(5):
            stats.get(f"svc{s}", f"v{v}")
    clock = 0.0

    def run(samples: int) -> None:
        nonlocal clock
        for _ in range(samples):
            clock += HISTORY_STEP
            for versions in weights:
                stats.get(versions, "v0").observe(200, 0.002)
            history.sample(weights, now=clock, clock=clock)

    run(HISTORY_ROWS + 10)  # every ring full
    gc.collect()
    full = _rss_kib()
    run(2 * HISTORY_ROWS)  # twice more round every ring
    gc.collect()
    grown = _rss_kib() - full
    assert all(len(rows) == HISTORY_ROWS for rows in history.series("svc7").values())
    # 250 rings of HISTORY_ROWS rows are a few MB; going round them must not add to it.
    assert grown < 2048, f"RSS grew by {grown} KiB"


# -- GET /history ---------------------------------------------------------------------------------


async def test_history_serves_rows_of_real_traffic_behind_the_token(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(
            tmp_path, config_text(blue.endpoint, green.endpoint, blue_weight=50, token=TOKEN)
        ) as proxy,
    ):
        denied = await proxy.call("GET", "/history?service=shop", auth=None)
        assert denied.status == 401
        await send(proxy.proxy_port, 40)
        proxy.server.control.sample_history()
        answer = await proxy.call("GET", "/history?service=shop&since=0")
        assert answer.status == 200, answer.body
        assert set(answer.body) == {"blue", "green"}
        rows = answer.body["blue"] + answer.body["green"]
        assert rows and all(len(row) == 5 for row in rows)
        assert sum(row[1] for row in rows) > 0  # some requests per second were counted
        assert {row[4] for row in rows} == {50}
        # The server's own sampler adds rows as time passes.
        last = max(row[0] for row in rows)
        async with asyncio.timeout(3 * HISTORY_STEP + 2):
            while True:
                later = await proxy.call("GET", f"/history?service=shop&since={last + 0.001}")
                if later.body["blue"]:
                    break
                await asyncio.sleep(0.2)
        assert all(row[0] > last for row in later.body["blue"])


async def test_history_refuses_unknown_services_and_bad_times(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        missing = await proxy.call("GET", "/history?service=nope")
        assert missing.status == 404 and "nope" in missing.error
        assert (await proxy.call("GET", "/history")).status == 404
        for bad in ("yesterday", "nan", "inf"):
            answer = await proxy.call("GET", f"/history?service=shop&since={bad}")
            assert answer.status == 400 and "since" in answer.error
