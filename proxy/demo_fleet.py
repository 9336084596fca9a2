"""`laneswitch demo --fleet`: one rollout driving three replicas that share one Redis.

Three `laneswitch run` processes on loopback (replica-1..3) read one config file (their ports
and member names come from the environment, as `POD_NAME` would in Kubernetes) and share a
`redis-server` that the demo starts itself: a temporary directory, a free loopback port, no
persistence. The demo process holds blue and green, sends traffic through all three, and runs
the tour of `laneswitch demo` over the admin API: each act is started through another member,
the leader judges the three replicas' summed traffic, and every member's weights follow.

Everything it started is stopped at the end, members first and then Redis, and the directory is
removed; also when the start fails (one line, as for the single demo). The replicas run in their
own session, so a Ctrl-C in the terminal reaches the demo alone and the stop keeps that
order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from proxy.client import render_fleet
from proxy.demo import (
    SETTLED,
    STEPS,
    DemoStartError,
    Failing,
    act_state,
    admin_env,
    console_line,
    demo_config,
    start_upstreams,
    taken_port_message,
    tour_acts,
    traffic,
)

MEMBERS = ("replica-1", "replica-2", "replica-3")
FLEET_NAME = "demo"
# Lease and acknowledgement bounds of the demo's fleet: a killed leader is replaced within 2 s.
LEASE = "2s"
PORT_ENV = "LANESWITCH_DEMO_PORT"
ADMIN_PORT_ENV = "LANESWITCH_DEMO_ADMIN_PORT"
MEMBER_ENV = "LANESWITCH_DEMO_MEMBER"

# One client per replica (about 75 requests/s in all): min_requests is the fleet's traffic.
CLIENTS_PER_MEMBER = 1
# Bounds of the start and the stop (seconds): a replica joins, Redis answers PING, a replica
# drains (the demo's drain_timeout is 2 s) before it is killed.
MEMBER_START_TIMEOUT = 30.0
REDIS_START_TIMEOUT = 10.0
MEMBER_STOP_TIMEOUT = 8.0
# How often the tour reads the members' /status while a rollout runs (seconds).
FOLLOW_POLL = 0.25

REDIS_MISSING = (
    "--fleet needs redis-server on PATH, and there is none; install it (Debian/Ubuntu: "
    "apt-get install redis-server, macOS: brew install redis) or run laneswitch demo without "
    "--fleet"
)

# What a replica logs at start (`laneswitch run`), and its one-line reason when it cannot.
ADMIN_LINE = re.compile(r" admin API on 127\.0\.0\.1:(\d+)$")
LISTEN_LINE = re.compile(r" listening on 127\.0\.0\.1:(\d+)$")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
TAKEN_LINE = re.compile(
    r"cannot start: (listen|admin\.listen) 127\.0\.0\.1:(\d+): Address already in use"
)

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


def fleet_block(redis_url: str) -> str:
    """The replicas' `fleet` block: the same text for all three (one config hash), the member
    name from the environment."""
    return (
        f'fleet:\n  redis: "{redis_url}"\n  name: {FLEET_NAME}\n'
        f'  member: "${{{MEMBER_ENV}}}"\n  lease: {LEASE}\n  ack_timeout: {LEASE}'
    )


def free_port() -> int:
    """A loopback port nobody listens on now (for redis-server, which cannot be given 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Redis:
    """A fleet's store: Debian's redis-server on a loopback port (free unless given; kept
    across a stop and a start, which is a store restarted empty), no persistence. The test
    suite's store too."""

    directory: Path | None = None  # its working directory and log (None: no log)
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout: float = REDIS_START_TIMEOUT) -> Redis:
        """Start it and return once it answers PING; DemoStartError when it cannot."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise DemoStartError(REDIS_MISSING)
        log = self.directory / "redis.log" if self.directory is not None else None
        if log is None:
            self.process = await self._spawn(binary, asyncio.subprocess.DEVNULL)
        else:
            with log.open("ab") as out:
                self.process = await self._spawn(binary, out)

        def output() -> str:
            return f": {last_line(log)}" if log is not None else ""

        try:
            async with asyncio.timeout(timeout):
                while not await self._answers():
                    if self.process.returncode is not None:
                        raise DemoStartError(f"redis-server did not start{output()}")
                    await asyncio.sleep(0.05)
        except TimeoutError:
            await self.stop()
            raise DemoStartError(
                f"redis-server did not answer within {timeout:g}s{output()}"
            ) from None
        return self

    async def _spawn(self, binary: str, out: Any) -> asyncio.subprocess.Process:
        where = ["--dir", str(self.directory)] if self.directory is not None else []
        return await asyncio.create_subprocess_exec(
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            *where,
            "--save", "",
            "--appendonly", "no",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    async def _answers(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            return (await reader.readline()).startswith(b"+PONG")
        finally:
            writer.close()

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()


@dataclass
class Member:
    """One replica: `laneswitch run` of the shared config file, its log copied to a file."""

    name: str
    port: int  # asked for (0: any free one)
    admin_port: int
    log: Path
    process: asyncio.subprocess.Process | None = None
    data: int | None = None  # bound, as it logged them
    admin: int | None = None
    failure: str = ""  # the last line it printed that is not a log line (why it exited)
    _reader: asyncio.Task[None] | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, config: Path) -> None:
        env = {
            **os.environ,
            MEMBER_ENV: self.name,
            PORT_ENV: str(self.port),
            ADMIN_PORT_ENV: str(self.admin_port),
        }
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "run",
            "-c",
            str(config),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        """Copy its stderr to its log (a pipe nobody reads would stop it), noting its ports."""
        assert self.process is not None and self.process.stderr is not None
        with self.log.open("ab") as log:
            while line := await self.process.stderr.readline():
                log.write(line)
                log.flush()
                text = line.decode("utf-8", "replace").rstrip()
                if found := ADMIN_LINE.search(text):
                    self.admin = int(found.group(1))
                elif found := LISTEN_LINE.search(text):
                    self.data = int(found.group(1))
                elif text and not LOG_LINE.match(text):
                    self.failure = text

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        """Until its /readyz is 200 (it applied the fleet's state and listens); DemoStartError
        with its reason if it exits first."""
        assert self.process is not None
        while True:
            if self.process.returncode is not None:
                if self._reader is not None:
                    await self._reader
                raise DemoStartError(self.why_not())
            if self.admin is not None and self.data is not None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{self.admin_url}/readyz") as response:
                        if response.status == 200:
                            return
            await asyncio.sleep(0.05)

    def why_not(self) -> str:
        """The one line of a replica that could not start."""
        taken = TAKEN_LINE.search(self.failure)
        if taken is not None:
            role = "the proxy" if taken.group(1) == "listen" else "the admin API"
            return taken_port_message(
                taken.group(2), f"{role} of {self.name}", "is already in use", fleet=True
            )
        assert self.process is not None
        reason = self.failure or f"exit status {self.process.returncode}"
        return f"{self.name} did not start: {reason}"

    async def stop(self) -> None:
        """SIGTERM (it drains), SIGKILL if it is still there after MEMBER_STOP_TIMEOUT."""
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), MEMBER_STOP_TIMEOUT)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader


def last_line(path: Path) -> str:
    lines = path.read_text("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "(no output)"


def member_ports(port: int, admin_port: int) -> list[tuple[int, int]]:
    """Each replica's (port, admin port): N, N+1, N+2; 0 stays 0 (any free one each)."""
    top = max(port, admin_port) + len(MEMBERS) - 1
    if top > 65535:
        raise DemoStartError(
            f"--fleet takes {len(MEMBERS)} ports from each of --port and --admin-port, and "
            f"{top} is over 65535; pick lower ones (or 0 for free ones)"
        )
    return [(port and port + i, admin_port and admin_port + i) for i in range(len(MEMBERS))]


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


@dataclass
class Fleet:
    members: list[Member]
    green: Failing
    session: aiohttp.ClientSession
    redis: Redis
    workdir: Path
    upstream_ports: dict[str, int] = field(default_factory=dict)


async def start_fleet(
    stack: contextlib.AsyncExitStack, fail_rate: float | None, port: int, admin_port: int
) -> Fleet:
    """Redis, the upstreams and three replicas, each stopped by `stack` (in reverse)."""
    ports = member_ports(port, admin_port)
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="laneswitch-demo-")))
    redis = Redis(workdir)
    stack.push_async_callback(redis.stop)
    await redis.start()
    green = Failing(rate=fail_rate or 0.0)
    upstreams = await start_upstreams(green)
    stack.push_async_callback(upstreams.stop)
    config = workdir / "laneswitch.yaml"
    config.write_text(
        demo_config(
            f"${{{PORT_ENV}}}",
            f"${{{ADMIN_PORT_ENV}}}",
            upstreams.ports,
            extra=fleet_block(redis.url),
        )
    )
    members = [
        Member(name, data, admin, workdir / f"{name}.log")
        for name, (data, admin) in zip(MEMBERS, ports, strict=True)
    ]

    async def stop_members() -> None:
        await asyncio.gather(*(member.stop() for member in members))

    stack.push_async_callback(stop_members)
    session = await stack.enter_async_context(
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    )
    for member in members:
        await member.start(config)
    try:
        async with asyncio.timeout(MEMBER_START_TIMEOUT), asyncio.TaskGroup() as group:
            for member in members:
                group.create_task(member.wait_ready(session))
    except* DemoStartError as failed:
        raise failed.exceptions[0] from None
    except* TimeoutError:
        late = [m for m in members if m.admin is None or m.data is None]
        raise DemoStartError(
            f"the replicas were not all ready within {MEMBER_START_TIMEOUT:g}s; "
            + "; ".join(f"{m.name}: {last_line(m.log)}" for m in late or members)
        ) from None
    fleet = Fleet(members, green, session, redis, workdir, upstreams.ports)
    await print_fleet(fleet)
    return fleet


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


