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
    "InvalidArgumentError": "tl_featureflow.errors",
    "BankError": "tl_featureflow.errors",
    "ModelMismatchError": "tl_featureflow.errors",
    "UnknownFeatureError": "tl_featureflow.errors",
    "CacheError": "tl_featureflow.errors",
    "MissingDependencyError": "tl_featureflow.errors",
    # names
    "Site": "tl_featureflow.refs",
    "SITES": "tl_featureflow.refs",
    "Key": "tl_featureflow.refs",
    "FeatureRef": "tl_featureflow.refs",
    "hook_name": "tl_featureflow.refs",
    "sae_hook_name": "tl_featureflow.refs",
    # model
    "FlowTransformer": "tl_featureflow.model",
    "FeatureCache": "tl_featureflow.model",
    "load_embedded_model": "tl_featureflow.embedded",
    "load_embedded_bank": "tl_featureflow.embedded",
    "cache_root": "tl_featureflow._files",
    # saes/
    "SAEBank": "tl_featureflow.saes.bank",
    "train_bank": "tl_featureflow.saes.training",
    # flow/
    "FlowTracer": "tl_featureflow.flow.tracer",
    "Matching": "tl_featureflow.flow.tracer",
    "Predecessors": "tl_featureflow.flow.tracer",
    "PAPER_THRESHOLDS": "tl_featureflow.flow.tracer",
    "FlowGraph": "tl_featureflow.flow.graph",
    "FlowNode": "tl_featureflow.flow.graph",
    "FlowEdge": "tl_featureflow.flow.graph",
    "FlowMap": "tl_featureflow.flow.flowmap",
    "LayerScores": "tl_featureflow.flow.origins",
    "Classification": "tl_featureflow.flow.origins",
    "LABELS": "tl_featureflow.flow.origins",
    "topk_cosine": "tl_featureflow.flow.matching",
    "permutation_match": "tl_featureflow.flow.matching",
    "fold_jumprelu_threshold": "tl_featureflow.flow.matching",
    "TopContexts": "tl_featureflow.flow.contexts",
    "collect_top_contexts": "tl_featureflow.flow.contexts",
    "feature_contexts": "tl_featureflow.flow.contexts",
    "FeatureCard": "tl_featureflow.flow.cards",
    "build_card": "tl_featureflow.flow.cards",
    # causal/
    "validate": "tl_featureflow.causal.experiment",
    "ValidationReport": "tl_featureflow.causal.results",
    # steer/
    "Steerer": "tl_featureflow.steer.steerer",
    "flow_coefficients": "tl_featureflow.steer.steerer",
    "steering_sweep": "tl_featureflow.steer.sweeps",
    "SteeringSweep": "tl_featureflow.steer.sweeps",
    "SweepSettings": "tl_featureflow.steer.sweeps",
    "OfflineJudge": "tl_featureflow.steer.judge",
    "steering_report_card": "tl_featureflow.steer.report_card",
    "ReportCard": "tl_featureflow.steer.report_card",
    "CardSettings": "tl_featureflow.steer.report_card",
    "probe_seeds": "tl_featureflow.steer.probe",
}

# Submodules reachable as attributes (``ff.plot.flow_graph(graph)``), imported on first use.
_SUBMODULES: dict[str, str] = {
    "plot": "tl_featureflow.viz.plot",
    "themes": "tl_featureflow.steer.themes",
    "evaluation": "tl_featureflow.steer.judge",
    "html_report": "tl_featureflow.viz.html",
}

__all__ = ["__version__", *_EXPORTS, *_SUBMODULES]

if TYPE_CHECKING:  # pragma: no cover
    from tl_featureflow._files import cache_root
    from tl_featureflow.causal.experiment import validate
    from tl_featureflow.causal.results import ValidationReport
    from tl_featureflow.embedded import load_embedded_bank, load_embedded_model
    from tl_featureflow.errors import (
        BankError,
        CacheError,
        FeatureFlowError,
        InvalidArgumentError,
        MissingDependencyError,
        ModelMismatchError,
        UnknownFeatureError,
    )
    from tl_featureflow.flow.cards import FeatureCard, build_card
    from tl_featureflow.flow.contexts import TopContexts, collect_top_contexts, feature_contexts
    from tl_featureflow.flow.flowmap import FlowMap
    from tl_featureflow.flow.graph import FlowEdge, FlowGraph, FlowNode
    from tl_featureflow.flow.matching import fold_jumprelu_threshold, permutation_match, topk_cosine
    from tl_featureflow.flow.origins import LABELS, Classification, LayerScores
    from tl_featureflow.flow.tracer import PAPER_THRESHOLDS, FlowTracer, Matching, Predecessors
    from tl_featureflow.model import FeatureCache, FlowTransformer
    from tl_featureflow.refs import SITES, FeatureRef, Key, Site, hook_name, sae_hook_name
    from tl_featureflow.saes.bank import SAEBank
    from tl_featureflow.saes.training import train_bank
    from tl_featureflow.steer import judge as evaluation
    from tl_featureflow.steer import themes
    from tl_featureflow.steer.judge import OfflineJudge
    from tl_featureflow.steer.probe import probe_seeds
    from tl_featureflow.steer.report_card import CardSettings, ReportCard, steering_report_card
    from tl_featureflow.steer.steerer import Steerer, flow_coefficients
    from tl_featureflow.steer.sweeps import SteeringSweep, SweepSettings, steering_sweep
    from tl_featureflow.viz import html as html_report
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
