"""One rule for the task of a run: classification or regression (``--task auto``).

Every verb that needs a task (``uncertainty``, ``analyze``, ``prune``, ``finetune``, and the
Python API) calls :func:`infer_task`; :func:`class_labels` checks classification labels
against the number of classes for the verbs that score per-class outputs.

The rule (``task="auto"``), from the number of model outputs K and the labels, if any:

1. K < 2 (one output)                                          -> regression
2. no labels                                                   -> classification
3. labels that are one integer class per example (shape [N] or
   [N, 1]; an integer or bool dtype, or floats that are all whole
   numbers)                                                     -> classification
4. anything else (real-valued targets, [N, M>1] targets)       -> regression

What the three rules it replaces did, and the cases that changed:

* ``dropcli uncertainty`` (in ``cli/uncertainty.py``): classification when K >= 2 and either
  no labels or 1-D whole-number labels; else regression. Changed: [N, 1] whole-number labels
  with K >= 2 were regression (and then failed with "labels have 1 columns but the model has K
  outputs"); they are now classification, read as [N].
* ``dropcli analyze`` (in ``cli/analyze.py``): classification when K >= 2 and the labels, if
  any, are 1-D, whatever their values. Changed: 1-D labels that are not whole numbers with
  K >= 2 were classification (and then failed with "classification labels must be integers");
  they are now regression, where analyze reports no output section (as with ``--task
  regression``). [N, 1] whole-number labels with K >= 2: regression before, classification now.
* ``prune`` / ``finetune`` (``training.loop.resolve_task``): classification for any integer or
  bool dtype, or for 1-D whole-number floats when K > 1; else regression. Changed: integer
  labels with ONE model output were classification (a one-class cross-entropy, failing with
  "labels out of range" for any label other than 0); they are now regression targets.
  Integer labels of shape [N, M>1] were classification (and failed with "must be one integer
  class per example"); they are now regression targets.

:func:`class_labels` (``uncertainty``, ``analyze``) now also reads [N, 1] labels as [N] (it
refused them before, also with ``--task classification``), as ``prune``/``finetune`` did. An
unknown ``--task`` reads "choose auto, classification or regression" everywhere (``finetune``
said "choose one of auto, classification, regression").

No case that the test suite covers changed.

Output kinds (`uncertainty`, :func:`output_kind`): the rule above assumes one vector of K
outputs per example. What the output *is* is decided first, from its per-example shape, the
layer that makes it and its values, so a language model's ``[N, S, V]`` logits are not one
softmax over S*V "classes" and a sentence embedding is not soft-maxed over its dimensions:

* per-example shape ``[S, V]`` (V >= 2), made by a layer that is not a normalisation
  -> ``token-classification``: a softmax over the last axis, statistics per position,
  summaries per sequence; labels ``[N, S]`` with :data:`IGNORE_INDEX` (-100) marking
  positions that are not scored (padding, the prompt), as in PyTorch's cross-entropy.
* a feature vector rather than logits: rows of unit L2 norm (``F.normalize``, a sentence
  embedding), or made by a LayerNorm -> ``regression`` of each dimension, with a warning
  that says so (a softmax over embedding dimensions means nothing; the spread of each
  dimension over the passes does). ``--task classification`` forces the softmax.
* per-example shapes of three or more axes (feature maps) -> ``regression`` of each value,
  with a warning (there is no rule for which axis holds classes).
* otherwise the rule above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

TASKS = ("auto", "classification", "regression")
# `uncertainty` also takes per-position classification ([N, S, V] outputs)
OUTPUT_TASKS = TASKS + ("token-classification",)
IGNORE_INDEX = -100  # a label that is not scored (PyTorch's cross-entropy default)
# layers whose output is a feature vector, not logits (torch aten names and ONNX op types)
FEATURE_OPS = {"layer_norm", "native_layer_norm", "LayerNormalization", "normalize"}


def check_task(task: str, allowed: tuple = TASKS) -> str:
    from dropcli.errors import UsageError

    if task not in allowed:
        raise UsageError(f"unknown --task {task!r}", f"choose {', '.join(allowed[:-1])} or {allowed[-1]}")
    return task


def _whole_numbers(labels: Any) -> bool:
    import numpy as np

    kind = labels.dtype.kind
    if kind in "biu":
        return True
    if kind != "f":
        return False
    return bool(np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)))


def is_class_labels(labels: Any) -> bool:
    """One whole-number class per example: shape [N] or [N, 1]."""
    import numpy as np

    lab = np.asarray(labels)
    if lab.ndim == 2 and lab.shape[1] == 1:
        lab = lab[:, 0]
    return lab.ndim == 1 and _whole_numbers(lab)


def infer_task(task: str, labels: Any, n_outputs: int) -> str:
    """``task`` if given, else the rule above (``labels`` may be None)."""
    check_task(task)
    if task != "auto":
        return task
    if n_outputs < 2:
        return "regression"
    if labels is None or is_class_labels(labels):
        return "classification"
    return "regression"


def class_labels(labels: Any, n_classes: int):
    """Classification labels as int64 [N], checked against the number of classes."""
    import numpy as np

    from dropcli.errors import DropcliError

    lab = np.asarray(labels)
    if lab.ndim == 2 and lab.shape[1] == 1:
        lab = lab[:, 0]
    if lab.ndim != 1:
        raise DropcliError(f"classification labels must be one class index per example, got shape {list(lab.shape)}")
    if lab.dtype.kind not in "biu" and not np.all(lab == np.round(lab)):
        raise DropcliError("classification labels must be integers", "or pass --task regression")
    lab = lab.astype(np.int64)
    if lab.min() < 0 or lab.max() >= n_classes:
        raise DropcliError(f"labels range over [{lab.min()}, {lab.max()}] but the model has {n_classes} classes")
    return lab


def check_labels(labels: Any, task: str, n_outputs: int) -> None:
    """The labels against the model's K outputs, before a run: one class index in [0, K) per
    example (classification, :func:`class_labels`), or K columns per example (regression)."""
    import numpy as np

    from dropcli.errors import DropcliError

    if infer_task(task, labels, n_outputs) == "classification":
        class_labels(labels, n_outputs)
        return
    lab = np.asarray(labels)
    cols = int(np.prod(lab.shape[1:])) if lab.ndim > 1 else 1
    if cols != n_outputs:
        raise DropcliError(f"labels have {cols} columns but the model has {n_outputs} outputs")


# ------------------------------------------------------------------------------ output kinds


@dataclass
class OutputKind:
    """What a model's output is, for `uncertainty`: ``task`` (classification,
    token-classification or regression), ``kind`` (the words the report uses), the per-example
    ``shape``, why it was chosen, and a warning for the user (None: nothing to say)."""

    task: str
    kind: str
    shape: tuple
    why: str
    warning: Optional[str] = None

    def record(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "why": self.why}


def _unit_norm_rows(values: Any) -> bool:
    """Rows (last axis) of L2 norm 1 that are not probability vectors: a normalised embedding."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or v.shape[-1] < 2:
        return False
    norms = np.linalg.norm(v, axis=-1)
    probs = bool(np.all(v >= 0) and np.allclose(v.sum(-1), 1.0, atol=1e-4))
    return bool(np.allclose(norms, 1.0, atol=1e-3)) and not probs


