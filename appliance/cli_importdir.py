"""``appliance models import-dir``: the models an Ollama dir or a Hugging Face cache holds, in place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from appliance.cli import _cli_context, _runtime, _visible

if TYPE_CHECKING:
    from appliance.models.importdir import DirImportOut, ImportedModelOut

__all__ = ["import_dir"]


@click.command("import-dir")
@click.argument("path", type=click.Path(path_type=Path, file_okay=True, readable=False))
@click.option("--copy", "force_copy", is_flag=True, help="Always copy, never hard-link or reflink.")
@click.option("--dry-run", is_flag=True, help="Say what would be imported; hash and change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@click.pass_context
def import_dir(ctx: click.Context, path: Path, force_copy: bool, dry_run: bool, as_json: bool) -> None:
    """Import the models of an Ollama models dir or a Hugging Face cache, in place.

    Their blobs are hard-linked (or reflinked) when on the cache's filesystem, else copied, and
    every digest is checked. Ollama names and tags are kept; hub models are named as `hf:` pulls
    name them. A model that fails is listed and the rest go on; the command then exits 1.

    Example: appliance models import-dir ~/.ollama/models
    """
    from appliance.models.importdir import DirImporter

    with _runtime(ctx) as runtime:
        report = DirImporter(runtime.models).import_dir(
            path,
            _cli_context(),
            copy=force_copy,
            dry_run=dry_run,
            on_model=None if as_json else _print_model,
        )
    if as_json:
        click.echo(json.dumps(report.model_dump(mode="json"), indent=2, sort_keys=True))
    else:
        _print_summary(report)
    if report.failed:
        ctx.exit(1)


def _echo(text: str, *, err: bool = False) -> None:
    """Paths and errors from the directory, as they are, with control characters escaped."""
    click.echo(_visible(text), err=err)


_VERBS = {"added": "imported", "present": "already present", "would_add": "would import", "failed": "FAILED"}


def _print_model(model: ImportedModelOut) -> None:
    _echo(f"{_VERBS[model.status]}: {model.name or model.origin}")
    for file in model.files:
        how = f", {file.method}" if file.method else ""
        _echo(f"  {file.filename} {file.digest or '(digest read on import)'} ({file.size_bytes} B{how})")
    for left in model.not_imported:
        _echo(f"  not imported: {left}")
    for note in model.notes:
        _echo(f"  note: {note}")
    if model.error:
        _echo(f"  error: {model.error}")
        if model.hint:
            _echo(f"  hint: {model.hint}")


def _print_summary(report: DirImportOut) -> None:
    layout = "an Ollama models dir" if report.layout == "ollama" else "a Hugging Face cache"
    _echo(f"{len(report.models)} models in {report.path} ({layout})")
    if report.failed:
        names = ", ".join(model.name or model.origin for model in report.failed)
        _echo(f"{len(report.failed)} of {len(report.models)} failed: {names}", err=True)
