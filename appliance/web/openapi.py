"""Makes the OpenAPI document (``/schema/openapi.json``) say what the API really does.

Litestar documents what it can see in the handlers' signatures. This adds, at startup, what it
cannot: the error answers of each surface (problem details on ``/api/v1``, OpenAI's and Ollama's
``{"error": …}`` on theirs, Anthropic's on ``/v1/messages``) as every operation's ``default``
response; the JSON bodies the compatible APIs parse themselves; and the forms a path parameter
must take. The test suite runs
schemathesis against the live document so that it stays true.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar._openapi.plugin import OpenAPIPlugin  # the plugin that builds and serves the document
from pydantic import BaseModel

from appliance.auth.service import (
    EXPIRES_PATTERN,
    MAX_KEY_NAME,
    MAX_PASSWORD,
    MIN_PASSWORD,
    USER_NAME_PATTERN,
)
from appliance.cluster.service import NODE_NAME_PATTERN
from appliance.egress.providers import NAME_PATTERN as PROVIDER_NAME_PATTERN
from appliance.models.formats import FORMATS
from appliance.preferences import EDITABLE
from appliance.settings import TOKEN_EXPIRY_PATTERN
from appliance.web.anthropic import MessagesBody
from appliance.web.completions import CompletionBody
from appliance.web.login import MAX_LOGIN_NAME, MAX_SETUP_TOKEN
from appliance.web.ollama import ChatBody, GenerateBody, ModelBody, PullBody
from appliance.web.ollama_models import CopyBody, CreateBody, EmbedBody, EmbeddingsBody, PushBody
from appliance.web.openai import ChatCompletionBody, EmbeddingBody
from appliance.web.providers import ProviderChange, ProviderIn
from appliance.web.responses import ResponsesBody

__all__ = ["complete_openapi"]

# A name[:tag], as names.ModelName parses it (case-insensitive, up to two namespaces).
_COMPONENT = "[A-Za-z0-9][A-Za-z0-9._-]*"
NAME_PATTERN = f"^{_COMPONENT}(/{_COMPONENT}){{0,2}}(:[A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})?$"
# An Ollama name, as refs.parse_ollama_name reads it: [host[:port]/namespace/ | namespace/]model[:tag].
_PART = "[A-Za-z0-9_][A-Za-z0-9._-]{0,79}"
_HOST = "[A-Za-z0-9.-]+(?::[0-9]{1,5})?"
OLLAMA_NAME_PATTERN = f"^(?:{_HOST}/{_PART}/|{_PART}/)?{_PART}(?::[A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})?$"
_PARAMETERS: dict[str, dict[str, Any]] = {
    "name": {"type": "string", "pattern": NAME_PATTERN, "maxLength": 200},
    "download_id": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
    "digest": {"type": "string", "pattern": "^sha256[:-][0-9a-fA-F]{64}$"},
    "key": {"type": "string", "enum": sorted(EDITABLE)},
}
# Body fields checked by the service rather than by the schema's types: what they must look like.
_NAME = {"pattern": NAME_PATTERN, "maxLength": 200}
_FIELDS: dict[str, dict[str, Any]] = {
    "name": _NAME,
    "model": _NAME,
    "digest": {"pattern": "^sha256:[0-9a-fA-F]{64}$"},
    "path": {"minLength": 1, "pattern": "^[^\\x00]+$"},
    "ref": {"minLength": 1},
    "source": _NAME,
    "destination": _NAME,
}
_QUERIES: dict[str, dict[str, Any]] = {
    "since": {"type": "string", "format": "date-time"},
    "until": {"type": "string", "format": "date-time"},
    "model": {"type": "string", "pattern": NAME_PATTERN, "maxLength": 200},
}

# Bodies the compatible APIs parse themselves (to answer in their own error shapes), and the
# providers' (a body field named `models` collides with a dependency's name in Litestar's parsing).
_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/v1/chat/completions", "post"): ChatCompletionBody,
    ("/v1/completions", "post"): CompletionBody,
    ("/v1/embeddings", "post"): EmbeddingBody,
    ("/v1/responses", "post"): ResponsesBody,
    ("/v1/messages", "post"): MessagesBody,
    ("/api/show", "post"): ModelBody,
    ("/api/delete", "delete"): ModelBody,
    ("/api/generate", "post"): GenerateBody,
    ("/api/chat", "post"): ChatBody,
    ("/api/pull", "post"): PullBody,
    ("/api/create", "post"): CreateBody,
    ("/api/copy", "post"): CopyBody,
    ("/api/push", "post"): PushBody,
    ("/api/embed", "post"): EmbedBody,
    ("/api/embeddings", "post"): EmbeddingsBody,
    ("/api/v1/providers", "post"): ProviderIn,
    ("/api/v1/providers/{name}", "patch"): ProviderChange,
}

# Bodies read as bytes, streamed, whatever their Content-Type (a bundle is a tar).
_RAW_BODIES = {("/api/blobs/{digest}", "post"), ("/api/v1/bundle", "post")}

# Answers that stream unless the body says "stream": false.
_STREAMS = {
    "/v1/chat/completions": "text/event-stream",
    "/v1/completions": "text/event-stream",
    "/api/generate": "application/x-ndjson",
    "/api/chat": "application/x-ndjson",
    "/api/pull": "application/x-ndjson",
    "/api/create": "application/x-ndjson",
    "/api/push": "application/x-ndjson",
}
_NAMED = ("model", "name")

_ERRORS: dict[str, tuple[str, dict[str, Any]]] = {
    "Problem": (
        "application/problem+json",
        {
            "type": "object",
            "description": "Problem details (RFC 9457) with the appliance's stable error code and a hint.",
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "code": {"type": "string"},
                "hint": {"type": "string"},
                "errors": {"type": "array", "items": {"type": "object"}},
            },
            "required": ["type", "title", "status", "detail", "code"],
        },
    ),
    "OpenAIError": (
        "application/json",
        {
            "type": "object",
            "description": "OpenAI's error shape; param names the field at fault, when one is.",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                    "required": ["message", "type", "param", "code"],
                }
            },
            "required": ["error"],
        },
    ),
    "AnthropicError": (
        "application/json",
        {
            "type": "object",
            "description": "Anthropic's error shape.",
            "properties": {
                "type": {"const": "error"},
                "error": {
                    "type": "object",
                    "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                    "required": ["type", "message"],
                },
            },
            "required": ["type", "error"],
        },
    ),
    "OllamaError": (
        "application/json",
        {
            "type": "object",
            "description": "Ollama's error shape.",
            "properties": {"error": {"type": "string"}},
            "required": ["error"],
        },
    ),
}

_READINESS = {
    "type": "object",
    "properties": {"ready": {"type": "boolean"}, "reasons": {"type": "array", "items": {"type": "string"}}},
    "required": ["ready", "reasons"],
}


def _surface(path: str) -> str:
    if path == "/v1/messages":
        return "AnthropicError"
    if path.startswith("/v1/"):
        return "OpenAIError"
    if path.startswith("/api/") and not path.startswith("/api/v1/"):
        return "OllamaError"
    return "Problem"


_FIELDS_OF: dict[str, dict[str, dict[str, Any]]] = {
    "ImportIn": {"format": {"enum": list(FORMATS)}},
    # Not model names (Litestar leaves pydantic's patterns out of the document).
    "UserIn": {
        "name": {"pattern": USER_NAME_PATTERN},
        "password": {"minLength": MIN_PASSWORD, "maxLength": MAX_PASSWORD},
    },
    "KeyIn": {"name": {"maxLength": MAX_KEY_NAME}, "expires": {"pattern": EXPIRES_PATTERN}},
    "LoginIn": {
        "name": {"minLength": 1, "maxLength": MAX_LOGIN_NAME},
        "password": {"minLength": 1, "maxLength": MAX_PASSWORD},
    },
    "SetupIn": {
        "token": {"minLength": 1, "maxLength": MAX_SETUP_TOKEN},
        "name": {"pattern": USER_NAME_PATTERN},
        "password": {"minLength": MIN_PASSWORD, "maxLength": MAX_PASSWORD},
    },
    "JoinIn": {"name": {"pattern": NODE_NAME_PATTERN}, "token": {"maxLength": 300}},
    "TokenIn": {"expires": {"pattern": TOKEN_EXPIRY_PATTERN}},
    "ProviderIn": {"name": {"pattern": PROVIDER_NAME_PATTERN}},
    # A push names where it goes too.
    "PushBody": {"model": {"pattern": OLLAMA_NAME_PATTERN}, "name": {"pattern": OLLAMA_NAME_PATTERN}},
}


def _constrain(schema: dict[str, Any]) -> None:
    """Adds _FIELDS' constraints to the string form of each such property of an object schema."""
    for field, constraint in {**_FIELDS, **_FIELDS_OF.get(schema.get("title", ""), {})}.items():
        prop = schema.get("properties", {}).get(field)
        if prop is None:
            continue
        forms = [prop, *prop.get("oneOf", []), *prop.get("anyOf", [])]
        for form in forms:
            if form.get("type") == "string":
                form.update(constraint)


