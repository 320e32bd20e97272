"""dropcli's command-line entry point."""

from __future__ import annotations

import typer

from dropcli import __version__
from dropcli.cli.common import STATE

HELP = """Dropout for trained models: inject dropout variants, run Monte-Carlo dropout, prune.

Convention: p is the DROP probability and q = 1 - p the keep probability.

Examples:

  dropcli inspect examples/digits_mlp.pt

  dropcli inject examples/digits_mlp.pt --variant gaussian --p 0.3 --after relu -o mlp_gauss.pt

  dropcli inject examples/digits_mlp.onnx --variant standard --p 0.2 -o mlp_mc.onnx

  dropcli prune examples/digits_mlp.pt --data train.npz -o mlp_small.pt

  dropcli variants --json

  dropcli analyze examples/digits_mlp.pt --input examples/digits_test.npz

  dropcli convert examples/digits_mlp.pt --to vanilla -o mlp_vanilla.pt

Exit codes: 0 ok, 1 error (bad model, input or failed check), 2 usage error,
3 uncertainty gate tripped (--fail-above), 130 interrupted.
"""

app = typer.Typer(
    help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"dropcli {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines on stderr."),
) -> None:
    STATE.debug = debug
    STATE.quiet = quiet


def _register() -> None:
    from dropcli.cli import analyze  # noqa: F401  (commands register themselves)
    from dropcli.cli import convert  # noqa: F401  (commands register themselves)
    from dropcli.cli import finetune  # noqa: F401  (commands register themselves)
    from dropcli.cli import inject  # noqa: F401  (commands register themselves)
    from dropcli.cli import inspect  # noqa: F401  (commands register themselves)
    from dropcli.cli import prune  # noqa: F401  (commands register themselves)
    from dropcli.cli import uncertainty  # noqa: F401  (commands register themselves)
    from dropcli.cli import variants  # noqa: F401  (commands register themselves)

    for mod in (inspect, inject, uncertainty, prune, finetune, analyze, convert, variants):
        mod.register(app)


_register()


def main() -> None:
    # torch's CPU allocator asks for transparent huge pages on blocks of 2 MiB and more when this is
    # set (read once, at its first such block: hence here, before any verb imports torch). The MC
    # engine allocates and frees tensors of tens of MB every chunk; with 4 KiB pages each chunk
    # faulted them in again (6,400 faults for one 26 MB tensor, ~4 us each on this project's VM).
    # numpy already does this by default. THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
    import os

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    app()


if __name__ == "__main__":
    main()
