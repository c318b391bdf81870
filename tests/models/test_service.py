"""Model management through the service the CLI and API share, on a real store and cache."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.errors import CacheFull, InvalidModelName, ModelExists, ModelNotFound, UnsupportedFormat
from appliance.runtime import Runtime
from appliance.settings import Settings


def registry_rows(runtime: Runtime) -> tuple[object, ...]:
    """Everything a failed import must leave untouched."""
    return (
        runtime.store.list_models(),
        runtime.store.list_blobs(),
        sorted(os.listdir(runtime.cache.blobs_dir)),
    )


def write_safetensors(path: Path) -> Path:
    header = json.dumps({"w": {"dtype": "F16", "shape": [4, 2], "data_offsets": [0, 16]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    return path


def test_import_reads_gguf_metadata(runtime: Runtime, tiny_gguf: Path, context: Context) -> None:
    result = runtime.models.import_file(tiny_gguf, context, name="tiny:test")
    assert result.added
    assert str(result.model.name) == "tiny:test"
    capabilities = result.model.capabilities
    assert capabilities["architecture"] == "llama"
    assert capabilities["context_length"] == 256
    assert capabilities["parameter_count"] == 115_520
    assert capabilities["quantization"] == "ALL_F32"
    assert capabilities["chat_template"] is True
    assert capabilities["tensor_count"] == 21
    artifact = result.model.artifacts[0]
    assert (artifact.format, artifact.size_bytes) == ("gguf", tiny_gguf.stat().st_size)
    assert runtime.cache.has(artifact.digest)


def test_default_name_comes_from_the_file(runtime: Runtime, tiny_gguf: Path, context: Context) -> None:
    assert str(runtime.models.import_file(tiny_gguf, context).model.name) == "tiny:latest"


def test_reimport_is_idempotent_and_a_second_name_shares_the_blob(
    runtime: Runtime, tiny_gguf: Path, context: Context
) -> None:
    first = runtime.models.import_file(tiny_gguf, context, name="a")
    again = runtime.models.import_file(tiny_gguf, context, name="a")
    other = runtime.models.import_file(tiny_gguf, context, name="b", allow_link=False)
    assert not again.added
    assert first.digest == again.digest == other.digest
    assert len(runtime.store.list_blobs()) == 1
    assert len(os.listdir(runtime.cache.blobs_dir)) == 1


def test_several_formats_under_one_model(
    runtime: Runtime, tiny_gguf: Path, tmp_path: Path, context: Context
) -> None:
    """REQ-MODELS-0103: the cache may store several formats of one logical model."""
    runtime.models.import_file(tiny_gguf, context, name="multi")
    both = runtime.models.import_file(
        write_safetensors(tmp_path / "model.safetensors"), context, name="multi"
    )
    assert both.model.formats == ["gguf", "safetensors"]
    assert both.model.capabilities["architecture"] == "llama"
    assert both.model.capabilities["dtypes"] == ["F16"]


def test_other_content_under_an_existing_name_is_refused(
    runtime: Runtime, tiny_gguf: Path, make_gguf: object, context: Context
) -> None:
    runtime.models.import_file(tiny_gguf, context, name="m")
    before = registry_rows(runtime)
    different = make_gguf("tiny.gguf", seed=7)  # type: ignore[operator]
    with pytest.raises(ModelExists, match=r"already has a file 'tiny\.gguf'"):
        runtime.models.import_file(different, context, name="m", allow_link=False)
    assert registry_rows(runtime) == before
    assert os.listdir(runtime.cache.tmp_dir) == []


@pytest.mark.parametrize(
    ("content", "fmt", "message"),
    [
        (b"GGUF" + b"\xff" * 60, "gguf", "cannot be read"),  # right magic, damaged header
        (b"not a model at all", None, "neither GGUF nor safetensors"),
        (b"not a model at all", "gguf", "is not a GGUF file"),
        (b"not a model at all", "safetensors", "is not a safetensors file"),
        (b"not a model at all", "onnx", "unknown format"),
        (struct.pack("<Q", 8) + b"{broken}" + b"\0" * 8, "safetensors", "damaged safetensors header"),
    ],
)
def test_wrong_format_is_rejected_and_changes_nothing(
    runtime: Runtime, tmp_path: Path, context: Context, content: bytes, fmt: str | None, message: str
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    before = registry_rows(runtime)
    with pytest.raises(UnsupportedFormat, match=message):
        runtime.models.import_file(bad, context, fmt=fmt, allow_link=False)
    assert registry_rows(runtime) == before
    assert os.listdir(runtime.cache.tmp_dir) == []


def test_bad_name_is_rejected_before_any_work(runtime: Runtime, tiny_gguf: Path, context: Context) -> None:
    with pytest.raises(InvalidModelName):
        runtime.models.import_file(tiny_gguf, context, name="bad name")
    assert runtime.store.list_audit() == []  # nothing was attempted, so nothing to audit


def test_remove_frees_blobs_nobody_else_uses(runtime: Runtime, tiny_gguf: Path, context: Context) -> None:
    size = tiny_gguf.stat().st_size
    runtime.models.import_file(tiny_gguf, context, name="a")
    runtime.models.import_file(tiny_gguf, context, name="b")
    assert runtime.models.remove("a", context) == 0
    assert runtime.models.remove("b", context) == size
    assert os.listdir(runtime.cache.blobs_dir) == []
    assert runtime.store.list_blobs() == []
    with pytest.raises(ModelNotFound):
        runtime.models.remove("b", context)


def budget_runtime(data_dir: Path, max_bytes: int, policy: str = "lru") -> Runtime:
    return Runtime.open(
        Settings(data_dir=data_dir, models={"cache": {"max_bytes": max_bytes, "evict_policy": policy}})
    )


def test_lru_eviction_keeps_pinned_models(data_dir: Path, make_gguf: object, context: Context) -> None:
    files = [make_gguf(f"m{index}.gguf", seed=index) for index in range(4)]  # type: ignore[operator]
    size = files[0].stat().st_size
    runtime = budget_runtime(data_dir, max_bytes=3 * size)
    try:
        for index in range(3):
            runtime.models.import_file(files[index], context, name=f"m{index}")
        runtime.models.set_pinned("m0", True, context)  # oldest, but pinned
        runtime.store.touch_model(runtime.models.get("m1").name)  # m1 is now newer than m2
        result = runtime.models.import_file(files[3], context, name="m3")
        assert result.evicted == ("m2:latest",)
        assert sorted(str(model.name) for model in runtime.models.list_models()) == [
            "m0:latest",
            "m1:latest",
            "m3:latest",
        ]
        assert runtime.store.cache_bytes() <= 3 * size
        evictions = runtime.store.list_audit(action="models.evict")
        assert [(event.target, event.bytes) for event in evictions] == [("m2:latest", size)]
        assert evictions[0].correlation_id == context.correlation_id
    finally:
        runtime.close()


def test_import_that_cannot_fit_is_refused_and_changes_nothing(
    data_dir: Path, make_gguf: object, context: Context
) -> None:
    small = make_gguf("small.gguf", seed=1)  # type: ignore[operator]
    large = make_gguf("large.gguf", seed=2, padding_bytes=small.stat().st_size)  # type: ignore[operator]
    runtime = budget_runtime(data_dir, max_bytes=small.stat().st_size + 100)
    try:
        runtime.models.import_file(small, context, name="small")
        runtime.models.set_pinned("small", True, context)
        before = registry_rows(runtime)
        with pytest.raises(CacheFull, match=r"models\.cache\.max_bytes"):
            runtime.models.import_file(large, context, name="large")
        assert registry_rows(runtime) == before
        assert os.listdir(runtime.cache.tmp_dir) == []
    finally:
        runtime.close()


def test_evict_policy_none_refuses_instead_of_evicting(
    data_dir: Path, make_gguf: object, context: Context
) -> None:
    first, second = (make_gguf(f"m{index}.gguf", seed=index) for index in range(2))  # type: ignore[operator]
    runtime = budget_runtime(data_dir, max_bytes=first.stat().st_size + 100, policy="none")
    try:
        runtime.models.import_file(first, context, name="first")
        with pytest.raises(CacheFull):
            runtime.models.import_file(second, context, name="second")
        assert [str(model.name) for model in runtime.models.list_models()] == ["first:latest"]
    finally:
        runtime.close()


def test_a_preference_overrides_the_budget_setting(
    runtime: Runtime, make_gguf: object, context: Context
) -> None:
    """REQ-MODELS-0108: model management is configurable through stored preferences."""
    first, second = (make_gguf(f"m{index}.gguf", seed=index) for index in range(2))  # type: ignore[operator]
    runtime.store.set_preference("models.cache.max_bytes", first.stat().st_size + 100, actor="test")
    runtime.models.import_file(first, context, name="first")
    result = runtime.models.import_file(second, context, name="second")
    assert result.evicted == ("first:latest",)


def test_verify_quarantines_a_corrupted_blob(runtime: Runtime, tiny_gguf: Path, context: Context) -> None:
    digest = runtime.models.import_file(tiny_gguf, context, name="m", allow_link=False).digest
    assert [result.ok for result in runtime.models.verify(context)] == [True]
    blob = runtime.cache.path(digest)
    os.chmod(blob, 0o644)
    with blob.open("r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00corrupt\x00")
    results = runtime.models.verify(context, name="m")
    assert [(result.ok, result.models) for result in results] == [(False, ("m:latest",))]
    assert "moved to quarantine" in results[0].detail
    assert not runtime.cache.has(digest)
    assert runtime.models.get("m").state == "quarantined"
    assert (runtime.cache.quarantine_dir / digest.removeprefix("sha256:")).exists()
    failed = runtime.store.list_audit(action="models.verify")[0]
    assert failed.outcome == "error"
    # Verifying again still fails: a quarantined blob is never served again.
    assert [result.ok for result in runtime.models.verify(context)] == [False]


def test_verify_records_when_it_last_checked(runtime: Runtime, tiny_gguf: Path, context: Context) -> None:
    digest = runtime.models.import_file(tiny_gguf, context, name="m").digest
    before = runtime.store.get_blob(digest)
    runtime.models.verify(context)
    after = runtime.store.get_blob(digest)
    assert before is not None
    assert after is not None
    assert after.last_verified_at is not None
    assert after.last_verified_at > (before.last_verified_at or "")


def test_gc_removes_orphans_stale_partials_and_quarantined_leftovers(
    runtime: Runtime, tiny_gguf: Path, context: Context
) -> None:
    runtime.models.import_file(tiny_gguf, context, name="kept")
    orphan = runtime.cache.blobs_dir / ("c" * 64)
    orphan.write_bytes(b"o" * 10)
    partial = runtime.cache.tmp_dir / "dead.partial"
    partial.write_bytes(b"p" * 20)
    allocated = partial.stat().st_blocks * 512  # what removing it gives back to the disk
    (runtime.cache.quarantine_dir / ("d" * 64)).write_bytes(b"q" * 30)
    report = runtime.models.gc(context)
    assert (report.orphan_blobs, report.stale_partials, report.freed_bytes) == (1, 1, 10 + allocated + 30)
    assert not orphan.exists()
    assert [str(model.name) for model in runtime.models.list_models()] == ["kept:latest"]
    assert runtime.models.verify(context)[0].ok


def test_gc_evicts_down_to_a_lowered_budget(runtime: Runtime, make_gguf: object, context: Context) -> None:
    first, second = (make_gguf(f"m{index}.gguf", seed=index) for index in range(2))  # type: ignore[operator]
    runtime.models.import_file(first, context, name="old")
    runtime.models.import_file(second, context, name="new")
    runtime.store.set_preference("models.cache.max_bytes", second.stat().st_size, actor="test")
    assert runtime.models.gc(context).evicted == ("old:latest",)


def test_every_mutation_is_audited(runtime: Runtime, tiny_gguf: Path, tmp_path: Path) -> None:
    """REQ-MODELS-0107/0109: imports, verifies, pins, deletions and failures are audited."""
    context = Context(actor="cli:alice", correlation_id="corr-1")
    size = tiny_gguf.stat().st_size
    runtime.models.import_file(tiny_gguf, context, name="m")
    runtime.models.set_pinned("m", True, context)
    runtime.models.set_pinned("m", False, context)
    runtime.models.verify(context)
    runtime.models.remove("m", context)
    with pytest.raises(Exception, match="does not exist"):
        runtime.models.import_file(tmp_path / "missing.gguf", context, name="x")
    events = list(reversed(runtime.store.list_audit()))
    assert [(event.action, event.outcome) for event in events] == [
        ("models.import", "ok"),
        ("models.pin", "ok"),
        ("models.unpin", "ok"),
        ("models.verify", "ok"),
        ("models.delete", "ok"),
        ("models.import", "error"),
    ]
    assert {event.actor for event in events} == {"cli:alice"}
    assert {event.correlation_id for event in events} == {"corr-1"}
    assert events[0].bytes == size
    assert events[0].duration_ms is not None
    assert events[0].detail["digest"].startswith("sha256:")
    assert events[4].bytes == size
    assert events[5].detail["error"] == "source_not_found"
