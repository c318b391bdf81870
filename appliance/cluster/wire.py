"""The engine's types as JSON, for the work channel between the server and a worker.

A routed request crosses as a load spec (digests, never a path: each side has its own cache), a
prompt, and back a stream of events, one JSON object per line (NDJSON). An error ends a stream
as an event that names its code, so the client sees the worker's own error (a prompt too long,
a model that cannot load), not a generic failure. Imports: the engine's base and errors only.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

from appliance.engine.base import (
    Embeddings,
    EngineEvent,
    Finished,
    LoadSpec,
    Prompt,
    Ready,
    ReasoningChunk,
    SamplingParams,
    TextChunk,
    TokenLogprob,
    ToolSet,
)
from appliance.errors import ApplianceError, InvalidInput, all_error_classes

__all__ = [
    "decode_embeddings",
    "decode_error",
    "decode_event",
    "decode_prompt",
    "decode_spec",
    "encode_embeddings",
    "encode_error",
    "encode_event",
    "encode_prompt",
    "encode_spec",
]


def encode_spec(spec: LoadSpec) -> dict[str, Any]:
    """Everything but the path: the worker finds the blob by digest in its own cache."""
    fields = dataclasses.asdict(spec)
    del fields["path"]
    return fields


def decode_spec(data: dict[str, Any], path: Path) -> LoadSpec:
    """The spec with ``path`` where this side keeps the blob."""
    try:
        return LoadSpec(**data, path=path)
    except TypeError as exc:
        raise InvalidInput(f"not a load spec: {exc}") from exc


def encode_prompt(prompt: Prompt) -> dict[str, Any]:
    fields = dataclasses.asdict(prompt)
    fields["tools"] = None if prompt.tools is None else dataclasses.asdict(prompt.tools)
    return fields


def decode_prompt(data: dict[str, Any]) -> Prompt:
    try:
        fields = dict(data)
        fields["sampling"] = SamplingParams(**fields.get("sampling", {}))
        tools = fields.get("tools")
        fields["tools"] = None if tools is None else ToolSet(**{**tools, "tools": tuple(tools["tools"])})
        fields["stop"] = tuple(fields.get("stop", ()))
        fields["context"] = tuple(fields.get("context", ()))
        return Prompt(**fields)
    except (TypeError, KeyError) as exc:
        raise InvalidInput(f"not a prompt: {exc}") from exc


def _encode_logprob(item: TokenLogprob) -> dict[str, Any]:
    return {
        "token": item.token,
        "logprob": item.logprob,
        "bytes": base64.b64encode(item.bytes).decode(),
        "top": [_encode_logprob(top) for top in item.top],
    }


def _decode_logprob(data: dict[str, Any]) -> TokenLogprob:
    return TokenLogprob(
        token=data["token"],
        logprob=data["logprob"],
        bytes=base64.b64decode(data["bytes"]),
        top=tuple(_decode_logprob(top) for top in data.get("top", ())),
    )


def encode_error(error: ApplianceError) -> dict[str, Any]:
    return {"code": error.code, "message": error.message, "hint": error.hint}


def decode_error(data: dict[str, Any]) -> ApplianceError:
    """The error class the code names (so the client gets the same status), else the base."""
    classes = {cls.code: cls for cls in reversed(all_error_classes())}  # the first class with a code wins
    cls = classes.get(str(data.get("code")), ApplianceError)
    try:
        return cls(str(data.get("message", "")), hint=data.get("hint"))
    except TypeError:  # a class with its own constructor: keep the message, lose the exact type
        return ApplianceError(str(data.get("message", "")), hint=data.get("hint"))


def encode_event(event: EngineEvent) -> dict[str, Any]:
    if isinstance(event, Ready):
        return {"type": "ready", **dataclasses.asdict(event)}
    if isinstance(event, TextChunk):
        return {"type": "text", "text": event.text, "logprobs": [_encode_logprob(i) for i in event.logprobs]}
    if isinstance(event, ReasoningChunk):
        return {"type": "reasoning", "text": event.text}
    fields = {field.name: getattr(event, field.name) for field in dataclasses.fields(event)}
    fields["error"] = None if event.error is None else encode_error(event.error)
    fields["context"] = list(event.context)
    return {"type": "finished", **fields}


def decode_event(data: dict[str, Any]) -> EngineEvent:
    try:
        kind = data["type"]
        fields = {key: value for key, value in data.items() if key != "type"}
        if kind == "ready":
            return Ready(**fields)
        if kind == "text":
            return TextChunk(fields["text"], tuple(_decode_logprob(i) for i in fields.get("logprobs", ())))
        if kind == "reasoning":
            return ReasoningChunk(fields["text"])
        if kind == "finished":
            error = fields.get("error")
            fields["error"] = None if error is None else decode_error(error)
            fields["context"] = tuple(fields.get("context", ()))
            return Finished(**fields)
    except (TypeError, KeyError) as exc:
        raise InvalidInput(f"not an engine event: {exc}") from exc
    raise InvalidInput(f"not an engine event: type {kind!r}")


def encode_embeddings(result: Embeddings) -> dict[str, Any]:
    return {"type": "embeddings", **dataclasses.asdict(result)}


def decode_embeddings(data: dict[str, Any]) -> Embeddings:
    try:
        return Embeddings(vectors=data["vectors"], tokens=data["tokens"], reason=data["reason"])
    except KeyError as exc:
        raise InvalidInput(f"not embeddings: missing {exc}") from exc
