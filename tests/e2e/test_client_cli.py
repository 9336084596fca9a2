"""End to end: `laneswitch status/switch/weights/rollback` run in their own process, as an
operator runs them, against the admin API of a proxy started by the test."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

from tests.functional.test_admin import (
    HEALTH,
    TOKEN,
    AdminProxy,
    admin_proxy,
    blue_green,
    config_text,
    free_port,
    send,
)
from tests.helpers import ROOT, RecordingUpstream, laneswitch_command, spawn_laneswitch


def client_env(**overrides: str) -> dict[str, str]:
    """The test's environment without any admin settings of the person running it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANESWITCH_ADMIN")}
    env.update(overrides)
    return env


async def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, str, str]:
    process = await spawn_laneswitch(
        *args, env=env if env is not None else client_env(), stdout=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def admin(proxy: AdminProxy, *args: str) -> tuple[int, str, str]:
    """A client command pointed at `proxy` with --admin (and the token, if it has one)."""
    env = client_env(LANESWITCH_ADMIN_TOKEN=proxy.token) if proxy.token else client_env()
    return await run_cli(*args, "--admin", proxy.admin_url, env=env)


# -- status ---------------------------------------------------------------------------------------


async def test_status_prints_a_table_of_every_version(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint, blue_weight=75)) as proxy,
    ):
        assert await send(proxy.proxy_port, 8) == {"blue": 6, "green": 2}
        await proxy.call("PUT", "/services/shop/weights", {"weights": {"blue": 90, "green": 10}})
        code, out, err = await admin(proxy, "status")
        assert code == 0, err
        lines = out.splitlines()
        assert "ready" in lines[0] and proxy.admin_url in lines[0]
        header = next(line for line in lines if line.startswith("SERVICE"))
        assert header.split() == [
            "SERVICE",
            "VERSION",
            "WEIGHT",
            "HEALTHY",
            "IN-FLIGHT",
            "REQ/60s",
            "SUCCESS",
            "P99",
        ]
        blue_row = r"^shop\s+blue\s+\[#{18}-{2}\] 90%\s+1/1\s+0\s+6\s+100%\s+[\d.]+ms$"
        green_row = r"^\s+green\s+\[#{2}-{18}\] 10%\s+1/1\s+0\s+2\s+100%\s+[\d.]+ms$"
        assert any(re.match(blue_row, line) for line in lines), out
        assert any(re.match(green_row, line) for line in lines), out
        assert any(re.match(r"^\s+last decision: #1 weights by admin at ", line) for line in lines)


async def test_status_json_is_the_admin_status(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        code, out, err = await admin(proxy, "status", "--json")
        assert code == 0, err
        printed = json.loads(out)
        served = (await proxy.call("GET", "/status")).body
        assert printed["services"] == served["services"]
        assert printed["config"] == served["config"]


async def test_status_reads_the_admin_url_and_token_from_the_environment(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint, token=TOKEN)) as proxy,
    ):
        env = client_env(LANESWITCH_ADMIN=proxy.admin_url, LANESWITCH_ADMIN_TOKEN=TOKEN)
        code, out, err = await run_cli("status", env=env)
        assert code == 0, err
        assert re.search(r"^shop\s+blue\s", out, re.MULTILINE)

        code, out, err = await run_cli("status", env=client_env(LANESWITCH_ADMIN=proxy.admin_url))
        assert code == 1
        assert out == ""
        assert "refused (401)" in err and "LANESWITCH_ADMIN_TOKEN" in err

        wrong = client_env(LANESWITCH_ADMIN=proxy.admin_url, LANESWITCH_ADMIN_TOKEN="nope")
        code, _, err = await run_cli("switch", "shop", "green", env=wrong)
        assert code == 1
        assert "refused (401)" in err
        assert proxy.weights() == {"blue": 100, "green": 0}


