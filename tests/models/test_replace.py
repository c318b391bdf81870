"""One GGUF per model: another one under the same name is refused or, when asked, replaces it;
and a blob hard-linked to the user's file is re-checked before the engine maps it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.errors import ModelExists, ModelNotLoadable
from appliance.runtime import Runtime
from appliance.settings import Settings
from tests.engine.routers import make_router
from tests.fileserver import serve_files
from tests.models.conftest import fill
from tests.models.test_service import registry_rows


def test_another_gguf_under_an_existing_name_is_refused_with_a_hint(
    runtime: Runtime, tiny_gguf: Path, make_gguf: object, context: Context
) -> None:
    runtime.models.import_file(tiny_gguf, context, name="m")
    before = registry_rows(runtime)
    other = make_gguf("other.gguf", seed=7)  # type: ignore[operator]
    with pytest.raises(ModelExists, match="a model holds one gguf file") as caught:
        runtime.models.import_file(other, context, name="m")
    assert "--replace" in caught.value.hint
    assert registry_rows(runtime) == before
    assert [a.filename for a in runtime.models.get("m").artifacts] == ["tiny.gguf"]
    assert os.listdir(runtime.cache.tmp_dir) == []


def test_a_pull_of_another_gguf_under_an_existing_name_is_refused(
    runtime: Runtime, tiny_gguf: Path, make_gguf: object, context: Context
) -> None:
    runtime.models.import_file(tiny_gguf, context, name="m")
    before = registry_rows(runtime)
    other = make_gguf("other.gguf", seed=7)  # type: ignore[operator]
    with serve_files() as files:
        url = files.add("/other.gguf", other.read_bytes())
        with pytest.raises(ModelExists, match="a model holds one gguf file"):
            runtime.provisioner.ensure_present(url, context, name="m")
    assert registry_rows(runtime) == before


@pytest.mark.parametrize("filename", ["tiny.gguf", "other.gguf"])
def test_replace_swaps_the_gguf_and_frees_the_old_blob(
    runtime: Runtime, tiny_gguf: Path, make_gguf: object, context: Context, filename: str
) -> None:
    old = runtime.models.import_file(tiny_gguf, context, name="m").digest
    new_file = make_gguf(f"new/{filename}", seed=7)  # type: ignore[operator]
    result = runtime.models.import_file(new_file, context, name="m", replace=True)
    assert result.replaced == (old,)
    assert [(a.filename, a.digest) for a in runtime.models.get("m").artifacts] == [(filename, result.digest)]
    assert not runtime.cache.has(old)
    assert runtime.store.get_blob(old) is None
    event = runtime.store.list_audit(action="models.import")[0]
    assert event.detail["replaced"] == [old]


def test_replace_keeps_a_blob_another_model_uses(
    runtime: Runtime, tiny_gguf: Path, make_gguf: object, context: Context
) -> None:
    old = runtime.models.import_file(tiny_gguf, context, name="m").digest
    runtime.models.import_file(tiny_gguf, context, name="keep")
    runtime.models.import_file(make_gguf("other.gguf", seed=7), context, name="m", replace=True)  # type: ignore[operator]
    assert runtime.cache.has(old)
    assert [a.digest for a in runtime.models.get("keep").artifacts] == [old]


def test_a_loaded_model_whose_gguf_was_replaced_is_reloaded_when_idle(
    runtime: Runtime, tiny_gguf: Path, make_gguf: object, context: Context
) -> None:
    runtime.models.import_file(tiny_gguf, context, name="m")
    pool = make_router(runtime)
    try:
        first, _ = pool.load("m")
        result = runtime.models.import_file(make_gguf("other.gguf", seed=7), context, name="m", replace=True)  # type: ignore[operator]
        loaded, route = pool.load("m")
        assert first.info.digest != result.digest
        assert loaded.info.digest == result.digest
        assert route.reason == "reloaded: the model's file was replaced"
    finally:
        pool.close()


def test_a_hard_linked_blob_changed_through_its_link_is_never_loaded(
    runtime: Runtime, tiny_gguf: Path, context: Context
) -> None:
    result = runtime.models.import_file(tiny_gguf, context, name="m", hard_link=True)
    if result.method != "hardlink":
        pytest.skip("this filesystem reflinks, so nothing is hard-linked")
    runtime.models.ensure_intact(result.digest)  # unchanged: no re-hash
    assert runtime.store.list_audit(action="models.verify") == []
    with tiny_gguf.open("ab") as handle:  # root may write a read-only file
        handle.write(b"appended")
    pool = make_router(runtime)
    try:
        with pytest.raises(ModelNotLoadable, match="changed through its hard link"):
            pool.load("m")
    finally:
        pool.close()
    assert not runtime.cache.has(result.digest)
    assert runtime.models.get("m").state == "quarantined"


def test_a_hard_linked_blob_is_re_hashed_once_when_its_source_is_deleted(
    runtime: Runtime, tiny_gguf: Path, context: Context
) -> None:
    result = runtime.models.import_file(tiny_gguf, context, name="m", hard_link=True)
    if result.method != "hardlink":
        pytest.skip("this filesystem reflinks, so nothing is hard-linked")
    tiny_gguf.unlink()  # the link count (and so the inode's ctime) changes, the content does not
    runtime.models.ensure_intact(result.digest)
    runtime.models.ensure_intact(result.digest)
    assert [e.outcome for e in runtime.store.list_audit(action="models.verify")] == ["ok"]
    assert runtime.cache.has(result.digest)


def test_a_model_loads_on_a_full_disk(small_disk: Path, tiny_gguf: Path, context: Context) -> None:
    runtime = Runtime.open(Settings(data_dir=small_disk / "data"))
    pool = make_router(runtime)
    try:
        runtime.models.import_file(tiny_gguf, context, name="m")
        fill(small_disk)
        assert pool.load("m")[0].info.digest == runtime.models.get("m").artifacts[0].digest
    finally:
        pool.close()
        runtime.close()


def test_removing_a_hard_linked_model_frees_nothing_while_the_source_exists(
    runtime: Runtime, tiny_gguf: Path, context: Context
) -> None:
    result = runtime.models.import_file(tiny_gguf, context, name="m", hard_link=True)
    if result.method != "hardlink":
        pytest.skip("this filesystem reflinks, so nothing is hard-linked")
    assert runtime.models.remove("m", context) == 0
    assert runtime.store.list_audit(action="models.delete")[0].bytes == 0
    assert tiny_gguf.exists()
