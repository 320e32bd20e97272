"""The catalogue of dropout variants (see shared docs, variants.md).

Each family module registers its specs on import; :func:`load_all` imports them all.
"""

from __future__ import annotations

import importlib

from dropcli.variants.base import REGISTRY, VariantSpec, get_variant, register  # noqa: F401

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

_loaded = False


def load_all() -> dict[str, VariantSpec]:
    global _loaded
    if not _loaded:
        for name in FAMILY_MODULES:
            importlib.import_module(name)
        _loaded = True
    return REGISTRY
