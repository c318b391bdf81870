"""The files a successful pull leaves for other programs (the provisioner spec's handoff):

    <data>/runtime/engines/llamacpp.json         the model an engine should load: replaced atomically
    <data>/runtime/provenance/models.jsonl       one line per pull: where it came from, how it was checked

May import: store.base (for the time stamp); the ResolvedModel it writes comes from provision.service.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.store.base import utcnow

if TYPE_CHECKING:
    from appliance.provision.service import ResolvedModel

__all__ = ["append_provenance", "write_handoff"]


def write_handoff(runtime_dir: Path, resolved: ResolvedModel, *, ctx_max: Any) -> None:
    """The engine handoff: written to a unique name, then renamed, so a reader never sees half of it."""
    engines = runtime_dir / "engines"
    engines.mkdir(parents=True, exist_ok=True)
    handoff = {
        "model": {
            "id": resolved.ref,
            "name": resolved.id,
            "path": str(resolved.path),
            "digest": resolved.digest,
        },
        "metadata": {"size_bytes": resolved.size, "ctx_max": ctx_max},
    }
    staging = engines / f"llamacpp.json.{uuid.uuid4().hex}"
    staging.write_text(json.dumps(handoff, indent=2) + "\n")
    os.replace(staging, engines / "llamacpp.json")


def append_provenance(runtime_dir: Path, resolved: ResolvedModel) -> None:
    provenance = runtime_dir / "provenance"
    provenance.mkdir(parents=True, exist_ok=True)
    line = {
        "at": utcnow(),
        "model_id": resolved.ref,
        "name": resolved.id,
        "digest": resolved.digest,
        "path": str(resolved.path),
        "verification": resolved.verification,
        "download_id": resolved.download_id,
    }
    with open(provenance / "models.jsonl", "a") as log:
        log.write(json.dumps(line) + "\n")
