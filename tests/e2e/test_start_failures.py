"""A start that cannot succeed (a port already taken, a bad config file) is one clear line and a
non-zero exit, with nothing left running and no traceback or asyncio warnings: `laneswitch demo`
and `laneswitch run`, each run as a user runs it, in its own process."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port, redis_server, run_cli

# What a failed start must never print.
NOISE = ("Traceback", "Unclosed", "Task was destroyed", "Task exception was never retrieved")
# The proxy's own log lines (`run` logs its start-up; the error line is the one without a time).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port with a real listening socket on it (as another program would hold it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def refused(port: int) -> bool:
    """Nothing listens on `port` (a connect is refused)."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def assert_clean(err: str) -> list[str]:
    """No traceback or asyncio warning; the lines that are not log lines."""
    for noise in NOISE:
        assert noise not in err, err
    return [line for line in err.splitlines() if line and not LOG_LINE.match(line)]


@pytest.mark.parametrize("taken", ["--port", "--admin-port"])
async def test_demo_on_a_taken_port_says_which_and_how_to_pick_others(taken: str) -> None:
    with taken_port() as port:
        other = free_port()
        ports = {"--port": other, "--admin-port": other, taken: port}
        started = time.monotonic()
        code, out, err = await run_cli(
            "demo", "--port", str(ports["--port"]), "--admin-port", str(ports["--admin-port"])
        )
        assert time.monotonic() - started < 20
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    what = "the proxy" if taken == "--port" else "the admin API"
    assert lines[0].startswith(f"laneswitch demo: port {port} ({what}) is already in use; "), err
    assert "--port" in lines[0] and "--admin-port" in lines[0] and "0 = any free port" in lines[0]
    assert_clean(err)
    # The admin API starts before the proxy's listener: it was stopped again, not left behind.
    assert refused(other)


async def test_run_on_a_taken_data_port_is_one_line_naming_the_field(tmp_path: Path) -> None:
    with taken_port() as port:
        config = tmp_path / "laneswitch.yaml"
        config.write_text(one_service(listen=f"127.0.0.1:{port}", admin="127.0.0.1:0"))
        code, _, err = await run_cli("run", "-c", str(config))
    assert code == 1
    assert assert_clean(err) == [
        f"laneswitch: cannot start: listen 127.0.0.1:{port}: Address already in use "
        f"(stop what listens there, or change `listen` in {config})"
    ]


async def test_run_on_a_taken_admin_port_is_one_line_naming_the_field(tmp_path: Path) -> None:
    with taken_port() as port:
        config = tmp_path / "laneswitch.yaml"
        config.write_text(one_service(listen="127.0.0.1:0", admin=f"127.0.0.1:{port}"))
        code, _, err = await run_cli("run", "-c", str(config))
    assert code == 1
    assert assert_clean(err) == [
        f"laneswitch: cannot start: admin.listen 127.0.0.1:{port}: Address already in use "
        f"(stop what listens there, or change `admin.listen` in {config})"
    ]


async def test_a_fleet_member_on_a_taken_port_leaves_the_fleet_and_exits(tmp_path: Path) -> None:
    # It had joined the fleet (and taken the lease) before its data listener failed: it stops
    # its fleet tasks (cancelling again a cancel that redis-py's wait_for dropped) and exits.
    async with redis_server() as redis:
        with taken_port() as port:
            config = tmp_path / "laneswitch.yaml"
            fleet = f'fleet: {{redis: "{redis.url}", name: shop, member: m1, lease: 2s}}\n'
            config.write_text(fleet + one_service(listen=f"127.0.0.1:{port}", admin="127.0.0.1:0"))
            started = time.monotonic()
            code, _, err = await run_cli("run", "-c", str(config))
            assert time.monotonic() - started < 15
    assert code == 1
    assert assert_clean(err) == [
        f"laneswitch: cannot start: listen 127.0.0.1:{port}: Address already in use "
        f"(stop what listens there, or change `listen` in {config})"
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\xff\xfe not text", "{path}: not UTF-8 text (invalid start byte at byte 0)"),
        (
            b"services:\n  shop:\n    versions:\n      v1: {endpoints: [127.0.0.1:9], weight: x}\n",
            "services.shop.versions.v1.weight: ",
        ),
    ],
)
async def test_run_with_a_bad_config_is_one_line(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    config = tmp_path / "laneswitch.yaml"
    config.write_bytes(content)
    code, _, err = await run_cli("run", "-c", str(config))
    assert code == 1
    lines = assert_clean(err)
    assert len(lines) == 1 and lines[0].startswith(expected.format(path=config)), err


def one_service(listen: str, admin: str) -> str:
    return f"""
listen: {listen}
admin: {{listen: {admin}}}
services:
  shop:
    versions:
      v1: {{endpoints: ["127.0.0.1:9"], weight: 100}}
"""
