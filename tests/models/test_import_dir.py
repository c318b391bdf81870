"""``models import-dir``: an Ollama models dir and a Hugging Face cache, made here with the tiny model,
imported in place (hard links on one filesystem), every digest checked, safe to run again."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.di import Provide
from litestar.testing import TestClient

from appliance.audit import Context
from appliance.errors import SourceNotFound, SourceUnreadable
from appliance.models.importdir import DirImporter
from appliance.runtime import Runtime
from appliance.web.errors import PROBLEM_HANDLERS
from appliance.web.importdir import import_dir
from tests.conftest import CliResult, Server, import_file
from tests.models.dirlayouts import (
    COMMIT_GGUF,
    COMMIT_ST,
    fake_safetensors,
    flip_byte,
    hub_blob,
    ollama_blob,
    write_hub_repo,
    write_ollama_dir,
)
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf

README = b"# tiny\nA model card: a small file, outside LFS.\n"
CONFIG = b'{"architectures": ["LlamaForCausalLM"]}\n'


@dataclass
class Layouts:
    ollama: Path
    hub: Path
    library: bytes  # the GGUF of registry.ollama.ai/library/tiny/1b
    user: bytes  # the GGUF of registry.ollama.ai/someone/tiny-chat/q4
    hub_gguf: bytes
    safetensors: bytes


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("ggufs")
    return [
        write_llama_gguf(folder / f"{seed}.gguf", seed=seed, chat_template=TINY_CHAT_TEMPLATE).read_bytes()
        for seed in (1, 2, 3)
    ]


@pytest.fixture
def layouts(tmp_path: Path, ggufs: list[bytes]) -> Layouts:
    """Both layouts on the data dir's filesystem (tmp_path), so their blobs can be hard-linked."""
    library, user, hub_gguf = ggufs
    ollama = write_ollama_dir(
        tmp_path / "ollama" / "models",
        {
            ("registry.ollama.ai", "library", "tiny", "1b"): library,
            ("registry.ollama.ai", "someone", "tiny-chat", "q4"): user,
        },
    )
    hub = tmp_path / "hf" / "hub"
    safetensors = fake_safetensors()
    write_hub_repo(
        hub, "org/tiny-GGUF", COMMIT_GGUF, {"tiny-Q8_0.gguf": (hub_gguf, True), "README.md": (README, False)}
    )
    write_hub_repo(
        hub,
        "org/tiny-st",
        COMMIT_ST,
        {
            "model.safetensors": (safetensors, True),
            "config.json": (CONFIG, False),
        },
    )
    return Layouts(ollama, hub, library, user, hub_gguf, safetensors)


def run_json(cli: object, *args: str, expect: int = 0) -> dict[str, Any]:
    result: CliResult = cli("models", "import-dir", *args, "--json")  # type: ignore[operator]
    assert result.returncode == expect, result.stderr + result.stdout
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {model["name"]: model for model in report["models"]}


def listed(cli: object) -> dict[str, dict[str, Any]]:
    result: CliResult = cli("models", "ls", "--json")  # type: ignore[operator]
    return {model["name"]: model for model in json.loads(result.stdout)}


def blob_in_cache(data_dir: Path, digest: str) -> Path:
    return data_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")


def test_an_ollama_dir_keeps_names_and_tags_links_blobs_and_says_what_it_left(
    cli: object, layouts: Layouts, data_dir: Path
) -> None:
    report = run_json(cli, str(layouts.ollama))
    assert report["layout"] == "ollama"
    models = by_name(report)
    assert set(models) == {"tiny:1b", "someone/tiny-chat:q4"}
    for name, gguf in (("tiny:1b", layouts.library), ("someone/tiny-chat:q4", layouts.user)):
        model = models[name]
        assert model["status"] == "added"
        (file,) = model["files"]
        assert file["method"] == "hardlink"  # ext4: no reflink, and the blob is the user's own
        source = ollama_blob(layouts.ollama, gguf)
        assert blob_in_cache(data_dir, file["digest"]).stat().st_ino == source.stat().st_ino
        left = "\n".join(model["not_imported"])
        assert "template layer" in left
        assert "the GGUF's own chat template" in left
        assert "params layer" in left
    shown = listed(cli)
    assert shown["tiny:1b"]["artifacts"][0]["source_uri"] == "oci://registry.ollama.ai/library/tiny:1b"
    assert shown["someone/tiny-chat:q4"]["artifacts"][0]["filename"] == "tiny-chat.gguf"


