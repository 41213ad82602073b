"""The paper's deactivation experiment (method section 5): :func:`validate`.

:func:`validate` (also ``FlowTracer.validate``) runs the protocol with the top1 / top5 /
random / permutation / pearson / exhaustive methods, the r sweep and the LM-loss change
of sampled interventions; results land in a
:class:`~tl_featureflow.causal.results.ValidationReport`. The real-model table is in
docs/results.md (``demos/validate_smollm2.py``), the throughput benchmark in
docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_featureflow.backend import ModelBackend, backend_of
from tl_featureflow.causal.attribution import layer_activations
from tl_featureflow.causal.interventions import Intervention, intervened, res_activations, target_activations
from tl_featureflow.checks import check_int, check_number, check_tokens, takes_settings
from tl_featureflow.errors import BankError, InvalidArgumentError
from tl_featureflow.flow import methods as registry
from tl_featureflow.flow.methods import METHODS
from tl_featureflow.refs import Site
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.preflight import preflight_on_load

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from tl_featureflow.causal.results import ValidationReport
    from tl_featureflow.flow.tracer import FlowTracer

__all__ = ["validate", "ValidationSettings", "text_generator", "METHODS"]

#: The step between the seeds of consecutive texts (2^64 / golden ratio, SplitMix64's increment): text 0 keeps
#: the run's seed, the others' seeds lie far apart.
_TEXT_SEED_STEP = 0x9E3779B97F4A7C15


def text_generator(seed: int, text: int) -> torch.Generator:
    """The generator of one text's random draws in :func:`validate` (its positions, targets and loss samples).

    Seeded from the run's ``seed`` and the text's index in the whole input (text 0 gets ``seed``
    itself), never from the draws of the texts before it: a text gets the same draws whichever
    texts are validated with it, so shards of the texts validated apart (ranks of a distributed
    run) and merged give the rows of one run.
    """
    return torch.Generator().manual_seed((seed + text * _TEXT_SEED_STEP) % 2**64)


def _texts(texts: Sequence[int] | None, n_texts: int) -> list[int]:
    """The indices of the texts to validate: all by default, else distinct, increasing and in range."""
    if texts is None:
        return list(range(n_texts))
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise InvalidArgumentError(f"texts={texts!r}: expected a sequence of text indices, e.g. range(4, 8)")
    chosen = [check_int(t, "text", low=0, high=n_texts - 1, context=f" (in texts; there are {n_texts} texts)")
              for t in texts]
    if any(b <= a for a, b in zip(chosen, chosen[1:], strict=False)):
        raise InvalidArgumentError(f"texts={list(texts)!r}: expected distinct indices in increasing order")
    return chosen


@dataclass(frozen=True)
class ValidationSettings:
    """The options of one :func:`validate` run, as one value (``validate(..., settings=s)``).

    Which layers, texts and precomputed matches to use stay arguments of the call: they belong
    to the bank and data at hand. A keyword passed to :func:`validate` beside ``settings``
    overrides that field. Fields are checked here, each error naming its field.

    >>> s = ValidationSettings(methods=("top1", "random"), r=(0.0, 0.5), max_targets=10)
    >>> s.r, s.positions_per_text
    ((0.0, 0.5), 5)
    >>> ValidationSettings(max_targets=0)
    Traceback (most recent call last):
    ...
    tl_featureflow.errors.InvalidArgumentError: max_targets=0 is out of range: expected an int >= 1
    """

    methods: tuple[str, ...] = tuple(METHODS)
    r: float | tuple[float, ...] = 0.0
    positions_per_text: int = 5
    max_targets: int = 25
    seed: int = 0
    batch_rows: int = 16
    sweep_methods: tuple[str, ...] = ("top1",)
    loss_samples: int = 0

    def __post_init__(self) -> None:
        known = registry.names()
        for name in ("methods", "sweep_methods"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence) or (name == "methods" and not value):
                raise InvalidArgumentError(f"{name}={value!r}: expected a non-empty list of some of {known}")
            bad = [m for m in value if m not in known]
            if bad:
                raise InvalidArgumentError(f"{name}={value!r} holds unknown matching methods {bad}: "
                                           f"expected some of {known}")
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.r, Sequence) and not isinstance(self.r, str):
            rs = tuple(check_number(x, "r", context=f" (in r={list(self.r)!r})") for x in self.r)
            if not rs:
                raise InvalidArgumentError("r=() is empty: expected a number or a non-empty list of numbers")
            object.__setattr__(self, "r", rs)
        else:
            object.__setattr__(self, "r", check_number(self.r, "r"))
        for name, low in (("positions_per_text", 1), ("max_targets", 1), ("batch_rows", 1), ("loss_samples", 0),
                          ("seed", 0)):
            check_int(getattr(self, name), name, low=low)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _method_matches(tracer: Any, layer: int, method: str, seed: int, alive: Mapping[Any, Tensor] | None = None,
                    cache: dict[Any, Tensor] | None = None) -> dict[Site, Tensor]:
    """For every res(layer) feature, its matched predecessor indices per site, ``[d_sae, m]`` (-1: none),
    from a data-free method's table (``{}`` for methods that need activations: chosen in validate)."""
    chosen = registry.get(method)
    if chosen.table is None:
        return {}
    context = registry.MatchContext(tracer, seed, alive, {} if cache is None else cache)
    return {site: chosen.table(context, layer, site, key) for site, key in tracer.predecessor_keys(layer).items()}


