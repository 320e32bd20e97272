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
"""

from __future__ import annotations

from typing import Any

TASKS = ("auto", "classification", "regression")


def check_task(task: str) -> str:
    from dropcli.errors import UsageError

    if task not in TASKS:
        raise UsageError(f"unknown --task {task!r}", "choose auto, classification or regression")
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
