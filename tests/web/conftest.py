"""Fixtures of the web tests: accounts and API keys made before a server starts, tiny models
imported into it, and the real ``openai`` and ``ollama`` clients pointed at it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from appliance.audit import Context
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.store.base import ApiKey
from tests.conftest import CliResult, Server
from tests.engine.tool_templates import QWEN
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf

PASSWORD = "correct horse battery"


@dataclass
class Keys:
    admin: str
    user: str
    revoked: str
    expired: str


@pytest.fixture
def keys(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Keys:
    """Auth on (for the server started after this), an admin and a user, and their keys; made
    through the service in this process (the CLI's own tests run the commands)."""
    monkeypatch.setenv("APPLIANCE_SERVER__AUTH", "on")
    runtime = Runtime.open(Settings(data_dir=data_dir))
    try:
        auth, context = runtime.auth, Context.cli()
        auth.add_user("root", "admin", PASSWORD, context)
        auth.add_user("alice", "user", PASSWORD, context)
        revoked = auth.create_key(context, user="alice")
        auth.revoke_key(revoked.id, context)
        # A key that has expired: written as create_key writes one, with a past expiry.
        expired = "apl_" + "x" * 43
        digest = hashlib.sha256(expired.encode()).hexdigest()
        key = ApiKey("expired1", "old", expired[:10], digest, "admin", "root", "t")
        runtime.store.create_api_key(replace(key, expires_at="2000-01-01T00:00:00.000000Z"))
        return Keys(
            admin=auth.create_key(context, user="root").key,
            user=auth.create_key(context, user="alice").key,
            revoked=revoked.key,
            expired=expired,
        )
    finally:
        runtime.close()


def import_model(cli: object, tmp_path: Path, name: str, template: str, **gguf: Any) -> str:
    """A tiny model with ``template`` imported as ``name``; ``gguf`` adds write_llama_gguf's options.
    Its context has room for tools in the prompt (the byte vocabulary spends a token per byte)."""
    path = write_llama_gguf(tmp_path / f"{name}.gguf", context=2048, chat_template=template, **gguf)
    result: CliResult = cli("models", "import", str(path), "--name", name)  # type: ignore[operator]
    assert result.returncode == 0, result.stderr
    return name


@pytest.fixture
def models(cli: object, tmp_path: Path) -> dict[str, str]:
    """One model per kind of template: ``generic`` cannot show tools, ``hermes`` is Qwen's."""
    return {
        "generic": import_model(cli, tmp_path, "generic", TINY_CHAT_TEMPLATE),
        "hermes": import_model(cli, tmp_path, "hermes", QWEN),
    }


@pytest.fixture
def openai_client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
def ollama_client(server: Server) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=60) as client:
        yield client
