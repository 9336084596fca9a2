"""Smoke test of loadtests/fleet_apply.py: the apply-latency benchmark, with a few changes, on
3 real members and a real redis-server. It checks what the benchmark measures and reports, not
the figure (benchmarks do not gate on wall-clock numbers)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

BENCHMARK = ROOT / "loadtests" / "fleet_apply.py"


@pytest.mark.timeout(120)
async def test_the_fleet_apply_benchmark_measures_every_member_for_every_change(
    tmp_path: Path,
) -> None:
    out = tmp_path / "fleet-apply.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCHMARK),
        "--changes",
        "4",
        "--out",
        str(out),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 100)
    assert process.returncode == 0, stdout.decode() + stderr.decode()[-3000:]
    text = stdout.decode()
    assert "every member serving it:  p50 " in text and "apply p99 < 1000 ms" in text
    result = json.loads(out.read_text())
    assert (result["members"], result["changes"], result["not_applied"]) == (3, 4, [])
    assert result["failed_requests"] == 0 and result["requests"] > 0
    details = result["details"]
    assert [d["kind"] for d in details] == ["switch", "weights", "switch", "weights"]
    assert [d["weights"] for d in details[::2]] == [
        {"blue": 0, "green": 100},
        {"blue": 100, "green": 0},
    ]
    for change in details:
        # Seen on every member, each after the call was sent and no later than the slowest.
        assert set(change["applied_seconds"]) == {"m1", "m2", "m3"}
        assert all(s > 0 for s in change["applied_seconds"].values())
        assert change["pending"] == []
    assert result["apply_p99"] == max(max(d["applied_seconds"].values()) for d in details)
    # Every member recorded the changes it applied in its own histogram (the writer's own
    # writes are not "applied from the store"; the two others' are).
    histograms = result["member_apply_histograms"]
    assert histograms["m1"]["count"] >= 4 and histograms["m3"]["count"] >= 4
