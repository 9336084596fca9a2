"""End to end: the `laneswitch` command run as a user runs it, in its own process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from tests.helpers import (
    ROOT,
    Client,
    RecordingUpstream,
    get,
    raw_upstream,
    run_cli,
    spawn_laneswitch,
    wait_for_line,
)


async def test_check_accepts_the_default_config() -> None:
    code, out, err = await run_cli("check", "-c", "config/laneswitch.yaml")
    assert code == 0, err
    assert "shop" in out
    assert "valid" in out


async def test_check_rejects_a_bad_config_naming_every_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """
services:
  shop:
    versions:
      stable: {endpoints: ["127.0.0.1:9001"], weight: 110}
      canary: {endpoints: ["127.0.0.1:9002"], weight: -10, wieght: 3}
"""
    )
    code, out, err = await run_cli("check", "-c", str(bad))
    assert code == 1
    assert "services.shop.versions.canary.weight: must be >= 0" in err
    assert "services.shop.versions.canary.wieght: unknown key" in err
    assert out == ""


async def test_schema_prints_json_schema() -> None:
    code, out, _ = await run_cli("schema")
    assert code == 0
    schema = json.loads(out)
    assert {"listen", "services", "timeouts", "limits"} <= set(schema["properties"])


async def test_run_proxies_then_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    config = tmp_path / "laneswitch.yaml"
    config.write_text(
        f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
drain_timeout: 2s
services:
  shop:
    versions:
      blue: {{endpoints: ["{blue.endpoint}"], weight: 50}}
      green: {{endpoints: ["{green.endpoint}"], weight: 50}}
    version_header: X-App-Version
"""
    )
    process, port = await start_run(config)
    try:
        client = await Client.connect(port)
        versions = [(await client.request(get())).header("X-App-Version") for _ in range(10)]
        assert versions.count(b"blue") == 5 and versions.count(b"green") == 5
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        # An idle keep-alive client is closed by the drain.
        assert await client.closed()
        code = await asyncio.wait_for(process.wait(), 2 + 1)
        assert code == 0
        assert time.monotonic() - stopped_at < 3
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await blue.stop()
        await green.stop()


async def test_python_dash_m_proxy_is_the_same_program() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--help", cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    assert b"laneswitch" in out


async def test_demo_rolls_green_out_and_back_as_the_readme_says_and_stops_on_ctrl_c() -> None:
    # Free ports (0): the printed ones are the ones that answer; the first line is the console.
    process = await spawn_laneswitch(
        "demo", "--port", "0", "--admin-port", "0", stdout=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    logs = asyncio.create_task(process.stderr.read())  # a full pipe would stall the demo
    try:
        assert process.stdout is not None
        first = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
        console = re.fullmatch(
            r"laneswitch demo: the console is on http://127\.0\.0\.1:(\d+)/ .*\n", first
        )
        assert console is not None, first
        admin_port = int(console.group(1))
        line = await wait_for_line(process.stdout, r"blue and green behind")
        ports = re.search(
            r"http://127\.0\.0\.1:(\d+), admin API on http://127\.0\.0\.1:(\d+)", line
        )
        assert ports is not None, line
        port = int(ports.group(1))
        assert int(ports.group(2)) == admin_port
        assert 0 not in (port, admin_port)
        await wait_for_line(process.stdout, r"Ctrl-C")
        client = await Client.connect(port)
        bodies = {(await client.request(get())).body for _ in range(20)}
        assert b"blue\n" in bodies
        forced = await client.request(get(extra="X-Canary: green\r\n"))
        assert forced.body == b"green\n"
        await client.close()
        # The tour starts a canary rollout of green, judged on the demo's own traffic.
        await wait_for_line(process.stdout, r"act 1: rolling out green")
        admin = await Client.connect(admin_port)
        status = await admin.request(get("/status", host=f"127.0.0.1:{admin_port}"))
        await admin.close()
        rollout = json.loads(status.body)["services"]["shop"]["rollout"]
        assert rollout["strategy"] == "canary" and rollout["phase"] == "progressing"
        # As the README says: green is promoted, then, failing 30 %, rolled back by the proxy.
        await wait_for_line(process.stdout, r"act 1: promoted: all traffic to green", 60)
        line = await wait_for_line(process.stdout, r"act 2: ", 30)
        assert "rolling out green (failing 30% of its requests)" in line
        line = await wait_for_line(process.stdout, r"act 2: ", 60)
        assert line.startswith("[demo] act 2: rolled_back: all traffic back to blue"), line
        admin = await Client.connect(admin_port)
        status = await admin.request(get("/status", host=f"127.0.0.1:{admin_port}"))
        await admin.close()
        shop = json.loads(status.body)["services"]["shop"]
        assert shop["rollout"]["phase"] == "rolled_back"
        assert {name: v["weight"] for name, v in shop["versions"].items()} == {
            "blue": 100,
            "green": 0,
        }
        assert shop["last_decision"]["actor"] == "auto"
        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), 10)
        assert code == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await logs


