"""laneswitch benchmark: nginx vs a plain aiohttp proxy vs laneswitch, on loopback.

    python loadtests/bench.py [--duration 10] [--only nginx,aiohttp,laneswitch]
                              [--skip-idle] [--laneswitch-cmd CMD] [--workers N] [--out FILE.json]

Two nginx upstreams (blue 127.0.0.1:19001, green 127.0.0.1:19002) and wrk run on CPU 0; each
proxy under test listens on 127.0.0.1:18080 on CPU 1 and splits 90/10. With --workers N, nginx
(worker_processes N) and laneswitch (--workers N) are measured again on every CPU, and their
N-worker / 1-worker throughput ratios compared. See loadtests/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import json
import os
import platform
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness import (
    ProcessGroup,
    cpu_times,
    http_get,
    laneswitch_argv,
    log_tail,
    pinned,
    raise_nofile_limit,
    read_response,
    rss_mb,
    sigterm_as_interrupt,
    step,
    tree_cpu_seconds,
    wait_ready,
)

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

HOST = "127.0.0.1"
PROXY_PORT = 18080
BLUE_PORT = 19001
GREEN_PORT = 19002
ADMIN_PORT = 19901
PROXY_URL = f"http://{HOST}:{PROXY_PORT}"

ALL_PROXIES = ("nginx", "aiohttp", "laneswitch")
MULTI_WORKER_PROXIES = ("nginx", "laneswitch")  # the ones measured again with --workers N
UPSTREAM_CPU = 0  # upstream nginx servers, wrk and the idle client's peers
PROXY_CPU = 1  # the proxy under test (one worker)
# laneswitch's scaling (N workers / 1) must reach this share of nginx's scaling.
SCALING_VS_NGINX_TARGET = 0.85

BIG_BYTES = 1 << 20
SMALL_CONNECTIONS = 64
BIG_CONNECTIONS = 8
WARMUP_SECONDS = 1
WRK_GRACE = 30.0
IDLE_CONNECTIONS = 10_000
IDLE_OPEN_CONCURRENCY = 200
IDLE_TIMEOUT = 90.0
IDLE_SETTLE = 2.0
SPLIT_SAMPLES = 200

LANESWITCH_CONFIG = f"""\
listen: {HOST}:{PROXY_PORT}
admin: {{listen: {HOST}:{ADMIN_PORT}}}
services:
  app:
    versions:
      blue: {{endpoints: ["{HOST}:{BLUE_PORT}"], weight: 90}}
      green: {{endpoints: ["{HOST}:{GREEN_PORT}"], weight: 10}}
"""


# --------------------------------------------------------------------------- results


@dataclass
class WrkResult:
    requests: int
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    transfer_mib_per_s: float
    non_2xx: int
    socket_errors: dict[str, int]
    proxy_cpu_pct: float | None = None  # the proxy's process tree, % of one CPU
    loadgen_cpu_busy_pct: float | None = None  # CPU 0 (wrk + upstreams), % busy

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


@dataclass
class IdleResult:
    requested: int
    opened: int
    still_open: int
    seconds: float
    rss_mb: float
    first_error: str | None = None


@dataclass
class ProxyResult:
    name: str  # "nginx", ... ; "nginx x2" for a multi-worker run
    status: str = "not run"  # "ok" | "failed to start" | "error: ..." | "interrupted"
    detail: str = ""
    green_share_pct: float | None = None
    base_rss_mb: float | None = None
    small: WrkResult | None = None
    big: WrkResult | None = None
    idle: IdleResult | None = None

    @property
    def errors(self) -> int:
        return sum(r.errors for r in (self.small, self.big) if r is not None)


@dataclass
class Target:
    label: str
    value: float | None
    op: str  # ">=" or "<="
    goal: float

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        ok = self.value >= self.goal if self.op == ">=" else self.value <= self.goal
        return "PASS" if ok else "MISS"


# --------------------------------------------------------------------------- nginx configs


def nginx_user_directive() -> str:
    """As root the master would hand workers to 'nobody', who cannot read our 0700 temp dir."""
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};"


def nginx_main(
    work: Path, name: str, nofile: int, master: bool, http_body: str, workers: int = 1
) -> str:
    state = work / name
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    connections = min(16384, nofile - 64)
    return f"""\
