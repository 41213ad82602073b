"""Seed selection, the demo's and reusable: a theme's best feature whose flow graph is big enough.

:func:`pick_seed` ranks a theme's candidate features (:func:`~tl_featureflow.steer.themes.theme_features`),
optionally re-ranks them by a steering probe, and returns the first whose flow graph has enough
features; :func:`seed_layer` is the res layer in the middle of a bank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tl_featureflow.errors import BankError
from tl_featureflow.refs import FeatureRef
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.steer.themes import feature_activations, theme_features

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["seed_layer", "pick_seed"]


def seed_layer(bank: SAEBank) -> int:
    """The res layer in the middle of the bank's span (the paper's seeds sit mid-model; never the embedding)."""
    layers = [layer for layer in bank.layers if ("res", layer) in bank and layer >= 0]
    if not layers:
        raise BankError(f"the bank has no res SAE: {bank.describe()}")
    return layers[(len(layers) - 1) // 2]


def pick_seed(model: HookedTransformer, bank: SAEBank, tracer: Any, theme: Any, layer: int, *, min_nodes: int = 3,
              judge: Any = None, probe_samples: int = 0, probe_strength: float = 4.0,
              progress: bool = False) -> tuple[dict[str, Any], Any]:
    """The theme's best feature at ``layer`` whose flow graph has at least ``min_nodes`` features.

    Candidates come from :func:`~tl_featureflow.steer.themes.theme_features` (with the
    tracer's contexts, and ranked by how on-theme those are when a ``judge`` is given).
    With ``probe_samples > 0`` and a judge, a steering probe re-ranks them
    (:func:`~tl_featureflow.steer.probe.probe_seeds`: each candidate steered alone at
    ``probe_strength`` typical activations, ranked by the judge's score). Falls back to
    the best-scoring feature (any graph size), then to the feature with
    the largest mean activation on the theme's texts when no feature passes the filters
    (tiny or untrained banks).
    """
    from tl_featureflow.steer.steerer import typical_activation

    contexts = tracer.labels.contexts()
    candidates = theme_features(model, bank, theme.texts, layer=layer, k=8, contexts=contexts, judge=judge,
                                topic=theme.description)
    if not candidates:
        acts = torch.cat(feature_activations(model, bank, theme.texts, "res", layer))
        index = int(acts.mean(0).argmax())
        info = {"feature": f"{layer}/res/{index}", "score": None, "theme_mean": float(acts[:, index].mean()),
                "chosen_by": "largest mean activation (no selective feature found)"}
        return info, tracer.trace(FeatureRef(layer, "res", index))
    probes = []
    steerable = [c for c in candidates if contexts is not None and c.ref.key in contexts
                 and typical_activation(contexts, c.ref) > 0]       # the probe's strength is in typical units
    if probe_samples > 0 and judge is not None and steerable:
        from tl_featureflow.steer.judge_set import ON_TOPIC
        from tl_featureflow.steer.probe import probe_seeds

        probes = probe_seeds(model, bank, steerable, theme.description, judge=judge, strength=probe_strength,
                             samples=probe_samples, contexts=contexts, on_topic=ON_TOPIC.get(theme.name),
                             progress=progress)
        order = {p.ref: i for i, p in enumerate(probes)}
        candidates = sorted(candidates, key=lambda c: order.get(c.ref, len(order)))
    chosen, graph = candidates[0], tracer.trace(candidates[0].ref)
    for candidate in candidates[1:4]:       # trace the next candidates only while the graph is too small
        if len(graph.nodes) >= min_nodes:
            break
        candidate_graph = tracer.trace(candidate.ref)
        if len(candidate_graph.nodes) >= min_nodes:
            chosen, graph = candidate, candidate_graph
    info = {"feature": str(chosen.ref), "score": round(chosen.score, 3), "theme_mean": round(chosen.theme_mean, 3),
            "neutral_mean": round(chosen.neutral_mean, 3), "max_activation": round(chosen.max_activation, 3),
            "chosen_by": "theme vs neutral contrast" + (", then contexts on theme" if chosen.on_theme is not None
                                                        else "")
            + (f", then a steering probe ({probe_samples} samples at {probe_strength:g} typical activations)"
               if probes else ""),
            "contexts": list(chosen.contexts)}
    if probes:
        info["probe"] = [{"feature": str(p.ref), "score": round(p.score, 3), "behavioural": round(p.behavioural, 3),
                          "coherence": round(p.coherence, 3)} for p in probes]
    if chosen.on_theme is not None:
        info["on_theme"] = round(chosen.on_theme, 3)
    return info, graph
