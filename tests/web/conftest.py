"""Fixtures of the web tests: accounts and API keys made before a server starts, tiny models
imported into it, and the real ``openai`` and ``ollama`` clients pointed at it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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
from tests.conftest import Server, import_file, isolate, started_server
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


def import_model(data_dir: Path, name: str, template: str, **gguf: Any) -> str:
    """A tiny model with ``template`` imported as ``name`` into ``data_dir`` (its file written beside
    it); ``gguf`` adds write_llama_gguf's options. Its context has room for tools in the prompt (the
    byte vocabulary spends a token per byte)."""
    source = data_dir.parent / "gguf"
    source.mkdir(parents=True, exist_ok=True)
    path = write_llama_gguf(source / f"{name}.gguf", context=2048, chat_template=template, **gguf)
    import_file(data_dir, path, name)
    return name


@pytest.fixture
def models(data_dir: Path) -> dict[str, str]:
    """One model per kind of template: ``generic`` cannot show tools, ``hermes`` is Qwen's."""
    return {
        "generic": import_model(data_dir, "generic", TINY_CHAT_TEMPLATE),
        "hermes": import_model(data_dir, "hermes", QWEN),
    }


# -- one server for a module -------------------------------------------------------------------
# A module whose tests change nothing another one reads (each reads only the answers it asked
# for) overrides ``server`` and ``models`` with these, and starts one server instead of one a test.


@contextmanager
def isolated(root: Path) -> Iterator[None]:
    """The isolated environment each test has (module fixtures are set up before it is)."""
    with pytest.MonkeyPatch.context() as patch:
        isolate(patch, root)
        yield


@pytest.fixture(scope="module")
def shared_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared") / "data"


@pytest.fixture(scope="module")
def shared_server(shared_data_dir: Path) -> Iterator[Server]:
    """``appliance serve`` on the module's data dir."""
    root = shared_data_dir.parent
    with ExitStack() as stack:
        with isolated(root):
            started = stack.enter_context(started_server(shared_data_dir, log=root / "serve.log"))
        yield started


def shared_import(data_dir: Path, name: str, template: str, **gguf: Any) -> str:
    """``import_model`` into a module's data dir."""
    with isolated(data_dir.parent):
        return import_model(data_dir, name, template, **gguf)


@pytest.fixture(scope="module")
def shared_tiny(shared_data_dir: Path, tiny_gguf_master: Path) -> str:
    """The tiny model of ``tiny_gguf`` as ``tiny``, in the module's data dir."""
    with isolated(shared_data_dir.parent):
        import_file(shared_data_dir, tiny_gguf_master, "tiny")
    return "tiny"


@pytest.fixture(scope="module")
def shared_models(shared_data_dir: Path) -> dict[str, str]:
    """The ``models`` fixture's models, in the module's data dir."""
    return {
        "generic": shared_import(shared_data_dir, "generic", TINY_CHAT_TEMPLATE),
        "hermes": shared_import(shared_data_dir, "hermes", QWEN),
    }


def ran(server: Server, request_id: str) -> list[dict[str, Any]]:
    """The inference log's records of the request sent with ``X-Request-ID: request_id``: on a
    server that other tests share, what one request ran."""
    return [
        row for row in server.client.get("/api/v1/inference").json() if row["correlation_id"] == request_id
    ]


@pytest.fixture
def openai_client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
def ollama_client(server: Server) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=60) as client:
        yield client
