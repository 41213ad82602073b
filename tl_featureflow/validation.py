"""Causal checks of feature matches by deactivation (method section 5): the building blocks.

The intervention rescales chosen features of one SAE at chosen token positions:

    h <- h + (r - 1) * a * v

where ``a`` is read by the SAE's own encoder from the same ``h`` and ``v`` is the
feature's decoder row (so ``a * v`` is exactly the feature's contribution to the
SAE's reconstruction). ``r = 0`` removes the feature (up to reconstruction error),
``r = 1`` changes nothing (bit for bit), ``r < 0`` reverses it, ``r > 1`` amplifies it.

An edit at res(L-1), mlp(L) or att(L) only changes what layer L computes, so reading
the effect on a res(L) feature needs layer L alone: :func:`target_activations` starts
from the cached residual stream entering layer L and runs many interventions on one
text as rows of one batch. ``layer_local=False`` gives the same numbers from one full
forward per intervention (the reference the tests compare against).

:func:`validate` (also ``FlowTracer.validate``) runs the paper's protocol with the
top1 / top5 / random / permutation / pearson / exhaustive methods, the r sweep and
the LM-loss change of sampled interventions; results land in a
:class:`~tl_featureflow.report.ValidationReport`. The real-model table is in
docs/results.md (``demos/validate_smollm2.py``), the throughput benchmark in
docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_featureflow.bank import SAEBank
from tl_featureflow.errors import FeatureFlowError
from tl_featureflow.refs import Site, check_site, hook_name

__all__ = ["Intervention", "rescale", "intervention_hooks", "intervened", "res_activations", "target_activations",
           "validate", "METHODS"]


@dataclass(frozen=True)
class Intervention:
    """Rescale ``features`` of the SAE at ``(site, layer)`` at token ``positions`` by ``r``."""

    site: Site
    layer: int
    features: tuple[int, ...]
    positions: tuple[int, ...]
    r: float = 0.0

    def __post_init__(self) -> None:
        check_site(self.site)
        if not self.features or not self.positions:
            raise FeatureFlowError(f"an intervention needs features and positions, got {self}")

    @property
    def key(self) -> tuple[Site, int]:
        return self.site, self.layer


def rescale(
    h: Float[Tensor, "batch pos d_model"],
    sae: Any,
    features: Sequence[int],
    positions: Sequence[int],
    r: float,
) -> Float[Tensor, "batch pos d_model"]:
    """``h + (r - 1) * a * v`` at ``positions`` for ``features`` (a new tensor; ``h`` is untouched).

    ``r == 1`` returns ``h`` itself. Out-of-range features or positions raise.
    """
    if r == 1:
        return h
    d_sae, seq = sae.cfg.d_sae, h.shape[1]
    if any(not 0 <= f < d_sae for f in features):
        raise FeatureFlowError(f"features {list(features)} out of range: the SAE has d_sae {d_sae}")
    if any(not -seq <= p < seq for p in positions):
        raise FeatureFlowError(f"positions {list(positions)} out of range for a sequence of {seq} tokens")
    feats = torch.as_tensor(list(features), device=h.device)
    pos = torch.as_tensor(list(positions), device=h.device)
    sub = h[:, pos]                                               # [batch, n_pos, d_model]
    with torch.no_grad():
        acts = sae.encode(sub.to(sae.W_dec.dtype))[..., feats]   # [batch, n_pos, n_feat]
    delta = (r - 1) * (acts @ sae.W_dec[feats].detach())           # [batch, n_pos, d_model]
    out = h.clone()
    out[:, pos] = sub + delta.to(h.dtype)
    return out


def intervention_hooks(bank: SAEBank, interventions: Sequence[Intervention]) -> list[tuple[str, Callable]]:
    """TransformerLens forward hooks applying ``interventions`` (for ``model.hooks`` / ``run_with_hooks``)."""
    hooks = []
    for item in interventions:
        sae = bank[item.key]

        def hook(h: Tensor, hook: Any, item: Intervention = item, sae: Any = sae) -> Tensor:
            return rescale(h, sae, item.features, item.positions, item.r)

        hooks.append((hook_name(*item.key), hook))
    return hooks


@contextmanager
def intervened(model: Any, bank: SAEBank, interventions: Sequence[Intervention]) -> Iterator[Any]:
    """``with intervened(model, bank, [...]): model(tokens)``; hooks are always removed."""
    with model.hooks(fwd_hooks=intervention_hooks(bank, interventions)):
        yield model


@torch.no_grad()
def res_activations(
    model: Any,
    bank: SAEBank,
    tokens: Int[Tensor, "1 pos"],
    layer: int,
    positions: Sequence[int],
    interventions: Sequence[Sequence[Intervention]],
    *,
    layer_local: bool = True,
    chunk_rows: int = 16,
) -> Float[Tensor, "n d_sae"]:
    """All res(``layer``) feature activations at ``positions[i]`` under ``interventions[i]``.

    Interventions must sit at res(layer-1), mlp(layer) or att(layer): the sites whose
    edits reach res(layer) through layer ``layer`` alone. With ``layer_local`` every row
    reruns only layer ``layer`` from the residual stream entering it (computed once), in
    batches of ``chunk_rows`` (small batches keep the layer's activations in cache);
    otherwise each row is one full forward (the reference).
    """
    if len(positions) != len(interventions):
        raise FeatureFlowError(f"{len(positions)} positions but {len(interventions)} intervention lists")
    allowed = {("res", layer - 1), ("mlp", layer), ("att", layer)}
    for items in interventions:
        for item in items:
            if item.key not in allowed:
                raise FeatureFlowError(
                    f"intervention at {item.key} cannot reach res({layer}) through layer {layer} alone: "
                    f"expected one of {sorted(allowed)}")
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise FeatureFlowError(f"tokens must be one text [1, pos], got shape {tuple(tokens.shape)}")
    target_sae = bank[("res", layer)]
    out_name = hook_name("res", layer)
    if not layer_local:
        picked_rows = []
        for pos, items in zip(positions, interventions):
            with intervened(model, bank, items):
                _, cache = model.run_with_cache(tokens, names_filter=[out_name], stop_at_layer=layer + 1)
            picked_rows.append(cache[out_name][0, pos])
        return target_sae.encode(torch.stack(picked_rows).to(target_sae.W_dec.dtype))

    entering = model(tokens, stop_at_layer=layer)   # the stream entering layer L, computed once
    out = [_layer_local_rows(model, bank, entering, layer, positions[i:i + chunk_rows], interventions[i:i + chunk_rows])
           for i in range(0, len(positions), chunk_rows)]
    return torch.cat(out) if out else torch.zeros(0, target_sae.cfg.d_sae)


def _layer_local_rows(model: Any, bank: SAEBank, entering: Tensor, layer: int, positions: Sequence[int],
                      interventions: Sequence[Sequence[Intervention]]) -> Tensor:
    """One batch of rows through layer ``layer`` alone (see :func:`res_activations`)."""
    n = len(positions)
    resid = entering.expand(n, -1, -1).clone()
    for row, items in enumerate(interventions):     # res(L-1) edits act on the input directly
        for item in items:
            if item.site == "res":
                resid[row:row + 1] = rescale(resid[row:row + 1], bank[item.key], item.features, item.positions, item.r)
    hooks = []
    for site in ("mlp", "att"):
        rows = [(row, item) for row, items in enumerate(interventions) for item in items if item.site == site]
        if rows:
            def hook(h: Tensor, hook: Any, rows: list = rows, sae: Any = bank[(site, layer)]) -> Tensor:
                h = h.clone()
                for row, item in rows:
                    h[row:row + 1] = rescale(h[row:row + 1], sae, item.features, item.positions, item.r)
                return h

            hooks.append((hook_name(site, layer), hook))
    with model.hooks(fwd_hooks=hooks):
        resid_out = model(resid, start_at_layer=layer, stop_at_layer=layer + 1)
    pos = torch.tensor(list(positions), device=resid_out.device)
    picked = resid_out[torch.arange(n, device=resid_out.device), pos]     # [n, d_model]
    target_sae = bank[("res", layer)]
    return target_sae.encode(picked.to(target_sae.W_dec.dtype))


def target_activations(
    model: Any,
    bank: SAEBank,
    tokens: Int[Tensor, "1 pos"],
    layer: int,
    targets: Sequence[tuple[int, int]],
    interventions: Sequence[Sequence[Intervention]],
    *,
    layer_local: bool = True,
    chunk_rows: int = 16,
) -> Float[Tensor, " n"]:
    """Activation of res(``layer``) feature ``targets[i] = (position, index)`` under ``interventions[i]``
    (see :func:`res_activations`)."""
    if len(targets) != len(interventions):
        raise FeatureFlowError(f"{len(targets)} targets but {len(interventions)} intervention lists")
    acts = res_activations(model, bank, tokens, layer, [p for p, _ in targets], interventions,
                           layer_local=layer_local, chunk_rows=chunk_rows)
    index = torch.tensor([i for _, i in targets], device=acts.device)
    return acts[torch.arange(len(targets), device=acts.device), index]

METHODS: tuple[str, ...] = ("top1", "top5", "random", "permutation", "pearson", "exhaustive")


def _pearson_matches(acts: dict, layer: int, pred_keys: dict) -> dict[Site, Tensor]:
    """Per site, the predecessor whose activations correlate best with each res(layer) feature.

    ``acts[key]`` are ``[n_tokens, d_sae]`` activations over the texts. Features that never
    vary get correlation -inf (no match: index -1).
    """
    def standardise(x: Tensor) -> Tensor:
        x = x.double() - x.double().mean(0)
        norm = x.norm(dim=0)
        return torch.where(norm > 0, x / norm.clamp_min(1e-30), torch.zeros_like(x)), norm > 0

    target, target_ok = standardise(acts[("res", layer)])
    out: dict[Site, Tensor] = {}
    for site, key in pred_keys.items():
        source, source_ok = standardise(acts[key])
        corr = target.T @ source                                    # [d_res, d_pred]
        corr[:, ~source_ok] = float("-inf")
        best = corr.argmax(dim=1)
        best[~target_ok | torch.isinf(corr.max(dim=1).values)] = -1
        out[site] = best[:, None]
    return out


def _method_matches(tracer: Any, layer: int, method: str, seed: int) -> dict[Site, Tensor]:
    """For every res(layer) feature, its matched predecessor indices per site: ``[d_sae, m]`` (-1: none)."""
    from tl_featureflow.matching import permutation_match

    dst = ("res", layer)
    out: dict[Site, Tensor] = {}
    for site, key in tracer.predecessor_keys(layer).items():
        width = tracer.bank.d_sae(*key)
        if method == "top1":
            out[site] = tracer.match(key, dst, 1).indices
        elif method == "top5":
            out[site] = tracer.match(key, dst, min(5, width)).indices
        elif method == "random":
            top = tracer.match(key, dst, min(5, width)).indices
            gen = torch.Generator().manual_seed(seed * 1009 + layer * 7 + len(out))
            pick = torch.randint(0, top.shape[1], (top.shape[0], 1), generator=gen).to(top.device)
            out[site] = top.gather(1, pick)
        elif method in ("exhaustive", "pearson"):
            continue  # need activations: chosen in validate
        elif method == "permutation":
            _, indices = permutation_match(tracer.bank.decoder(*dst), tracer.bank.decoder(*key))
            out[site] = indices[:, None]
        else:
            raise FeatureFlowError(f"unknown matching method {method!r}: expected some of {METHODS}")
    return out


@torch.no_grad()
def validate(
    tracer: Any,
    model: Any,
    tokens: Int[Tensor, "n_texts pos"],
    *,
    layers: Sequence[int],
    methods: Sequence[str] = METHODS,
    r: float | Sequence[float] = 0.0,
    positions_per_text: int = 5,
    max_targets: int = 25,
    seed: int = 0,
    batch_rows: int = 16,
    sweep_methods: Sequence[str] = ("top1",),
    loss_samples: int = 0,
    progress: bool = True,
) -> Any:
    """The paper's deactivation experiment (method section 5), layer-local and batched.

    For each text, ``positions_per_text`` random non-BOS positions; at each, up to
    ``max_targets`` active res(L) features (seeded). For every target and method, its
    matched predecessors in res(L-1), mlp(L), att(L) that are active at that token are
    rescaled by ``r`` there (0 removes them), layer L is recomputed, and the target's
    new activation recorded. Targets with no active matched predecessor ("From
    nowhere") are counted in the groups but not intervened on. ``r`` may be a list:
    the first value is the main one, the others make an r sweep (run for the methods
    in ``sweep_methods`` only, since every r value adds a row per target).

    Methods: ``top1``, ``top5`` (all five; a predecessor counts as active if any of
    the five is), ``random`` (one of the top five, seeded), ``permutation`` (SAE Match),
    ``pearson`` (data-based: the feature whose activations over all the given texts,
    position 0 excluded, correlate best with the target's), ``exhaustive`` (per site, the active feature whose removal alone lowers the target
    most, found by trying each: the upper bound of single-feature matching).

    ``loss_samples`` interventions per text and layer (main ``r``, seeded) also get the
    relative change of the LM loss, ``(L_new - L_old) / L_old``, from a full forward.
    """
    from tqdm.auto import tqdm

    from tl_featureflow.model import FeatureCache, FlowTransformer
    from tl_featureflow.refs import FeatureRef
    from tl_featureflow.report import GROUPS, ValidationReport, ValidationRow, group_name

    rs = [float(r)] if isinstance(r, (int, float)) else [float(x) for x in r]
    if not rs:
        raise FeatureFlowError("r must be a number or a non-empty list of numbers")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise FeatureFlowError(f"unknown matching methods {bad}: expected some of {METHODS}")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise FeatureFlowError(f"tokens must be [n_texts, pos] with pos >= 2, got {tuple(tokens.shape)}")
    bank = tracer.bank
    for layer in layers:
        if ("res", layer) not in bank or not tracer.predecessor_keys(layer):
            raise FeatureFlowError(f"layer {layer} needs a res SAE and at least one predecessor SAE: the bank has {bank.describe()}")
    flow = FlowTransformer.from_hooked(model)
    matches = {(layer, m): _method_matches(tracer, layer, m, seed) for layer in layers for m in methods}
    keys = {("res", layer) for layer in layers} | {k for layer in layers for k in tracer.predecessor_keys(layer).values()}
    needed = bank.select(sites=sorted({k[0] for k in keys}), layers=sorted({k[1] for k in keys}))
    all_feats = None
    if "pearson" in methods:  # the paper's data-based matching: correlations over all the given texts
        _, all_feats = flow.run_with_features(tokens, bank=needed, return_logits=False)
        flat = {key: all_feats[key][:, 1:].reshape(-1, all_feats[key].shape[-1]) for key in all_feats}
        for layer in layers:
            matches[(layer, "pearson")] = _pearson_matches(flat, layer, tracer.predecessor_keys(layer))
        del flat
    gen = torch.Generator().manual_seed(seed)
    rows: list[ValidationRow] = []
    counts = {str(layer): {m: {g: 0 for g in GROUPS} for m in methods} for layer in layers}
    for t in tqdm(range(tokens.shape[0]), desc="validating", unit="text", disable=not progress):
        text = tokens[t:t + 1]
        if all_feats is not None:  # already computed for pearson: no second forward
            feats = FeatureCache({key: acts[t:t + 1] for key, acts in all_feats.items()})
        else:
            _, feats = flow.run_with_features(text, bank=needed, return_logits=False)
        n_pos = min(positions_per_text, text.shape[1] - 1)
        positions = (1 + torch.randperm(text.shape[1] - 1, generator=gen)[:n_pos]).tolist()
        for layer in layers:
            pred_keys = tracer.predecessor_keys(layer)
            plan: list[tuple[tuple[int, int], list[Intervention], dict[str, Any]]] = []
            best: dict[tuple[int, Site], Tensor] = {}
            if "exhaustive" in methods:
                best = _exhaustive_choices(flow, bank, text, layer, positions, pred_keys, feats, batch_rows)
            for pos in positions:
                active = (feats["res", layer][0, pos] > 0).nonzero().squeeze(1)
                chosen = active[torch.randperm(len(active), generator=gen)[:max_targets]].tolist()
                for index in chosen:
                    for method in methods:
                        active_preds: dict[Site, list[int]] = {}
                        for site, key in pred_keys.items():
                            if method == "exhaustive":
                                choice = best.get((pos, site))
                                cands = [] if choice is None else [int(choice[index])]
                            else:
                                cands = [c for c in matches[(layer, method)][site][index].tolist() if c >= 0]
                            on = [c for c in cands if float(feats[key][0, pos, c]) > 0]
                            if on:
                                active_preds[site] = on
                        group = group_name(set(active_preds))
                        counts[str(layer)][method][group] += 1
                        if not active_preds:
                            continue
                        for rr in (rs if method in sweep_methods else rs[:1]):
                            items = [Intervention(pred_keys[s][0], pred_keys[s][1], tuple(f), (pos,), rr)
                                     for s, f in active_preds.items()]
                            info = {"text": t, "position": pos, "method": method, "group": group, "r": rr,
                                    "z_old": float(feats["res", layer][0, pos, index]),
                                    "target": str(FeatureRef(layer, "res", index)),
                                    "deactivated": [str(FeatureRef(i.layer, i.site, f)) for i in items for f in i.features]}
                            plan.append(((pos, index), items, info))
            z_new = target_activations(flow, bank, text, layer, [p[0] for p in plan], [p[1] for p in plan],
                                       chunk_rows=batch_rows) if plan else torch.zeros(0)
            new_rows = [ValidationRow(**p[2], z_new=float(z)) for p, z in zip(plan, z_new.tolist())]
            main_rows = [i for i, row in enumerate(new_rows) if row.r == rs[0]]
            if loss_samples > 0 and main_rows:
                clean_loss = float(flow(text, return_type="loss"))
                for i in torch.randperm(len(main_rows), generator=gen)[:loss_samples].tolist():
                    with intervened(flow, bank, plan[main_rows[i]][1]):
                        loss = float(flow(text, return_type="loss"))
                    new_rows[main_rows[i]].loss_change = (loss - clean_loss) / clean_loss
            rows.extend(new_rows)
    meta = {"layers": list(layers), "methods": list(methods), "r": rs[0], "r_values": rs,
            "sweep_methods": list(sweep_methods), "loss_samples": loss_samples,
            "positions_per_text": positions_per_text, "max_targets": max_targets, "seed": seed,
            "n_texts": int(tokens.shape[0]), "bank": bank.describe()}
    return ValidationReport(rows, counts, meta)


def _exhaustive_choices(flow: Any, bank: SAEBank, text: Tensor, layer: int, positions: Sequence[int],
                        pred_keys: dict[Site, tuple[Site, int]], feats: Any, batch_rows: int) -> dict:
    """Per (position, site): for every res(layer) feature, the active feature of that site whose
    removal alone leaves it lowest. One row per (position, active feature) serves all targets."""
    trials: list[tuple[int, Site, int]] = []
    for pos in positions:
        for site, key in pred_keys.items():
            for feature in (feats[key][0, pos] > 0).nonzero().squeeze(1).tolist():
                trials.append((pos, site, feature))
    if not trials:
        return {}
    all_acts = res_activations(flow, bank, text, layer, [p for p, _, _ in trials],   # [n_trials, d_sae]
                               [[Intervention(pred_keys[s][0], pred_keys[s][1], (f,), (p,), 0.0)] for p, s, f in trials],
                               chunk_rows=batch_rows)
    out: dict[tuple[int, Site], Tensor] = {}
    for pos in positions:
        for site in pred_keys:
            rows = [i for i, (p, s, _) in enumerate(trials) if p == pos and s == site]
            if rows:
                features = torch.tensor([trials[i][2] for i in rows])
                out[(pos, site)] = features[all_acts[rows].argmin(dim=0).cpu()]   # per target feature
    return out
