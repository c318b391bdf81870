"""A registry with a row in every table, written by the real services (and, for what only a serving
engine writes, the store): what the tests of ``appliance db copy`` copy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.audit import Context
from appliance.cluster.service import HeartbeatIn, ModelAvailabilityIn
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.store.base import InferenceRecord
from appliance.tasks.service import NewTask
from tests.fileserver import serve_files
from tests.tiny_model import write_llama_gguf

__all__ = ["Filled", "fill_registry"]

PASSWORD = "correct horse battery"
PROVIDER_KEY = "sk-test-copied-provider-key"


@dataclass(frozen=True)
class Filled:
    models: dict[str, str]  # name: digest
    user_key: str  # alice's API key
    provider_key: str  # the key of provider "remote", sealed with the data dir's key file


def fill_registry(data_dir: Path, work: Path) -> Filled:
    """Two models (one imported, one pulled over HTTP, so a download too), users, API keys, a
    login session, a queued task, a preference, a join token, a node that joined (holding a
    model), an inference record, an external provider with its key, and the audit events all of
    that wrote."""
    context = Context.cli()
    work.mkdir(parents=True, exist_ok=True)
    runtime = Runtime.open(Settings(data_dir=data_dir))
    try:
        imported = runtime.models.import_file(
            write_llama_gguf(work / "tiny.gguf", seed=1), context, name="tiny"
        )
        with serve_files() as files:
            url = files.add("/pulled.gguf", write_llama_gguf(work / "pulled.gguf", seed=2).read_bytes())
            pulled = runtime.provisioner.ensure_present(url, context, name="pulled")
        runtime.auth.add_user("root", "admin", PASSWORD, context)
        runtime.auth.add_user("alice", "user", PASSWORD, context)
        key = runtime.auth.create_key(context, user="alice")
        runtime.login.login("root", PASSWORD, "127.0.0.1", context)
        runtime.preferences.set("models.cache.evict_policy", "none", context)
        runtime.tasks.create(NewTask(text="hello", model="tiny", idempotency_key="first"), [], context)
        token = runtime.cluster.create_token(context)
        joined = runtime.cluster.join(token.token, "worker-1", {"cpu_count": 2}, context)
        held = ModelAvailabilityIn(digest=imported.digest, model="tiny:latest", state="cached")
        runtime.cluster.heartbeat(runtime.cluster.authenticate(joined.credential), HeartbeatIn(models=[held]))
        runtime.providers.add(
            "remote", kind="openai", base_url="https://api.example.test/v1", key=PROVIDER_KEY, context=context
        )
        runtime.store.append_inference(
            InferenceRecord(
                "tiny:latest", "/v1/chat/completions", "local", "local", "loaded", "ok", 3, 5, 12, "c1"
            )
        )
        models = {str(model.name): model.artifacts[0].digest for model in runtime.store.list_models()}
        assert set(models) == {str(imported.model.name), pulled.id}
        return Filled(models=models, user_key=key.key, provider_key=PROVIDER_KEY)
    finally:
        runtime.close()
