"""`laneswitch demo --fleet`, run as a newcomer runs it: three replicas and a redis-server of
its own come up, one rollout drives all three, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from pathlib import Path

import pytest

from tests.e2e.test_start_failures import NOISE
from tests.helpers import (
    admin_call,
    run_cli,
    served_by,
    spawn_laneswitch,
    wait_for_line,
)

MEMBER_LINE = re.compile(
    r"^  (replica-\d)  pid (\d+)  proxy http://127\.0\.0\.1:(\d+)  admin http://127\.0\.0\.1:(\d+)$"
)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def processes_under(directory: Path) -> list[str]:
    """Command lines of live processes that name a path in `directory` (the demo's redis-server
    has its --dir there, each replica its config file)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(directory) in cmdline and alive(int(entry.name)):
            found.append(cmdline)
    return found


def demo_env(tmp_path: Path) -> dict[str, str]:
    """The demo's temporary directory under `tmp_path`, so the test can see what it leaves."""
    return {**os.environ, "TMPDIR": str(tmp_path)}


@pytest.mark.slow
async def test_fleet_demo_drives_one_rollout_across_three_replicas_and_cleans_up(
    tmp_path: Path,
) -> None:
    process = await spawn_laneswitch(
        "demo",
        "--fleet",
        "--port",
        "0",
        "--admin-port",
        "0",
        env=demo_env(tmp_path),
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = asyncio.ensure_future(process.stderr.read())
    try:
        first = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        assert re.match(r"laneswitch demo: the console is on http://127\.0\.0\.1:\d+/ ", first)
        await wait_for_line(process.stdout, r"three replicas of one proxy")
        members = []
        for _ in range(3):
            line = (await process.stdout.readline()).decode().rstrip("\n")
            found = MEMBER_LINE.match(line)
            assert found is not None, line
            members.append(
                (found.group(1), int(found.group(2)), int(found.group(3)), int(found.group(4)))
            )
        redis = re.search(r"redis-server pid (\d+)", (await process.stdout.readline()).decode())
        assert redis is not None
        pids = [pid for _, pid, _, _ in members] + [int(redis.group(1))]
        assert [name for name, *_ in members] == ["replica-1", "replica-2", "replica-3"]
        assert all(alive(pid) for pid in pids)
        # Three members in one fleet, one leader (each member's view of the others is as of
        # their last heartbeat, every second).
        async with asyncio.timeout(10):
            while True:
                _, status = await admin_call(members[0][3], "GET", "/status")
                fleet = status["fleet"]
                ids = sorted(m["id"] for m in fleet["members"] if m["live"])
                if ids == ["replica-1", "replica-2", "replica-3"] and fleet["leader"] in ids:
                    break
                await asyncio.sleep(0.1)
        # The tour's first act: one rollout started through replica-2, promoted by the leader.
        await wait_for_line(process.stdout, r"act 1: started through replica-2: applied by ", 30)
        await wait_for_line(process.stdout, r"act 1: promoted: ", 60)
        for name, _, port, admin in members:
            _, status = await admin_call(admin, "GET", "/status")
            assert status["services"]["shop"]["versions"]["green"]["weight"] == 100, name
            assert await served_by(port) == {b"green\n"}, name
        _, events = await admin_call(members[2][3], "GET", "/events")
        actions = [event["action"] for event in events["events"]]
        assert actions.count("start") == 1 and actions.count("promote") == 1, actions
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    err = (await stderr).decode()
    for noise in NOISE:
        assert noise not in err, err
    assert not any(alive(pid) for pid in pids)
    assert processes_under(tmp_path) == []
    assert list(tmp_path.glob("laneswitch-demo-*")) == []


async def test_fleet_demo_without_redis_server_says_so_in_one_line(tmp_path: Path) -> None:
    # A PATH with no redis-server on it (the command itself is given by its full path).
    env = {**demo_env(tmp_path), "PATH": str(tmp_path)}
    code, out, err = await run_cli("demo", "--fleet", "--port", "0", "--admin-port", "0", env=env)
    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        "laneswitch demo: --fleet needs redis-server on PATH, and there is none; install it "
        "(Debian/Ubuntu: apt-get install redis-server, macOS: brew install redis) or run "
        "laneswitch demo without --fleet"
    ]
    assert list(tmp_path.glob("laneswitch-demo-*")) == []


async def test_fleet_demo_on_a_taken_port_names_it_and_leaves_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # replica-1 takes --port itself: the taken one.
        code, out, err = await run_cli(
            "demo", "--fleet", "--port", str(port), "--admin-port", "0", env=demo_env(tmp_path)
        )
    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        f"laneswitch demo: port {port} (the proxy of replica-1) is already in use; pick others "
        "with --port N and --admin-port N (the replicas take N, N+1 and N+2) (0 = any free "
        "port, printed), e.g. laneswitch demo --fleet --port 0 --admin-port 0"
    ]
    # Redis and the two replicas that did start were stopped, their directory removed.
    assert processes_under(tmp_path) == []
    assert list(tmp_path.glob("laneswitch-demo-*")) == []
