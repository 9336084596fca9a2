"""The console's routes without a browser: which paths are public, the headers they carry, the
files the package ships, and markup and script rules a browser test would only catch by
accident (no inline script or style, no HTML sinks)."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path

from proxy.admin.console import ASSETS, CONSOLE_PATHS
from tests.functional.test_admin import TOKEN, admin_proxy, blue_green, config_text
from tests.functional.test_admin_browser_safety import raw_call
from tests.helpers import ROOT

STATIC = ROOT / "proxy" / "admin" / "static"


async def test_the_page_and_its_assets_need_no_token_and_carry_the_security_headers(
    tmp_path: Path,
) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint, token=TOKEN)) as proxy,
    ):
        for path, (name, content_type) in ASSETS.items():
            response = await raw_call(proxy, "GET", path)
            assert response.status == 200, path
            assert response.body == (STATIC / name).read_bytes()
            assert response.header("Content-Type") == content_type.encode()
            csp = response.header("Content-Security-Policy") or b""
            assert csp.startswith(b"default-src 'self'"), path
            assert response.header("X-Content-Type-Options") == b"nosniff"
        # Only the listed assets are public; the data behind the page still needs the token.
        for path in ("/status", "/events", "/history?service=shop", "/console/other.js"):
            response = await raw_call(proxy, "GET", path)
            assert response.status == 401, path
        response = await raw_call(
            proxy, "GET", "/console/other.js", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert response.status == 404


async def test_without_a_token_the_page_is_served_on_loopback_names_only(tmp_path: Path) -> None:
    async with (
        blue_green() as (blue, green),
        admin_proxy(tmp_path, config_text(blue.endpoint, green.endpoint)) as proxy,
    ):
        assert (await raw_call(proxy, "GET", "/")).status == 200
        rebound = await raw_call(proxy, "GET", "/", host="attacker.example:9901")
        assert rebound.status == 403


def test_every_static_file_is_package_data_and_every_asset_exists() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["proxy.admin"]
    files = sorted(path.relative_to(STATIC.parent).as_posix() for path in STATIC.iterdir())
    assert files
    for name in files:
        assert any(fnmatch(name, pattern) for pattern in patterns), f"{name} is not shipped"
    for name, _ in ASSETS.values():
        assert (STATIC / name).is_file(), name
    assert frozenset(ASSETS) == CONSOLE_PATHS


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.problems.append("inline <script>")
        if tag == "style":
            self.problems.append("<style> element")
        for name in names:
            if name == "style" or name.startswith("on"):
                self.problems.append(f"{name}= on <{tag}>")


def test_the_page_has_no_inline_script_or_style() -> None:
    parser = _Markup()
    parser.feed((STATIC / "index.html").read_text())
    assert parser.problems == []


def test_the_script_has_no_html_sinks() -> None:
    script = (STATIC / "console.js").read_text()
    code = re.sub(r"//.*", "", script)  # the header comment names the sinks it avoids
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in code, sink
    assert '.setAttribute("style"' not in code and "cssText" not in code