@takes_settings(ValidationSettings)
@torch.no_grad()
def validate(
    tracer: FlowTracer,
    model: HookedTransformer,
    tokens: Int[Tensor, "n_texts pos"],
    *,
    settings: ValidationSettings | None = None,
    layers: Sequence[int],
    methods: Sequence[str] = METHODS,
    r: float | Sequence[float] = 0.0,
    positions_per_text: int = 5,
    max_targets: int = 25,
    seed: int = 0,
    batch_rows: int = 16,
    sweep_methods: Sequence[str] = ("top1",),
    loss_samples: int = 0,
    pearson: Mapping[tuple[int, Site], Tensor] | None = None,
    alive: Mapping[Any, Tensor] | None = None,
    texts: Sequence[int] | None = None,
    progress: bool = True,
    preflight: bool = True,
) -> ValidationReport:
    """The paper's deactivation experiment (method section 5), layer-local and batched.

    ``settings`` (a :class:`ValidationSettings`) gives the options from ``methods`` to
    ``loss_samples`` as one value; a keyword passed beside it overrides its field.

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
    position 0 excluded, correlate best with the target's; or precomputed on a token
    stream of their own, ``pearson=`` :func:`~tl_featureflow.causal.pearson.pearson_matches`,
    as the paper did on 100K tokens), ``exhaustive`` (per site, the active feature whose
    removal alone lowers the target most, found by trying each; the sites' choices are
    removed together), ``exhaustive_single`` (the paper's exhaustive search: the one active
    predecessor feature, over all three sites, whose removal alone lowers the target most)
    and ``attribution`` (the active predecessor feature with the largest contribution to
    the target's pre-activation, :mod:`~tl_featureflow.causal.attribution`: one forward,
    no search). With ``attribution``, every sampled target's split is kept in
    ``report.attributions`` (site shares, and the rank of each site's top-1 cosine match
    among that site's contributors).

    ``alive``: per SAE key, a bool mask of features that fire on held-out text (e.g. from
    ``TopContexts.hist``): top1/top5/random then match among live features only, and
    ``meta["dead_top1"]`` reports how often the unrestricted top-1 match is dead.

    ``loss_samples`` interventions per text and layer (main ``r``, seeded) also get the
    relative change of the LM loss, ``(L_new - L_old) / L_old``, from a full forward.

    Randomness is per text (:func:`text_generator`). ``texts``: validate only these rows of
    ``tokens`` (their global indices, increasing; default all), as one shard of a larger run:
    matches fitted on the texts (``pearson``) still read all of ``tokens``, and
    :meth:`~tl_featureflow.causal.results.ValidationReport.merge` of the shards' reports is the
    report of all the texts, row for row.

    ``preflight``: a bank of SAELens releases (:meth:`SAEBank.from_pretrained`) meeting ``model`` for
    the first time is checked first (:func:`~tl_featureflow.saes.preflight.preflight_on_load`, a
    warning per SAE that does not reconstruct its site); ``False`` (or ``TL_FEATUREFLOW_PREFLIGHT=0``)
    skips it.
    """
    from tqdm.auto import tqdm

    from tl_featureflow.model import FlowTransformer

    rs = _check_arguments(tracer, model, tokens, layers, methods, r)
    preflight_on_load(model, tracer.bank, enabled=preflight, stacklevel=5)
    for name, value, low in (("positions_per_text", positions_per_text, 1), ("max_targets", max_targets, 1),
                             ("batch_rows", batch_rows, 1), ("loss_samples", loss_samples, 0), ("seed", seed, 0)):
        check_int(value, name, low=low)
    layers = list(layers)
    chosen_texts = _texts(texts, int(tokens.shape[0]))
    flow = FlowTransformer.from_hooked(model)
    run = _Experiment(tracer, flow, list(layers), list(methods), rs, list(sweep_methods), max_targets, batch_rows,
                      loss_samples, text_generator(seed, 0))
    live: dict[Any, Tensor] = {}
    run.matches = {(layer, m): _method_matches(tracer, layer, m, seed, alive, live) for layer in layers for m in methods}
    all_feats = None
    if "pearson" in methods and pearson is not None:
        for layer in layers:
            missing = [site for site in run.pred_keys[layer] if (layer, site) not in pearson]
            if missing:
                raise InvalidArgumentError(f"pearson matches lack layer {layer}, sites {missing}")
            run.matches[(layer, "pearson")] = {site: pearson[(layer, site)] for site in run.pred_keys[layer]}
    fitted = [m for m in run.needing("activations") if pearson is None or m != "pearson"]
    if fitted:  # data-based matching from the texts themselves
        _, all_feats = flow.run_with_features(tokens, bank=run.needed, return_logits=False)
        run.fit_matches(all_feats, fitted)
    rows: list[Any] = []
    for t in tqdm(chosen_texts, desc="validating", unit="text", disable=not progress):
        try:
            text = tokens[t:t + 1]
            run.gen = text_generator(seed, t)
            feats = run.text_features(text, all_feats, t)
            raw = layer_activations(flow, text, layers, bank=run.bank)    # one pass: every layer's stream and sites
            n_pos = min(positions_per_text, text.shape[1] - 1)
            positions = (1 + torch.randperm(text.shape[1] - 1, generator=run.gen)[:n_pos]).tolist()
            for layer in layers:
                rows += run.layer_rows(t, text, feats, raw[layer], layer, positions)
        except Exception as exc:
            if hasattr(exc, "add_note"):           # Python 3.11+: the traceback (and a distributed run's error) says where
                exc.add_note(f"while validating text {t} (of {tokens.shape[0]})")
            raise
    bank = tracer.bank
    meta = {"layers": list(layers), "methods": list(methods), "r": rs[0], "r_values": rs,
            "sweep_methods": list(sweep_methods), "loss_samples": loss_samples,
            "positions_per_text": positions_per_text, "max_targets": max_targets, "seed": seed,
            "n_texts": int(tokens.shape[0]), "bank": bank.describe(),
            "pearson_source": None if "pearson" not in methods else
            (getattr(pearson, "meta", {"source": "given"}) if pearson is not None
             else {"source": "validation texts", "n_tokens": int(tokens.shape[0] * (tokens.shape[1] - 1))})}
    if alive is not None:
        meta["dead_top1"] = _dead_top1(tracer, layers, alive)
    if texts is not None and chosen_texts != list(range(int(tokens.shape[0]))):
        meta["texts"] = chosen_texts            # a shard: ValidationReport.merge drops it
    from tl_featureflow.causal.results import ValidationReport

    return ValidationReport(rows, run.counts, meta, attributions=run.attributions)


