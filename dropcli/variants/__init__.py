"""The catalogue of dropout variants (the math: docs/variants.md).

Each family module registers its specs on import (:mod:`dropcli.variants.registry`);
:func:`load_all` imports them all.
"""

from __future__ import annotations

from dropcli.variants.base import VariantSpec
from dropcli.variants.registry import FAMILY_MODULES, REGISTRY, get_variant, load_all, register

__all__ = ["FAMILY_MODULES", "REGISTRY", "VariantSpec", "get_variant", "load_all", "register"]
