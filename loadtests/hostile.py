"""Hostile-peers loadtest: normal traffic through laneswitch while bad clients and bad upstreams
do their worst; normal clients must see no error, and the proxy's memory and fds must come back.

    python loadtests/hostile.py [--duration 30] [--timeout 1] [--out FILE.json]
                                [--laneswitch-cmd CMD]

Starts `laneswitch run -c <temporary config>` (three services: good, bad, noread) and the
upstreams of `hostile_upstreams.py` in their own processes, all on loopback, then for --duration
seconds runs, side by side:

- normal clients: keep-alive, sequential GETs and small POSTs to the good service, each answer
  checked to be the one to its own request (status 200, the body names the request's target);
- slowloris clients: a request head trickled one byte every --trickle seconds;
- idle clients: connect and send nothing;
- never-reading clients: pipeline 1 MiB GETs and never read a byte;
- leaving clients: read the start of a 1 MiB answer, then close (FIN) or reset (RST);
- bad-route clients: requests to the bad upstreams (stall after the head, stall mid-body, more
  bytes than Content-Length, fewer, a reset mid-body, no answer, garbage; and 1 MiB POSTs to
  an upstream that never reads).

It samples the proxy's process tree (VmRSS from /proc/PID/status, entries of /proc/PID/fd) at
baseline, through the load (peak), and after: once the load stops it polls until the fds are back
to the baseline count and the RSS within RSS_TOLERANCE_MB of it, for at most SETTLE_SECONDS. Exit
code 0 only when normal clients saw no error, nothing went back to a client that was not its
own, the proxy ran throughout, and everything came back. See loadtests/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shlex
import socket
import struct
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    ProcessGroup,
    laneswitch_argv,
    log_tail,
    open_fds,
    raise_nofile_limit,
    read_response,
    rss_mb,
    sigterm_as_interrupt,
    step,
    wait_ready,
)

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
HOST = "127.0.0.1"
HOST_HEADER = "hostile.test"

# Clients of each kind, all running at once for the whole duration.
NORMAL_CLIENTS = 8
SLOWLORIS_CLIENTS = 30
IDLE_CLIENTS = 30
NEVER_READING_CLIENTS = 10
LEAVING_CLIENTS = 4
BAD_ROUTE_CLIENTS = 6

NORMAL_POST_EVERY = 8  # every 8th normal request is a POST with a body
NORMAL_POST_BYTES = 2000
NEVER_READ_PIPELINE = 4  # 1 MiB GETs a never-reading client sends at once
LEAVE_AFTER_BYTES = 64 * 1024
NOREAD_POST_BYTES = 1 << 20
SAMPLE_EVERY = 0.2  # seconds between two samples of the proxy's RSS and fds
WARMUP_SECONDS = 1.0
# After the load: the fds must be back to exactly the baseline count, the RSS within this of the
# baseline (CPython keeps freed memory in its arenas, and the allocator may keep some pages).
FD_TOLERANCE = 0
RSS_TOLERANCE_MB = 10.0
LINGER_SECONDS = 2.0  # the proxy's lingering close after a local answer (SPEC §7)
READY_SECONDS = 20.0


def settle_seconds(timeout: float) -> float:
    """How long the proxy may take to let everything go once the load stopped: its timeouts
    (a stalled exchange is cut at most `idle` after its last byte; an idle pooled connection
    closes after `idle` plus a sweep), its lingering close, and slack for a busy machine."""
    return 4 * timeout + LINGER_SECONDS + 10.0


CONFIG = """\
listen: {host}:0
admin: {{listen: {host}:0}}
drain_timeout: 1s
timeouts: {{connect: 1s, header: {t}s, response: {response}s, idle: {t}s}}
services:
  good:
    match: {{path_prefix: /good}}
    versions:
      v1: {{endpoints: ["{host}:{good}"], weight: 100}}
  bad:
    match: {{path_prefix: /bad}}
    versions:
      v1: {{endpoints: ["{host}:{bad}"], weight: 100}}
  noread:
    match: {{path_prefix: /noread}}
    versions:
      v1: {{endpoints: ["{host}:{noread}"], weight: 100}}
