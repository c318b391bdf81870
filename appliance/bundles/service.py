"""Bundle export and import, as the CLI and the API call them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from appliance.audit import Context, audited
from appliance.bundles.export import Entry, bundle_entries, tar_chunks, tar_size, write_directory
from appliance.bundles.importer import ImportReport, Progress, import_bundle
from appliance.errors import InvalidInput, ModelNotFound, StorageFailure
from appliance.models.service import ModelService
from appliance.store.base import Model

__all__ = ["BundleService", "ExportPlan"]


@dataclass(frozen=True)
class ExportPlan:
    """What an export will write, known before its first byte: the models and the layout's entries."""

    models: tuple[Model, ...]
    entries: tuple[Entry, ...]

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries)

    @property
    def tar_bytes(self) -> int:
        return tar_size(list(self.entries))

    @property
    def blobs(self) -> int:
        return sum(entry.name.startswith("blobs/") for entry in self.entries)


class BundleService:
    def __init__(self, models: ModelService) -> None:
        self.models = models

    # -- export ------------------------------------------------------------------------------

    def plan(self, names: list[str]) -> ExportPlan:
        """The models to export (all when ``names`` is empty); a missing name, or a model whose
        file is missing or quarantined, is refused before anything is written."""
        found = [self.models.get(name) for name in names] if names else self.models.list_models()
        chosen = list({model.name: model for model in found}.values())  # tiny and tiny:latest: once
        if not chosen:
            raise ModelNotFound("there are no models to export", hint="import or pull a model first")
        for model in chosen:
            for artifact in model.artifacts:
                if artifact.state != "ok" or not self.models.has_blob(artifact.digest):
                    raise StorageFailure(
                        f"the file {artifact.filename} of {model.name} is not in the cache"
                        f" ({'quarantined' if artifact.state != 'ok' else 'missing'}): it cannot be exported",
                        hint="run `appliance models verify`, then pull or import the model again",
                    )
        entries = bundle_entries(chosen, self.models.blob_path)
        return ExportPlan(tuple(chosen), tuple(entries))

    def export_to(
        self,
        plan: ExportPlan,
        target: Path,
        context: Context,
        *,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        """Write a directory, or a tar when ``target`` ends in ``.tar`` (under a temporary name,
        renamed when complete)."""
        with self._audited(plan, context, str(target)):
            if target.suffix != ".tar":
                write_directory(list(plan.entries), target, on_progress=on_progress)
                return
            if target.is_dir():
                raise InvalidInput(f"{target} is a directory", hint="name the tar file to write")
            staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
            try:
                with staging.open("wb") as handle:
                    self._write_tar(plan, handle, on_progress)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.rename(staging, target)
            except OSError as exc:
                raise StorageFailure(f"cannot write {target}: {exc.strerror or exc}") from exc
            finally:
                staging.unlink(missing_ok=True)

    def export_stream(
        self,
        plan: ExportPlan,
        handle: IO[bytes],
        context: Context,
        *,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        """Write the tar to an open stream (stdout)."""
        with self._audited(plan, context, "-"):
            self._write_tar(plan, handle, on_progress)
            handle.flush()

    def tar_stream(self, plan: ExportPlan, context: Context) -> Iterator[bytes]:
        """The tar chunk by chunk (an HTTP download); audited when the last chunk is taken."""
        with self._audited(plan, context, "http"):
            yield from tar_chunks(list(plan.entries))

    def _write_tar(
        self, plan: ExportPlan, handle: IO[bytes], on_progress: Callable[[int], None] | None
    ) -> None:
        for chunk in tar_chunks(list(plan.entries), on_progress=on_progress):
            handle.write(chunk)

    @contextmanager
    def _audited(self, plan: ExportPlan, context: Context, target: str) -> Iterator[None]:
        with audited(self.models.store, context, action="bundles.export", target=target) as note:
            note.bytes = plan.total_bytes
            note.detail.update(models=[str(model.name) for model in plan.models], blobs=plan.blobs)
            yield

    # -- import ------------------------------------------------------------------------------

    def import_from(
        self,
        source: Path | IO[bytes],
        context: Context,
        *,
        label: str | None = None,
        on_progress: Progress | None = None,
    ) -> ImportReport:
        """Import a bundle (directory, tar file or tar stream): every blob verified before any
        model is registered; blobs already in the cache are skipped."""
        shown = label or (str(source) if isinstance(source, Path) else "-")
        return import_bundle(self.models, source, context, label=shown, on_progress=on_progress)
