"""tl_featureflow: SAE feature flow across the layers of a TransformerLens model.

Trace where a sparse-autoencoder feature comes from and where it goes, check the
matches causally, and steer generation with it (arXiv 2502.03032).

>>> import tl_featureflow as ff
>>> ff.FeatureRef.parse("12/res/4230")
FeatureRef(layer=12, site='res', index=4230)

Imports are lazy: ``import tl_featureflow`` is fast; torch, TransformerLens and
SAELens load when a name that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: The public API (a tested constant: tests/test_architecture.py). Everything else is reached through the
#: wings' namespaces: ``ff.flow``, ``ff.causal``, ``ff.steer``, ``ff.viz``, ``ff.saes`` and ``ff.errors``.
_EXPORTS: dict[str, str] = {
    # errors (the rest: ff.errors)
    "FeatureFlowError": "tl_featureflow.errors",
    "InvalidArgumentError": "tl_featureflow.errors",
    "UnknownFeatureError": "tl_featureflow.errors",
    "CacheError": "tl_featureflow.errors",
    # names
    "Site": "tl_featureflow.refs",
    "FeatureRef": "tl_featureflow.refs",
    "hook_name": "tl_featureflow.refs",
    # the model
    "FlowTransformer": "tl_featureflow.model",
    "load_embedded_model": "tl_featureflow.embedded",
    "load_embedded_bank": "tl_featureflow.embedded",
    # saes/
    "SAEBank": "tl_featureflow.saes.bank",
    "train_bank": "tl_featureflow.saes.training",
    # flow/
    "FlowTracer": "tl_featureflow.flow.tracer",
    "Matching": "tl_featureflow.flow.tracer",
    "Predecessors": "tl_featureflow.flow.tracer",
    "FlowGraph": "tl_featureflow.flow.graph",
    "FlowMap": "tl_featureflow.flow.flowmap",
    "feature_contexts": "tl_featureflow.flow.contexts",
    # causal/
    "validate": "tl_featureflow.causal.experiment",
    "ValidationReport": "tl_featureflow.causal.results",
    # steer/
    "Steerer": "tl_featureflow.steer.steerer",
    "steering_sweep": "tl_featureflow.steer.sweeps",
    "SteeringSweep": "tl_featureflow.steer.sweeps",
    "steering_report_card": "tl_featureflow.steer.report_card",
}

# Submodules reachable as attributes (``ff.plot.flow_graph(graph)``, ``ff.flow.cards``), imported on first use.
_SUBMODULES: dict[str, str] = {
    "plot": "tl_featureflow.viz.plot",
    "errors": "tl_featureflow.errors",
    "saes": "tl_featureflow.saes",
    "flow": "tl_featureflow.flow",
    "causal": "tl_featureflow.causal",
    "steer": "tl_featureflow.steer",
    "viz": "tl_featureflow.viz",
    "model": "tl_featureflow.model",
    "embedded": "tl_featureflow.embedded",
}

__all__ = ["__version__", *_EXPORTS, *_SUBMODULES]

if TYPE_CHECKING:  # pragma: no cover
    from tl_featureflow import causal, embedded, errors, flow, model, saes, steer, viz
    from tl_featureflow.causal.experiment import validate
    from tl_featureflow.causal.results import ValidationReport
    from tl_featureflow.embedded import load_embedded_bank, load_embedded_model
    from tl_featureflow.errors import CacheError, FeatureFlowError, InvalidArgumentError, UnknownFeatureError
    from tl_featureflow.flow.contexts import feature_contexts
    from tl_featureflow.flow.flowmap import FlowMap
    from tl_featureflow.flow.graph import FlowGraph
    from tl_featureflow.flow.tracer import FlowTracer, Matching, Predecessors
    from tl_featureflow.model import FlowTransformer
    from tl_featureflow.refs import FeatureRef, Site, hook_name
    from tl_featureflow.saes.bank import SAEBank
    from tl_featureflow.saes.training import train_bank
    from tl_featureflow.steer.report_card import steering_report_card
    from tl_featureflow.steer.steerer import Steerer
    from tl_featureflow.steer.sweeps import SteeringSweep, steering_sweep
    from tl_featureflow.viz import plot


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
        globals()[name] = value
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tl_featureflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
