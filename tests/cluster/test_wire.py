"""The engine's types cross the work channel as JSON and come back equal, errors as their own class."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.cluster.wire import (
    decode_embeddings,
    decode_error,
    decode_event,
    decode_prompt,
    decode_spec,
    encode_embeddings,
    encode_error,
    encode_event,
    encode_prompt,
    encode_spec,
)
from appliance.engine.base import (
    Embeddings,
    EngineEvent,
    Finished,
    LoadSpec,
    Prompt,
    Ready,
    ReasoningChunk,
    SamplingParams,
    TextChunk,
    TokenLogprob,
    ToolSet,
)
from appliance.errors import (
    ApplianceError,
    EngineBusy,
    InsufficientMemory,
    InvalidInput,
    ModelNotLoadable,
    PromptTooLong,
    all_error_classes,
)


def through_json(data: dict[str, Any]) -> dict[str, Any]:
    """What the other side reads: the NDJSON line, parsed."""
    decoded: dict[str, Any] = json.loads(json.dumps(data))
    return decoded


LOGPROB = TokenLogprob(
    token="\ufffd",
    logprob=-0.25,
    bytes=b"\xe2\x82",  # half a character: only the bytes say what it was
    top=(TokenLogprob("a", -1.5, b"a"), TokenLogprob("\ufffd", -2.0, b"\xff")),
)

EVENTS: list[EngineEvent] = [
    Ready(reason="the model was already loaded", prompt_tokens=12, queued=1),
    Ready(reason="loaded from the local cache on demand", prompt_tokens=3, queued=2, tool_format="hermes"),
    TextChunk("hello"),
    TextChunk("\u20ac", logprobs=(LOGPROB, TokenLogprob("x", 0.0, b"x"))),
    ReasoningChunk("first, think"),
    Finished("stop", prompt_tokens=12, completion_tokens=7),
    Finished("length", 1, 2, context=(1, 2, 3), stop_sequence=None, cached_tokens=5),
    Finished("stop", 4, 5, stop_sequence="\n\n"),
    Finished("tool_calls", 4, 9),
    Finished("cancelled", 4, 1),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda event: type(event).__name__)
def test_every_event_comes_back_equal(event: EngineEvent) -> None:
    assert decode_event(through_json(encode_event(event))) == event


@pytest.mark.parametrize(
    "error",
    [
        PromptTooLong("the prompt has 900 tokens; the context holds 256", hint="shorten it"),
        InsufficientMemory("model x needs 9 GB; the budget is 4 GB"),
        ModelNotLoadable("not a model"),
        EngineBusy("too many requests"),
        ApplianceError("something else", hint=""),
    ],
    ids=lambda error: error.code,
)
def test_an_error_ends_the_stream_as_the_same_class(error: ApplianceError) -> None:
    """The client sees the worker's own error (same class, so the same HTTP status and code)."""
    event = decode_event(through_json(encode_event(Finished("error", 3, 0, error=error))))
    assert isinstance(event, Finished)
    assert type(event.error) is type(error)
    assert event.error is not None
    assert (event.error.message, event.error.hint, event.error.status) == (
        error.message,
        error.hint,
        error.status,
    )


def test_every_error_code_decodes_to_its_class() -> None:
    """Each class made from a message and a hint comes back as itself; one with a constructor of
    its own (TooManyAttempts takes a retry time) keeps its message as the base class."""
    for cls in all_error_classes():
        try:
            data = encode_error(cls("why", hint="what to do"))
            expected: type[ApplianceError] = cls
        except TypeError:
            data = {"code": cls.code, "message": "why", "hint": "what to do"}
            expected = ApplianceError
        decoded = decode_error(through_json(data))
        if cls.__module__ != "appliance.errors":
            continue  # the CLI's relay of a server's error: its code is set per answer
        assert type(decoded) is expected, cls
        assert (decoded.message, decoded.hint) == ("why", "what to do")


def test_an_unknown_error_code_is_the_base_class_with_its_message() -> None:
    error = decode_error({"code": "from_a_newer_worker", "message": "new", "hint": "h"})
    assert type(error) is ApplianceError
    assert (error.message, error.hint) == ("new", "h")


def test_a_spec_crosses_without_its_path_and_takes_this_sides() -> None:
    spec = LoadSpec(
        key="tiny:latest",
        digest="sha256:" + "a" * 64,
        path=Path("/server/blobs/sha256/aaa"),
        size_bytes=123,
        context_length=256,
        context_requested=True,
        n_gpu_layers=0,
        capabilities={"block_count": 2, "embedding_length": 64},
        chat_template="{{ messages }}",
    )
    data = through_json(encode_spec(spec))
    assert "path" not in data
    here = Path("/worker/blobs/sha256/aaa")
    assert decode_spec(data, here) == LoadSpec(**{**spec.__dict__, "path": here})


def test_a_prompt_with_tools_sampling_and_context_comes_back_equal() -> None:
    tools = ToolSet(
        tools=({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},),
        required=True,
        function="f",
        parallel=False,
    )
    prompt = Prompt(
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        sampling=SamplingParams(temperature=0.0, top_k=1, seed=7, logprobs=2, grammar="root ::= x"),
        stop=("\n",),
        keep_alive=-1,
        tools=tools,
        think=False,
        context=(1, 2),
        return_context=True,
    )
    assert decode_prompt(through_json(encode_prompt(prompt))) == prompt
    raw = Prompt(text="once", suffix="end", parse_special=False)
    assert decode_prompt(through_json(encode_prompt(raw))) == raw


def test_embeddings_come_back_equal() -> None:
    result = Embeddings(vectors=[[0.5, -1.0], [0.0, 2.25]], tokens=9, reason="the model was already loaded")
    assert decode_embeddings(through_json(encode_embeddings(result))) == result


@pytest.mark.parametrize(
    ("decode", "data"),
    [
        (decode_event, {"type": "sparkle"}),
        (decode_event, {"type": "text"}),
        (decode_event, {"type": "finished", "reason": "stop"}),
        (decode_event, {}),
        (decode_prompt, {"sampling": {"no_such": 1}}),
        (decode_embeddings, {"vectors": []}),
        (lambda data: decode_spec(data, Path("/x")), {"key": "k"}),
    ],
)
def test_what_is_not_the_shape_is_invalid_input(decode: Any, data: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        decode(data)
