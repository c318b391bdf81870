"""JSON request bodies of the compatible APIs, checked with pydantic into one clear error."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from appliance.errors import InvalidInput

__all__ = ["parse_body"]

BodyT = TypeVar("BodyT", bound=BaseModel)


def parse_body(model: type[BodyT], raw: bytes) -> BodyT:
    """The body as ``model``; the first problem, with where it is, as a 400."""
    if not raw.strip():
        raise InvalidInput("missing request body", hint="send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidInput(f"invalid request: {where}: {first['msg']}") from exc
