"""The JSON shapes of bundle exports and imports, shared by the API and the CLI's ``--json``."""

from __future__ import annotations

from pydantic import BaseModel, Field

from appliance.bundles.importer import ImportReport
from appliance.bundles.service import ExportPlan
from appliance.models.schemas import ModelOut

__all__ = ["BundleExportOut", "BundleImportOut", "BundleModelOut"]


class BundleModelOut(BaseModel):
    model: ModelOut
    added: bool = Field(description="false when it was already here with the same files (a no-op)")


class BundleImportOut(BaseModel):
    models: list[BundleModelOut]
    blobs_received: int = Field(description="blobs read from the bundle, verified and put in the cache")
    bytes_received: int
    blobs_skipped: int = Field(
        description="blobs already in the cache (an earlier run, another model), not read"
    )
    bytes_skipped: int

    @classmethod
    def of(cls, report: ImportReport) -> BundleImportOut:
        return cls(
            models=[
                BundleModelOut(model=ModelOut.of(found.model), added=found.added) for found in report.models
            ],
            blobs_received=report.blobs_received,
            bytes_received=report.bytes_received,
            blobs_skipped=report.blobs_skipped,
            bytes_skipped=report.bytes_skipped,
        )


class BundleExportOut(BaseModel):
    path: str
    models: list[str]
    blobs: int
    size_bytes: int = Field(description="the bytes of the layout's files (a tar adds headers)")

    @classmethod
    def of(cls, plan: ExportPlan, path: str) -> BundleExportOut:
        return cls(
            path=path,
            models=[str(model.name) for model in plan.models],
            blobs=plan.blobs,
            size_bytes=plan.total_bytes,
        )
