"""The wings as namespaces: ``ff.flow.cards``, ``ff.steer.themes``... import a wing's module on first use."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

__all__ = ["submodule_getattr"]


def submodule_getattr(package: str, exports: dict[str, str] | None = None,
                      ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose modules load when first named as attributes.

    ``exports``: names served from a module of the package, ``{"ValidationSettings": "experiment"}``
    (``ff.causal.ValidationSettings``), imported on first use as well."""
    exports = dict(exports or {})
    def names() -> list[str]:
        module = importlib.import_module(package)
        return sorted(info.name for info in pkgutil.iter_modules(module.__path__) if not info.name.startswith("_"))

    def getattr_(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        if name.startswith("_") or name not in names():
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return importlib.import_module(f"{package}.{name}")

    def dir_() -> list[str]:
        return sorted([*names(), *exports])

    return getattr_, dir_
