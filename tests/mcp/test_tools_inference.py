"""The inference tools on the tiny model, through the server's own inference service: which engine
served, what the inference log records, and answers cut to fit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.errors import ModelNotFound, NotReady
from appliance.mcp.catalog import CATALOG
from appliance.mcp.limits import answer_bytes
from appliance.mcp.tools.inference import ChatOut, Engine, Usage
from appliance.runtime import Runtime
from appliance.settings import Settings
from tests.conftest import import_file
from tests.egress.fakes import serve_fake_openai
from tests.mcp.direct import arun, run_tool


def test_chat_and_embed_go_through_the_router_and_the_log(settings: Settings, tiny_gguf: Path) -> None:
    import_file(settings.data_dir, tiny_gguf, "tiny")

    async def calls() -> None:
        runtime = Runtime.open(settings, with_engine=True)
        try:
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
            chat = await arun(
                runtime, "chat", {"model": "tiny", "messages": messages, "max_tokens": 3, "seed": 7}
            )
            assert (chat.model, chat.finish_reason, chat.usage.completion_tokens) == (
                "tiny:latest",
                "length",
                3,
            )
            assert chat.usage.prompt_tokens > 0
            assert (chat.served_by.engine, chat.served_by.node) == ("local:llama.cpp", "local")
            again = await arun(
                runtime, "chat", {"model": "tiny", "messages": messages, "max_tokens": 3, "seed": 7}
            )
            assert again.text == chat.text  # the same seed, the same answer

            embedded = await arun(runtime, "embed", {"model": "tiny", "input": ["hello", "world"]})
            assert [len(vector) for vector in embedded.vectors] == [64, 64]
            assert not embedded.truncated
            # Past the limit, trailing vectors go whole: none is cut.
            many = await arun(runtime, "embed", {"model": "tiny", "input": ["x"] * 12}, limit=2048)
            assert many.truncated
            assert 0 < len(many.vectors) < 12
            assert {len(vector) for vector in many.vectors} == {64}

            with pytest.raises(ModelNotFound):
                await arun(runtime, "chat", {"model": "ghost", "messages": messages})
            assert runtime.inference is not None
            logged = [(row["endpoint"], row["outcome"]) for row in runtime.inference.history()]
            assert sorted(logged) == [
                ("mcp.chat", "length"),
                ("mcp.chat", "length"),
                ("mcp.chat", "refused"),
                ("mcp.embed", "stop"),
                ("mcp.embed", "stop"),
            ]
        finally:
            runtime.close()

    asyncio.run(calls())


def test_chat_and_embed_reach_an_allowed_external_provider(settings: Settings) -> None:
    """A model no engine here has goes to a provider routing allows, as on /v1."""
    with serve_fake_openai() as fake:
        fake.script = "Hello from the fake provider."

        async def calls() -> None:
            runtime = Runtime.open(settings, with_engine=True)
            try:
                context = Context.cli()
                runtime.providers.add(
                    "fakeopenai", kind="openai", base_url=fake.base_url, models=["gpt-4o", "text-embed"],
                    key=None, context=context,
                )  # fmt: skip
                runtime.preferences.set("model_routing.allowed_external_providers", ["fakeopenai"], context)
                messages = [{"role": "user", "content": "Hi"}]
                chat = await arun(runtime, "chat", {"model": "gpt-4o", "messages": messages})
                assert (chat.text, chat.model) == ("Hello from the fake provider.", "fakeopenai/gpt-4o")
                assert chat.served_by.node == "fakeopenai"
                embedded = await arun(runtime, "embed", {"model": "text-embed", "input": ["a", "b"]})
                assert len(embedded.vectors) == 2
                assert fake.received("/v1/chat/completions")
                assert fake.received("/v1/embeddings")
            finally:
                runtime.close()

        asyncio.run(calls())


def test_a_process_without_an_engine_refuses(runtime: Runtime) -> None:
    for name, arguments in (
        ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
        ("embed", {"model": "tiny", "input": ["hi"]}),
    ):
        with pytest.raises(NotReady, match="this process serves no models") as refused:
            run_tool(runtime, name, arguments)
        assert refused.value.hint == "call the tool through the server's /mcp (appliance serve)"


def test_a_long_answer_is_cut_on_a_character_boundary() -> None:
    answer = ChatOut(
        model="tiny:latest",
        text='😀"\n' * 2000,
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=2000),
        served_by=Engine(engine="llama.cpp", node="local", reason="loaded"),
    )
    fit = CATALOG["chat"].fit
    assert fit is not None
    cut = fit(answer, 1024)
    assert cut.truncated
    assert answer_bytes(cut) <= 1024
    assert answer.text.startswith(cut.text)
    assert len(cut.text) > 100
