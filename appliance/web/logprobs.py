"""Token logprobs as each compatible API writes them, from the engine's ``TokenLogprob``s.

- OpenAI chat: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``.
- OpenAI legacy completions: parallel lists ``tokens``, ``token_logprobs``, ``top_logprobs`` (one
  ``{token: logprob}`` object per token) and ``text_offset`` (where each token starts in the text).
- Ollama (``/api/generate``, ``/api/chat``): a list of ``{token, logprob, bytes, top_logprobs}``.

Imports the engine's base types only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from appliance.engine.base import TokenLogprob

__all__ = ["chat_logprobs", "completion_logprobs", "ollama_logprobs"]


def _entry(logprob: TokenLogprob) -> dict[str, Any]:
    return {"token": logprob.token, "logprob": logprob.logprob, "bytes": list(logprob.bytes)}


def _with_top(logprob: TokenLogprob) -> dict[str, Any]:
    return {**_entry(logprob), "top_logprobs": [_entry(alternative) for alternative in logprob.top]}


def chat_logprobs(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {"content": [_with_top(logprob) for logprob in logprobs], "refusal": None}


def ollama_logprobs(logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    return [_with_top(logprob) for logprob in logprobs]


def completion_logprobs(logprobs: Sequence[TokenLogprob], *, offset: int) -> dict[str, Any]:
    """The legacy form; ``offset``: where the first token starts in the whole completion (a stream's
    later chunks start past the earlier ones). Alternatives whose texts read alike share one key."""
    offsets = []
    for logprob in logprobs:
        offsets.append(offset)
        offset += len(logprob.token)
    return {
        "tokens": [logprob.token for logprob in logprobs],
        "token_logprobs": [logprob.logprob for logprob in logprobs],
        "top_logprobs": [
            {alternative.token: alternative.logprob for alternative in logprob.top} for logprob in logprobs
        ],
        "text_offset": offsets,
    }