async def test_status_watch_redraws_until_interrupted(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        process = await asyncio.create_subprocess_exec(
            *laneswitch_command(),
            "status",
            "--watch",
            "--admin",
            proxy.admin_url,
            cwd=ROOT,
            env=client_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        frames = 0
        seen_green_at_100 = False
        async with asyncio.timeout(15):
            while frames < 3:
                line = (await process.stdout.readline()).decode()
                assert line, "status --watch ended on its own"
                if re.match(r"^\s+green\s+\[#{20}\] 100%", line):
                    seen_green_at_100 = True
                if "Ctrl-C to stop" in line:
                    frames += 1
                    if frames == 1:  # a change between frames shows in the next one
                        await proxy.call("POST", "/services/shop/switch", {"to": "green"})
        assert seen_green_at_100
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 10)
        assert process.returncode == 0, err.decode()
        assert "Traceback" not in err.decode()


# -- switch, weights, rollback --------------------------------------------------------------------


async def test_switch_moves_traffic_and_dry_run_does_not(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint, token=TOKEN)) as proxy,
    ):
        code, out, err = await admin(proxy, "switch", "shop", "green", "--dry-run")
        assert code == 0, err
        assert "dry run" in out and "nothing changed" in out
        assert proxy.weights() == {"blue": 100, "green": 0}

        code, out, err = await admin(proxy, "switch", "shop", "green")
        assert code == 0, err
        assert out.strip() == "shop: switch to green: blue=0 green=100 (was blue=100 green=0)"
        assert await send(proxy.proxy_port, 3) == {"green": 3}
        [event] = proxy.server.control.events.since(0)
        assert (event.actor, event.action) == ("admin", "switch")


async def test_switch_refusals_exit_1_with_the_reason(tmp_path: Path) -> None:
    blue = await RecordingUpstream("blue").start()
    dead = f"127.0.0.1:{free_port()}"
    try:
        async with admin_proxy(
            tmp_path, config_text(blue.endpoint, dead, service_extra=HEALTH)
        ) as proxy:
            code, out, err = await admin(proxy, "switch", "shop", "purple")
            assert code == 1
            assert out == ""
            assert (
                err.strip() == "laneswitch: refused (404): service 'shop' has no version 'purple'"
            )

            code, out, err = await admin(proxy, "switch", "nope", "green")
            assert code == 1
            assert "refused (404)" in err and "nope" in err

            code, out, err = await admin(proxy, "switch", "shop", "green")
            assert code == 1
            assert "refused (409)" in err and "healthy" in err
            assert proxy.weights() == {"blue": 100, "green": 0}

            code, out, err = await admin(proxy, "switch", "shop", "green", "--force")
            assert code == 0, err
            assert proxy.weights() == {"blue": 0, "green": 100}
    finally:
        await blue.stop()


async def test_weights_set_the_split_and_bad_ones_are_refused(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        code, out, err = await admin(proxy, "weights", "shop", "blue=25", "green=75")
        assert code == 0, err
        assert out.strip() == "shop: weights: blue=25 green=75 (was blue=100 green=0)"
        assert await send(proxy.proxy_port, 8) == {"blue": 2, "green": 6}

        code, out, err = await admin(proxy, "weights", "shop", "blue=50", "green=10")
        assert code == 1
        assert "refused (400)" in err and "sum" in err
        code, _, err = await admin(proxy, "weights", "shop", "blue=50", "purple=50")
        assert code == 1
        assert "refused (404)" in err and "purple" in err
        code, _, err = await admin(proxy, "weights", "shop", "blue")
        assert code == 2
        assert "VERSION=N" in err
        code, _, err = await admin(proxy, "weights", "shop", "blue=50", "blue=50")
        assert code == 2
        assert "twice" in err
        assert proxy.weights() == {"blue": 25, "green": 75}


async def test_rollback_undoes_the_last_change(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint, blue_weight=80)) as proxy,
    ):
        code, out, err = await admin(proxy, "rollback", "shop")
        assert code == 0, err  # nothing to undo: "no change", never refused
        assert out.strip() == "shop: rollback: no change (blue=80 green=20)"

        await proxy.call("POST", "/services/shop/switch", {"to": "green"})
        code, out, err = await admin(proxy, "rollback", "shop")
        assert code == 0, err
        assert out.strip() == "shop: rollback: blue=80 green=20 (was blue=0 green=100)"
        assert proxy.weights() == {"blue": 80, "green": 20}
        assert await send(proxy.proxy_port, 5) == {"blue": 4, "green": 1}


# -- an admin API that is not there ---------------------------------------------------------------


async def test_unreachable_admin_is_one_clear_line_and_exit_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (
        ("status",),
        ("status", "--json"),
        ("switch", "shop", "green"),
        ("weights", "shop", "blue=100"),
        ("rollback", "shop"),
    ):
        code, out, err = await run_cli(*args, "--admin", url)
        assert code == 1, args
        assert out == ""
        [line] = err.splitlines()
        assert line.startswith(f"laneswitch: cannot reach the admin API at {url}: "), line
        assert "refused" in line.lower()  # the reason: connection refused


async def test_the_default_admin_url_comes_from_the_environment() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = await run_cli("status", env=client_env(LANESWITCH_ADMIN=url))
    assert code == 1
    assert f"cannot reach the admin API at {url}" in err