def test_a_hub_cache_is_named_and_grouped_as_hf_pulls_are(
    cli: object, layouts: Layouts, data_dir: Path
) -> None:
    report = run_json(cli, str(layouts.hub))
    assert report["layout"] == "huggingface"
    models = by_name(report)
    assert set(models) == {"tiny-q8_0:latest", "tiny-st:latest"}
    gguf = models["tiny-q8_0:latest"]
    assert [file["filename"] for file in gguf["files"]] == ["tiny-Q8_0.gguf"]
    assert gguf["files"][0]["source_uri"] == f"hf:org/tiny-GGUF/tiny-Q8_0.gguf@{COMMIT_GGUF}"
    assert any(text.startswith("README.md: not a GGUF") for text in gguf["not_imported"])
    repo = models["tiny-st:latest"]
    assert {file["filename"]: file["source_uri"] for file in repo["files"]} == {
        name: f"hf:org/tiny-st@{COMMIT_ST}#{name}" for name in ("config.json", "model.safetensors")
    }
    for file in [*gguf["files"], *repo["files"]]:
        assert file["method"] == "hardlink"
        assert blob_in_cache(data_dir, file["digest"]).stat().st_ino == Path(file["source"]).stat().st_ino
    shown = listed(cli)
    assert sorted(shown["tiny-st:latest"]["formats"]) == ["file", "safetensors"]


def test_one_repo_dir_alone_is_read_too(cli: object, layouts: Layouts) -> None:
    report = run_json(cli, str(layouts.hub / "models--org--tiny-st"))
    assert [model["name"] for model in report["models"]] == ["tiny-st:latest"]


@pytest.mark.parametrize(
    ("where", "refused", "kept"),
    [
        ("ollama", "tiny:1b", "someone/tiny-chat:q4"),
        ("lfs", "tiny-st:latest", "tiny-q8_0:latest"),
        ("git-blob", "tiny-st:latest", "tiny-q8_0:latest"),
    ],
)
def test_a_flipped_byte_refuses_that_model_names_the_file_and_the_others_go_on(
    cli: object, layouts: Layouts, where: str, refused: str, kept: str
) -> None:
    if where == "ollama":
        damaged, path, filename = ollama_blob(layouts.ollama, layouts.library), layouts.ollama, "tiny.gguf"
    else:
        filename = "model.safetensors" if where == "lfs" else "config.json"
        damaged, path = hub_blob(layouts.hub, "org/tiny-st", filename), layouts.hub
    flip_byte(damaged)
    report = run_json(cli, str(path), expect=1)
    models = by_name(report)
    assert models[refused]["status"] == "failed"
    assert filename in models[refused]["error"]
    assert "nothing of this model was registered" in models[refused]["hint"]
    assert models[kept]["status"] == "added"
    shown = listed(cli)
    assert refused not in shown
    assert kept in shown
    text: CliResult = cli("models", "import-dir", str(path))  # type: ignore[operator]
    assert text.returncode == 1
    assert f"1 of {len(models)} failed: {refused}" in text.stderr


def test_a_second_run_reports_present_and_duplicates_nothing(
    cli: object, layouts: Layouts, data_dir: Path
) -> None:
    for path in (layouts.ollama, layouts.hub):
        assert {m["status"] for m in run_json(cli, str(path))["models"]} == {"added"}
    before = listed(cli)
    blobs = sorted(os.listdir(data_dir / "blobs" / "sha256"))
    for path in (layouts.ollama, layouts.hub):
        assert {m["status"] for m in run_json(cli, str(path))["models"]} == {"present"}
    assert listed(cli) == before
    assert sorted(os.listdir(data_dir / "blobs" / "sha256")) == blobs


