"""One error mapping for the three surfaces: the same status, code, hint and Retry-After everywhere."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from litestar import Litestar, Request, Router, get
from litestar.testing import TestClient

from appliance.errors import ApplianceError, EngineBusy, ModelNotFound
from appliance.web.errors import (
    OLLAMA_HANDLERS,
    OPENAI_HANDLERS,
    PROBLEM_HANDLERS,
    ErrorInfo,
    describe,
    error_tail,
    ollama_body,
)

FAULTS: dict[str, Exception] = {
    "busy": EngineBusy("the queue of tiny:latest is full"),
    "missing": ModelNotFound("model nope:latest not found"),
    "crash": ZeroDivisionError("division by zero"),
}


@get("/fail", sync_to_thread=False)
def fail(request: Request[Any, Any, Any]) -> None:
    raise FAULTS[request.query_params["fault"]]


def _app() -> Litestar:
    # The real handler tables on one route per surface, as the app mounts them.
    return Litestar(
        route_handlers=[
            Router(path="/api/v1", route_handlers=[fail], exception_handlers=PROBLEM_HANDLERS),
            Router(path="/v1", route_handlers=[fail], exception_handlers=OPENAI_HANDLERS),
            Router(path="/api", route_handlers=[fail], exception_handlers=OLLAMA_HANDLERS),
        ],
        logging_config=None,
    )


def _message(surface: str, body: dict[str, Any]) -> str:
    if surface == "/api/v1":
        return f"{body['detail']} ({body['hint']})"
    if surface == "/v1":
        return str(body["error"]["message"])
    return str(body["error"])


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_every_surface_answers_an_error_alike(fault: str) -> None:
    with TestClient(_app()) as client:
        answers = {
            surface: client.get(f"{surface}/fail", params={"fault": fault})
            for surface in ("/api/v1", "/v1", "/api")
        }
    statuses = {response.status_code for response in answers.values()}
    retry_after = {response.headers.get("retry-after") for response in answers.values()}
    messages = {_message(surface, response.json()) for surface, response in answers.items()}
    assert len(statuses) == 1, statuses
    assert len(retry_after) == 1, retry_after
    assert len(messages) == 1, messages
    if fault == "busy":
        assert statuses == {503}
        assert retry_after == {str(EngineBusy.retry_after)}  # /api/v1 used to send none
    if fault == "crash":
        assert statuses == {500}
        assert "failed unexpectedly (ZeroDivisionError)" in messages.pop()


def test_a_problem_and_an_openai_error_name_the_same_code() -> None:
    with TestClient(_app()) as client:
        problem = client.get("/api/v1/fail", params={"fault": "missing"})
        openai = client.get("/v1/fail", params={"fault": "missing"})
    assert problem.headers["content-type"].startswith("application/problem+json")
    assert problem.json()["code"] == openai.json()["error"]["code"] == "model_not_found"
    assert openai.json()["error"]["type"] == "invalid_request_error"


def test_a_stream_says_its_error_as_its_last_item() -> None:
    async def lines() -> AsyncIterator[bytes]:
        yield b"first\n"
        raise EngineBusy("the model was unloaded")

    async def collect() -> list[bytes]:
        render = lambda info: json.dumps(ollama_body(info)).encode()  # noqa: E731
        return [line async for line in error_tail(lines(), render, where="a test stream")]

    first, last = anyio.run(collect)
    assert first == b"first\n"
    assert json.loads(last) == {"error": f"the model was unloaded ({EngineBusy.default_hint})"}


def test_describe_keeps_the_hint_apart_from_the_message() -> None:
    info = describe(ApplianceError("broken", hint="do this"), where="a test")
    assert info == ErrorInfo(500, "internal_error", "broken", "do this")
    assert info.text == "broken (do this)"
