"""The JSON shapes of models, shared by the API and the CLI's ``--json``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from appliance.models.service import GcReport, ImportResult, VerifyResult
from appliance.store.base import Model

__all__ = ["ArtifactOut", "GcOut", "ImportIn", "ImportOut", "ModelOut", "VerifyOut"]


class ArtifactOut(BaseModel):
    filename: str
    format: str
    digest: str
    size_bytes: int
    source_uri: str | None
    state: str
    created_at: str


class ModelOut(BaseModel):
    name: str = Field(description="name:tag, the id every API and the CLI take")
    size_bytes: int
    formats: list[str]
    state: str = Field(description="ok, or quarantined when an artifact failed verification")
    pinned: bool
    capabilities: dict[str, Any]
    created_at: str
    updated_at: str
    last_used_at: str
    artifacts: list[ArtifactOut]

    @classmethod
    def of(cls, model: Model) -> ModelOut:
        return cls(
            name=str(model.name),
            size_bytes=model.size_bytes,
            formats=model.formats,
            state=model.state,
            pinned=model.pinned,
            capabilities=model.capabilities,
            created_at=model.created_at,
            updated_at=model.updated_at,
            last_used_at=model.last_used_at,
            artifacts=[ArtifactOut(**artifact.__dict__) for artifact in model.artifacts],
        )


class ImportIn(BaseModel):
    path: str = Field(description="a file on the machine that runs the appliance")
    name: str | None = Field(default=None, description="name[:tag]; default: from the filename")
    format: str | None = Field(default=None, description="gguf or safetensors; default: detected")
    link: bool = Field(
        default=False,
        description="hard-link where no reflink is possible, instead of copying (the file becomes"
        " read-only and must belong to the appliance's user)",
    )
    replace: bool = Field(
        default=False, description="put the file in place of the model's file of that name, or its GGUF"
    )


class ImportOut(BaseModel):
    model: ModelOut
    digest: str
    size_bytes: int
    method: str
    added: bool
    evicted: list[str]
    replaced: list[str] = Field(description="digests of the files this import took the place of")

    @classmethod
    def of(cls, result: ImportResult) -> ImportOut:
        return cls(
            model=ModelOut.of(result.model),
            digest=result.digest,
            size_bytes=result.size_bytes,
            method=result.method,
            added=result.added,
            evicted=list(result.evicted),
            replaced=list(result.replaced),
        )


class VerifyOut(BaseModel):
    digest: str
    models: list[str]
    ok: bool
    detail: str

    @classmethod
    def of(cls, result: VerifyResult) -> VerifyOut:
        return cls(digest=result.digest, models=list(result.models), ok=result.ok, detail=result.detail)


class GcOut(BaseModel):
    orphan_blobs: int
    stale_partials: int
    freed_bytes: int
    evicted: list[str]
    missing: list[str]

    @classmethod
    def of(cls, report: GcReport) -> GcOut:
        return cls(
            orphan_blobs=report.orphan_blobs,
            stale_partials=report.stale_partials,
            freed_bytes=report.freed_bytes,
            evicted=list(report.evicted),
            missing=list(report.missing),
        )
