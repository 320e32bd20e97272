"""The one task rule (dropcli.analysis.task) that every verb uses for --task auto."""

from __future__ import annotations

import numpy as np
import pytest

from dropcli.analysis.task import class_labels, infer_task
from dropcli.errors import DropcliError, UsageError


@pytest.mark.parametrize("labels,k,want", [
    (None, 10, "classification"),                              # no labels, several outputs
    (None, 1, "regression"),                                   # one output
    (np.array([0, 3, 9]), 10, "classification"),               # integer classes
    (np.array([0., 3., 9.]), 10, "classification"),            # whole-number floats
    (np.array([[0], [3], [9]]), 10, "classification"),         # [N, 1] classes
    (np.array([True, False, True]), 2, "classification"),      # bool
    (np.array([0.5, 3., 9.]), 10, "regression"),               # real-valued targets
    (np.array([np.nan, 3., 9.]), 10, "regression"),
    (np.array([0, 1, 1]), 1, "regression"),                    # integer targets, one output
    (np.zeros((3, 10), np.int64), 10, "regression"),           # [N, K] targets
])
def test_auto_rule(labels, k, want):
    assert infer_task("auto", labels, k) == want


def test_explicit_task_wins_and_unknown_is_a_usage_error():
    assert infer_task("regression", np.array([0, 1]), 10) == "regression"
    assert infer_task("classification", None, 1) == "classification"
    with pytest.raises(UsageError, match="unknown --task 'ranking'") as e:
        infer_task("ranking", None, 3)
    assert "Choose auto, classification or regression" in e.value.one_line()


def test_class_labels():
    assert class_labels(np.array([[1.0], [2.0]]), 3).tolist() == [1, 2]
    assert class_labels(np.array([0, 2]), 3).dtype == np.int64
    with pytest.raises(DropcliError, match="must be integers"):
        class_labels(np.array([0.5, 1.0]), 3)
    with pytest.raises(DropcliError, match="range over"):
        class_labels(np.array([0, 3]), 3)
    with pytest.raises(DropcliError, match="one class index per example"):
        class_labels(np.zeros((2, 2)), 3)
