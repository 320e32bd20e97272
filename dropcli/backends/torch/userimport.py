"""User code named on the command line: ``--import MODULE_OR_FILE`` (classes a pickle needs)
and ``--arch package.module:factory`` / ``file.py:factory`` (the model a state_dict fits)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from torch import nn

from dropcli.errors import DropcliError, UsageError


def import_user(spec: str) -> Any:
    """Import ``package.module`` or a ``path/to/file.py`` and return the module."""
    if spec.endswith(".py") or "/" in spec or Path(spec).exists():
        p = Path(spec)
        if not p.exists():
            raise DropcliError(f"--import file {spec} does not exist", "check the path")
        name = p.stem
        loaded = sys.modules.get(name)
        if loaded is not None and getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == p.resolve():
            return loaded  # already imported: re-running it would give its classes a second identity
        mod_spec = importlib.util.spec_from_file_location(name, p)
        if mod_spec is None or mod_spec.loader is None:
            raise DropcliError(f"cannot import {spec}", "give a .py file or an importable module name")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        sys.path.insert(0, str(p.resolve().parent))
        mod_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as e:
        raise DropcliError(f"cannot import {spec!r}: {e}", "check --import / --arch and PYTHONPATH") from e


def load_arch(arch: str) -> nn.Module:
    if ":" not in arch:
        raise UsageError(f"--arch {arch!r} must look like package.module:factory or file.py:factory")
    mod_name, _, attr = arch.rpartition(":")
    module = import_user(mod_name)
    factory = getattr(module, attr, None)
    if factory is None:
        raise DropcliError(f"--arch: {mod_name} has no attribute {attr!r}", "name a class or function that builds the model")
    model = factory()
    if not isinstance(model, nn.Module):
        raise DropcliError(f"--arch {arch} returned {type(model).__name__}, not an nn.Module")
    return model
