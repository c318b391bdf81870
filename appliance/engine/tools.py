"""Tool calling: tools offered through the model's own chat template, and its calls read back.

Each family of chat templates writes tool calls its own way, and the family is told from the
template's text, as llama.cpp's server does (``common/chat.cpp``):

- hermes: the template has ``<tool_call>`` (Hermes 2/3, Qwen 2.5/3); calls are
  ``<tool_call>{"name", "arguments"}</tool_call>``, one block per call.
- llama3: it has ``<|start_header_id|>ipython<|end_header_id|>`` (Llama 3.1-3.3); a call is
  ``{"name", "parameters"}``, after ``<|python_tag|>`` or alone.
- mistral: it has ``[TOOL_CALLS]`` (Mistral Nemo, Small, Large); calls are
  ``[TOOL_CALLS][{"name", "arguments"}, …]``.
- generic: anything else; calls are ``{"tool_calls": [{"name", "arguments"}, …]}``.

A template that never mentions ``tools`` cannot show them, so the tools and the JSON to answer
with go into a system preamble (the generic format), and earlier calls and results are written
into the conversation as that JSON. ``tool_choice`` required or named constrains decoding with a
grammar built from the tools' JSON schemas inside the family's markup, so even a small model
answers with a valid call.

Pure apart from building a grammar (llama.cpp's schema converter, imported then); may import
``appliance.engine.base`` and ``appliance.errors`` only.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.engine.base import ToolCall, ToolSet
from appliance.errors import InvalidInput

__all__ = [
    "FORMATS",
    "ToolCallReader",
    "detect_format",
    "handles_tools",
    "new_call_id",
    "offer_tools",
    "prepare_messages",
    "tool_grammar",
    "tools_for_template",
]

FORMATS = ("hermes", "llama3", "mistral", "generic")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def detect_format(template: str) -> str:
    """The tool-call format of a chat template (see the table above)."""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|start_header_id|>ipython<|end_header_id|>" in template or "<|python_tag|>" in template:
        return "llama3"
    return "generic"


def handles_tools(template: str) -> bool:
    """Whether the template shows the tools itself (it reads ``tools``), rather than a preamble."""
    return re.search(r"\btools\b", template) is not None


# -- what a request offers -----------------------------------------------------------------------


def offer_tools(tools: list[Any] | None, choice: Any = None, parallel: bool | None = None) -> ToolSet | None:
    """The tools a request offers, checked; None when none are (no tools, or tool_choice "none")."""
    if choice is not None and not isinstance(choice, str | dict):
        raise InvalidInput('tool_choice must be "none", "auto", "required" or {"type": "function", ...}')
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise InvalidInput(
            f'tool_choice {choice!r} is not supported; use "none", "auto", "required" or a function'
        )
    if not tools:
        if choice not in (None, "none", "auto"):
            raise InvalidInput("tool_choice asks for a tool call, but the request offers no tools")
        return None
    checked = tuple(_checked_tool(index, tool) for index, tool in enumerate(tools))
    names = [tool["function"]["name"] for tool in checked]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidInput(
            f"tools name {', '.join(duplicates)} more than once; give each function its own name"
        )
    if choice == "none":
        return None
    function = None
    if isinstance(choice, dict):
        named = choice.get("function") if choice.get("type") == "function" else None
        function = named.get("name") if isinstance(named, dict) else None
        if not isinstance(function, str):
            raise InvalidInput(
                'tool_choice as an object must be {"type": "function", "function": {"name": ...}}'
            )
        if function not in names:
            raise InvalidInput(f"tool_choice names {function!r}, which is not among the tools offered")
    return ToolSet(
        tools=checked, required=choice == "required", function=function, parallel=parallel is not False
    )


def _checked_tool(index: int, tool: Any) -> dict[str, Any]:
    where = f"tools.{index}"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise InvalidInput(
            f'{where} is not supported: only {{"type": "function", "function": {{...}}}} tools are'
        )
    function = tool.get("function")
    if not isinstance(function, dict):
        raise InvalidInput(
            f"{where}.function is missing; send the function's name, description and parameters"
        )
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(f"{where}.function.name must be 1 to 64 letters, digits, '_', '.' or '-'")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidInput(f"{where}.function.parameters must be a JSON schema object")
    return {"type": "function", "function": {**function, "parameters": parameters or _EMPTY_PARAMETERS}}


# -- the conversation as the template sees it ----------------------------------------------------


def tools_for_template(tools: ToolSet) -> list[dict[str, Any]]:
    """The tools as chat templates read them (Hugging Face's ``tools``): a named choice offers that one."""
    if tools.function is None:
        return list(tools.tools)
    return [tool for tool in tools.tools if tool["function"]["name"] == tools.function]


def prepare_messages(
    messages: list[dict[str, Any]], tools: ToolSet | None, *, template: str
) -> list[dict[str, Any]]:
    """Messages the template can render: earlier tool calls and results in its format, and the
    generic preamble when the template cannot show tools itself."""
    fmt = detect_format(template)
    if handles_tools(template):
        return [_mistral_ids(message) for message in messages] if fmt == "mistral" else messages
    prepared = _calls_as_text(messages)
    if tools is not None:
        prepared = _with_preamble(
            prepared, _preamble(tools), system=re.search(r"\bsystem\b", template) is not None
        )
    return prepared


def _mistral_ids(message: dict[str, Any]) -> dict[str, Any]:
    """Mistral's templates refuse ids that are not 9 letters and digits; map ours onto such ids."""

    def short(call_id: Any) -> str:
        return hashlib.sha256(str(call_id).encode()).hexdigest()[:9]

    if message.get("tool_calls"):
        calls = [{**call, "id": short(call.get("id"))} for call in message["tool_calls"]]
        return {**message, "tool_calls": calls}
    if message.get("role") == "tool" and "tool_call_id" in message:
        return {**message, "tool_call_id": short(message["tool_call_id"])}
    return message


def _calls_as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calls written as the generic JSON the model answers with; results as user turns (a template
    without tools knows no ``tool`` role), consecutive results in one turn."""
    prepared: list[dict[str, Any]] = []
    for message in messages:
        if message.get("role") == "assistant" and message.get("tool_calls"):
            calls = [
                {"name": call["function"]["name"], "arguments": call["function"].get("arguments", {})}
                for call in message["tool_calls"]
            ]
            text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
            content = f"{message['content']}\n{text}" if message.get("content") else text
            prepared.append({"role": "assistant", "content": content})
        elif message.get("role") == "tool":
            result: dict[str, Any] = {"content": message.get("content", "")}
            for key in ("tool_call_id", "name", "tool_name"):
                if message.get(key):
                    result[key] = message[key]
            text = json.dumps({"tool_response": result}, ensure_ascii=False)
            previous = prepared[-1] if prepared else None
            if previous is not None and previous.get("from_tool"):
                previous["content"] += "\n" + text
            else:
                prepared.append({"role": "user", "content": text, "from_tool": True})
        else:
            prepared.append(message)
    return [{key: value for key, value in message.items() if key != "from_tool"} for message in prepared]


def _preamble(tools: ToolSet) -> str:
    listed = json.dumps(
        [tool["function"] for tool in tools_for_template(tools)], ensure_ascii=False, indent=2
    )
    many = "one or more calls" if tools.parallel else "exactly one call"
    must = (
        "You must call a tool."
        if tools.constrained
        else "If no tool is needed, answer the user directly in plain text instead."
    )
    return (
        f"You can call these tools (JSON schemas of their arguments):\n{listed}\n\n"
        f"To call tools, answer with only this JSON, with {many}:\n"
        '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}\n'
        f'{must} Tool results come back as {{"tool_response": ...}}.'
    )


def _with_preamble(messages: list[dict[str, Any]], preamble: str, *, system: bool) -> list[dict[str, Any]]:
    """The preamble in the system message, or in the first user turn when the template has no system role."""
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        return [{**first, "content": f"{first.get('content') or ''}\n\n{preamble}".lstrip()}, *messages[1:]]
    if system:
        return [{"role": "system", "content": preamble}, *messages]
    for index, message in enumerate(messages):
        if message.get("role") == "user":
            joined = {**message, "content": f"{preamble}\n\n{message.get('content') or ''}"}
            return [*messages[:index], joined, *messages[index + 1 :]]
    return messages


# -- constrained decoding ------------------------------------------------------------------------


def tool_grammar(fmt: str, tools: ToolSet) -> str:
    """A GBNF grammar whose every sentence is a valid call in ``fmt``'s markup (tool_choice
    required or named); one call when parallel calls are off or one function is named."""
    arguments_key = "parameters" if fmt == "llama3" else "arguments"
    calls = {"anyOf": [_call_schema(tool, arguments_key) for tool in tools_for_template(tools)]}
    several = tools.parallel and tools.function is None
    many: dict[str, Any] = {"type": "array", "items": calls, "minItems": 1}
    if not several:
        many["maxItems"] = 1
    if fmt == "generic":
        return _gbnf({"type": "object", "properties": {"tool_calls": many}, "required": ["tool_calls"]})
    if fmt == "mistral":
        return _gbnf(many, rename="tool-calls") + '\nroot ::= "[TOOL_CALLS]" tool-calls'
    if fmt == "llama3":  # Llama 3.x writes one call per answer
        return _gbnf(calls)
    block = '"<tool_call>\\n" tool-call "\\n</tool_call>"'
    more = f' ("\\n" {block})*' if several else ""
    return _gbnf(calls, rename="tool-call") + f"\nroot ::= {block}{more}"


def _call_schema(tool: dict[str, Any], arguments_key: str) -> dict[str, Any]:
    function = tool["function"]
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, arguments_key: function["parameters"]},
        "required": ["name", arguments_key],
    }


_ROOT_OUTSIDE_LITERALS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|(?<![\w-])root(?![\w-])')


def _gbnf(schema: dict[str, Any], *, rename: str | None = None) -> str:
    # llama_cpp loads llama.cpp's libraries on import: only once a request needs a grammar
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises bare Exceptions for schemas it cannot express
        raise InvalidInput(f"the tools' parameters schemas cannot be enforced: {exc}") from exc
    if rename is None:
        return grammar
    # The converter's start rule becomes one part of ours: rename it (never inside a literal).
    return _ROOT_OUTSIDE_LITERALS.sub(
        lambda match: rename if match.group(0) == "root" else match.group(0), grammar
    )


# -- reading calls back --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Syntax:
    markers: tuple[str, ...]  # text that opens the tool calls anywhere in the answer
    json_openers: str  # an answer that starts with one of these is a tool call in JSON


_SYNTAX = {
    "hermes": _Syntax(markers=("<tool_call>",), json_openers=""),
    "llama3": _Syntax(markers=("<|python_tag|>",), json_openers="{"),
    # [TOOL_CALLS] is a control token that the engine does not print: the array starts the answer
    "mistral": _Syntax(markers=("[TOOL_CALLS]",), json_openers="["),
    "generic": _Syntax(markers=(), json_openers="{"),
}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallReader:
    """Splits an answer, fed piece by piece as it streams, into text and tool calls.

    Text goes out as soon as it cannot be the start of a call; from a call's start the rest is
    held and read when the answer ends, so no raw markup reaches the client. Markup that turns
    out not to be a valid call of an offered tool is given back as text.
    """

    def __init__(self, fmt: str, tools: ToolSet, *, new_id: Callable[[], str] = new_call_id) -> None:
        self.format = fmt
        self.tools = tools
        self.syntax = _SYNTAX[fmt]
        self.names = {tool["function"]["name"] for tool in tools_for_template(tools)}
        self.new_id = new_id
        self._pending = ""  # text not given out yet: leading space, or the start of a marker
        self._calls: str | None = None  # the answer from the start of its calls on
        self._began = False  # some text other than space went out

    def feed(self, text: str) -> list[str | ToolCall]:
        if self._calls is not None:
            self._calls += text
            return []
        pending = self._pending + text
        if not self._began and self.syntax.json_openers:
            stripped = pending.lstrip()
            if not stripped:
                self._pending = pending
                return []
            if stripped[0] in self.syntax.json_openers:
                self._pending, self._calls = "", stripped
                return []
        self._began = True
        starts = [index for marker in self.syntax.markers if (index := pending.find(marker)) >= 0]
        if starts:
            start = min(starts)
            self._pending, self._calls = "", pending[start:]
            return [pending[:start]] if start else []
        keep = _marker_prefix_length(pending, self.syntax.markers)
        self._pending = pending[len(pending) - keep :]
        out = pending[: len(pending) - keep]
        return [out] if out else []

    def finish(self) -> list[str | ToolCall]:
        """What is left once the answer ended: held text, and the calls (at most one unless parallel)."""
        if self._calls is None:
            return [self._pending] if self._pending else []
        parsed = self._parse(self._calls)
        if parsed is None:  # not a call after all: it was text
            return [self._pending + self._calls]
        text, found = parsed
        calls = [ToolCall(id=self.new_id(), name=name, arguments=arguments) for name, arguments in found]
        if not self.tools.parallel:
            calls = calls[:1]
        return [*([text] if text else []), *calls]

    def _parse(self, answer: str) -> tuple[str, list[tuple[str, dict[str, Any]]]] | None:
        if self.format == "hermes":
            return self._parse_tagged(answer)
        return self._parse_json(answer)

    def _parse_tagged(self, answer: str) -> tuple[str, list[tuple[str, dict[str, Any]]]] | None:
        found = []
        text = []
        position = 0
        for match in re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", answer, re.DOTALL):
            text.append(answer[position : match.start()])
            position = match.end()
            call = self._call(_json_or_none(match.group(1)))
            if call is None:
                return None
            found.append(call)
        text.append(answer[position:])
        return "".join(text).strip(), found

    def _parse_json(self, answer: str) -> tuple[str, list[tuple[str, dict[str, Any]]]] | None:
        rest = answer.lstrip()
        for marker in self.syntax.markers:
            rest = rest.removeprefix(marker).lstrip()
        decoder = json.JSONDecoder()
        found: list[tuple[str, dict[str, Any]]] = []
        while rest[:1] in ("{", "["):
            try:
                value, end = decoder.raw_decode(rest)
            except json.JSONDecodeError:
                return None
            calls = self._calls_in(value)
            if calls is None:
                return None
            found += calls
            rest = rest[end:].lstrip().removeprefix(";").lstrip()  # Llama 3.x may separate calls with ;
        return (rest.strip(), found) if found else None

    def _calls_in(self, value: Any) -> list[tuple[str, dict[str, Any]]] | None:
        if isinstance(value, dict) and "tool_calls" in value:
            value = value["tool_calls"]
        elif isinstance(value, dict) and "tool_call" in value:
            value = [value["tool_call"]]
        items = value if isinstance(value, list) else [value]
        calls = [self._call(item) for item in items]
        if not calls or any(call is None for call in calls):
            return None
        return [call for call in calls if call is not None]

    def _call(self, value: Any) -> tuple[str, dict[str, Any]] | None:
        """(name, arguments) of a call to an offered tool, in any of the shapes models write."""
        if not isinstance(value, dict):
            return None
        if isinstance(value.get("function"), dict):  # OpenAI's own shape
            value = value["function"]
        name = value.get("name")
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = _json_or_none(arguments)
        if name not in self.names or not isinstance(arguments, dict):
            return None
        return str(name), arguments


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _marker_prefix_length(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could still become a marker."""
    for length in range(min(len(text), max((len(marker) for marker in markers), default=0)), 0, -1):
        if any(marker.startswith(text[-length:]) for marker in markers):
            return length
    return 0
