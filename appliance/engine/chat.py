"""Chat prompts: the GGUF's own Jinja chat template, rendered in a sandbox, or ChatML when it has none.

Tools offered with a request go to the template as ``tools`` (Hugging Face's convention), or into
a preamble when the template cannot show them (``engine/tools.py``). A request's ``think`` goes to
a template with a reasoning block as ``enable_thinking`` (Qwen 3's switch; templates that have
none ignore it); asking a template without one to think is refused. Part of the in-process
engine; may import ``appliance.engine.base``, ``appliance.engine.reasoning``,
``appliance.engine.tools`` and ``appliance.errors``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.engine.base import ToolSet
from appliance.engine.reasoning import reasoning_markers
from appliance.engine.tools import detect_format, handles_tools, prepare_messages, tools_for_template
from appliance.errors import InvalidInput

__all__ = ["CHATML", "ChatTemplate"]

# What llama.cpp's own server falls back to for models without a template.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _raise(message: str) -> None:
    raise InvalidInput(f"the model's chat template refused the conversation: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str, eos_token: str) -> None:
        self.source = source or CHATML
        self.uses_fallback = source is None
        self.bos_token = bos_token
        self.tool_format = detect_format(self.source)
        self.handles_tools = handles_tools(self.source)
        self.reasoning = reasoning_markers(self.source)  # None: the template has no reasoning block
        self.eos_token = eos_token
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        # Hugging Face's tojson: plain JSON (Jinja's own escapes <, > and & for HTML), keys in order
        environment.filters["tojson"] = _tojson
        try:
            self._template = environment.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise InvalidInput(f"the model's chat template does not compile: {exc}") from exc

    def render(
        self, messages: list[dict[str, Any]], *, tools: ToolSet | None = None, think: bool | None = None
    ) -> str:
        extra: dict[str, Any] = {}
        if tools is not None and self.handles_tools:
            extra["tools"] = tools_for_template(tools)
        if think and self.reasoning is None:
            raise InvalidInput(
                "think is not supported by this model: its chat template has no reasoning block",
                hint="leave think out (or send false), or use a model that thinks (e.g. Qwen 3, DeepSeek R1)",
            )
        if think is not None and self.reasoning is not None:
            extra["enable_thinking"] = think
        try:
            return self._template.render(
                messages=prepare_messages(messages, tools, template=self.source),
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                raise_exception=_raise,
                strftime_now=lambda fmt: datetime.now(UTC).strftime(fmt),
                **extra,
            )
        except jinja2.TemplateError as exc:
            raise InvalidInput(f"the model's chat template failed on this conversation: {exc}") from exc

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return ("<|im_end|>",) if self.uses_fallback else ()