daemon off;
master_process {"on" if master else "off"};
worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {state}/nginx.pid;
error_log {state}/error.log warn;
{nginx_user_directive()}
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {state}/client_body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    sendfile on;
    tcp_nopush on;
{http_body}
}}
"""


def upstream_nginx_conf(work: Path, version: str, port: int, nofile: int) -> str:
    server = f"""\
    server {{
        listen {HOST}:{port} backlog=4096;
        location = / {{
            default_type text/plain;
            return 200 "{version}\\n";
        }}
        location = /big {{
            default_type application/octet-stream;
            alias {work}/www/big.bin;
        }}
    }}"""
    return nginx_main(work, f"upstream-{version}", nofile, master=False, http_body=server)


def proxy_nginx_conf(work: Path, nofile: int, workers: int = 1) -> str:
    # Several workers: one SO_REUSEPORT listener each, as laneswitch's workers have.
    reuseport = " reuseport" if workers > 1 else ""
    body = f"""\
    upstream app {{
        server {HOST}:{BLUE_PORT} weight=9;
        server {HOST}:{GREEN_PORT} weight=1;
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{PROXY_PORT} backlog=4096{reuseport};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_max_temp_file_size 0;
        }}
    }}"""
    name = "proxy-nginx" if workers == 1 else f"proxy-nginx-{workers}w"
    return nginx_main(work, name, nofile, master=True, http_body=body, workers=workers)


def nginx_argv(work: Path, name: str, conf_text: str) -> list[str]:
    conf = work / f"{name}.conf"
    conf.write_text(conf_text)
    # -e: the error log before the config is read (else /var/log/nginx/error.log).
    return [
        nginx_binary(),
        "-p",
        str(work),
        "-e",
        str(work / f"{name}.stderr.log"),
        "-c",
        str(conf),
    ]


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


# --------------------------------------------------------------------------- HTTP probes


def green_share(samples: int = SPLIT_SAMPLES) -> float:
    """Percentage of sample requests that green answered (expected about 10)."""
    greens = 0
    for _ in range(samples):
        _, body = http_get(PROXY_URL + "/", timeout=2.0)
        greens += body.strip() == b"green"
    return 100.0 * greens / samples


def ports_in_use(ports: list[int]) -> list[int]:
    busy = []
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
            except OSError:
                busy.append(port)
    return busy


# --------------------------------------------------------------------------- wrk

_TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE_UNITS_MIB = {"B": 1 / 2**20, "KB": 1 / 2**10, "MB": 1.0, "GB": 2**10, "TB": 2**20}


def parse_wrk(text: str) -> WrkResult:
    """Parse `wrk --latency` output. wrk's sizes are binary (its "MB" is MiB)."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    if not rps:
        raise ValueError("no Requests/sec in wrk output:\n" + text.strip())
    transfer = re.search(r"^Transfer/sec:\s+([\d.]+)([KMGT]?B)", text, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in", text, re.MULTILINE)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests=int(total.group(1)) if total else 0,
        requests_per_s=float(rps.group(1)),
        p50_ms=_percentile_ms(text, "50"),
        p99_ms=_percentile_ms(text, "99"),
        transfer_mib_per_s=(
            float(transfer.group(1)) * _SIZE_UNITS_MIB[transfer.group(2)] if transfer else 0.0
        ),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=(
            dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
            if sock
            else {}
        ),
    )


def _percentile_ms(text: str, pct: str) -> float | None:
    match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    if not match:
        return None
    return float(match.group(1)) * _TIME_UNITS_MS[match.group(2)]


def run_wrk(path: str, connections: int, duration: int, pid: int | None = None) -> WrkResult:
    """One wrk run against the proxy; with `pid`, also the CPU the proxy and CPU 0 used."""
    proxy_before = tree_cpu_seconds(pid) if pid else 0.0
    busy_before, total_before = cpu_times(UPSTREAM_CPU)
    started = time.monotonic()
    result = _wrk(path, connections, duration)
    wall = time.monotonic() - started
    busy_after, total_after = cpu_times(UPSTREAM_CPU)
    if pid:
        result.proxy_cpu_pct = 100 * (tree_cpu_seconds(pid) - proxy_before) / wall
    if total_after > total_before:
        result.loadgen_cpu_busy_pct = (
            100 * (busy_after - busy_before) / (total_after - total_before)
        )
    return result


