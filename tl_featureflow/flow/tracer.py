"""FlowTracer: data-free matching of SAE features across layers (method sections 2-4).

Matching reads only the bank's decoders. For a res feature f of layer L its
predecessors are its most similar decoder rows in res(L-1), mlp(L) and att(L); the
scores s(R), s(M), s(A) say whether f was carried over (translated), changed
(processed) or created (newborn) by layer L.

>>> from tl_featureflow.synthetic import planted_chain_bank
>>> bank, truth = planted_chain_bank()        # a chain 0/res/3 -> 1/res/7 -> 2/res/1 -> 3/res/5
>>> tracer = FlowTracer(bank)
>>> [(str(ref), round(score, 2)) for ref, score in tracer.predecessors("2/res/1")["res"]]
[('1/res/7', 0.6)]
>>> graph = tracer.trace("2/res/1")           # a FlowGraph, both directions
>>> [str(n.ref) for n in graph.nodes if n.role != "module"]   # 2 -> 3 has cosine 0.3 < t_res = 0.5
['0/res/3', '1/res/7', '2/res/1']
>>> tracer.classify(2).counts()["processed"]  # translated / processed / newborn / unexplained
2
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_featureflow.checks import check_cosine, check_device, check_int, check_quantile
from tl_featureflow.errors import (
    BankError,
    FeatureFlowError,
    InvalidArgumentError,
    ModelMismatchError,
    UnknownFeatureError,
)
from tl_featureflow.flow.flowmap import FlowMap, FlowMapWriter
from tl_featureflow.flow.graph import FlowEdge, FlowGraph, FlowNode
from tl_featureflow.flow.labels import FeatureLabels
from tl_featureflow.flow.matching import topk_cosine
from tl_featureflow.flow.origins import Classification, LayerScores, classify_scores
from tl_featureflow.refs import FeatureRef, Key, Site, check_layer, check_site, predecessor_keys
from tl_featureflow.saes.bank import SAEBank

__all__ = ["FlowTracer", "Matching", "Predecessors", "PAPER_THRESHOLDS"]

Thresholds = Literal["chance", "paper"] | float | Mapping[Site, float]

#: The paper's defaults: t(R) = 0.5 for the residual chain, 0.15 for modules.
PAPER_THRESHOLDS: dict[Site, float] = {"res": 0.5, "mlp": 0.15, "att": 0.15}


@dataclass(frozen=True)
class Matching:
    """For every feature of ``dst``, its top-``k`` features of ``src`` by decoder cosine.

    ``indices`` and ``scores`` are ``[n_dst, k]``, best first.
    """

    src: Key
    dst: Key
    k: int
    indices: Int[Tensor, "n_dst k"]
    scores: Float[Tensor, "n_dst k"]

    def __repr__(self) -> str:
        return f"Matching({self.src} -> {self.dst}, {len(self)} features of dst, top {self.k})"

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, dst_index: int) -> list[tuple[FeatureRef, float]]:
        """The matches of one dst feature as ``(FeatureRef in src, score)`` pairs."""
        site, layer = self.src
        return [(FeatureRef(layer, site, int(i)), float(s))
                for i, s in zip(self.indices[dst_index].tolist(), self.scores[dst_index].tolist(), strict=False)]


@dataclass(frozen=True)
class Predecessors(Mapping[Site, list[tuple[FeatureRef, float]]]):
    """Predecessors of a res feature: site -> ``[(FeatureRef, score), ...]``, best first.

    ``res`` is res(L-1), ``mlp`` is mlp(L), ``att`` is att(L); sites the bank lacks
    (and res at the first layer) are absent. ``preds.s("mlp")`` is s(M).
    """

    target: FeatureRef
    by_site: dict[Site, list[tuple[FeatureRef, float]]]

    def __getitem__(self, site: Site) -> list[tuple[FeatureRef, float]]:
        try:
            return self.by_site[site]
        except KeyError:
            raise UnknownFeatureError(f"{self.target} has no {site!r} predecessors here: it has {list(self.by_site)}") from None

    def __iter__(self) -> Iterator[Site]:
        return iter(self.by_site)

    def __len__(self) -> int:
        return len(self.by_site)

    def s(self, site: Site) -> float | None:
        """The score s(P) of the best predecessor in ``site`` (None when absent)."""
        pairs = self.by_site.get(site)
        return pairs[0][1] if pairs else None

    def __repr__(self) -> str:
        parts = ", ".join(f"{site}=[{', '.join(f'({r}, {s:.2f})' for r, s in pairs)}]"
                          for site, pairs in self.by_site.items())
        return f"Predecessors({self.target}: {parts})"


class FlowTracer:
    """Data-free feature flow over an :class:`SAEBank`.

    Args:
        bank: the SAEs; matching reads their unit decoder rows.
        model: optional; when given, its ``d_model`` must match, and graph nodes get the
            tokens their decoder direction promotes (logit lens) as a second label.
        device: where matching runs (default: where the SAEs are).
        chunk_size: rows per chunk of the similarity computation (default: ~128 MB).
        contexts: what features fire on, their primary labels: a
            :class:`~tl_featureflow.flow.contexts.TopContexts`, ``"auto"`` (the default:
            :func:`~tl_featureflow.flow.contexts.feature_contexts` of the bank on held-out
            corpus text, computed once per bank and cached, when the model has a tokenizer
            and a label is first needed), or None (logit-lens labels only). Labels live in
            ``tracer.labels`` (:class:`~tl_featureflow.flow.labels.FeatureLabels`).
    """

    def __init__(
        self,
        bank: SAEBank,
        model: Any | None = None,
        *,
        device: torch.device | str | None = None,
        chunk_size: int | None = None,
        contexts: Any | None = "auto",
    ):
        if not isinstance(bank, SAEBank):
            raise InvalidArgumentError(f"FlowTracer needs an SAEBank, got {type(bank).__name__}")
        if model is not None:
            bank = bank.bind(model)          # attention SAEs on attn.hook_z are matched through its W_O
            d_model, n_layers = model.cfg.d_model, model.cfg.n_layers
            if d_model != bank.d_model:
                raise ModelMismatchError(f"the bank's SAEs read d_in={bank.d_model} but the model has d_model={d_model}")
            if bank.layers[-1] >= n_layers:
                raise ModelMismatchError(f"the bank has layers up to {bank.layers[-1]} but the model has {n_layers}")
        self.bank = bank
        self.model = model
        first = next(iter(bank.values()))
        self.device = check_device(device) if device is not None else first.W_dec.device
        self.chunk_size = None if chunk_size is None else check_int(chunk_size, "chunk_size", low=1)
        self.labels = FeatureLabels(bank, model, contexts)   # node labels: top contexts, logit lens
        self._matches: dict[tuple[Key, Key, int], Matching] = {}
        self._rotations: dict[int, Tensor] = {}

    # -- building blocks -------------------------------------------------------------------------
    def _key(self, key: tuple[Any, Any], what: str) -> Key:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise InvalidArgumentError(f"{what} must be a (site, layer) tuple such as ('res', 3), got {key!r}")
        site, layer = check_site(key[0]), check_layer(key[1])
        if (site, layer) not in self.bank:
            raise UnknownFeatureError(f"{what} {(site, layer)} is not in the bank: it has {self.bank.describe()}")
        return site, layer

    def _decoder(self, key: Key) -> Float[Tensor, "d_sae d_model"]:
        return self.bank.decoder(*key, device=self.device, dtype=torch.float32)

    def predecessor_keys(self, layer: int) -> dict[Site, Key]:
        """The SAEs that predecessors of res features at ``layer`` come from, by site."""
        return {site: key for site, key in predecessor_keys(check_layer(layer)).items() if key in self.bank}

    def match(self, src: tuple[Site, int], dst: tuple[Site, int], k: int = 1) -> Matching:
        """For every feature of ``dst``, its top-``k`` features of ``src`` (cached)."""
        src, dst = self._key(src, "src"), self._key(dst, "dst")
        cached = self._matches.get((src, dst, k))
        if cached is None:
            d_src = self.bank.d_sae(*src)
            check_int(k, "k", low=1, high=d_src, context=f" (the src SAE {src} has {d_src} features)")
            scores, indices = topk_cosine(self._decoder(dst), self._decoder(src), k, chunk_size=self.chunk_size)
            cached = Matching(src, dst, k, indices, scores)
            self._matches[(src, dst, k)] = cached
        return cached

    def forget_matches(self) -> None:
        """Drop the cached matchings of :meth:`match` (work over every layer keeps memory flat)."""
        self._matches.clear()

    def _res_ref(self, ref: FeatureRef | str) -> FeatureRef:
        ref = self.bank.check_ref(ref)
        if ref.site != "res":
            raise InvalidArgumentError(
                f"{ref} is an {ref.site} feature: predecessors and traces start from res features "
                f"(e.g. '{ref.layer}/res/<index>')"
            )
        return ref

    def _top(self, vector: Float[Tensor, " d_model"], key: Key, k: int) -> list[tuple[FeatureRef, float]]:
        scores, indices = topk_cosine(vector[None], self._decoder(key), min(k, self.bank.d_sae(*key)))
        return [(FeatureRef(key[1], key[0], int(i)), float(s)) for i, s in zip(indices[0].tolist(), scores[0].tolist(), strict=False)]

    def similar(self, ref: FeatureRef | str, key: tuple[Site, int], k: int = 3) -> list[tuple[FeatureRef, float]]:
        """The ``k`` features of the SAE at ``key`` whose decoder directions are closest to ``ref``'s (cosine)."""
        ref = self.bank.check_ref(ref)
        key = self._key(key, "key")
        check_int(k, "k", low=1)
        return self._top(self._decoder(ref.key)[ref.index], key, k)

    def successors(self, ref: FeatureRef | str, k: int = 3) -> list[tuple[FeatureRef, float]]:
        """Where a feature goes: for a res feature of layer L, its top-``k`` matches in res(L+1);
        for an mlp/att feature of layer L, the res(L) features it feeds most. Empty at the bank's end."""
        ref = self.bank.check_ref(ref)
        key = ("res", ref.layer + 1) if ref.site == "res" else ("res", ref.layer)
        return self.similar(ref, key, k) if key in self.bank else []

    def predecessors(self, ref: FeatureRef | str, k: int = 1) -> Predecessors:
        """Top-``k`` predecessors of a res feature in res(L-1), mlp(L) and att(L)."""
        ref = self._res_ref(ref)
        check_int(k, "k", low=1)
        vector = self._decoder(ref.key)[ref.index]
        by_site = {}
        for site, key in self.predecessor_keys(ref.layer).items():
            if k > self.bank.d_sae(*key):
                raise InvalidArgumentError(f"k={k} is larger than the {key} SAE's width {self.bank.d_sae(*key)}")
            by_site[site] = self._top(vector, key, k)
        return Predecessors(ref, by_site)

    def scores(self, layer: int, k: int = 1) -> LayerScores:
        """Top-``k`` predecessor scores and indices of every res feature of ``layer`` at once."""
        dst = self._key(("res", layer), "layer")
        matches = {site: self.match(key, dst, k) for site, key in self.predecessor_keys(layer).items()}
        return LayerScores(layer, {s: m.scores for s, m in matches.items()}, {s: m.indices for s, m in matches.items()})

    # -- thresholds and groups -------------------------------------------------------------------
    def _rotation(self, d: int) -> Tensor:
        """A fixed (seeded) Haar-random orthogonal d x d matrix."""
        if d not in self._rotations:
            gen = torch.Generator().manual_seed(20250205)
            q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
            self._rotations[d] = (q * torch.sign(torch.diagonal(r))).float().to(self.device)
        return self._rotations[d]

    def chance_thresholds(self, layer: int, *, quantile: float = 0.99, n_probe: int = 1024,
                          sites: Iterable[Site] | None = None) -> dict[Site, float]:
        """Per-site scores reached by chance: the ``quantile`` of s(P) for rotated targets.

        Up to ``n_probe`` res decoder rows of ``layer`` are turned by a fixed random
        rotation, which keeps their geometry but destroys any alignment with the
        predecessor SAEs, and matched like real features. A real s(P) above this
        level is more similar than unaligned decoders of the same shapes ever get.
        ``sites``: only these predecessor sites (each site's level is computed on its own).
        """
        quantile = check_quantile(quantile)
        check_int(n_probe, "n_probe", low=1)
        dst = self._decoder(self._key(("res", layer), "layer"))
        step = max(1, dst.shape[0] // n_probe)
        probe = dst[::step][:n_probe] @ self._rotation(dst.shape[1])
        out: dict[Site, float] = {}
        wanted = None if sites is None else set(sites)
        for site, key in self.predecessor_keys(layer).items():
            if wanted is not None and site not in wanted:
                continue
            scores, _ = topk_cosine(probe, self._decoder(key), 1, chunk_size=self.chunk_size)
            out[site] = float(torch.quantile(scores[:, 0].double().cpu(), quantile))
        return out

    def thresholds(self, layer: int, thresholds: Thresholds = "chance", *, quantile: float = 0.99,
                   sites: Iterable[Site] | None = None) -> dict[Site, float]:
        """Resolve a threshold spec for ``layer`` into one number per predecessor site (or per site of ``sites``)."""
        self._key(("res", layer), "layer")
        quantile = check_quantile(quantile)
        wanted = None if sites is None else set(sites)
        sites = [site for site in self.predecessor_keys(layer) if wanted is None or site in wanted]
        if isinstance(thresholds, str):
            if thresholds == "chance":
                return self.chance_thresholds(layer, quantile=quantile, sites=sites)
            if thresholds == "paper":
                return {s: PAPER_THRESHOLDS[s] for s in sites}
            raise InvalidArgumentError(f"thresholds={thresholds!r}: expected 'chance', 'paper', a number or a site mapping")
        if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
            return {s: float(thresholds) for s in sites}
        if isinstance(thresholds, Mapping):
            missing = [s for s in sites if s not in thresholds]
            if missing:
                raise InvalidArgumentError(f"thresholds {dict(thresholds)} lack sites {missing} of layer {layer}")
            return {s: float(thresholds[s]) for s in sites}
        raise InvalidArgumentError(f"thresholds={thresholds!r}: expected 'chance', 'paper', a number or a site mapping")

    def classify(self, layer: int, thresholds: Thresholds = "chance", *, quantile: float = 0.99) -> Classification:
        """Label every res feature of ``layer`` translated / processed / newborn / unexplained.

        Args:
            thresholds: what counts as a "high" score, per site. ``"chance"`` (default):
                the level unaligned decoders reach (see :meth:`chance_thresholds`), per
                layer and site. ``"paper"``: the paper's trace thresholds (res 0.5,
                mlp/att 0.15). A number, or a ``{site: number}`` mapping: fixed values.

        The thresholds used come back in ``Classification.thresholds``.
        """
        used = self.thresholds(layer, thresholds, quantile=quantile)
        scores = self.scores(layer)
        method = thresholds if isinstance(thresholds, str) else "fixed"
        if method == "chance":
            method = f"chance (q={quantile})"
        return Classification(layer, classify_scores(scores, used), used, method, scores)

    # -- graphs ----------------------------------------------------------------------------------
    def _res_node(self, ref: FeatureRef, role: str, labels: bool) -> tuple[FlowNode, Predecessors]:
        preds = self.predecessors(ref)
        label, lens = self.labels.node_labels(ref) if labels else (None, None)
        node = FlowNode(ref, role, preds.s("res"), preds.s("mlp"), preds.s("att"), label, lens)  # type: ignore[arg-type]
        return node, preds

    def trace(
        self,
        ref: FeatureRef | str,
        *,
        t_res: float = 0.5,
        t_module: float = 0.15,
        direction: Literal["backward", "forward", "both"] = "both",
        labels: bool | None = None,
    ) -> FlowGraph:
        """The flow graph of one res feature (method section 4).

        Backward: from the seed, follow the top-1 res(L-1) predecessor layer by layer
        while its score s(R) >= ``t_res``. Forward: the successor of a res feature f at
        layer L is the res feature of layer L+1 whose decoder is most similar to f's
        (the argmax of the cosine with f, so a many-to-one step read forwards), kept
        while that cosine >= ``t_res``. Every res node of the chain gets its mlp(L)
        and att(L) top-1 predecessors as side nodes when their score >= ``t_module``.
        ``labels`` (default: when the tracer has a model) adds logit-lens labels.
        """
        seed = self._res_ref(ref)
        t_res, t_module = check_cosine(t_res, "t_res"), check_cosine(t_module, "t_module")
        if direction not in ("backward", "forward", "both"):
            raise InvalidArgumentError(f"direction={direction!r}: expected 'backward', 'forward' or 'both'")
        labels = (self.model is not None or self.labels.given()) if labels is None else labels
        nodes: dict[FeatureRef, FlowNode] = {}
        edges: list[FlowEdge] = []

        def visit(ref: FeatureRef, role: str) -> Predecessors:
            node, preds = self._res_node(ref, role, labels)
            nodes[ref] = node
            for site in ("mlp", "att"):
                for module_ref, score in preds.get(site, [])[:1]:
                    if score >= t_module:
                        label, lens = self.labels.node_labels(module_ref) if labels else (None, None)
                        nodes[module_ref] = FlowNode(module_ref, "module", label=label, lens=lens)
                        edges.append(FlowEdge(module_ref, ref, score))
            return preds

        preds = visit(seed, "seed")
        l_start = l_end = seed.layer
        if direction in ("backward", "both"):
            current = seed
            while preds.get("res") and preds["res"][0][1] >= t_res:
                previous, score = preds["res"][0]
                edges.append(FlowEdge(previous, current, score))
                preds = visit(previous, "chain")
                current, l_start = previous, previous.layer
        if direction in ("forward", "both"):
            current = seed
            while ("res", current.layer + 1) in self.bank:
                vector = self._decoder(current.key)[current.index]
                successor, score = self._top(vector, ("res", current.layer + 1), 1)[0]
                if score < t_res:
                    break
                edges.append(FlowEdge(current, successor, score))
                visit(successor, "chain")
                current, l_end = successor, successor.layer
        return FlowGraph(seed, list(nodes.values()), edges, (l_start, l_end), t_res, t_module, direction,
                         meta={"bank": self.bank.describe(), "forward_rule": "argmax cosine in res(L+1)"})

    # -- causal validation -----------------------------------------------------------------------
    def validate(self, tokens: Tensor, *, layers: Iterable[int], model: Any | None = None, **kwargs: Any) -> Any:
        """The deactivation experiment: see :func:`tl_featureflow.causal.experiment.validate`.

        Uses the tracer's model unless ``model`` is given. Returns a ``ValidationReport``.
        """
        from tl_featureflow.causal.experiment import validate

        model = model if model is not None else self.model
        if model is None:
            raise FeatureFlowError("validate needs a model: FlowTracer(bank, model) or validate(..., model=)")
        return validate(self, model, tokens, layers=layers, **kwargs)

    # -- the full map ----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """The bank's fingerprint (:meth:`SAEBank.fingerprint`), kept here for existing callers."""
        return self.bank.fingerprint()

    def flow_map(
        self,
        path: str | Path | None = None,
        *,
        layers: Iterable[int] | None = None,
        k: int = 1,
        thresholds: Thresholds = "chance",
        quantile: float = 0.99,
        progress: bool = True,
    ) -> FlowMap:
        """Predecessor scores of every res feature of every layer, with thresholds per layer.

        With ``path``, each layer is written to disk as soon as it is computed, and a
        later call with the same bank and settings resumes from the layers already
        there (a different bank or settings at ``path`` is refused, never overwritten).
        """
        from tqdm.auto import tqdm

        planned, meta = self.map_plan(layers, k=k, thresholds=thresholds, quantile=quantile)
        writer = None if path is None else FlowMapWriter(path, planned, meta)   # resumes what is there
        done: dict[int, LayerScores] = {} if writer is None else dict(writer.done)
        thr: dict[int, dict[Site, float]] = {} if writer is None else dict(writer.thresholds)
        for layer in tqdm([x for x in planned if x not in done], desc="flow map", unit="layer", disable=not progress):
            done[layer] = self.scores(layer, k)
            thr[layer] = self.thresholds(layer, thresholds, quantile=quantile)
            if writer is not None:
                writer.add(layer, done[layer], thr[layer])
            self.forget_matches()  # a map holds its own copy; keep memory flat
        return FlowMap({layer: done[layer] for layer in planned}, {layer: thr[layer] for layer in planned}, meta)

    def map_plan(self, layers: Iterable[int] | None = None, *, k: int = 1, thresholds: Thresholds = "chance",
                 quantile: float = 0.99) -> tuple[list[int], dict[str, Any]]:
        """The layers :meth:`flow_map` computes (those with predecessor SAEs) and the settings it writes
        with them (``meta``, what a resumed map must agree with); checks the layers, ``k`` and ``quantile``."""
        check_int(k, "k", low=1)
        check_quantile(quantile)
        res_layers = [layer for layer in self.bank.layers if ("res", layer) in self.bank]
        wanted = res_layers if layers is None else [check_layer(layer) for layer in layers]
        unknown = [layer for layer in wanted if layer not in res_layers]
        if unknown:
            raise UnknownFeatureError(f"layers {unknown} have no res SAE: the bank has {self.bank.describe()}")
        planned = [layer for layer in wanted if self.predecessor_keys(layer)]
        if not planned:
            raise BankError(f"no layer of {wanted} has predecessor SAEs (res(L-1), mlp(L) or att(L))")
        method = thresholds if isinstance(thresholds, str) else "fixed"
        # fixed thresholds are part of what a map means: a resume with others is refused (issue 24 #7)
        fixed = (None if isinstance(thresholds, str) else float(thresholds) if isinstance(thresholds, (int, float))
                 else {site: float(v) for site, v in sorted(thresholds.items())})
        meta = {"k": k, "bank_fingerprint": self.bank.fingerprint(), "bank": self.bank.describe(),
                "threshold_method": method, "fixed_thresholds": fixed, "quantile": quantile, "planned": planned}
        return planned, meta
