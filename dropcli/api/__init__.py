"""dropcli's Python API: the verbs of the CLI as functions, for notebooks and scripts.

    import dropcli

    m = dropcli.load("examples/digits_mlp.onnx")
    m2 = dropcli.inject(m, "standard", p=0.1, after="relu")
    r = dropcli.uncertainty(m2, x, T=50)          # r.mean, r.entropy, r.mutual_info, r.summary

Every function takes a model as a path or as a loaded model (``dropcli.load``), never changes
the model it is given (``inject`` and ``convert`` return a changed copy), and raises
:class:`dropcli.errors.DropcliError` (:class:`~dropcli.errors.UsageError` for bad arguments)
with a message that says what to do; the CLI prints the same messages on one line. The
results are those of the CLI's ``--json`` for the same arguments and seed.
"""

from __future__ import annotations

from dropcli.api.analyze import analyze
from dropcli.api.finetune import finetune
from dropcli.api.models import convert, inject, inspect, load, save, variants
from dropcli.api.prune import prune
from dropcli.api.uncertainty import UncertaintyResult, uncertainty

__all__ = ["load", "save", "inspect", "inject", "uncertainty", "UncertaintyResult", "analyze", "prune", "finetune",
           "convert", "variants"]