def _wrk(path: str, connections: int, duration: int) -> WrkResult:
    argv = pinned(
        UPSTREAM_CPU,
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", PROXY_URL + path],
    )
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + WRK_GRACE, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    return parse_wrk(done.stdout)


# --------------------------------------------------------------------------- idle keep-alive

IDLE_REQUEST = (
    f"GET / HTTP/1.1\r\nHost: {HOST}:{PROXY_PORT}\r\nConnection: keep-alive\r\n\r\n"
).encode()

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def read_ok_response(reader: asyncio.StreamReader) -> bool:
    """Read one 200 response; True when the server means to keep the connection."""
    response = await read_response(reader)
    if response.status != 200:
        raise RuntimeError(f"unexpected status: {response.status}")
    return response.keep_alive


async def open_idle_connection(limit: asyncio.Semaphore) -> Connection:
    async with limit:
        reader, writer = await asyncio.open_connection(HOST, PROXY_PORT)
        try:
            writer.write(IDLE_REQUEST)
            if not await read_ok_response(reader):
                raise RuntimeError("server answered Connection: close")
        except BaseException:
            writer.transport.abort()
            raise
        return reader, writer


async def idle_keepalive(pid: int, count: int) -> IdleResult:
    """Open `count` keep-alive connections that each did one GET, then read the proxy's RSS."""
    started = time.monotonic()
    limit = asyncio.Semaphore(IDLE_OPEN_CONCURRENCY)
    tasks = [asyncio.create_task(open_idle_connection(limit)) for _ in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=IDLE_TIMEOUT)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    conns = [t.result() for t in done if not t.cancelled() and t.exception() is None]
    errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
    elapsed = time.monotonic() - started
    try:
        await asyncio.sleep(IDLE_SETTLE)
        still_open = sum(not r.at_eof() and not w.is_closing() for r, w in conns)
        rss = rss_mb(pid)
    finally:
        for _, writer in conns:
            writer.transport.abort()
    first_error = repr(errors[0]) if errors else ("timed out" if pending else None)
    return IdleResult(count, len(conns), still_open, round(elapsed, 1), rss, first_error)


# --------------------------------------------------------------------------- one proxy


@dataclass
class ProxySpec:
    name: str
    argv: list[str]
    cwd: Path | None = None
    log: Path = field(default_factory=Path)
    cpus: str = str(PROXY_CPU)  # taskset list the proxy runs on
    ready_url: str | None = None  # also 200 before measuring (laneswitch: every worker bound)


def proxy_specs(args: argparse.Namespace, work: Path, nofile: int) -> dict[str, ProxySpec]:
    ls_config = work / "laneswitch.yaml"
    ls_config.write_text(LANESWITCH_CONFIG)
    return {
        "nginx": ProxySpec(
            "nginx", nginx_argv(work, "proxy-nginx", proxy_nginx_conf(work, nofile))
        ),
        "aiohttp": ProxySpec(
            "aiohttp",
            [
                sys.executable,
                str(HERE / "aiohttp_proxy.py"),
                "--listen",
                f"{HOST}:{PROXY_PORT}",
                "--upstream",
                f"{HOST}:{BLUE_PORT}=9",
                "--upstream",
                f"{HOST}:{GREEN_PORT}=1",
            ],
        ),
        "laneswitch": ProxySpec(
            "laneswitch", laneswitch_argv(args.laneswitch_cmd, ls_config), cwd=REPO_ROOT
        ),
    }


def multi_worker_specs(args: argparse.Namespace, work: Path, nofile: int) -> dict[str, ProxySpec]:
    """nginx and laneswitch with `args.workers` workers, allowed on every CPU."""
    n = args.workers
    every_cpu = ",".join(str(cpu) for cpu in range(os.cpu_count() or 1))
    ls_config = work / "laneswitch.yaml"
    return {
        "nginx": ProxySpec(
            f"nginx x{n}",
            nginx_argv(work, f"proxy-nginx-{n}w", proxy_nginx_conf(work, nofile, workers=n)),
            cpus=every_cpu,
        ),
        "laneswitch": ProxySpec(
            f"laneswitch x{n}",
            [*laneswitch_argv(args.laneswitch_cmd, ls_config), "--workers", str(n)],
            cwd=REPO_ROOT,
            cpus=every_cpu,
            ready_url=f"http://{HOST}:{ADMIN_PORT}/readyz",
        ),
    }


