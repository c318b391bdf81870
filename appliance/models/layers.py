"""Ollama's model layers beside a model's GGUF: template, system, params, messages, license.

``/api/create`` writes them and ``/api/push`` sends them as Ollama's
``application/vnd.ollama.image.<layer>`` layers. Each is an artifact of format ``file`` named
after its layer (``system``, ``params``, ...), so a model derived from another shares its GGUF
blob and holds only these small files of its own. The engine's services read them back as a
model's defaults: its chat template, its system prompt and earlier messages, its options.

    template   a Jinja chat template, in place of the GGUF's own (Go templates are refused)
    system     the system prompt a conversation without one gets
    messages   JSON list of {role, content}: turns put before every conversation
    params     JSON object of Ollama options (the ones in PARAMETERS): defaults under a request's
    license    text, kept and pushed with the model

May import: errors, store types and the cache.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import InvalidInput, StorageFailure
from appliance.store.base import Model
from appliance.store.cache import BlobCache

__all__ = [
    "LAYERS",
    "MEDIA_TYPE",
    "PARAMETERS",
    "ModelLayers",
    "check_messages",
    "check_parameters",
    "check_template",
    "layer_bytes",
    "read_layers",
]

LAYERS = ("template", "system", "messages", "params", "license")
MEDIA_TYPE = "application/vnd.ollama.image.{layer}"
MAX_LAYER_BYTES = 1024 * 1024  # read into memory on every request: small by design
# Ollama options the engine honours as a model's defaults, and the type each must have.
PARAMETERS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "seed": int,
    "num_predict": int,
    "num_ctx": int,
    "stop": list,
}
_ROLES = ("system", "user", "assistant")
# Go's text/template (Ollama's own templates): {{ .Prompt }}, {{ range .Messages }}, {{ end }}
_GO_TEMPLATE = re.compile(r"{{-?\s*(?:\.|range\b|end\b|if\s+\.|else\b)")


@dataclass(frozen=True)
class ModelLayers:
    """A model's Ollama layers; empty for a model that has none."""

    template: str | None = None
    system: str | None = None
    messages: tuple[dict[str, str], ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    license: str | None = None


def check_template(template: str) -> str:
    """A chat template the engine can render: Jinja, as GGUFs carry it and ``/api/show`` reports it."""
    if _GO_TEMPLATE.search(template):
        raise InvalidInput(
            "template is a Go template (Ollama's own syntax); this appliance renders Jinja chat"
            " templates, as GGUF files carry them",
            hint="send the template /api/show reports for the model, edited, or leave template out",
        )
    import jinja2  # here: every command that opens the registry would pay for it
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidInput(f"template is not a valid Jinja template: {exc}") from exc
    return template


def check_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """Ollama's ``parameters`` as the params layer holds them: known names, right types, ``stop`` a list."""
    checked: dict[str, Any] = {}
    for name, value in parameters.items():
        wanted = PARAMETERS.get(name)
        if wanted is None:
            raise InvalidInput(
                f"parameters.{name} is not supported by this appliance",
                hint=f"use only {', '.join(PARAMETERS)}",
            )
        if name == "stop" and isinstance(value, str):
            value = [value]
        if wanted is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        valid = isinstance(value, wanted) and not isinstance(value, bool)
        if name == "stop":
            valid = valid and all(isinstance(item, str) and item for item in value)
        if not valid or (isinstance(value, float) and not (value >= 0 and value != float("inf"))):
            raise InvalidInput(f"parameters.{name} must be {_described(wanted)}, not {value!r}")
        checked[name] = value
    return checked


def _described(wanted: type) -> str:
    return {float: "a number of 0 or more", int: "an integer", list: "a string or a list of strings"}[wanted]


def check_messages(messages: list[dict[str, Any]]) -> tuple[dict[str, str], ...]:
    """Turns put before every conversation: each a role (system, user, assistant) and text."""
    checked: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise InvalidInput(
                f"messages.{index}.role {role!r} is not supported; use one of {', '.join(_ROLES)}"
            )
        if not isinstance(content, str):
            raise InvalidInput(f"messages.{index}.content must be text")
        unknown = sorted(set(message) - {"role", "content"})
        if unknown:
            raise InvalidInput(f"messages.{index}.{unknown[0]} is not supported in a model's messages")
        checked.append({"role": role, "content": content})
    return tuple(checked)


def layer_bytes(layers: ModelLayers) -> dict[str, bytes]:
    """The layers a model holds, as the files (and Ollama layers) that carry them."""
    contents: dict[str, bytes] = {}
    if layers.template is not None:
        contents["template"] = layers.template.encode()
    if layers.system is not None:
        contents["system"] = layers.system.encode()
    if layers.messages:
        contents["messages"] = json.dumps(list(layers.messages)).encode()
    if layers.parameters:
        contents["params"] = json.dumps(layers.parameters, sort_keys=True).encode()
    if layers.license is not None:
        contents["license"] = layers.license.encode()
    return contents


def read_layers(model: Model, cache: BlobCache) -> ModelLayers:
    """The model's layers, read from its ``file`` artifacts named after them."""
    texts: dict[str, str] = {}
    for artifact in model.artifacts:
        if artifact.format != "file" or artifact.filename not in LAYERS:
            continue
        if artifact.size_bytes > MAX_LAYER_BYTES or not cache.has(artifact.digest):
            raise StorageFailure(
                f"the {artifact.filename} layer of {model.name} is missing or over {MAX_LAYER_BYTES} bytes",
                hint="run `appliance models verify`, or create the model again",
            )
        texts[artifact.filename] = cache.path(artifact.digest).read_text(encoding="utf-8", errors="replace")
    try:
        messages = json.loads(texts["messages"]) if "messages" in texts else []
        parameters = json.loads(texts["params"]) if "params" in texts else {}
        return ModelLayers(
            template=texts.get("template"),
            system=texts.get("system"),
            messages=check_messages(messages),
            parameters=check_parameters(parameters),
            license=texts.get("license"),
        )
    except (ValueError, AttributeError, InvalidInput) as exc:
        raise StorageFailure(
            f"the layers of {model.name} cannot be read: {exc}", hint="create the model again"
        ) from exc
