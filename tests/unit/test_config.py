"""Config file: parsing, every validation rule with its exact error line, schema and summary."""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from proxy.config import (
    BlueGreenRollout,
    CanaryRollout,
    Config,
    ConfigError,
    config_digest,
    config_schema,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    parse_endpoint,
    parse_size,
    summarize,
)
from tests.helpers import ROOT

CONFIG_DIR = ROOT / "config"

# The smallest useful config, as data; tests deep-copy and change it.
MINIMAL: dict[str, Any] = {
    "services": {
        "shop": {
            "versions": {
                "blue": {"endpoints": ["127.0.0.1:9001"], "weight": 90},
                "green": {"endpoints": ["127.0.0.1:9002"], "weight": 10},
            }
        }
    }
}

DROP = object()  # marks a key to remove from an example

CANARY: dict[str, Any] = {
    "strategy": "canary",
    "stable": "blue",
    "canary": "green",
    "step_weights": [5, 10, 25, 50],
    "metrics": {"success_rate": {"min": 99}},
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "laneswitch.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), env={} if env is None else env)


def errors(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    """The error lines of an invalid config file (fails the test if the file is valid)."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, env)
    return caught.value.errors


def dump(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def minimal(**changes: Any) -> dict[str, Any]:
    """MINIMAL with top-level keys replaced; `shop=` updates the service `shop`."""
    data = copy.deepcopy(MINIMAL)
    data["services"]["shop"].update(changes.pop("shop", {}))
    data.update(changes)
    return data


def with_rollout(rollout: dict[str, Any], **service: Any) -> str:
    return dump(minimal(shop={"rollout": rollout, **service}))


# ------------------------------------------------------------------------------------------
# The shipped example files
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    config = load_config(path, env={})
    assert config.services


def test_shipped_examples_exist() -> None:
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    assert {"laneswitch.yaml", "canary.yaml", "blue-green.yaml"} <= names


def test_default_config_values() -> None:
    config = load_config(CONFIG_DIR / "laneswitch.yaml", env={})
    assert config.listen == ["127.0.0.1:8080"]
    assert config.admin.listen == "127.0.0.1:9901"
    assert config.admin.token is None
    shop = config.services["shop"]
    assert list(shop.versions) == ["blue", "green"]
    assert shop.versions["blue"].endpoints == ["127.0.0.1:9001"]
    assert shop.versions["blue"].weight == 90
    assert shop.versions["green"].endpoints == ["127.0.0.1:9002"]
    assert shop.versions["green"].weight == 10
    assert shop.sticky is not None and shop.sticky.header == "X-User-Id"
    assert shop.force is not None
    assert (shop.force.header, shop.force.cookie) == ("X-Canary", "canary")
    assert shop.version_header == "X-App-Version"
    assert shop.rollout is None


def test_default_config_takes_token_from_environment() -> None:
    config = load_config(CONFIG_DIR / "laneswitch.yaml", env={"LANESWITCH_ADMIN_TOKEN": "s3"})
    assert config.admin.token == "s3"


def test_canary_example_values() -> None:
    rollout = load_config(CONFIG_DIR / "canary.yaml", env={}).services["shop"].rollout
    assert isinstance(rollout, CanaryRollout)
    assert rollout.steps() == [5, 10, 25, 50]
    assert rollout.interval == 60.0
    assert rollout.progress_deadline == 600.0
    assert rollout.metrics.latency_p99 is not None
    assert rollout.metrics.latency_p99.max == 0.5


def test_blue_green_example_values() -> None:
    rollout = load_config(CONFIG_DIR / "blue-green.yaml", env={}).services["shop"].rollout
    assert isinstance(rollout, BlueGreenRollout)
    assert (rollout.active, rollout.preview) == ("blue", "green")
    assert rollout.bake_time == 120.0
    assert [(c.path, c.expect_status, c.timeout) for c in rollout.pre_switch] == [
        ("/healthz", 200, 2.0),
        ("/api/version", 200, 2.0),
    ]


# ------------------------------------------------------------------------------------------
# Defaults and normalisation
# ------------------------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, dump(MINIMAL))
    assert config.listen == ["127.0.0.1:8080"]
    assert config.admin.model_dump() == {
        "listen": "127.0.0.1:9901",
        "token": None,
        "metrics_public": False,
    }
    assert config.state_file is None
    assert config.drain_timeout == 30.0
    assert config.timeouts.model_dump() == {
        "connect": 2.0,
        "header": 10.0,
        "response": 30.0,
        "idle": 60.0,
    }
    assert config.limits.model_dump() == {
        "max_request_line_bytes": 8192,
        "max_header_bytes": 65536,
        "max_body_bytes": 0,
        "max_connections": 10000,
    }
    assert config.trusted_hops == 0
    assert config.workers == 1
    shop = config.services["shop"]
    assert (shop.match.host, shop.match.path_prefix) == ("*", "/")
    assert shop.weight_total == 100
    assert (shop.sticky, shop.force, shop.health_check, shop.rollout) == (None, None, None, None)
    assert shop.version_header == ""


def test_listen_accepts_a_string_or_a_list(tmp_path: Path) -> None:
    assert load(tmp_path, dump(minimal(listen="0.0.0.0:80"))).listen == ["0.0.0.0:80"]
    both = ["127.0.0.1:8080", "[::1]:8080"]
    assert load(tmp_path, dump(minimal(listen=both))).listen == both


def test_order_of_services_and_versions_is_file_order(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        services:
          zeta:
            match: {host: zeta.example}
            versions:
              z: {endpoints: ["127.0.0.1:1"], weight: 50}
              a: {endpoints: ["127.0.0.1:2"], weight: 50}
          alpha:
            versions:
              m: {endpoints: ["127.0.0.1:3"], weight: 100}
        """,
    )
    assert list(config.services) == ["zeta", "alpha"]
    assert list(config.services["zeta"].versions) == ["z", "a"]


def test_match_host_is_lower_cased(tmp_path: Path) -> None:
    config = load(tmp_path, dump(minimal(shop={"match": {"host": "Shop.Example.COM"}})))
    assert config.services["shop"].match.host == "shop.example.com"


def test_empty_token_and_state_file_mean_none(tmp_path: Path) -> None:
    config = load(tmp_path, dump(minimal(admin={"token": ""}, state_file="")))
    assert config.admin.token is None
    assert config.state_file is None


def test_numeric_revision_becomes_a_string(tmp_path: Path) -> None:
    data = minimal()
    data["services"]["shop"]["versions"]["green"]["revision"] = 3
    assert load(tmp_path, dump(data)).services["shop"].versions["green"].revision == "3"


@pytest.mark.parametrize(("value", "expected"), [(4, 4), ("auto", "auto"), ("2", 2)])
def test_workers(tmp_path: Path, value: object, expected: object) -> None:
    assert load(tmp_path, dump(minimal(workers=value))).workers == expected


@pytest.mark.parametrize("value", [0, "many", 1.5])
def test_workers_invalid(tmp_path: Path, value: object) -> None:
    assert errors(tmp_path, dump(minimal(workers=value))) == [
        'workers: must be an integer >= 1 or "auto"'
    ]


def test_models_are_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, dump(MINIMAL))
    with pytest.raises(pydantic.ValidationError):
        config.services["shop"].versions["blue"].weight = 5


