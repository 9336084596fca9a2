"""The admin API refuses what a web page can make a browser send (SPEC §4, browser safety):
foreign origins, DNS-rebound host names without a token, bodies that are not JSON; and its
token rule holds for any header bytes and follows a reload at once.

Requests are written byte for byte on a raw loopback socket, so every header is exactly what a
browser (or an attacker's page) would send; "nothing changed" is read from the traffic the
upstreams see and from the proxy's own state.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.functional.test_admin import (
    TOKEN,
    AdminProxy,
    admin_proxy,
    blue_green,
    config_text,
    send,
)
from tests.helpers import Client, Response

SWITCH_BODY = b'{"to": "green"}'


async def raw_call(
    proxy: AdminProxy,
    method: str,
    path: str,
    *,
    host: str = "own",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> Response:
    """One request as these exact bytes; `host="own"` is the admin API's 127.0.0.1:port."""
    port = proxy.server.admin_port
    assert port is not None
    lines = [f"{method} {path} HTTP/1.1", f"Host: {f'127.0.0.1:{port}' if host == 'own' else host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    client = await Client.connect(port)
    try:
        return await client.request(head + body)
    finally:
        await client.close()


def error_of(response: Response) -> str:
    decoded: Any = json.loads(response.body)
    message = decoded["error"]
    assert isinstance(message, str)
    return message


# -- CSRF and DNS rebinding -----------------------------------------------------------------------


async def test_a_text_plain_post_from_a_foreign_page_does_not_switch(tmp_path: Path) -> None:
    """The reported attack: a page on evil.example, its name rebound to 127.0.0.1, posts a
    "simple" (no preflight) text/plain body to the tokenless admin API."""
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        port = proxy.server.admin_port
        attacks = [
            # The full attack: foreign Host and Origin, text/plain.
            {
                "host": f"evil.example:{port}",
                "origin": f"http://evil.example:{port}",
                "type": "text/plain",
            },
            # Each of the three rules alone refuses it.
            {"host": "own", "origin": None, "type": "text/plain"},
            {"host": "own", "origin": "http://evil.example", "type": "application/json"},
            {"host": f"evil.example:{port}", "origin": None, "type": "application/json"},
            {"host": "own", "origin": "null", "type": "application/json"},
            {"host": "own", "origin": None, "type": "application/x-www-form-urlencoded"},
        ]
        events = len(proxy.server.control.events)
        for attack in attacks:
            headers = {"Content-Type": str(attack["type"])}
            if attack["origin"] is not None:
                headers["Origin"] = str(attack["origin"])
            response = await raw_call(
                proxy,
                "POST",
                "/services/shop/switch",
                host=attack["host"],
                headers=headers,
                body=SWITCH_BODY,
            )
            expected = 415 if attack["origin"] is None and attack["host"] == "own" else 403
            assert response.status == expected, (attack, response.body)
            assert error_of(response)
        assert proxy.weights() == {"blue": 100, "green": 0}
        assert len(proxy.server.control.events) == events
        assert await send(proxy.proxy_port, 3) == {"blue": 3}


async def test_a_rebound_host_name_cannot_read_the_tokenless_api(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        for path in ("/status", "/events", "/metrics", "/nope"):
            response = await raw_call(proxy, "GET", path, host="evil.example")
            assert response.status == 403, (path, response.body)


@pytest.mark.parametrize(
    "host", ["own", "localhost:{port}", "LOCALHOST", "[::1]:{port}", "127.0.0.2:{port}"]
)
async def test_loopback_host_names_and_the_own_origin_are_served(tmp_path: Path, host: str) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        port = proxy.server.admin_port
        named = f"127.0.0.1:{port}" if host == "own" else host.format(port=port)
        assert (await raw_call(proxy, "GET", "/status", host=named)).status == 200
        # The console's own page: its origin is the Host it was loaded from.
        headers = {"Content-Type": "application/json; charset=utf-8", "Origin": f"http://{named}"}
        response = await raw_call(
            proxy, "POST", "/services/shop/switch", host=named, headers=headers, body=SWITCH_BODY
        )
        assert response.status == 200, (named, response.body)
        assert proxy.weights() == {"blue": 0, "green": 100}


async def test_body_less_calls_need_no_content_type(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        headers = {"Content-Type": "application/json"}
        switched = await raw_call(
            proxy, "POST", "/services/shop/switch", headers=headers, body=SWITCH_BODY
        )
        assert switched.status == 200, switched.body
        rolled_back = await raw_call(proxy, "POST", "/services/shop/rollback")
        assert rolled_back.status == 200, rolled_back.body
        assert proxy.weights() == {"blue": 100, "green": 0}
        # A body-less call with a foreign Origin is still a cross-site request.
        response = await raw_call(
            proxy, "POST", "/services/shop/rollback", headers={"Origin": "http://evil.example"}
        )
        assert response.status == 403


async def test_with_a_token_any_host_name_is_served(tmp_path: Path) -> None:
    """A token is what a rebinding page cannot have: with one, the Host rule is not needed
    (an admin API on a pod's address is reached under that address)."""
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint, token=TOKEN)) as proxy,
    ):
        auth = {"Authorization": f"Bearer {TOKEN}"}
        response = await raw_call(proxy, "GET", "/status", host="10.0.0.7:9901", headers=auth)
        assert response.status == 200
        no_token = await raw_call(proxy, "GET", "/status", host="10.0.0.7:9901")
        assert no_token.status == 401
        foreign = await raw_call(
            proxy, "GET", "/status", headers={**auth, "Origin": "http://evil.example"}
        )
        assert foreign.status == 403