"""

BAD_TARGETS = (
    "/bad/stall-head",
    "/bad/stall-body",
    "/bad/cl-more",
    "/bad/cl-less",
    "/bad/reset",
    "/bad/no-answer",
    "/bad/garbage",
    "/noread/upload",
)
POISON = b"evil"  # the second response /bad/cl-more's upstream sends: must never reach a client

# Linux TCP states (tcp_states.h), read with TCP_INFO: the peer closed (FIN) or reset.
_TCP_CLOSE = 7
_TCP_CLOSE_WAIT = 8
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


# --------------------------------------------------------------------------- tallies


@dataclass
class Tally:
    """What one kind of client saw."""

    connections: int = 0
    requests: int = 0
    errors: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    longest_held_s: float = 0.0  # the longest a connection stayed open before the proxy ended it
    first_errors: list[str] = field(default_factory=list)

    def saw(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def held(self, seconds: float) -> None:
        self.longest_held_s = max(self.longest_held_s, round(seconds, 2))

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(what)


@dataclass
class Sample:
    rss_mb: float
    fds: int

    @staticmethod
    def of(pid: int) -> Sample:
        return Sample(round(rss_mb(pid), 1), open_fds(pid))


@dataclass
class Report:
    duration_s: float
    timeout_s: float
    clients: dict[str, int]
    tallies: dict[str, Tally] = field(default_factory=dict)
    baseline: Sample | None = None
    peak: Sample | None = None
    after: Sample | None = None
    settled_after_s: float | None = None  # from the end of the load until everything was back
    metrics: dict[str, float] = field(default_factory=dict)
    proxy_alive: bool = True
    proxy_exit_code: int | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


# --------------------------------------------------------------------------- raw sockets


def tcp_state(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return info[0]


def peer_ended(sock: socket.socket) -> bool:
    """The proxy closed or reset this connection (we never read from it to find out)."""
    return tcp_state(sock) in (_TCP_CLOSE, _TCP_CLOSE_WAIT)


def first_answer(sock: socket.socket) -> str:
    """What the proxy sent before it ended the connection: its status, or how it ended."""
    try:
        data = sock.recv(256)
    except BlockingIOError:
        return "no answer"
    except ConnectionResetError:
        return "reset"
    if not data:
        return "closed, no answer"
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return match.group(1).decode() if match else "not HTTP"


async def raw_connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def wait_peer_end(sock: socket.socket, bound: float) -> bool:
    """Poll until the proxy ended the connection; False when `bound` seconds passed first."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if peer_ended(sock):
            return True
        await asyncio.sleep(0.05)
    return peer_ended(sock)


