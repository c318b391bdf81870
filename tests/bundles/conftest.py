"""A source data dir with three models, and the real ``appliance`` command against any data dir."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.names import ModelName
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.store.base import NewArtifact
from tests.conftest import APPLIANCE, CliResult
from tests.provision.test_oci import registry  # noqa: F401 (a fixture the registry test uses)
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf
from tests.web.browsing import browser, page  # noqa: F401 (fixtures the UI test uses)

# Two loadable GGUFs (a 4096-token vocabulary: 2 MB) past the importer's in-memory size, so they
# stream into the cache (and resume);
# one safetensors model of several files, as a hub repo pull makes it.
GGUF_MODELS = {"tiny:latest": 0, "library/tiny:q2_k": 1}
REPO_MODEL = "acme/encoder:v1"


def safetensors_file(values: int = 16) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [values], "data_offsets": [0, 4 * values]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(4 * values)


REPO_FILES = {
    "model.safetensors": safetensors_file(),
    "config.json": b'{"architectures": ["Encoder"], "hidden_size": 16}',
    "tokenizer.json": b'{"version": "1.0"}',
}


@dataclass
class Appliance:
    """The real command against one data dir."""

    data_dir: Path

    def __call__(self, *args: str, stdin: bytes | None = None, timeout: float = 120) -> CliResult:
        completed = subprocess.run(
            [*APPLIANCE, "--data-dir", str(self.data_dir), *args],
            input=stdin,
            capture_output=True,
            timeout=timeout,
            env=dict(os.environ),
            check=False,
        )
        return CliResult(
            completed.returncode, completed.stdout.decode(errors="replace"), completed.stderr.decode()
        )

    def models(self) -> dict[str, list[str]]:
        """Model name → its artifact digests, sorted, as `models ls --json` says."""
        listed = self("models", "ls", "--json")
        assert listed.returncode == 0, listed.stderr
        return {
            model["name"]: sorted(artifact["digest"] for artifact in model["artifacts"])
            for model in json.loads(listed.stdout)
        }


def add_repo_model(runtime: Runtime, name: str, files: dict[str, bytes]) -> None:
    artifacts = []
    for filename, content in files.items():
        digest = f"sha256:{hashlib.sha256(content).hexdigest()}"
        with runtime.models.receive_blob() as incoming:
            incoming.write(content)
            incoming.finish(digest)
        fmt = "safetensors" if filename.endswith(".safetensors") else "file"
        artifacts.append(NewArtifact(filename, fmt, digest, len(content), f"hf:acme/encoder#{filename}"))
    runtime.models.register_artifacts(
        ModelName.parse(name), artifacts, context=Context(actor="test:user"), source="test"
    )


@pytest.fixture(scope="session")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the three models (made once; tests read it, never change it)."""
    root = tmp_path_factory.mktemp("bundle-source")
    data = root / "data"
    runtime = Runtime.open(Settings(data_dir=data))
    try:
        for name, seed in GGUF_MODELS.items():
            path = write_llama_gguf(
                root / f"{seed}.gguf", seed=seed, chat_template=TINY_CHAT_TEMPLATE, vocab_size=4096
            )
            runtime.models.import_file(path, Context(actor="test:user"), name=name, allow_link=False)
        add_repo_model(runtime, REPO_MODEL, REPO_FILES)
    finally:
        runtime.close()
    return data


@pytest.fixture(scope="session")
def source_models(source_dir: Path) -> dict[str, list[str]]:
    return Appliance(source_dir).models()


@pytest.fixture(scope="session")
def bundle_tar(source_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All three models exported as a tar by the real command."""
    target = tmp_path_factory.mktemp("bundle") / "models.tar"
    exported = Appliance(source_dir)("bundle", "export", "-o", str(target))
    assert exported.returncode == 0, exported.stderr
    return target


@pytest.fixture
def target(tmp_path: Path) -> Appliance:
    """A fresh, empty data dir to import into."""
    return Appliance(tmp_path / "target")


def member_offsets(tar_path: Path) -> dict[str, tuple[int, int]]:
    """Entry name → (offset of its content in the tar, size)."""
    with tarfile.open(tar_path) as tar:
        return {member.name: (member.offset_data, member.size) for member in tar.getmembers()}
