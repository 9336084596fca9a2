"""Config file loading: YAML -> `${ENV}` substitution -> validated `Config` (layer L1).

Contract: `parse_config` and `load_config` return a valid `Config` or raise `ConfigError`
carrying every problem found, one line each, `dotted.field.path: message` (problems without a
field, such as YAML syntax, are `source:line:column: message`). Nothing here has side effects
beyond reading the file, so `laneswitch check` and a reload can call it freely.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from proxy.config.base import Loc
from proxy.config.model import Config
from proxy.config.rollout import BlueGreenRollout, CanaryRollout, RolloutMetrics
from proxy.config.service import ServiceConfig

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

__all__ = [
    "ConfigError",
    "config_digest",
    "config_schema",
    "format_duration",
    "format_validation_error",
    "load_config",
    "parse_config",
    "read_config_text",
    "summarize",
]


class ConfigError(Exception):
    """A config that must not take effect. `errors` holds one line per problem."""

    def __init__(self, errors: str | Iterable[str]) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (and recursive aliases).

    PyYAML silently keeps the last of two equal keys, which hides exactly the kind of mistake
    (a version pasted twice, two `weight:` lines) a config check exists to catch. The check runs
    on the composed node tree, before construction, so each duplicate is reported with its
    field path and both line numbers.
    """

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        problems = list(_key_problems(node, (), set(), set()))
        if problems:
            raise ConfigError(problems)
        return self.construct_document(node)


def _key_problems(node: yaml.Node, loc: Loc, seen: set[int], ancestors: set[int]) -> Iterable[str]:
    """Duplicate keys under `node`, and aliases that make the document recursive."""
    # Aliases make the node tree a graph: visit each node once, and refuse cycles, which no
    # config needs and which would send every later walk over the data into endless recursion.
    if id(node) in ancestors:
        yield f"{_dotted(loc) or '(top level)'}: an alias refers to a mapping or list containing it"
        return
    if id(node) in seen:
        return
    seen.add(id(node))
    ancestors.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            key_loc = (*loc, str(key.value))
            # `<<:` merges exist to be overridden; complex (non-scalar) keys cannot be compared.
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                ident, line = (key.tag, key.value), key.start_mark.line + 1
                if ident in first_line:
                    lines = f"lines {first_line[ident]} and {line}"
                    yield f"{_dotted(key_loc)}: duplicate key ({lines})"
                else:
                    first_line[ident] = line
            yield from _key_problems(value, key_loc, seen, ancestors)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _key_problems(item, (*loc, i), seen, ancestors)
    ancestors.discard(id(node))


def _load_yaml(text: str, source: str) -> dict[str, Any]:
    """Parse `text` into the top-level mapping; syntax errors name the line and column."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # safe: a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = ", ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"{source}: the file is empty; a config needs at least `services:`")
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
        raise ConfigError(f"{source}: the top level must be a mapping of settings, not {kind}")
    return data


# --------------------------------------------------------------------------------------------
# ${ENV} substitution
# --------------------------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def _substitute(
    value: Any, env: Mapping[str, str], loc: Loc, missing: list[tuple[Loc, str]]
) -> Any:
    """Return `value` with `${NAME}` / `${NAME:-default}` replaced in every string scalar.

    Runs on parsed data, so a substituted value is always one scalar: it cannot inject YAML
    structure. Unset names without a default are appended to `missing` (and replaced by "").
    """
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name, default = match["name"], match["default"]
            if name in env:
                return env[name]
            if default is None:
                missing.append((loc, name))
                return ""
            return default

        return _ENV_REF.sub(replace, value)
    if isinstance(value, dict):
        return {k: _substitute(v, env, (*loc, str(k)), missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, env, (*loc, i), missing) for i, v in enumerate(value)]
    return value


# --------------------------------------------------------------------------------------------
# Error lines
# --------------------------------------------------------------------------------------------

_PLAIN_MESSAGES = {
    "missing": "required",
    "extra_forbidden": "unknown key",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}
_BOUND_MESSAGES = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _message(err: ErrorDetails) -> str:
    """Plain-words message for one pydantic error; pydantic's own wording for rare kinds."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in ("value_error", "assertion_error"):
        return str(ctx["error"])
    if kind in _PLAIN_MESSAGES:
        return _PLAIN_MESSAGES[kind]
    if kind in _BOUND_MESSAGES:
        operator, key = _BOUND_MESSAGES[kind]
        return f"must be {operator} {_number(ctx[key])}"
    if kind in ("too_short", "string_too_short"):
        least = ctx["min_length"]
        return "must not be empty" if least == 1 else f"must have at least {least} items"
    if kind in ("too_long", "string_too_long"):
        return f"must have at most {ctx['max_length']} items"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    return err["msg"]