def abort(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


# --------------------------------------------------------------------------- clients


@dataclass
class Load:
    port: int
    stop_at: float
    timeout: float
    trickle: float
    tallies: dict[str, Tally]

    def running(self) -> bool:
        return time.monotonic() < self.stop_at

    @property
    def hold_bound(self) -> float:
        """How long a hostile client waits for the proxy to end its connection."""
        return 3 * self.timeout + 2.0


def request(target: str, body: bytes = b"", method: str = "GET") -> bytes:
    framing = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    head = f"{method} {target} HTTP/1.1\r\nHost: {HOST_HEADER}\r\n{framing}\r\n"
    return head.encode() + body


async def normal_client(load: Load, n: int) -> None:
    tally = load.tallies["normal"]
    i = 0
    while load.running():
        tally.connections += 1
        try:
            reader, writer = await asyncio.open_connection(HOST, load.port)
        except OSError as exc:
            tally.error(f"connect: {exc!r}")
            await asyncio.sleep(0.1)
            continue
        try:
            while load.running():
                i += 1
                target = f"/good/n{n}-{i}"
                body = b"p" * NORMAL_POST_BYTES if i % NORMAL_POST_EVERY == 0 else b""
                writer.write(request(target, body, "POST" if body else "GET"))
                tally.requests += 1
                try:
                    async with asyncio.timeout(10 * load.timeout + 5):
                        response = await read_response(reader)
                except (OSError, EOFError, ValueError, TimeoutError) as exc:
                    tally.error(f"{target}: {exc!r}")
                    break
                expected = f"good {target} {len(body)}\n".encode()
                if response.status != 200 or response.body != expected:
                    tally.error(f"{target}: {response.status} {response.body[:60]!r}")
                    break
                tally.saw("200")
                if not response.keep_alive:
                    tally.saw("closed by the proxy (Connection: close)")
                    break
        finally:
            writer.transport.abort()


async def slowloris_client(load: Load, n: int) -> None:
    """A request head trickled one byte at a time: the header timeout must end it."""
    tally = load.tallies["slowloris"]
    head = request(f"/good/slowloris-{n}").replace(
        b"\r\n\r\n", b"\r\nX-Pad: " + b"x" * 40 + b"\r\n\r\n"
    )
    while load.running():
        tally.connections += 1
        sock = await raw_connect(load.port)
        started = time.monotonic()
        try:
            outcome = "whole head sent"
            for byte in head:
                if peer_ended(sock):
                    outcome = first_answer(sock)
                    break
                try:
                    sock.send(bytes((byte,)))
                except OSError:
                    outcome = first_answer(sock)
                    break
                await asyncio.sleep(load.trickle)
            else:
                tally.error("the whole head went through at a trickle")
            tally.held(time.monotonic() - started)
            tally.saw(outcome)
        finally:
            abort(sock)


async def idle_client(load: Load) -> None:
    """Connects and sends nothing."""
    tally = load.tallies["idle"]
    while load.running():
        tally.connections += 1
        sock = await raw_connect(load.port)
        started = time.monotonic()
        try:
            if await wait_peer_end(sock, load.hold_bound):
                tally.held(time.monotonic() - started)
                tally.saw(first_answer(sock))
            else:
                tally.saw(f"still open after {load.hold_bound:.0f}s (client gave up)")
        finally:
            abort(sock)


async def never_reading_client(load: Load, n: int) -> None:
    """Pipelines 1 MiB GETs and never reads: the proxy's buffers must stay bounded."""
    tally = load.tallies["never-reading"]
    while load.running():
        tally.connections += 1
        sock = await raw_connect(load.port)
        started = time.monotonic()
        try:
            data = b"".join(request("/good/big") for _ in range(NEVER_READ_PIPELINE))
            await asyncio.get_running_loop().sock_sendall(sock, data)
            tally.requests += NEVER_READ_PIPELINE
            bound = max(0.0, min(load.hold_bound, load.stop_at - time.monotonic()))
            if await wait_peer_end(sock, bound):
                tally.held(time.monotonic() - started)
                tally.saw("ended by the proxy")
            else:
                tally.saw("still open when the client gave up")
        except OSError as exc:
            tally.saw(f"send: {exc.__class__.__name__}")
        finally:
            abort(sock)


async def leaving_client(load: Load, n: int) -> None:
    """Reads the start of a 1 MiB answer, then leaves: FIN on odd rounds, RST on even ones."""
    tally = load.tallies["leaving"]
    rounds = 0
    while load.running():
        rounds += 1
        tally.connections += 1
        # A small receive buffer: the proxy is still sending when the client leaves.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LEAVE_AFTER_BYTES)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (HOST, load.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        how = "reset" if rounds % 2 == 0 else "close"
        try:
            writer.write(request("/good/big"))
            tally.requests += 1
            async with asyncio.timeout(10 * load.timeout + 5):
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(LEAVE_AFTER_BYTES)
            tally.saw(f"left with a {how} after {LEAVE_AFTER_BYTES // 1024} KiB")
        except (OSError, EOFError, TimeoutError) as exc:
            tally.saw(f"before leaving: {exc.__class__.__name__}")
        finally:
            if how == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                writer.transport.abort()
            else:
                writer.close()
        await asyncio.sleep(0.05)


async def bad_route_client(load: Load, n: int) -> None:
    """Requests to the bad upstreams, in turn; records what came back and checks that no byte
    of another response (the poison) ever does."""
    tally = load.tallies["bad-route"]
    turn = n
    while load.running():
        tally.connections += 1
        reader, writer = await asyncio.open_connection(HOST, load.port)
        try:
            while load.running():
                target = BAD_TARGETS[turn % len(BAD_TARGETS)]
                turn += 1
                outcome, keep = await bad_request(load, reader, writer, target)
                tally.requests += 1
                tally.saw(f"{target}: {outcome}")
                if outcome == "poisoned":
                    tally.error(f"{target}: another response's bytes reached this client")
                if not keep:
                    break
        except OSError as exc:
            tally.saw(f"connection: {exc.__class__.__name__}")
        finally:
            writer.transport.abort()


async def bad_request(
    load: Load, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str
) -> tuple[str, bool]:
    """One request to a bad route: (what came back, whether the connection can go on)."""
    upload = target.startswith("/noread")
    body = b"u" * NOREAD_POST_BYTES if upload else b""
    writer.write(request(target, body, "POST" if upload else "GET"))
    sending = asyncio.ensure_future(writer.drain())
    try:
        async with asyncio.timeout(10 * load.timeout + 5):
            response = await read_response(reader)
    except asyncio.IncompleteReadError as exc:
        return ("poisoned" if POISON in exc.partial else "cut"), False
    except (ConnectionError, EOFError):
        return "reset", False
    except ValueError:
        return "not HTTP", False
    except TimeoutError:
        return "no answer from the proxy", False
    finally:
        sending.cancel()
        with contextlib.suppress(BaseException):
            await sending
    if POISON in response.body:
        return "poisoned", False
    return str(response.status), response.keep_alive and not upload


# --------------------------------------------------------------------------- run


async def sampler(pid: int, report: Report, stop: asyncio.Event) -> None:
    while not stop.is_set():
        now = Sample.of(pid)
        peak = report.peak
        report.peak = Sample(
            max(now.rss_mb, peak.rss_mb if peak else 0.0), max(now.fds, peak.fds if peak else 0)
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)


async def run_clients(load: Load, counts: dict[str, int]) -> None:
    makers: dict[str, Callable[[int], Awaitable[None]]] = {
        "normal": lambda n: normal_client(load, n),
        "slowloris": lambda n: slowloris_client(load, n),
        "idle": lambda n: idle_client(load),
        "never-reading": lambda n: never_reading_client(load, n),
        "leaving": lambda n: leaving_client(load, n),
        "bad-route": lambda n: bad_route_client(load, n),
    }
    tasks = [
        asyncio.ensure_future(makers[kind](n))
        for kind, count in counts.items()
        for n in range(count)
    ]
    # Every client ends its loop at stop_at; what is still waiting then is cancelled soon after.
    grace = max(0.0, load.stop_at - time.monotonic()) + load.hold_bound + 5
    done, pending = await asyncio.wait(tasks, timeout=grace)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        exc = task.exception()
        if exc is not None:
            load.tallies["harness"].error(f"a client crashed: {exc!r}")


def metrics(admin: str) -> dict[str, float]:
    """The proxy's counters that tell how it classified the hostile peers."""
    with urllib.request.urlopen(admin + "/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = (
        "laneswitch_in_flight_requests",
        "laneswitch_client_aborts_total",
        "laneswitch_upstream_errors_total",
        "laneswitch_requests_total",
    )
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith(wanted):
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{")[0]
            service = re.search(r'service="([^"]*)"', name_labels)
            detail = re.search(r'(?:kind|code)="([^"]*)"', name_labels)
            key = name.removeprefix("laneswitch_")
            if service:
                key += f"{{{service.group(1)}" + (f",{detail.group(1)}" if detail else "") + "}"
            out[key] += float(value)
    return {key: value for key, value in sorted(out.items()) if value}


def in_flight(values: dict[str, float]) -> float:
    return sum(v for k, v in values.items() if k.startswith("in_flight_requests"))


async def settle(pid: int, admin: str, report: Report, timeout: float) -> None:
    """Poll until the proxy let go of everything the load made it hold, or give up."""
    assert report.baseline is not None
    base = report.baseline
    started = time.monotonic()
    deadline = started + settle_seconds(timeout)
    while True:
        now = Sample.of(pid)
        counters = await asyncio.to_thread(metrics, admin)
        report.after, report.metrics = now, counters
        back = (
            now.fds <= base.fds + FD_TOLERANCE
            and now.rss_mb <= base.rss_mb + RSS_TOLERANCE_MB
            and in_flight(counters) == 0
        )
        if back:
            report.settled_after_s = round(time.monotonic() - started, 1)
            return
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.25)


async def wait_baseline(pid: int, fresh: Sample, timeout: float) -> Sample:
    """After the warm-up: wait until its pooled upstream connections expired (fds back to what
    the proxy held when it had just started), then take the baseline."""
    deadline = time.monotonic() + settle_seconds(timeout)
    while time.monotonic() < deadline:
        if open_fds(pid) <= fresh.fds:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.2)
    return Sample.of(pid)


