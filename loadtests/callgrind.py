"""Instructions per request of `laneswitch run`, counted by valgrind's callgrind on loopback.

    python loadtests/callgrind.py [--laneswitch-cmd CMD] [--requests 2000] [--big-requests 200]
                                  [--connections 4] [--warmup 200]

One nginx upstream (127.0.0.1:19101) serves `GET /` (a few bytes) and `GET /big` (1 MiB); the
proxy runs under `valgrind --tool=callgrind` on 127.0.0.1:18180. After a warm-up the counters
are zeroed (`callgrind_control -z`), a bounded client sends the requests over a few keep-alive
connections, and the counters are dumped (`callgrind_control -d`): the instructions the proxy's
process executed in user space, divided by the requests. Kernel time is not counted, so the
figure compares two versions of the proxy, not a proxy with nginx. The count moves by less than
0.5 % from run to run, which wall-clock benchmarks on a shared machine cannot resolve.

`--laneswitch-cmd` runs another checkout (default: this one's `python -m proxy run`); the config
file is appended as `-c FILE` unless the command holds `{config}`. See loadtests/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import BIG_BYTES, HOST, nginx_argv, upstream_nginx_conf
from harness import (
    ProcessGroup,
    laneswitch_argv,
    log_tail,
    raise_nofile_limit,
    read_response,
    step,
    wait_ready,
)

# Ports apart from bench.py's, so the two can run side by side.
PROXY_PORT = 18180
ADMIN_PORT = 19951
UPSTREAM_PORT = 19101

# Valgrind runs the proxy some 50 times slower: its start and every request take longer.
READY_TIMEOUT = 120.0
RUN_TIMEOUT = 600.0
DUMP_TIMEOUT = 60.0

CONFIG = f"""\
listen: {HOST}:{PROXY_PORT}
admin: {{listen: {HOST}:{ADMIN_PORT}}}
services:
  app:
    versions:
      blue: {{endpoints: ["{HOST}:{UPSTREAM_PORT}"], weight: 100}}
"""


async def keep_alive_gets(path: str, requests: int, connections: int) -> int:
    """Send `requests` GETs of `path` over `connections` keep-alive connections, one request
    in flight on each; returns how many came back 200 with the whole body."""
    counts = [requests // connections + (i < requests % connections) for i in range(connections)]
    request = f"GET {path} HTTP/1.1\r\nHost: app\r\n\r\n".encode()

    async def one(count: int) -> int:
        reader, writer = await asyncio.open_connection(HOST, PROXY_PORT)
        ok = 0
        try:
            for _ in range(count):
                writer.write(request)
                response = await read_response(reader)
                ok += response.status == 200 and response.keep_alive
        finally:
            writer.close()
        return ok

    done = await asyncio.wait_for(
        asyncio.gather(*(one(c) for c in counts if c)), timeout=RUN_TIMEOUT
    )
    return sum(done)


def callgrind_control(option: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", option, str(pid)],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=DUMP_TIMEOUT,
    )


def dumped_instructions(out_dir: Path, seen: set[Path]) -> int:
    """The instruction count of the one dump written since `seen` was taken."""
    new = sorted(set(out_dir.glob("callgrind.out.*")) - seen)
    if len(new) != 1:
        raise RuntimeError(f"expected one new callgrind dump, found {[p.name for p in new]}")
    seen.add(new[0])
    for line in new[0].read_text(errors="replace").splitlines():
        match = re.match(r"(?:summary|totals):\s+(\d+)", line)
        if match:
            return int(match.group(1))
    raise RuntimeError(f"no instruction total in {new[0]}")


def measure(pid: int, out_dir: Path, path: str, requests: int, connections: int) -> float:
    """Instructions per request of `requests` GETs of `path`, counted from zeroed counters."""
    seen = set(out_dir.glob("callgrind.out.*"))
    callgrind_control("-z", pid)
    ok = asyncio.run(keep_alive_gets(path, requests, connections))
    callgrind_control("-d", pid)
    if ok != requests:
        raise RuntimeError(f"GET {path}: {requests - ok} of {requests} requests failed")
    return dumped_instructions(out_dir, seen) / requests


def run(args: argparse.Namespace, work: Path) -> dict[str, float]:
    nofile = raise_nofile_limit()
    www = work / "www"
    www.mkdir()
    (www / "big.bin").write_bytes(os.urandom(BIG_BYTES))
    config = work / "laneswitch.yaml"
    config.write_text(CONFIG)
    out_dir = work / "callgrind"
    out_dir.mkdir()
    with ProcessGroup() as procs:
        upstream_log = work / "upstream.log"
        upstream = procs.start(
            nginx_argv(work, "upstream", upstream_nginx_conf(work, "blue", UPSTREAM_PORT, nofile)),
            upstream_log,
        )
        why = wait_ready(upstream, f"http://{HOST}:{UPSTREAM_PORT}/", timeout=10.0)
        if why is not None:
            raise RuntimeError(f"upstream nginx did not start: {why}\n{log_tail(upstream_log)}")
        argv = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out_dir}/callgrind.out.%p",
            *laneswitch_argv(args.laneswitch_cmd, config),
        ]
        step(f"starting: {' '.join(argv)}")
        proxy_log = work / "proxy.log"
        proxy = procs.start(argv, proxy_log, cwd=work)  # imports come from the command, not here
        why = wait_ready(proxy, f"http://{HOST}:{PROXY_PORT}/", timeout=READY_TIMEOUT)
        if why is not None:
            raise RuntimeError(f"laneswitch did not start: {why}\n{log_tail(proxy_log)}")
        step(f"warm-up: {args.warmup} GET / and {args.warmup // 10} GET /big")
        asyncio.run(keep_alive_gets("/", args.warmup, args.connections))
        asyncio.run(keep_alive_gets("/big", max(1, args.warmup // 10), args.connections))
        results: dict[str, float] = {}
        step(f"GET /: {args.requests} requests over {args.connections} connections")
        results["GET /"] = measure(proxy.pid, out_dir, "/", args.requests, args.connections)
        step(f"GET /big: {args.big_requests} requests over {args.connections} connections")
        results["GET /big (1 MiB)"] = measure(
            proxy.pid, out_dir, "/big", args.big_requests, args.connections
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--laneswitch-cmd", help="command that runs laneswitch (default: here)")
    parser.add_argument("--requests", type=int, default=2000, help="counted GET / requests")
    parser.add_argument("--big-requests", type=int, default=200, help="counted GET /big")
    parser.add_argument("--connections", type=int, default=4, help="keep-alive connections")
    parser.add_argument("--warmup", type=int, default=200, help="GET / before counting")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"callgrind.py: not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="laneswitch-callgrind-") as tmp:
        results = run(args, Path(tmp))
    for name, per_request in results.items():
        print(f"{name}: {per_request / 1000:,.1f}k instructions / request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
