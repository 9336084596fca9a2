"""The web console (SPEC §10) in a real headless Chromium, against a real `laneswitch run`
process with real upstreams and traffic flowing through it.

Debian's `chromium` is driven with Playwright's Python API pointed at the system browser
(`executable_path`): nothing is downloaded. Screenshots go to pytest's tmp_path;
`LANESWITCH_UPDATE_SCREENSHOT=1` also writes `docs/console.png`, the picture in docs/console.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, Request, async_playwright, expect

from tests.helpers import (
    ROOT,
    Member,
    RecordingUpstream,
    Responder,
    Traffic,
    admin_call,
    running_fleet,
    version_responder,
)

pytestmark = pytest.mark.timeout(240)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "console-test-token-5b1f"
# Set a flag if it ever runs; inserted as text it is only characters.
XSS = "<img src=x onerror=window.__xss=1>"

CONFIG = """
listen: 127.0.0.1:DATA_PORT
admin: {listen: "127.0.0.1:ADMIN_PORT"ADMIN_EXTRA}
drain_timeout: 1s
services:
  shop:
    versions:
      blue: {endpoints: ["BLUE"], weight: 100, revision: "1.0.0"}
      green: {endpoints: ["GREEN"], weight: 0, revision: "REVISION"}
    version_header: X-App-Version
    rollout:
      strategy: canary
      stable: blue
      canary: green
      step_weights: [10, 25, 50]
      interval: INTERVAL
      threshold: 2
      min_requests: 5
      promotion: manual
      metrics:
        success_rate: {min: 95}
        latency_p99: {max: 500ms}
        success_rate_vs_stable: {max_drop: 3}
      webhooks:
        - {name: "HOOK_NAME", type: pre-rollout, url: "http://HOOK/hooks"}
"""


@dataclass
class Console:
    """A running proxy, the traffic through it, and a browser to open its console with."""

    member: Member
    browser: Browser
    tmp: Path
    token: str | None
    pages: list[ConsolePage] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.member.admin}/"

    async def call(self, method: str, path: str, body: object = None) -> tuple[int, dict]:  # type: ignore[type-arg]
        return await admin_call(self.member.admin_port, method, path, body, token=self.token)

    async def status(self) -> dict[str, Any]:
        code, body = await self.call("GET", "/status")
        assert code == 200, body
        return body

    async def open(self, width: int = 1280, height: int = 800) -> ConsolePage:
        context = await self.browser.new_context(viewport={"width": width, "height": height})
        page = await context.new_page()
        watched = ConsolePage(page, self.member.admin)
        # Record CSP violations from the start (init scripts are not subject to the page's CSP).
        await page.add_init_script(
            "window.__csp = [];"
            "document.addEventListener('securitypolicyviolation',"
            " (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
        )
        page.on("console", watched.on_console)
        page.on("pageerror", lambda exc: watched.errors.append(f"pageerror: {exc}"))
        page.on("request", lambda request: watched.requests.append(request))
        response = await page.goto(self.url)
        assert response is not None and response.status == 200
        watched.headers = await response.all_headers()
        self.pages.append(watched)
        return watched


@dataclass
class ConsolePage:
    page: Page
    origin: str
    errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def unexpected_errors(self, *allowed_statuses: int) -> list[str]:
        """Console errors, except Chromium's own line for an API answer of an allowed status
        (a 401 before the token is typed, a 409 the page shows)."""
        allowed = tuple(f"status of {code}" for code in allowed_statuses)
        return [text for text in self.errors if not any(a in text for a in allowed)]

    async def csp_violations(self) -> list[str]:
        return list(await self.page.evaluate("window.__csp"))

    async def no_scroll_x(self) -> tuple[int, int]:
        found = await self.page.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        return int(found[0]), int(found[1])

    def version_row(self, version: str) -> Any:
        return self.page.locator(f'.vrow[data-version="{version}"]')

    async def weight_text(self, version: str) -> str:
        return str(await self.version_row(version).locator(".wlabel").first.text_content())

    def button(self, name: str) -> Any:
        return self.page.get_by_role("button", name=name, exact=True)

    async def act(self, name: str) -> None:
        """Click an action's button and confirm it in the page's dialog."""
        await self.button(name).click()
        dialog = self.page.get_by_role("dialog")
        await expect(dialog).to_be_visible()
        confirm = dialog.get_by_role("button", name=f"Confirm: {name}", exact=True)
        await expect(confirm).to_be_enabled()
        await confirm.click()

    async def points(self, chart: str, version: str) -> int:
        path = self.page.locator(f'svg[data-chart="{chart}"] path.series[data-version="{version}"]')
        return int(await path.get_attribute("data-points") or 0)


def write_config(
    path: Path,
    blue: str,
    green: str,
    hook: str,
    *,
    token: str | None,
    revision: str = "2.0.0",
    hook_name: str = "smoke-test",
    interval: str = "2s",
) -> Path:
    text = CONFIG
    for key, value in {
        "ADMIN_EXTRA": f", token: {token}" if token else "",
        "BLUE": blue,
        "GREEN": green,
        "HOOK_NAME": hook_name,
        "HOOK": hook,
        "REVISION": revision,
        "INTERVAL": interval,
    }.items():
        text = text.replace(key, value)
    path.write_text(text)
    return path


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Debian's chromium, headless, driven by Playwright (no browser download)."""
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing (apt-get install chromium)"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def running_console(
    tmp: Path,
    *,
    token: str | None = None,
    green: Responder | None = None,
    **options: str,
) -> AsyncIterator[Console]:
    """Upstreams blue and green, a webhook receiver, `laneswitch run` in front of them with
    traffic flowing through it, and a browser."""
    blue_upstream = await RecordingUpstream("blue", version_responder("blue")).start()
    green_upstream = await RecordingUpstream("green", green or version_responder("green")).start()
    hooks = await RecordingUpstream("hooks").start()
    config = write_config(
        tmp / "console.yaml",
        blue_upstream.endpoint,
        green_upstream.endpoint,
        hooks.endpoint,
        token=token,
        **options,
    )
    member = Member("console", config)
    traffic: Traffic | None = None
    try:
        await member.start()
        traffic = Traffic(member.data_port, pause=0.01).start()
        async with chromium() as browser:
            yield Console(member, browser, tmp, token)
    finally:
        if traffic is not None:
            await traffic.stop()
        await member.stop()
        for upstream in (blue_upstream, green_upstream, hooks):
            await upstream.stop()


