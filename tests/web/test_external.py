"""External providers end to end (REQ-MODELS-0003, 0112..0118): the unmodified openai, anthropic and
ollama clients get answers from fake providers on loopback for models that are not local, routed
by policy, refused with the reason when policy says no, and every decision is in the inference log.

One server for the module (its start is the slow part): two allowed fakes (``fakeopenai`` serves
gpt-4o, text-embed and the local model ``long``; ``fakeanthropic`` serves claude-x) and one provider
that is not allowed (``stranger``). Each local model decodes one request at a time and lets one
more wait, so the queue fills with two requests held.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.conftest import APPLIANCE
from tests.egress.fakes import (
    FakeAnthropic,
    FakeOpenAI,
    FakeToolCall,
    serve_fake_anthropic,
    serve_fake_openai,
)
from tests.tiny_model import write_llama_gguf
from tests.web.serving import Serving, serving

ASK = [{"role": "user", "content": "Say hello."}]
ANSWER = "Hello from the fake provider."
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@dataclass
class Appliance:
    server: Serving
    data_dir: Path
    env: dict[str, str]
    fake_openai: FakeOpenAI
    fake_anthropic: FakeAnthropic

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def client(self) -> httpx.Client:
        return self.server.client

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*APPLIANCE, "--data-dir", str(self.data_dir), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done

    def prefer(self, key: str, value: Any) -> None:
        """Set a preference (None: back to the setting) through the API, as an admin would."""
        assert self.client.put(f"/api/v1/preferences/{key}", json={"value": value}).status_code == 200

    def decisions(self, **filters: str) -> list[dict[str, Any]]:
        """The inference log, newest first, narrowed to rows with these field values."""
        rows: list[dict[str, Any]] = self.client.get("/api/v1/inference").json()
        return [row for row in rows if all(row[key] == value for key, value in filters.items())]


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    root = tmp_path_factory.mktemp("external")
    # A module's server starts before the tests' own isolation: it gets a clean environment here.
    env = {key: value for key, value in os.environ.items() if not key.startswith("APPLIANCE_")}
    env.update(XDG_CONFIG_HOME=str(root / "xdg-config"), XDG_DATA_HOME=str(root / "xdg-data"))
    with (
        serve_fake_openai() as fake_openai,
        serve_fake_anthropic() as fake_anthropic,
        pytest.MonkeyPatch.context() as patch,
    ):
        for key in [key for key in os.environ if key.startswith("APPLIANCE_")]:
            patch.delenv(key)
        patch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
        patch.setenv("XDG_DATA_HOME", env["XDG_DATA_HOME"])
        data_dir = root / "data"
        made = Appliance(None, data_dir, env, fake_openai, fake_anthropic)  # type: ignore[arg-type]
        made.cli("providers", "add", "fakeopenai", "--kind", "openai", "--base-url", fake_openai.base_url,
                 "--models", "gpt-4o,text-embed,long")  # fmt: skip
        made.cli("providers", "add", "fakeanthropic", "--kind", "anthropic", "--base-url",
                 fake_anthropic.base_url, "--models", "claude-x")  # fmt: skip
        made.cli("providers", "add", "stranger", "--kind", "openai", "--base-url", fake_openai.base_url,
                 "--models", "forbidden-model")  # fmt: skip
        made.cli(
            "prefs", "set", "model_routing.allowed_external_providers", '["fakeopenai", "fakeanthropic"]'
        )
        one_slot = {"APPLIANCE_ENGINE__PARALLEL": "1", "APPLIANCE_ENGINE__QUEUE_SIZE": "1"}
        with serving(data_dir, env=one_slot) as server:
            made.server = server
            yield made


@pytest.fixture(autouse=True)
def fresh_fakes(appliance: Appliance) -> None:
    """Each test scripts the fakes from their defaults, and reads only the requests it caused."""
    for fake in (appliance.fake_openai, appliance.fake_anthropic):
        fake.script, fake.fail_first, fake.echo_key, fake.delay = ANSWER, [], False, 0.0
        fake.requests.clear()


@pytest.fixture(scope="module")
def long_model(appliance: Appliance, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local model with room to keep generating while a test holds its only slot."""
    path = write_llama_gguf(tmp_path_factory.mktemp("long") / "long.gguf", context=4096)
    appliance.cli("models", "import", str(path), "--name", "long")
    return "long"


