"""FlowMap: predecessor scores of every res feature of every layer, and its on-disk form.

A map is a folder of safetensors files (one per layer, written as they are computed,
so an interrupted ``FlowTracer.flow_map`` resumes) with a JSON index, ``map.json``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_featureflow._files import atomic_write_json, check_header, file_sha256, header
from tl_featureflow.checks import check_cosine
from tl_featureflow.errors import CacheError, UnknownFeatureError
from tl_featureflow.flow.origins import LABELS, Classification, LayerScores, classify_scores
from tl_featureflow.refs import SITES, Site

__all__ = ["FlowMap", "FlowMapWriter", "MAP_SCHEMA_VERSION", "MAP_INDEX", "write_layer", "read_layer", "write_map_index",
           "read_map_index"]

MAP_SCHEMA_VERSION = 1
MAP_INDEX = "map.json"


@dataclass
class FlowMap:
    """Predecessor scores of every res feature of every layer (method sections 2-4).

    ``layer_scores[L]`` holds, for each res feature of layer L, its top-k matches in
    res(L-1), mlp(L) and att(L). ``thresholds[L]`` are the "high" thresholds the map
    was classified with by default. Summaries: :meth:`chain_lengths` (how far back
    a feature's top-1 residual chain survives above ``t_res``) and :meth:`groups`.
    """

    layer_scores: dict[int, LayerScores]
    thresholds: dict[int, dict[Site, float]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        layers = sorted(self.layer_scores)
        span = f"layers {layers[0]}-{layers[-1]} ({len(layers)})" if layers else "no layers"
        return (f"FlowMap({span}, k={self.meta.get('k', '?')}, thresholds {self.meta.get('threshold_method', '?')}, "
                f"bank {self.meta.get('bank', '?')})")

    @property
    def layers(self) -> list[int]:
        return sorted(self.layer_scores)

    @property
    def k(self) -> int:
        first = next(iter(self.layer_scores.values()))
        return next(iter(first.scores.values())).shape[1]

    def __getitem__(self, layer: int) -> LayerScores:
        if isinstance(layer, bool):                                  # True == 1 as a dict key
            raise UnknownFeatureError(f"the flow map has no layer {layer!r}: a layer is an int, not a bool")
        try:
            return self.layer_scores[layer]
        except KeyError:
            raise UnknownFeatureError(f"the flow map has no layer {layer!r}: it has {self.layers}") from None

    def classify(self, layer: int, thresholds: dict[Site, float] | None = None) -> Classification:
        """Labels of layer ``layer`` with the map's thresholds (or the given ones)."""
        scores = self[layer]
        used = dict(thresholds if thresholds is not None else self.thresholds[layer])
        method = "given" if thresholds is not None else self.meta.get("threshold_method", "stored")
        return Classification(layer, classify_scores(scores, used), used, method, scores)

    def groups(self, thresholds: dict[Site, float] | None = None) -> dict[int, dict[str, int]]:
        """Per layer, how many res features are translated / processed / newborn / unexplained."""
        return {layer: self.classify(layer, thresholds).counts() for layer in self.layers}

    def chain_lengths(self, t_res: float = 0.5) -> dict[int, Int[Tensor, " d_sae"]]:
        """Per layer, how many consecutive layers back each feature's top-1 res chain survives.

        ``0`` means s(R) < t_res; ``n`` means the chain goes back n layers with every
        step at or above ``t_res`` (composing the top-1 matches, method section 4).
        """
        t_res = check_cosine(t_res, "t_res")
        lengths: dict[int, Tensor] = {}
        for layer in self.layers:
            scores = self[layer]
            s, idx = scores.s("res"), scores.argmax("res")
            if s is None or idx is None:
                lengths[layer] = torch.zeros(scores.n_features, dtype=torch.int64)
                continue
            keep = s.cpu() >= t_res
            previous = lengths.get(layer - 1)
            back = previous[idx.cpu()] if previous is not None else torch.zeros_like(idx.cpu())
            lengths[layer] = torch.where(keep, 1 + back, torch.zeros_like(back))
        return lengths

    # -- serialisation ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the map to folder ``path``: one safetensors file per layer plus ``map.json``."""
        path = Path(path)
        written = {layer: write_layer(path, self[layer]) for layer in self.layers}
        write_map_index(path, self.layers, self.thresholds, self.meta, written)
        return path

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> FlowMap:
        """Read a map written by :meth:`save` or ``FlowTracer.flow_map``, exactly."""
        index = read_map_index(path)
        missing = [layer for layer in index["planned_layers"] if str(layer) not in index["layers"]]
        if missing:
            raise CacheError(f"the flow map at {path} is incomplete: layers {missing} were never written")
        layer_scores = {int(layer): read_layer(path, int(layer), info, verify=verify)
                        for layer, info in index["layers"].items()}
        thresholds = {int(layer): info["thresholds"] for layer, info in index["layers"].items()}
        return cls(layer_scores, thresholds, index["meta"])


# -- the on-disk form, shared with FlowTracer.flow_map's incremental writer -----------------------
def _layer_file(path: Path, layer: int) -> Path:
    return path / f"layer_{layer:03d}.safetensors"


def write_layer(path: Path, scores: LayerScores) -> dict[str, Any]:
    """Write one layer's scores atomically; returns its index entry (without thresholds)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for site in scores.scores:
        tensors[f"{site}.scores"] = scores.scores[site].detach().cpu().contiguous()
        tensors[f"{site}.indices"] = scores.indices[site].detach().cpu().contiguous()
    target = _layer_file(path, scores.layer)
    tmp = target.with_name(f".{target.name}.tmp")
    save_file(tensors, tmp)
    tmp.replace(target)
    return {"file": target.name, "sha256": file_sha256(target)}


def read_layer(path: str | Path, layer: int, info: dict[str, Any], *, verify: bool = True) -> LayerScores:
    from safetensors.torch import load_file

    file = Path(path) / info["file"]
    if not file.is_file():
        raise CacheError(f"{file} is missing")
    if verify and file_sha256(file) != info["sha256"]:
        raise CacheError(f"{file} does not match its SHA-256 in {MAP_INDEX}: corrupt")
    try:
        tensors = load_file(file)
    except Exception as exc:
        raise CacheError(f"{file} is corrupt: {exc}") from exc
    sites = [s for s in SITES if f"{s}.scores" in tensors]
    return LayerScores(layer, {s: tensors[f"{s}.scores"] for s in sites}, {s: tensors[f"{s}.indices"] for s in sites})


def write_map_index(path: Path, planned_layers: list[int], thresholds: dict[int, dict[Site, float]],
                    meta: dict[str, Any], written: dict[int, dict[str, Any]]) -> None:
    """Write ``map.json`` listing the layers written so far (``written``) of those planned."""
    layers = {str(layer): {**written[layer], "thresholds": thresholds[layer]}
              for layer in planned_layers if layer in written}
    atomic_write_json(path / MAP_INDEX, {
        **header("FlowMap", MAP_SCHEMA_VERSION),
        "planned_layers": list(planned_layers),
        "layers": layers,
        "labels": list(LABELS),
        "meta": meta,
    })


def read_map_index(path: str | Path) -> dict[str, Any]:
    file = Path(path) / MAP_INDEX
    if not file.is_file():
        raise CacheError(f"no flow map at {path}: {MAP_INDEX} is missing")
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CacheError(f"{file} is corrupt: {exc}") from exc
    check_header(index, "FlowMap", MAP_SCHEMA_VERSION, file)
    return index


def _unindexed(name: str) -> bool:
    """Whether a file is one a flow map writes before its first index: a layer, a layer's or the index's temporary."""
    return re.fullmatch(rf"layer_\d+\.safetensors|\.layer_\d+\.safetensors\.tmp|\.{re.escape(MAP_INDEX)}\.\d+\..*\.tmp",
                        name) is not None


class FlowMapWriter:
    """Writes a flow map into a folder layer by layer, resuming one that is there.

    Opening checks the folder: a map of the same bank and settings (``meta``) is resumed (its
    intact layers in :attr:`done` and :attr:`thresholds`; a corrupt or partial layer is left out, to be
    recomputed); a map of another bank or settings, or a folder that is not a flow map, is refused,
    never overwritten. A folder holding only layer files and temporaries, a map killed before its first
    index, is started afresh. :meth:`add` writes one layer's file, then the index (both atomically).
    """

    def __init__(self, path: str | Path, planned: list[int], meta: dict[str, Any]):
        self.path, self.planned, self.meta = Path(path), list(planned), meta
        self.done: dict[int, LayerScores] = {}
        self.thresholds: dict[int, dict[Site, float]] = {}
        self._written: dict[int, dict[str, Any]] = {}
        self._resume()

    def add(self, layer: int, scores: LayerScores, thresholds: dict[Site, float]) -> None:
        self.done[layer], self.thresholds[layer] = scores, thresholds
        self._written[layer] = write_layer(self.path, scores)
        write_map_index(self.path, self.planned, self.thresholds, self.meta, self._written)

    def _resume(self) -> None:
        path, meta = self.path, self.meta
        if not (path / MAP_INDEX).is_file():
            if path.is_file() or (path.exists() and not all(_unindexed(p.name) for p in path.iterdir())):
                raise CacheError(f"refusing to write a flow map into {path}: it exists and is not a flow map")
            for stray in path.glob("*layer_*"):   # a map killed before its first index: no layer is vouched for
                stray.unlink()
            return
        index = read_map_index(path)
        if index["meta"] != meta:
            changed = sorted(k for k in set(meta) | set(index["meta"]) if meta.get(k) != index["meta"].get(k))
            raise CacheError(
                f"{path} holds a flow map of another bank or settings (differs in {changed}): "
                "use another path or delete it"
            )
        for key, info in index["layers"].items():
            layer = int(key)
            try:
                self.done[layer] = read_layer(path, layer, info)
            except CacheError:
                continue  # corrupt or partial: recompute this layer
            self.thresholds[layer] = info["thresholds"]
            self._written[layer] = {"file": info["file"], "sha256": info["sha256"]}
