"""Where a res(L) feature's pre-activation comes from: an exact split over its predecessors' features.

A target feature ``i`` of the res(L) SAE reads the residual stream linearly before its
JumpReLU: ``pre_i = (x_res(L) - b_dec) . w_i + b_enc_i`` with ``w_i = W_enc[:, i]``
(``b_dec`` subtracted when the SAE applies it to its input). The residual stream after
layer L is the sum of what enters the layer and what its attention and MLP add,

    x_res(L) = x_res(L-1) + x_att(L) + x_mlp(L),

and each of those is its SAE's reconstruction plus an error,
``x_s = sum_j a_sj W_dec_s[j] + b_dec_s + e_s``. So

    pre_i = constant_i + sum_s ( sum_j a_sj (W_dec_s[j] . w_i) + b_dec_s . w_i + e_s . w_i ),

exactly (up to float rounding): every active predecessor feature ``j`` of every site
contributes ``a_sj (W_dec_s[j] . w_i)``. This is the data-aware counterpart of the
paper's data-free cosine matching: the ``"attribution"`` method of
:func:`~tl_featureflow.causal.experiment.validate` removes, for each target, the single
active feature with the largest contribution, found with one forward and no search.
A site without an SAE in the bank counts whole as its error term.

>>> import torch
>>> from tl_featureflow.synthetic import planted_chain_bank, tiny_model
>>> model, (bank, _) = tiny_model(), planted_chain_bank()
>>> tokens = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
>>> split = split_preactivations(model, bank, tokens, layer=2, position=5, targets=[0, 1])
>>> torch.allclose(split.total(), split.pre, atol=1e-4)            # the parts add up to the SAE's own pre-activation
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_featureflow.backend import backend_of
from tl_featureflow.checks import check_tokens
from tl_featureflow.errors import BankError, InvalidArgumentError, UnknownFeatureError
from tl_featureflow.refs import FeatureRef, Site, block_of, hook_name, predecessor_keys, resid_pre_hook
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.sites import sae_input

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["PreactivationSplit", "split_preactivations", "split_from_activations", "PREDECESSOR_SITES"]

#: The three parts of x_res(L): what enters the layer (res(L-1)), and what attention and MLP add.
PREDECESSOR_SITES: tuple[Site, ...] = ("res", "att", "mlp")


@dataclass
class PreactivationSplit:
    """The split of ``n`` targets' pre-activations at one token.

    ``pre`` ``[n]`` is the res(L) SAE's own pre-activation; ``constant`` ``[n]`` its
    ``b_enc - b_dec . w``; per site, ``indices`` ``[k]`` are the active features and
    ``features`` ``[k, n]`` their contributions, ``bias`` and ``error`` ``[n]``.
    """

    targets: list[int]
    pre: Float[Tensor, " n"]
    constant: Float[Tensor, " n"]
    indices: dict[Site, Int[Tensor, " k"]]
    features: dict[Site, Float[Tensor, "k n"]]
    bias: dict[Site, Float[Tensor, " n"]]
    error: dict[Site, Float[Tensor, " n"]]

    def total(self) -> Float[Tensor, " n"]:
        """The sum of every part (equals ``pre`` up to float rounding)."""
        out = self.constant.clone()
        for site in self.bias:
            out += self.features[site].sum(0) + self.bias[site] + self.error[site]
        return out

    def site_parts(self, site: Site) -> Float[Tensor, " n"]:
        """Everything a site contributes: its features, its decoder bias and its error."""
        return self.features[site].sum(0) + self.bias[site] + self.error[site]

    def best(self) -> tuple[list[Site | None], list[int]]:
        """Per target, the active feature (any site) with the largest contribution: ``(sites, indices)``
        (``None`` / -1 where no predecessor feature is active)."""
        sites: list[Site | None] = []
        indices: list[int] = []
        for t in range(len(self.targets)):
            best_value, best_site, best_index = -float("inf"), None, -1
            for site, contrib in self.features.items():
                if contrib.shape[0]:
                    value, row = contrib[:, t].max(0)
                    if float(value) > best_value:
                        best_value, best_site, best_index = float(value), site, int(self.indices[site][row])
            sites.append(best_site)
            indices.append(best_index)
        return sites, indices

    def contribution(self, site: Site, feature: int) -> Float[Tensor, " n"]:
        """Per target, ``feature``'s contribution (0 when it is not active)."""
        where = (self.indices[site] == feature).nonzero()
        if not len(where):
            return torch.zeros(len(self.targets), dtype=torch.float64)
        return self.features[site][int(where[0, 0])]

    def rank(self, site: Site, feature: int) -> Int[Tensor, " n"]:
        """Per target, the rank (1 = largest) of ``feature``'s contribution among the site's active
        features; 0 when that feature is not active."""
        where = (self.indices[site] == feature).nonzero()
        if not len(where):
            return torch.zeros(len(self.targets), dtype=torch.long)
        contrib = self.features[site]
        mine = contrib[int(where[0, 0])]
        return (contrib > mine).sum(0) + 1