def _dotted(loc: Loc) -> str:
    # pydantic marks an invalid dict key with a trailing "[key]": the path itself names the key.
    return ".".join(str(part) for part in loc if part != "[key]")


def format_validation_error(exc: ValidationError) -> list[str]:
    """One `dotted.field.path: message` line per error of a `Config` validation."""
    return [f"{_dotted(err['loc']) or '(top level)'}: {_message(err)}" for err in exc.errors()]


def _under(loc: Loc, prefixes: Iterable[Loc]) -> bool:
    return any(loc[: len(prefix)] == prefix for prefix in prefixes)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def parse_config(
    text: str, env: Mapping[str, str] | None = None, source: str = "<config>"
) -> Config:
    """Validate config `text` (YAML); `env` (default `os.environ`) feeds `${NAME}` references.

    Raises ConfigError listing every problem: YAML syntax and duplicate keys first (they stop
    the parse), else unset environment variables together with all validation errors.
    """
    data = _load_yaml(text, source)
    missing: list[tuple[Loc, str]] = []
    data = _substitute(data, os.environ if env is None else env, (), missing)
    errors = [
        f"{_dotted(loc)}: environment variable {name} is not set and has no default"
        for loc, name in missing
    ]
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        # A field whose variable is unset already has its error; "" would only add noise.
        unset = [loc for loc, _ in missing]
        errors += [
            line
            for err, line in zip(exc.errors(), format_validation_error(exc), strict=True)
            if not _under(err["loc"], unset)
        ]
    if errors:
        raise ConfigError(errors)
    return config


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file at `path` (see `parse_config`).

    An unreadable or non-UTF-8 file is a ConfigError naming the path.
    """
    return parse_config(read_config_text(path), env, os.fspath(path))


def read_config_text(path: str | os.PathLike[str]) -> str:
    """The text of the config file at `path`; unreadable or not UTF-8: a ConfigError naming
    the path."""
    source = os.fspath(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def config_digest(text: str) -> str:
    """Short sha256 hex of the config text: tells which file version is in force."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------------------------

_ENV_REF_SCHEMA = {"type": "string", "pattern": _ENV_REF.pattern}
_ANNOTATIONS = ("title", "description", "default")
_NOT_SCHEMAS = ("default", "const", "enum", "examples")  # values, not subschemas


