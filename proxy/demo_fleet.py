"""`laneswitch demo --fleet`: one rollout driving three replicas that share one Redis.

Three `laneswitch run` processes on loopback share a `redis-server` that the demo starts itself
(`demo_fleet_processes`). The demo process holds blue and green, sends traffic through all
three, and runs the tour of `laneswitch demo` over the admin API (`demo_fleet_tour`): each act
is started through another member, the leader judges the three replicas' summed traffic, and
every member's weights follow.

Everything it started is stopped at the end, members first and then Redis, and the directory is
removed; also when the start fails (one line, as for the single demo).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from proxy.demo import admin_env, console_line, traffic
from proxy.demo_fleet_processes import FLEET_NAME, Fleet, Member, start_fleet
from proxy.demo_fleet_tour import fleet_tour, leader_of

# One client per replica (about 75 requests/s in all): min_requests is the fleet's traffic.
CLIENTS_PER_MEMBER = 1

TRY_IT = """
laneswitch demo --fleet: three replicas of one proxy, the fleet "{fleet}" in Redis at {redis}
{members}
  redis-server pid {redis_pid}; blue on 127.0.0.1:{blue}, green on 127.0.0.1:{green}
The demo sends about 75 requests/s, one client per replica; the leader judges their sum.
Their config file (one for all three) and logs: {workdir}
{admin_env}
{commands}

Ctrl-C stops it: the replicas, Redis and the directory go with it.
"""


def commands(fleet: Fleet, leader: Member | None) -> str:
    """What to try, each command with its comment, aligned."""
    members = fleet.members
    green = fleet.upstream_ports["green"]
    kill = f"kill -9 {leader.pid}" if leader is not None else "kill -9 PID"
    whose = f"the leader ({leader.name})" if leader is not None else "the leader"
    pairs = [
        (f"laneswitch status --watch --admin {members[1].admin_url}", "the members table, live"),
        (
            f"laneswitch rollback shop --admin {members[2].admin_url}",
            "one member's call changes all",
        ),
        (f"curl -X POST 'http://127.0.0.1:{green}/demo/fail?rate=0.3'", "green fails 30 %"),
        ("laneswitch rollout start shop", "one rollout, three proxies follow"),
        (kill, f"{whose}: another takes over in 2 s"),
    ]
    width = max(len(command) for command, _ in pairs)
    return "\n".join(f"  {command.ljust(width)}  # {comment}" for command, comment in pairs)


class Interrupted(Exception):
    """SIGINT/SIGTERM during the start: stop what started, then exit like a Ctrl-C."""


async def fleet_demo(fail_rate: float | None, port: int, admin_port: int) -> None:
    """Run the fleet demo until SIGINT/SIGTERM; DemoStartError (one line) when it cannot start.
    Whatever it started is stopped on every way out."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    stop = asyncio.Event()
    started = False

    def on_signal() -> None:
        if started:
            stop.set()
        else:
            main.cancel()  # the start is cut short; the exit stack below undoes it

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                fleet = await start_fleet(stack, fail_rate, port, admin_port)
                await print_fleet(fleet)
            except asyncio.CancelledError:
                main.uncancel()  # our own cancel, from on_signal
                raise Interrupted from None
            started = True
            background = [
                loop.create_task(
                    traffic(
                        [f"http://127.0.0.1:{m.data}/" for m in fleet.members], CLIENTS_PER_MEMBER
                    )
                ),
                loop.create_task(fleet_tour(fleet, fail_rate)),
            ]
            try:
                await stop.wait()
            finally:
                for task in background:
                    task.cancel()
                for task in background:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
    except Interrupted:
        raise KeyboardInterrupt from None
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def print_fleet(fleet: Fleet) -> None:
    """The console's URL first, then the members, their ports and pids, and what to try."""
    members = fleet.members
    assert fleet.redis.process is not None and members[0].admin is not None
    print(console_line(members[0].admin), flush=True)
    rows = "\n".join(
        f"  {m.name}  pid {m.pid}  proxy http://127.0.0.1:{m.data}  admin {m.admin_url}"
        for m in members
    )
    print(
        TRY_IT.format(
            fleet=FLEET_NAME,
            redis=fleet.redis.url,
            members=rows,
            redis_pid=fleet.redis.process.pid,
            blue=fleet.upstream_ports["blue"],
            green=fleet.upstream_ports["green"],
            workdir=fleet.workdir,
            admin_env=admin_env(members[0].admin),
            commands=commands(fleet, await leader_of(fleet)),
        ),
        flush=True,
    )
