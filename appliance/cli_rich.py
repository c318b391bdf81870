"""What the CLI draws with Rich: consoles, tables, progress bars.

Imported on first use only (``appliance.cli`` reaches it through a lazy console), so ``--help``
and commands that print plain lines never load Rich.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

__all__ = ["make_console", "make_count_progress", "make_progress", "make_table", "visible"]

# C0 and C1 controls but tab and newline: a terminal would act on them (move, clear, retitle).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """``text`` with its control characters written as escapes (``\\x1b``): a stored error or path
    from elsewhere is shown, never run by the terminal."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def make_console(*, to_stderr: bool) -> Console:
    # Paths, refs, ids and stored text are printed as they are: no Rich markup, no :emoji: codes
    # (a path like ./[/x]y.gguf must neither crash the command nor lose its brackets).
    if to_stderr:
        return Console(stderr=True, highlight=False, markup=False, emoji=False, soft_wrap=True)
    # Piped output keeps each row on one line, however long its cells, so it can be grepped and cut.
    return Console(
        highlight=False,
        markup=False,
        emoji=False,
        soft_wrap=True,
        width=None if sys.stdout.isatty() else 100_000,
    )


class _Table(Table):
    """Cells are text as it is, with control characters made visible."""

    def add_row(self, *cells: RenderableType | None, **options: Any) -> None:
        super().add_row(*(visible(cell) if isinstance(cell, str) else cell for cell in cells), **options)


def make_table(*headers: str, pad_edge: bool = True) -> Table:
    """A table that never cuts a cell: on a narrow terminal long text folds onto more lines."""
    table = _Table(box=None, pad_edge=pad_edge)
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


def make_progress(console: Console, *, eta: bool) -> Progress:
    """A transfer's bar: bytes done, speed and, with ``eta``, the time left."""
    # The description holds a path or a ref: plain text, never markup.
    description = TextColumn("{task.description}", style="progress.description", markup=False)
    columns = [description, BarColumn(), DownloadColumn(), TransferSpeedColumn()]
    if eta:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console, transient=True)


def make_count_progress(console: Console) -> Progress:
    """A bar per item counted (a table's rows, say): how many of how many."""
    description = TextColumn("{task.description}", style="progress.description", markup=False)
    return Progress(description, BarColumn(), MofNCompleteColumn(), console=console, transient=True)
