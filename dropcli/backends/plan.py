"""Backend-agnostic planning: which layers a variant may attach to, and applying a plan."""

from __future__ import annotations

from typing import Any, Sequence

from dropcli.errors import UsageError
from dropcli.model.selection import Layer, Selection, select
from dropcli.variants.base import AFTER, INPUT, REPLACE, RESIDUAL, VariantSpec


def candidates(layers: Sequence[Layer], spec: VariantSpec, model: Any = None) -> list[Layer]:
    if spec.attaches == REPLACE:
        if spec.replacement is not None:  # a variant with its own finder (the recurrent family)
            return model.replaceable(spec)
        return [l for l in layers if l.layer_class in spec.replaces]
    if spec.attaches == INPUT:
        return [l for l in layers if l.is_input]
    if spec.attaches == RESIDUAL:
        return [l for l in layers if l.residual]
    return [l for l in layers if not l.is_input and l.kind != "dropout"]


def default_after(spec: VariantSpec) -> tuple[str, ...]:
    if spec.attaches == REPLACE:  # every layer it can rewrite (minus the output layer)
        return spec.replacement.kinds if spec.replacement is not None else ()
    if spec.attaches == INPUT:
        return ("input",)
    if spec.attaches == RESIDUAL:
        return ("add",)
    return spec.default_after


# where the default selection puts sites in a model with no activation outside its output layer
# (LSTM/GRU text classifiers, embedding + pooling models): after the recurrent layers, else after
# the embeddings -- dropout on the non-recurrent connections (Zaremba et al. 2014)
FALLBACK_AFTER = (("lstm", "gru", "rnn"), ("embedding",))


def plan_inject(model: Any, spec: VariantSpec, sel: Selection, notes: list[str] | None = None) -> list[Layer]:
    """The layers ``spec`` goes after (or on, or replaces). With the default selection of an
    AFTER variant it also falls back to recurrent / embedding outputs when the model has no
    activation, and skips layers already followed by dropout; each such choice is described in
    ``notes`` (for the log)."""
    layers = model.layers()
    cands = candidates(layers, spec, model)
    replaced = " or ".join(_LAYER_WORDS.get(c, c) for c in spec.replaces) + " layer"
    if not cands:
        what = {INPUT: "model input", RESIDUAL: "residual add", REPLACE: replaced}.get(spec.attaches, "layer")
        raise UsageError(f"the model has no {what} where {spec.name} can go", "see `dropcli inspect` for its layers")
    what = {INPUT: "input", RESIDUAL: "residual add", REPLACE: replaced}.get(spec.attaches, "layer")
    notes = notes if notes is not None else []
    if sel.explicit or spec.attaches != AFTER:
        return select(cands, sel, default_after(spec), what=what)
    after = default_after(spec)
    try:
        chosen = select(cands, sel, after, what=what)
    except UsageError as first:
        chosen = []
        for kinds in FALLBACK_AFTER if tuple(after) == ("activation",) else ():
            try:
                chosen = select(cands, sel, kinds, what=what)
            except UsageError:
                continue
            notes.append(f"the model has no activation outside its output layer: the default selection puts "
                         f"{spec.name} after its {'/'.join(sorted({l.kind for l in chosen}))} layers instead "
                         f"(choose others with --after/--layers)")
            break
        if not chosen:
            raise first
    in_recurrence = getattr(model, "in_recurrence", None)
    if in_recurrence is not None:
        inside = in_recurrence(chosen)
        if inside:
            skip = {id(l) for l in inside}
            chosen = [l for l in chosen if id(l) not in skip]
            shown = ", ".join(l.name for l in inside[:4]) + (f" ... ({len(inside)} in all)" if len(inside) > 4 else "")
            if not chosen:
                raise UsageError(f"every layer the default selection matches is inside an unrolled recurrence ({shown}), "
                                 "where dropout would resample the recurrent state at every step",
                                 "choose layers with --after/--layers, or use a recurrent variant on the model's RNN layers")
            notes.append(f"skipped {len(inside)} layer(s) inside an unrolled recurrence ({shown}): dropout there would "
                         "resample the recurrent state at every step; sites go on the non-recurrent connections")
    after_drop = getattr(model, "dropout_after", None)
    if after_drop is not None:
        follow = {id(l): after_drop(l) for l in chosen}
        before = [l for l in chosen if follow[id(l)]]
        if before:
            chosen = [l for l in chosen if not follow[id(l)]]
            shown = ", ".join(l.name for l in before[:4]) + (f" ... ({len(before)} in all)" if len(before) > 4 else "")
            if not chosen:
                refs = {r for l in before for r in follow[id(l)]}
                drops = [l for l in layers if l.kind == "dropout" and l.dropout_variant == "dropout" and l.ref in refs]
                if len(drops) != len(refs):
                    raise UsageError(f"every layer the default selection matches is already followed by dropout ({shown})",
                                     f"swap that dropout for {spec.name} with --replace, or choose layers with --after/--layers")
                raise FollowedByDropout(drops, f"every layer the default selection matches is already followed by dropout "
                                               f"({shown}): that dropout is swapped for {spec.name} instead (as --replace "
                                               f"does; each keeps its p unless --p is given)")
            notes.append(f"skipped {len(before)} layer(s) already followed by dropout ({shown}); "
                         f"--replace swaps that dropout for {spec.name}")
    return chosen