async def exercise(
    pid: int, port: int, admin: str, args: argparse.Namespace, report: Report
) -> None:
    fresh = Sample.of(pid)
    step(f"proxy up (pid {pid}, port {port}): RSS {fresh.rss_mb} MB, {fresh.fds} fds; warm-up")
    warm = Load(port, time.monotonic() + WARMUP_SECONDS, args.timeout, args.trickle, {})
    warm.tallies = {"normal": Tally(), "harness": Tally()}
    await run_clients(warm, {"normal": NORMAL_CLIENTS})
    if warm.tallies["normal"].errors:
        report.failures.append(f"warm-up: {warm.tallies['normal'].first_errors}")
    report.baseline = await wait_baseline(pid, fresh, args.timeout)
    report.peak = report.baseline
    step(f"baseline: {report.baseline}; load for {args.duration:g}s")
    report.tallies = {kind: Tally() for kind in (*report.clients, "harness")}
    load = Load(port, time.monotonic() + args.duration, args.timeout, args.trickle, report.tallies)
    stop = asyncio.Event()
    sampling = asyncio.ensure_future(sampler(pid, report, stop))
    try:
        await run_clients(load, report.clients)
    finally:
        stop.set()
        await sampling
    step(f"load over: peak {report.peak}; waiting for the proxy to let go")
    await settle(pid, admin, report, args.timeout)