def _encoder_columns(sae: Any, targets: list[int]) -> tuple[Tensor, Tensor]:
    """``w`` ``[d_model, n]`` and the constant ``b_enc - b_dec . w`` ``[n]`` of a res SAE's targets."""
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm not in (None, "none"):
        raise BankError(f"the pre-activation split needs an SAE that reads its input linearly; this one "
                        f"normalises it (normalize_activations={norm!r})")
    w = sae.W_enc.detach()[:, targets].double()
    constant = sae.b_enc.detach()[targets].double()
    if sae.cfg.apply_b_dec_to_input:
        constant = constant - sae.b_dec.detach().double() @ w
    return w, constant


def split_from_activations(
    res_sae: Any,
    targets: list[int],
    raw: dict[Site, Float[Tensor, " d_model"]],
    saes: dict[Site, Any],
    acts: dict[Site, Float[Tensor, " d_sae"]],
    pre: Float[Tensor, " n"],
    decoders: dict[Site, tuple[Tensor, Tensor]] | None = None,
) -> PreactivationSplit:
    """The split from one token's activations (pure tensor maths).

    ``raw[s]``: the model's activation at each of :data:`PREDECESSOR_SITES` (``x_res(L-1)``,
    ``x_att(L)``, ``x_mlp(L)``); ``saes[s]``/``acts[s]``: the site's SAE and its feature
    activations there (sites without an SAE are absent); ``pre``: the targets' own
    pre-activations (the check the parts are read against). ``decoders[s]``: what the site's
    features write in ``d_model``, ``(W, b)`` (default ``W_dec, b_dec``; a z-SAE's through
    ``W_O``: :meth:`~tl_featureflow.saes.bank.SAEBank.model_decoder`).
    """
    w, constant = _encoder_columns(res_sae, targets)
    indices, features, bias, error = {}, {}, {}, {}
    for site in PREDECESSOR_SITES:
        x = raw[site].double()
        if site not in saes:
            indices[site] = torch.zeros(0, dtype=torch.long)
            features[site] = torch.zeros(0, len(targets), dtype=torch.float64)
            bias[site] = torch.zeros(len(targets), dtype=torch.float64)
            error[site] = x @ w
            continue
        sae, a = saes[site], acts[site].double()
        W_dec, b_dec = decoders[site] if decoders and site in decoders else (sae.W_dec.detach(), sae.b_dec.detach())
        W_dec, b_dec = W_dec.double(), b_dec.double()
        active = (a > 0).nonzero().squeeze(1)
        indices[site] = active.cpu()
        features[site] = (a[active, None] * (W_dec[active] @ w))
        bias[site] = b_dec @ w
        error[site] = (x - (a @ W_dec + b_dec)) @ w
    return PreactivationSplit(list(targets), pre.double(), constant, indices, features, bias, error)


@torch.no_grad()
def split_preactivations(model: HookedTransformer, bank: SAEBank, tokens: Int[Tensor, "1 seq"], *, layer: int,
                         position: int, targets: Sequence[int | str | FeatureRef]) -> PreactivationSplit:
    """Split the pre-activations of ``targets`` (res(``layer``) features) at ``position`` of one text.

    One forward up to ``layer`` with the activations cached; the bank's SAEs at res(L-1),
    att(L) and mlp(L) read their sites (any of them may be missing from the bank).
    """
    from tl_featureflow.model import FlowTransformer

    backend = backend_of(model)
    check_tokens(tokens, backend.d_vocab, n_ctx=backend.n_ctx)
    if tokens.shape[0] != 1:
        raise InvalidArgumentError(f"split_preactivations takes one text [1, seq], got shape {tuple(tokens.shape)}")
    if not 0 <= position < tokens.shape[1]:
        raise InvalidArgumentError(f"position {position} is outside the text (length {tokens.shape[1]})")
    if ("res", layer) not in bank:
        raise UnknownFeatureError(f"the bank has no res SAE at layer {layer}: {bank.describe()}")
    targets = _target_indices(targets, layer, bank.d_sae("res", layer))
    flow = FlowTransformer.from_hooked(model)
    raw = model_activations(flow, tokens, layer, bank=bank)
    return split_at(bank.bind(model), raw, layer, position, targets)