async def leader_of(fleet: Fleet) -> Member | None:
    """The member leading now (one takes the lease within moments of joining), if any."""
    by_name = {member.name: member for member in fleet.members}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(3.0):
            while True:
                for status in (await statuses(fleet)).values():
                    leader = by_name.get(status.get("fleet", {}).get("leader") or "")
                    if leader is not None:
                        return leader
                await asyncio.sleep(0.1)
    return None


# -- the tour, over the admin API -------------------------------------------------------------


async def call(
    session: aiohttp.ClientSession, member: Member, method: str, path: str
) -> dict[str, Any]:
    async with session.request(method, member.admin_url + path) as response:
        answer: dict[str, Any] = await response.json(content_type=None)
        if response.status >= 400:
            raise DemoTourError(f"{member.name}: {method} {path}: {answer.get('error', answer)}")
        return answer


class DemoTourError(Exception):
    """An admin call of the tour was refused (e.g. the store is down); the demo keeps serving."""


def applied_by(answer: dict[str, Any]) -> str:
    members = answer.get("members") or {}
    text = f"applied by {', '.join(members.get('acknowledged') or []) or 'none'}"
    if members.get("pending"):
        text += f"; pending: {', '.join(members['pending'])}"
    return text


async def statuses(fleet: Fleet) -> dict[str, dict[str, Any]]:
    """Every member's /status that answers (a member killed by hand is left out)."""

    async def one(member: Member) -> dict[str, Any] | None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, DemoTourError, ValueError):
            return await call(fleet.session, member, "GET", "/status")
        return None

    found = await asyncio.gather(*(one(member) for member in fleet.members))
    return {m.name: s for m, s in zip(fleet.members, found, strict=True) if s is not None}


