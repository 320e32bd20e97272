"""Residual adds, found the same way in every backend.

A backend describes its graph abstractly: nodes (any hashable: fx nodes, ONNX node indices,
graph-input names) in topological order, each node's direct inputs (:func:`ancestors`), which
nodes are weighted layers, and the add's two operands. :func:`residual_branch` then says which
operand is the residual branch ``f(skip)`` of ``skip + f(skip)``:

* identity skip: one operand is an ancestor of the other; the descendant is the branch;
* projection skip: both operands fork from one value; the branch is the side with more
  weighted layers since the fork (a tie: not a residual add).

``is_source(n)`` marks nodes that count for an identity skip (an operand that is a graph input
read by the other side) but not as the fork point of a projection skip: the ONNX backend marks
its graph inputs so, the torch backend nothing (its placeholders are ordinary nodes, so there two
branches that share only the model input count as forking from it; in ONNX they do not).
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Mapping, TypeVar

N = TypeVar("N", bound=Hashable)


def ancestors(nodes: Iterable[N], inputs: Callable[[N], Iterable[N]]) -> dict[N, set[N]]:
    """Every node's ancestors. ``nodes`` in topological order; ``inputs(n)``: the nodes ``n``
    reads directly (leave out what should not count, e.g. constants)."""
    anc: dict[N, set[N]] = {}
    for n in nodes:
        s: set[N] = set()
        for a in inputs(n):
            s.add(a)
            s |= anc.get(a, set())
        anc[n] = s
    return anc


def _never(n: object) -> bool:
    return False


def residual_branch(a: N, b: N, anc: Mapping[N, set[N]], weighted: Callable[[N], bool],
                    is_source: Callable[[N], bool] = _never) -> int | None:
    """Which operand (0: ``a``, 1: ``b``) of an add ``a + b`` is the residual branch, or None
    when the add is not a residual add. ``anc``: from :func:`ancestors`; ``weighted(n)``:
    whether node ``n`` is a weighted layer (linear, conv, ...)."""
    if a == b:
        return None
    anc_a, anc_b = anc.get(a, set()), anc.get(b, set())
    if a in anc_b:
        return 1
    if b in anc_a:
        return 0
    side_a, side_b = anc_a | {a}, anc_b | {b}
    if not any(not is_source(n) for n in side_a & side_b):
        return None
    wa = sum(1 for n in side_a - side_b if weighted(n))
    wb = sum(1 for n in side_b - side_a if weighted(n))
    if wa == wb:
        return None
    return 0 if wa > wb else 1
