"""The MC runner for a model: the backend's runner, after an optional on-the-fly inject.

Every engine (this process, each Ray actor) builds its runner here, so they all sample the
same sites with the same code.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence


def make_runner(model: Any, device: str):
    """The MC runner of a loaded model (torch: :class:`TorchRunner`; ONNX: ``OnnxRunner``); a
    model saved with a fixed batch size gets a runner that fits it (:mod:`dropcli.engines.fixed`)."""
    from dropcli.engines.fixed import fit_batch

    return fit_batch(model, _backend_runner(model, device), lambda m: _backend_runner(m, device))


def _backend_runner(model: Any, device: str):
    if model.backend == "onnx":
        from dropcli.engines.onnx_mc import OnnxRunner

        return OnnxRunner(model, device)
    from dropcli.engines.runner import TorchRunner

    return TorchRunner(model, device)


def inject_on_the_fly(model: Any, variant: str, p: Optional[float] = None, after: Sequence[str] | str | None = None,
                      layers: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
                      allow_output: bool = False) -> tuple[str, dict, list[dict]]:
    """Insert ``variant`` sites into ``model`` in place (nothing is saved); (variant name, params, sites)."""
    from dropcli.backends.plan import apply_inject, plan_inject
    from dropcli.model.selection import Selection
    from dropcli.variants import get_variant

    spec = get_variant(variant)
    params = spec.resolve_params({"p": p})
    sel = Selection.from_options(after, layers, exclude, allow_output)
    done = apply_inject(model, spec, params, plan_inject(model, spec, sel))
    return spec.name, params, done


def refuse_per_pass(model: Any) -> None:
    """``dropcli uncertainty`` on a model with ``--mask-per pass`` weightdrop sites: a one-line
    error. Per-pass masks are one draw for a whole (tiled) batch: they cannot be keyed per example,
    and all T samples of an example in one chunk would share the mask."""
    from dropcli.errors import UsageError
    from dropcli.model.naming import PASS_MARK

    found = False
    if getattr(model, "backend", None) == "onnx":
        g = model.model.graph
        found = any(PASS_MARK in n.name for n in g.node) or any(PASS_MARK in i.name for i in g.initializer)
    else:
        gm = getattr(model, "gm", None)
        if gm is not None:
            found = any(name.split(".")[-1] == PASS_MARK for name, _ in gm.named_buffers())
    if found:
        raise UsageError("this model's weightdrop sites draw one mask per forward pass (--mask-per pass), which MC "
                         "sampling cannot key per example (every sample of a chunk would share it)",
                         "re-inject with --variant weightdrop --mask-per row (the default) for dropcli uncertainty")


def build_runner(model: Any, load_kw: dict | None, dev: str, inject_opts: dict | None,
                 on_inject: Callable[[str, dict, list[dict]], None] | None = None):
    """Load a model (a path, or an already loaded model) and its MC runner, injecting sites on
    the fly if asked (``inject_opts``: the keyword arguments of :func:`inject_on_the_fly`);
    ``on_inject(variant, params, sites)`` hears about the injection."""
    if isinstance(model, str):
        from dropcli.backends import load_model

        model = load_model(model, **(load_kw or {}))
    if inject_opts:
        done = inject_on_the_fly(model, **inject_opts)
        if on_inject is not None:
            on_inject(*done)
    refuse_per_pass(model)
    return make_runner(model, dev)
