"""Smoke test of loadtests/locustfile.py: Locust, headless for a few seconds, against a live
`laneswitch run` with two upstreams and a sticky service, while the weights move.

The canary (`green`) is listed first, so it owns the first sticky buckets: raising its weight
from 10 to 25 to 50 moves some users from blue to green and none back. The locustfile's default
check (`monotonic`) fails a request whose user went back to a version it left; the test asserts
no request failed, and that every user that moved is one whose sticky bucket the weight changes
handed to green (computed here with laneswitch's own hash).
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from proxy.routing.splitter import stable_hash
from tests.e2e.test_prometheus import laneswitch
from tests.helpers import ROOT, RecordingUpstream, ok_response

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
USERS = 20


def locust_command() -> list[str]:
    script = Path(sys.executable).parent / "locust"
    if script.exists():
        return [str(script)]
    found = shutil.which("locust")
    return [found] if found else [sys.executable, "-m", "locust"]


@pytest.mark.timeout(120)
async def test_locust_headless_against_a_live_proxy(tmp_path: Path) -> None:
    def versioned(name: str) -> RecordingUpstream:
        return RecordingUpstream(name, responder=lambda request: ok_response(name.encode()))

    blue = await versioned("blue").start()
    green = await versioned("green").start()
    config = tmp_path / "laneswitch.yaml"
    config.write_text(
        f"""
listen: 127.0.0.1:0
admin:
  listen: 127.0.0.1:0
  token: ${{LANESWITCH_ADMIN_TOKEN}}
drain_timeout: 1s
services:
  shop:
    versions:
      green: {{endpoints: ["{green.endpoint}"], weight: 10}}
      blue: {{endpoints: ["{blue.endpoint}"], weight: 90}}
    sticky: {{header: X-User-Id}}
    version_header: X-App-Version
"""
    )
    report = tmp_path / "versions.json"
    try:
        async with laneswitch(config) as proxy:
            process = await asyncio.create_subprocess_exec(
                *locust_command(),
                "-f",
                str(LOCUSTFILE),
                "--headless",
                "--users",
                str(USERS),
                "--spawn-rate",
                str(USERS),
                "--run-time",
                "6s",
                "--host",
                f"http://127.0.0.1:{proxy.data_port}",
                "--csv",
                str(tmp_path / "stats"),
                "--only-summary",
                "--version-report",
                str(report),
                cwd=tmp_path,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output = asyncio.create_task(process.communicate())
            try:
                # Weights move while Locust runs: once traffic flows, then a second later.
                async with asyncio.timeout(30):
                    while len(blue.requests) + len(green.requests) < 50:
                        await asyncio.sleep(0.05)
                for green_weight in (25, 50):
                    weights = {"green": green_weight, "blue": 100 - green_weight}
                    status, _ = await proxy.admin(
                        "PUT", "/services/shop/weights", {"weights": weights}
                    )
                    assert status == 200
                    await asyncio.sleep(1.5)  # users keep requesting at these weights
                out, _ = await asyncio.wait_for(output, 60)
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        text = out.decode()
        assert process.returncode == 0, text
        with (tmp_path / "stats_stats.csv").open() as stats:
            rows = {row["Name"]: row for row in csv.DictReader(stats)}
        total = rows["Aggregated"]
        assert int(total["Request Count"]) > 200, text
        assert int(total["Failure Count"]) == 0, text
        assert {"GET /", "POST /orders", "POST /uploads"} <= rows.keys()

        mix = json.loads(report.read_text())
        assert "version mix:" in text
        assert set(mix["requests"]) == {"blue", "green"}
        assert sum(mix["requests"].values()) >= int(total["Request Count"]) * 0.9
        # Who could move: users whose bucket green's range grew over (10 -> 50).
        movable = {
            f"user-{n:04d}"
            for n in range(1, USERS + 1)
            if 10 <= stable_hash("shop", f"user-{n:04d}".encode()) % 100 < 50
        }
        assert set(mix["moved_users"]) <= movable
        assert all(path == ["blue", "green"] for path in mix["moved_users"].values())
        assert set(mix["moves"]) <= {"blue -> green"}
    finally:
        await blue.stop()
        await green.stop()