def test_a_name_taken_by_other_content_is_refused_and_kept(
    cli: object, layouts: Layouts, tiny_gguf: Path, data_dir: Path
) -> None:
    import_file(data_dir, tiny_gguf, "tiny:1b")
    digest = listed(cli)["tiny:1b"]["artifacts"][0]["digest"]
    models = by_name(run_json(cli, str(layouts.ollama), expect=1))
    assert models["tiny:1b"]["status"] == "failed"
    assert "already has" in models["tiny:1b"]["error"]
    assert "nothing was overwritten" in models["tiny:1b"]["hint"]
    assert models["someone/tiny-chat:q4"]["status"] == "added"
    assert [a["digest"] for a in listed(cli)["tiny:1b"]["artifacts"]] == [digest]


def test_copy_makes_a_separate_file(cli: object, layouts: Layouts, data_dir: Path) -> None:
    model = by_name(run_json(cli, str(layouts.ollama), "--copy"))["tiny:1b"]
    (file,) = model["files"]
    assert file["method"] == "copy"
    source = ollama_blob(layouts.ollama, layouts.library)
    assert blob_in_cache(data_dir, file["digest"]).stat().st_ino != source.stat().st_ino
    assert source.stat().st_mode & 0o200  # the user's file is left as it was: still writable


def test_a_dry_run_reports_and_changes_nothing(cli: object, layouts: Layouts) -> None:
    report = run_json(cli, str(layouts.ollama), "--dry-run")
    assert {m["status"] for m in report["models"]} == {"would_add"}
    assert listed(cli) == {}