def bench_proxy(
    spec: ProxySpec, procs: ProcessGroup, args: argparse.Namespace, result: ProxyResult
) -> None:
    """Start one proxy, measure it, stop it; fills `result` as it goes."""
    step(f"{spec.name}: starting: {shlex.join(spec.argv)}")
    proc = procs.start(pinned(spec.cpus, spec.argv), spec.log, cwd=spec.cwd)
    try:
        why = wait_ready(proc, PROXY_URL + "/")
        if why is None and spec.ready_url is not None:
            why = wait_ready(proc, spec.ready_url)
        if why is not None:
            result.status, result.detail = "failed to start", f"{why}\n{log_tail(spec.log)}"
            return
        measure(proc.pid, args, result)
        result.status = "ok"
    finally:
        procs.stop(proc)


def measure(pid: int, args: argparse.Namespace, result: ProxyResult) -> None:
    result.green_share_pct = green_share()
    result.base_rss_mb = rss_mb(pid)
    step(f"{result.name}: green share {result.green_share_pct:.1f}%, warm-up {WARMUP_SECONDS}s")
    run_wrk("/", SMALL_CONNECTIONS, WARMUP_SECONDS)
    step(f"{result.name}: GET / -c{SMALL_CONNECTIONS} for {args.duration}s")
    result.small = run_wrk("/", SMALL_CONNECTIONS, args.duration, pid)
    step(f"{result.name}: GET /big (1 MiB) -c{BIG_CONNECTIONS} for {args.duration}s")
    result.big = run_wrk("/big", BIG_CONNECTIONS, args.duration, pid)
    if not args.skip_idle:
        step(f"{result.name}: {IDLE_CONNECTIONS} idle keep-alive connections")
        result.idle = asyncio.run(idle_keepalive(pid, IDLE_CONNECTIONS))


# --------------------------------------------------------------------------- upstreams


def start_upstreams(procs: ProcessGroup, work: Path, nofile: int) -> None:
    www = work / "www"
    www.mkdir()
    (www / "big.bin").write_bytes(os.urandom(BIG_BYTES))
    for version, port in (("blue", BLUE_PORT), ("green", GREEN_PORT)):
        name = f"upstream-{version}"
        argv = nginx_argv(work, name, upstream_nginx_conf(work, version, port, nofile))
        log = work / f"{name}.out.log"
        proc = procs.start(pinned(UPSTREAM_CPU, argv), log)
        why = wait_ready(proc, f"http://{HOST}:{port}/", timeout=10.0)
        if why is not None:
            raise RuntimeError(f"upstream nginx {version} did not start: {why}\n{log_tail(log)}")
        step(f"upstream {version} ready on {HOST}:{port} (pid {proc.pid})")


# --------------------------------------------------------------------------- report


def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "nginx": tool_version([nginx_binary(), "-v"]),
        "wrk": tool_version(["wrk", "-v"]),
    }


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    return (done.stdout + done.stderr).strip().splitlines()[0] if done.stdout + done.stderr else ""


def targets(results: dict[str, ProxyResult]) -> list[Target]:
    def ok(name: str) -> ProxyResult | None:
        res = results.get(name)
        return res if res is not None and res.status == "ok" else None

    def ratio(num: float | None, den: float | None) -> float | None:
        return num / den if num is not None and den else None

    ls, ngx, aio = ok("laneswitch"), ok("nginx"), ok("aiohttp")
    ls_rps = ls.small.requests_per_s if ls and ls.small else None
    ls_p99 = ls.small.p99_ms if ls and ls.small else None
    scaling = [
        Target(
            "laneswitch/nginx scaling",
            ratio(scaling_ratio(results, "laneswitch"), scaling_ratio(results, "nginx")),
            ">=",
            SCALING_VS_NGINX_TARGET,
        )
    ]
    if not any(" x" in name for name in results):
        scaling = []  # no multi-worker run
    return [
        Target(
            "laneswitch/nginx req/s",
            ratio(ls_rps, ngx.small.requests_per_s if ngx and ngx.small else None),
            ">=",
            0.45,
        ),
        Target(
            "laneswitch/aiohttp req/s",
            ratio(ls_rps, aio.small.requests_per_s if aio and aio.small else None),
            ">=",
            6,
        ),
        Target(
            "laneswitch p99 / nginx p99",
            ratio(ls_p99, ngx.small.p99_ms if ngx and ngx.small else None),
            "<=",
            3,
        ),
        Target(
            "laneswitch idle-10k RSS MB",
            ls.idle.rss_mb if ls and ls.idle else None,
            "<=",
            200,
        ),
        *scaling,
    ]


