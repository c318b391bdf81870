"""A request for an external provider, built from what the client asked (REQ-MODELS-0116).

An external provider honours what OpenAI's and Anthropic's APIs can say; the samplers and token
tricks of the local engine it cannot (min_p, typical_p, repeat_penalty, repeat_last_n, mirostat,
Ollama's context, num_ctx and think, fill in the middle), so those are refused by name, never
dropped. Only what the client set goes out: a value the client's API implies by default
(``GenerationOptions.implied``, such as OpenAI's temperature 1) is left to the provider's own.

Messages arrive as chat templates read them (a call's arguments an object) and leave in OpenAI's
chat shape (the arguments a JSON string), which the egress adapters translate for each kind.
Imports: the engine's base, errors and the egress types.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from appliance.egress.types import ExternalRequest
from appliance.engine.base import SamplerOptions
from appliance.errors import ProviderUnsupported

if TYPE_CHECKING:
    from appliance.engine.service import GenerationOptions

__all__ = ["external_request", "wire_messages"]

# The local engine's samplers, by the name a client sends them under; none leaves the box.
_LOCAL_SAMPLERS = (
    "min_p",
    "typical_p",
    "repeat_penalty",
    "repeat_last_n",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
)
_NEUTRAL = {option.name: option.default for option in fields(SamplerOptions)}
# Fields of a chat message a provider reads; the rest (an earlier answer's reasoning) stays here.
_MESSAGE_FIELDS = ("role", "content", "name", "tool_call_id")


def external_request(
    model: str,
    options: GenerationOptions,
    *,
    provider: str,
    messages: list[dict[str, Any]] | None = None,
    prompt: str | None = None,
    suffix: str | None = None,
) -> ExternalRequest:
    """The provider's request for ``model``; ProviderUnsupported naming the first field it cannot
    honour."""
    for name in _LOCAL_SAMPLERS:
        if getattr(options, name) != _NEUTRAL[name]:
            _refuse(name, provider, "a llama.cpp sampler")
    if options.context:
        _refuse("context", provider, "an earlier answer's token ids, which only a local model reads")
    if options.context_length is not None:
        _refuse("num_ctx", provider, "the provider decides its context length")
    if options.think is not None:
        _refuse("think", provider, "its reasoning switch is the provider's own")
    if suffix is not None:
        _refuse("suffix", provider, "fill in the middle needs a local model's FIM tokens")

    def given(name: str, value: Any) -> Any:
        return None if name in options.implied else value

    return ExternalRequest(
        model=model,
        messages=None if messages is None else wire_messages(messages),
        prompt=prompt,
        max_tokens=options.max_tokens,
        temperature=given("temperature", options.temperature),
        top_p=given("top_p", options.top_p),
        top_k=options.top_k,
        stop=options.stop,
        seed=options.seed,
        # 0 is no penalty: the provider's default, so it is not sent
        presence_penalty=given("presence_penalty", options.presence_penalty or None),
        frequency_penalty=given("frequency_penalty", options.frequency_penalty or None),
        json_mode=options.json_mode,
        json_schema=options.json_schema,
        tools=options.tools,
        logprobs=options.logprobs,
    )


def _refuse(field: str, provider: str, why: str) -> None:
    raise ProviderUnsupported(
        f"{field} is not supported by external provider {provider} ({why})",
        hint=f"leave {field} out, or ask for a local model",
    )


def wire_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat-template turns as OpenAI chat messages: a call's arguments as a JSON string, an
    assistant's content null beside its calls, and nothing a provider would not read."""
    wire = []
    for message in messages:
        turn = {key: message[key] for key in _MESSAGE_FIELDS if message.get(key) is not None}
        calls = message.get("tool_calls")
        if calls:
            turn["tool_calls"] = [_wire_call(call) for call in calls]
            turn["content"] = turn.get("content") or None
        wire.append(turn)
    return wire


def _wire_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    arguments = function.get("arguments") or {}
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {
        "id": call.get("id") or "",
        "type": "function",
        "function": {"name": function["name"], "arguments": text},
    }
