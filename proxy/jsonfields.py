"""Dataclass fields from JSON written by another program version (the state file, the store).

Another laneswitch version may add fields (ignored here) or change a field's type (the entry
is refused as a whole, so a half-understood record is never used).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any


class Unreadable(ValueError):
    """A JSON entry that does not fit the dataclass it stands for."""


def known_fields(cls: type[Any], data: object) -> dict[str, Any]:
    """The keyword arguments of dataclass `cls` found in `data`: unknown keys dropped, every
    known one checked against its annotation. Unreadable when `data` is not an object or a
    value has the wrong type (a missing field keeps its default; one without a default is
    Unreadable too)."""
    if not isinstance(data, Mapping):
        raise Unreadable(f"expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    found: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        name = field.name
        if name not in data:
            if (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                raise Unreadable(f"{name}: missing")
            continue
        value = data[name]
        if not fits(value, hints[name]):
            raise Unreadable(f"{name}: {value!r} is not {hints[name]}")
        found[name] = value
    return found


def fits(value: object, hint: Any) -> bool:
    """Whether a JSON value fits a type annotation (the few shapes JSON records use)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in typing.get_args(hint))
    if origin is not None:
        hint = origin
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True