def _target_indices(targets: Sequence[int | str | FeatureRef], layer: int, d_sae: int) -> list[int]:
    """``targets`` as indices of res(``layer``): each an index, a :class:`FeatureRef` or ``"L/res/i"``."""
    out = []
    for t in targets:
        if isinstance(t, (str, FeatureRef)):
            ref = FeatureRef.parse(t)
            if ref.key != ("res", layer):
                raise InvalidArgumentError(f"target {t} is not a res({layer}) feature: split_preactivations "
                                           f"splits features of the residual stream at layer={layer}")
            t = ref.index
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < d_sae:
            raise InvalidArgumentError(f"targets must be res({layer}) features: indices in [0, {d_sae}), "
                                       f"FeatureRefs or '{layer}/res/i'; got {t!r}")
        out.append(t)
    if not out:
        raise InvalidArgumentError(f"targets must name at least one res({layer}) feature")
    return out


@torch.no_grad()
def model_activations(flow: Any, tokens: Tensor, layer: int, *, bank: SAEBank | None = None) -> dict[str, Tensor]:
    """The model's activations ``[seq, d_model]`` of one text at res(L-1), att(L), mlp(L) and res(L)
    (and, for a ``bank`` whose att SAE reads ``attn.hook_z``, that hook's ``[seq, n_heads, d_head]`` as ``att_in``;
    for one whose mlp SAE is a transcoder, its input hook's ``[seq, d_model]`` as ``mlp_in``)."""
    return layer_activations(flow, tokens, [layer], bank=bank)[layer]


@torch.no_grad()
def layer_activations(flow: Any, tokens: Tensor, layers: list[int], *,
                      bank: SAEBank | None = None) -> dict[int, dict[str, Tensor]]:
    """:func:`model_activations` of several layers from one forward (up to the last of them)."""
    names = {layer: _names(layer) for layer in layers}
    for layer in layers:
        for site in ("att", "mlp"):      # a z-SAE reads hook_z, a transcoder the MLP's input
            if bank is not None and (site, layer) in bank and bank.read_hook((site, layer)) != hook_name(site, layer):
                names[layer][f"{site}_in"] = bank.read_hook((site, layer))
    wanted = sorted({name for per_layer in names.values() for name in per_layer.values()})
    cache = backend_of(flow).run_with_cache(tokens, wanted, stop_at_layer=block_of(max(layers)) + 1)
    return {layer: {part: cache[name][0] for part, name in per_layer.items()} for layer, per_layer in names.items()}


def _names(layer: int) -> dict[str, str]:
    """The hooks of x_res(L-1) (what enters layer L), x_att(L), x_mlp(L) and x_res(L)."""
    return {"res": resid_pre_hook(layer), "att": hook_name("att", layer), "mlp": hook_name("mlp", layer),
            "target": hook_name("res", layer)}


@torch.no_grad()
def split_at(bank: SAEBank, raw: dict[str, Tensor], layer: int, position: int,
             targets: Sequence[int | str | FeatureRef]) -> PreactivationSplit:
    """:func:`split_from_activations` at one position of cached activations (:func:`model_activations`)."""
    keys = predecessor_keys(layer)
    saes = {site: bank[key] for site, key in keys.items() if key in bank}
    inputs = {site: raw.get(f"{site}_in", raw[site])[position] for site in saes}    # a z-SAE / transcoder's input
    acts = {site: sae.encode(sae_input(sae, inputs[site].to(sae.W_enc.dtype))) for site, sae in saes.items()}
    decoders = {site: bank.model_decoder(*keys[site]) for site in saes}
    res_sae = bank["res", layer]
    x = raw["target"][position].to(res_sae.W_enc.dtype)
    pre = (res_sae.process_sae_in(x) @ res_sae.W_enc + res_sae.b_enc)[targets]
    return split_from_activations(res_sae, targets, {s: raw[s][position] for s in PREDECESSOR_SITES}, saes, acts,
                                  pre, decoders)
