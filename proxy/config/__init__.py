"""The config file: its models (root: `model`) and loading, errors, schema, summary (`loader`)."""

from __future__ import annotations

from proxy.config.blocks import AdminConfig, Limits, Timeouts
from proxy.config.loader import (
    ConfigError,
    config_digest,
    config_schema,
    format_duration,
    format_validation_error,
    load_config,
    parse_config,
    summarize,
)
from proxy.config.model import Config
from proxy.config.rollout import (
    BlueGreenRollout,
    CanaryRollout,
    LatencyCheck,
    PreSwitchCheck,
    RelativeSuccessRateCheck,
    RolloutConfig,
    RolloutMetrics,
    SuccessRateCheck,
    Webhook,
)
from proxy.config.scalars import is_loopback_host, parse_duration, parse_endpoint, parse_size
from proxy.config.service import (
    ForceConfig,
    HealthCheckConfig,
    MatchConfig,
    ServiceConfig,
    StickyConfig,
    VersionConfig,
)

__all__ = [
    "AdminConfig",
    "BlueGreenRollout",
    "CanaryRollout",
    "Config",
    "ConfigError",
    "ForceConfig",
    "HealthCheckConfig",
    "LatencyCheck",
    "Limits",
    "MatchConfig",
    "PreSwitchCheck",
    "RelativeSuccessRateCheck",
    "RolloutConfig",
    "RolloutMetrics",
    "ServiceConfig",
    "StickyConfig",
    "SuccessRateCheck",
    "Timeouts",
    "VersionConfig",
    "Webhook",
    "config_digest",
    "config_schema",
    "format_duration",
    "format_validation_error",
    "is_loopback_host",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_endpoint",
    "parse_size",
    "summarize",
]