async def wait_status(console: Console, check: Any, timeout: float = 20.0) -> dict[str, Any]:
    """The first /status for which `check(status)` holds (bounded)."""
    async with asyncio.timeout(timeout):
        while True:
            status = await console.status()
            if check(status):
                return status
            await asyncio.sleep(0.1)


def assert_same_origin_only(page: ConsolePage, token: str | None) -> None:
    """Every request the page made went to the admin origin; the token never in a URL."""
    assert page.requests, "the page made no requests"
    for request in page.requests:
        assert request.url.startswith(page.origin + "/"), request.url
        if token:
            assert token not in request.url


async def test_page_loads_clean_in_read_view_and_its_charts_grow(tmp_path: Path) -> None:
    async with running_console(tmp_path) as console:
        page = await console.open()
        # The page's own headers: CSP without inline anything, no sniffing.
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        assert page.headers["x-content-type-options"] == "nosniff"
        for asset in ("/console/console.js", "/console/console.css"):
            response = await page.page.request.get(console.member.admin + asset)
            assert response.status == 200
            assert response.headers["x-content-type-options"] == "nosniff"
            assert "default-src 'self'" in response.headers["content-security-policy"]

        await expect(page.version_row("blue")).to_be_visible()
        await expect(page.version_row("green")).to_be_visible()
        await expect(page.version_row("green").locator(".revision")).to_have_text("2.0.0")
        await expect(page.version_row("blue").locator(".wlabel").first).to_have_text(
            "weight 100 % (100)"
        )
        # Opened without a token where the API allows reads: the read view, no actions.
        await expect(page.page.get_by_text("read view: no actions")).to_be_visible()
        await expect(page.button("Rollback shop")).to_have_count(0)
        assert await page.page.locator('button[aria-label="Rollback shop"]').count() == 1

        # The rate chart gets new points while traffic flows (a row every 2 s).
        await expect(page.page.locator('path.series[data-version="blue"]').first).to_be_attached()
        before = await page.points("rps", "blue")
        async with asyncio.timeout(15):
            while await page.points("rps", "blue") < before + 2:
                await asyncio.sleep(0.2)

        # No threshold lines while no rollout runs; the running rollout's lines once it does.
        assert await page.page.locator("line.limit").count() == 0
        code, body = await console.call("POST", "/services/shop/rollout/start")
        assert code == 200, body
        await expect(page.page.locator('svg[data-chart="success"] line.limit')).to_have_count(1)
        await expect(page.page.locator('svg[data-chart="p99"] line.limit')).to_have_count(1)
        await expect(page.page.locator('svg[data-chart="success"] text.limit-label')).to_have_text(
            "green min 95 %"
        )
        await expect(page.page.locator(".stepper li[aria-current=step]")).to_be_visible()
        await expect(page.page.locator(".rollout .facts")).to_contain_text("next analysis in")
        await expect(page.page.locator(".timeline li .action").first).to_be_visible()

        for width, height in ((1280, 800), (390, 844)):
            sized = await console.open(width, height)
            await expect(sized.version_row("green")).to_be_visible()
            await expect(sized.page.locator(".stepper")).to_be_visible()
            shot = tmp_path / f"console-{width}x{height}.png"
            await sized.page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            scroll, client = await sized.no_scroll_x()
            assert scroll <= client, f"horizontal scroll at {width}px: {scroll} > {client}"

        for opened in console.pages:
            assert opened.unexpected_errors() == []
            assert await opened.csp_violations() == []
            assert_same_origin_only(opened, None)