@pytest.fixture
def client(appliance: Appliance) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{appliance.url}/v1", api_key="unused", max_retries=0) as made:
        yield made


# -- readiness first: no local model exists yet in this module's server --------------------------


def test_readyz_counts_a_reachable_allowed_provider_and_offline_turns_it_off(appliance: Appliance) -> None:
    """REQ-MODELS-0003, 0114: with no local model, a provider routing may use and that answers its
    probe is an inference path; offline, none is, and /readyz says why."""
    assert appliance.client.get("/api/v1/models").json() == [], "this test needs a server with no model"
    ready = appliance.client.get("/readyz")
    assert (ready.status_code, ready.json()["reasons"]) == (200, [])
    states = {state["name"]: state for state in ready.json()["details"]["providers"]}
    assert states["fakeopenai"] == {"name": "fakeopenai", "allowed": True, "reachable": True}
    assert states["stranger"] == {"name": "stranger", "allowed": False, "reachable": None}  # never probed
    assert appliance.client.get("/api/v1/system").json()["providers"] == ready.json()["details"]["providers"]
    assert appliance.fake_openai.received("/v1/models")  # the probe, with its key
    appliance.prefer("offline", True)
    try:
        offline = appliance.client.get("/readyz")
        assert offline.status_code == 503
        assert "offline: external providers are off" in offline.json()["reasons"]
        refused = appliance.client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": ASK})
        assert (refused.status_code, refused.json()["error"]["code"]) == (403, "offline")
        assert "external providers are off" in refused.json()["error"]["message"]
    finally:
        appliance.prefer("offline", None)
    assert appliance.fake_openai.received("/v1/chat/completions") == []  # nothing went out
    logged = appliance.decisions(outcome="refused", model="gpt-4o")[0]
    assert logged["reason"].startswith("offline: ")
    assert "external providers are off" in logged["reason"]


# -- the compatible clients, routed out ----------------------------------------------------------


def test_the_model_list_shows_what_allowed_providers_list(
    appliance: Appliance, client: openai.OpenAI
) -> None:
    """/v1/models ends with the models allowed providers list, as ``provider/model`` owned by the
    provider (a client picks them from there); a provider not allowed, or offline, adds none."""
    listed = {model.id: model.owned_by for model in client.models.list()}
    assert listed == {
        "fakeopenai/gpt-4o": "fakeopenai",
        "fakeopenai/text-embed": "fakeopenai",
        "fakeopenai/long": "fakeopenai",
        "fakeanthropic/claude-x": "fakeanthropic",
    }
    appliance.prefer("model_routing.allowed_external_providers", ["stranger"])
    try:
        assert [model.id for model in client.models.list()] == ["stranger/forbidden-model"]
        appliance.prefer("offline", True)
        assert list(client.models.list()) == []
    finally:
        appliance.prefer("offline", None)
        appliance.prefer("model_routing.allowed_external_providers", ["fakeopenai", "fakeanthropic"])
    assert len(list(client.models.list())) == 4