def wait_listening(log: Path, proc_alive: Callable[[], bool]) -> tuple[int, str]:
    """The data port and the admin URL the proxy printed when it started."""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline and proc_alive():
        text = log.read_text(errors="replace") if log.exists() else ""
        data = re.search(rf"listening on {re.escape(HOST)}:(\d+)", text)
        admin = re.search(rf"admin API on {re.escape(HOST)}:(\d+)", text)
        if data and admin:
            return int(data.group(1)), f"http://{HOST}:{admin.group(1)}"
        time.sleep(0.1)
    raise RuntimeError(f"laneswitch did not start:\n{log_tail(log)}")


def wait_ports(path: Path, proc_alive: Callable[[], bool]) -> dict[str, int]:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline and proc_alive():
        if path.exists():
            ports: dict[str, int] = json.loads(path.read_text())
            return ports
        time.sleep(0.05)
    raise RuntimeError("the upstreams did not start")


def judge(report: Report) -> None:
    normal = report.tallies.get("normal", Tally())
    if normal.errors or not normal.requests:
        report.failures.append(
            f"normal clients: {normal.errors} errors in {normal.requests} requests"
            + (f", first: {normal.first_errors}" if normal.first_errors else "")
        )
    for kind, tally in report.tallies.items():
        if kind != "normal" and tally.errors:
            report.failures.append(f"{kind}: {tally.errors} errors, first: {tally.first_errors}")
    if not report.proxy_alive:
        report.failures.append("the proxy exited during the run")
    if report.settled_after_s is None:
        report.failures.append(
            f"resources did not come back within {settle_seconds(report.timeout_s):.0f}s:"
            f" baseline {report.baseline}, after {report.after},"
            f" in flight {in_flight(report.metrics)}"
        )


def run(args: argparse.Namespace, report: Report) -> None:
    raise_nofile_limit()
    with tempfile.TemporaryDirectory(prefix="laneswitch-hostile-") as tmp, ProcessGroup() as procs:
        work = Path(tmp)
        ports_file = work / "ports.json"
        upstreams = procs.start(
            [
                sys.executable,
                str(HERE / "hostile_upstreams.py"),
                "--ports-file",
                str(ports_file),
                "--max-seconds",
                str(args.duration + 300),
            ],
            work / "upstreams.log",
        )
        ports = wait_ports(ports_file, lambda: upstreams.poll() is None)
        config = work / "laneswitch.yaml"
        t = args.timeout
        config.write_text(CONFIG.format(host=HOST, t=t, response=2 * t, **ports))
        log = work / "laneswitch.log"
        argv = laneswitch_argv(args.laneswitch_cmd, config)
        step(f"starting: {shlex.join(argv)}")
        proxy = procs.start(argv, log, cwd=REPO_ROOT)
        port, admin = wait_listening(log, lambda: proxy.poll() is None)
        why = wait_ready(proxy, admin + "/readyz", timeout=READY_SECONDS)
        if why is not None:
            raise RuntimeError(f"laneswitch not ready: {why}\n{log_tail(log)}")
        try:
            asyncio.run(exercise(proxy.pid, port, admin, args, report))
        finally:
            report.proxy_alive = proxy.poll() is None
            procs.stop(proxy)
            report.proxy_exit_code = proxy.returncode
            if not report.proxy_alive:
                step(f"laneswitch exited early:\n{log_tail(log)}")


