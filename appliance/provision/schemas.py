"""The JSON shapes of pulls and downloads, shared by the API and the CLI's ``--json``."""

from __future__ import annotations

from pydantic import BaseModel, Field

from appliance.provision.service import ResolvedModel
from appliance.store.base import Download

__all__ = ["DownloadOut", "PullIn", "PullOut"]


class PullIn(BaseModel):
    ref: str = Field(description="A ModelRef: https://…, hf:…, s3://…, oci://…, a path or sha256:…")
    name: str | None = Field(
        default=None, description="name[:tag] to register it under (default: from the file)"
    )
    digest: str | None = Field(default=None, description="sha256:HEX the content must have")
    strict: bool = Field(
        default=False, description="Fail when no digest (given or from the source) covers it"
    )


class PullOut(BaseModel):
    """A model made present: registered, its blob verified and in the cache."""

    name: str
    digest: str
    path: str
    format: str
    size_bytes: int
    ref: str
    downloaded: bool = Field(description="False when it was already present and no network was used")
    verification: str = Field(description="expected, source, unverified or present")
    download_id: str | None

    @classmethod
    def of(cls, resolved: ResolvedModel) -> PullOut:
        return cls(
            name=resolved.id,
            digest=resolved.digest,
            path=str(resolved.path),
            format=resolved.format,
            size_bytes=resolved.size,
            ref=resolved.ref,
            downloaded=resolved.downloaded,
            verification=resolved.verification,
            download_id=resolved.download_id,
        )


class DownloadOut(BaseModel):
    id: str
    ref: str
    state: str = Field(
        description="pending (awaits approval), approved, queued (awaits a slot), running, done, failed,"
        " denied, cancelled, or interrupted (its process ended before it did; pull again to resume)"
    )
    model_name: str | None
    expected_digest: str | None
    digest: str | None
    bytes_done: int
    bytes_total: int | None
    rate_bytes_per_s: int
    error: str | None
    error_code: str | None = Field(description="the error's stable code, when it failed")
    note: str | None = Field(description="how it runs, e.g. why it started over instead of resuming")
    requested_by: str
    decided_by: str | None
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, download: Download) -> DownloadOut:
        return cls(**download.__dict__)
