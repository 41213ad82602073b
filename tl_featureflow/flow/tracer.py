"""FlowTracer: data-free matching of SAE features across layers (method sections 2-4).

Matching reads only the bank's decoders. For a res feature f of layer L its
predecessors are its most similar decoder rows in res(L-1), mlp(L) and att(L); the
scores s(R), s(M), s(A) say whether f was carried over (translated), changed
(processed) or created (newborn) by layer L. Layer 0's res predecessors come from the
embedding SAE, ``("res", -1)`` on ``blocks.0.hook_resid_pre``, when the bank has one.

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
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_featureflow.checks import check_cosine, check_device, check_int, check_quantile
from tl_featureflow.errors import (
    BankError,
    InvalidArgumentError,
    ModelMismatchError,
    UnknownFeatureError,
)
from tl_featureflow.flow.flowmap import FlowMap, FlowMapWriter
from tl_featureflow.flow.graph import FlowEdge, FlowGraph, FlowNode
from tl_featureflow.flow.labels import FeatureLabels
from tl_featureflow.flow.matching import topk_cosine
from tl_featureflow.flow.origins import Classification, LayerScores, classify_scores
from tl_featureflow.refs import EMBED_LAYER, FeatureRef, Key, Site, check_layer, check_site, predecessor_keys
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.preflight import preflight_on_load

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

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

    ``res`` is res(L-1) (for layer 0 the embedding SAE, res(-1), when the bank has one),
    ``mlp`` is mlp(L), ``att`` is att(L); sites the bank lacks are absent. ``preds.s("mlp")`` is s(M).
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


def _data_free(method: str) -> Any:
    """The registered data-free method ``method`` (its ``MatchingMethod``); others are an error saying why."""
    from tl_featureflow.flow import methods

    spec = methods.get(method)
    if spec.needs != "decoders" or spec.table is None:
        raise InvalidArgumentError(f"method={method!r} needs {spec.needs}, not only decoders: tracing and the flow "
                                   f"map take a data-free method ({list(methods.data_free_names())}); validate() "
                                   "runs the others")
    return spec


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
        preflight: with a model, a bank of SAELens releases (:meth:`SAEBank.from_pretrained`) is
            checked on it the first time they meet (:func:`~tl_featureflow.saes.preflight.preflight_on_load`:
            a :class:`~tl_featureflow.saes.preflight.PreflightWarning` per SAE that does not reconstruct
            its site); ``False`` (or ``TL_FEATUREFLOW_PREFLIGHT=0``) skips it.
    """

    def __init__(
        self,
        bank: SAEBank,
        model: HookedTransformer | None = None,
        *,
        device: torch.device | str | None = None,
        chunk_size: int | None = None,
        contexts: Any | None = "auto",
        preflight: bool = True,
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
            preflight_on_load(model, bank, enabled=preflight)
        self.bank = bank
        self.model = model
        first = next(iter(bank.values()))
        self.device = check_device(device) if device is not None else first.W_dec.device
        self.chunk_size = None if chunk_size is None else check_int(chunk_size, "chunk_size", low=1)
        self.labels = FeatureLabels(bank, model, contexts)   # node labels: top contexts, logit lens
        self._matches: dict[tuple[Key, Key, int], Matching] = {}
        self._method_contexts: dict[str, Any] = {}          # a data-free method's MatchContext, per method
        self._rotations: dict[int, Tensor] = {}

    # -- building blocks -------------------------------------------------------------------------
    def _key(self, key: tuple[Any, Any], what: str) -> Key:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise InvalidArgumentError(f"{what} must be a (site, layer) tuple such as ('res', 3), got {key!r}")
        site = check_site(key[0])
        layer = check_layer(key[1], site)
        if (site, layer) not in self.bank:
            raise UnknownFeatureError(f"{what} {(site, layer)} is not in the bank: it has {self.bank.describe()}")
        return site, layer

    def _decoder(self, key: Key) -> Float[Tensor, "d_sae d_model"]:
        return self.bank.decoder(*key, device=self.device, dtype=torch.float32)

    def predecessor_keys(self, layer: int) -> dict[Site, Key]:
        """The SAEs that predecessors of res features at ``layer`` come from, by site (layer 0's res
        predecessor is the embedding SAE ``("res", -1)`` when the bank has one; layer -1 has none)."""
        return {site: key for site, key in predecessor_keys(check_layer(layer, "res")).items() if key in self.bank}

    def _target_layer(self, layer: int) -> Key:
        """``("res", layer)`` of a layer whose res features get predecessor scores (not the embedding)."""
        if layer == EMBED_LAYER and not isinstance(layer, bool):
            raise InvalidArgumentError("layer -1 is the embedding SAE (blocks.0.hook_resid_pre): it has no "
                                       "predecessors to score; it is the res predecessor of layer 0's features")
        return self._key(("res", layer), "layer")

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
        """Drop the cached matchings of :meth:`match` and of data-free methods (keeps memory flat)."""
        self._matches.clear()
        self._method_contexts.clear()

    def pair_scores(self, layer: int, site: Site, k: int = 1, *, method: str | None = None
                    ) -> tuple[Float[Tensor, "d_res k"], Int[Tensor, "d_res k"]]:
        """Every res(``layer``) feature's top-``k`` matches at one predecessor ``site``: scores, indices.

        ``method=None`` is the decoder cosine's top-``k`` (:meth:`match`). Any other name is a
        data-free method of :mod:`tl_featureflow.flow.methods` (``needs="decoders"``: ``"top1"``,
        ``"permutation"``, ``"random"``, one registered by a user...): its table picks the indices,
        and a pair's score is the cosine of its two decoder rows, so thresholds keep their meaning
        (a pair a method picks never scores above the top-1 cosine). A method's "no match" (index
        -1) scores ``-inf``.
        """
        dst = self._target_layer(layer)
        keys = self.predecessor_keys(layer)
        if site not in keys:
            raise UnknownFeatureError(f"res({layer}) has no {site} predecessor SAE in the bank: it has {sorted(keys)}")
        if method is None:
            matching = self.match(keys[site], dst, k)
            return matching.scores, matching.indices
        from tl_featureflow.flow.methods import MatchContext

        spec = _data_free(method)
        check_int(k, "k", low=1)
        context = self._method_contexts.setdefault(method, MatchContext(self))
        indices = torch.as_tensor(spec.table(context, layer, site, keys[site])).to(self.device).long()
        if indices.ndim != 2 or indices.shape[0] != self.bank.d_sae(*dst) or indices.shape[1] < k:
            raise InvalidArgumentError(f"method {method!r} gave a table of shape {tuple(indices.shape)} for "
                                       f"res({layer}) <- {site}: expected [{self.bank.d_sae(*dst)}, >= k={k}]")
        indices = indices[:, :k]
        target, source = self._decoder(dst), self._decoder(keys[site])
        columns = [(target * source[indices[:, j].clamp_min(0)]).sum(-1) for j in range(k)]
        scores = torch.stack(columns, dim=1).masked_fill(indices < 0, float("-inf"))
        return scores, indices

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

    def scores(self, layer: int, k: int = 1, *, method: str | None = None) -> LayerScores:
        """Top-``k`` predecessor scores and indices of every res feature of ``layer`` at once
        (``method``: a data-free matching method, see :meth:`pair_scores`)."""
        self._target_layer(layer)
        pairs = {site: self.pair_scores(layer, site, k, method=method) for site in self.predecessor_keys(layer)}
        return LayerScores(layer, {s: p[0] for s, p in pairs.items()}, {s: p[1] for s, p in pairs.items()})

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
        dst = self._decoder(self._target_layer(layer))
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
        self._target_layer(layer)
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

    def classify(self, layer: int, thresholds: Thresholds = "chance", *, quantile: float = 0.99,
                 method: str | None = None) -> Classification:
        """Label every res feature of ``layer`` translated / processed / newborn / unexplained.

        Args:
            thresholds: what counts as a "high" score, per site. ``"chance"`` (default):
                the level unaligned decoders reach (see :meth:`chance_thresholds`), per
                layer and site. ``"paper"``: the paper's trace thresholds (res 0.5,
                mlp/att 0.15). A number, or a ``{site: number}`` mapping: fixed values.

        ``method``: a data-free matching method picks each feature's predecessors (see
        :meth:`pair_scores`); ``"chance"`` stays the top-1 cosine's chance level, a conservative
        bar since no pair scores above its target's top-1 cosine. The thresholds used come back
        in ``Classification.thresholds``.
        """
        used = self.thresholds(layer, thresholds, quantile=quantile)
        scores = self.scores(layer, method=method)
        method = thresholds if isinstance(thresholds, str) else "fixed"
        if method == "chance":
            method = f"chance (q={quantile})"
        return Classification(layer, classify_scores(scores, used), used, method, scores)

    # -- graphs ----------------------------------------------------------------------------------
    def _method_table(self, layer: int, method: str, tables: dict[int, LayerScores]) -> LayerScores:
        """``method``'s scores of ``layer``, computed once per trace (``tables``)."""
        if layer not in tables:
            tables[layer] = self.scores(layer, method=method)
        return tables[layer]

    def _method_predecessors(self, ref: FeatureRef, method: str, tables: dict[int, LayerScores]) -> Predecessors:
        """``ref``'s top-1 predecessor per site as ``method`` picks them (``tables``: this trace's layers)."""
        table, by_site = self._method_table(ref.layer, method, tables), {}
        for site, key in self.predecessor_keys(ref.layer).items():
            index, score = int(table.indices[site][ref.index, 0]), float(table.scores[site][ref.index, 0])
            by_site[site] = [] if index < 0 else [(FeatureRef(key[1], key[0], index), score)]
        return Predecessors(ref, by_site)

    def _method_successor(self, ref: FeatureRef, method: str, tables: dict[int, LayerScores]
                          ) -> tuple[FeatureRef, float] | None:
        """The res(L+1) feature whose ``method`` predecessor in res(L) is ``ref``, the best scoring if several."""
        layer = ref.layer + 1
        table = self._method_table(layer, method, tables)
        if "res" not in table.indices:
            return None
        mine = (table.indices["res"][:, 0] == ref.index).nonzero().squeeze(1)
        if len(mine) == 0:
            return None
        best = mine[table.scores["res"][mine, 0].argmax()]
        return FeatureRef(layer, "res", int(best)), float(table.scores["res"][best, 0])

    def _res_node(self, ref: FeatureRef, role: str, labels: bool, method: str | None = None,
                  tables: dict[int, LayerScores] | None = None) -> tuple[FlowNode, Predecessors]:
        preds = self.predecessors(ref) if method is None else self._method_predecessors(ref, method, tables or {})
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
        method: str | None = None,
    ) -> FlowGraph:
        """The flow graph of one res feature (method section 4).

        Backward: from the seed, follow the top-1 res(L-1) predecessor layer by layer
        while its score s(R) >= ``t_res``. Forward: the successor of a res feature f at
        layer L is the res feature of layer L+1 whose decoder is most similar to f's
        (the argmax of the cosine with f, so a many-to-one step read forwards), kept
        while that cosine >= ``t_res``. Every res node of the chain gets its mlp(L)
        and att(L) top-1 predecessors as side nodes when their score >= ``t_module``.
        ``labels`` (default: when the tracer has a model) adds logit-lens labels.

        ``method``: a data-free matching method of :mod:`tl_featureflow.flow.methods` picks the
        predecessors instead of the cosine's top-1 (``"permutation"``: SAE Match's one-to-one
        assignment, or a method you registered); an edge's score is still its decoders' cosine.
        Forward, the successor is the res(L+1) feature whose predecessor the method says f is
        (the best scoring if several; none ends the chain). ``method="top1"`` gives the default's
        graph backward; forward it keeps only successors that name f as their top-1.
        """
        seed = self._res_ref(ref)
        t_res, t_module = check_cosine(t_res, "t_res"), check_cosine(t_module, "t_module")
        if direction not in ("backward", "forward", "both"):
            raise InvalidArgumentError(f"direction={direction!r}: expected 'backward', 'forward' or 'both'")
        labels = (self.model is not None or self.labels.given()) if labels is None else labels
        if method is not None:
            _data_free(method)
        nodes: dict[FeatureRef, FlowNode] = {}
        edges: list[FlowEdge] = []

        tables: dict[int, LayerScores] = {}        # the method's table of each layer this trace reads

        def visit(ref: FeatureRef, role: str) -> Predecessors:
            node, preds = self._res_node(ref, role, labels, method, tables)
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
                if method is None:
                    vector = self._decoder(current.key)[current.index]
                    successor, score = self._top(vector, ("res", current.layer + 1), 1)[0]
                else:
                    found = self._method_successor(current, method, tables)
                    if found is None:
                        break
                    successor, score = found
                if score < t_res:
                    break
                edges.append(FlowEdge(current, successor, score))
                visit(successor, "chain")
                current, l_end = successor, successor.layer
        return FlowGraph(seed, list(nodes.values()), edges, (l_start, l_end), t_res, t_module, direction,
                         meta={"bank": self.bank.describe(), "method": method or "cosine",
                               "forward_rule": "argmax cosine in res(L+1)" if method is None
                               else f"the res(L+1) feature whose {method} predecessor it is"})

    # -- causal validation -----------------------------------------------------------------------
    def validate(self, tokens: Tensor, *, layers: Iterable[int], model: HookedTransformer | None = None,
                 **kwargs: Any) -> Any:
        """The deactivation experiment: see :func:`tl_featureflow.causal.experiment.validate`.

        Uses the tracer's model unless ``model`` is given. Returns a ``ValidationReport``.
        """
        from tl_featureflow.causal.experiment import validate

        model = model if model is not None else self.model
        if model is None:
            raise InvalidArgumentError("validate needs a model: FlowTracer(bank, model) or validate(..., model=)")
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
        method: str | None = None,
    ) -> FlowMap:
        """Predecessor scores of every res feature of every layer, with thresholds per layer.

        With ``path``, each layer is written to disk as soon as it is computed, and a
        later call with the same bank and settings resumes from the layers already
        there (a different bank or settings at ``path`` is refused, never overwritten).
        ``method``: a data-free matching method picks the matches (see :meth:`pair_scores`).
        """
        from tqdm.auto import tqdm

        planned, meta = self.map_plan(layers, k=k, thresholds=thresholds, quantile=quantile, method=method)
        writer = None if path is None else FlowMapWriter(path, planned, meta)   # resumes what is there
        done: dict[int, LayerScores] = {} if writer is None else dict(writer.done)
        thr: dict[int, dict[Site, float]] = {} if writer is None else dict(writer.thresholds)
        for layer in tqdm([x for x in planned if x not in done], desc="flow map", unit="layer", disable=not progress):
            done[layer] = self.scores(layer, k, method=method)
            thr[layer] = self.thresholds(layer, thresholds, quantile=quantile)
            if writer is not None:
                writer.add(layer, done[layer], thr[layer])
            self.forget_matches()  # a map holds its own copy; keep memory flat
        return FlowMap({layer: done[layer] for layer in planned}, {layer: thr[layer] for layer in planned}, meta)

    def map_plan(self, layers: Iterable[int] | None = None, *, k: int = 1, thresholds: Thresholds = "chance",
                 quantile: float = 0.99, method: str | None = None) -> tuple[list[int], dict[str, Any]]:
        """The layers :meth:`flow_map` computes (those with predecessor SAEs) and the settings it writes
        with them (``meta``, what a resumed map must agree with); checks the layers, ``k``, ``quantile``
        and ``method``."""
        check_int(k, "k", low=1)
        check_quantile(quantile)
        if method is not None:
            _data_free(method)
        res_layers = [layer for layer in self.bank.layers if ("res", layer) in self.bank]
        wanted = res_layers if layers is None else [check_layer(layer, "res") for layer in layers]
        unknown = [layer for layer in wanted if layer not in res_layers]
        if unknown:
            raise UnknownFeatureError(f"layers {unknown} have no res SAE: the bank has {self.bank.describe()}")
        planned = [layer for layer in wanted if self.predecessor_keys(layer)]
        if not planned:
            raise BankError(f"no layer of {wanted} has predecessor SAEs (res(L-1), mlp(L) or att(L))")
        threshold_method = thresholds if isinstance(thresholds, str) else "fixed"
        # fixed thresholds are part of what a map means: a resume with others is refused (issue 24 #7)
        fixed = (None if isinstance(thresholds, str) else float(thresholds) if isinstance(thresholds, (int, float))
                 else {site: float(v) for site, v in sorted(thresholds.items())})
        meta = {"k": k, "bank_fingerprint": self.bank.fingerprint(), "bank": self.bank.describe(),
                "threshold_method": threshold_method, "fixed_thresholds": fixed, "quantile": quantile,
                "planned": planned}
        if method is not None:       # absent for the cosine: maps written before methods existed still resume
            meta["method"] = method
        return planned, meta