def _dead_top1(tracer: Any, layers: Sequence[int], alive: Mapping[Any, Tensor]) -> dict[str, dict[str, float]]:
    """Per layer and site, the share of res(L) features whose unrestricted top-1 match is dead."""
    out: dict[str, dict[str, float]] = {}
    for layer in layers:
        out[str(layer)] = {}
        for site, key in tracer.predecessor_keys(layer).items():
            if key in alive:
                top = tracer.match(key, ("res", layer), 1).indices[:, 0].cpu()
                out[str(layer)][site] = float((~alive[key].cpu()[top]).float().mean())
    return out


def _check_arguments(tracer: Any, model: HookedTransformer | ModelBackend, tokens: Tensor, layers: Sequence[int],
                     methods: Sequence[str], r: float | Sequence[float]) -> list[float]:
    """Everything :func:`validate` needs checked before it runs; returns the r values (main first)."""
    if isinstance(r, Sequence) and not isinstance(r, str):
        rs = [check_number(x, "r", context=f" (in r={list(r)!r})") for x in r]
    else:
        rs = [check_number(r, "r")]
    if not rs:
        raise InvalidArgumentError("r=[] is empty: expected a number or a non-empty list of numbers (0 removes)")
    known = registry.names()
    if isinstance(methods, str) or not methods:
        raise InvalidArgumentError(f"methods={methods!r}: expected a non-empty list of some of {known}")
    bad = [m for m in methods if m not in known]
    if bad:
        raise InvalidArgumentError(f"unknown matching methods {bad}: expected some of {known}")
    if isinstance(layers, (str, int)) or not isinstance(layers, Sequence) or not layers:
        raise InvalidArgumentError(f"layers={layers!r}: expected a non-empty list of layer indices, e.g. [14]")
    for layer in layers:
        check_int(layer, "layer", context=f" (in layers={list(layers)!r})")
    backend = backend_of(model)
    check_tokens(tokens, backend.d_vocab, n_ctx=backend.n_ctx, min_pos=2)
    for layer in layers:
        if ("res", layer) not in tracer.bank or not tracer.predecessor_keys(layer):
            raise BankError(f"layer {layer} needs a res SAE and at least one predecessor SAE: "
                            f"the bank has {tracer.bank.describe()}")
    return rs


