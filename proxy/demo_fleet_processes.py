"""The fleet demo's processes: `redis-server` and the `laneswitch run` replicas, started, stopped.

Three replicas on loopback (replica-1..3) read one config file (their ports and member names
come from the environment, as `POD_NAME` would in Kubernetes) and share a `redis-server`
started here: a temporary directory, a free loopback port, no persistence. Everything started
is stopped by the caller's exit stack, members first and then Redis, and the directory is
removed. The processes run in their own session, so a Ctrl-C in the terminal reaches the demo
alone and the stop keeps that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from proxy.demo import DemoStartError, Failing, demo_config, start_upstreams, taken_port_message

MEMBERS = ("replica-1", "replica-2", "replica-3")
FLEET_NAME = "demo"
# Lease and acknowledgement bounds of the demo's fleet: a killed leader is replaced within 2 s.
LEASE = "2s"
PORT_ENV = "LANESWITCH_DEMO_PORT"
ADMIN_PORT_ENV = "LANESWITCH_DEMO_ADMIN_PORT"
MEMBER_ENV = "LANESWITCH_DEMO_MEMBER"

# Bounds of the start and the stop (seconds): a replica joins, Redis answers PING, a replica
# drains (the demo's drain_timeout is 2 s) before it is killed.
MEMBER_START_TIMEOUT = 30.0
REDIS_START_TIMEOUT = 10.0
MEMBER_STOP_TIMEOUT = 8.0

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
    return Fleet(members, green, session, redis, workdir, upstreams.ports)