def multi_worker_name(results: dict[str, ProxyResult], proxy: str) -> str | None:
    return next((name for name in results if name.startswith(f"{proxy} x")), None)


def scaling_ratio(results: dict[str, ProxyResult], proxy: str) -> float | None:
    """req/s of `proxy`'s multi-worker run / req/s of its one-worker run (GET /)."""
    one, many = results.get(proxy), results.get(multi_worker_name(results, proxy) or "")
    if one is None or many is None or one.status != "ok" or many.status != "ok":
        return None
    if one.small is None or many.small is None or not one.small.requests_per_s:
        return None
    return many.small.requests_per_s / one.small.requests_per_s


def scaling_lines(results: list[ProxyResult]) -> list[str]:
    by_name = {r.name: r for r in results}
    lines = []
    for proxy in MULTI_WORKER_PROXIES:
        many = multi_worker_name(by_name, proxy)
        one = by_name.get(proxy)
        if many is None or one is None:
            continue
        ratio = scaling_ratio(by_name, proxy)
        one_rps = one.small.requests_per_s if one.small else None
        many_run = by_name[many].small
        many_rps = many_run.requests_per_s if many_run else None
        lines.append(
            f"{proxy:<11} 1 worker {fmt(one_rps, 0):>8} req/s -> {many}: {fmt(many_rps, 0):>8}"
            f" req/s   x{fmt(ratio, 2)}   per proxy CPU-second: {fmt(per_cpu(one.small), 0)}"
            f" -> {fmt(per_cpu(many_run), 0)} req"
        )
    return lines


def per_cpu(run: WrkResult | None) -> float | None:
    """Requests per second of CPU the proxy's process tree used: what a worker costs."""
    if run is None or not run.proxy_cpu_pct:
        return None
    return run.requests_per_s / (run.proxy_cpu_pct / 100)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


TABLE_HEADER = (
    "proxy",
    "req/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "1MiB req/s",
    "1MiB MiB/s",
    "idle-10k RSS MB",
    "CPU% proxy/cpu0",
    "status",
)


def table_rows(results: list[ProxyResult]) -> list[list[str]]:
    rows = [list(TABLE_HEADER)]
    for res in results:
        small, big, idle = res.small, res.big, res.idle
        rows.append(
            [
                res.name + (" (!)" if res.errors else ""),
                fmt(small.requests_per_s if small else None, 0),
                fmt(small.p50_ms if small else None, 2),
                fmt(small.p99_ms if small else None, 2),
                str(res.errors) if small else "-",
                fmt(big.requests_per_s if big else None, 0),
                fmt(big.transfer_mib_per_s if big else None, 0),
                fmt(idle.rss_mb if idle else None, 1),
                cpu_cell(small),
                res.status,
            ]
        )
    return rows


def cpu_cell(run: WrkResult | None) -> str:
    if run is None or run.proxy_cpu_pct is None or run.loadgen_cpu_busy_pct is None:
        return "-"
    return f"{run.proxy_cpu_pct:.0f}/{run.loadgen_cpu_busy_pct:.0f}"


def render_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def notes(results: list[ProxyResult]) -> list[str]:
    out = []
    for res in results:
        if res.status != "ok" and res.detail:
            out.append(f"{res.name}: {res.status}: " + res.detail.replace("\n", "\n    "))
        for label, run in (("GET /", res.small), ("GET /big", res.big)):
            if run and run.errors:
                out.append(
                    f"{res.name}: {label}: {run.errors} errors "
                    f"(non-2xx/3xx {run.non_2xx}, socket {run.socket_errors})"
                )
        if res.green_share_pct is not None and not 5 <= res.green_share_pct <= 15:
            out.append(f"{res.name}: green got {res.green_share_pct:.1f}% of requests, not ~10%")
        if res.idle and (res.idle.still_open < res.idle.requested or res.idle.first_error):
            out.append(
                f"{res.name}: idle: {res.idle.opened}/{res.idle.requested} opened, "
                f"{res.idle.still_open} still open after {IDLE_SETTLE:.0f}s"
                + (f", first error {res.idle.first_error}" if res.idle.first_error else "")
            )
    return out


