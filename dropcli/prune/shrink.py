"""Remove dead neurons and channels for real, with Torch-Pruning's dependency graph.

A unit (neuron / channel) of a hidden layer is dead when

* it has no live outputs: every layer that reads it has all-zero weights for it, so removing it
  changes nothing; or
* it has no live inputs: its weight row is all zero, so it outputs a constant (its bias, passed
  through the elementwise layers after it: BatchNorm, activation, pooling). The constant's
  contribution is folded into the bias of the layers that read it, where that is exact (a Linear
  reader, or a convolution without zero padding; a padded convolution sees zeros at the border,
  so a non-zero constant there keeps the unit).

Torch-Pruning's ``DependencyGraph`` finds everything coupled to a unit (the next layer's input
columns, BatchNorm statistics, flatten index mapping, residual partners) and slices it. The
model keeps its function: tests check the outputs before and after.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def prunable_layers(gm: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, PRUNABLE) and getattr(m, "groups", 1) == 1}


def output_layers(gm: fx.GraphModule) -> set[str]:
    """Weighted layers whose output reaches a graph output without passing another weighted layer."""
    mods = dict(gm.named_modules())
    found: set[str] = set()
    seen: set[fx.Node] = set()
    stack = [a for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module" and _weighted(mods.get(n.target)):
            found.add(n.target)
            continue
        stack.extend(n.all_input_nodes)
    return found


def _weighted(m: nn.Module | None) -> bool:
    if m is None:
        return False
    if isinstance(m, PRUNABLE):
        return True
    return hasattr(m, "weight") and isinstance(getattr(m, "weight"), torch.Tensor) and not isinstance(m, nn.modules.batchnorm._NormBase)


@dataclass
class ShrinkResult:
    removed: dict[str, int] = field(default_factory=dict)  # layer -> units removed
    folded: int = 0  # units whose constant output went into a bias


def _probe(gm: nn.Module, example: tuple, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The input of every prunable layer on ``example``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in layers.items():
        hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].detach().clone())))
    try:
        with torch.no_grad():
            gm(*example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _build_dg(gm: nn.Module, example: tuple):
    import torch_pruning as tp

    for p in gm.parameters():  # Torch-Pruning follows the autograd graph
        p.requires_grad_(True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.enable_grad():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(gm, example_inputs=list(example) if len(example) > 1 else example[0])


_SAFE_OPS = ("_ElementWiseOp", "_ReshapeOp", "_FlattenIndexMapping")


def _classify(group, root: nn.Module):
    """Split a Torch-Pruning group into producers, readers and others; None if it holds a kind
    of layer whose slicing dropcli does not reason about."""
    producers, readers = [], []
    for dep, idxs in group:
        m = dep.target.module
        hname = getattr(dep.handler, "__name__", str(dep.handler))
        idxs = [int(i) for i in idxs]
        if isinstance(m, PRUNABLE):
            if hname == "prune_out_channels":
                producers.append((m, idxs))
            elif hname == "prune_in_channels":
                readers.append((m, idxs))
            else:
                return None
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        elif type(m).__name__ in _SAFE_OPS or isinstance(m, (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU,
                                                             nn.Softplus, nn.Identity, nn.Dropout, nn.Flatten,
                                                             nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                                                             nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.ReLU6,
                                                             nn.Hardtanh)):
            continue
        else:
            return None
    return producers, readers


def _cols(m: nn.Module, idxs: list[int]) -> torch.Tensor:
    return m.weight.detach()[:, idxs]


def _rows(m: nn.Module, idxs: list[int]) -> torch.Tensor:
    return m.weight.detach()[idxs]


def _fold(reader: nn.Module, idxs: list[int], x_in: torch.Tensor) -> bool:
    """Add the constant inputs ``x_in[:, idxs]`` times their weights to ``reader``'s bias.
    Returns False (nothing changed) when that would not be exact."""
    if isinstance(reader, nn.Linear):
        vals = x_in[:, idxs]
        if not torch.all(vals == vals[:1]):
            return False
        c = vals[0]
        if torch.all(c == 0):
            return True
        add = reader.weight.detach()[:, idxs] @ c
    else:
        vals = x_in[:, idxs]
        if not _per_channel_const(vals):
            return False
        c = vals[0].reshape(len(idxs), -1)[:, 0]  # one constant per channel
        if torch.all(c == 0):
            return True
        pads = reader.padding if isinstance(reader.padding, tuple) else (reader.padding,)
        if reader.padding == "same" or any(p != 0 for p in pads):
            return False
        w = reader.weight.detach()[:, idxs]
        add = (w.sum(dim=tuple(range(2, w.dim()))) * c).sum(1)
    with torch.no_grad():
        if reader.bias is None:
            reader.bias = nn.Parameter(torch.zeros(reader.weight.shape[0], dtype=reader.weight.dtype))
        reader.bias.add_(add)
    return True


def _per_channel_const(vals: torch.Tensor) -> bool:
    flat = vals.transpose(0, 1).reshape(vals.shape[1], -1)
    return bool(torch.all(flat == flat[:, :1]))


def shrink(gm: fx.GraphModule, example: tuple, protected: set[str] | None = None, max_rounds: int = 10) -> ShrinkResult:
    """Remove dead units of every prunable, non-output layer of ``gm`` (in place)."""
    import torch_pruning as tp

    protected = set(output_layers(gm) if protected is None else protected)
    result = ShrinkResult()
    # a probe batch with variety, so a unit that only looks constant on one input is not folded
    g = torch.Generator().manual_seed(1234)
    probe_x = tuple(torch.randn((8,) + tuple(t.shape[1:]), generator=g).to(t.dtype) if t.is_floating_point() else t for t in example)
    for _ in range(max_rounds):
        layers = prunable_layers(gm)
        names = {m: n for n, m in layers.items()}
        inputs = _probe(gm, probe_x, layers)
        dg = _build_dg(gm, probe_x)
        plan: list[tuple[nn.Module, list[int], list]] = []
        handled: set[nn.Module] = set()
        for name, m in layers.items():
            if name in protected or m in handled:
                continue
            n_out = m.weight.shape[0]
            dead, folds = [], []
            group_all = dg.get_pruning_group(m, tp.prune_linear_out_channels if isinstance(m, nn.Linear) else tp.prune_conv_out_channels,
                                             idxs=list(range(n_out)))
            kinds = _classify(group_all, m)
            if kinds is None:
                continue
            producers_all, _ = kinds
            if any(names.get(p) in protected for p, _ in producers_all):
                continue
            for p, _ in producers_all:
                handled.add(p)
            for j in range(n_out):
                grp = dg.get_pruning_group(m, tp.prune_linear_out_channels if isinstance(m, nn.Linear) else tp.prune_conv_out_channels,
                                           idxs=[j])
                kinds = _classify(grp, m)
                if kinds is None:
                    continue
                producers, readers = kinds
                if readers and all(torch.all(_cols(r, ix) == 0) for r, ix in readers):
                    dead.append(j)  # no live outputs
                elif all(torch.all(_rows(p, ix) == 0) for p, ix in producers):
                    folds.append((j, readers))  # no live inputs: constant output
            plan.append((m, dead, folds))
        changed = False
        for m, dead, folds in plan:
            remove = list(dead)
            for j, readers in folds:
                snapshot = [(r, r.bias.detach().clone() if r.bias is not None else None) for r, _ in readers]
                ok = all(_fold(r, ix, inputs[names[r]]) for r, ix in readers)
                if ok:
                    remove.append(j)
                    result.folded += 1
                else:  # undo partial folds
                    with torch.no_grad():
                        for r, b in snapshot:
                            if b is None:
                                r.bias = None
                            else:
                                r.bias.copy_(b)
            remove = sorted(set(remove))
            if not remove:
                continue
            if len(remove) == m.weight.shape[0]:
                from dropcli.errors import DropcliError

                raise DropcliError(f"pruning removes every unit of layer {names[m]}, so the model's output would not depend on its input",
                                   "prune less: raise --threshold, lower --kl-weight or use fewer --epochs")
            fn = tp.prune_linear_out_channels if isinstance(m, nn.Linear) else tp.prune_conv_out_channels
            grp = dg.get_pruning_group(m, fn, idxs=remove)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grp.prune()
            result.removed[names[m]] = result.removed.get(names[m], 0) + len(remove)
            changed = True
        if not changed:
            break
    gm.recompile()
    return result
