"""A bundle is an OCI image layout: skopeo copies it into a registry, and ``oci://`` pulls it back."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from appliance.audit import Context
from tests.bundles.conftest import REPO_MODEL, Appliance
from tests.provision.test_oci import open_runtime


def test_skopeo_copies_the_layout_to_a_registry_and_a_pull_reads_it_back_whole(
    registry: str, source_dir: Path, source_models: dict[str, list[str]], tmp_path: Path
) -> None:
    skopeo = shutil.which("skopeo")
    assert skopeo is not None, "skopeo is installed by .ci/run (Debian's skopeo package)"
    layout = tmp_path / "layout"
    assert Appliance(source_dir)("bundle", "export", "-o", str(layout)).returncode == 0
    for ref, repository in (("acme/encoder-v1", "models/encoder:v1"), ("tiny-latest", "models/tiny:v1")):
        copied = subprocess.run(
            [
                skopeo,
                "copy",
                "--dest-tls-verify=false",
                f"oci:{layout}:{ref}",
                f"docker://{registry}/{repository}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert copied.returncode == 0, copied.stderr

    runtime = open_runtime(tmp_path / "puller", registry)
    try:
        context = Context(actor="test:user")
        encoder = runtime.provisioner.ensure_present(f"oci://{registry}/models/encoder:v1", context)
        tiny = runtime.provisioner.ensure_present(f"oci://{registry}/models/tiny:v1", context)
        pulled = {
            str(model.name): sorted(artifact.digest for artifact in model.artifacts)
            for model in runtime.models.list_models()
        }
        filenames = sorted(artifact.filename for artifact in runtime.models.get(REPO_MODEL).artifacts)
    finally:
        runtime.close()
    assert (encoder.id, tiny.id) == (REPO_MODEL, "tiny:latest")  # the names the bundle carries
    assert pulled == {name: source_models[name] for name in (REPO_MODEL, "tiny:latest")}
    assert filenames == ["config.json", "model.safetensors", "tokenizer.json"]