def test_config_can_be_built_from_data_with_the_same_rules() -> None:
    data = minimal()
    data["services"]["shop"]["versions"]["blue"]["weight"] = 91
    with pytest.raises(pydantic.ValidationError):
        Config.model_validate(data)
    assert Config.model_validate(MINIMAL).services["shop"].versions["blue"].weight == 90


# ------------------------------------------------------------------------------------------
# Durations and sizes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5), ("7", 7.0)],
)
def test_duration_strings(tmp_path: Path, text: str, seconds: float) -> None:
    config = load(tmp_path, dump(minimal(drain_timeout=text)))
    assert config.drain_timeout == seconds
    assert isinstance(config.drain_timeout, float)


@pytest.mark.parametrize(("number", "seconds"), [(5, 5.0), (0.25, 0.25), (0, 0.0)])
def test_duration_numbers_are_seconds(tmp_path: Path, number: float, seconds: float) -> None:
    assert load(tmp_path, dump(minimal(drain_timeout=number))).drain_timeout == seconds


@pytest.mark.parametrize("garbage", ["soon", "2d", "1 minute", "", True, [1]])
def test_duration_garbage(tmp_path: Path, garbage: object) -> None:
    assert errors(tmp_path, dump(minimal(drain_timeout=garbage))) == [
        'drain_timeout: must be a duration such as "500ms", "2s", "1m", "1h" or a number of seconds'
    ]


@pytest.mark.parametrize("negative", [-1, "-2s", -0.5])
def test_duration_negative(tmp_path: Path, negative: object) -> None:
    assert errors(tmp_path, dump(minimal(drain_timeout=negative))) == [
        "drain_timeout: must be >= 0"
    ]


def test_zero_timeout_is_rejected(tmp_path: Path) -> None:
    assert errors(tmp_path, dump(minimal(timeouts={"connect": 0}))) == [
        "timeouts.connect: must be > 0"
    ]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (512, 512),
        ("512", 512),
        ("512B", 512),
        ("64KiB", 65536),
        ("16MiB", 16 * 1024**2),
        ("1GiB", 1024**3),
    ],
)
def test_sizes(tmp_path: Path, text: object, size: int) -> None:
    config = load(tmp_path, dump(minimal(limits={"max_body_bytes": text})))
    assert config.limits.max_body_bytes == size


@pytest.mark.parametrize("garbage", ["1.5MiB", "64kb", "lots", 1.5, "-1KiB"])
def test_size_garbage(tmp_path: Path, garbage: object) -> None:
    lines = errors(tmp_path, dump(minimal(limits={"max_header_bytes": garbage})))
    assert len(lines) == 1
    assert lines[0].startswith("limits.max_header_bytes: must be ")