def _body_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    if issubclass(model, ModelBody):  # Ollama names the model as model or, in older clients, name
        schema["anyOf"] = [
            {"required": [field], "properties": {field: {"type": "string"}}} for field in _NAMED
        ]
    _constrain(schema)
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def complete_document(document: dict[str, Any]) -> None:
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for name, (_, schema) in _ERRORS.items():
        components[name] = schema
    for path, item in document.get("paths", {}).items():
        error = _surface(path)
        media_type = _ERRORS[error][0]
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            # Litestar's generic 400 describes its own exception, not the body this API sends.
            responses.pop("400", None)
            responses["default"] = {
                "description": "An error, in this surface's error shape",
                "content": {media_type: {"schema": {"$ref": f"#/components/schemas/{error}"}}},
            }
            if path in _STREAMS and "200" in responses:
                responses["200"].setdefault("content", {})[_STREAMS[path]] = {"schema": {"type": "string"}}
            model = _BODIES.get((path, method))
            if model is not None:
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": _body_schema(model, components)}},
                }
            elif "requestBody" in operation:
                operation["requestBody"]["required"] = True
                for media in operation["requestBody"].get("content", {}).values():
                    ref = media.get("schema", {}).get("$ref", "")
                    _constrain(components.get(ref.rsplit("/", 1)[-1], {}))
            for parameter in operation.get("parameters", []):
                where = _PARAMETERS if parameter.get("in") == "path" else _QUERIES
                if parameter["name"] in where:
                    parameter["schema"] = where[parameter["name"]]
            if method == "head":  # never a body, so no error shape either
                plain: dict[str, Any] = {"text/plain": {}, "application/json": {}}
                operation["responses"] = {"200": {"description": "The route answers", "content": plain}}
                if path.startswith("/api/v1/blobs/"):  # a worker's fetch; errors keep their type
                    blob: dict[str, Any] = {"application/octet-stream": {}, "application/problem+json": {}}
                    operation["responses"] = {
                        "200": {"description": "The verified blob is in the cache", "content": blob},
                        "206": {"description": "The range asked for can be served", "content": blob},
                        "416": {"description": "The range cannot be served", "content": blob},
                        "default": {"description": "No node credential, no such blob", "content": blob},
                    }
                if path.startswith("/api/blobs/"):
                    operation["responses"] = {
                        "200": {"description": "The blob is in the cache", "content": plain},
                        "404": {"description": "The blob is not in the cache", "content": plain},
                        "default": {"description": "The digest is malformed", "content": plain},
                    }
            if (path, method) in _RAW_BODIES:
                operation["requestBody"] = {
                    "required": True,
                    "content": {
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                    },
                }
    readyz = document.get("paths", {}).get("/readyz", {}).get("get")
    if readyz is not None:
        readyz["responses"]["503"] = {
            "description": "Not ready, with the reasons",
            "content": {"application/json": {"schema": _READINESS}},
        }


def complete_openapi(app: Litestar) -> None:
    """Startup hook: completes the document Litestar serves (it builds it once and keeps it)."""
    complete_document(app.plugins.get(OpenAPIPlugin).provide_openapi_schema())
