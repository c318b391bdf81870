"""The requests an external provider gets, per kind: URL, headers and JSON body from an
``ExternalRequest``. A field the kind cannot honour is refused (``ProviderUnsupported``, naming the
field and the provider), never dropped.

========== ======================== ================================ ==========================
kind       chat                     complete                         embed / models
========== ======================== ================================ ==========================
openai     POST {base}/chat/        POST {base}/completions          POST {base}/embeddings,
           completions                                               GET {base}/models
anthropic  POST {base}/v1/messages  refused                          refused, GET {base}/v1/models
========== ======================== ================================ ==========================

Chat and completions always stream (``stream: true``; OpenAI's usage comes in the last chunk
with ``stream_options.include_usage``). OpenAI-style messages (system, user text and images,
assistant tool calls, tool results) become Anthropic's: the system prompt apart, ``tool_use`` and
``tool_result`` blocks, consecutive messages of one role merged. Headers: ``Authorization: Bearer``
(openai) or ``x-api-key`` with ``anthropic-version`` (anthropic); no key, no auth header.

Imports: the egress types and errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from appliance.egress.types import ExternalRequest, Provider
from appliance.errors import ProviderUnsupported

__all__ = [
    "ANTHROPIC_MAX_TOKENS",
    "ANTHROPIC_VERSION",
    "Outbound",
    "chat_request",
    "complete_request",
    "embed_request",
    "headers",
    "models_request",
]

ANTHROPIC_VERSION = "2023-06-01"
# Anthropic requires max_tokens; every Claude model can write this many (some no more).
ANTHROPIC_MAX_TOKENS = 4096


@dataclass(frozen=True)
class Outbound:
    """One HTTP request to a provider (without its key: ``headers`` adds that at send time)."""

    method: str
    url: str
    body: dict[str, Any] | None = None


def headers(provider: Provider, key: str | None) -> dict[str, str]:
    """The provider's auth and version headers; none for auth when it has no key."""
    if provider.kind == "anthropic":
        found = {"anthropic-version": ANTHROPIC_VERSION}
        if key:
            found["x-api-key"] = key
        return found
    return {"Authorization": f"Bearer {key}"} if key else {}


def models_request(provider: Provider) -> Outbound:
    return Outbound("GET", _url(provider, "models"))


def chat_request(provider: Provider, request: ExternalRequest) -> Outbound:
    if request.messages is None:
        raise ProviderUnsupported(f"a chat call to provider {provider.name} needs messages")
    _refuse(provider, request, "logprobs", request.logprobs is not None)
    if provider.kind == "anthropic":
        return Outbound("POST", _url(provider, "messages"), _anthropic_body(provider, request))
    _refuse(provider, request, "top_k", request.top_k is not None)
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [
            _openai_message(provider, message, index) for index, message in enumerate(request.messages)
        ],
        **_openai_sampling(request),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": request.json_schema},
        }
    elif request.json_mode:
        body["response_format"] = {"type": "json_object"}
    if request.tools is not None:
        body["tools"] = list(request.tools.tools)
        if request.tools.function is not None:
            body["tool_choice"] = {"type": "function", "function": {"name": request.tools.function}}
        elif request.tools.required:
            body["tool_choice"] = "required"
        if not request.tools.parallel:
            body["parallel_tool_calls"] = False
    return Outbound("POST", _url(provider, "chat/completions"), body)