def is_token_labels(labels: Any, seq: int) -> bool:
    """Labels [N, S] (or [N, S, 1]) of whole numbers: one class per position."""
    import numpy as np

    lab = np.asarray(labels)
    if lab.ndim == 3 and lab.shape[2] == 1:
        lab = lab[..., 0]
    return lab.ndim == 2 and lab.shape[1] == seq and _whole_numbers(lab)


def output_kind(task: str, labels: Any, shape: tuple, final_op: Optional[str] = None, values: Any = None) -> OutputKind:
    """The kind of a model output of per-example ``shape`` (the rule in the module docstring).
    ``final_op``: the op that makes the output (aten name or ONNX op type), if known;
    ``values``: the output for a few examples (deterministic pass), to recognise embeddings."""
    import numpy as np

    from dropcli.errors import UsageError

    check_task(task, OUTPUT_TASKS)
    shape = tuple(int(d) for d in shape) or (1,)
    K = int(np.prod(shape))
    feature = final_op in FEATURE_OPS or (values is not None and _unit_norm_rows(values))
    made = f" (made by {final_op})" if final_op else ""
    if task == "token-classification" or (task in ("auto", "classification") and len(shape) == 2 and shape[1] >= 2
                                          and not (task == "auto" and feature)):
        if len(shape) != 2 or shape[1] < 2:
            raise UsageError(f"--task token-classification needs an output of shape [N, S, V] (V >= 2 classes), "
                             f"this one is [N, {', '.join(map(str, shape))}]", "use --task classification or regression")
        if task == "auto" and labels is not None and not is_token_labels(labels, shape[0]):
            return OutputKind("regression", "regression", shape, f"[N, {shape[0]}, {shape[1]}] outputs with labels that "
                              "are not one class per position", None)
        return OutputKind("token-classification", "per-position classification", shape,
                          f"output [N, {shape[0]}, {shape[1]}]{made}: a softmax over the last axis ({shape[1]} classes) "
                          f"at each of {shape[0]} positions")
    if task == "regression":
        return OutputKind("regression", "regression", shape, "--task regression")
    if task == "classification":
        return OutputKind("classification", "one class per example", shape,
                          "--task classification" + (f": a softmax over all {K} outputs" if len(shape) > 1 else ""))
    if K < 2:
        return OutputKind("regression", "regression", shape, "one output per example")
    if feature:
        what = "rows of unit L2 norm" if values is not None and _unit_norm_rows(values) else f"made by {final_op}"
        return OutputKind("regression", "embedding", shape, f"a feature vector ({what}), not logits",
                          f"the output [N, {', '.join(map(str, shape))}] is a feature vector ({what}), not class "
                          "logits: reported per dimension as regression (mean and spread over passes), not soft-maxed; "
                          "pass --task classification to force a softmax")
    if len(shape) >= 3:
        return OutputKind("regression", "regression", shape, f"an output of {len(shape)} axes per example",
                          f"the output [N, {', '.join(map(str, shape))}] has no axis known to hold classes: reported "
                          "per value as regression; pass --task classification for one softmax over all of them")
    t = infer_task("auto", labels, K)
    if t == "classification":
        return OutputKind(t, "one class per example", shape, f"{K} outputs{made}" + ("" if labels is None else " and one class label per example"))
    return OutputKind(t, "regression", shape, "labels that are not one class per example")