def green_percent(status: dict[str, Any]) -> int:
    shop = status["services"]["shop"]
    return round(100 * int(shop["versions"]["green"]["weight"]) / int(shop["weight_total"]))


async def follow(fleet: Fleet, via: Member, number: int) -> dict[str, Any]:
    """Print green's weight whenever every member serves a new one; the end status of `via`."""
    shown: int | None = None
    while True:
        found = await statuses(fleet)
        weights = {name: green_percent(status) for name, status in found.items()}
        if len(set(weights.values())) == 1 and (weight := next(iter(weights.values()))) != shown:
            shown = weight
            leader = found[next(iter(found))].get("fleet", {}).get("leader") or "-"
            print(
                f"[demo] act {number}: green at {weight} % on "
                + ", ".join(weights)
                + f" (leader {leader})",
                flush=True,
            )
        status = found.get(via.name)
        if status is not None and status["services"]["shop"]["rollout"]["phase"] in SETTLED:
            return status
        await asyncio.sleep(FOLLOW_POLL)


async def all_applied(fleet: Fleet, via: Member, status: dict[str, Any]) -> dict[str, Any]:
    """`via`'s status once its members table shows every member at the store's generation
    (members report every second); the last one read if that takes over 3 s."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(3.0):
            while True:
                view = status.get("fleet", {})
                applied = {member.get("applied") for member in view.get("members") or []}
                if applied == {view.get("generation")}:
                    break
                await asyncio.sleep(FOLLOW_POLL)
                status = await call(fleet.session, via, "GET", "/status")
    return status


async def fleet_tour(fleet: Fleet, fail_rate: float | None) -> None:
    """The single demo's tour, each act started through another member's admin API."""
    try:
        await asyncio.sleep(1.0)
        for number, rate in enumerate(tour_acts(fail_rate), start=1):
            fleet.green.rate = rate
            via = fleet.members[number % len(fleet.members)]
            status = await call(fleet.session, via, "GET", "/status")
            if green_percent(status) == 100:
                answer = await call(fleet.session, via, "POST", "/services/shop/rollback")
                print(f"[demo] act {number}: rollback through {via.name}: {applied_by(answer)}")
            print(f"[demo] act {number}: rolling out green ({act_state(rate)}): {STEPS}")
            answer = await call(fleet.session, via, "POST", "/services/shop/rollout/start")
            print(f"[demo] act {number}: started through {via.name}: {applied_by(answer)}")
            status = await follow(fleet, via, number)
            rollout = status["services"]["shop"]["rollout"]
            last = rollout.get("last_decision") or {}
            leader = status.get("fleet", {}).get("leader") or "-"
            print(
                f"[demo] act {number}: {rollout['phase']}: {last.get('reason', '')} "
                f"(decided by the leader, {leader})",
                flush=True,
            )
            status = await all_applied(fleet, via, status)
            print("\n".join(render_fleet(status["fleet"])) + "\n", flush=True)
            await asyncio.sleep(3.0)
        print("[demo] your turn: see the commands above; Ctrl-C stops the demo", flush=True)
    except (DemoTourError, aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
        print(f"[demo] the tour stopped: {exc}; the fleet keeps running", flush=True)
