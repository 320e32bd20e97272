"""Shared CLI plumbing: global state, consoles, one-line errors, shared option types."""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import typer

from dropcli.model.quiet import known_warnings_silenced
from dropcli.errors import EXIT_ERROR, EXIT_INTERRUPTED, DropcliError, UsageError


@dataclass
class State:
    debug: bool = False
    quiet: bool = False


class LazyConsole:
    """A rich Console made on first use: `dropcli --help` does not import rich."""

    def __init__(self, make: Callable[[], Any]):
        object.__setattr__(self, "_make", make)
        object.__setattr__(self, "_console", None)

    def real(self) -> Any:
        if self._console is None:
            object.__setattr__(self, "_console", self._make())
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.real(), name, value)


def _console(**kw: Any) -> Any:
    from rich.console import Console

    return Console(**kw)


STATE = State()
out = LazyConsole(lambda: _console(soft_wrap=True, width=None if sys.stdout.isatty() else 160))  # reports: stdout
err = LazyConsole(lambda: _console(stderr=True, soft_wrap=True))  # progress and logs: stderr


def log(msg: str) -> None:
    if not STATE.quiet:
        err.print(msg, highlight=False)


def fail(message: str, code: int = EXIT_ERROR) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def debug_log() -> Any:
    """Under --debug, dropcli's own debug notes (``logging.getLogger("dropcli")``: which route
    loaded a model, say) go to this command's stderr; the handler (removed when the command ends)."""
    import logging

    lg = logging.getLogger("dropcli")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("debug: %(message)s"))
    lg.addHandler(h)
    lg.setLevel(logging.DEBUG)
    return h


def _end_debug_log(h: Any) -> None:
    import logging

    lg = logging.getLogger("dropcli")
    lg.removeHandler(h)
    lg.setLevel(logging.NOTSET)


def handle_errors(fn: Callable) -> Callable:
    """Turn exceptions into one-line messages and exit codes (tracebacks only with --debug).

    It also gives the command the global ``--quiet/-q`` and ``--debug`` options, so that they
    work after the verb (``dropcli inspect m.pt -q``) as well as before it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, dropcli_quiet: bool = False, dropcli_debug: bool = False, **kwargs: Any) -> Any:
        if dropcli_quiet:
            STATE.quiet = True
        if dropcli_debug:
            STATE.debug = True
        log_handler = debug_log() if STATE.debug else None
        try:
            with known_warnings_silenced(show=STATE.debug):
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except DropcliError as e:
            if STATE.debug:
                traceback.print_exc()
            fail(_escape(e.one_line()), e.exit_code)
        except KeyboardInterrupt:
            if STATE.debug:
                traceback.print_exc()
            fail("interrupted; nothing was written", EXIT_INTERRUPTED)
        except Exception as e:  # noqa: BLE001
            if STATE.debug:
                traceback.print_exc()
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            fail(_escape(f"unexpected {type(e).__name__}: {text[:300]} (run with --debug for the traceback)"), EXIT_ERROR)
        finally:
            if log_handler is not None:
                _end_debug_log(log_handler)
            from dropcli.io.files import reset_stdio

            reset_stdio()
            out.file = None  # back to stdout (model_output may have sent reports to stderr)

    sig = inspect.signature(fn)
    extra = [
        inspect.Parameter("dropcli_quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--quiet", "-q", help="No progress or log lines on stderr.")),
        inspect.Parameter("dropcli_debug", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--debug", help="Show tracebacks on errors.")),
    ]
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "dropcli_quiet": bool, "dropcli_debug": bool}
    return wrapper


def model_output(output: str, inputs: list, *, force: bool = False, json_out: bool = False,
                 others: Optional[dict[str, Optional[str]]] = None) -> None:
    """``-o`` checks for the commands that write a model. ``-o -`` writes the model to stdout:
    the human report then goes to stderr, and nothing else may write to stdout (``others``: the
    command's other outputs by option name)."""
    from dropcli.io.files import check_output_path

    if output == "-":
        if json_out:
            raise UsageError("-o - and --json would both write to stdout",
                             "write the model to a file, or leave out --json (the table then goes to stderr)")
        for opt, path in (others or {}).items():
            if path == "-":
                raise UsageError(f"-o - and {opt} - would both write to stdout", f"write {opt} to a file")
        check_output_path(output, inputs)
        out.file = sys.stderr
        return
    check_output_path(output, inputs, force=force)


def report_output(path: Optional[str], json_out: bool = False) -> None:
    """``--report -``: the JSON report owns stdout, so the human tables go to stderr (as with
    ``-o -``); with ``--json`` both would write the report to stdout."""
    if path != "-":
        return
    if json_out:
        raise UsageError("--report - and --json would both write the report to stdout",
                         "use --json alone, or --report FILE")
    out.file = sys.stderr


def shown(path: Optional[str], std: str = "stdout") -> str:
    """A path as reports print it: ``-`` is ``std`` (stdout for outputs, stdin for inputs)."""
    return std if path == "-" else str(path)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def write_report(report: Any, path: Optional[str]) -> None:
    """``--report FILE``: the report as JSON, written atomically (``-``: to stdout)."""
    if not path:
        return
    text = json.dumps(report, indent=2, default=float) + "\n"
    if path == "-":
        print(text, end="")
        return
    from dropcli.io.files import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ---- options shared by commands -----------------------------------------------------
ModelArg = typer.Argument(..., help="Model file: ONNX, TorchScript, torch.export .pt2, torch.save module or state_dict; - reads it from stdin.")
TrustPickle = typer.Option(
    False, "--trust-pickle",
    help="Allow loading a pickled nn.Module. Unpickling RUNS CODE from the file: only for files you trust.",
)
Imports = typer.Option(None, "--import", help="Module or .py file that defines the model's classes (with --trust-pickle).")
Arch = typer.Option(None, "--arch", help="package.module:factory (or file.py:factory) that builds the model for a state_dict.")
InputShape = typer.Option(None, "--input-shape", help="Example input shape when it can't be read from the model or the data, e.g. 1x3x32x32; a dtype after a colon, e.g. 1x8:int64 for token ids; several inputs separated by ;.")
After = typer.Option(None, "--after", help="Select sites by layer/op kind: relu, linear, conv, activation, norm... (comma list).")
Layers = typer.Option(None, "--layers", help="Select sites by name glob, e.g. 'features.*' (comma list).")
Exclude = typer.Option(None, "--exclude", help="Drop sites whose name matches these globs.")
AllowOutput = typer.Option(False, "--allow-output", help="Allow a site after the output layer (off by default).")
Json = typer.Option(False, "--json", help="Machine-readable JSON on stdout.")