def test_size_messages() -> None:
    with pytest.raises(ValueError, match=r'^must be a size in bytes such as 512, "64KiB"'):
        parse_size("lots")
    with pytest.raises(ValueError, match=r"^must be >= 0$"):
        parse_size(-1)


def test_parse_duration_and_size_helpers() -> None:
    assert parse_duration(" 250 ms ") == 0.25
    assert parse_size("2 KiB") == 2048
    assert parse_size(1024.0) == 1024


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.5, "500ms"), (2.0, "2s"), (90.0, "90s"), (60.0, "1m"), (7200.0, "2h"), (0.0, "0s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# ------------------------------------------------------------------------------------------
# Environment substitution
# ------------------------------------------------------------------------------------------


def test_env_substitution_and_coercion(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        listen: ${HOST:-127.0.0.1}:${PORT}
        drain_timeout: ${DRAIN:-5s}
        services:
          shop:
            versions:
              blue: {endpoints: ["${BLUE}"], weight: "${W}"}
        """,
        env={"PORT": "8081", "BLUE": "10.0.0.5:80", "W": "100"},
    )
    assert config.listen == ["127.0.0.1:8081"]
    assert config.drain_timeout == 5.0
    assert config.services["shop"].versions["blue"].endpoints == ["10.0.0.5:80"]
    assert config.services["shop"].versions["blue"].weight == 100


def test_unquoted_env_reference_coerces_to_int(tmp_path: Path) -> None:
    text = dump(MINIMAL).replace("weight: 10", "weight: ${W}")
    config = load(tmp_path, text, env={"W": "10"})
    assert config.services["shop"].versions["green"].weight == 10


def test_env_value_cannot_inject_yaml_structure(tmp_path: Path) -> None:
    sneaky = "x\nservices: {evil: {}}\nadmin: {listen: '0.0.0.0:1'}"
    config = load(tmp_path, dump(minimal(admin={"token": "${TOKEN}"})), env={"TOKEN": sneaky})
    assert config.admin.token == sneaky
    assert list(config.services) == ["shop"]


def test_env_unset_without_default_names_variable_and_field(tmp_path: Path) -> None:
    text = dump(minimal(admin={"listen": "0.0.0.0:9901", "token": "${ADMIN_TOKEN}"}))
    # The unset variable is reported once, not again as "admin.token: required ...".
    assert errors(tmp_path, text) == [
        "admin.token: environment variable ADMIN_TOKEN is not set and has no default"
    ]


def test_env_errors_come_with_the_other_errors(tmp_path: Path) -> None:
    data = minimal(state_file="${STATE_DIR}/state.json", trusted_hops=-1)
    assert errors(tmp_path, dump(data)) == [
        "state_file: environment variable STATE_DIR is not set and has no default",
        "trusted_hops: must be >= 0",
    ]


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANESWITCH_TEST_TOKEN", "from-environ")
    config = parse_config(dump(minimal(admin={"token": "${LANESWITCH_TEST_TOKEN}"})))
    assert config.admin.token == "from-environ"


def test_env_substitution_leaves_keys_alone(tmp_path: Path) -> None:
    text = dump(MINIMAL).replace("blue:", "${V}:")
    assert errors(tmp_path, text, env={"V": "blue"}) == [
        "services.shop.versions.${V}: must be 1-63 letters, digits, "
        '"_", "." or "-", starting with a letter or digit'
    ]


# ------------------------------------------------------------------------------------------
# File-level problems
# ------------------------------------------------------------------------------------------


def test_unknown_key(tmp_path: Path) -> None:
    text = dump(MINIMAL).replace("weight: 90", "wieght: 90")
    assert errors(tmp_path, text) == [
        "services.shop.versions.blue.weight: required",
        "services.shop.versions.blue.wieght: unknown key",
    ]


def test_unknown_top_level_key(tmp_path: Path) -> None:
    assert errors(tmp_path, dump(minimal(listne="x"))) == ["listne: unknown key"]


def test_duplicate_keys(tmp_path: Path) -> None:
    lines = errors(
        tmp_path,
        """\
        services:
          shop:
            versions:
              blue: {endpoints: ["127.0.0.1:9001"], weight: 50}
              blue: {endpoints: ["127.0.0.1:9002"], weight: 50, weight: 40}
        listen: 127.0.0.1:1
        listen: 127.0.0.1:2
        """,
    )
    assert lines == [
        "services.shop.versions.blue: duplicate key (lines 4 and 5)",
        "services.shop.versions.blue.weight: duplicate key (lines 5 and 5)",
        "listen: duplicate key (lines 6 and 7)",
    ]


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = """
    services:
      shop:
        versions:
          blue: &v {endpoints: ["127.0.0.1:9001"], weight: 50}
          green:
            <<: *v
            weight: 50
    """
    config = load(tmp_path, text)
    assert config.services["shop"].versions["green"].endpoints == ["127.0.0.1:9001"]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.errors == [
        f"{path}: the file is empty; a config needs at least `services:`"
    ]


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "a list"), ("hello\n", "a str")])
def test_top_level_must_be_a_mapping(text: str, kind: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env={}, source="x.yaml")
    assert caught.value.errors == [
        f"x.yaml: the top level must be a mapping of settings, not {kind}"
    ]


def test_yaml_syntax_error_names_line_and_column() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("services:\n  shop: [1, 2\n", env={}, source="x.yaml")
    (line,) = caught.value.errors
    assert line.startswith("x.yaml:3:1: invalid YAML: ")


def test_yaml_with_two_documents() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("listen: 127.0.0.1:1\n---\nlisten: 127.0.0.1:2\n", env={}, source="x.yaml")
    assert caught.value.errors == [
        "x.yaml:2:1: invalid YAML: expected a single document in the stream, "
        "but found another document"
    ]


def test_recursive_alias_is_an_error_not_a_crash() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("services: &loop {shop: *loop}\n", env={})
    assert caught.value.errors == [
        "services.shop: an alias refers to a mapping or list containing it"
    ]


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert caught.value.errors == [
        f"{missing}: cannot read the config file: No such file or directory"
    ]


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"listen: \xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors[0].startswith(f"{path}: not UTF-8 text")


def test_config_error_str_joins_lines() -> None:
    exc = ConfigError(["a: one", "b: two"])
    assert exc.errors == ["a: one", "b: two"]
    assert str(exc) == "a: one\nb: two"
    assert ConfigError("single").errors == ["single"]


def test_all_errors_are_collected(tmp_path: Path) -> None:
    text = """
    listen: [127.0.0.1:8080, "::1:80"]
    drain_timeout: soon
    limits: {max_body_bytes: 1.5MiB}
    admin: {metrics_public: maybe}
    services:
      shop:
        versions:
          blue: {endpoints: ["127.0.0.1:9001"], weight: ten}
          canary: {endpoints: [], weight: -5}
        sticky: {}
      web:
        match: {path_prefix: api}
        versions:
          v1: {endpoints: ["127.0.0.1:70000"], weight: 100}
    """
    assert errors(tmp_path, text) == [
        "listen.1: an IPv6 address needs brackets, as in [::1]:8080; got '::1:80'",
        "admin.metrics_public: must be true or false",
        'drain_timeout: must be a duration such as "500ms", "2s", "1m", "1h" '
        "or a number of seconds",
        'limits.max_body_bytes: must be a size in bytes such as 512, "64KiB", "16MiB" or "1GiB"',
        "services.shop.versions.blue.weight: must be an integer",
        "services.shop.versions.canary.endpoints: must not be empty",
        "services.shop.versions.canary.weight: must be >= 0",
        "services.shop.sticky: set exactly one of header or cookie",
        'services.web.match.path_prefix: must start with "/"',
        "services.web.versions.v1.endpoints.0: port must be a number from 1 to 65535, got '70000'",
    ]


@pytest.mark.parametrize(
    ("data", "line"),
    [
        ({"services": []}, "services: must be a mapping"),
        ({"services": {}}, "services: must not be empty"),
        ({}, "services: required"),
        ({"services": {"shop": {}}}, "services.shop.versions: required"),
        ({"services": {"shop": {"versions": {}}}}, "services.shop.versions: must not be empty"),
        (minimal(shop={"weight_total": 0}), "services.shop.weight_total: must be >= 1"),
        (
            minimal(shop={"weight_total": 2_000_000}),
            "services.shop.weight_total: must be <= 1000000",
        ),
        (minimal(timeouts="fast"), "timeouts: must be a mapping"),
        (minimal(limits={"max_connections": 0}), "limits.max_connections: must be >= 1"),
        (
            minimal(shop={"version_header": "X App"}),
            "services.shop.version_header: must be "
            "a header or cookie name (letters, digits and !#$%&'*+-.^_`|~)",
        ),
    ],
)
def test_plain_messages(tmp_path: Path, data: dict[str, Any], line: str) -> None:
    assert errors(tmp_path, dump(data)) == [line]


def test_negative_weight_message_matches_the_spec(tmp_path: Path) -> None:
    text = """
    services:
      shop:
        versions:
          stable: {endpoints: ["127.0.0.1:9001"], weight: 100}
          canary: {endpoints: ["127.0.0.1:9002"], weight: -1}
    """
    assert errors(tmp_path, text) == ["services.shop.versions.canary.weight: must be >= 0"]


# ------------------------------------------------------------------------------------------
# Weights, versions, endpoints
# ------------------------------------------------------------------------------------------


def test_weights_must_sum_to_weight_total(tmp_path: Path) -> None:
    data = minimal()
    data["services"]["shop"]["versions"]["green"]["weight"] = 20
    assert errors(tmp_path, dump(data)) == [
        "services.shop.versions: weights sum to 110, must equal weight_total 100"
    ]


def test_weight_total_changes_the_resolution(tmp_path: Path) -> None:
    data = minimal(shop={"weight_total": 10000})
    data["services"]["shop"]["versions"]["blue"]["weight"] = 9975
    data["services"]["shop"]["versions"]["green"]["weight"] = 25
    assert load(tmp_path, dump(data)).services["shop"].versions["green"].weight == 25


def test_all_weights_zero(tmp_path: Path) -> None:
    data = minimal()
    for version in data["services"]["shop"]["versions"].values():
        version["weight"] = 0
    assert errors(tmp_path, dump(data)) == [
        "services.shop.versions: every version has weight 0; at least one must carry traffic"
    ]


def test_fractional_weight(tmp_path: Path) -> None:
    data = minimal()
    data["services"]["shop"]["versions"]["green"]["weight"] = 10.5
    assert errors(tmp_path, dump(data)) == [
        "services.shop.versions.green.weight: must be an integer"
    ]


def test_reserved_and_invalid_version_names(tmp_path: Path) -> None:
    data = minimal()
    versions = data["services"]["shop"]["versions"]
    versions["always"] = versions.pop("green")
    assert errors(tmp_path, dump(data)) == [
        'services.shop.versions.always: "always" is reserved: it is a value of the force header'
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9001", ("127.0.0.1", 9001)),
        ("localhost:80", ("localhost", 80)),
        ("app-1.internal:65535", ("app-1.internal", 65535)),
        ("[::1]:80", ("::1", 80)),
        ("[2001:db8::5]:8443", ("2001:db8::5", 8443)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),  # a listener on a free port
    ],
)
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", 'must be "host:port" or "[v6]:port", got \'127.0.0.1\''),
        (":80", 'must be "host:port" or "[v6]:port", got \':80\''),
        ("127.0.0.1:65536", "port must be a number from 1 to 65535, got '65536'"),
        ("127.0.0.1:http", "port must be a number from 1 to 65535, got 'http'"),
        ("::1:80", "an IPv6 address needs brackets, as in [::1]:8080; got '::1:80'"),
        ("[zz::1]:80", "'zz::1' is not an IPv6 address"),
        ("[::1]", "must be \"[v6]:port\", got '[::1]'"),
        ("host:", "port must be a number from 1 to 65535, got ''"),
        ("http://a:80", "must be \"host:port\" without a scheme, got 'http://a:80'"),
        ("a/b:80", "'a/b' is not a valid host name or address"),
    ],
)
def test_parse_endpoint_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_endpoint(text)
    assert str(caught.value) == message


def test_bad_endpoint_in_a_version(tmp_path: Path) -> None:
    data = minimal()
    data["services"]["shop"]["versions"]["blue"]["endpoints"] = ["127.0.0.1:1", "nowhere"]
    assert errors(tmp_path, dump(data)) == [
        "services.shop.versions.blue.endpoints.1: "
        'must be "host:port" or "[v6]:port", got \'nowhere\''
    ]


# ------------------------------------------------------------------------------------------
# Listeners, admin, matches
# ------------------------------------------------------------------------------------------


def test_listen_must_be_endpoints(tmp_path: Path) -> None:
    assert errors(tmp_path, dump(minimal(listen=["127.0.0.1:8080", "8081"]))) == [
        'listen.1: must be "host:port" or "[v6]:port", got \'8081\''
    ]


def test_upstream_port_zero_is_rejected(tmp_path: Path) -> None:
    data = minimal()
    data["services"]["shop"]["versions"]["blue"]["endpoints"] = ["127.0.0.1:0"]
    assert errors(tmp_path, dump(data)) == [
        "services.shop.versions.blue.endpoints.0: port must be a number from 1 to 65535, got '0'"
    ]


def test_listeners_on_port_zero_bind_free_ports(tmp_path: Path) -> None:
    data = minimal(listen=["127.0.0.1:0", "127.0.0.1:0"], admin={"listen": "127.0.0.1:0"})
    config = load(tmp_path, dump(data))
    assert config.listen == ["127.0.0.1:0", "127.0.0.1:0"]
    assert config.admin.listen == "127.0.0.1:0"


def test_listen_twice_on_one_address(tmp_path: Path) -> None:
    assert errors(tmp_path, dump(minimal(listen=["127.0.0.1:80", "127.0.0.1:80"]))) == [
        "listen.1: same address as listen.0"
    ]


def test_admin_and_data_plane_on_one_address(tmp_path: Path) -> None:
    data = minimal(listen="127.0.0.1:9901")
    assert errors(tmp_path, dump(data)) == ["admin.listen: same address as listen.0"]


@pytest.mark.parametrize("listen", ["0.0.0.0:9901", "10.1.2.3:9901", "[::]:9901", "admin:9901"])
def test_admin_token_required_off_loopback(tmp_path: Path, listen: str) -> None:
    assert errors(tmp_path, dump(minimal(admin={"listen": listen}))) == [
        "admin.token: required when admin.listen is not a loopback address"
    ]
    config = load(tmp_path, dump(minimal(admin={"listen": listen, "token": "t"})))
    assert config.admin.token == "t"


@pytest.mark.parametrize("listen", ["127.0.0.1:9901", "127.3.2.1:1", "[::1]:9901", "localhost:1"])
def test_admin_without_token_on_loopback(tmp_path: Path, listen: str) -> None:
    assert load(tmp_path, dump(minimal(admin={"listen": listen}))).admin.token is None


def test_empty_token_off_loopback_is_missing(tmp_path: Path) -> None:
    data = minimal(admin={"listen": "0.0.0.0:9901", "token": "${TOKEN:-}"})
    assert errors(tmp_path, dump(data)) == [
        "admin.token: required when admin.listen is not a loopback address"
    ]


def test_two_services_with_the_same_match(tmp_path: Path) -> None:
    text = """
    services:
      a:
        match: {host: shop.example, path_prefix: /api}
        versions: {v1: {endpoints: ["127.0.0.1:1"], weight: 100}}
      b:
        versions: {v1: {endpoints: ["127.0.0.1:2"], weight: 100}}
      c:
        match: {host: SHOP.example, path_prefix: /api}
        versions: {v1: {endpoints: ["127.0.0.1:3"], weight: 100}}
    """
    assert errors(tmp_path, text) == ['services.c.match: same host and path_prefix as "a"']


# ------------------------------------------------------------------------------------------
# Sticky and force
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sticky", [{}, {"header": "X-User", "cookie": "uid"}])
def test_sticky_needs_exactly_one_source(tmp_path: Path, sticky: dict[str, str]) -> None:
    assert errors(tmp_path, dump(minimal(shop={"sticky": sticky}))) == [
        "services.shop.sticky: set exactly one of header or cookie"
    ]


def test_sticky_cookie(tmp_path: Path) -> None:
    sticky = (
        load(tmp_path, dump(minimal(shop={"sticky": {"cookie": "uid"}}))).services["shop"].sticky
    )
    assert sticky is not None
    assert (sticky.header, sticky.cookie) == (None, "uid")


def test_force_needs_a_source(tmp_path: Path) -> None:
    assert errors(tmp_path, dump(minimal(shop={"force": {}}))) == [
        "services.shop.force: set header, cookie or both"
    ]


def test_force_cookie_only(tmp_path: Path) -> None:
    force = load(tmp_path, dump(minimal(shop={"force": {"cookie": "c"}}))).services["shop"].force
    assert force is not None
    assert (force.header, force.cookie) == (None, "c")


# ------------------------------------------------------------------------------------------
# Rollouts
# ------------------------------------------------------------------------------------------


def test_canary_rollout_values(tmp_path: Path) -> None:
    rollout = load(tmp_path, with_rollout(CANARY)).services["shop"].rollout
    assert isinstance(rollout, CanaryRollout)
    assert rollout.step_weights == [5.0, 10.0, 25.0, 50.0]
    assert (rollout.interval, rollout.threshold, rollout.min_requests) == (60.0, 3, 50)
    assert (rollout.progress_deadline, rollout.promotion, rollout.webhooks) == (600.0, "auto", [])


def test_canary_linear_steps(tmp_path: Path) -> None:
    rollout_data = {k: v for k, v in CANARY.items() if k != "step_weights"}
    rollout_data.update(step_weight=20, max_weight=50)
    rollout = load(tmp_path, with_rollout(rollout_data)).services["shop"].rollout
    assert isinstance(rollout, CanaryRollout)
    assert rollout.steps() == [20, 40, 50]


def test_fractional_steps_need_a_fine_weight_total(tmp_path: Path) -> None:
    data = minimal(shop={"weight_total": 1000, "rollout": {**CANARY, "step_weights": [0.5, 2.5]}})
    data["services"]["shop"]["versions"]["blue"]["weight"] = 1000
    data["services"]["shop"]["versions"]["green"]["weight"] = 0
    rollout = load(tmp_path, dump(data)).services["shop"].rollout
    assert isinstance(rollout, CanaryRollout)
    assert rollout.steps() == [0.5, 2.5]
    assert errors(tmp_path, with_rollout({**CANARY, "step_weights": [1, 2.5, 30]})) == [
        "services.shop.rollout.step_weights.1: 2.5 is not a multiple of 1 (100 / weight_total 100)"
    ]


@pytest.mark.parametrize(
    ("changes", "lines"),
    [
        (
            {"step_weights": [10, 10, 5]},
            [
                "services.shop.rollout.step_weights.1: must be greater than the previous step (10)",
                "services.shop.rollout.step_weights.2: must be greater than the previous step (10)",
            ],
        ),
        (
            {"step_weights": [0, 150]},
            [
                "services.shop.rollout.step_weights.0: must be > 0",
                "services.shop.rollout.step_weights.1: must be <= 100",
            ],
        ),
        ({"step_weights": []}, ["services.shop.rollout.step_weights: must not be empty"]),
        (
            {"step_weight": 10, "max_weight": 50},
            [
                "services.shop.rollout: use either step_weights or step_weight + max_weight, "
                "not both"
            ],
        ),
        (
            {"step_weights": DROP},
            ["services.shop.rollout: set step_weights, or step_weight and max_weight"],
        ),
        (
            {"step_weights": DROP, "step_weight": 10},
            ["services.shop.rollout.max_weight: required with step_weight"],
        ),
        (
            {"step_weights": DROP, "max_weight": 10},
            ["services.shop.rollout.step_weight: required with max_weight"],
        ),
        (
            {"step_weights": DROP, "step_weight": 30, "max_weight": 20},
            ["services.shop.rollout.max_weight: must be >= step_weight"],
        ),
        (
            {"step_weights": DROP, "step_weight": 2.5, "max_weight": 50},
            [
                "services.shop.rollout.step_weight: 2.5 is not a multiple of 1 "
                "(100 / weight_total 100)"
            ],
        ),
        ({"canary": "blue"}, ["services.shop.rollout.canary: must differ from stable"]),
        (
            {"canary": "red", "stable": "black"},
            [
                'services.shop.rollout.stable: no version named "black" in versions',
                'services.shop.rollout.canary: no version named "red" in versions',
            ],
        ),
        ({"threshold": 0}, ["services.shop.rollout.threshold: must be >= 1"]),
        ({"min_requests": 0}, ["services.shop.rollout.min_requests: must be >= 1"]),
        ({"interval": 0}, ["services.shop.rollout.interval: must be > 0"]),
        ({"promotion": "later"}, ["services.shop.rollout.promotion: must be 'auto' or 'manual'"]),
        ({"metrics": None}, ["services.shop.rollout.metrics: must be a mapping"]),
        (
            {"metrics": {}},
            [
                "services.shop.rollout.metrics: set at least one of success_rate, latency_p99, "
                "success_rate_vs_stable"
            ],
        ),
        (
            {"metrics": {"success_rate": {"min": 120}, "latency_p99": {"max": "0ms"}}},
            [
                "services.shop.rollout.metrics.success_rate.min: must be <= 100",
                "services.shop.rollout.metrics.latency_p99.max: must be > 0",
            ],
        ),
        ({"stable": None}, ["services.shop.rollout.stable: must be a string"]),
        ({"active": "blue"}, ["services.shop.rollout.active: unknown key"]),
    ],
)
def test_canary_rollout_errors(tmp_path: Path, changes: dict[str, Any], lines: list[str]) -> None:
    rollout = {k: v for k, v in {**CANARY, **changes}.items() if v is not DROP}
    assert errors(tmp_path, with_rollout(rollout)) == lines


def test_rollout_strategy_errors(tmp_path: Path) -> None:
    assert errors(tmp_path, with_rollout({"stable": "blue"})) == [
        "services.shop.rollout.strategy: required"
    ]
    assert errors(tmp_path, with_rollout({**CANARY, "strategy": "rainbow"})) == [
        "services.shop.rollout.strategy: must be 'canary' or 'blue-green'"
    ]
    assert errors(tmp_path, with_rollout("canary")) == [  # type: ignore[arg-type]
        "services.shop.rollout: must be a mapping"
    ]


BLUE_GREEN: dict[str, Any] = {
    "strategy": "blue-green",
    "active": "blue",
    "preview": "green",
    "metrics": {"success_rate_vs_stable": {"max_drop": 1}},
}


def test_blue_green_rollout_values(tmp_path: Path) -> None:
    rollout = load(tmp_path, with_rollout(BLUE_GREEN)).services["shop"].rollout
    assert isinstance(rollout, BlueGreenRollout)
    assert (rollout.bake_time, rollout.interval, rollout.threshold) == (120.0, 10.0, 2)
    assert (rollout.min_requests, rollout.pre_switch, rollout.webhooks) == (20, [], [])


@pytest.mark.parametrize(
    ("changes", "lines"),
    [
        ({"preview": "blue"}, ["services.shop.rollout.preview: must differ from active"]),
        ({"active": "gone"}, ['services.shop.rollout.active: no version named "gone" in versions']),
        ({"canary": "green"}, ["services.shop.rollout.canary: unknown key"]),
        ({"bake_time": "-1s"}, ["services.shop.rollout.bake_time: must be >= 0"]),
        (
            {"pre_switch": [{"path": "healthz", "expect_status": 700}]},
            [
                'services.shop.rollout.pre_switch.0.path: must start with "/"',
                "services.shop.rollout.pre_switch.0.expect_status: must be <= 599",
            ],
        ),
    ],
)
def test_blue_green_rollout_errors(
    tmp_path: Path, changes: dict[str, Any], lines: list[str]
) -> None:
    assert errors(tmp_path, with_rollout({**BLUE_GREEN, **changes})) == lines


def test_webhooks(tmp_path: Path) -> None:
    hook = {"name": "notify", "type": "rollback", "url": "https://hooks.example/x"}
    rollout = load(tmp_path, with_rollout({**CANARY, "webhooks": [hook]})).services["shop"].rollout
    assert rollout is not None
    assert rollout.webhooks[0].model_dump() == {
        **hook,
        "timeout": 5.0,
        "retries": 2,
        "metadata": {},
    }
    bad = {"name": "x", "type": "sometimes", "url": "ftp://x", "retries": -1}
    assert errors(tmp_path, with_rollout({**CANARY, "webhooks": [bad]})) == [
        "services.shop.rollout.webhooks.0.type: must be 'pre-rollout', 'rollout', "
        "'confirm-promotion', 'post-rollout' or 'rollback'",
        "services.shop.rollout.webhooks.0.url: must be an http:// or https:// URL",
        "services.shop.rollout.webhooks.0.retries: must be >= 0",
    ]


def test_health_check(tmp_path: Path) -> None:
    check = {"path": "/ready", "interval": "2s", "timeout": "250ms", "unhealthy_threshold": 1}
    health = (
        load(tmp_path, dump(minimal(shop={"health_check": check}))).services["shop"].health_check
    )
    assert health is not None
    assert health.model_dump() == {
        "path": "/ready",
        "interval": 2.0,
        "timeout": 0.25,
        "healthy_threshold": 2,
        "unhealthy_threshold": 1,
    }
    assert errors(tmp_path, dump(minimal(shop={"health_check": {"healthy_threshold": 0}}))) == [
        "services.shop.health_check.healthy_threshold: must be >= 1"
    ]


# ------------------------------------------------------------------------------------------
# Schema, summary, digest
# ------------------------------------------------------------------------------------------


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def test_schema_shape() -> None:
    schema = config_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["services"]
    assert set(schema["properties"]) == {
        "listen",
        "admin",
        "state_file",
        "drain_timeout",
        "timeouts",
        "limits",
        "trusted_hops",
        "workers",
        "fleet",
        "services",
    }
    for ref in _refs(schema):
        assert ref.startswith("#/$defs/")
        assert ref.removeprefix("#/$defs/") in schema["$defs"]


def test_schema_describes_what_users_write() -> None:
    schema = config_schema()
    types = {
        json.dumps(branch, sort_keys=True)
        for branch in schema["properties"]["drain_timeout"]["anyOf"]
    }
    assert any('"type": "string"' in t for t in types)
    assert any('"type": "number"' in t for t in types)
    listen_types = {b.get("type") for b in schema["properties"]["listen"]["anyOf"]}
    assert listen_types == {"string", "array"}
    weight = schema["$defs"]["VersionConfig"]["properties"]["weight"]
    assert {"type": "string", "pattern": weight["anyOf"][1]["pattern"]} in weight["anyOf"]


def test_schema_is_valid_and_accepts_the_examples() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in CONFIG_DIR.glob("*.yaml"):
        assert list(validator.iter_errors(yaml.safe_load(path.read_text()))) == [], path
    assert not validator.is_valid({"services": {}, "listne": 1})


def test_summary(tmp_path: Path) -> None:
    data = minimal(
        listen=["127.0.0.1:8080", "[::1]:8080"],
        admin={"listen": "0.0.0.0:9901", "token": "secret-token"},
        shop={
            "weight_total": 1000,
            "sticky": {"cookie": "uid"},
            "force": {"header": "X-Canary"},
            "rollout": {**CANARY, "step_weights": [0.5, 10]},
        },
    )
    data["services"]["shop"]["versions"]["blue"]["weight"] = 995
    data["services"]["shop"]["versions"]["green"].update(weight=5, revision="2.4.0")
    summary = summarize(load(tmp_path, dump(data)))
    assert summary == textwrap.dedent(
        """\
        listen: 127.0.0.1:8080, [::1]:8080
        admin: 0.0.0.0:9901 (token set, /metrics needs the token)
        drain timeout: 30s; state file: none
        service shop: host *, path prefix /
          blue    99.5%  127.0.0.1:9001
          green    0.5%  127.0.0.1:9002  revision 2.4.0
          sticky: cookie uid
          force: header X-Canary
          rollout: canary (blue -> green), steps 0.5% 10%, every 1m, auto promotion
            analysis: success rate >= 99%
            rollback after 3 failed check(s); at least 50 requests per interval"""
    )
    assert "secret-token" not in summary


def test_summary_of_every_example() -> None:
    for path in CONFIG_DIR.glob("*.yaml"):
        summary = summarize(load_config(path, env={}))
        assert summary.startswith("listen: 127.0.0.1:8080\n")
        assert "service shop:" in summary


def test_config_digest() -> None:
    digest = config_digest("listen: 127.0.0.1:8080\n")
    assert len(digest) == 12
    assert int(digest, 16) >= 0
    assert digest == config_digest("listen: 127.0.0.1:8080\n")
    assert digest != config_digest("listen: 127.0.0.1:8081\n")
