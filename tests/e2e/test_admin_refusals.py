"""Changes the admin API refuses because of the moment they arrive: during the drain at
shutdown (503, the state file has had its last word), and a switch to a version whose last
healthy endpoint went down while the call waited for the control lock (409)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp

from tests.functional.test_admin import admin_proxy, blue_green, config_text, send, until
from tests.helpers import raw_upstream, read_request_head, start_laneswitch, wait_for_line


async def test_changes_during_the_drain_at_shutdown_are_refused(tmp_path: Path) -> None:
    arrived = asyncio.Event()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        arrived.set()
        await asyncio.sleep(60)

    async with raw_upstream(never_answers) as slow, blue_green() as (_, green):
        config = tmp_path / "laneswitch.yaml"
        config.write_text(
            config_text(slow, green.endpoint, blue_weight=100).replace(
                "drain_timeout: 5s", "drain_timeout: 30s"
            )
        )
        proxy = await start_laneswitch(config)
        try:
            # A request in flight keeps the drain going while the calls below are made.
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            await asyncio.wait_for(arrived.wait(), 5)
            proxy.process.send_signal(signal.SIGTERM)
            await wait_for_line(proxy.stderr, "draining")
            async with aiohttp.ClientSession() as session:
                url = proxy.admin_url
                async with session.get(f"{url}/readyz") as answer:
                    assert answer.status == 503
                calls = [
                    ("POST", "/services/shop/switch", {"to": "green"}),
                    ("PUT", "/services/shop/weights", {"weights": {"blue": 50, "green": 50}}),
                    ("POST", "/services/shop/rollback", None),
                    ("POST", "/reload", None),
                ]
                for method, path, body in calls:
                    async with session.request(method, url + path, json=body) as answer:
                        assert answer.status == 503, (path, await answer.text())
                        assert "shutting down" in (await answer.json())["error"]
                async with session.get(f"{url}/status") as answer:
                    status = await answer.json()
            assert status["draining"] is True
            assert status["services"]["shop"]["versions"]["blue"]["weight"] == 100
            writer.close()
        finally:
            if proxy.process.returncode is None:
                proxy.process.send_signal(signal.SIGTERM)  # the second signal: stop now
            assert await asyncio.wait_for(proxy.process.wait(), 15) == 0


async def test_a_switch_reads_health_when_it_is_made_not_before_it_waits(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        control = proxy.server.control
        lock = control._lock
        # Another change holds the control lock (a reload, a rollout step) ...
        await lock.acquire()
        try:
            call = asyncio.ensure_future(
                proxy.call("POST", "/services/shop/switch", {"to": "green"})
            )
            await until(lambda: bool(getattr(lock, "_waiters", None)))
            # ... and while the switch waits for it, green's only endpoint goes down.
            control.set_health({("shop", "green", green.endpoint)})
        finally:
            lock.release()
        answer = await asyncio.wait_for(call, 5)
        assert answer.status == 409, answer.body
        assert "no healthy endpoint" in answer.error
        assert proxy.weights() == {"blue": 100, "green": 0}
        assert await send(proxy.proxy_port, 3) == {"blue": 3}