def complete_request(provider: Provider, request: ExternalRequest) -> Outbound:
    if provider.kind == "anthropic":
        raise ProviderUnsupported(
            f"provider {provider.name} (anthropic) has no raw completions; only chat",
            hint="send the prompt as a chat message, or use an openai-kind provider",
        )
    if request.prompt is None:
        raise ProviderUnsupported(f"a completion call to provider {provider.name} needs a prompt")
    _refuse(provider, request, "logprobs", request.logprobs is not None)
    _refuse(provider, request, "top_k", request.top_k is not None)
    _refuse(provider, request, "json_mode", request.json_mode)
    _refuse(provider, request, "json_schema", request.json_schema is not None)
    _refuse(provider, request, "tools", request.tools is not None)
    body: dict[str, Any] = {
        "model": request.model,
        "prompt": request.prompt,
        **_openai_sampling(request),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return Outbound("POST", _url(provider, "completions"), body)


def embed_request(provider: Provider, model: str, texts: list[str]) -> Outbound:
    if provider.kind == "anthropic":
        raise ProviderUnsupported(
            f"provider {provider.name} (anthropic) makes no embeddings",
            hint="use a local embedding model, or an openai-kind provider",
        )
    return Outbound("POST", _url(provider, "embeddings"), {"model": model, "input": texts})


def _url(provider: Provider, path: str) -> str:
    base = provider.base_url.rstrip("/")
    # OpenAI-style bases carry their version (".../v1"); Anthropic's is the bare host.
    return f"{base}/v1/{path}" if provider.kind == "anthropic" else f"{base}/{path}"


def _refuse(provider: Provider, request: ExternalRequest, field: str, given: bool) -> None:
    if given:
        raise ProviderUnsupported(
            f"{field} is not supported by provider {provider.name} ({provider.kind}), "
            f"for model {request.model}",
            hint=f"leave {field} out, or ask for a local model",
        )


def _openai_sampling(request: ExternalRequest) -> dict[str, Any]:
    """The sampling fields the client set; unset ones are left to the provider."""
    fields = {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "stop": list(request.stop) or None,
    }
    return {name: value for name, value in fields.items() if value is not None}


def _openai_message(provider: Provider, message: dict[str, Any], index: int) -> dict[str, Any]:
    """The message with OpenAI's fields only (a chat template's extras left out), arguments as JSON."""
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise ProviderUnsupported(
            f"messages.{index}.role {role!r} cannot be sent to provider {provider.name}"
        )
    clean: dict[str, Any] = {"role": role, "content": message.get("content")}
    if role == "tool":
        clean["tool_call_id"] = message.get("tool_call_id")
    if role == "assistant" and message.get("tool_calls"):
        clean["tool_calls"] = [
            {
                "id": call.get("id"),
                "type": "function",
                "function": {
                    "name": call["function"]["name"],
                    "arguments": _arguments_text(call["function"].get("arguments")),
                },
            }
            for call in message["tool_calls"]
        ]
    return clean


def _arguments_text(arguments: Any) -> str:
    if arguments is None:
        return "{}"
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _arguments_object(provider: Provider, arguments: Any, where: str) -> dict[str, Any]:
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else (arguments or {})
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ProviderUnsupported(
            f"{where}.function.arguments must be a JSON object to send to provider {provider.name}"
        )
    return parsed


# Anthropic's Messages API


def _anthropic_body(provider: Provider, request: ExternalRequest) -> dict[str, Any]:
    _refuse(provider, request, "seed", request.seed is not None)
    _refuse(provider, request, "presence_penalty", request.presence_penalty is not None)
    _refuse(provider, request, "frequency_penalty", request.frequency_penalty is not None)
    _refuse(provider, request, "json_mode", request.json_mode)
    system, messages = _anthropic_messages(provider, request.messages or [])
    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        "max_tokens": request.max_tokens if request.max_tokens is not None else ANTHROPIC_MAX_TOKENS,
        "stream": True,
    }
    if system:
        body["system"] = system
    sampling = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k}
    body.update({name: value for name, value in sampling.items() if value is not None})
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    if request.json_schema is not None:
        body["output_config"] = {"format": {"type": "json_schema", "schema": request.json_schema}}
    if request.tools is not None:
        body["tools"] = [
            _anthropic_tool(provider, tool, index) for index, tool in enumerate(request.tools.tools)
        ]
        choice: dict[str, Any] = {"type": "auto"}
        if request.tools.function is not None:
            choice = {"type": "tool", "name": request.tools.function}
        elif request.tools.required:
            choice = {"type": "any"}
        if not request.tools.parallel:
            choice["disable_parallel_tool_use"] = True
        body["tool_choice"] = choice
    return body


def _anthropic_tool(provider: Provider, tool: dict[str, Any], index: int) -> dict[str, Any]:
    function = tool.get("function")
    if tool.get("type") != "function" or not isinstance(function, dict):
        raise ProviderUnsupported(
            f"tools.{index} must be a function tool to send to provider {provider.name}"
        )
    converted = {
        "name": function["name"],
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        converted["description"] = function["description"]
    return converted


def _anthropic_messages(
    provider: Provider, messages: list[dict[str, Any]]
) -> tuple[str, list[dict[str, Any]]]:
    """The system prompt apart, the rest as user/assistant turns of blocks (same roles merged)."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_plain_text(provider, message.get("content"), f"{where}.content"))
            continue
        if role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id"),
                "content": _plain_text(provider, message.get("content"), f"{where}.content"),
            }
            blocks, role = [result], "user"
        elif role in ("user", "assistant"):
            blocks = _blocks(provider, message.get("content"), f"{where}.content")
            for number, call in enumerate(message.get("tool_calls") or ()):
                function = call["function"]
                arguments = _arguments_object(
                    provider, function.get("arguments"), f"{where}.tool_calls.{number}"
                )
                blocks.append(
                    {"type": "tool_use", "id": call.get("id"), "name": function["name"], "input": arguments}
                )
        else:
            raise ProviderUnsupported(f"{where}.role {role!r} cannot be sent to provider {provider.name}")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return "\n\n".join(system), turns


def _plain_text(provider: Provider, content: Any, where: str) -> str:
    blocks = _blocks(provider, content, where)
    if any(block["type"] != "text" for block in blocks):
        raise ProviderUnsupported(f"{where} may only hold text to send to provider {provider.name}")
    return "".join(block["text"] for block in blocks)


def _blocks(provider: Provider, content: Any, where: str) -> list[dict[str, Any]]:
    """Text and image parts as Anthropic content blocks (empty text is left out: it is refused there)."""
    if content is None or content == "":
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks: list[dict[str, Any]] = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(provider, part.get("image_url"), f"{where}.{number}"))
        else:
            raise ProviderUnsupported(
                f"{where}.{number}.type {kind!r} cannot be sent to provider {provider.name}; "
                "send text or image_url parts"
            )
    return blocks


def _image(provider: Provider, image: Any, where: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise ProviderUnsupported(
            f"{where}.image_url.url is required to send an image to provider {provider.name}"
        )
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type, _, encoding = header.removeprefix("data:").partition(";")
        if encoding != "base64" or not data:
            raise ProviderUnsupported(f"{where}.image_url must be a base64 data URL or an http(s) URL")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise ProviderUnsupported(f"{where}.image_url must be a base64 data URL or an http(s) URL")
