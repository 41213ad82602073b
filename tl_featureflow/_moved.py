"""Deprecated module paths of tl_featureflow 0.1 (before the wings), still importable.

The package was 26 flat modules; they now live in ``saes/``, ``flow/``, ``causal/``,
``steer/`` and ``viz/``. ``import tl_featureflow.steering`` (or ``from
tl_featureflow.validation import validate``) keeps working in old notebooks: it
returns the module's new home (or a merge of its new homes) and warns once with a
DeprecationWarning naming the new path. The public names ``ff.X`` never moved.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

__all__ = ["MOVED", "install"]

# old module -> its new home(s); a module split in two is served as a merge of both.
MOVED: dict[str, tuple[str, ...]] = {
    "bank": ("saes.bank",),
    "training": ("saes.training",),
    "corpus": ("saes.corpus",),
    "quality": ("saes.quality",),
    "matching": ("flow.matching",),
    "tracer": ("flow.tracer",),
    "graph": ("flow.graph", "flow.flowmap"),
    "groups": ("flow.origins",),
    "contexts": ("flow.contexts",),
    "validation": ("causal.interventions", "causal.experiment"),
    "report": ("causal.results",),
    "steering": ("steer.steerer",),
    "sweeps": ("steer.sweeps",),
    "evaluation": ("steer.judge",),
    "themes": ("steer.themes",),
    "plot": ("viz.plot",),
    "html_report": ("viz.html",),
}
_PREFIX = "tl_featureflow."


def _resolve(old: str) -> types.ModuleType:
    homes = [importlib.import_module(_PREFIX + new) for new in MOVED[old]]
    if len(homes) == 1:
        return homes[0]
    merged = types.ModuleType(_PREFIX + old, f"Deprecated: merged from {', '.join(h.__name__ for h in homes)}.")
    for home in homes:
        merged.__dict__.update({k: v for k, v in vars(home).items() if not k.startswith("__")})
    return merged


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        old = spec.name.removeprefix(_PREFIX)
        new = " and ".join(_PREFIX + n for n in MOVED[old])
        warnings.warn(f"{spec.name} moved to {new}; import it from there (or use tl_featureflow.X)",
                      DeprecationWarning, stacklevel=2)
        return _resolve(old)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith(_PREFIX) and fullname.removeprefix(_PREFIX) in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _Loader())
        return None


def install() -> None:
    """Put the finder of old module paths on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
