"""The lean model listing: summaries that agree with the full models, keyset pages, and the
registry generation that tells a cached list it is stale. Every backend passes these."""

from __future__ import annotations

from appliance.names import ModelName
from appliance.store.base import NewArtifact, Store

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
DIGEST_C = "sha256:" + "c" * 64
CAPABILITIES = {
    "architecture": "llama",
    "parameter_count": 1234,
    "quantization": "Q4_K_M",
    "chat_template": "{{ messages }}",
}


def artifact(digest: str, filename: str, fmt: str = "gguf", size: int = 10) -> NewArtifact:
    return NewArtifact(filename=filename, format=fmt, digest=digest, size_bytes=size, source_uri="file:/x")


def test_summaries_show_what_the_full_models_do(store: Store) -> None:
    store.add_artifact(
        ModelName("b", "v1"), artifact(DIGEST_B, "z.gguf"), capabilities=CAPABILITIES, actor="t"
    )
    store.add_artifact(
        ModelName("b", "v1"),
        artifact(DIGEST_C, "a.safetensors", "safetensors", 5),
        capabilities={},
        actor="t",
    )
    store.add_artifact(
        ModelName("a"), artifact(DIGEST_A, "m.safetensors", "safetensors"), capabilities={}, actor="t"
    )
    store.set_pinned(ModelName("b", "v1"), True)
    store.mark_verified(DIGEST_A, state="quarantined")
    full = store.list_models()
    summaries = store.list_model_summaries()
    assert [s.name for s in summaries] == [m.name for m in full] == [ModelName("a"), ModelName("b", "v1")]
    for summary, model in zip(summaries, full, strict=True):
        assert summary.size_bytes == model.size_bytes
        assert list(summary.formats) == model.formats
        assert summary.state == model.state
        assert summary.pinned == model.pinned
        assert (summary.created_at, summary.updated_at) == (model.created_at, model.updated_at)
        assert summary.first_digest == model.artifacts[0].digest
    assert summaries[1].capabilities == {
        "architecture": "llama",
        "parameter_count": 1234,
        "quantization": "Q4_K_M",
    }
    assert summaries[1].gguf_digest == DIGEST_B
    assert summaries[0].capabilities == {}
    assert summaries[0].gguf_digest is None
    assert store.list_model_summaries(gguf_only=True) == [summaries[1]]


def test_pages_walk_every_model_once_in_list_order(store: Store) -> None:
    names = [ModelName(f"m{index % 7}", f"t{index}") for index in range(23)]
    for index, name in enumerate(names):
        store.add_artifact(name, artifact("sha256:" + f"{index:064x}", "m.gguf"), capabilities={}, actor="t")
    for read in (store.list_models, store.list_model_summaries):
        walked: list[ModelName] = []
        after = None
        while page := read(after=after, limit=5):
            walked.extend(model.name for model in page)
            after = page[-1].name
        assert walked == sorted(names, key=lambda name: (name.name, name.tag))


def test_has_loadable_model_needs_an_intact_gguf(store: Store) -> None:
    assert not store.has_loadable_model()
    store.add_artifact(
        ModelName("s"), artifact(DIGEST_A, "m.safetensors", "safetensors"), capabilities={}, actor="t"
    )
    assert not store.has_loadable_model()
    store.add_artifact(ModelName("g"), artifact(DIGEST_B, "m.gguf"), capabilities={}, actor="t")
    assert store.has_loadable_model()
    store.mark_verified(DIGEST_B, state="quarantined")
    assert not store.has_loadable_model()


def test_the_generation_moves_with_every_change_a_list_shows_and_only_then(store: Store) -> None:
    seen = [store.registry_generation()]

    def moved() -> bool:
        seen.append(store.registry_generation())
        return seen[-1] != seen[-2]

    store.add_artifact(ModelName("m"), artifact(DIGEST_A, "m.gguf"), capabilities={}, actor="t")
    assert moved()
    store.touch_model(ModelName("m"))
    assert not moved()
    store.set_pinned(ModelName("m"), True)
    assert moved()
    store.mark_verified(DIGEST_A, state="quarantined")
    assert moved()
    store.mark_verified(DIGEST_A, state="quarantined")
    assert not moved()
    store.remove_model(ModelName("m"))
    assert moved()