def test_openai_client_gets_a_model_that_is_not_local_from_the_provider(
    appliance: Appliance, client: openai.OpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=ASK)
    answer = raw.parse()
    assert answer.choices[0].message.content == ANSWER
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == appliance.fake_openai.usage
    assert raw.headers["x-appliance-engine"] == "external:openai"
    reason = raw.headers["x-appliance-route-reason"]
    assert reason == (
        "model gpt-4o is not in the local registry; provider fakeopenai allowed by"
        " model_routing.allowed_external_providers"
    )
    (sent,) = appliance.fake_openai.received("/v1/chat/completions")
    assert sent.body["model"] == "gpt-4o"
    assert sent.body["messages"] == ASK
    # only what the client set goes out: OpenAI's implied temperature 1 is the provider's own default
    assert not {"temperature", "top_p", "presence_penalty", "frequency_penalty"} & set(sent.body)
    stream = client.chat.completions.create(model="gpt-4o", messages=ASK, stream=True, temperature=0.2)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == ANSWER
    assert appliance.fake_openai.received("/v1/chat/completions")[-1].body["temperature"] == 0.2
    logged = appliance.client.get("/api/v1/inference", params={"model": "fakeopenai/gpt-4o"}).json()
    assert [row["outcome"] for row in logged] == ["stop", "stop"]
    assert {(row["engine"], row["node"], row["reason"]) for row in logged} == {
        ("external:openai", "fakeopenai", reason)
    }


def test_tool_calls_come_back_from_the_provider_and_results_go_to_it(
    appliance: Appliance, client: openai.OpenAI
) -> None:
    appliance.fake_openai.script = FakeToolCall("get_weather", {"city": "Paris"})
    answer = client.chat.completions.create(model="gpt-4o", messages=ASK, tools=[WEATHER])
    (call,) = answer.choices[0].message.tool_calls or []
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Paris"}')
    assert answer.choices[0].finish_reason == "tool_calls"
    appliance.fake_openai.script = "It is sunny."
    turns = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    stream = client.chat.completions.create(model="gpt-4o", messages=turns, tools=[WEATHER], stream=True)
    assert (
        "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "It is sunny."
    )
    sent = appliance.fake_openai.received("/v1/chat/completions")
    assert sent[0].body["tools"][0]["function"]["name"] == "get_weather"
    assistant, result = sent[1].body["messages"][1:]
    assert assistant["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # OpenAI's JSON string
    assert result == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}


def test_completions_and_embeddings_go_out_too(appliance: Appliance, client: openai.OpenAI) -> None:
    completion = client.completions.create(model="gpt-4o", prompt="Once", max_tokens=5)
    assert completion.choices[0].text == ANSWER
    assert appliance.fake_openai.received("/v1/completions")[0].body["max_tokens"] == 5
    embedded = client.embeddings.create(model="text-embed", input=["ab", "abcd"])
    assert [item.embedding for item in embedded.data] == [[2.0, 0.5, -0.25], [4.0, 0.5, -0.25]]
    assert (
        appliance.decisions(model="fakeopenai/text-embed", endpoint="/v1/embeddings")[0]["outcome"] == "stop"
    )


def test_anthropic_client_is_routed_to_the_anthropic_provider(appliance: Appliance) -> None:
    with anthropic.Anthropic(base_url=appliance.url, api_key="unused", max_retries=0) as client:
        message = client.messages.create(model="claude-x", max_tokens=64, messages=ASK)
        assert message.content[0].text == ANSWER
        assert message.stop_reason == "end_turn"
        # the provider's own counts, which it gives only at the end
        assert (message.usage.input_tokens, message.usage.output_tokens) == appliance.fake_anthropic.usage
        with client.messages.stream(model="claude-x", max_tokens=64, messages=ASK) as stream:
            assert "".join(stream.text_stream) == ANSWER
            final = stream.get_final_message()
        assert (final.usage.input_tokens, final.usage.output_tokens) == appliance.fake_anthropic.usage
    sent = appliance.fake_anthropic.received("/v1/messages")
    assert [request.body["model"] for request in sent] == ["claude-x", "claude-x"]
    assert sent[0].body["max_tokens"] == 64
    assert "top_p" not in sent[0].body  # implied by the Messages API's defaults, not sent
    assert appliance.decisions(model="fakeanthropic/claude-x")[0]["engine"] == "external:anthropic"


