"""Rendering on the terminal: the one progress bar of every verb, and dim log lines.

The layers below report progress through a callback, ``progress(label, total)``: a context
manager that yields ``advance(k=1, info="")``. :func:`progress` is that callback drawn as a
rich bar on stderr (with an ETA) on a terminal, gone when done; off a terminal (a log file,
CI), a plain line every :data:`PLAIN_INTERVAL` seconds: steps done, rate, ETA. Nothing with
--quiet.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from dropcli.cli.common import STATE, err, log

PLAIN_INTERVAL = 10.0  # seconds between plain progress lines when stderr is not a terminal


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def plain_line(what: str, done: int, total: int, elapsed: float, info: str = "") -> str:
    """``MC dropout: 1200/5000 (24%), 310/s, ETA 0:00:12``: steps (rows, epochs) done, rate, ETA."""
    rate = done / elapsed if elapsed > 0 else 0.0
    pct = f" ({100 * done // total}%)" if total else ""
    eta = _clock((total - done) / rate) if rate > 0 and total else "?"
    return f"{what}: {done}/{total}{pct}, {rate:.3g}/s, ETA {eta}" + (f", {info}" if info else "")


@contextlib.contextmanager
def _plain(what: str, total: int) -> Iterator[Callable[..., None]]:
    start = last = time.monotonic()
    state = {"done": 0, "info": ""}

    def advance(k: int = 1, info: str | None = None) -> None:
        nonlocal last
        state["done"] += k
        if info is not None:
            state["info"] = info
        now = time.monotonic()
        if now - last >= PLAIN_INTERVAL and state["done"] < total:
            last = now
            err.print(plain_line(what, state["done"], total, now - start, state["info"]), markup=False, highlight=False)

    yield advance


@contextlib.contextmanager
def progress(what: str, total: int) -> Iterator[Callable[..., None]]:
    """A bar for ``total`` steps (rows, epochs) on stderr; yields ``advance(k=1, info="")``."""
    if STATE.quiet:
        yield lambda k=1, info=None: None
        return
    if not err.is_terminal:
        with _plain(what, total) as advance:
            yield advance
        return
    from rich.markup import escape
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn(f"[bold]{escape(what)}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err.real(),
                  transient=True) as prog:
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
