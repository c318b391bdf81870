"""The OpenAI-compatible API, driven by the real ``openai`` client against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import APPLIANCE, Server, import_file, started_server
from tests.tiny_model import write_llama_gguf
from tests.web.conftest import ran


@pytest.fixture(scope="module")
def server(shared_server: Server, shared_tiny: str) -> Server:
    """One server for the module's tests that only ask, each reading only its own answers; those
    that read the server's totals (metrics, what is loaded), load or unload, or need other
    settings have ``own_server``."""
    return shared_server


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
def own_server(data_dir: Path) -> Iterator[Server]:
    with started_server(data_dir) as started:
        yield started


@pytest.fixture
def own_client(own_server: Server, data_dir: Path, tiny_gguf: Path) -> Iterator[openai.OpenAI]:
    import_file(data_dir, tiny_gguf, "tiny")
    with openai.OpenAI(base_url=f"{own_server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_models_are_listed_by_name(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["tiny:latest"]
    assert client.models.retrieve("tiny").id == "tiny:latest"


def test_chat_completion(client: openai.OpenAI, server: Server) -> None:
    request_id = uuid.uuid4().hex
    response = client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=12,
        temperature=0,
        extra_headers={"X-Request-ID": request_id},
    )
    completion = response.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "tiny:latest"
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 12
    assert completion.usage.prompt_tokens > 0
    assert response.headers["x-appliance-engine"] == "local:llama.cpp"
    # REQ-MODELS-0118: the routing decision and its reason are recorded for every request.
    [logged] = ran(server, request_id)
    assert (logged["engine"], logged["model"], logged["completion_tokens"]) == (
        "local:llama.cpp",
        "tiny:latest",
        12,
    )
    assert logged["reason"]


def test_streamed_chat_joins_to_the_same_text(client: openai.OpenAI) -> None:
    request = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 20,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**request).choices[0].message.content  # type: ignore[call-overload]
    chunks = list(
        client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )  # type: ignore[call-overload]
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == whole
    assert chunks[-1].usage.completion_tokens == 20
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"


def test_completion_and_seed(client: openai.OpenAI) -> None:
    def complete() -> str:
        return (
            client.completions.create(model="tiny", prompt="Once", max_tokens=16, seed=7, temperature=1)
            .choices[0]
            .text
        )

    first = complete()
    assert first == complete()
    streamed = client.completions.create(
        model="tiny", prompt="Once", max_tokens=16, seed=7, temperature=1, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == first


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    completion = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "answer in JSON"}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    assert isinstance(json.loads(completion.choices[0].message.content or "")["ok"], bool)


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="tiny", input=["hello", "world"])
    assert [len(item.embedding) for item in result.data] == [64, 64]
    assert result.usage.prompt_tokens > 0


def test_errors_are_openai_shaped_and_the_server_keeps_serving(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 400}])
    assert too_long.value.body["code"] == "prompt_too_long"  # type: ignore[index]
    for bad in ({"temperature": 5}, {"n": 17}, {"max_tokens": 0}, {"response_format": {"type": "xml"}}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], **bad)  # type: ignore[call-overload]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    assert client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2
    )


def test_a_missing_or_malformed_body_is_a_clear_400(server: Server) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        empty = server.client.post(path, content=b"")
        assert empty.status_code == 400
        assert empty.json()["error"]["message"].startswith("missing request body")
        broken = server.client.post(path, content=b"{")
        assert broken.status_code == 400
        assert "invalid request" in broken.json()["error"]["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(
    own_client: openai.OpenAI, own_server: Server, data_dir: Path, tmp_path: Path
) -> None:
    client, server = own_client, own_server
    long_model = write_llama_gguf(tmp_path / "long.gguf", context=4096)  # long enough to hang up halfway
    import_file(data_dir, long_model, "long")
    body = {
        "model": "long",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 4000,
        "stream": True,
        "temperature": 0,  # greedy: this model never samples its end-of-text, so the answer is long
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # read one chunk, then hang up
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = server.client.get("/api/v1/inference").json()
        if log:
            break
        time.sleep(0.05)
    assert log[0]["outcome"] == "cancelled"
    deadline = time.monotonic() + 1  # the batcher drops the sequence at its next step
    while time.monotonic() < deadline:
        loaded = server.client.get("/api/v1/ps").json()["models"]
        if loaded[0]["active_requests"] == 0:
            break
        time.sleep(0.02)
    assert [(model["name"], model["active_requests"]) for model in loaded] == [("long:latest", 0)]
    # The freed slot serves the next request.
    assert client.chat.completions.create(
        model="long", messages=[{"role": "user", "content": "y"}], max_tokens=3
    )


def test_metrics(own_client: openai.OpenAI, own_server: Server) -> None:
    client, server = own_client, own_server
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5)
    text = server.client.get("/metrics").text
    assert 'appliance_tokens_generated_total{model="tiny:latest"} 5.0' in text
    assert "appliance_inference_request_seconds_bucket" in text
    assert "appliance_loaded_models 1.0" in text


def test_usage_and_metrics_count_the_prompt_tokens_taken_from_the_cache(
    own_client: openai.OpenAI, own_server: Server
) -> None:
    client, server = own_client, own_server
    messages: list[Any] = [{"role": "user", "content": "the same question"}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
    assert first.usage is not None
    assert second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == second.usage.prompt_tokens - 1  # all but the last, whose logits start the answer
    assert second.choices[0].message.content == first.choices[0].message.content
    text = server.client.get("/metrics").text
    assert f'appliance_prompt_tokens_cached_total{{model="tiny:latest"}} {float(cached)}' in text
    assert f'appliance_prompt_tokens_total{{model="tiny:latest"}} {2.0 * second.usage.prompt_tokens}' in text


def test_cli_load_ps_unload(own_client: openai.OpenAI, own_server: Server, data_dir: Path) -> None:
    port = own_server.url.rsplit(":", 1)[1]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*APPLIANCE, "--data-dir", str(data_dir), *args],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "APPLIANCE_PORT": port},
        )

    loaded = cli("models", "load", "tiny", "--keep-alive", "-1", "--context", "128")
    assert loaded.returncode == 0, loaded.stderr
    assert "loaded tiny:latest" in loaded.stdout
    assert "context 128" in loaded.stdout
    table = cli("ps")
    assert "tiny:latest" in table.stdout
    assert "never" in table.stdout
    assert json.loads(cli("ps", "--json").stdout)["models"][0]["name"] == "tiny:latest"
    assert "unloaded tiny" in cli("models", "unload", "tiny").stdout
    assert json.loads(cli("ps", "--json").stdout)["models"] == []
    missing = cli("models", "load", "ghost")
    assert missing.returncode == 1
    assert "model ghost:latest not found" in missing.stderr


def test_cli_says_when_no_server_runs(cli: object) -> None:
    result = cli("ps", env={"APPLIANCE_PORT": "1"})  # type: ignore[operator]
    assert result.returncode == 1
    assert "no appliance server answers" in result.stderr
    assert "appliance serve" in result.stderr


def wait_for(condition: Callable[[], bool], *, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def one_slot_server(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Server:
    """A server whose models decode one request at a time and let one more wait."""
    monkeypatch.setenv("APPLIANCE_ENGINE__PARALLEL", "1")
    monkeypatch.setenv("APPLIANCE_ENGINE__QUEUE_SIZE", "1")
    server: Server = request.getfixturevalue("own_server")
    return server


def test_a_full_queue_refuses_a_stream_before_it_starts(
    one_slot_server: Server, data_dir: Path, tmp_path: Path
) -> None:
    """A stream that cannot be queued is a 503 with Retry-After, which OpenAI clients retry,
    not an error inside a stream whose success status is already sent."""
    server = one_slot_server
    long_model = write_llama_gguf(tmp_path / "long.gguf", context=4096)
    import_file(data_dir, long_model, "long")
    busy = {"model": "long", "messages": [{"role": "user", "content": "x"}], "stream": True, "temperature": 0}
    with server.client.stream("POST", "/v1/chat/completions", json=busy) as running:  # the only slot
        lines = running.iter_lines()  # kept: a dropped line iterator closes the response
        assert next(line for line in lines if line.startswith("data:"))
        waiting: list[httpx.Response] = []
        short = {**busy, "stream": False, "max_tokens": 1}
        thread = threading.Thread(
            target=lambda: waiting.append(
                httpx.post(f"{server.url}/v1/chat/completions", json=short, timeout=60)
            )
        )
        thread.start()  # waits in the queue

        def queued() -> int:
            return sum(model["queued_requests"] for model in server.client.get("/api/v1/ps").json()["models"])

        wait_for(lambda: queued() == 1, seconds=10)
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
            calls: list[Callable[[], Any]] = [
                lambda: client.chat.completions.create(
                    model="long", messages=[{"role": "user", "content": "y"}], stream=True
                ),
                lambda: client.completions.create(model="long", prompt="y", stream=True),
            ]
            for call in calls:
                with pytest.raises(openai.APIStatusError) as refused:
                    list(call())
                assert refused.value.status_code == 503
                assert refused.value.response.headers["retry-after"] == "2"
                assert refused.value.body["code"] == "engine_busy"  # type: ignore[index]
    thread.join(timeout=30)  # the running stream was dropped, so the waiting request gets its turn
    assert [response.status_code for response in waiting] == [200]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"n": 17}, "n"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content.0.type",
        ),
        ({"keep_alive": "bogus"}, "keep_alive"),
    ],
)
def test_fields_it_cannot_honour_are_refused_by_name(
    client: openai.OpenAI, server: Server, extra: dict[str, Any], param: str
) -> None:
    messages = extra.pop("messages", [{"role": "user", "content": "x"}])
    sent = {"X-Request-ID": uuid.uuid4().hex}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=2, extra_body=extra, extra_headers=sent
        )
    assert refused.value.body["param"] == param  # type: ignore[index]
    assert param in refused.value.body["message"]  # type: ignore[index]
    assert ran(server, sent["X-Request-ID"]) == []  # nothing ran


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_a_number_that_is_not_finite_is_refused_as_such(server: Server, number: str) -> None:
    for field in ("temperature", "top_p", "keep_alive"):
        body = f'{{"model": "tiny", "messages": [{{"role": "user", "content": "x"}}], "{field}": {number}}}'
        refused = server.client.post("/v1/chat/completions", content=body)
        assert refused.status_code == 400
        assert refused.json()["error"]["message"] == f"invalid request: {field}: not a finite number"
        assert refused.json()["error"]["param"] == field


def test_penalties_reach_the_sampler(client: openai.OpenAI) -> None:
    def answer(**penalties: float) -> str | None:
        messages: Any = [{"role": "user", "content": "hi"}]
        reply = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=24, temperature=0, **penalties
        )
        return reply.choices[0].message.content

    plain = answer()
    assert answer() == plain  # greedy: the same every time, so a change below is the penalties'
    assert answer(frequency_penalty=2.0, presence_penalty=2.0) != plain


def test_fields_that_ask_for_nothing_are_accepted(client: openai.OpenAI) -> None:
    neutral: dict[str, Any] = {
        "tools": [],
        "logprobs": False,
        "n": 1,
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "x"}],
    }
    completion = client.chat.completions.create(model="tiny", max_tokens=2, **neutral)
    assert completion.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, echo=True)
    assert refused.value.body["param"] == "echo"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="tiny", input="x", dimensions=8)
    assert refused.value.body["param"] == "dimensions"  # type: ignore[index]


def test_every_post_answers_200(client: openai.OpenAI, server: Server) -> None:
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    answers = [
        server.client.post("/v1/chat/completions", json=chat),
        server.client.post("/v1/chat/completions", json={**chat, "stream": True}),
        server.client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}),
        server.client.post("/v1/embeddings", json={"model": "tiny", "input": "x"}),
    ]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 200]


@pytest.fixture
def far_east_server(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Server:
    monkeypatch.setenv("TZ", "XST-9")  # nine hours east of UTC, a POSIX zone that needs no tzdata
    server: Server = request.getfixturevalue("own_server")
    return server


def test_created_is_utc_whatever_the_servers_zone(
    far_east_server: Server, data_dir: Path, tiny_gguf: Path
) -> None:
    import_file(data_dir, tiny_gguf, "tiny")
    created_at = far_east_server.client.get("/api/v1/models/tiny").json()["created_at"]
    expected = int(datetime.fromisoformat(created_at.replace("Z", "+00:00")).replace(tzinfo=UTC).timestamp())
    listed = far_east_server.client.get("/v1/models").json()["data"][0]["created"]
    assert abs(listed - expected) <= 1  # created_at keeps fractions of a second; created does not
    assert abs(listed - time.time()) < 600
