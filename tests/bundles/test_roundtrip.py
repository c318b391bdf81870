"""Bundles carry models between data dirs: export, import (offline), serve, chat; re-runs are no-ops."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.bundles.conftest import REPO_MODEL, Appliance

ROOT = Path(__file__).parent.parent.parent


def test_three_models_exported_import_with_no_network_and_serve_a_chat(
    bundle_tar: Path, source_models: dict[str, list[str]], tmp_path: Path
) -> None:
    assert len(source_models) == 3
    data_dir = tmp_path / "offline"
    completed = subprocess.run(
        [
            "unshare",
            "-n",
            sys.executable,
            "-m",
            "tests.bundles.offline_serve",
            str(data_dir),
            str(bundle_tar),
            "tiny",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    assert "import_error" not in outcome, outcome
    assert outcome["interfaces"] == ["lo"]  # no network but loopback
    assert sorted(found["model"]["name"] for found in outcome["imported"]["models"]) == sorted(source_models)
    assert all(found["added"] for found in outcome["imported"]["models"])
    assert outcome["status"] == 200
    assert outcome["chat"]["usage"]["completion_tokens"] > 0
    assert Appliance(data_dir).models() == source_models  # same names, same digests


def test_the_tar_is_an_oci_layout_with_index_last_and_our_names(bundle_tar: Path) -> None:
    with tarfile.open(bundle_tar) as tar:
        names = [member.name for member in tar.getmembers() if member.isfile()]
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        layout = json.loads(tar.extractfile("oci-layout").read())  # type: ignore[union-attr]
    assert names[0] == "oci-layout"
    assert names[-1] == "index.json"
    assert layout == {"imageLayoutVersion": "1.0.0"}
    refs = {entry["annotations"]["org.opencontainers.image.ref.name"] for entry in index["manifests"]}
    assert refs == {"tiny-latest", "library/tiny-q2-k", "acme/encoder-v1"}
    exact = {entry["annotations"]["io.appliance.model.name"] for entry in index["manifests"]}
    assert exact == {"tiny:latest", "library/tiny:q2_k", REPO_MODEL}


def test_a_directory_bundle_imports_and_a_second_import_changes_nothing(
    source_dir: Path, source_models: dict[str, list[str]], target: Appliance, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    exported = Appliance(source_dir)("bundle", "export", "tiny", REPO_MODEL, "-o", str(layout), "--json")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["models"] == ["tiny:latest", REPO_MODEL]
    assert (layout / "index.json").is_file()
    assert not [path for path in layout.iterdir() if path.name.startswith(".")]  # no staging left

    first = target("bundle", "import", str(layout), "--json")
    assert first.returncode == 0, first.stderr
    assert target.models() == {name: source_models[name] for name in ("tiny:latest", REPO_MODEL)}
    again = target("bundle", "import", str(layout))
    assert again.returncode == 0, again.stderr
    assert "already present: tiny:latest" in again.stdout
    assert f"already present: {REPO_MODEL}" in again.stdout
    assert "0 blobs received" in again.stdout
    assert "4 skipped: already in the cache" in again.stdout  # the GGUF and the three repo files


def test_export_to_stdout_and_import_from_stdin(
    source_dir: Path, source_models: dict[str, list[str]], target: Appliance
) -> None:
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "--data-dir",
            str(source_dir),
            "bundle",
            "export",
            "library/tiny:q2_k",
            "-o",
            "-",
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert exported.returncode == 0, exported.stderr
    imported = target("bundle", "import", "-", stdin=exported.stdout)
    assert imported.returncode == 0, imported.stderr
    assert target.models() == {"library/tiny:q2_k": source_models["library/tiny:q2_k"]}
    audit = target("audit", "ls", "--action", "bundles.import", "--json")
    assert [row["outcome"] for row in json.loads(audit.stdout)] == ["ok"]