def test_ollama_client_chat_is_routed_out(appliance: Appliance) -> None:
    with ollama.Client(host=appliance.url, timeout=30) as client:
        answer = client.chat(model="gpt-4o", messages=ASK)
        assert answer.message.content == ANSWER
        assert (
            "".join(
                part.message.content or "" for part in client.chat(model="gpt-4o", messages=ASK, stream=True)
            )
            == ANSWER
        )
        with pytest.raises(ollama.ResponseError) as refused:
            client.chat(model="gpt-4o", messages=ASK, options={"min_p": 0.1})
    assert refused.value.status_code == 400
    assert "min_p is not supported by external provider fakeopenai" in refused.value.error
    assert len(appliance.fake_openai.received("/v1/chat/completions")) == 2  # the refused one never left


# -- the caller names a provider (0116) ----------------------------------------------------------


def test_a_caller_names_the_provider_in_the_model_or_a_header(
    appliance: Appliance, client: openai.OpenAI, long_model: str
) -> None:
    """Naming an allowed provider sends the call there even for a model served locally."""
    raw = client.chat.completions.with_raw_response.create(model=f"fakeopenai/{long_model}", messages=ASK)
    assert raw.parse().choices[0].message.content == ANSWER
    assert raw.headers["x-appliance-route-reason"] == (
        "the model name fakeopenai/long names provider fakeopenai, allowed by"
        " model_routing.allowed_external_providers"
    )
    assert appliance.fake_openai.received("/v1/chat/completions")[0].body["model"] == long_model
    raw = client.chat.completions.with_raw_response.create(
        model="claude-x", messages=ASK, extra_headers={"X-Appliance-Provider": "fakeanthropic"}
    )
    assert raw.parse().choices[0].message.content == ANSWER
    assert raw.headers["x-appliance-engine"] == "external:anthropic"
    assert raw.headers["x-appliance-route-reason"] == (
        "the X-Appliance-Provider header names provider fakeanthropic, allowed by"
        " model_routing.allowed_external_providers"
    )
    assert appliance.fake_anthropic.received("/v1/messages")[0].body["model"] == "claude-x"


# -- refusals (0117) -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "headers", "status", "code", "message"),
    [
        (
            "forbidden-model",
            {},
            403,
            "external_denied",
            "only provider(s) stranger serve it, and model_routing.allowed_external_providers does not"
            " allow them",
        ),
        (
            "stranger/forbidden-model",
            {},
            403,
            "external_denied",
            "names provider stranger, which model_routing",
        ),
        (
            "gpt-4o",
            {"X-Appliance-Provider": "stranger"},
            403,
            "external_denied",
            "header names provider stranger",
        ),
        (
            "gpt-4o",
            {"X-Appliance-Provider": "nobody"},
            404,
            "provider_not_found",
            "no external provider is named",
        ),
        ("fakeopenai/gpt-5", {}, 404, "model_not_found", "provider fakeopenai does not serve model gpt-5"),
        (
            "ghost",
            {},
            404,
            "model_not_found",
            "model ghost:latest not found, and no external provider serves it",
        ),
    ],
)
def test_a_refusal_says_why_and_is_recorded(
    appliance: Appliance, model: str, headers: dict[str, str], status: int, code: str, message: str
) -> None:
    refused = appliance.client.post(
        "/v1/chat/completions", json={"model": model, "messages": ASK}, headers=headers
    )
    assert (refused.status_code, refused.json()["error"]["code"]) == (status, code)
    assert message in refused.json()["error"]["message"]
    logged = appliance.decisions(model=model)[0]
    assert (logged["outcome"], logged["engine"]) == ("refused", "")
    assert logged["reason"].startswith(f"{code}: ")
    assert message in logged["reason"]
    assert appliance.fake_openai.received("/v1/chat/completions") == []


# -- local first, and what changes that ----------------------------------------------------------


