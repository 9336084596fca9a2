"""Webhooks keep their secrets: a hook URL's query string and userinfo, and what a hook answers,
never reach the decision record or the log; a POST hook's redirect is not followed (its payload
would go wherever the hook points)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from proxy.rollout.webhooks import redact
from tests.e2e.test_rollout import canary_config, phase_is, start, steady_load, two_upstreams
from tests.functional.test_admin import admin_proxy, until
from tests.helpers import raw_upstream, read_request_head

SECRET = "s3cr3t-hook-t0ken"
BODY_SECRET = "internal-db-password-hunter2"


async def test_hook_secrets_and_answers_stay_out_of_the_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stolen: list[bytes] = []

    async def thief(reader, writer) -> None:  # type: ignore[no-untyped-def]
        stolen.append(await read_request_head(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with raw_upstream(thief) as elsewhere:

        async def hook(reader, writer) -> None:  # type: ignore[no-untyped-def]
            head = await read_request_head(reader)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if b"/pre-rollout" in head:
                # A redirect to another host, with a secret of its own in the target.
                location = f"http://{elsewhere}/collect?token={SECRET}"
                writer.write(
                    f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\n"
                    "Content-Length: 0\r\n\r\n".encode()
                )
            else:
                body = f"error: cannot reach db with {BODY_SECRET}".encode()
                writer.write(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
            await writer.drain()

        async with raw_upstream(hook) as hook_address, two_upstreams() as (stable, canary):
            url = f"http://user:{SECRET}@{hook_address}"
            hooks = (
                f"[{{name: gate, type: pre-rollout, url: '{url}/pre-rollout?token={SECRET}',"
                f" timeout: 1s, retries: 0}},"
                f" {{name: notify, type: rollback, url: '{url}/rollback?token={SECRET}',"
                f" timeout: 1s, retries: 0}}]"
            )
            text = canary_config(stable.endpoint, canary.endpoint, threshold=1, webhooks=hooks)
            caplog.set_level(logging.INFO)
            async with admin_proxy(tmp_path, text) as proxy, steady_load(proxy.proxy_port):
                await start(proxy)
                await phase_is(proxy.server.control, "rolled_back")
                control = proxy.server.control

                def verdicts() -> list[str]:
                    return [e.reason for e in control.events.since(0) if e.action == "webhook"]

                # The rollback hook is called in the background: wait for its verdict.
                await until(lambda: any("rollback 'notify'" in r for r in verdicts()))
                record = json.dumps((await proxy.call("GET", "/events")).body)
                status = json.dumps((await proxy.call("GET", "/status")).body)
    assert stolen == []  # the redirect was not followed
    assert "HTTP 307" in record and "redirects are not followed" in record
    assert "HTTP 500" in record
    for text in (record, status, caplog.text):
        assert SECRET not in text
        assert BODY_SECRET not in text


def test_redact_cuts_every_url_to_scheme_host_and_path() -> None:
    text = (
        "InvalidUrlRedirectClientError: http://user:pw@hooks.example:8080/a/b?token=x#frag "
        "then https://h.example/c?d=e and 'http://h2.example/?q=1'"
    )
    assert redact(text) == (
        "InvalidUrlRedirectClientError: http://hooks.example:8080/a/b "
        "then https://h.example/c and 'http://h2.example/'"
    )
