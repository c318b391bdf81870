"""What ``appliance bundle`` says when it cannot: each error names the problem and what to do,
and changes nothing."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

from appliance.audit import Context
from appliance.runtime import Runtime
from appliance.settings import Settings
from tests.bundles.conftest import Appliance
from tests.conftest import APPLIANCE
from tests.tiny_model import write_llama_gguf


def test_a_missing_model_name_is_refused_before_anything_is_written(source_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.tar"
    refused = Appliance(source_dir)("bundle", "export", "tiny", "ghost", "-o", str(target))
    assert refused.returncode == 1
    assert "error: model ghost:latest not found" in refused.stderr
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no partial tar either


def test_an_export_into_a_non_empty_directory_is_refused(source_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    refused = Appliance(source_dir)("bundle", "export", "tiny", "-o", str(tmp_path))
    assert refused.returncode == 1
    assert f"error: {tmp_path} is not empty" in refused.stderr
    assert "hint: export into a new directory, or to a path ending in .tar" in refused.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["keep.txt"]


def test_a_tar_path_that_is_a_directory_or_a_terminal_is_refused(source_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "models.tar").mkdir()
    refused = Appliance(source_dir)("bundle", "export", "tiny", "-o", str(tmp_path / "models.tar"))
    assert refused.returncode == 1
    assert f"error: {tmp_path / 'models.tar'} is a directory" in refused.stderr
    assert "hint: name the tar file to write" in refused.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["models.tar"]

    controller, terminal = pty.openpty()  # stdout a terminal: a tar would only garble it
    try:
        completed = subprocess.run(
            [*APPLIANCE, "--data-dir", str(source_dir), "bundle", "export", "tiny", "-o", "-"],
            stdout=terminal,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert completed.returncode == 2
    assert "refusing to write a tar to a terminal; redirect stdout or pass -o PATH" in completed.stderr


def test_an_empty_appliance_has_nothing_to_export(target: Appliance, tmp_path: Path) -> None:
    refused = target("bundle", "export", "-o", str(tmp_path / "x.tar"))
    assert refused.returncode == 1
    assert "error: there are no models to export" in refused.stderr


def test_paths_that_are_not_bundles_are_refused(target: Appliance, tmp_path: Path) -> None:
    missing = target("bundle", "import", str(tmp_path / "nothere.tar"))
    assert missing.returncode == 1
    assert f"error: {tmp_path / 'nothere.tar'} does not exist" in missing.stderr

    (tmp_path / "file.txt").write_text("a file, not a directory")
    unreadable = target("bundle", "import", str(tmp_path / "file.txt" / "models.tar"))
    assert unreadable.returncode == 1
    assert (
        f"error: {tmp_path / 'file.txt' / 'models.tar'} cannot be read: Not a directory" in unreadable.stderr
    )

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "index.json").write_text("{}")
    no_layout = target("bundle", "import", str(plain))
    assert no_layout.returncode == 1
    assert f"error: {plain} has no oci-layout file: it is not an OCI image layout" in no_layout.stderr
    assert "hint: pass a directory or .tar written by `appliance bundle export`" in no_layout.stderr

    model = write_llama_gguf(tmp_path / "model.gguf")
    not_tar = target("bundle", "import", str(model))
    assert not_tar.returncode == 1
    assert f"error: {model} is neither a directory nor a tar of one" in not_tar.stderr
    assert target.models() == {}


def test_a_name_held_here_with_other_content_is_refused_and_nothing_is_registered(
    bundle_tar: Path, target: Appliance, tmp_path: Path
) -> None:
    other = write_llama_gguf(tmp_path / "other.gguf", seed=7)
    runtime = Runtime.open(Settings(data_dir=target.data_dir))
    try:
        runtime.models.import_file(other, Context(actor="test:user"), name="tiny")
    finally:
        runtime.close()
    before = target.models()
    refused = target("bundle", "import", str(bundle_tar))
    assert refused.returncode == 1
    assert "error: model tiny:latest already has a gguf file" in refused.stderr
    assert "the bundle's tiny:latest has other content" in refused.stderr
    assert "hint: remove the model here first (`appliance models rm NAME`)" in refused.stderr
    assert target.models() == before  # the bundle's other two models were not registered either
    audit = json.loads(target("audit", "ls", "--action", "bundles.import", "--json").stdout)
    assert [(row["outcome"], row["target"]) for row in audit] == [("error", str(bundle_tar))]


def test_a_model_whose_file_left_the_cache_is_not_exported(
    bundle_tar: Path, target: Appliance, tmp_path: Path
) -> None:
    assert target("bundle", "import", str(bundle_tar)).returncode == 0
    digest = target.models()["tiny:latest"][0]
    (target.data_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")).unlink()
    refused = target("bundle", "export", "tiny", "-o", str(tmp_path / "out.tar"))
    assert refused.returncode == 1
    assert "error: the file 0.gguf of tiny:latest is not in the cache (missing): it cannot be exported" in (
        refused.stderr
    )
    assert "hint: run `appliance models verify`" in refused.stderr
    assert not (tmp_path / "out.tar").exists()
