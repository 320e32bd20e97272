"""Learned dropout rates: ``dropcli.finetune`` (and `dropcli finetune`, which renders it)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from dropcli.api.common import is_path, load_opts

Names = Optional[Sequence[str] | str]


def check_finetune_args(**kw: Any) -> str:
    """The option checks of `dropcli finetune` (UsageError); the resolved ``device``."""
    from dropcli.training.finetune import check_args
    from dropcli.api.common import resolve_device

    check_args(**kw)
    return resolve_device(kw.get("device", "cpu"))


def finetune(model: Any, data: str, output: str, *, variant: str, val: Optional[str] = None, after: Names = None,
             layers: Names = None, exclude: Names = None, p: Optional[float] = None, train: str = "rates",
             per_weight: bool = False, epochs: Optional[int] = None, lr: Optional[float] = None,
             length_scale: Optional[float] = None, tau: Optional[float] = None, batch_size: Optional[int] = None,
             task: str = "auto", samples: Optional[int] = None, device: str = "cpu", seed: int = 0, force: bool = False,
             trust_pickle: bool = False, imports: Optional[Sequence[str]] = None, arch: Optional[str] = None,
             input_shape: Optional[str] = None, progress: Callable | None = None, select: str = "val",
             calibrate: bool = False) -> dict:
    """Learn the dropout rates of ``model`` (a path or a loaded model) on ``data`` (a path: .npz
    with x and y, .pt, .csv) with concrete dropout (``variant="concrete"``) or variational
    dropout (``"variational"``), and write the model with the learned rates to ``output`` in the
    input's format. ``train="all"`` fine-tunes the weights too. ``select="val"`` (default) scales
    the ELBO's rates by the factor with the best validation MC NLL (``"elbo"``: keep them);
    ``calibrate=True`` fits a softmax temperature on the validation MC predictive and stores it in
    the model, for `dropcli uncertainty`. Returns the report of `dropcli finetune --json`
    ({"summary", "sites", and with select="val" "selection": the validation curve})."""
    from dropcli.api.common import copy_model
    from dropcli.io.files import check_output_path
    from dropcli.training.finetune import DEFAULTS, run

    def pick(v: Any, key: str) -> Any:
        return DEFAULTS[key] if v is None else v

    args = dict(variant=variant, train_what=train, per_weight=per_weight, epochs=pick(epochs, "epochs"),
                batch_size=pick(batch_size, "batch_size"), samples=pick(samples, "samples"), lr=pick(lr, "lr"),
                length_scale=pick(length_scale, "length_scale"), tau=tau, p=p, select=select)
    dev = check_finetune_args(**args, device=device)
    inputs = [str(model) if is_path(model) else getattr(model, "source", None)] + [x for x in (data, val) if x]
    check_output_path(output, inputs, force=force)
    src = str(model) if is_path(model) else copy_model(model)
    return run(src, output, data=str(data), val=str(val) if val else None, after=after, layers=layers, exclude=exclude,
               task=task, device=dev, seed=seed, quiet=progress is None, progress=progress,
               load=load_opts(trust_pickle, imports, arch, input_shape, example_data=data), calibrate=calibrate, **args)
