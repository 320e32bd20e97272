"""The registry of variant specs.

Each family module (:data:`FAMILY_MODULES`) builds its :class:`~dropcli.variants.base.VariantSpec`
objects and :func:`register` s them on import. :func:`get_variant` and :func:`load_all` import the
families the first time a spec is asked for, so importing the registry (or :mod:`dropcli.variants`)
costs no family imports, and no family imports the package that lists it.
"""

from __future__ import annotations

import importlib

from dropcli.errors import UsageError
from dropcli.variants.base import REPLACE, LayerSite, VariantSpec

FAMILY_MODULES = (
    "dropcli.variants.activation",
    "dropcli.variants.ranked",
    "dropcli.variants.blocks",
    "dropcli.variants.noise",
    "dropcli.variants.spatial",
    "dropcli.variants.pooling",
    "dropcli.variants.recurrent",
    "dropcli.variants.sparse_vd",
    "dropcli.variants.weight",
    "dropcli.variants.weightdrop",
    "dropcli.variants.fast",
)

REGISTRY: dict[str, VariantSpec] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def register(spec: VariantSpec) -> VariantSpec:
    if spec.name in REGISTRY:
        raise RuntimeError(f"variant {spec.name} registered twice")
    REGISTRY[spec.name] = spec
    for a in spec.aliases:
        _ALIASES[a] = spec.name
    if (spec.attaches == REPLACE) != bool(spec.replaces):
        raise RuntimeError(f"variant {spec.name}: a REPLACE variant names the layer classes it replaces, others none")
    if spec.attaches == REPLACE and spec.replacement is None and not issubclass(spec.torch_module, LayerSite):
        raise RuntimeError(f"variant {spec.name}: a REPLACE variant's torch module is a LayerSite")
    spec.torch_module.spec = spec
    return spec


def load_all() -> dict[str, VariantSpec]:
    """Every variant, by name (the families are imported on the first call)."""
    global _loaded
    if not _loaded:
        for name in FAMILY_MODULES:
            importlib.import_module(name)
        _loaded = True
    return REGISTRY


def get_variant(name: str) -> VariantSpec:
    load_all()
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in REGISTRY:
        raise UsageError(f"unknown variant {name!r}", f"known variants: {', '.join(sorted(REGISTRY))} (see `dropcli variants`)")
    return REGISTRY[key]
