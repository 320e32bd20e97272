"""Rendering on the terminal: the one progress bar of every verb, and dim log lines.

The layers below report progress through a callback, ``progress(label, total)``: a context
manager that yields ``advance(k=1, info="")``. :func:`progress` is that callback drawn as a
rich bar on stderr: only on a terminal, not with --quiet, and gone when done.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from dropcli.cli.common import STATE, err, log


@contextlib.contextmanager
def progress(what: str, total: int) -> Iterator[Callable[..., None]]:
    """A bar for ``total`` steps (rows, epochs) on stderr; yields ``advance(k=1, info="")``."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    show = not STATE.quiet and err.is_terminal
    with Progress(TextColumn(f"[bold]{escape(what)}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=err.real(), transient=True, disable=not show) as prog:
        task_id = prog.add_task(what, total=total, info="")

        def advance(k: int = 1, info: str | None = None) -> None:
            if info is None:
                prog.advance(task_id, k)
            else:
                prog.update(task_id, advance=k, info=info)

        yield advance


def log_dim(text: str) -> None:
    """A log line on stderr in dim type (not with --quiet)."""
    log(f"[dim]{text}[/]")