Plan = list[tuple[tuple[int, int], list[Intervention], dict[str, Any]]]


@dataclass
class _Experiment:
    """The state of one :func:`validate` run and its steps, one text and layer at a time."""

    tracer: Any
    flow: Any
    layers: list[int]
    methods: list[str]
    rs: list[float]
    sweep_methods: list[str]
    max_targets: int
    batch_rows: int
    loss_samples: int
    gen: torch.Generator
    matches: dict[tuple[int, str], dict[Site, Tensor]] = field(default_factory=dict)
    counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    attributions: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from tl_featureflow.causal.results import ACTIVATION_GROUPS

        self.bank = self.tracer.bank.bind(self.flow)     # z-SAEs: their W_O is the model's being validated
        self.pred_keys = {layer: self.tracer.predecessor_keys(layer) for layer in self.layers}
        self.counts = {str(layer): {m: {g: 0 for g in ACTIVATION_GROUPS} for m in self.methods}
                       for layer in self.layers}
        keys = {("res", layer) for layer in self.layers}
        keys |= {k for layer in self.layers for k in self.pred_keys[layer].values()}
        self.needed = self.bank.select(sites=sorted({k[0] for k in keys}), layers=sorted({k[1] for k in keys}))

    def needing(self, needs: str) -> list[str]:
        """This run's methods that need ``needs`` (see :mod:`tl_featureflow.flow.methods`)."""
        return [m for m in self.methods if registry.get(m).needs == needs]

    def fit_matches(self, all_feats: Any, names: list[str]) -> None:
        """The tables of methods that need activations, fitted on the texts' (position 0 excluded)."""
        flat = {key: all_feats[key][:, 1:].reshape(-1, all_feats[key].shape[-1]) for key in all_feats}
        for name in names:
            fit = registry.get(name).fit
            for layer in self.layers:
                self.matches[(layer, name)] = fit(flat, layer, self.pred_keys[layer])

    def text_features(self, text: Tensor, all_feats: Any, t: int) -> Any:
        """Feature activations of one text (taken from the pearson pass when there was one)."""
        from tl_featureflow.model import FeatureCache

        if all_feats is not None:
            return FeatureCache({key: acts[t:t + 1] for key, acts in all_feats.items()})
        return self.flow.run_with_features(text, bank=self.needed, return_logits=False)[1]

    def layer_rows(self, t: int, text: Tensor, feats: Any, raw: dict[str, Tensor], layer: int,
                   positions: list[int]) -> list[Any]:
        """Plan the interventions of one text and layer, run them as batched rows, read the targets.

        ``raw``: the text's activations at this layer (:func:`~tl_featureflow.causal.attribution.layer_activations`;
        ``raw["res"]`` is the stream entering the layer), shared by the search, the attribution and the rows.
        """
        from tl_featureflow.causal.results import ValidationRow

        plan = self.plan(t, text, feats, raw, layer, positions)
        z_new = target_activations(self.flow, self.bank, text, layer, [p[0] for p in plan], [p[1] for p in plan],
                                   chunk_rows=self.batch_rows, entering=raw["res"][None]) if plan else torch.zeros(0)
        rows = [ValidationRow(**p[2], z_new=float(z)) for p, z in zip(plan, z_new.tolist(), strict=True)]
        self.add_loss_changes(text, plan, rows)
        return rows

    def plan(self, t: int, text: Tensor, feats: Any, raw: dict[str, Tensor], layer: int,
             positions: list[int]) -> Plan:
        """For every chosen target and method: the active matched predecessors to rescale (counted by group)."""
        from tl_featureflow.causal.results import group_name

        pred_keys = self.pred_keys[layer]
        best: dict[tuple[int, Any], Any] = {}
        if self.needing("search"):
            best = _exhaustive_choices(self.flow, self.bank, text, layer, positions, pred_keys, feats, self.batch_rows,
                                       entering=raw["res"][None])
        attribute = bool(self.needing("attribution"))
        plan: Plan = []
        for pos in positions:
            active = (feats["res", layer][0, pos] > 0).nonzero().squeeze(1)
            chosen = active[torch.randperm(len(active), generator=self.gen)[:self.max_targets]].tolist()
            if attribute and chosen:
                best.update(self.attribute(t, raw, layer, pos, chosen))
            for index in chosen:
                for method in self.methods:
                    active_preds = self.active_predecessors(method, layer, pos, index, feats, best)
                    group = group_name(set(active_preds))
                    self.counts[str(layer)][method][group] += 1
                    if active_preds:
                        plan += self.plan_target(t, feats, layer, pos, index, method, group, active_preds)
        return plan

    def active_predecessors(self, method: str, layer: int, pos: int, index: int, feats: Any,
                            best: dict[tuple[int, Site], Tensor]) -> dict[Site, list[int]]:
        """Per site, the target's matched predecessors (by ``method``) that are active at ``pos``."""
        out: dict[Site, list[int]] = {}
        chosen = registry.get(method)
        if chosen.picks == "one":     # one feature, from any site: the search's or the attribution's best
            site, feature = best.get((pos, chosen.needs, index), (None, -1))
            if site is not None and site in self.pred_keys[layer]:
                if float(feats[self.pred_keys[layer][site]][0, pos, feature]) > 0:
                    out[site] = [feature]
            return out
        for site, key in self.pred_keys[layer].items():
            if chosen.needs == "search":
                choice = best.get((pos, site))
                cands = [] if choice is None else [int(choice[index])]
            else:
                cands = [c for c in self.matches[(layer, method)][site][index].tolist() if c >= 0]
            on = [c for c in cands if float(feats[key][0, pos, c]) > 0]
            if on:
                out[site] = on
        return out

    def attribute(self, t: int, raw: dict[str, Tensor], layer: int, pos: int,
                  targets: list[int]) -> dict[tuple[int, str, int], tuple[Site | None, int]]:
        """Split the targets' pre-activations; record the split; return each target's largest contributor."""
        from tl_featureflow.causal.attribution import split_at

        split = split_at(self.bank, raw, layer, pos, targets)
        sites, indices = split.best()
        parts = {site: split.site_parts(site) for site in split.bias}
        if (layer, "top1") not in self.matches:          # the ranks compare with top-1 cosine even when it is not run
            self.matches[(layer, "top1")] = _method_matches(self.tracer, layer, "top1", 0)
        top1 = self.matches[(layer, "top1")]
        for i, target in enumerate(targets):
            record: dict[str, Any] = {"text": t, "position": pos, "target": f"{layer}/res/{target}",
                                      "pre": float(split.pre[i]), "constant": float(split.constant[i]),
                                      "best": None if sites[i] is None else f"{sites[i]}:{indices[i]}"}
            for site in split.bias:
                record[f"{site}_features"] = float(split.features[site][:, i].sum())
                record[f"{site}_error"] = float(split.error[site][i])
                record[f"{site}_bias"] = float(split.bias[site][i])
                record[f"{site}_total"] = float(parts[site][i])
                if site in top1:
                    match = int(top1[site][target, 0])
                    record[f"{site}_top1_rank"] = int(split.rank(site, match)[i]) if match >= 0 else 0
                    record[f"{site}_top1_contribution"] = float(split.contribution(site, match)[i]) if match >= 0 else 0.0
                    record[f"{site}_active"] = int(split.indices[site].numel())
                if sites[i] is not None:
                    record["best_contribution"] = float(split.contribution(sites[i], indices[i])[i])
            self.attributions.append(record)
        return {(pos, "attribution", target): (sites[i], indices[i]) for i, target in enumerate(targets)}

    def plan_target(self, t: int, feats: Any, layer: int, pos: int, index: int, method: str, group: str,
                    active_preds: dict[Site, list[int]]) -> Plan:
        """The rows of one target and method: one per r value (the r sweep for ``sweep_methods``)."""
        from tl_featureflow.refs import FeatureRef

        pred_keys = self.pred_keys[layer]
        rows: Plan = []
        for rr in (self.rs if method in self.sweep_methods else self.rs[:1]):
            items = [Intervention(pred_keys[s][0], pred_keys[s][1], tuple(f), (pos,), rr)
                     for s, f in active_preds.items()]
            info = {"text": t, "position": pos, "method": method, "group": group, "r": rr,
                    "z_old": float(feats["res", layer][0, pos, index]),
                    "target": str(FeatureRef(layer, "res", index)),
                    "deactivated": [str(FeatureRef(i.layer, i.site, f)) for i in items for f in i.features]}
            rows.append(((pos, index), items, info))
        return rows

    def add_loss_changes(self, text: Tensor, plan: Plan, rows: list[Any]) -> None:
        """``loss_samples`` seeded rows at the main r get ``(L_new - L_old) / L_old`` from a full forward."""
        main = [i for i, row in enumerate(rows) if row.r == self.rs[0]]
        if self.loss_samples <= 0 or not main:
            return
        clean_loss = float(self.flow(text, return_type="loss"))
        for i in torch.randperm(len(main), generator=self.gen)[:self.loss_samples].tolist():
            with intervened(self.flow, self.bank, plan[main[i]][1]):
                loss = float(self.flow(text, return_type="loss"))
            rows[main[i]].loss_change = (loss - clean_loss) / clean_loss


