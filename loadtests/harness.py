"""Process and /proc helpers the loadtests share: start processes in their own process groups
and kill them all at the end, measure a process tree (CPU, RSS, open fds), probe HTTP readiness.

Standard library only; imported by `bench.py` and `hostile.py` (run as scripts from this folder).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


# --------------------------------------------------------------------------- processes


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the harness dies without cleaning up."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ProcessGroup:
    """Starts processes in their own sessions and kills every one of them on exit."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self._procs):
            self.stop(proc)

    def start(self, argv: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the process group, SIGKILL it after STOP_TIMEOUT."""
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
            if proc.poll() is not None:
                # The leader is gone; take any straggler of its group with it.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                break
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)


def pinned(cpus: int | str, argv: list[str]) -> list[str]:
    """Run on `cpus` (one CPU, or a taskset list such as "0,1") when taskset and they exist."""
    wanted = [int(cpu) for cpu in str(cpus).split(",")]
    if shutil.which("taskset") and (os.cpu_count() or 1) > max(wanted):
        return ["taskset", "-c", str(cpus), *argv]
    return argv


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------- /proc


def child_pids() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    children = child_pids()
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process and its live descendants."""
    ticks = 0
    for member in process_tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_times(cpu: int) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name == f"cpu{cpu}":
            ticks = [int(v) for v in values[:8]]
            return ticks[0] + ticks[1] + ticks[2] + sum(ticks[5:8]), sum(ticks)
    return 0, 0


def rss_mb(pid: int) -> float:
    """VmRSS summed over the process and all its descendants, in MB (10^6 bytes)."""
    total_kib = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            total_kib += int(match.group(1))
    return total_kib * 1024 / 1e6


def open_fds(pid: int) -> int:
    """Open file descriptors summed over the process and all its descendants."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{member}/fd"))
    return total


# --------------------------------------------------------------------------- HTTP probes


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


@dataclass
class Response:
    """One HTTP/1.1 response as a client read it."""

    status: int
    headers: dict[str, str]  # names lower-cased; the last value of a repeated name
    body: bytes
    keep_alive: bool  # the server means to keep the connection


async def read_response(reader: asyncio.StreamReader, max_body: int = 1 << 24) -> Response:
    """Read one response: Content-Length, chunked or close-delimited. Raises
    asyncio.IncompleteReadError when the connection ends before the response does."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, _, fields = head.partition("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
    status = int(parts[1])
    headers = {}
    for line in fields.split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    keep_alive = "close" not in headers.get("connection", "").lower()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        pieces = []
        while size := int((await reader.readline()).split(b";")[0], 16):
            pieces.append((await reader.readexactly(size + 2))[:-2])
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # trailers
        body = b"".join(pieces)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif status in (204, 304) or status < 200:
        body = b""
    else:
        body = await reader.read(max_body)  # close-delimited
        keep_alive = False
    return Response(status, headers, body, keep_alive)


def wait_ready(
    proc: subprocess.Popen[bytes], url: str, timeout: float = READY_TIMEOUT
) -> str | None:
    """Poll url until it answers 200. Returns None when ready, else why not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            status, _ = http_get(url, timeout=1.0)
            if status == 200:
                return None
            last = f"HTTP {status}"
        except (OSError, ValueError) as exc:
            last = exc.__class__.__name__
        time.sleep(0.1)
    return f"not ready after {timeout:.0f}s ({last})"


# --------------------------------------------------------------------------- harness


def laneswitch_argv(override: str | None, config: Path) -> list[str]:
    """Default: `python -m proxy run -c FILE`. An override may hold {config}, else gets -c FILE."""
    if not override:
        return [sys.executable, "-m", "proxy", "run", "-c", str(config)]
    if "{config}" in override:
        return shlex.split(override.replace("{config}", shlex.quote(str(config))))
    return [*shlex.split(override), "-c", str(config)]


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous: dict[int, Callable[..., object] | int | None] = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