def test_a_path_that_is_neither_layout_says_what_was_expected(cli: object, tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    result: CliResult = cli("models", "import-dir", str(tmp_path / "plain"))  # type: ignore[operator]
    assert result.returncode == 1
    assert (
        "neither an Ollama models directory (with manifests/ and blobs/) nor a Hugging Face cache"
        in result.stderr
    )
    assert "hint: pass Ollama's models dir" in result.stderr
    missing: CliResult = cli("models", "import-dir", str(tmp_path / "nope"))  # type: ignore[operator]
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr


def test_a_name_ollama_allows_but_the_appliance_cannot_hold_is_refused(cli: object, tmp_path: Path) -> None:
    # a registry with a port: ":" cannot be part of an appliance name
    write_ollama_dir(tmp_path / "models", {("localhost:5000", "me", "tiny", "latest"): b"GGUF"})
    model = run_json(cli, str(tmp_path / "models"), expect=1)["models"][0]
    assert model["status"] == "failed"
    assert "localhost:5000/me/tiny:latest has no appliance name" in model["error"]


def test_a_missing_blob_and_an_unpinned_snapshot_are_refused(cli: object, layouts: Layouts) -> None:
    ollama_blob(layouts.ollama, layouts.user).unlink()
    models = by_name(run_json(cli, str(layouts.ollama), expect=1))
    assert "does not exist" in models["someone/tiny-chat:q4"]["error"]
    assert models["tiny:1b"]["status"] == "added"
    repo = layouts.hub / "models--org--tiny-st"
    (repo / "refs" / "main").unlink()
    (repo / "snapshots" / ("c" * 40)).mkdir()
    models = by_name(run_json(cli, str(layouts.hub), expect=1))
    assert "no refs/main and 2 snapshots" in models["tiny-st:latest"]["error"]


def test_the_api_imports_and_the_gguf_serves_a_chat_completion(server: Server, layouts: Layouts) -> None:
    answer = server.client.post("/api/v1/models/import-dir", json={"path": str(layouts.ollama)})
    assert answer.status_code == 200, answer.text
    assert {m["name"]: m["status"] for m in answer.json()["models"]} == {
        "tiny:1b": "added",
        "someone/tiny-chat:q4": "added",
    }
    chat = server.client.post(
        "/v1/chat/completions",
        json={"model": "tiny:1b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] > 0
    refused = server.client.post("/api/v1/models/import-dir", json={"path": str(layouts.hub.parent)})
    assert refused.status_code == 404
    assert refused.json()["code"] == "source_not_found"


# Litestar 2.x warns of every dependency taken by name, as all the app's handlers take theirs.
@pytest.mark.filterwarnings("ignore::litestar.exceptions.LitestarDeprecationWarning")
def test_the_api_refuses_a_caller_that_is_not_on_the_machine(runtime: Runtime, layouts: Layouts) -> None:
    # the real handler and error map in-process: TestClient's requests come from "testclient", not loopback
    app = Litestar(
        route_handlers=[import_dir],
        dependencies={
            "models": Provide(lambda: runtime.models, sync_to_thread=False),
            "context": Provide(lambda: Context(actor="test"), sync_to_thread=False),
        },
        exception_handlers=PROBLEM_HANDLERS,
    )
    with TestClient(app) as client:
        answer = client.post("/api/v1/models/import-dir", json={"path": str(layouts.ollama), "copy": True})
    assert answer.status_code == 403
    assert "only by a caller on it" in answer.json()["detail"]
    assert runtime.models.list_models() == []


def _damage(layouts: Layouts, how: str) -> tuple[Path, str]:
    """Break one model of a layout the way real stores break; returns the path to import and the
    name of the model that must fail."""
    st_repo = layouts.hub / "models--org--tiny-st"
    snapshot = st_repo / "snapshots" / COMMIT_ST
    manifest = layouts.ollama / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "1b"
    if how == "plain file in snapshot":
        target = snapshot / "config.json"
        data = target.read_bytes()
        target.unlink()
        target.write_bytes(data)
    elif how == "link outside blobs":
        outside = layouts.hub / "elsewhere.json"
        outside.write_bytes(CONFIG)
        (snapshot / "config.json").unlink()
        (snapshot / "config.json").symlink_to(outside)
    elif how == "blob not named by a digest":
        blob = hub_blob(layouts.hub, "org/tiny-st", "config.json")
        blob.rename(blob.with_name("config"))
        (snapshot / "config.json").unlink()
        (snapshot / "config.json").symlink_to("../../blobs/config")
    elif how == "refs/main names no snapshot":
        (st_repo / "refs" / "main").write_text("c" * 40)
    elif how == "no model file":
        (snapshot / "model.safetensors").unlink()
    elif how == "damaged manifest":
        manifest.write_text("{not json")
    elif how == "two model layers":
        body = json.loads(manifest.read_text())
        body["layers"].append(dict(body["layers"][0]))
        manifest.write_text(json.dumps(body))
    if how in OLLAMA_DAMAGE:
        return layouts.ollama, "tiny:1b"
    return layouts.hub, "tiny-st:latest"


OLLAMA_DAMAGE = ("damaged manifest", "two model layers")


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("plain file in snapshot", "config.json is a plain file, not a link into the cache's blobs/"),
        ("link outside blobs", "config.json links outside the repo's blobs/"),
        ("blob not named by a digest", "whose name is neither a sha256 nor a git blob id"),
        ("refs/main names no snapshot", f"names commit '{'c' * 40}', which has no snapshot"),
        ("no model file", "holds no GGUF and no safetensors file"),
        ("damaged manifest", "is not an Ollama image manifest"),
        ("two model layers", "has 2 model layers; a model holds one GGUF"),
    ],
)
def test_a_broken_layout_fails_that_model_only_saying_what_is_wrong(
    runtime: Runtime, context: Context, layouts: Layouts, how: str, said: str
) -> None:
    path, broken = _damage(layouts, how)
    report = DirImporter(runtime.models).import_dir(path, context)
    statuses = {model.name: model.status for model in report.models}
    assert statuses.pop(broken) == "failed"
    assert set(statuses.values()) == {"added"}
    (failed,) = report.failed
    assert failed.error is not None
    assert said in failed.error
    assert broken not in {str(model.name) for model in runtime.models.list_models()}


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_blob_of_another_user_is_copied_and_the_report_says_why(
    runtime: Runtime, context: Context, layouts: Layouts
) -> None:
    blob = ollama_blob(layouts.ollama, layouts.library)
    os.chown(blob, 65534, 65534)
    model = {m.name: m for m in DirImporter(runtime.models).import_dir(layouts.ollama, context).models}[
        "tiny:1b"
    ]
    assert model.status == "added"
    assert model.files[0].method == "copy"
    assert "belongs to uid 65534" in model.notes[0]


def test_a_file_or_a_nul_byte_is_not_a_directory_to_import(
    runtime: Runtime, context: Context, tiny_gguf: Path
) -> None:
    with pytest.raises(SourceNotFound, match="is not a directory"):
        DirImporter(runtime.models).import_dir(tiny_gguf, context)
    with pytest.raises(SourceUnreadable, match="contains a NUL byte"):
        DirImporter(runtime.models).import_dir(Path("/tmp/a\0b"), context)