def token_labels(labels: Any, seq: int, n_classes: int):
    """Per-position labels as int64 [N, S], checked: a class in [0, V) or IGNORE_INDEX."""
    import numpy as np

    from dropcli.errors import DropcliError

    lab = np.asarray(labels)
    if lab.ndim == 3 and lab.shape[2] == 1:
        lab = lab[..., 0]
    if lab.ndim != 2 or lab.shape[1] != seq:
        raise DropcliError(f"per-position labels must have shape [N, {seq}] (one class per position, "
                           f"{IGNORE_INDEX} for positions not scored), got {list(lab.shape)}")
    if not _whole_numbers(lab):
        raise DropcliError("per-position labels must be integers", f"use {IGNORE_INDEX} for positions not scored")
    lab = lab.astype(np.int64)
    scored = lab != IGNORE_INDEX
    if not scored.any():
        raise DropcliError(f"every label is {IGNORE_INDEX} (ignored): there is nothing to score", "give some real labels")
    bad = scored & ((lab < 0) | (lab >= n_classes))
    if bad.any():
        v = lab[bad]
        raise DropcliError(f"labels range over [{v.min()}, {v.max()}] (besides {IGNORE_INDEX}) but the model has "
                           f"{n_classes} classes per position")
    return lab


def check_output_labels(labels: Any, kind: OutputKind) -> None:
    """:func:`check_labels` for an output kind (per-position labels for token-classification)."""
    if kind.task == "token-classification":
        token_labels(labels, kind.shape[0], kind.shape[1])
    else:
        import numpy as np

        check_labels(labels, kind.task, int(np.prod(kind.shape)))
