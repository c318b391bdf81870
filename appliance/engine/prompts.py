"""From a resolved ``Prompt`` to the tokens a loaded model decodes, and back to Ollama's ``context``.

Three shapes of prompt:

- a conversation, rendered with the model's chat template (tools and the reasoning switch
  included, ``engine/chat.py``);
- raw text, tokenized as it is;
- fill in the middle (a ``suffix``), built at token level as llama.cpp's server builds ``/infill``:
  ``[BOS] FIM_PRE prefix FIM_SUF suffix FIM_MID``, for models whose vocabulary has those tokens.
  The prefix and suffix are plain text unless the prompt is raw, whose text may write control
  tokens as the caller means them.

A conversation on a template with a reasoning block gets a splitter for the answer, unless a
grammar constrains the answer: then it is all answer, even after a prompt that opened the block.

A request's ``context`` (token ids an earlier answer returned) goes before the prompt, as Ollama
prepends it; the answer's ``context`` is those ids, the prompt's and the answer's (the answer
tokenized after the prompt's text, as Ollama does). Part of the in-process engine; may import
``appliance.engine`` (base, chat, llama, reasoning, tools) and ``appliance.errors``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from appliance.engine.base import Prompt, SamplingParams
from appliance.engine.chat import ChatTemplate
from appliance.engine.llama import LlamaModel
from appliance.engine.reasoning import ReasoningSplitter, starts_in_reasoning
from appliance.engine.tools import tool_grammar
from appliance.errors import InvalidInput

__all__ = ["BuiltPrompt", "build_prompt"]


@dataclass(frozen=True)
class BuiltPrompt:
    tokens: list[int]
    stop: tuple[str, ...]
    sampling: SamplingParams
    tool_format: str  # how the answer writes tool calls; "": none offered
    splitter: ReasoningSplitter | None  # takes the reasoning out of the answer; None: nothing to split
    text: str | None  # the prompt's text, which the answer's context is tokenized after; None: FIM

    def answer_context(
        self, model: LlamaModel, template: ChatTemplate, prompt: Prompt, answer: str
    ) -> tuple[int, ...]:
        """The context an answer returns: the request's, then the prompt's and the answer's tokens."""
        if self.text is None:  # fill in the middle: the answer follows the FIM tokens
            return (*self.tokens, *model.tokenize(answer, add_special=False, parse_special=False))
        return (*prompt.context, *_tokenize(model, template, self.text + answer, prompt))


def build_prompt(model: LlamaModel, template: ChatTemplate, prompt: Prompt) -> BuiltPrompt:
    """Tokens, stop strings, sampling and output splitting for one request (raises InvalidInput)."""
    _check_context(model, prompt.context)
    if prompt.suffix is not None:
        return _fill_in_middle(model, prompt)
    if prompt.think and prompt.messages is None:
        raise InvalidInput(
            "think works through the model's chat template, which a raw prompt skips",
            hint="send the prompt without raw, or leave think out",
        )
    if prompt.messages is None:
        text = prompt.text or ""
        return BuiltPrompt(
            tokens=[*prompt.context, *_tokenize(model, template, text, prompt)],
            stop=prompt.stop,
            sampling=prompt.sampling,
            tool_format="",
            splitter=None,
            text=text,
        )
    text = template.render(prompt.messages, tools=prompt.tools, think=prompt.think)
    if prompt.context and template.bos_token:
        text = text.removeprefix(template.bos_token)  # it begins the context already
    sampling, tool_format = prompt.sampling, ""
    if prompt.tools is not None:
        tool_format = template.tool_format
        if prompt.tools.constrained:
            sampling = replace(sampling, grammar=tool_grammar(tool_format, prompt.tools))
    # A grammar (a JSON format, a required tool call) shapes the whole output: all of it is answer.
    markers = template.reasoning if sampling.grammar is None else None
    return BuiltPrompt(
        tokens=[*prompt.context, *_tokenize(model, template, text, prompt)],
        stop=(*prompt.stop, *template.stop_strings),
        sampling=sampling,
        tool_format=tool_format,
        splitter=None
        if markers is None
        else ReasoningSplitter(markers, inside=starts_in_reasoning(text, markers)),
        text=text,
    )


def _tokenize(model: LlamaModel, template: ChatTemplate, text: str, prompt: Prompt) -> list[int]:
    """A prompt's text as tokens: BOS first, unless the text writes it or follows a context."""
    wrote_bos = bool(template.bos_token) and text.startswith(template.bos_token)
    add_bos = not prompt.context and not wrote_bos
    return model.tokenize(text, add_special=add_bos, parse_special=prompt.parse_special)


def _fill_in_middle(model: LlamaModel, prompt: Prompt) -> BuiltPrompt:
    if model.fim_tokens is None:
        raise InvalidInput(
            "suffix is not supported by this model: it has no fill-in-the-middle tokens",
            hint="leave suffix out, or use a code model with fill-in-the-middle tokens"
            " (its capabilities list insert)",
        )
    if prompt.think:
        raise InvalidInput("think cannot be combined with suffix: fill in the middle skips the chat template")
    prefix_token, suffix_token, middle_token = model.fim_tokens
    special = prompt.parse_special
    prefix = model.tokenize(prompt.text or "", add_special=False, parse_special=special)
    suffix = model.tokenize(prompt.suffix or "", add_special=False, parse_special=special)
    bos = [model.bos] if model.adds_bos and not prompt.context and model.bos >= 0 else []
    return BuiltPrompt(
        tokens=[*prompt.context, *bos, prefix_token, *prefix, suffix_token, *suffix, middle_token],
        stop=prompt.stop,
        sampling=prompt.sampling,
        tool_format="",
        splitter=None,
        text=None,
    )


def _check_context(model: LlamaModel, context: tuple[int, ...]) -> None:
    for index, token in enumerate(context):
        if not 0 <= token < model.n_vocab:
            raise InvalidInput(
                f"context.{index} is token {token}, outside this model's vocabulary"
                f" of {model.n_vocab} tokens",
                hint="send the context an answer of this same model returned",
            )
