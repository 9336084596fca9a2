"""The config models' base class, and cross-field problems reported at their own field paths.

Validators report cross-field problems by raising `ValidationError` with a location relative to
the field they validate, so every problem is reported at the field it is about
(`services.shop.versions: ...`, `admin.token: ...`) and all of them at once. The wording of
pydantic's built-in errors is the loader's business (`loader.format_validation_error`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, NoReturn

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails, InitErrorDetails

Loc = tuple[str | int, ...]


def fail(title: str, problems: Iterable[tuple[Loc, str]]) -> NoReturn:
    """Raise one ValidationError holding every `(relative location, message)` problem.

    pydantic prefixes the location of the field or model being validated, so a validator on
    `ServiceConfig.versions` reporting `(("blue",), "...")` surfaces as
    `services.shop.versions.blue`.
    """
    details: list[InitErrorDetails] = [
        {"type": "value_error", "loc": loc, "input": None, "ctx": {"error": ValueError(msg)}}
        for loc, msg in problems
    ]
    raise ValidationError.from_exception_data(title, details)


def fail_if_any(title: str, problems: list[tuple[Loc, str]]) -> None:
    if problems:
        fail(title, problems)


def relocate(err: ErrorDetails, loc: Loc) -> InitErrorDetails:
    detail: InitErrorDetails = {"type": err["type"], "loc": loc, "input": err["input"]}
    if "ctx" in err:
        detail["ctx"] = err["ctx"]
    return detail


class ConfigModel(BaseModel):
    # Frozen: a validated config is shared by the control plane and tests; nobody patches it.
    # Attribute docstrings become descriptions in `laneswitch schema`.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
