"""dropcli: dropout for trained models (inject, uncertainty, prune).

The Python API (:mod:`dropcli.api`) is loaded on first use (PEP 562), so ``import dropcli``
stays light (no torch, no numpy)::

    import dropcli

    m = dropcli.load("examples/digits_mlp.onnx")
    m2 = dropcli.inject(m, "standard", p=0.1, after="relu")
    r = dropcli.uncertainty(m2, x, T=50)

Verbs: ``load``, ``save``, ``inspect``, ``inject``, ``uncertainty``, ``analyze``, ``prune``,
``finetune``, ``convert``, ``variants``. Two of them share their name with a subpackage
(:mod:`dropcli.prune`, :mod:`dropcli.variants`): ``dropcli.prune`` and ``dropcli.variants``
are the API functions when called, and the subpackages for everything else
(``dropcli.variants.get_variant``, ``import dropcli.prune.core``).
"""

import sys
import types

__version__ = "0.1.0"

_API = ("load", "save", "inspect", "inject", "uncertainty", "UncertaintyResult", "analyze", "prune", "finetune",
        "convert", "variants")
_SHARED = ("prune", "variants")  # API verbs that are also subpackages

__all__ = ["__version__", *_API]


def _api(name: str):
    import dropcli.api

    return getattr(dropcli.api, name)


def __getattr__(name: str):
    if name in _API:
        value = _api(name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dropcli' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))


class _Verb:
    """``dropcli.prune`` / ``dropcli.variants``: the API function when called, the subpackage of
    the same name for every attribute (``dropcli.variants.get_variant``)."""

    def __init__(self, name: str):
        self.__dict__["_name"] = name

    def __call__(self, *args, **kwargs):
        return _api(self._name)(*args, **kwargs)

    def _package(self):
        import importlib

        return importlib.import_module(f"{__name__}.{self._name}")

    def __getattr__(self, attr: str):
        import importlib

        if attr == "__doc__":
            return _api(self._name).__doc__
        pkg = self._package()
        try:
            return getattr(pkg, attr)
        except AttributeError:
            if attr.startswith("__"):
                raise
            return importlib.import_module(f"{pkg.__name__}.{attr}")

    def __setattr__(self, attr: str, value) -> None:
        setattr(self._package(), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(self._package(), attr)

    def __dir__(self):
        return dir(self._package())

    def __repr__(self) -> str:
        return f"<dropcli.{self._name}: the API function, and the package dropcli.{self._name}>"


class _Package(types.ModuleType):
    """The ``dropcli`` module: keeps ``prune`` and ``variants`` callable after their subpackages
    are imported (the import system sets the subpackage as an attribute of its parent)."""


def _shared(name: str) -> property:
    verb = _Verb(name)
    return property(lambda self: verb, lambda self, value: None, doc=f"dropcli.{name}")


for _n in _SHARED:
    setattr(_Package, _n, _shared(_n))
sys.modules[__name__].__class__ = _Package
del _n
