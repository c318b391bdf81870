"""The tools the tool-calling tests offer, written once in the Chat Completions shape, with the
Responses and Messages shapes derived from it so each API is offered the same functions."""

from __future__ import annotations

from typing import Any

__all__ = ["ASK", "TIME", "WEATHER", "messages_tool", "responses_tool"]

# Any: the clients' typed parameters take these as they are.
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        # The ampersand must reach the prompt as it is (not escaped as \u0026).
        "description": "The weather & temperature in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]


def responses_tool(tool: Any) -> Any:
    """The Responses API's flat function tool, strict as its clients send it."""
    return {"type": "function", **tool["function"], "strict": True}


def messages_tool(tool: Any) -> Any:
    """The Messages API's tool: the function's name and description, its parameters as input_schema."""
    function = tool["function"]
    described = {"description": function["description"]} if "description" in function else {}
    return {"name": function["name"], **described, "input_schema": function["parameters"]}