def _allow_env_refs(node: Any) -> Any:
    """Let every number and boolean also be written as a `${NAME}` reference.

    A substituted value is coerced like any scalar, so `weight: ${W}` is valid: the schema
    must not flag it.
    """
    if isinstance(node, list):
        return [_allow_env_refs(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: v if k in _NOT_SCHEMAS else _allow_env_refs(v) for k, v in node.items()}
    if node.get("type") in ("integer", "number", "boolean"):
        outer = {k: node.pop(k) for k in _ANNOTATIONS if k in node}
        return {"anyOf": [node, _ENV_REF_SCHEMA], **outer}
    return node


def config_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the config file as users write it.

    Durations and sizes accept strings or numbers, `listen` a string or a list, and every
    scalar a `${NAME}` reference.
    """
    schema: dict[str, Any] = _allow_env_refs(Config.model_json_schema(mode="validation"))
    schema["title"] = "laneswitch config file"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """`90.0` -> `"90s"`, `60.0` -> `"1m"`, `0.5` -> `"500ms"`: the units users write."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    if seconds == 0 or seconds >= 1:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"


def _percent(weight: float, total: int) -> str:
    return f"{weight * 100 / total:g}%"


def _metrics_summary(metrics: RolloutMetrics) -> str:
    checks = []
    if metrics.success_rate is not None:
        checks.append(f"success rate >= {metrics.success_rate.min:g}%")
    if metrics.latency_p99 is not None:
        checks.append(f"p99 <= {format_duration(metrics.latency_p99.max)}")
    if metrics.success_rate_vs_stable is not None:
        checks.append(f"at most {metrics.success_rate_vs_stable.max_drop:g} points below stable")
    return ", ".join(checks)


def _rollout_summary(rollout: CanaryRollout | BlueGreenRollout) -> list[str]:
    if isinstance(rollout, CanaryRollout):
        steps = " ".join(f"{step:g}%" for step in rollout.steps())
        head = (
            f"rollout: canary ({rollout.stable} -> {rollout.canary}), steps {steps}, "
            f"every {format_duration(rollout.interval)}, {rollout.promotion} promotion"
        )
    else:
        head = (
            f"rollout: blue-green ({rollout.active} -> {rollout.preview}), "
            f"bake {format_duration(rollout.bake_time)} "
            f"(and {rollout.min_passing_intervals} passing intervals), "
            f"every {format_duration(rollout.interval)}, "
            f"{len(rollout.pre_switch)} pre-switch check(s)"
        )
    lines = [head, f"  analysis: {_metrics_summary(rollout.metrics)}"]
    lines.append(
        f"  rollback after {rollout.threshold} failed check(s); "
        f"at least {rollout.min_requests} requests per interval"
    )
    if rollout.webhooks:
        lines.append("  webhooks: " + ", ".join(f"{w.name} ({w.type})" for w in rollout.webhooks))
    return lines


def _service_summary(name: str, service: ServiceConfig) -> list[str]:
    match = service.match
    lines = [f"service {name}: host {match.host}, path prefix {match.path_prefix}"]
    width = max(len(version) for version in service.versions)
    for version, spec in service.versions.items():
        share = _percent(spec.weight, service.weight_total)
        revision = f"  revision {spec.revision}" if spec.revision else ""
        lines.append(f"  {version:<{width}}  {share:>6}  {', '.join(spec.endpoints)}{revision}")
    if service.sticky is not None:
        key = service.sticky.header or service.sticky.cookie
        lines.append(f"  sticky: {'header' if service.sticky.header else 'cookie'} {key}")
    if service.force is not None:
        sources = [("header", service.force.header), ("cookie", service.force.cookie)]
        lines.append("  force: " + ", ".join(f"{k} {v}" for k, v in sources if v))
    if service.version_header:
        lines.append(f"  version header: {service.version_header}")
    if service.health_check is not None:
        check = service.health_check
        lines.append(
            f"  health check: GET {check.path} every {format_duration(check.interval)}, "
            f"timeout {format_duration(check.timeout)}"
        )
    if service.rollout is not None:
        lines += [f"  {line}" for line in _rollout_summary(service.rollout)]
    return lines


def _redis_location(url: str) -> str:
    """The store's scheme, host, port and db, never its password."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def summarize(config: Config) -> str:
    """Human summary for `laneswitch check`: listeners, admin, then each service.

    Never prints the admin token, only whether one is set.
    """
    admin = config.admin
    access = "no token: open to anyone who can connect"
    if admin.token:
        access = "token set, /metrics " + ("public" if admin.metrics_public else "needs the token")
    lines = [
        f"listen: {', '.join(config.listen)}",
        f"admin: {admin.listen} ({access})",
        f"drain timeout: {format_duration(config.drain_timeout)}; "
        f"state file: {config.state_file or 'none'}",
    ]
    fleet = config.fleet
    if fleet is not None:
        lines.append(
            f"fleet: {fleet.name} at {_redis_location(fleet.redis)}, member "
            f"{fleet.member or 'hostname:pid'}, lease {format_duration(fleet.lease)}, "
            f"ack timeout {format_duration(fleet.ack_timeout)}"
        )
    for name, service in config.services.items():
        lines += _service_summary(name, service)
    return "\n".join(lines)
