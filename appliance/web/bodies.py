"""JSON request bodies of the compatible APIs, checked with pydantic into one clear error."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from appliance.engine.base import ToolSet
from appliance.engine.tools import offer_tools
from appliance.errors import InvalidInput

__all__ = ["InvalidField", "implied", "offer_body_tools", "parse_body", "refuse_unsupported"]

BodyT = TypeVar("BodyT", bound=BaseModel)


class InvalidField(InvalidInput):
    """A body field that is wrong or not supported; ``param`` names it (OpenAI's errors carry it)."""

    def __init__(self, message: str, *, param: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.param = param


def parse_body(model: type[BodyT], raw: bytes) -> BodyT:
    """The body as ``model``; the first problem, with where it is, as a 400."""
    if not raw.strip():
        raise InvalidInput("missing request body", hint="send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        message = first["msg"]
        if first["type"] == "finite_number" or _not_finite(first.get("input")):
            message = "not a finite number"  # NaN passes no bound, so pydantic would name the bound
        raise InvalidField(f"invalid request: {where}: {message}", param=where) from exc


def _not_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def refuse_unsupported(body: BaseModel, accepted: Mapping[str, tuple[Any, ...]], *, where: str = "") -> None:
    """Refuse a field this appliance does not implement yet, unless it holds a value that asks for
    nothing (null, empty, false, the default): silently ignoring it would answer another question."""
    given = body.model_extra or {}
    for field, neutral in accepted.items():
        value = given.get(field)
        if value is None or any(value == ok and type(value) is type(ok) for ok in neutral):
            continue
        if isinstance(value, int | float) and not isinstance(value, bool) and value in neutral:
            continue  # 0 and 0.0 are the same request
        shown = ", ".join("null" if ok is None else repr(ok) for ok in (None, *neutral))
        raise InvalidField(
            f"{where}{field} is not supported by this appliance",
            param=f"{where}{field}",
            hint=f"leave {field} out (or send {shown})",
        )


def implied(body: BaseModel, *names: str) -> frozenset[str]:
    """Which of ``names`` hold the API's own default, not a value the client sent: an external
    provider applies its own default for them (GenerationOptions.implied)."""
    return frozenset(names) - body.model_fields_set


def offer_body_tools(tools: list[Any] | None, choice: Any, parallel: bool | None) -> ToolSet | None:
    """The body's tools in chat's function shape, offered through the engine's checks; an error
    names the field at fault (tools or tool_choice), as OpenAI's errors do."""
    try:
        return offer_tools(tools, choice, parallel)
    except InvalidInput as exc:
        field = "tool_choice" if exc.message.startswith("tool_choice") else "tools"
        raise InvalidField(exc.message, param=field, hint=exc.hint or None) from exc
