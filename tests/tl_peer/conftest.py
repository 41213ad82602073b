"""TransformerLens's own tests of config-built HookedTransformers, run on FlowTransformer (a peer suite, issue 24).

Each ``test_*.py`` here is a copy of a TransformerLens test file (MIT, Copyright (c) 2022 TransformerLensOrg;
its docstring says which file, at which tag) that builds ``HookedTransformer`` from a config, with no hub
download. The autouse, module-scoped ``tl_class`` fixture runs each module three times, with the module's
name ``HookedTransformer`` bound to

- ``HookedTransformer``: TransformerLens's class itself, the reference (it shows each test is right here);
- ``FlowTransformer-views``: ``FlowTransformer(cfg, fast_path="views")``;
- ``FlowTransformer-exact``: ``FlowTransformer(cfg, fast_path="exact")``;

so the three pass lists must be equal. The edits to TransformerLens's test bodies are listed in each module's
docstring (tests dropped, and why; a fixture made to depend on ``tl_class``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from transformer_lens import HookedTransformer

from tl_featureflow import FlowTransformer

KINDS: dict[str, str | None] = {"HookedTransformer": None, "FlowTransformer-views": "views",
                                "FlowTransformer-exact": "exact"}

# TransformerLens tests that put hooks on a model of their own with ``HookPoint.add_hook`` and leave them there
# (the model is dropped with the test); the repo's no-hooks-left-behind guard would fail them on TransformerLens
# itself, so the models they built are reset before the guard looks. Every other test keeps the strict guard.
LEAVES_HOOKS_BY_DESIGN = {"test_manual_hooks"}  # test_start_at_layer.py, test_stop_at_layer.py

_BUILT: list[HookedTransformer] = []  # the models the current test built (held until it ends)


def _builder(mode: str | None) -> Callable[..., HookedTransformer]:
    def build(*args: Any, **kwargs: Any) -> HookedTransformer:
        if mode is None:
            model = HookedTransformer(*args, **kwargs)
        else:
            with warnings.catch_warnings():
                # configs with split Q/K/V inputs keep TransformerLens's attention: FlowTransformer says so once
                warnings.filterwarnings("ignore", "fast path: these components keep", UserWarning)
                model = FlowTransformer(*args, fast_path=mode, **kwargs)
            assert model.fast_path.enabled and model.fast_path.mode == mode and model.fast_path.unembed
        _BUILT.append(model)
        return model

    build.__name__ = "HookedTransformer" if mode is None else f"FlowTransformer_{mode}"
    return build


@pytest.fixture(scope="module", params=list(KINDS), autouse=True)
def tl_class(request: pytest.FixtureRequest) -> Iterator[Callable[..., HookedTransformer]]:
    """The class the module's tests build their models with (bound to the module's name ``HookedTransformer``)."""
    build = _builder(KINDS[request.param])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(request.module, "HookedTransformer", build)
        yield build


@pytest.fixture(autouse=True)
def reset_hooks_left_by_design(request: pytest.FixtureRequest, no_hooks_left_behind: None) -> Iterator[None]:
    """Tears down before the repo's guard: resets the models of the tests in :data:`LEAVES_HOOKS_BY_DESIGN`."""
    _BUILT.clear()
    yield
    if request.node.originalname in LEAVES_HOOKS_BY_DESIGN:
        for model in _BUILT:
            model.reset_hooks()
    _BUILT.clear()
