"""Weights saved as safetensors: a Hugging Face checkpoint folder, or a bare safetensors file.

* A checkpoint folder (``save_pretrained``: ``config.json`` naming the architecture, weights in
  ``model.safetensors`` or shards with an index) is built with transformers' own class for
  that architecture, from the folder alone (``local_files_only``: nothing is downloaded; custom
  code from the folder is never run). Only safetensors weights are read unless the user passes
  ``--trust-pickle`` (a ``pytorch_model.bin`` is a pickle).
* A bare safetensors file holds a state_dict: like a ``torch.save`` state_dict it needs
  ``--arch`` for the module that receives it. safetensors files hold tensors only, so reading one
  runs no code.

The model is captured with ``torch.export`` with keyword inputs named as its forward names them
(``input_ids``, ``attention_mask``, ``pixel_values``...), so what dropcli writes is called the
same way.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dropcli.errors import DropcliError, UsageError
from dropcli.model.formats import hub_folder
from dropcli.model.quiet import quiet, short_error

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise DropcliError("this is a Hugging Face checkpoint folder, and building its model needs transformers",
                           "pip install transformers (or export the model to ONNX or .pt2 and pass that)") from e
    return transformers


def load_checkpoint(path: Path, trust_pickle: bool = False) -> nn.Module:
    """The model of a checkpoint folder (or of the safetensors file inside one), in eval mode."""
    folder = hub_folder(path)
    assert folder is not None
    transformers = _transformers()
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DropcliError(f"cannot read {folder / 'config.json'}: {short_error(e)}", "check that the checkpoint is complete") from e
    archs = cfg.get("architectures") or []
    if not archs:
        raise DropcliError(f"{folder / 'config.json'} names no architecture ('architectures' is empty)",
                           "save the model with save_pretrained from its task class (e.g. BertForSequenceClassification)")
    cls = getattr(transformers, archs[0], None)
    if cls is None:
        raise DropcliError(f"config.json names the architecture {archs[0]}, which transformers "
                           f"{transformers.__version__} does not have (custom code is never run)",
                           "export the model to ONNX or .pt2 where its code is available, and pass that")
    safe = any((folder / f).exists() for f in WEIGHT_FILES)
    if not safe and not trust_pickle:
        raise DropcliError(f"{folder} holds its weights as a pickle ({', '.join(f for f in PICKLE_WEIGHTS if (folder / f).exists())}); "
                           "unpickling runs arbitrary code from the file",
                           "load it only if you trust its source, with --trust-pickle, or re-save it with "
                           "save_pretrained(..., safe_serialization=True)")
    try:
        with quiet(), contextlib.redirect_stderr(io.StringIO()):
            model = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=safe,
                                        trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise DropcliError(f"transformers cannot build {archs[0]} from {folder}: {short_error(e)}",
                           "check that the checkpoint is complete (config.json and its weights)") from e
    if getattr(model.config, "use_cache", None):
        # a decoder returns its key/value cache beside the logits: MC dropout runs whole sequences,
        # and the cache object is not a tensor output torch.export can carry
        model.config.use_cache = False
    return model.eval()


def load_safetensors(path: Path, model: nn.Module, arch: str) -> None:
    """A bare safetensors state_dict into ``model`` (built by ``--arch``)."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise DropcliError(f"{path} is a safetensors file, and reading it needs the safetensors package",
                           "pip install safetensors") from e
    try:
        sd = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001
        raise DropcliError(f"cannot read safetensors file {path}: {short_error(e)}", "check that the file is complete") from e
    try:
        model.load_state_dict(sd)
    except Exception as e:  # noqa: BLE001
        raise DropcliError(f"safetensors file {path} does not fit --arch {arch}: {short_error(e)}",
                           "check that --arch builds the same model") from e


def input_names(model: nn.Module, available: Sequence[str] = ()) -> list[str]:
    """The inputs to feed a transformers model, in its forward's order: those of ``available``
    (the data's array names) that forward takes, else its main input (plus the attention mask
    for token ids)."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    chosen = [p for p in params if p in set(available)]
    if chosen:
        return chosen
    main = getattr(model, "main_input_name", None) or (params[0] if params else "input_ids")
    return [main] + (["attention_mask"] if main == "input_ids" and "attention_mask" in params else [])


def default_example(model: nn.Module, names: Sequence[str]) -> tuple | None:
    """An example input for ``names`` from the model's config: token ids and masks [2, 8], images
    [2, channels, size, size]; None when the config does not say (audio lengths, say)."""
    cfg = getattr(model, "config", None)
    out = []
    for name in names:
        if name in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
            out.append(torch.ones(2, 8, dtype=torch.long))
        elif name == "pixel_values" and cfg is not None and getattr(cfg, "image_size", None):
            size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
            out.append(torch.zeros(2, int(getattr(cfg, "num_channels", 3)), int(size), int(size)))
        else:
            return None
    return tuple(out)


def capture(model: nn.Module, names: Sequence[str], example: tuple):
    """``model`` captured with ``torch.export`` on keyword inputs ``names`` (batch dynamic, and every
    dimension of an integer input): the ``torch.fx.GraphModule`` of the program."""
    dyn = {n: ({d: torch.export.Dim.AUTO for d in range(t.dim())} if not t.is_floating_point() else {0: torch.export.Dim.AUTO})
           for n, t in zip(names, example)}
    kwargs = dict(zip(names, example))
    with torch.no_grad(), quiet(), contextlib.redirect_stderr(io.StringIO()):
        ep = torch.export.export(model, (), kwargs=kwargs, dynamic_shapes=dyn, strict=False)
    return ep.module()


def need_example(path: Path, names: Sequence[str]) -> UsageError:
    return UsageError(f"cannot tell the input shape of {path} (inputs: {', '.join(names)})",
                      "pass the verb's data (--input/--data, arrays named after the inputs), or --input-shape "
                      "(e.g. 1x16000 for audio samples)")
