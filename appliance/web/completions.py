"""OpenAI's legacy completions, ``POST /v1/completions``: a raw prompt, ``suffix`` (fill in the
middle) for models with FIM tokens, ``logprobs: N`` in the legacy form, ``n`` choices, and the
same errors, SSE framing and usage as chat completions (``web/openai.py``, whose helpers it uses).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Annotated, Any

from litestar import Request, Response, Router, post
from pydantic import Field

from appliance.audit import Context
from appliance.engine.base import Finished, TokenLogprob
from appliance.engine.service import GenerationOptions, InferenceService
from appliance.errors import InvalidInput
from appliance.web.bodies import parse_body, refuse_unsupported
from appliance.web.errors import OPENAI_HANDLERS
from appliance.web.generation import close_all, event_stream, named_provider, route_headers
from appliance.web.logprobs import completion_logprobs
from appliance.web.openai import (
    GenerationBody,
    Piece,
    choices_usage,
    finish_reason_of,
    open_generations,
    sse_events,
)

__all__ = ["CompletionBody", "completions_router"]

_UNSUPPORTED = {
    "echo": (False,),
    "best_of": (1,),
    "tools": ([],),
    "tool_choice": ("none",),
}


class CompletionBody(GenerationBody):
    prompt: str | Annotated[list[str], Field(json_schema_extra={"minItems": 1, "maxItems": 1})]
    suffix: str | None = None  # fill in the middle, for models with FIM tokens
    logprobs: int | None = Field(default=None, ge=0, le=20, description="alternatives per token")

    def options(self) -> GenerationOptions:
        refuse_unsupported(self, _UNSUPPORTED)
        return replace(super().options(), logprobs=self.logprobs)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidInput("only one prompt per request is supported")
            return self.prompt[0]
        return self.prompt


@post("/completions", status_code=200)
async def completions(
    request: Request[Any, Any, Any], inference: InferenceService, context: Context
) -> Response[Any]:
    body = parse_body(CompletionBody, await request.body())
    prompt = body.prompt_text()
    generations, started = await open_generations(
        body,
        lambda options: inference.complete(
            body.model,
            prompt,
            options,
            endpoint="/v1/completions",
            context=context,
            provider=named_provider(request),
            suffix=body.suffix or None,
        ),
    )
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    wants_logprobs = body.logprobs is not None

    def payload(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": started.model,
            "choices": choices,
        }

    def choice(
        index: int, text: str, finish_reason: str | None, tokens: list[TokenLogprob], *, offset: int
    ) -> dict[str, Any]:
        logprobs = completion_logprobs(tokens, offset=offset) if wants_logprobs else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    if body.stream:
        offsets = [0] * len(generations)  # per choice: how much text its earlier chunks carried

        def payloads(index: int, event: Piece) -> list[dict[str, Any]]:
            if isinstance(event, Finished):
                return [payload([choice(index, "", finish_reason_of(event), [], offset=offsets[index])])]
            text = getattr(event, "text", "")
            tokens = list(getattr(event, "logprobs", ()))
            piece = choice(index, text, None, tokens, offset=offsets[index])
            offsets[index] += len(text)
            return [payload([piece])]

        def closing(finished: list[Finished]) -> list[dict[str, Any]]:
            if not body.include_usage:
                return []
            return [{**payload([]), "usage": choices_usage(started, finished)}]

        return event_stream(sse_events(generations, payloads, closing), started)
    choices, finished = [], []
    try:
        for index, generation in enumerate(generations):
            text, _, ended = await generation.collect()
            choices.append(choice(index, text, finish_reason_of(ended), generation.logprobs, offset=0))
            finished.append(ended)
    finally:  # a choice that failed leaves none of the others decoding
        await close_all(generations)
    return Response(
        {**payload(choices), "usage": choices_usage(started, finished)}, headers=route_headers(started)
    )


completions_router = Router(
    path="/v1", route_handlers=[completions], exception_handlers=OPENAI_HANDLERS, tags=["openai"]
)
