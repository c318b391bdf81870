"""``appliance bundle``: carry models to another appliance (an air-gapped one) on a disk.

Attached to the ``appliance`` group by ``appliance/cli.py``; uses its consoles and helpers.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import click

from appliance.cli import _cli_context, _emit_json, _human, _progress, _runtime, stderr

__all__ = ["bundle"]

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


@click.group()
def bundle() -> None:
    """Export models as a bundle (an OCI image layout) and import one."""


@bundle.command("export")
@click.argument("names", nargs=-1)
@click.option(
    "-o",
    "--output",
    required=True,
    help="A directory, a path ending in .tar, or - for a tar on stdout.",
)
@json_option
@click.pass_context
def export_bundle(ctx: click.Context, names: tuple[str, ...], output: str, as_json: bool) -> None:
    """Write models (all when no NAME is given) as a bundle, straight from the cache.

    The bundle is an OCI image layout: skopeo, oras and cosign handle it, and a registry can
    hold it (`appliance models pull oci://…` reads it back). index.json is written last.

    Example: appliance bundle export tinyllama:1.1b -o /media/disk/models.tar
    """
    from appliance.bundles import BundleService
    from appliance.bundles.schemas import BundleExportOut

    to_stdout = output == "-"
    if to_stdout and sys.stdout.isatty():
        raise click.UsageError("refusing to write a tar to a terminal; redirect stdout or pass -o PATH")
    show_progress = stderr.is_terminal and not as_json
    progress = _progress(eta=True)
    with _runtime(ctx) as runtime, progress if show_progress else nullcontext():
        service = BundleService(runtime.models)
        plan = service.plan(list(names))
        task = progress.add_task(f"exporting to {output}", total=plan.total_bytes)

        def on_progress(done: int) -> None:
            progress.update(task, completed=done)

        if to_stdout:
            service.export_stream(
                plan, sys.stdout.buffer, _cli_context(), on_progress=on_progress if show_progress else None
            )
        else:
            service.export_to(
                plan, Path(output), _cli_context(), on_progress=on_progress if show_progress else None
            )
    summary = BundleExportOut.of(plan, output)
    if as_json:
        text = summary.model_dump_json(indent=2)
        if to_stdout:
            stderr.print(text)
        else:
            _emit_json(summary.model_dump(mode="json"))
        return
    say = stderr.print if to_stdout else click.echo
    count = f"{len(plan.models)} model{'' if len(plan.models) == 1 else 's'}"
    say(f"exported {count} ({plan.blobs} blobs, {_human(plan.total_bytes)}) to {output}")
    for model in plan.models:
        say(f"  {model.name}")


@bundle.command("import")
@click.argument("path")
@json_option
@click.pass_context
def import_bundle(ctx: click.Context, path: str, as_json: bool) -> None:
    """Import a bundle (a directory, a .tar, or - for a tar on stdin).

    Every blob is verified against its digest as it is read; models are registered only once
    all of them verified. Running it again skips what is already here, so an import that was
    killed resumes.

    Example: appliance bundle import /media/disk/models.tar
    """
    from appliance.bundles import BundleService
    from appliance.bundles.schemas import BundleImportOut

    source = sys.stdin.buffer if path == "-" else Path(path)
    show_progress = stderr.is_terminal and not as_json
    progress = _progress(eta=True)
    with _runtime(ctx) as runtime, progress if show_progress else nullcontext():
        task = progress.add_task(f"importing {path}", total=None)

        def on_progress(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        report = BundleService(runtime.models).import_from(
            source, _cli_context(), on_progress=on_progress if show_progress else None
        )
    if as_json:
        _emit_json(BundleImportOut.of(report).model_dump(mode="json"))
        return
    for found in report.models:
        verb = "imported" if found.added else "already present:"
        click.echo(f"{verb} {found.model.name} ({_human(found.model.size_bytes)})")
    click.echo(
        f"{report.blobs_received} blobs received ({_human(report.bytes_received)}),"
        f" {report.blobs_skipped} skipped: already in the cache ({_human(report.bytes_skipped)})"
    )
