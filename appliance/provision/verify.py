"""Checking what a pull fetched: each file against the digest its source publishes (a sha256, or a
hub's git blob id), the whole against the caller's expected digest; and the digests a pull reports.

A repo's digest is the sha256 of its files' sorted digests, one per line. May import: errors,
refs, provision.plan and transfer, store.cache (the staged files it reads).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from appliance.errors import DigestMismatch
from appliance.provision.plan import Plan
from appliance.provision.transfer import RemoteFile
from appliance.refs import ModelRef
from appliance.store.cache import StagedBlob

__all__ = ["git_blob_id", "primary_digest", "repo_digest", "verify"]

logger = logging.getLogger(__name__)


def verify(
    ref: ModelRef,
    plan: Plan,
    fetched: list[tuple[RemoteFile, StagedBlob]],
    expected: str | None,
) -> str:
    """Nothing that fails a digest is kept; content no digest covers is kept and flagged."""
    for remote, staged in fetched:
        if remote.digest is not None and remote.digest != staged.digest:
            raise DigestMismatch(
                f"{remote.filename} of {ref} has digest {staged.digest}; the source says {remote.digest}"
            )
        if remote.digest is None and remote.git_blob is not None:
            actual = git_blob_id(staged.path, staged.size)
            if actual != remote.git_blob:
                raise DigestMismatch(
                    f"{remote.filename} of {ref} has git blob id {actual}, not {remote.git_blob}"
                )
    if expected is not None:
        actual = fetched[0][1].digest if len(fetched) == 1 else repo_digest([s.digest for _, s in fetched])
        if actual != expected:
            raise DigestMismatch(f"{ref} has digest {actual}, but the expected digest is {expected}")
        return "expected"
    if plan.all_have_digests:
        return "source"
    uncovered = [r.filename for r, _ in fetched if r.digest is None and r.git_blob is None]
    logger.info("%s: no digest to verify %s against; recorded as they arrived", ref, ", ".join(uncovered))
    return "unverified"


def git_blob_id(path: Path, size: int) -> str:
    """The id git gives a file's content: sha1 of "blob <size>\\0" and the bytes (hub files outside LFS)."""
    digest = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def repo_digest(digests: list[str]) -> str:
    """A repo's digest: the sha256 of its files' digests, sorted, one per line."""
    return "sha256:" + hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def primary_digest(files: list[tuple[str, str]]) -> str:
    """Of (digest, format) pairs, the digest an engine loads: the first GGUF, else the first
    safetensors, else the first file."""
    for wanted in ("gguf", "safetensors"):
        for digest, fmt in files:
            if fmt == wanted:
                return digest
    return files[0][0]