async def test_the_token_is_asked_once_kept_in_the_tab_and_asked_again_on_401(
    tmp_path: Path,
) -> None:
    async with running_console(tmp_path, token=TOKEN) as console:
        page = await console.open()
        form = page.page.get_by_label("Token", exact=True)
        await expect(form).to_be_visible()
        await expect(page.version_row("blue")).to_have_count(0)

        # A wrong token: refused, and asked again.
        await form.fill("not-the-token")
        await page.page.get_by_role("button", name="Open the console").click()
        await expect(page.page.get_by_role("alert").first).to_contain_text(
            "The token was refused: invalid bearer token"
        )
        await expect(form).to_be_visible()

        await form.fill(TOKEN)
        await page.page.get_by_role("button", name="Open the console").click()
        await expect(page.version_row("green")).to_be_visible()
        await expect(form).to_be_hidden()
        await expect(page.button("Rollback shop")).to_be_visible()
        stored = await page.page.evaluate("sessionStorage.getItem('laneswitch.token')")
        assert stored == TOKEN
        assert await page.page.context.cookies() == []

        # Every data call after the login carried the token as a bearer header, only there.
        data_calls = [r for r in page.requests if "/console/" not in r.url and r.url != console.url]
        authorized = [r for r in data_calls if r.headers.get("authorization") == f"Bearer {TOKEN}"]
        assert len(authorized) >= 3  # /status, /events, /history at least
        assert_same_origin_only(page, TOKEN)
        for request in page.requests:
            assert "cookie" not in request.headers

        # The token is rotated on the proxy (a reload applies it at once): the page asks again.
        config = console.member.config
        config.write_text(config.read_text().replace(TOKEN, "rotated-token-0c2e"))
        console.member.signal(signal.SIGHUP)
        await expect(form).to_be_visible(timeout=10_000)
        await expect(page.page.get_by_role("alert").first).to_contain_text("The token was refused")
        assert await page.page.evaluate("sessionStorage.getItem('laneswitch.token')") is None

        assert page.unexpected_errors(401) == []
        assert await page.csp_violations() == []


