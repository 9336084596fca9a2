"""The web console's routes: `GET /` and its static assets, package data served as files.

The page and its assets hold no data, so they need no token (a browser navigation cannot send
a bearer header); every call the page makes for data goes through the API's token rule (SPEC
§10). They are served with `Content-Security-Policy: default-src 'self'`: the page has no inline
script or style, so a name or reason that slipped into the markup could still run nothing.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

# URL path -> (file in proxy/admin/static/, content type).
ASSETS: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console/console.css": ("console.css", "text/css; charset=utf-8"),
    "/console/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

# The paths the token check lets through (the page and its assets only, never data).
CONSOLE_PATHS = frozenset(ASSETS)

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # An upgraded laneswitch serves a new page and script together; never mix old and new.
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files("proxy.admin").joinpath("static", name).read_bytes()


def add_console_routes(app: web.Application) -> None:
    """Register `GET /` and the assets on `app`; the files are read once, here."""
    for path, (name, content_type) in ASSETS.items():
        body = _read(name)

        async def serve(
            request: web.Request, body: bytes = body, content_type: str = content_type
        ) -> web.Response:
            response = web.Response(body=body, headers=SECURITY_HEADERS)
            response.headers["Content-Type"] = content_type
            return response

        app.router.add_get(path, serve)
