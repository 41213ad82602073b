"""The wings as namespaces: ``ff.flow.cards``, ``ff.steer.themes``... import a wing's module on first use."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from types import ModuleType

__all__ = ["submodule_getattr"]


def submodule_getattr(package: str) -> tuple[Callable[[str], ModuleType], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose modules load when first named as attributes."""
    def names() -> list[str]:
        module = importlib.import_module(package)
        return sorted(info.name for info in pkgutil.iter_modules(module.__path__) if not info.name.startswith("_"))

    def getattr_(name: str) -> ModuleType:
        if name.startswith("_") or name not in names():
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return importlib.import_module(f"{package}.{name}")

    def dir_() -> list[str]:
        return names()

    return getattr_, dir_