async def test_actions_start_rollback_switch_and_a_refusal_shown_verbatim(tmp_path: Path) -> None:
    update = os.environ.get("LANESWITCH_UPDATE_SCREENSHOT") == "1"
    async with running_console(tmp_path, token=TOKEN) as console:
        page = await console.open()
        await page.page.get_by_label("Token", exact=True).fill(TOKEN)
        await page.page.get_by_role("button", name="Open the console").click()
        await expect(page.version_row("green")).to_be_visible()

        if update:
            # docs/console.md's picture: a minute of history on the charts before the run.
            async with asyncio.timeout(120):
                while await page.points("rps", "blue") < 30:
                    await asyncio.sleep(0.5)

        # Start: the rollout moves green to its first step.
        await page.act("Start shop")
        await expect(page.page.get_by_role("dialog")).to_be_hidden()
        await wait_status(console, lambda s: s["services"]["shop"]["rollout"]["step"] >= 2)
        await expect(page.page.locator(".stepper li[aria-current=step]")).to_be_visible()
        await expect(page.page.locator(".intervals li").first).to_be_visible()
        shot = tmp_path / "console-rollout.png"
        await page.page.screenshot(path=str(shot), full_page=True)
        if update:
            shutil.copy(shot, ROOT / "docs" / "console.png")

        # Pause and Resume: the phase follows.
        badge = page.page.locator(".badge")
        await page.act("Pause shop")
        await expect(badge).to_have_text("rollout paused")
        await page.act("Resume shop")
        await expect(badge).to_have_text("rollout progressing")

        # Rollback: the weights move in the page within 2 s of the confirmation.
        await page.button("Rollback shop").click()
        confirm = page.page.get_by_role("button", name="Confirm: Rollback shop", exact=True)
        await expect(confirm).to_be_enabled()
        clicked = time.monotonic()
        await confirm.click()
        await expect(page.version_row("green").locator(".wlabel").first).to_have_text(
            "weight 0 % (0)", timeout=2_000
        )
        await expect(page.version_row("blue").locator(".wlabel").first).to_have_text(
            "weight 100 % (100)", timeout=2_000
        )
        assert time.monotonic() - clicked < 2.5
        newest = page.page.locator(".timeline li").first
        await expect(newest.locator(".action")).to_have_text("rollback", timeout=2_000)
        await expect(newest.locator(".actor")).to_have_text("by admin")

        # Promote with no run: the API's 409 text, shown verbatim in the dialog.
        code, refusal = await console.call("POST", "/services/shop/rollout/promote")
        assert code == 409, refusal
        await page.act("Promote shop")
        alert = page.page.get_by_role("dialog").get_by_role("alert")
        await expect(alert.locator(".message")).to_have_text(refusal["error"])
        await expect(alert.locator(".code")).to_have_text("409: ")
        await page.page.get_by_role("button", name="Cancel").click()
        await expect(page.page.get_by_role("dialog")).to_be_hidden()

        # Switch: the dry run first, nothing changes until it is confirmed.
        await page.button("Switch shop").click()
        dialog = page.page.get_by_role("dialog")
        await expect(dialog.locator(".dryrun")).to_contain_text("after: blue 0 · green 100")
        weights = (await console.status())["services"]["shop"]["versions"]
        assert weights["green"]["weight"] == 0, "the dry run changed the weights"
        await dialog.get_by_role("button", name="Confirm: Switch shop", exact=True).click()
        await expect(page.version_row("green").locator(".wlabel").first).to_have_text(
            "weight 100 % (100)", timeout=2_000
        )
        await expect(page.page.locator(".timeline li .action").first).to_have_text("switch")

        # Weights: typed in the dialog, sent as a PUT.
        await page.button("Weights shop").click()
        await dialog.get_by_label("blue").fill("70")
        await dialog.get_by_label("green").fill("30")
        await dialog.get_by_role("button", name="Confirm: Weights shop", exact=True).click()
        await expect(page.version_row("green").locator(".wlabel").first).to_have_text(
            "weight 30 % (30)", timeout=2_000
        )

        # Abort a new run.
        await page.act("Start shop")
        await expect(badge).to_have_text("rollout progressing")
        await page.act("Abort shop")
        await expect(badge).to_have_text("rollout aborted")

        assert page.unexpected_errors(401, 409) == []
        assert await page.csp_violations() == []
        assert_same_origin_only(page, TOKEN)


