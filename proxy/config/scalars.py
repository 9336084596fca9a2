"""The config file's values: durations, sizes, endpoints and names, parsed and checked.

Each value type is an `Annotated` alias: the parsing or check that runs on it, and (for
durations, sizes and listeners) the JSON Schema of what a user may write.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

_DURATION_RE = re.compile(r"(?P<number>-?(?:\d+(?:\.\d*)?|\.\d+))\s*(?P<unit>ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HELP = 'must be a duration such as "500ms", "2s", "1m", "1h" or a number of seconds'

_SIZE_RE = re.compile(r"(?P<number>-?\d+)\s*(?P<unit>B|KiB|MiB|GiB)?")
_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_SIZE_HELP = 'must be a size in bytes such as 512, "64KiB", "16MiB" or "1GiB"'


def parse_duration(value: object) -> float:
    """Return `value` in seconds: a number of seconds, or a string `<number><ms|s|m|h>`.

    A bare numeric string counts as seconds, so `${INTERVAL}` substituted from the environment
    works. Raises ValueError for negative, non-finite or malformed input.
    """
    if isinstance(value, bool):  # YAML `yes`/`true` is a bool, and bool is an int subclass
        raise ValueError(_DURATION_HELP)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value.strip())):
        seconds = float(match["number"]) * _DURATION_UNITS[match["unit"] or "s"]
    else:
        raise ValueError(_DURATION_HELP)
    if not math.isfinite(seconds):
        raise ValueError(_DURATION_HELP)
    if seconds < 0:
        raise ValueError("must be >= 0")
    return seconds


def parse_size(value: object) -> int:
    """Return `value` in bytes: an integer, or a string `<integer><B|KiB|MiB|GiB>`.

    Raises ValueError for negative, fractional or malformed input.
    """
    if isinstance(value, bool):
        raise ValueError(_SIZE_HELP)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value.strip())):
        size = int(match["number"]) * _SIZE_UNITS[match["unit"] or "B"]
    else:
        raise ValueError(_SIZE_HELP)
    if size < 0:
        raise ValueError("must be >= 0")
    return size


# The JSON Schema describes what a user may write, not the normalised Python value.
_DURATION_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*(\d+(\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$"},
    ]
}
_SIZE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+\s*(B|KiB|MiB|GiB)?\s*$"},
    ]
}

Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
"""Seconds as a float; written as `"500ms"`, `"2s"`, `"1m"`, `"1h"` or a number of seconds."""

Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(_SIZE_SCHEMA)]
"""Bytes as an int; written as a number of bytes or `"64KiB"`, `"16MiB"`, `"1GiB"`."""

# RFC 9110 `token`: header and cookie names. Hostnames and IPv4 literals use the narrower set.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
# Service and version names end up in URLs (/services/{svc}), metric labels and force values.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")
# Values of the force header/cookie that select a role rather than a version.
_FORCE_KEYWORDS = frozenset({"always", "never"})


def parse_endpoint(text: str) -> tuple[str, int]:
    """Split `"host:port"` or `"[v6]:port"` into `(host, port)`; IPv6 hosts lose the brackets.

    Port 0 is accepted: a listener on port 0 binds a free port (tests do this). Upstream
    endpoints, which must be connectable, additionally reject it (see `_check_upstream`).
    Raises ValueError with a message naming what is wrong (missing port, bad port, IPv6
    without brackets, invalid host).
    """
    text = text.strip()
    if "://" in text:  # a URL where an address belongs: the most common slip
        raise ValueError(f'must be "host:port" without a scheme, got {text!r}')
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f'must be "[v6]:port", got {text!r}')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f'must be "host:port" or "[v6]:port", got {text!r}')
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets, as in [::1]:8080; got {text!r}")
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"{host!r} is not a valid host name or address")
    if not (port_text.isascii() and port_text.isdigit() and int(port_text) <= 65535):
        raise ValueError(f"port must be a number from 1 to 65535, got {port_text!r}")
    return host, int(port_text)


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1: addresses other machines cannot reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_listen(text: str) -> str:
    parse_endpoint(text)
    return text.strip()


def _check_upstream(text: str) -> str:
    if parse_endpoint(text)[1] == 0:
        raise ValueError("port must be a number from 1 to 65535, got '0'")
    return text.strip()


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            'must be 1-63 letters, digits, "_", "." or "-", starting with a letter or digit'
        )
    return name


def _check_version_name(name: str) -> str:
    if name in _FORCE_KEYWORDS:
        raise ValueError(f'"{name}" is reserved: it is a value of the force header')
    return _check_name(name)


def _check_token(name: str) -> str:
    if not _TOKEN_RE.fullmatch(name):
        raise ValueError("must be a header or cookie name (letters, digits and !#$%&'*+-.^_`|~)")
    return name


def _check_optional_token(name: str) -> str:
    return _check_token(name) if name else name


def _check_match_host(host: str) -> str:
    if host != "*" and not _HOSTNAME_RE.fullmatch(host):
        raise ValueError('must be "*" or a host name without port')
    return host.lower()


def _check_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError('must start with "/"')
    return path


def _check_http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return url


def _blank_to_none(value: object) -> object:
    """`${VAR:-}` substitutes to "": treat an empty optional string as not set."""
    return None if isinstance(value, str) and not value.strip() else value


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


ListenAddress = Annotated[str, AfterValidator(_check_listen)]
"""host:port to bind; port 0 binds a free port."""
Endpoint = Annotated[str, AfterValidator(_check_upstream)]
"""host:port of an upstream; port 1..65535."""
Name = Annotated[str, AfterValidator(_check_name)]
VersionName = Annotated[str, AfterValidator(_check_version_name)]
Token = Annotated[str, AfterValidator(_check_token)]
UrlPath = Annotated[str, AfterValidator(_check_path)]
MatchHost = Annotated[str, AfterValidator(_check_match_host)]
"""A host name without port, or "*"; stored lower-case."""
OptionalToken = Annotated[str, AfterValidator(_check_optional_token)]
"""A header name, or "" for none."""
HttpUrl = Annotated[str, AfterValidator(_check_http_url)]
OptionalStr = Annotated[str | None, BeforeValidator(_blank_to_none)]
Percent = Annotated[float, Field(gt=0, le=100)]

_LISTEN_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]
}
ListenList = Annotated[
    list[ListenAddress],
    BeforeValidator(_as_list),
    Field(min_length=1),
    WithJsonSchema(_LISTEN_SCHEMA),
]