def test_prefer_local_off_sends_a_local_model_to_an_allowed_provider_first(
    appliance: Appliance, client: openai.OpenAI, long_model: str
) -> None:
    local = client.chat.completions.with_raw_response.create(model=long_model, messages=ASK, max_tokens=2)
    assert local.headers["x-appliance-engine"] == "local:llama.cpp"
    appliance.prefer("model_routing.prefer_local", False)
    try:
        raw = client.chat.completions.with_raw_response.create(model=long_model, messages=ASK)
    finally:
        appliance.prefer("model_routing.prefer_local", None)
    assert raw.parse().choices[0].message.content == ANSWER
    assert raw.headers["x-appliance-route-reason"] == (
        "model_routing.prefer_local is false: provider fakeopenai serves long and is allowed by"
        " model_routing.allowed_external_providers"
    )


def test_a_full_local_queue_falls_back_to_an_allowed_provider(
    appliance: Appliance, client: openai.OpenAI, long_model: str
) -> None:
    """REQ-MODELS-0115: the only slot is busy and one request waits; the next one is the provider's,
    and the log says why."""
    busy = {"model": long_model, "messages": ASK, "stream": True, "temperature": 0}
    waiting: list[httpx.Response] = []
    with appliance.client.stream("POST", "/v1/chat/completions", json=busy) as running:  # the only slot
        lines = running.iter_lines()  # kept: a dropped line iterator closes the response
        assert next(line for line in lines if line.startswith("data:"))
        short = {**busy, "stream": False, "max_tokens": 1}
        thread = threading.Thread(
            target=lambda: waiting.append(
                httpx.post(f"{appliance.url}/v1/chat/completions", json=short, timeout=60)
            )
        )
        thread.start()  # waits in the queue
        wait_for(
            lambda: (
                sum(m["queued_requests"] for m in appliance.client.get("/api/v1/ps").json()["models"]) == 1
            )
        )
        raw = client.chat.completions.with_raw_response.create(model=long_model, messages=ASK)
    thread.join(timeout=30)
    assert [response.status_code for response in waiting] == [200]
    assert raw.parse().choices[0].message.content == ANSWER
    reason = raw.headers["x-appliance-route-reason"]
    assert reason == (
        "the local queue for long is full; provider fakeopenai allowed by"
        " model_routing.allowed_external_providers"
    )
    assert appliance.decisions(model="fakeopenai/long")[0]["reason"] == reason
    assert appliance.fake_openai.received("/v1/chat/completions")[0].body["model"] == "long"


def test_each_call_out_is_audited_as_the_caller(appliance: Appliance, client: openai.OpenAI) -> None:
    """The caller's identity reaches the egress component, which audits the call as theirs."""
    client.chat.completions.create(model="gpt-4o", messages=ASK)
    rows = appliance.client.get("/api/v1/audit", params={"action": "egress.call", "limit": 1}).json()
    assert (rows[0]["actor"], rows[0]["target"]) == ("api:127.0.0.1", "fakeopenai")


def test_a_prompt_task_is_answered_by_the_provider_as_the_task(appliance: Appliance) -> None:
    """A task's prompt goes through the same routing; the call out is the task's (subject ``task``)."""
    task = appliance.client.post("/api/v1/tasks", json={"text": "Say hello.", "model": "gpt-4o"}).json()
    wait_for(lambda: appliance.client.get(f"/api/v1/tasks/{task['id']}").json()["state"] == "succeeded")
    assert appliance.client.get(f"/api/v1/tasks/{task['id']}/output").json()["stdout"] == ANSWER
    rows = appliance.client.get("/api/v1/audit", params={"action": "egress.call", "limit": 1}).json()
    assert (rows[0]["actor"], rows[0]["detail"]["task"]) == (f"task:{task['id']}", task["id"])
    refused = appliance.client.post("/api/v1/tasks", json={"text": "hi", "model": "forbidden-model"})
    assert (refused.status_code, refused.json()["code"]) == (403, "external_denied")  # refused when queued


def wait_for(condition: Callable[[], bool], *, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