def _exhaustive_choices(flow: Any, bank: SAEBank, text: Tensor, layer: int, positions: Sequence[int],
                        pred_keys: dict[Site, tuple[Site, int]], feats: Any, batch_rows: int,
                        entering: Tensor | None = None) -> dict:
    """Every active predecessor feature removed alone, one row each (a row serves all targets).

    Returns ``{(pos, site): Tensor[d_sae]}``, per site the feature whose removal leaves each
    res(layer) feature lowest (method ``exhaustive``), and ``{(pos, "search", i):
    (site, feature)}``, the single best removal over all sites (the paper's exhaustive search)
    for every res(layer) feature ``i`` active at ``pos``.
    """
    trials: list[tuple[int, Site, int]] = []
    for pos in positions:
        for site, key in pred_keys.items():
            for feature in (feats[key][0, pos] > 0).nonzero().squeeze(1).tolist():
                trials.append((pos, site, feature))
    if not trials:
        return {}
    all_acts = res_activations(flow, bank, text, layer, [p for p, _, _ in trials],   # [n_trials, d_sae]
                               [[Intervention(pred_keys[s][0], pred_keys[s][1], (f,), (p,), 0.0)] for p, s, f in trials],
                               chunk_rows=batch_rows, entering=entering).cpu()
    out: dict = {}
    for pos in positions:
        at_pos = [i for i, (p, _, _) in enumerate(trials) if p == pos]
        for site in pred_keys:
            rows = [i for i in at_pos if trials[i][1] == site]
            if rows:
                features = torch.tensor([trials[i][2] for i in rows])
                out[(pos, site)] = features[all_acts[rows].argmin(dim=0)]   # per target feature
        if at_pos:
            winners = all_acts[at_pos].argmin(dim=0)                           # [d_sae]: row of the best single removal
            for target in (feats["res", layer][0, pos] > 0).nonzero().squeeze(1).tolist():
                _, site, feature = trials[at_pos[int(winners[target])]]
                out[(pos, "search", target)] = (site, feature)
    return out
