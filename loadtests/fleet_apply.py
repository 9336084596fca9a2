"""Fleet apply latency: how long a change made through one member takes to be served by every
member of the fleet (SPEC promise 7: within 1 s).

    python loadtests/fleet_apply.py [--changes 50] [--members 3] [--lease 2s] [--no-traffic]
                                    [--out FILE.json]

Starts a redis-server (Debian's, on a free loopback port, no persistence), two upstreams (blue
and green, answering with their names) and N `laneswitch run` members of one fleet, each with
steady keep-alive traffic through it. Then makes the changes one after the other through the
second member, alternating a switch (to green, then to blue) and a weights change (a different
split each time). For each change it polls every member's GET /status from the moment the call
is sent, and takes the time until every member shows the new weights: that is the apply latency
of the change (the call itself answers once every live member acknowledged; its duration is
reported next to it). Everything is on loopback, every wait is bounded, and everything it
started is stopped at the end. See loadtests/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.helpers import (  # noqa: E402  (the repository root is on the path only now)
    Member,
    RecordingUpstream,
    RedisServer,
    Traffic,
    admin_call,
    fleet_config,
    version_responder,
)

# The promise: every member serves a change within this (seconds), at p99.
TARGET_P99 = 1.0
# A change not applied everywhere within this is reported as not applied (seconds).
APPLY_TIMEOUT = 10.0
# Between two polls of one member's /status (seconds): the measurement's resolution.
POLL_PAUSE = 0.002


@dataclass
class Change:
    index: int
    kind: str  # switch | weights
    weights: dict[str, int]  # what every member must serve after it
    call_seconds: float = 0.0  # the admin call, until it answered
    applied_seconds: dict[str, float] = field(default_factory=dict)  # member -> first seen
    pending: list[str] = field(default_factory=list)  # the call's answer

    @property
    def all_applied(self) -> float | None:
        return max(self.applied_seconds.values()) if self.applied_seconds else None


def planned(count: int) -> list[tuple[str, dict[str, Any], dict[str, int]]]:
    """(kind, admin call body, weights after it): switch and weights alternating, each one a
    change from the one before."""
    found: list[tuple[str, dict[str, Any], dict[str, int]]] = []
    for i in range(count):
        if i % 2 == 0:
            to = "green" if (i // 2) % 2 == 0 else "blue"
            weights = {"blue": 100 if to == "blue" else 0, "green": 100 if to == "green" else 0}
            found.append(("switch", {"to": to}, weights))
        else:
            green = 10 + (i * 7) % 80  # never 0 or 100: always differs from a switch
            weights = {"blue": 100 - green, "green": green}
            found.append(("weights", {"weights": weights}, weights))
    return found


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with 50 values, p99 is the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def served_weights(member: Member) -> dict[str, int] | None:
    try:
        status, answer = await admin_call(member.admin_port, "GET", "/status", timeout=5)
    except (OSError, TimeoutError):
        return None
    if status != 200:
        return None
    versions = answer["services"]["shop"]["versions"]
    return {name: int(version["weight"]) for name, version in versions.items()}


async def watch(member: Member, weights: dict[str, int], since: float) -> float:
    """Seconds from `since` until `member` serves `weights`."""
    while True:
        if await served_weights(member) == weights:
            return time.monotonic() - since
        await asyncio.sleep(POLL_PAUSE)


async def measure(change: Change, body: dict[str, Any], members: list[Member]) -> None:
    through = members[1 % len(members)]
    path = "/services/shop/switch" if change.kind == "switch" else "/services/shop/weights"
    method = "POST" if change.kind == "switch" else "PUT"
    started = time.monotonic()
    watchers = [asyncio.create_task(watch(member, change.weights, started)) for member in members]
    status, answer = await admin_call(through.admin_port, method, path, body, timeout=15)
    change.call_seconds = time.monotonic() - started
    if status != 200:
        for task in watchers:
            task.cancel()
        raise RuntimeError(f"change {change.index} refused: {status} {answer}")
    change.pending = list(answer.get("members", {}).get("pending", []))
    try:
        async with asyncio.timeout(APPLY_TIMEOUT):
            seconds = await asyncio.gather(*watchers)
    except TimeoutError:
        for task in watchers:
            task.cancel()
        return
    change.applied_seconds = {m.name: s for m, s in zip(members, seconds, strict=True)}


async def apply_histograms(members: list[Member]) -> dict[str, dict[str, float]]:
    """Each member's own laneswitch_fleet_apply_seconds (count and sum)."""
    found: dict[str, dict[str, float]] = {}
    for member in members:
        reader, writer = await asyncio.open_connection("127.0.0.1", member.admin_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        text = (await asyncio.wait_for(reader.read(), 10)).decode()
        writer.close()
        values = {}
        for line in text.splitlines():
            for name in ("count", "sum"):
                if line.startswith(f"laneswitch_fleet_apply_seconds_{name} "):
                    values[name] = float(line.split()[1])
        found[member.name] = values
    return found


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    blue = await RecordingUpstream("blue", version_responder("blue")).start()
    green = await RecordingUpstream("green", version_responder("green")).start()
    redis = await RedisServer().start()
    members: list[Member] = []
    loads: list[Traffic] = []
    changes: list[Change] = []
    try:
        for i in range(args.members):
            name = f"m{i + 1}"
            config = fleet_config(
                tmp / f"{name}.yaml",
                name,
                redis.url,
                blue.endpoint,
                green.endpoint,
                lease=args.lease,
                ack_timeout="2s",
            )
            members.append(Member(name, config))
        await asyncio.gather(*(member.start() for member in members))
        if args.traffic:
            loads = [Traffic(member.data_port).start() for member in members]
        for index, (kind, body, weights) in enumerate(planned(args.changes)):
            change = Change(index + 1, kind, weights)
            await measure(change, body, members)
            changes.append(change)
        histograms = await apply_histograms(members)
    finally:
        for load in loads:
            await load.stop()
        await asyncio.gather(*(member.stop() for member in members))
        await redis.stop()
        await blue.stop()
        await green.stop()
    applied = [c.all_applied for c in changes if c.all_applied is not None]
    calls = [c.call_seconds for c in changes]
    return {
        "members": args.members,
        "changes": len(changes),
        "not_applied": [c.index for c in changes if c.all_applied is None],
        "answered_with_pending": [c.index for c in changes if c.pending],
        "apply_p50": statistics.median(applied) if applied else None,
        "apply_p99": percentile(applied, 0.99) if applied else None,
        "apply_max": max(applied) if applied else None,
        "call_p50": statistics.median(calls) if calls else None,
        "call_p99": percentile(calls, 0.99) if calls else None,
        "requests": sum(load.count() for load in loads),
        "failed_requests": sum(load.failed for load in loads),
        "member_apply_histograms": histograms,
        "details": [asdict(c) for c in changes],
    }


def report(result: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1000:.0f} ms"

    p99 = result["apply_p99"]
    verdict = "PASS" if p99 is not None and p99 < TARGET_P99 else "MISS"
    lines = [
        f"fleet apply latency: {result['changes']} changes through one of "
        f"{result['members']} members (switch and weights alternating)",
        f"  every member serving it:  p50 {ms(result['apply_p50'])}   "
        f"p99 {ms(p99)}   max {ms(result['apply_max'])}",
        f"  admin call answered:      p50 {ms(result['call_p50'])}   p99 {ms(result['call_p99'])}",
        f"  traffic meanwhile: {result['requests']} requests, {result['failed_requests']} failed",
    ]
    if result["not_applied"]:
        lines.append(
            f"  NOT applied everywhere within {APPLY_TIMEOUT:g} s: {result['not_applied']}"
        )
    if result["answered_with_pending"]:
        lines.append(f"  answered with members pending: {result['answered_with_pending']}")
    lines.append(f"apply p99 < {TARGET_P99 * 1000:.0f} ms   {verdict}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--lease", default="2s")
    parser.add_argument("--no-traffic", dest="traffic", action="store_false")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.changes < 1 or args.members < 2:
        parser.error("--changes >= 1 and --members >= 2")
    with tempfile.TemporaryDirectory(prefix="laneswitch-fleet-apply-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(report(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    # A benchmark, not a gate: the exit status says only whether every change was applied.
    return 1 if result["not_applied"] or result["failed_requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