def print_report(report: Report) -> None:
    print()
    print(
        f"hostile peers: {report.duration_s:g}s of load, proxy timeouts {report.timeout_s:g}s"
        f" (response {2 * report.timeout_s:g}s)"
    )
    for kind, tally in report.tallies.items():
        if kind == "harness" and not tally.errors:
            continue
        print(
            f"  {kind:<14} {report.clients.get(kind, 0):>3} clients  {tally.connections:>6} conns"
            f"  {tally.requests:>7} requests  {tally.errors} errors"
            + (f"  longest held {tally.longest_held_s:.2f}s" if tally.longest_held_s else "")
        )
        for outcome, count in sorted(tally.outcomes.items()):
            print(f"      {count:>7}  {outcome}")
    print("  proxy process tree:   RSS MB   fds")
    for label, sample in (("baseline", report.baseline), ("peak", report.peak)):
        if sample is not None:
            print(f"    {label:<18} {sample.rss_mb:>8.1f} {sample.fds:>5}")
    if report.after is not None:
        when = (
            f"back after {report.settled_after_s:.1f}s"
            if report.settled_after_s is not None
            else "NOT back"
        )
        print(f"    {'after':<18} {report.after.rss_mb:>8.1f} {report.after.fds:>5}   {when}")
    print(
        f"  tolerance: fds <= baseline + {FD_TOLERANCE}, RSS <= baseline + {RSS_TOLERANCE_MB:g} MB,"
        " in-flight requests 0"
    )
    if report.metrics:
        print("  proxy counters after the run:")
        for key, value in report.metrics.items():
            print(f"      {value:>9.0f}  {key}")
    print(f"  proxy exit code after SIGTERM: {report.proxy_exit_code}")
    print("PASS" if report.ok else "FAIL: " + "; ".join(report.failures))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (30)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=1.0,
        help="the proxy's timeouts.header and .idle in seconds; .response is twice it (1)",
    )
    parser.add_argument(
        "--trickle", type=float, default=0.3, help="seconds between two slowloris bytes (0.3)"
    )
    parser.add_argument(
        "--laneswitch-cmd",
        help="command that starts laneswitch; '{config}' is replaced by the config path, "
        "else '-c CONFIG' is appended (default: python -m proxy run -c CONFIG, from the repo)",
    )
    parser.add_argument("--out", type=Path, help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.timeout <= 0 or args.trickle <= 0:
        parser.error("--duration, --timeout and --trickle must be > 0")
    return args


def to_json(report: Report) -> dict[str, Any]:
    return asdict(report) | {"ok": report.ok}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(
        duration_s=args.duration,
        timeout_s=args.timeout,
        clients={
            "normal": NORMAL_CLIENTS,
            "slowloris": SLOWLORIS_CLIENTS,
            "idle": IDLE_CLIENTS,
            "never-reading": NEVER_READING_CLIENTS,
            "leaving": LEAVING_CLIENTS,
            "bad-route": BAD_ROUTE_CLIENTS,
        },
    )
    code = 0
    with sigterm_as_interrupt():
        try:
            run(args, report)
            judge(report)
        except KeyboardInterrupt:
            step("interrupted: everything started was stopped")
            report.failures.append("interrupted")
            code = 130
        except RuntimeError as exc:
            report.failures.append(str(exc))
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(to_json(report), indent=2) + "\n")
    return code or (0 if report.ok else 1)


if __name__ == "__main__":
    sys.exit(main())
