"""Who may call the admin API: the bearer token and the browser-safety rules (SPEC §4).

The admin API is reachable from any web page an operator opens, so before any handler runs:
- a request whose `Origin` is not the admin API's own origin is refused (403): a foreign page
  can make a browser send a request, never one that carries this API's own origin;
- without a token, only requests whose `Host` names a loopback address are served (403
  otherwise): a DNS-rebinding page reaches 127.0.0.1 under its own host name;
- a mutating call with a body must say `Content-Type: application/json` (415 otherwise): the
  content types a page may send without a CORS preflight (text/plain, forms) are refused.

Every route of the admin app, present and future, passes through `browser_safety_middleware`;
routes need nothing of their own. The token and `metrics_public` live in one `AccessPolicy`
that a reload updates in place, so a changed token is in force for the next request.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.admin.console import CONSOLE_PATHS
from proxy.config.blocks import AdminConfig
from proxy.config.scalars import is_loopback_host

# Calls a load balancer or orchestrator makes without credentials, and the console's page and
# assets (they hold no data; a browser navigation cannot send a bearer header).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"}) | CONSOLE_PATHS

# Methods that change something; only these carry a body the API reads.
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

JSON = "application/json"

DEFAULT_PORTS = {"http": 80, "https": 443}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AccessPolicy:
    """The token and metrics rule in force; `configure` replaces them (at start and reload)."""

    __slots__ = ("expected", "metrics_public")

    def __init__(self, token: str | None, metrics_public: bool) -> None:
        self.expected: bytes | None = None
        self.metrics_public = False
        self.set(token, metrics_public)

    def set(self, token: str | None, metrics_public: bool) -> None:
        self.expected = f"Bearer {token}".encode() if token else None
        self.metrics_public = metrics_public

    def configure(self, admin: AdminConfig) -> None:
        self.set(admin.token, admin.metrics_public)

    @property
    def has_token(self) -> bool:
        return self.expected is not None

    def is_public(self, path: str) -> bool:
        return path in PUBLIC_PATHS or (self.metrics_public and path == "/metrics")

    def allows(self, authorization: str) -> bool:
        """Whether the `Authorization` header value opens the API (constant-time compare)."""
        expected = self.expected
        if expected is None:
            return True
        scheme, _, credentials = authorization.partition(" ")
        # The scheme is case-insensitive (RFC 9110 §11.1).
        candidate = b""
        if scheme.lower() == "bearer":
            try:
                candidate = f"Bearer {credentials.strip()}".encode()
            except UnicodeEncodeError:
                # Bytes that are not UTF-8 (kept by the parser as surrogates) are no token;
                # still compared, so a refusal takes the same path as any wrong token.
                candidate = b""
        return hmac.compare_digest(candidate, expected)


def error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def auth_middleware(policy: AccessPolicy) -> Middleware:
    """Bearer-token check for every call but the public ones; a refusal changes nothing."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not policy.has_token or policy.is_public(request.path):
            return await handler(request)
        provided = request.headers.get("Authorization", "")
        if not policy.allows(provided):
            reason = "missing bearer token" if not provided else "invalid bearer token"
            response = error(401, reason)
            response.headers["WWW-Authenticate"] = 'Bearer realm="laneswitch"'
            return response
        return await handler(request)

    return check


def browser_safety_middleware(policy: AccessPolicy) -> Middleware:
    """The Origin, Host and Content-Type rules of the module docstring, for every route."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = browser_refusal(request, policy)
        if refusal is not None:
            return refusal
        return await handler(request)

    return check


def browser_refusal(request: web.Request, policy: AccessPolicy) -> web.Response | None:
    """The 403/415 answer `request` gets, or None when it may go on."""
    host = request.headers.get("Host")
    if not policy.has_token and host is not None and not is_loopback_authority(host):
        # A browser always sends Host; a tool that sends none reached a loopback socket.
        return error(403, "without an admin token, only loopback host names are served")
    origin = request.headers.get("Origin")
    if origin is not None and (host is None or not same_origin(origin, request.scheme, host)):
        return error(403, "cross-origin requests are refused")
    if request.method in MUTATING and request.body_exists and request.content_type.lower() != JSON:
        return error(415, f"a request body must be sent as Content-Type: {JSON}")
    return None


def is_loopback_authority(host: str) -> bool:
    """Whether a `Host` header value (`[::1]:9901`, `localhost:9901`, ...) names loopback."""
    parsed = _authority(host, 0)
    return parsed is not None and is_loopback_host(parsed[0])


def _authority(host: str, default_port: int) -> tuple[str, int] | None:
    """(host, port) of an authority, lower-cased, a trailing dot (absolute DNS name) dropped;
    None when it is malformed."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        name, rest = host[1:end], host[end + 1 :]
        if not rest:
            return name, default_port
        if not rest.startswith(":") or not rest[1:].isdigit():
            return None
        return name, int(rest[1:])
    name, sep, port = host.rpartition(":")
    if not sep:
        return host.rstrip("."), default_port
    if not port.isdigit() or ":" in name:
        return None
    return name.rstrip("."), int(port)


def same_origin(origin: str, scheme: str, host: str) -> bool:
    """Whether `Origin: origin` names this API as reached through `Host: host` (scheme, host
    and port, default ports filled in; `null` and malformed origins never match)."""
    origin_scheme, sep, rest = origin.strip().partition("://")
    origin_scheme = origin_scheme.lower()
    if not sep or origin_scheme != scheme.lower() or origin_scheme not in DEFAULT_PORTS:
        return False
    default = DEFAULT_PORTS[origin_scheme]
    theirs = _authority(rest, default) if "/" not in rest else None
    ours = _authority(host, default)
    return theirs is not None and theirs == ours
