"""The egress client against fake providers on loopback (REQ-MODELS-0119, 0124, 0125): streaming,
tool calls, retries, timeouts, redirects, allow-lists, offline, key scrubbing, and the audit row,
log line and metrics every call leaves."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import Context
from appliance.egress.client import Egress, ProbeResult, subject_allowed
from appliance.egress.types import ExternalRequest, Provider
from appliance.engine.base import Finished, Ready, ReasoningChunk, TextChunk, ToolCall, ToolSet
from appliance.errors import EgressDenied, Offline, ProviderFailed, ProviderKeyUnreadable, ProviderUnsupported
from appliance.identity import Actor
from appliance.metrics import Metrics
from appliance.preferences import PreferenceService
from appliance.runtime import Runtime
from appliance.settings import EgressSettings, Settings
from appliance.store.base import AuditEvent, Store
from appliance.store.factory import open_data_dir
from tests.egress.fakes import FakeAnthropic, FakeOpenAI, FakeProvider, FakeToolCall, provider_for

KEY = "sk-test-0123456789abcdef"
OTHER_KEY = "sk-other-fedcba9876543210"
HELLO = [{"role": "user", "content": "Say hello"}]


@dataclass
class Keys:
    """A KeySource and a ProviderDirectory over a dict (the real ones are ProviderService's)."""

    keys: dict[str, str] = field(default_factory=dict)
    providers: list[Provider] = field(default_factory=list)
    unreadable: set[str] = field(default_factory=set)  # sealed with a key that is gone

    def key(self, name: str) -> str | None:
        if name in self.unreadable:
            raise ProviderKeyUnreadable(f"the key of provider {name} cannot be unsealed")
        return self.keys.get(name)

    def list(self) -> list[Provider]:
        return self.providers


@dataclass
class Parts:
    egress: Egress
    store: Store
    metrics: Metrics
    keys: Keys

    def audit(self) -> list[AuditEvent]:
        """The egress rows, oldest first."""
        return self.store.list_audit(action="egress.call")[::-1]


def open_parts(tmp_path: Path, **options: Any) -> Iterator[Parts]:
    egress_options = {"retries": 2, "retry_max_wait": 1.0, **options.pop("egress", {})}
    settings = Settings(data_dir=tmp_path / "data", egress=EgressSettings(**egress_options), **options)
    _, store = open_data_dir(settings)
    metrics = Metrics()
    keys = Keys()
    egress = Egress(
        settings,
        keys,
        store=store,
        metrics=metrics,
        preferences=PreferenceService(settings, store),
        directory=keys,
    )
    try:
        yield Parts(egress, store, metrics, keys)
    finally:
        egress.close()
        store.close()


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    yield from open_parts(tmp_path)


USER = Context(Actor(id="alice", kind="user", role="user"))


def configured(parts: Parts, fake: FakeProvider, *, key: str | None = KEY, **fields: Any) -> Provider:
    provider = provider_for(fake, key_set=key is not None, **fields)
    parts.keys.providers.append(provider)
    if key is not None:
        parts.keys.keys[provider.name] = key
    return provider


async def _collect(stream: AsyncGenerator[Any]) -> list[Any]:
    return [event async for event in stream]


def chat(parts: Parts, provider: Provider, context: Context = USER, **fields: Any) -> list[Any]:
    request = ExternalRequest(model="fake-model", messages=fields.pop("messages", HELLO), **fields)
    return asyncio.run(_collect(parts.egress.chat(provider, request, context=context)))


def text_of(events: list[Any]) -> str:
    return "".join(event.text for event in events if isinstance(event, TextChunk))


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_streams_text_with_the_key_in_the_kind_s_header(
    parts: Parts, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, kind: str
) -> None:
    fake = fake_openai if kind == "openai" else fake_anthropic
    fake.script = "Hello from far away."
    fake.reasoning = "They want a greeting."
    provider = configured(parts, fake)
    events = chat(parts, provider, max_tokens=50, temperature=0.2)
    assert events[0] == Ready(f"external provider {provider.name}", 0, 0, tool_format="native")
    assert "".join(e.text for e in events if isinstance(e, ReasoningChunk)) == "They want a greeting."
    assert text_of(events) == "Hello from far away."
    assert len([e for e in events if isinstance(e, TextChunk)]) > 1  # streamed, not one piece
    assert events[-1] == Finished("stop", 11, 7)
    (request,) = fake.requests
    if kind == "openai":
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert request.body["stream_options"] == {"include_usage": True}
    else:
        assert request.headers["x-api-key"] == KEY
        assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.body["stream"] is True
    assert request.body["max_tokens"] == 50


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_tool_calls_come_back_whole(
    parts: Parts, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, kind: str
) -> None:
    fake = fake_openai if kind == "openai" else fake_anthropic
    fake.script = [
        "Checking.",
        FakeToolCall("get_weather", {"city": "Paris", "days": [1, 2]}, id="call_a"),
        FakeToolCall("get_time", {"zone": "CET"}, id="call_b"),
    ]
    fake.chunk_size = 3  # arguments arrive as partial JSON
    provider = configured(parts, fake)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    events = chat(parts, provider, tools=ToolSet(tools=tuple(tools)))
    calls = [event for event in events if isinstance(event, ToolCall)]
    assert [(call.name, call.arguments) for call in calls] == [
        ("get_weather", {"city": "Paris", "days": [1, 2]}),
        ("get_time", {"zone": "CET"}),
    ]
    assert calls[0].id.endswith("_a")
    assert calls[1].id.endswith("_b")
    assert text_of(events) == "Checking."
    assert isinstance(events[-1], Finished)
    assert events[-1].reason == "tool_calls"
    (sent,) = fake.requests[0].body["tools"]
    if kind == "anthropic":
        assert sent == {"name": "get_weather", "input_schema": {"type": "object"}}
    else:
        assert sent == tools[0]


def test_a_429_then_200_is_tried_again_and_audited_with_two_attempts(
    parts: Parts, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_first = [429]
    provider = configured(parts, fake_openai)
    events = chat(parts, provider)
    assert text_of(events) == "Hello from the fake provider."
    assert len(fake_openai.requests) == 2
    (row,) = parts.audit()
    assert row.detail["attempts"] == 2
    assert row.detail["status"] == 200
    assert row.outcome == "ok"


def test_a_provider_failing_every_try_is_provider_failed(parts: Parts, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.fail_first = [500, 503, 529]  # retries=2: three tries in all
    provider = configured(parts, fake_anthropic)
    with pytest.raises(ProviderFailed, match=f"provider {provider.name} answered 529: try again later"):
        chat(parts, provider)
    assert len(fake_anthropic.requests) == 3
    (row,) = parts.audit()
    assert row.outcome == "error"
    assert row.detail | {"reason": None} == {
        "operation": "chat",
        "model": "fake-model",
        "status": 529,
        "outcome": "failed",
        "attempts": 3,
        "tokens_in": 0,
        "tokens_out": 0,
        "error": "provider_failed",
        "reason": None,
    }
    assert row.detail["reason"] == f"provider {provider.name} answered 529"


def test_a_retry_after_past_the_longest_wait_fails_at_once_and_passes_it_on(
    parts: Parts, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_first = [429]
    fake_openai.retry_after = "120"
    provider = configured(parts, fake_openai)
    with pytest.raises(ProviderFailed) as raised:
        chat(parts, provider)
    assert raised.value.retry_after == 120
    assert len(fake_openai.requests) == 1


def test_a_client_error_is_not_tried_again(parts: Parts, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_first = [400]
    provider = configured(parts, fake_openai)
    with pytest.raises(ProviderFailed, match="answered 400"):
        chat(parts, provider)
    assert len(fake_openai.requests) == 1


def test_an_unreachable_provider_is_provider_failed_after_the_retries(tmp_path: Path) -> None:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port = spare.getsockname()[1]
    provider = Provider(name="gone", kind="openai", base_url=f"http://127.0.0.1:{port}/v1")
    for parts in open_parts(tmp_path, egress={"retries": 1, "retry_max_wait": 0.01}):
        with pytest.raises(ProviderFailed, match=f"cannot reach provider gone at http://127.0.0.1:{port}/v1"):
            chat(parts, provider)
        assert parts.audit()[0].detail["attempts"] == 2


def test_a_silent_provider_times_out(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    fake_openai.delay = 1.0
    for parts in open_parts(tmp_path, egress={"read_timeout": 0.2}):
        provider = configured(parts, fake_openai)
        with pytest.raises(ProviderFailed, match=f"provider {provider.name} timed out"):
            chat(parts, provider)
        assert len(fake_openai.requests) == 1  # a timeout is not tried again: it would only wait longer


def test_an_answer_that_breaks_off_after_text_ends_with_an_error(
    parts: Parts, fake_openai: FakeOpenAI
) -> None:
    fake_openai.drop_after = 4  # the role chunk and three pieces of text
    provider = configured(parts, fake_openai)
    seen: list[Any] = []

    async def run() -> None:
        async for event in parts.egress.chat(provider, ExternalRequest("fake-model", HELLO), context=USER):
            seen.append(event)

    with pytest.raises(ProviderFailed, match="answer broke off"):
        asyncio.run(run())
    assert text_of(seen) == "Hello from t"  # what came before the break was passed on ...
    assert len(fake_openai.requests) == 1  # ... so it is not tried again


def test_an_answer_that_breaks_off_before_any_text_is_tried_again(
    parts: Parts, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.drop_after = 3  # message_start, ping, the text block's start: nothing to pass on yet
    fake_anthropic.drop_times = 1
    provider = configured(parts, fake_anthropic)
    events = chat(parts, provider)
    assert text_of(events) == "Hello from the fake provider."
    assert [type(event) for event in events].count(Ready) == 1
    assert parts.audit()[0].detail["attempts"] == 2


def test_a_redirect_is_not_followed(
    parts: Parts, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    fake_openai.redirect_to = f"{fake_anthropic.url}/v1/chat/completions"
    provider = configured(parts, fake_openai)
    with pytest.raises(ProviderFailed, match=r"307: a redirect to .* which is not followed"):
        chat(parts, provider)
    assert fake_anthropic.requests == []  # the key never went to the other host


def test_the_key_echoed_back_is_scrubbed_even_split_across_chunks(
    parts: Parts, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    other = configured(parts, fake_anthropic, key=OTHER_KEY, name="other")
    fake_openai.echo_key = True
    fake_openai.script = [f"Theirs is {OTHER_KEY}!", FakeToolCall("leak", {"key": KEY, KEY: [OTHER_KEY]})]
    fake_openai.reasoning = f"I hold {KEY} and {OTHER_KEY[:5]}"
    provider = configured(parts, fake_openai)
    for size in (1, 3, 7):
        fake_openai.chunk_size = size  # each key is cut across chunks at a different place
        events = chat(parts, provider)
        text = text_of(events)
        assert text == "Theirs is [redacted]! Your key is [redacted]."
        reasoning = "".join(e.text for e in events if isinstance(e, ReasoningChunk))
        assert reasoning == f"I hold [redacted] and {OTHER_KEY[:5]}"  # a key's start alone is no key
        (call,) = [e for e in events if isinstance(e, ToolCall)]
        assert call.arguments == {"key": "[redacted]", "[redacted]": ["[redacted]"]}
    assert other.key_set  # the other provider's key is scrubbed though this call never sent it


def test_the_key_in_an_error_body_is_scrubbed(parts: Parts, fake_openai: FakeOpenAI) -> None:
    fake_openai.echo_key = True
    fake_openai.fail_first = [500, 500, 500]
    provider = configured(parts, fake_openai)
    with pytest.raises(ProviderFailed) as raised:
        chat(parts, provider)
    assert "try again later (key [redacted])" in raised.value.message
    assert KEY not in json.dumps(parts.audit()[0].detail)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_refused_key_says_how_to_set_it_again(
    parts: Parts, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, kind: str
) -> None:
    fake = fake_openai if kind == "openai" else fake_anthropic
    fake.require_key = "sk-the-right-one"
    fake.echo_key = True
    provider = configured(parts, fake)
    with pytest.raises(ProviderFailed) as raised:
        chat(parts, provider)
    assert KEY not in raised.value.message
    assert "[redacted]" in raised.value.message
    assert f"appliance providers set {provider.name} --key-stdin" in raised.value.hint
    assert "set it again" in raised.value.hint
    assert len(fake.requests) == 1


def test_a_provider_without_a_key_is_called_without_one(parts: Parts, fake_openai: FakeOpenAI) -> None:
    provider = configured(parts, fake_openai, key=None)
    assert text_of(chat(parts, provider)) == "Hello from the fake provider."
    assert "authorization" not in fake_openai.requests[0].headers
    fake_openai.require_key = KEY
    with pytest.raises(ProviderFailed) as raised:
        chat(parts, provider)
    assert "it has none: set one" in raised.value.hint


@pytest.mark.parametrize(
    ("subjects", "who", "allowed"),
    [
        (("*",), Actor("bob", "user", "user"), True),
        (("role:admin",), Actor("bob", "user", "user"), False),
        (("role:admin",), Actor.cli(), True),
        (("user:bob",), Actor("bob", "user", "user"), True),
        (("user:bob",), Actor("bob", "key", "user"), False),
        (("key:ci",), Actor("ci", "key", "user"), True),
        (("task",), Actor("t1", "task", "user"), True),
        (("role:user",), Actor("t1", "task", "user"), False),  # a job is allowed as a task only
        (("role:user", "task"), Actor("anon", "anonymous"), False),
        ((), Actor.cli(), False),
    ],
)
def test_subjects_match_the_caller(subjects: tuple[str, ...], who: Actor, allowed: bool) -> None:
    assert subject_allowed(subjects, who) is allowed


def test_a_caller_outside_the_subjects_is_denied_and_audited(parts: Parts, fake_openai: FakeOpenAI) -> None:
    provider = configured(parts, fake_openai, subjects=("role:admin", "task"))
    with pytest.raises(EgressDenied, match=f"provider {provider.name} takes no calls for user:alice"):
        chat(parts, provider)
    assert fake_openai.requests == []
    (row,) = parts.audit()
    assert (row.actor, row.target, row.outcome) == ("user:alice", provider.name, "error")
    assert row.detail["outcome"] == "denied"
    assert row.detail["error"] == "egress_denied"


def test_an_operation_outside_the_list_is_denied(parts: Parts, fake_openai: FakeOpenAI) -> None:
    provider = configured(parts, fake_openai, operations=("embed",))
    with pytest.raises(EgressDenied, match="does not allow chat"):
        chat(parts, provider)
    assert fake_openai.requests == []


def test_offline_calls_no_provider(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    for parts in open_parts(tmp_path, offline=True):
        provider = configured(parts, fake_openai)
        with pytest.raises(Offline, match=f"no call to provider {provider.name}"):
            chat(parts, provider)
        with pytest.raises(Offline):
            asyncio.run(parts.egress.probe(provider, context=USER))
        assert parts.egress.reachable(provider) is False
        assert fake_openai.requests == []
        assert [row.detail["outcome"] for row in parts.audit()] == ["offline", "offline"]


def test_every_call_is_audited_logged_and_counted_without_prompt_or_key(
    parts: Parts, fake_anthropic: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    provider = configured(parts, fake_anthropic)
    job = Context(Actor(id="task-42", kind="task", role="user"))
    fake_anthropic.usage = (30, 12)
    caplog.set_level(logging.INFO, logger="appliance.egress")
    chat(parts, provider, job, messages=[{"role": "user", "content": "the secret plan"}])
    (row,) = parts.audit()
    assert row.actor == "task:task-42"
    assert row.target == provider.name
    assert row.detail == {
        "operation": "chat",
        "model": "fake-model",
        "status": 200,
        "outcome": "ok",
        "attempts": 1,
        "tokens_in": 30,
        "tokens_out": 12,
        "task": "task-42",
    }
    (line,) = [r.getMessage() for r in caplog.records if r.name == "appliance.egress"]
    assert f"provider={provider.name}" in line
    assert "outcome=ok" in line
    assert "task=task-42" in line
    for text in (json.dumps(row.detail), line):
        assert "secret plan" not in text
        assert KEY not in text
        assert "Hello" not in text
    metrics = parts.metrics.render().decode()
    subject = 'subject="task:task-42"'
    assert (
        f'appliance_egress_tokens_total{{direction="in",provider="{provider.name}",{subject}}} 30.0'
        in metrics
    )
    assert (
        f'appliance_egress_tokens_total{{direction="out",provider="{provider.name}",{subject}}} 12.0'
        in metrics
    )
    assert (
        f'appliance_egress_requests_total{{operation="chat",outcome="ok",provider="{provider.name}"}} 1.0'
        in metrics
    )
    assert f'appliance_egress_seconds_count{{operation="chat",provider="{provider.name}"}} 1.0' in metrics


def test_a_caller_that_stops_reading_is_audited_as_cancelled(parts: Parts, fake_openai: FakeOpenAI) -> None:
    provider = configured(parts, fake_openai)

    async def first_text() -> str:
        stream = parts.egress.chat(provider, ExternalRequest("fake-model", HELLO), context=USER)
        async for event in stream:
            if isinstance(event, TextChunk):
                await stream.aclose()
                return event.text
        return ""

    assert asyncio.run(first_text()) == "Hell"
    (row,) = parts.audit()
    assert row.detail["outcome"] == "cancelled"


def test_complete_streams_a_raw_prompt(parts: Parts, fake_openai: FakeOpenAI) -> None:
    provider = configured(parts, fake_openai)
    request = ExternalRequest("fake-model", prompt="Once upon", stop=("\n",))
    events = asyncio.run(_collect(parts.egress.complete(provider, request, context=USER)))
    assert text_of(events) == "Hello from the fake provider."
    assert events[-1] == Finished("stop", 11, 7)
    assert fake_openai.received("/v1/completions")[0].body["prompt"] == "Once upon"


def test_anthropic_has_no_raw_completions_nor_embeddings(parts: Parts, fake_anthropic: FakeAnthropic) -> None:
    provider = configured(parts, fake_anthropic)
    request = ExternalRequest("fake-model", prompt="Once upon")
    with pytest.raises(ProviderUnsupported, match=f"provider {provider.name} \\(anthropic\\) has no raw"):
        asyncio.run(_collect(parts.egress.complete(provider, request, context=USER)))
    with pytest.raises(ProviderUnsupported, match="makes no embeddings"):
        asyncio.run(parts.egress.embed(provider, "fake-model", ["a"], context=USER))
    assert fake_anthropic.requests == []
    assert [row.detail["outcome"] for row in parts.audit()] == ["unsupported", "unsupported"]


def test_embeddings_from_an_openai_provider(parts: Parts, fake_openai: FakeOpenAI) -> None:
    provider = configured(parts, fake_openai)
    fake_openai.fail_first = [503]
    result = asyncio.run(parts.egress.embed(provider, "fake-embed", ["ab", "abcd"], context=USER))
    assert result.vectors == [[2.0, 0.5, -0.25], [4.0, 0.5, -0.25]]
    assert result.tokens == 11
    assert result.reason == f"external provider {provider.name}"
    assert (
        parts.audit()[0].detail | {"attempts": 2, "operation": "embed", "tokens_in": 11}
        == parts.audit()[0].detail
    )


def test_an_answer_in_another_format_is_provider_failed(parts: Parts, fake_openai: FakeOpenAI) -> None:
    fake_openai.garbage = b'{"data": "no vectors, no stream"}'
    provider = configured(parts, fake_openai)
    with pytest.raises(ProviderFailed, match="embeddings that are not a list of vectors"):
        asyncio.run(parts.egress.embed(provider, "fake-embed", ["a"], context=USER))
    with pytest.raises(ProviderFailed, match=r"answer broke off: its answer ended before \[DONE\]"):
        chat(parts, provider)
    assert [row.detail["outcome"] for row in parts.audit()] == ["failed", "failed"]


def test_probe_lists_the_models_or_says_why_not(parts: Parts, fake_openai: FakeOpenAI) -> None:
    provider = configured(parts, fake_openai, subjects=("task",), operations=("chat",))
    result = asyncio.run(parts.egress.probe(provider, context=USER))  # the allow-lists are for calls
    assert (result.ok, result.status, result.models) == (True, 200, ["fake-model", "fake-model-large"])
    assert fake_openai.requests[0].headers["authorization"] == f"Bearer {KEY}"
    fake_openai.require_key = "sk-another"
    refused = asyncio.run(parts.egress.probe(provider, context=USER))
    assert (refused.ok, refused.status) == (False, 401)
    assert refused.error is not None
    assert "answered 401" in refused.error
    fake_openai.stop()
    gone = asyncio.run(parts.egress.probe(provider, context=USER))
    assert (gone.ok, gone.status) == (False, None)
    assert gone.error is not None
    assert "cannot reach" in gone.error
    assert [row.detail["outcome"] for row in parts.audit()] == ["ok", "failed", "failed"]
    assert [row.detail["operation"] for row in parts.audit()] == ["models"] * 3


def test_reachable_probes_once_then_answers_from_its_cache(
    tmp_path: Path, fake_anthropic: FakeAnthropic
) -> None:
    for parts in open_parts(tmp_path, egress={"probe_every": 0.3}):
        provider = configured(parts, fake_anthropic)
        assert parts.egress.reachable(provider) is True  # the first call waits for its probe
        assert parts.egress.reachable(provider) is True
        assert len(fake_anthropic.requests) == 1
        assert parts.audit() == []  # readiness probes are logged and counted, not audited
        fake_anthropic.require_key = "sk-rotated"
        changed = replace(provider, updated_at="2099-01-01T00:00:00.000000Z")  # its key was set again
        assert parts.egress.reachable(changed) is False
        fake_anthropic.require_key = None
        assert parts.egress.reachable(changed) is False  # cached until it is probe_every old ...
        asyncio.run(asyncio.sleep(0.35))
        parts.egress.reachable(changed)  # ... then probed again in the background
        for _ in range(50):
            if parts.egress.reachable(changed):
                break
            asyncio.run(asyncio.sleep(0.02))
        assert parts.egress.reachable(changed) is True


def test_an_unreadable_key_fails_its_own_provider_only(
    parts: Parts, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    broken = configured(parts, fake_anthropic, name="broken")
    parts.keys.unreadable.add("broken")
    provider = configured(parts, fake_openai)
    assert text_of(chat(parts, provider)) == "Hello from the fake provider."  # another's key: skipped
    with pytest.raises(ProviderKeyUnreadable):
        chat(parts, broken)
    assert parts.egress.reachable(broken) is False
    assert fake_anthropic.requests == []
    assert parts.audit()[-1].detail["error"] == "provider_key_unreadable"


def test_probe_result_is_what_reachable_reads(parts: Parts, fake_openai: FakeOpenAI) -> None:
    provider = configured(parts, fake_openai)
    result = asyncio.run(parts.egress.probe(provider, context=USER))
    assert isinstance(result, ProbeResult)
    assert result.ok
    assert parts.egress.reachable(provider) is True
    assert len(fake_openai.requests) == 1  # the explicit probe answered it


def test_the_runtime_s_egress_reads_sealed_keys_and_scrubs_every_provider_s(
    runtime: Runtime, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    admin = Context.cli()
    runtime.providers.add("lan", kind="openai", base_url=fake_openai.base_url, key=KEY, context=admin)
    runtime.providers.add(
        "claude", kind="anthropic", base_url=fake_anthropic.base_url, key=OTHER_KEY, context=admin
    )
    fake_openai.script = f"Theirs: {OTHER_KEY}."
    fake_openai.echo_key = True
    request = ExternalRequest("fake-model", HELLO)
    events = asyncio.run(_collect(runtime.egress.chat(runtime.providers.get("lan"), request, context=USER)))
    assert text_of(events) == "Theirs: [redacted]. Your key is [redacted]."
    assert fake_openai.requests[0].headers["authorization"] == f"Bearer {KEY}"
    probed = asyncio.run(runtime.egress.probe(runtime.providers.get("claude"), context=admin))
    assert probed.ok
    assert fake_anthropic.requests[0].headers["x-api-key"] == OTHER_KEY
