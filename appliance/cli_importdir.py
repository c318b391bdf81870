"""``appliance models import-dir``: the models an Ollama dir or a Hugging Face cache holds, in place."""

from __future__ import annotations

import json
from pathlib import Path

import click

from appliance.audit import Context
from appliance.models.importdir import DirImporter, DirImportOut
from appliance.runtime import Runtime

__all__ = ["import_dir"]


@click.command("import-dir")
@click.argument("path", type=click.Path(path_type=Path, file_okay=True, readable=False))
@click.option("--copy", "force_copy", is_flag=True, help="Always copy, never hard-link or reflink.")
@click.option("--dry-run", is_flag=True, help="Say what would be imported; read and change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@click.pass_context
def import_dir(ctx: click.Context, path: Path, force_copy: bool, dry_run: bool, as_json: bool) -> None:
    """Import the models of an Ollama models dir or a Hugging Face cache, in place.

    Their blobs are hard-linked (or reflinked) when on the cache's filesystem, else copied, and
    every digest is checked. Ollama names and tags are kept; hub models are named as `hf:` pulls
    name them. A model that fails is listed and the rest go on; the command then exits 1.

    Example: appliance models import-dir ~/.ollama/models
    """
    runtime = Runtime.open(ctx.obj["settings"]())
    try:
        report = DirImporter(runtime.models).import_dir(path, Context.cli(), copy=force_copy, dry_run=dry_run)
    finally:
        runtime.close()
    if as_json:
        click.echo(json.dumps(report.model_dump(mode="json"), indent=2, sort_keys=True))
    else:
        _print(report)
    if report.failed:
        ctx.exit(1)


def _print(report: DirImportOut) -> None:
    # Paths and errors from the directory are shown as they are, control characters escaped.
    from appliance.cli import _visible  # appliance.cli imports this module

    def echo(text: str, *, err: bool = False) -> None:
        click.echo(_visible(text), err=err)

    echo(f"{report.path}: {'Ollama models dir' if report.layout == 'ollama' else 'Hugging Face cache'}")
    if not report.models:
        echo("no models found")
    for model in report.models:
        label = {"added": "imported", "present": "already present", "would_add": "would import"}
        echo(f"{label.get(model.status, 'FAILED')}: {model.name or model.origin}")
        for file in model.files:
            how = f", {file.method}" if file.method else ""
            echo(f"  {file.filename} {file.digest or '(digest read on import)'} ({file.size_bytes} B{how})")
        for left in model.not_imported:
            echo(f"  not imported: {left}")
        for note in model.notes:
            echo(f"  note: {note}")
        if model.error:
            echo(f"  error: {model.error}")
            if model.hint:
                echo(f"  hint: {model.hint}")
    if report.failed:
        names = ", ".join(model.name or model.origin for model in report.failed)
        echo(f"{len(report.failed)} of {len(report.models)} failed: {names}", err=True)