# -- the token ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"Bearer \xff\xfe\xfd", b"Bearer s3cret-t\xc3\xb6ken", b"\xc3\xa9 " + TOKEN.encode()],
    ids=["not-utf8", "non-ascii", "non-ascii-scheme"],
)
async def test_an_authorization_header_of_any_bytes_is_a_401(tmp_path: Path, value: bytes) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint, token=TOKEN)) as proxy,
    ):
        port = proxy.server.admin_port
        assert port is not None
        head = (
            b"POST /services/shop/switch HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Authorization: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (port, value, len(SWITCH_BODY))
        )
        client = await Client.connect(port)
        try:
            response = await client.request(head + SWITCH_BODY)
        finally:
            await client.close()
        assert response.status == 401, response.body
        assert error_of(response) == "invalid bearer token"
        assert proxy.weights() == {"blue": 100, "green": 0}


async def test_a_reload_that_changes_the_token_applies_it_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    new_token = "n3w-t0ken-after-a-leak"
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint, token=TOKEN)) as proxy,
    ):
        caplog.set_level(logging.INFO)
        proxy.config_path.write_text(config_text(blue.endpoint, green.endpoint, token=new_token))
        reloaded = await proxy.call("POST", "/reload")
        assert reloaded.status == 200, reloaded.body
        old = await proxy.call("GET", "/status")
        assert old.status == 401
        assert (await proxy.call("GET", "/status", auth=f"Bearer {new_token}")).status == 200
        events = await proxy.call("GET", "/events", auth=f"Bearer {new_token}")
        reload_event = events.body["events"][-1]
        assert reload_event["action"] == "reload"
        assert "admin token changed" in reload_event["reason"]
        # The token is a secret: neither the old nor the new one is in the record or the log.
        assert TOKEN not in json.dumps(events.body)
        assert new_token not in json.dumps(events.body)
        assert TOKEN not in caplog.text and new_token not in caplog.text
        # Removing the token opens the API to loopback callers only.
        proxy.config_path.write_text(config_text(blue.endpoint, green.endpoint))
        assert (await proxy.call("POST", "/reload", auth=f"Bearer {new_token}")).status == 200
        assert (await proxy.call("GET", "/status", auth=None)).status == 200
        rebound = await raw_call(proxy, "GET", "/status", host="evil.example")
        assert rebound.status == 403
