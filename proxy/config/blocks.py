"""The config file's process-wide blocks besides services: admin API, timeouts, limits, fleet."""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator, model_validator

from proxy.config.base import ConfigModel, fail
from proxy.config.scalars import (
    Duration,
    ListenAddress,
    Name,
    OptionalStr,
    Size,
    is_loopback_host,
    parse_endpoint,
)


class AdminConfig(ConfigModel):
    """The admin API listener. A token is mandatory once it listens beyond loopback."""

    listen: ListenAddress = "127.0.0.1:9901"
    """host:port of the admin API."""
    token: OptionalStr = None
    """Bearer token for every admin call except /healthz and /readyz; empty means none."""
    metrics_public: bool = False
    """true: GET /metrics needs no token."""

    @model_validator(mode="after")
    def _token_off_loopback(self) -> AdminConfig:
        host, _ = parse_endpoint(self.listen)
        if self.token is None and not is_loopback_host(host):
            fail(
                "AdminConfig",
                [(("token",), "required when admin.listen is not a loopback address")],
            )
        return self


class Timeouts(ConfigModel):
    """Network timeouts, in seconds after validation."""

    connect: Duration = Field(default=2.0, gt=0)
    """TCP connect to an upstream endpoint."""
    header: Duration = Field(default=10.0, gt=0)
    """A client must deliver its whole request head within this."""
    response: Duration = Field(default=30.0, gt=0)
    """The upstream must start its response within this after the request."""
    idle: Duration = Field(default=60.0, gt=0)
    """Keep-alive idle time, both sides; also the longest pause inside a request body (408)."""


class Limits(ConfigModel):
    """Size and count limits that protect the proxy's memory and file descriptors."""

    max_request_line_bytes: Size = Field(default=8192, ge=1)
    """Method + target + version; above -> 414."""
    max_header_bytes: Size = Field(default=65536, ge=1)
    """Request line + headers; above -> 431."""
    max_body_bytes: Size = Field(default=0, ge=0)
    """0 = unlimited; above -> 413."""
    max_connections: int = Field(default=10000, ge=1)
    """Downstream connections; above -> 503 and close."""


# Redis URL schemes the fleet store accepts (redis-py's `from_url`): plain TCP or TLS.
_REDIS_SCHEMES = frozenset({"redis", "rediss"})


def _check_redis_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in _REDIS_SCHEMES or not parts.hostname:
        raise ValueError("must be a redis://[:password@]host:port/db or rediss:// URL")
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise ValueError("the port must be a number") from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError("the database (the URL's path) must be a number")
    return url


RedisUrl = Annotated[str, AfterValidator(_check_redis_url)]


class FleetConfig(ConfigModel):
    """Several replicas sharing one runtime state in Redis, with one leader deciding."""

    redis: RedisUrl
    """The store: redis://[:password@]host:port/db or rediss:// (TLS)."""
    name: Name
    """Replicas with the same store and name form one fleet."""
    member: OptionalStr = None
    """This replica's id in the fleet; empty = hostname:pid."""
    lease: Duration = Field(default=5.0, ge=0.5)
    """Leadership lease; a dead leader is replaced within it."""
    ack_timeout: Duration = Field(default=2.0, gt=0)
    """How long a change waits for every live member to apply it."""

    @field_validator("member")
    @classmethod
    def _member_name(cls, member: str | None) -> str | None:
        if member is not None and not _MEMBER_RE.fullmatch(member):
            raise ValueError("letters, digits and . _ - : only, at most 128")
        return member


# Member ids appear in events, metrics and the store's key names.
_MEMBER_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
