"""Smoke test of loadtests/hostile.py: a few seconds of hostile clients and upstreams against a
live `laneswitch run`; normal clients see no error and the proxy lets go of everything."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, laneswitch_command

HOSTILE = ROOT / "loadtests" / "hostile.py"


@pytest.mark.timeout(120)
async def test_hostile_peers_leave_normal_clients_alone_and_resources_come_back(
    tmp_path: Path,
) -> None:
    out = tmp_path / "hostile.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HOSTILE),
        "--duration",
        "3",
        "--timeout",
        "1",
        "--laneswitch-cmd",
        shlex.join([*laneswitch_command(), "run"]),
        "--out",
        str(out),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        text = (await asyncio.wait_for(process.communicate(), 90))[0].decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, text
    report = json.loads(out.read_text())
    assert report["ok"] and report["failures"] == [], text
    tallies = report["tallies"]
    normal = tallies["normal"]
    assert normal["requests"] > 100 and normal["errors"] == 0, text
    # Every kind of hostile peer really ran, and the proxy ended what it had to end.
    assert all(tallies[kind]["connections"] > 0 for kind in report["clients"]), text
    assert tallies["slowloris"]["outcomes"].get("408", 0) > 0, text
    assert not any("poisoned" in outcome for outcome in tallies["bad-route"]["outcomes"]), text
    assert tallies["bad-route"]["outcomes"].get("/bad/no-answer: 504", 0) > 0, text
    # The proxy's resources: up under load, back to the baseline after it.
    base, peak, after = report["baseline"], report["peak"], report["after"]
    assert peak["fds"] > base["fds"] + 20, text
    assert after["fds"] <= base["fds"], text
    assert report["settled_after_s"] is not None, text
    assert report["proxy_exit_code"] == 0, text