class FollowedByDropout(UsageError):
    """The default selection found only layers already followed by the model's own dropout:
    ``dropouts`` are those dropout layers (the caller swaps them, as ``--replace`` does)."""

    def __init__(self, dropouts: list[Layer], note: str):
        super().__init__(note.split(":")[0], "swap that dropout with --replace, or choose layers with --after/--layers")
        self.dropouts = dropouts
        self.note = note


_LAYER_WORDS = {"linear": "Linear", "conv": "Conv", "maxpool": "max-pooling", "avgpool": "average-pooling",
                "lstm": "LSTM", "gru": "GRU"}


def plan_existing(model: Any, sel: Selection, include_sites: bool = True) -> list[Layer]:
    """The dropout already in the model (stock dropout and dropcli's own sites), narrowed by --layers/--exclude."""
    layers = model.layers()
    drops = [l for l in layers if l.kind == "dropout" and (include_sites or l.dropout_variant == "dropout")]
    if not drops:
        raise UsageError(
            "the model has no dropout to replace or remove",
            "inject new sites instead (drop --replace/--remove); `dropcli inspect` shows what is there",
        )
    narrowed = Selection(after=[], layers=sel.layers, exclude=sel.exclude, allow_output=True)
    return select(drops, narrowed, ("dropout",), what="dropout layer")


def apply_inject(model: Any, spec: VariantSpec, params: dict[str, Any], chosen: Sequence[Layer]) -> list[dict]:
    done = []
    base = model._site_count
    position = {id(l): k for k, l in enumerate(chosen)}
    for layer in ordered(model, chosen):
        model._site_count = base + position[id(layer)]  # number sites in model order, whatever the rewrite order
        site = model.insert(layer, spec, params)
        done.append({"site": site, "at": layer.name, "kind": layer.kind, "variant": spec.name, **params})
    model._site_count = base + len(chosen)
    finalize(model)
    return list(reversed(done)) if model.backend == "onnx" else done


def apply_replace(
    model: Any, spec: VariantSpec | None, params: dict[str, Any], chosen: Sequence[Layer], inherit_p: bool = False,
) -> list[dict]:
    """Swap (or remove, ``spec`` None) existing dropout. With ``inherit_p`` (no --p given) each
    new site keeps the drop probability of the dropout it replaces."""
    done = []
    for layer in ordered(model, chosen):
        layer_params = params
        if spec is not None and inherit_p and layer.dropout_p is not None:
            p_param = next((p for p in spec.params if p.name == "p"), None)
            if p_param is not None:
                layer_params = {**params, "p": p_param.validate(layer.dropout_p, spec.name)}
        site = model.replace_dropout(layer, spec, layer_params)
        done.append({"site": site, "at": layer.name, "was_p": layer.dropout_p,
                     "variant": spec.name if spec else None, **(layer_params if spec else {})})
    finalize(model)
    return list(reversed(done)) if model.backend == "onnx" else done


def ordered(model: Any, chosen: Sequence[Layer]) -> list[Layer]:
    """The order to rewrite ``chosen`` in (ONNX: from the back, so earlier node indices stay valid)."""
    if model.backend != "onnx":
        return list(chosen)
    # ONNX refs are node indices: rewrite from the back so earlier indices stay valid; inputs last.
    def key(l: Layer):
        kind, ref = l.ref
        return (0, 0) if kind == "input" else (1, ref)

    return sorted(chosen, key=key, reverse=True)


def finalize(model: Any) -> None:
    """Let the backend check and tidy the rewritten model (ONNX: drop an unused switch, check)."""
    fin = getattr(model, "finalize", None)
    if fin is not None:
        fin()
