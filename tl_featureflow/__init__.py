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

_EXPORTS: dict[str, str] = {
    # errors
    "FeatureFlowError": "tl_featureflow.errors",
    "BankError": "tl_featureflow.errors",
    "ModelMismatchError": "tl_featureflow.errors",
    "UnknownFeatureError": "tl_featureflow.errors",
    "CacheError": "tl_featureflow.errors",
    "MissingDependencyError": "tl_featureflow.errors",
    # names
    "Site": "tl_featureflow.refs",
    "SITES": "tl_featureflow.refs",
    "FeatureRef": "tl_featureflow.refs",
    "hook_name": "tl_featureflow.refs",
    "sae_hook_name": "tl_featureflow.refs",
    # SAEs and model
    "SAEBank": "tl_featureflow.bank",
    "FlowTransformer": "tl_featureflow.model",
    "FeatureCache": "tl_featureflow.model",
    "load_embedded_model": "tl_featureflow.embedded",
    # tracing
    "FlowTracer": "tl_featureflow.tracer",
    "Matching": "tl_featureflow.tracer",
    "Predecessors": "tl_featureflow.tracer",
    "PAPER_THRESHOLDS": "tl_featureflow.tracer",
    "FlowGraph": "tl_featureflow.graph",
    "FlowNode": "tl_featureflow.graph",
    "FlowEdge": "tl_featureflow.graph",
    "FlowMap": "tl_featureflow.graph",
    "LayerScores": "tl_featureflow.groups",
    "Classification": "tl_featureflow.groups",
    "LABELS": "tl_featureflow.groups",
    "topk_cosine": "tl_featureflow.matching",
    "TopContexts": "tl_featureflow.contexts",
    "ValidationReport": "tl_featureflow.report",
    "collect_top_contexts": "tl_featureflow.contexts",
    "permutation_match": "tl_featureflow.matching",
    "fold_jumprelu_threshold": "tl_featureflow.matching",
    "cache_root": "tl_featureflow.embedded",
    "load_embedded_bank": "tl_featureflow.embedded",
    "train_bank": "tl_featureflow.training",
    # steering
    "Steerer": "tl_featureflow.steering",
    "flow_coefficients": "tl_featureflow.steering",
    "steering_sweep": "tl_featureflow.sweeps",
    "SteeringSweep": "tl_featureflow.sweeps",
    "OfflineJudge": "tl_featureflow.evaluation",
}

# Submodules reachable as attributes (``ff.plot.flow_graph(graph)``), imported on first use.
_SUBMODULES = ("plot", "themes", "evaluation", "html_report")

__all__ = ["__version__", *_EXPORTS, *_SUBMODULES]

if TYPE_CHECKING:  # pragma: no cover
    from tl_featureflow.bank import SAEBank
    from tl_featureflow.contexts import TopContexts, collect_top_contexts
    from tl_featureflow.report import ValidationReport
    from tl_featureflow.embedded import cache_root, load_embedded_bank, load_embedded_model
    from tl_featureflow.training import train_bank
    from tl_featureflow.evaluation import OfflineJudge
    from tl_featureflow.steering import Steerer, flow_coefficients
    from tl_featureflow.sweeps import SteeringSweep, steering_sweep
    from tl_featureflow.errors import (
        BankError,
        CacheError,
        FeatureFlowError,
        MissingDependencyError,
        ModelMismatchError,
        UnknownFeatureError,
    )
    from tl_featureflow.graph import FlowEdge, FlowGraph, FlowMap, FlowNode
    from tl_featureflow.groups import LABELS, Classification, LayerScores
    from tl_featureflow.matching import fold_jumprelu_threshold, permutation_match, topk_cosine
    from tl_featureflow.model import FeatureCache, FlowTransformer
    from tl_featureflow.tracer import PAPER_THRESHOLDS, FlowTracer, Matching, Predecessors
    from tl_featureflow.refs import SITES, FeatureRef, Site, hook_name, sae_hook_name
    from tl_featureflow import evaluation, html_report, plot, themes


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f"tl_featureflow.{name}")
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