async def test_names_and_reasons_are_text_never_markup(tmp_path: Path) -> None:
    async with running_console(tmp_path, revision=XSS, hook_name=XSS) as console:
        page = await console.open()
        await expect(page.version_row("green").locator(".revision")).to_have_text(XSS)
        # The webhook's name is in an event's reason (the pre-rollout check at the start).
        code, body = await console.call("POST", "/services/shop/rollout/start")
        assert code == 200, body
        reason = page.page.locator(".timeline .reason", has_text=XSS)
        await expect(reason.first).to_be_visible(timeout=10_000)
        # Let the page redraw twice more with the probe in it (each poll restamps the header).
        for _ in range(2):
            stamp = await page.page.locator("#conn").text_content()
            await expect(page.page.locator("#conn")).not_to_have_text(stamp or "")
        assert await page.page.evaluate("window.__xss") is None
        assert await page.page.locator("img").count() == 0
        assert page.unexpected_errors() == []
        assert await page.csp_violations() == []


async def test_a_failing_canary_shows_its_failed_checks_against_the_thresholds(
    tmp_path: Path,
) -> None:
    failing = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\nfail\n"
    async with running_console(tmp_path, green=lambda request: failing) as console:
        page = await console.open()
        await expect(page.version_row("green")).to_be_visible()
        code, body = await console.call("POST", "/services/shop/rollout/start")
        assert code == 200, body
        await wait_status(
            console, lambda s: s["services"]["shop"]["rollout"]["phase"] == "rolled_back"
        )
        await expect(page.page.locator(".badge")).to_have_text("rollout rolled_back")
        await expect(page.page.locator(".rollout .facts")).to_contain_text("failed checks 2 of 2")
        failed = page.page.locator(".analysis tr.failed", has_text="success rate")
        await expect(failed.locator("td").nth(0)).to_have_text("0 %")
        await expect(failed.locator("td").nth(1)).to_have_text("≥ 95 %")
        await expect(failed.locator("td").nth(2)).to_have_text("fail")
        await expect(page.page.locator(".intervals li").first).to_contain_text("fail (")
        newest = page.page.locator(".timeline li").first
        await expect(newest.locator(".action")).to_have_text("rollback")
        await expect(newest.locator(".actor")).to_have_text("by auto")
        assert page.unexpected_errors() == []


async def test_in_a_fleet_it_shows_members_leader_and_applied_generations(tmp_path: Path) -> None:
    async with running_fleet(tmp_path) as fleet, chromium() as browser:
        a, b = fleet.member("a"), fleet.member("b")
        await asyncio.gather(a.start(), b.start())
        traffic = Traffic(a.data_port, pause=0.02).start()
        try:
            console = Console(b, browser, tmp_path, None)
            status = await wait_status(console, lambda s: s["fleet"]["leader"] is not None)
            leader = status["fleet"]["leader"]
            page = await console.open()
            section = page.page.locator("#fleet")
            await expect(section).to_be_visible()
            await expect(section.locator("tbody tr")).to_have_count(2)
            await expect(section.locator(f'tr[data-member="{leader}"] .leader')).to_have_text(
                "leader"
            )

            # A change made through the page on one member: every member applies it, and the
            # page shows each member's applied generation move to the new one.
            await page.page.get_by_role("button", name="Operate: show the actions").click()
            await page.button("Weights shop").click()
            dialog = page.page.get_by_role("dialog")
            await dialog.get_by_label("blue").fill("40")
            await dialog.get_by_label("green").fill("60")
            await dialog.get_by_role("button", name="Confirm: Weights shop", exact=True).click()
            await expect(page.page.locator(".service .result")).to_contain_text("done")
            code, seen_by_a = await admin_call(a.admin_port, "GET", "/status")
            assert code == 200
            assert seen_by_a["services"]["shop"]["versions"]["green"]["weight"] == 60
            generation = seen_by_a["fleet"]["generation"]
            assert generation > status["fleet"]["generation"]
            for member in ("a", "b"):
                await expect(section.locator(f'tr[data-member="{member}"] .applied')).to_have_text(
                    str(generation)
                )
            await expect(page.version_row("green").locator(".wlabel").first).to_have_text(
                "weight 60 % (60)"
            )
            await expect(page.page.locator(".timeline li .actor").first).to_contain_text(
                "by admin on b"
            )
            assert page.unexpected_errors() == []
            assert await page.csp_violations() == []
        finally:
            await traffic.stop()
