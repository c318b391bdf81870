"""Real on-disk layouts of other tools, written the way they write them: an Ollama models dir and a
Hugging Face hub cache (snapshot files as relative links into the repo's blobs/)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

OLLAMA = "application/vnd.ollama.image"
COMMIT_GGUF = "a" * 40
COMMIT_ST = "b" * 40


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's own id


def write_ollama_dir(root: Path, models: dict[tuple[str, str, str, str], bytes]) -> Path:
    """``models``: (registry, namespace, model, tag) → the GGUF's bytes; each manifest also gets a
    template and a params layer, as `ollama pull` writes them."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict[str, object]:
        hex_digest = _sha256(data)
        (blobs / f"sha256-{hex_digest}").write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{hex_digest}", "size": len(data)}

    for (registry, namespace, model, tag), gguf in models.items():
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": blob(b'{"model_format":"gguf"}', "application/vnd.docker.container.image.v1+json"),
            "layers": [
                blob(gguf, f"{OLLAMA}.model"),
                blob(f"{{{{ .Prompt }}}} {model}".encode(), f"{OLLAMA}.template"),
                blob(b'{"stop":["</s>"]}', f"{OLLAMA}.params"),
            ],
        }
        path = root / "manifests" / registry / namespace / model / tag
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest))
    return root


def ollama_blob(root: Path, data: bytes) -> Path:
    return root / "blobs" / f"sha256-{_sha256(data)}"


def write_hub_repo(hub: Path, repo: str, commit: str, files: dict[str, tuple[bytes, bool]]) -> Path:
    """One ``models--org--repo`` dir; ``files``: name → (bytes, stored in LFS). An LFS blob is named
    by its sha256, any other by its git blob id, as huggingface_hub names them."""
    repo_dir = hub / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    for name, (data, lfs) in files.items():
        blob_id = _sha256(data) if lfs else git_blob(data)
        (repo_dir / "blobs" / blob_id).write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(repo_dir / "blobs" / blob_id, link.parent), link)
    return repo_dir


def hub_blob(hub: Path, repo: str, name: str) -> Path:
    repo_dir = hub / f"models--{repo.replace('/', '--')}"
    commit = (repo_dir / "refs" / "main").read_text()
    return (repo_dir / "snapshots" / commit / name).resolve()


def fake_safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(16)


def flip_byte(path: Path, offset: int = -1) -> None:
    """Change one byte in place (the blob keeps its name, as a disk error would leave it)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