async def test_sigterm_under_load_answers_every_in_flight_request(tmp_path: Path) -> None:
    arrived = 0
    all_arrived = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal arrived
        while True:
            await reader.readuntil(b"\r\n\r\n")
            arrived += 1
            if arrived == 10:
                all_arrived.set()
            await asyncio.sleep(0.5)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
            await writer.drain()

    async with raw_upstream(slow) as upstream:
        config = one_version_config(tmp_path, upstream, drain_timeout="3s")
        process, port = await start_run(config)
        try:
            clients = [await Client.connect(port) for _ in range(10)]
            for client in clients:
                await client.send(get())
            await asyncio.wait_for(all_arrived.wait(), 5)
            stopped_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            responses = await asyncio.gather(*(client.response() for client in clients))
            assert [r.status for r in responses] == [200] * 10
            assert all(r.header("Connection") == b"close" for r in responses)
            assert await asyncio.wait_for(process.wait(), 3 + 1) == 0
            assert time.monotonic() - stopped_at < 3 + 1
            await asyncio.gather(*(client.close() for client in clients))
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def one_version_config(tmp_path: Path, upstream: str, drain_timeout: str) -> Path:
    """A config file with one service whose only version is `upstream`."""
    config = tmp_path / "laneswitch.yaml"
    config.write_text(
        f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
drain_timeout: {drain_timeout}
services:
  shop:
    versions:
      v1: {{endpoints: ["{upstream}"], weight: 100}}
"""
    )
    return config


async def start_run(config: Path) -> tuple[asyncio.subprocess.Process, int]:
    """`laneswitch run -c config` and the data port it bound."""
    process = await spawn_laneswitch("run", "-c", str(config))
    assert process.stderr is not None
    line = await wait_for_line(process.stderr, r"listening on 127\.0\.0\.1:(\d+)")
    match = re.search(r"127\.0\.0\.1:(\d+)", line)
    assert match is not None
    return process, int(match.group(1))


async def test_sighup_reloads_the_config_file(tmp_path: Path) -> None:
    blue = await RecordingUpstream("blue").start()
    green = await RecordingUpstream("green").start()
    config = tmp_path / "laneswitch.yaml"
    template = f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
services:
  shop:
    versions:
      blue: {{endpoints: ["{blue.endpoint}"], weight: BLUE}}
      green: {{endpoints: ["{green.endpoint}"], weight: GREEN}}
    version_header: X-App-Version
"""
    config.write_text(template.replace("BLUE", "100").replace("GREEN", "000"))
    process, port = await start_run(config)
    try:
        client = await Client.connect(port)
        assert (await client.request(get())).header("X-App-Version") == b"blue"
        # Same size and the old mtime: the file watch cannot see this edit, only SIGHUP can.
        before = config.stat()
        config.write_text(template.replace("BLUE", "000").replace("GREEN", "100"))
        os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert config.stat().st_size == before.st_size
        process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(5):
            while (await client.request(get())).header("X-App-Version") != b"green":
                await asyncio.sleep(0.05)
        await client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        await blue.stop()
        await green.stop()


async def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    arrived = asyncio.Event()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        await asyncio.sleep(60)

    async with raw_upstream(never_answers) as upstream:
        config = one_version_config(tmp_path, upstream, drain_timeout="30s")
        process, port = await start_run(config)
        try:
            client = await Client.connect(port)
            await client.send(get())
            await asyncio.wait_for(arrived.wait(), 5)
            process.send_signal(signal.SIGTERM)
            assert process.stderr is not None
            # Two signals sent back to back are one pending signal: wait for the first.
            await wait_for_line(process.stderr, "draining")
            process.send_signal(signal.SIGTERM)
            # Well before the 30 s drain: the second signal does not wait for the request.
            assert await asyncio.wait_for(process.wait(), 5) == 0
            assert await client.closed()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
