"""Interventions on SAE features, and their effect on one layer (method section 5).

The intervention rescales chosen features of one SAE at chosen token positions:

    h <- h + (r - 1) * a * v

where ``a`` is read by the SAE's own encoder from the same ``h`` and ``v`` is the
feature's decoder row (so ``a * v`` is exactly the feature's contribution to the
SAE's reconstruction; the formula lives in :mod:`tl_featureflow.saes.edits`). ``r = 0``
removes the feature (up to reconstruction error), ``r = 1`` changes nothing (bit for
bit), ``r < 0`` reverses it, ``r > 1`` amplifies it.

An edit at res(L-1), mlp(L) or att(L) only changes what layer L computes, so reading
the effect on a res(L) feature needs layer L alone: :func:`target_activations` starts
from the cached residual stream entering layer L and runs many interventions on one
text as rows of one batch. ``layer_local=False`` gives the same numbers from one full
forward per intervention (the reference the tests compare against).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_featureflow.backend import ModelBackend, backend_of
from tl_featureflow.checks import check_tokens
from tl_featureflow.errors import InvalidArgumentError
from tl_featureflow.refs import Site, check_site, hook_name
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.features import rescale_delta

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["Intervention", "rescale", "intervention_hooks", "input_keeper", "intervened", "res_activations",
           "target_activations"]


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
            raise InvalidArgumentError(f"an intervention needs features and positions, got {self}")

    @property
    def key(self) -> tuple[Site, int]:
        return self.site, self.layer


def rescale(
    h: Float[Tensor, "batch pos d_model"],
    sae: Any,
    features: Sequence[int],
    positions: Sequence[int],
    r: float,
    x: Float[Tensor, "batch pos d_in"] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """``h + (r - 1) * a * v`` at ``positions`` for ``features`` (a new tensor; ``h`` is untouched).

    ``a`` is read from ``h``, or from ``x`` when given (a transcoder: ``x`` its input, ``h`` its output,
    both of the same forward). ``r == 1`` returns ``h`` itself. Out-of-range features or positions raise.
    """
    if r == 1:
        return h
    d_sae, seq = sae.cfg.d_sae, h.shape[1]
    if any(not 0 <= f < d_sae for f in features):
        raise InvalidArgumentError(f"features {list(features)} out of range: the SAE has d_sae {d_sae}")
    if any(not -seq <= p < seq for p in positions):
        raise InvalidArgumentError(f"positions {list(positions)} out of range for a sequence of {seq} tokens")
    pos = torch.as_tensor(list(positions), device=h.device)
    sub = h[:, pos]                                               # [batch, n_pos, d_model]
    delta = rescale_delta(sub, sae, list(features), r - 1.0, x=None if x is None else x[:, pos])  # [batch, n_pos, d_model]
    out = h.clone()
    out[:, pos] = sub + delta.to(h.dtype)
    return out


def intervention_hooks(bank: SAEBank, interventions: Sequence[Intervention]) -> list[tuple[str, Callable]]:
    """TransformerLens forward hooks applying ``interventions`` (for ``model.hooks`` / ``run_with_hooks``).

    A transcoder's edit needs its input: a hook at its input hook keeps it (:func:`input_keeper`), and the
    edit at ``hook_mlp_out``, later in the same forward, reads it.
    """
    hooks = []
    for item in interventions:
        sae = bank[item.key]
        keep, kept = input_keeper(bank, item.key)
        hooks += keep

        def hook(h: Tensor, hook: Any, item: Intervention = item, sae: Any = sae, kept: dict = kept) -> Tensor:
            return rescale(h, sae, item.features, item.positions, item.r, x=kept.pop("x", None))

        hooks.append((bank.hook(item.key), hook))
    return hooks


def input_keeper(bank: SAEBank, key: tuple[Site, int]) -> tuple[list[tuple[str, Callable]], dict[str, Tensor]]:
    """For a transcoder at ``key``: ``([(its input hook, a hook storing the tensor)], store)``, the tensor under
    ``store["x"]`` until the edit at ``hook_mlp_out`` takes it; ``([], {})`` for any other SAE."""
    store: dict[str, Tensor] = {}
    if bank.read_hook(key) == bank.hook(key):
        return [], store

    def keep(x: Tensor, hook: Any) -> None:
        store["x"] = x

    return [(bank.read_hook(key), keep)], store


@contextmanager
def intervened(model: HookedTransformer | ModelBackend, bank: SAEBank,
               interventions: Sequence[Intervention]) -> Iterator[Any]:
    """``with intervened(model, bank, [...]): model(tokens)``; hooks are always removed."""
    with backend_of(model).hooks(intervention_hooks(bank, interventions)):
        yield model


@torch.no_grad()
def res_activations(
    model: HookedTransformer | ModelBackend,
    bank: SAEBank,
    tokens: Int[Tensor, "1 pos"],
    layer: int,
    positions: Sequence[int],
    interventions: Sequence[Sequence[Intervention]],
    *,
    layer_local: bool = True,
    chunk_rows: int = 16,
    entering: Float[Tensor, "1 pos d_model"] | None = None,
) -> Float[Tensor, "n d_sae"]:
    """All res(``layer``) feature activations at ``positions[i]`` under ``interventions[i]``.

    Interventions must sit at res(layer-1), mlp(layer) or att(layer): the sites whose
    edits reach res(layer) through layer ``layer`` alone. With ``layer_local`` every row
    reruns only layer ``layer`` from the residual stream entering it (computed once, or
    given as ``entering``: ``blocks.{layer}.hook_resid_pre`` of ``tokens``, as a caller
    that already ran the text has it), in batches of ``chunk_rows`` (small batches keep
    the layer's activations in cache); otherwise each row is one full forward (the reference).
    """
    if len(positions) != len(interventions):
        raise InvalidArgumentError(f"{len(positions)} positions but {len(interventions)} intervention lists")
    allowed = {("res", layer - 1), ("mlp", layer), ("att", layer)}
    for items in interventions:
        for item in items:
            if item.key not in allowed:
                raise InvalidArgumentError(
                    f"intervention at {item.key} cannot reach res({layer}) through layer {layer} alone: "
                    f"expected one of {sorted(allowed)}")
    backend = backend_of(model)
    if entering is None and check_tokens(tokens, backend.d_vocab, n_ctx=backend.n_ctx).shape[0] != 1:
        raise InvalidArgumentError(f"tokens must be one text [1, pos], got shape {tuple(tokens.shape)}")
    if entering is not None and tuple(entering.shape) != (1, tokens.shape[-1], backend.d_model):
        raise InvalidArgumentError(f"entering has shape {tuple(entering.shape)}: expected the stream entering layer "
                                   f"{layer} of the text, (1, {tokens.shape[-1]}, {backend.d_model})")
    target_sae = bank[("res", layer)]
    out_name = hook_name("res", layer)
    if not layer_local:
        picked_rows = []
        for pos, items in zip(positions, interventions, strict=False):
            with intervened(model, bank, items):
                cache = backend.run_with_cache(tokens, [out_name], stop_at_layer=layer + 1)
            picked_rows.append(cache[out_name][0, pos])
        return target_sae.encode(torch.stack(picked_rows).to(target_sae.W_dec.dtype))

    if entering is None:
        entering = backend.resid_entering(tokens, layer)   # the stream entering layer L, computed once
    out = [_layer_local_rows(backend, bank, entering, layer, positions[i:i + chunk_rows], interventions[i:i + chunk_rows])
           for i in range(0, len(positions), chunk_rows)]
    return torch.cat(out) if out else torch.zeros(0, target_sae.cfg.d_sae)


def _layer_local_rows(model: ModelBackend, bank: SAEBank, entering: Tensor, layer: int, positions: Sequence[int],
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
            keep, kept = input_keeper(bank, (site, layer))          # a transcoder reads its input hook first
            hooks += keep

            def hook(h: Tensor, hook: Any, rows: list = rows, sae: Any = bank[(site, layer)],
                     kept: dict = kept) -> Tensor:
                x = kept.pop("x", None)
                h = h.clone()
                for row, item in rows:
                    h[row:row + 1] = rescale(h[row:row + 1], sae, item.features, item.positions, item.r,
                                             x=None if x is None else x[row:row + 1])
                return h

            hooks.append((bank.hook((site, layer)), hook))
    with model.hooks(hooks):
        resid_out = model.run_from_layer(resid, layer, layer + 1)
    pos = torch.tensor(list(positions), device=resid_out.device)
    picked = resid_out[torch.arange(n, device=resid_out.device), pos]     # [n, d_model]
    target_sae = bank[("res", layer)]
    return target_sae.encode(picked.to(target_sae.W_dec.dtype))


def target_activations(
    model: HookedTransformer | ModelBackend,
    bank: SAEBank,
    tokens: Int[Tensor, "1 pos"],
    layer: int,
    targets: Sequence[tuple[int, int]],
    interventions: Sequence[Sequence[Intervention]],
    *,
    layer_local: bool = True,
    chunk_rows: int = 16,
    entering: Float[Tensor, "1 pos d_model"] | None = None,
) -> Float[Tensor, " n"]:
    """Activation of res(``layer``) feature ``targets[i] = (position, index)`` under ``interventions[i]``
    (see :func:`res_activations`)."""
    if len(targets) != len(interventions):
        raise InvalidArgumentError(f"{len(targets)} targets but {len(interventions)} intervention lists")
    acts = res_activations(model, bank, tokens, layer, [p for p, _ in targets], interventions,
                           layer_local=layer_local, chunk_rows=chunk_rows, entering=entering)
    index = torch.tensor([i for _, i in targets], device=acts.device)
    return acts[torch.arange(len(targets), device=acts.device), index]
