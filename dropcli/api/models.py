"""Models: load, save, the variant catalogue, inject and convert."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from dropcli.api.common import load_opts, resolve_model

Names = Optional[Sequence[str] | str]

# the variant parameters of `dropcli inject`, in the order its options list them
INJECT_PARAMS = ("block_size", "hole_size", "holes", "mask_per", "weight", "tie", "p_input", "p_hidden", "threshold",
                 "log_sigma2", "samples_z", "mc_form", "alpha", "beta")


def load(path: str | Path, *, trust_pickle: bool = False, imports: Optional[Sequence[str]] = None,
         arch: Optional[str] = None, input_shape: Optional[str] = None):
    """Load a model file (ONNX, TorchScript, torch.export .pt2, torch.save module or state_dict;
    ``-``: stdin). The format is detected from the content.

    ``trust_pickle`` allows unpickling a saved nn.Module (it runs code from the file), with
    ``imports`` (modules or .py files that define its classes); ``arch`` (``module:factory``)
    builds the model for a state_dict; ``input_shape`` (e.g. ``"1x64"``) when the model does
    not record it."""
    from dropcli.backends import load_model

    return load_model(str(path), **load_opts(trust_pickle, imports, arch, input_shape))


def save(model: Any, path: str | Path, format: Optional[str] = None) -> str:
    """Write ``model`` atomically (``format``: onnx, torchscript, export...; default: its own); the format written."""
    from dropcli.model import formats
    from dropcli.errors import UsageError

    if format is not None and format not in formats.ALL:
        raise UsageError(f"unknown --format {format!r}", f"choose one of {', '.join(formats.ALL)}")
    return model.save(str(path), format)


def variants(name: Optional[str] = None):
    """The catalogue as `dropcli variants --json` gives it: a list of dicts (``name``: one dict)."""
    from dropcli.variants import get_variant, load_all

    if name is not None:
        return get_variant(name).as_dict()
    return [s.as_dict() for _, s in sorted(load_all().items())]


def check_inject_args(variant: str = "standard", *, p: Optional[float] = None, replace: bool = False,
                      remove: bool = False, format: Optional[str] = None, **params: Any):
    """The option checks of `dropcli inject` (UsageError); (variant spec or None, resolved parameters)."""
    from dropcli.errors import UsageError
    from dropcli.model import formats

    if replace and remove:
        raise UsageError("--replace and --remove exclude each other", "choose one")
    if format is not None and format not in formats.ALL:
        raise UsageError(f"unknown --format {format!r}", f"choose one of {', '.join(formats.ALL)}")
    unknown = sorted(set(params) - set(INJECT_PARAMS))
    if unknown:
        raise UsageError(f"unknown variant parameter(s) {', '.join(unknown)}", f"known: p, {', '.join(INJECT_PARAMS)}")
    from dropcli.variants import get_variant

    spec = None if remove else get_variant(variant)
    given = {"p": p, **{k: params.get(k) for k in INJECT_PARAMS}}
    resolved = spec.resolve_params(given) if spec else {}
    if remove and any(v is not None for v in given.values()):
        raise UsageError("--remove takes no variant parameters")
    return spec, resolved


def inject_sites(model: Any, variant: str = "standard", *, p: Optional[float] = None, after: Names = None,
                 layers: Names = None, exclude: Names = None, allow_output: bool = False, replace: bool = False,
                 remove: bool = False, notes: Optional[list] = None, **params: Any) -> list[dict]:
    """:func:`inject` on a loaded model, in place; the sites it wrote (as `dropcli inject --json` lists them).
    ``notes`` (a list) receives what the default selection chose on the user's behalf."""
    from dropcli.backends.plan import FollowedByDropout, apply_inject, apply_replace, plan_existing, plan_inject
    from dropcli.errors import UsageError
    from dropcli.model.selection import Selection

    spec, resolved = check_inject_args(variant, p=p, replace=replace, remove=remove, **params)
    sel = Selection.from_options(after, layers, exclude, allow_output)
    if replace or remove:
        if sel.after:
            raise UsageError("--after does not apply with --replace/--remove", "narrow the dropout layers with --layers/--exclude")
        chosen = plan_existing(model, sel)
        return apply_replace(model, spec, resolved, chosen, inherit_p=replace and p is None)
    try:
        chosen = plan_inject(model, spec, sel, notes)
    except FollowedByDropout as e:  # the default selection on a model whose activations all have dropout
        if notes is not None:
            notes.append(e.note)
        return apply_replace(model, spec, resolved, e.dropouts, inherit_p=p is None)
    return apply_inject(model, spec, resolved, chosen)