def print_report(results: list[ProxyResult], command: str, machine: dict[str, str]) -> None:
    print()
    print(f"command: {command}")
    print(
        f"machine: nproc={machine['nproc']}, cpu={machine['cpu']}, kernel={machine['kernel']}, "
        f"python {machine['python']}, {machine['nginx']}, {machine['wrk'].split(' Copyright')[0]}"
    )
    print()
    print(render_table(table_rows(results)))
    for line in notes(results):
        print("  " + line)
    scaling = scaling_lines(results)
    if scaling:
        print()
        print(
            "scaling (GET /, 64 connections): the one-worker runs have CPU 1 to themselves; the"
            " multi-worker runs may use every CPU, so their second worker shares CPU 0 with wrk"
            " and the upstreams"
        )
        for line in scaling:
            print("  " + line)
    print()
    for target in targets({r.name: r for r in results}):
        print(
            f"{target.label:<28} {fmt(target.value, 2):>8}   target {target.op} {target.goal:<6g}"
            f" {target.verdict}"
        )


def save_json(
    path: Path, results: list[ProxyResult], command: str, machine: dict[str, str], duration: int
) -> None:
    payload = {
        "command": command,
        "machine": machine,
        "duration_s": duration,
        "results": [asdict(r) | {"errors": r.errors} for r in results],
        "targets": [
            asdict(t) | {"verdict": t.verdict} for t in targets({r.name: r for r in results})
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    parser.add_argument(
        "--only",
        type=proxy_list,
        default=list(ALL_PROXIES),
        help="comma-separated subset of nginx,aiohttp,laneswitch",
    )
    parser.add_argument(
        "--skip-idle", action="store_true", help="skip the 10k idle connections test"
    )
    parser.add_argument(
        "--laneswitch-cmd",
        help="command that starts laneswitch; '{config}' is replaced by the config path, "
        "else '-c CONFIG' is appended (default: python -m proxy run -c CONFIG, from the repo)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="also measure nginx (worker_processes N) and laneswitch (--workers N) on every CPU"
        " and compare their N/1 scaling (default 1: no multi-worker runs)",
    )
    parser.add_argument("--out", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.duration < 1:
        parser.error("--duration must be >= 1")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def proxy_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL_PROXIES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {','.join(ALL_PROXIES)}, got {text!r}")
    return [n for n in ALL_PROXIES if n in names]


def preflight() -> None:
    missing = [tool for tool in (nginx_binary(), "wrk") if not shutil.which(tool)]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: apt-get install nginx wrk")
    busy = ports_in_use([PROXY_PORT, BLUE_PORT, GREEN_PORT, ADMIN_PORT])
    if busy:
        sys.exit(f"ports already in use on {HOST}: {busy} (a previous run still alive?)")
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        step("warning: fewer than 2 CPUs or no taskset: running unpinned")


def run(args: argparse.Namespace, results: list[ProxyResult]) -> None:
    nofile = raise_nofile_limit()
    with (
        tempfile.TemporaryDirectory(prefix="laneswitch-bench-") as tmp,
        ProcessGroup() as procs,
    ):
        work = Path(tmp)
        start_upstreams(procs, work, nofile)
        single = proxy_specs(args, work, nofile)
        specs = [single[name] for name in args.only]
        if args.workers > 1:
            many = multi_worker_specs(args, work, nofile)
            specs += [many[name] for name in args.only if name in many]
        for spec in specs:
            name = spec.name
            spec.log = work / f"proxy-{name.replace(' ', '-')}.out.log"
            result = ProxyResult(name)
            results.append(result)
            try:
                bench_proxy(spec, procs, args, result)
            except KeyboardInterrupt:
                result.status = "interrupted"
                raise
            except Exception as exc:  # one broken proxy must not stop the others
                result.status, result.detail = f"error: {exc.__class__.__name__}", str(exc)
            step(f"{name}: {result.status}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(sys.orig_argv)
    machine = machine_info()
    preflight()
    results: list[ProxyResult] = []
    code = 0
    with sigterm_as_interrupt():
        try:
            run(args, results)
        except KeyboardInterrupt:
            step("interrupted: everything started was stopped")
            code = 130
    print_report(results, command, machine)
    if args.out:
        save_json(args.out, results, command, machine, args.duration)
        print(f"\nresults written to {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
