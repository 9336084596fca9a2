"""The config file as pydantic models: the root, `Config` (layer L0: stdlib + pydantic only).

Contract: a `Config` that exists is valid. Every rule of the config file is enforced by the
models, so a config built from a dict, from the YAML loader or by the admin API obeys the same
rules. Durations are float seconds and sizes int bytes after validation, whatever the user wrote.
The pieces: `scalars` (values), `base` (the base model, problem reporting), `blocks` (admin,
timeouts, limits, fleet), `service` and `rollout`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from proxy.config.base import ConfigModel, Loc, fail, fail_if_any
from proxy.config.blocks import AdminConfig, FleetConfig, Limits, Timeouts
from proxy.config.scalars import Duration, ListenList, Name, OptionalStr, parse_endpoint
from proxy.config.service import ServiceConfig


class Config(ConfigModel):
    """A whole laneswitch config file, validated.

    `laneswitch schema` and docs/configuration.md describe each key.
    """

    listen: ListenList = ["127.0.0.1:8080"]
    """Data-plane listeners: one "host:port" or a list of them."""
    admin: AdminConfig = AdminConfig()
    state_file: OptionalStr = None
    """Where runtime state (weights, rollout phase, events) survives restarts."""
    drain_timeout: Duration = Field(default=30.0, ge=0)
    """How long in-flight work may finish after a switch or SIGTERM."""
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    trusted_hops: int = Field(default=0, ge=0)
    """Keep the last N client-sent X-Forwarded-For entries, then append the peer."""
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    """Worker processes; "auto" = one per CPU."""
    fleet: FleetConfig | None = None
    """Fleet mode: share the runtime state with other replicas (absent: this replica alone)."""
    services: dict[Name, ServiceConfig] = Field(min_length=1)
    """Services in file order."""

    @field_validator("workers", mode="wrap")
    @classmethod
    def _workers(cls, value: object, handler: ValidatorFunctionWrapHandler) -> int | str:
        # One plain message instead of one error per member of the union.
        try:
            workers: int | str = handler(value)
        except ValidationError:
            raise ValueError('must be an integer >= 1 or "auto"') from None
        return workers

    @field_validator("listen")
    @classmethod
    def _distinct_listeners(cls, listen: list[str]) -> list[str]:
        seen: dict[tuple[str, int], int] = {}
        problems: list[tuple[Loc, str]] = []
        for i, text in enumerate(listen):
            address = parse_endpoint(text)
            first = seen.setdefault(address, i) if address[1] else i  # port 0: a fresh port
            if first != i:
                problems.append(((i,), f"same address as listen.{first}"))
        fail_if_any("Config", problems)
        return listen

    @field_validator("services")
    @classmethod
    def _distinct_matches(cls, services: dict[str, ServiceConfig]) -> dict[str, ServiceConfig]:
        owner: dict[tuple[str, str], str] = {}
        problems: list[tuple[Loc, str]] = []
        for name, service in services.items():
            key = (service.match.host, service.match.path_prefix)
            first = owner.setdefault(key, name)
            if first != name:
                problems.append(((name, "match"), f'same host and path_prefix as "{first}"'))
        fail_if_any("Config", problems)
        return services

    @model_validator(mode="after")
    def _admin_apart(self) -> Config:
        admin = parse_endpoint(self.admin.listen)
        for i, text in enumerate(self.listen):
            if admin[1] and parse_endpoint(text) == admin:  # port 0: a fresh port, no clash
                fail("Config", [(("admin", "listen"), f"same address as listen.{i}")])
        return self