def inject(model: Any, variant: str = "standard", *, p: Optional[float] = None, after: Names = None,
           layers: Names = None, exclude: Names = None, allow_output: bool = False, replace: bool = False,
           remove: bool = False, trust_pickle: bool = False, imports: Optional[Sequence[str]] = None,
           arch: Optional[str] = None, input_shape: Optional[str] = None, **params: Any):
    """A copy of ``model`` (a loaded model or a path) with dropout ``variant`` inserted after the
    selected layers (``after="relu"``, ``layers="fc*"``, ``exclude=...``), or the model's own
    dropout swapped for it (``replace=True``) or removed (``remove=True``). ``p`` is the drop
    probability; the variant's other parameters (``block_size``, ``hole_size``, ``mask_per``...)
    are keyword arguments as in `dropcli inject`. Save the result with ``dropcli.save``."""
    m, _ = resolve_model(model, load_opts(trust_pickle, imports, arch, input_shape), copy=True)
    inject_sites(m, variant, p=p, after=after, layers=layers, exclude=exclude, allow_output=allow_output,
                 replace=replace, remove=remove, **params)
    return m


def convert_sites(model: Any, to: str, *, layers: Names = None, exclude: Names = None, name: str = "") -> list[dict]:
    """:func:`convert` on a loaded model, in place; one row per converted site (as `dropcli convert --json`)."""
    from dropcli.backends.convert import apply_onnx, apply_torch, plan_onnx, plan_torch
    from dropcli.backends.plan import plan_existing
    from dropcli.errors import DropcliError, UsageError
    from dropcli.model.selection import Selection

    check_convert_args(to)
    sel = Selection.from_options(None, layers, exclude, True)
    try:
        drops = plan_existing(model, sel)
    except UsageError as e:
        raise DropcliError(f"{name or model.source} has no dropout sites to convert", "`dropcli inspect` shows what is there") from e
    if model.backend == "onnx":
        done = apply_onnx(model, plan_onnx(model, drops, to))
    else:
        done = apply_torch(model, plan_torch(model, drops, to))
    return [{"site": d.site, "weight": d.layer, "p": d.p, "from": d.frm, "to": d.to, "weight_factor": d.factor} for d in done]


def check_convert_args(to: str, format: Optional[str] = None) -> None:
    from dropcli.errors import UsageError
    from dropcli.model import formats

    if to not in ("inverted", "vanilla"):
        raise UsageError(f"unknown --to {to!r}", "choose inverted or vanilla")
    if format is not None and format not in formats.ALL:
        raise UsageError(f"unknown --format {format!r}", f"choose one of {', '.join(formats.ALL)}")


def convert(model: Any, to: str, *, layers: Names = None, exclude: Names = None, trust_pickle: bool = False,
            imports: Optional[Sequence[str]] = None, arch: Optional[str] = None, input_shape: Optional[str] = None):
    """A copy of ``model`` with its dropout sites in the ``to`` convention (``"vanilla"``: y = x*m,
    q*x at test; ``"inverted"``: x*m/q, identity at test); q moves into the next layer's weights."""
    m, name = resolve_model(model, load_opts(trust_pickle, imports, arch, input_shape), copy=True)
    convert_sites(m, to, layers=layers, exclude=exclude, name=name)
    return m


def inspect(model: Any, *, trust_pickle: bool = False, imports: Optional[Sequence[str]] = None,
            arch: Optional[str] = None, input_shape: Optional[str] = None) -> dict:
    """The model's layers, dropout and candidate sites, as `dropcli inspect --json` gives them."""
    from dropcli.backends.convert import convention_of

    m, _ = resolve_model(model, load_opts(trust_pickle, imports, arch, input_shape))
    layers = m.layers()
    return {
        "model": m.source,
        "backend": m.backend,
        "format": m.format,
        "parameters": sum(l.params for l in layers),
        "model_meta": dict(m.model_meta),  # e.g. the regression tau finetune learned
        "layers": [{**l.as_dict(), "sites": site_tags(l),
                    **({"convention": convention_of(l.dropout_variant, l.op) or "n/a"} if l.kind == "dropout" else {})}
                   for l in layers],
    }


def site_tags(layer: Any) -> list[str]:
    """Where a layer can take a site: input, after, residual, replace, rewrite:CLASS."""
    tags = []
    if layer.is_input:
        tags.append("input")
    elif layer.kind != "dropout" and not layer.is_output:
        tags.append("after")
    if layer.residual:
        tags.append("residual")
    if layer.kind == "dropout":
        tags.append("replace")
    if layer.layer_class:  # a layer that layer-rewriting variants (dropconnect, pooling dropout...) can replace
        tags.append(f"rewrite:{layer.layer_class}")
    return tags
