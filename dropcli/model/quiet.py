"""Keeping library chatter off the user's terminal, and exceptions to one line.

Both backends call torch's and onnxscript's exporters and loaders, which log, warn and print
freely; dropcli reports what went wrong itself, in one line (:func:`short_error`). No torch
import here: the loggers are silenced by name.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator

_CHATTY_LOGGERS = ("torch", "torch.export", "torch.onnx", "onnxscript")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch's exporters are chatty; keep stderr for dropcli's own messages."""
    loggers = [logging.getLogger(n) for n in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        # CRITICAL, not ERROR: torch logs failed fake-tensor runs (a wrong --input-shape, say) at
        # ERROR with a traceback; dropcli reports the exception itself in one line.
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# Library warnings known to be harmless for what dropcli does with the library: (category, message
# regex). torch 2.13 warns on every deepcopy of an exported program's tree spec (prune and finetune
# copy the model), a deprecation inside torch itself, not in anything dropcli calls.
KNOWN_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)


@contextlib.contextmanager
def known_warnings_silenced(show: bool = False) -> Iterator[None]:
    """Hide :data:`KNOWN_WARNINGS` (all of them shown with ``show``, i.e. under ``--debug``)."""
    with warnings.catch_warnings():
        if not show:
            for category, message in KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
        yield


def short_error(e: BaseException) -> str:
    """The first line of an exception's text (at most 300 characters), or its type's name."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]
