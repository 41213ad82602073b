"""The registry of matching methods: how a res(L) feature's predecessors are chosen.

A matching method says, for every feature of ``res(L)`` (the *target*), which features of its
predecessor SAEs (``res(L-1)``, ``mlp(L)``, ``att(L)``) feed it. Validation
(:func:`~tl_featureflow.causal.experiment.validate`), the paper's protocol and the CLI look
methods up here by name and dispatch on what each declares it *needs*, never on its name:

- ``"decoders"``: data-free. ``table(context, layer, site, src)`` returns, per target feature, the
  indices of its matched ``src`` features, ``[d_res, m]`` (-1: none). Cosine top-1/top-5, a
  random one of the top five, SAE Match's permutation.
- ``"activations"``: a table too, but ``fit(acts, layer, pred_keys)`` from activations over a token
  stream (Pearson correlation): validation fits it on the texts, or takes Pearson's precomputed
  (``validate(pearson=...)``, the paper's 100K tokens).
- ``"search"``: per text, every active predecessor is removed alone and the best removal kept
  (exhaustive search).
- ``"attribution"``: per text, one forward splits each target's pre-activation into its
  predecessors' contributions.

``picks="per_site"`` methods choose features at each site (removed together); ``picks="one"``
methods choose one feature over all sites (the paper's exhaustive search, attribution).

A new data-free method is one function and one :func:`register` call:

>>> import torch
>>> def same_index(context, layer, site, src):
...     '''Feature i of res(L) matched to feature i of the predecessor (a toy).'''
...     d_res = context.tracer.bank.d_sae("res", layer)
...     return torch.arange(d_res)[:, None] % context.tracer.bank.d_sae(*src)
>>> method = register(MatchingMethod("same_index", "decoders", table=same_index))
>>> "same_index" in names(), get("same_index").needs
(True, 'decoders')
>>> unregister("same_index")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tl_featureflow.errors import InvalidArgumentError
from tl_featureflow.refs import Site

if TYPE_CHECKING:   # torch is imported where a method runs: `featureflow --help` lists methods without it
    from torch import Tensor

__all__ = ["MatchingMethod", "MatchContext", "register", "unregister", "get", "names", "data_free_names", "METHODS"]

Needs = Literal["decoders", "activations", "search", "attribution"]
Key = tuple[Site, int]


@dataclass
class MatchContext:
    """What a data-free method may read: the tracer (bank, decoders, cached cosine matches), the
    run's seed, the live-feature masks (``alive``: match among features that fire) and a cache
    that methods of one run share (top5 and random share one top-5 computation)."""

    tracer: Any
    seed: int = 0
    alive: Mapping[Any, Tensor] | None = None
    cache: dict[Any, Tensor] = field(default_factory=dict)


#: ``table(context, layer, site, src)``: per res(layer) feature, its matched ``src`` indices, ``[d_res, m]``.
TableFn = Callable[[MatchContext, int, Site, Key], "Tensor"]
#: ``fit(acts, layer, pred_keys)``: from ``[n_tokens, d_sae]`` activations per key, per site ``[d_res, m]`` indices.
FitFn = Callable[[Mapping[Key, "Tensor"], int, Mapping[Site, Key]], dict[Site, "Tensor"]]


@dataclass(frozen=True)
class MatchingMethod:
    """One matching method: its name, what it needs, how it picks, and (data-free) its table."""

    name: str
    needs: Needs
    picks: Literal["per_site", "one"] = "per_site"
    table: TableFn | None = None
    fit: FitFn | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.needs not in ("decoders", "activations", "search", "attribution"):
            raise InvalidArgumentError(f"method {self.name!r}: needs={self.needs!r} is not one of "
                                       "'decoders', 'activations', 'search', 'attribution'")
        if self.picks not in ("per_site", "one"):
            raise InvalidArgumentError(f"method {self.name!r}: picks={self.picks!r}: expected 'per_site' or 'one'")
        if (self.needs == "decoders") != (self.table is not None):
            raise InvalidArgumentError(f"method {self.name!r}: a table is given exactly when needs='decoders'")
        if (self.needs == "activations") != (self.fit is not None):
            raise InvalidArgumentError(f"method {self.name!r}: a fit is given exactly when needs='activations'")
        if self.picks == "one" and self.needs in ("decoders", "activations"):
            raise InvalidArgumentError(f"method {self.name!r}: picks='one' is for 'search' and 'attribution' methods")


_REGISTRY: dict[str, MatchingMethod] = {}


def register(method: MatchingMethod, *, replace: bool = False) -> MatchingMethod:
    """Add ``method`` to the registry (``replace=True`` to redefine a name); returns it."""
    if not isinstance(method, MatchingMethod):
        raise InvalidArgumentError(f"register() takes a MatchingMethod, got {type(method).__name__}")
    if method.name in _REGISTRY and not replace:
        raise InvalidArgumentError(f"a matching method named {method.name!r} is registered: pass replace=True")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method added with :func:`register` (the built-in ones stay)."""
    if name in METHODS:
        raise InvalidArgumentError(f"{name!r} is a built-in matching method and cannot be removed")
    _REGISTRY.pop(name, None)


def get(name: str) -> MatchingMethod:
    """The method registered as ``name``; an unknown name is an error listing the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"unknown matching method {name!r}: expected one of {names()}") from None


def names() -> tuple[str, ...]:
    """Every registered method's name, the built-in ones first."""
    return tuple(_REGISTRY)


def data_free_names() -> tuple[str, ...]:
    """The registered methods that need only decoders: those tracing and the flow map take.

    >>> data_free_names()[:4]
    ('top1', 'top5', 'random', 'permutation')
    """
    return tuple(name for name, method in _REGISTRY.items() if method.needs == "decoders")


# -- the built-in data-free methods ------------------------------------------------------------------------------
def _cosine(context: MatchContext, layer: int, src: Key, k: int) -> Tensor:
    """Top-``k`` cosine matches ``[d_res, k]``; with ``alive``, among the source's live features only."""
    import torch

    from tl_featureflow.flow.matching import topk_cosine

    tracer, dst, alive = context.tracer, ("res", layer), context.alive
    k = min(k, tracer.bank.d_sae(*src))
    if alive is None or src not in alive:
        return tracer.match(src, dst, k).indices
    if (src, dst, k) not in context.cache:
        keep = alive[src].nonzero().squeeze(1).to(tracer.device)
        if len(keep) == 0:
            context.cache[(src, dst, k)] = torch.full((tracer.bank.d_sae(*dst), k), -1, dtype=torch.long)
        else:
            _, idx = topk_cosine(tracer.bank.decoder(*dst, device=tracer.device),
                                 tracer.bank.decoder(*src, device=tracer.device)[keep], min(k, len(keep)))
            context.cache[(src, dst, k)] = keep[idx]
    return context.cache[(src, dst, k)]


def _top1(context: MatchContext, layer: int, site: Site, src: Key) -> Tensor:
    return _cosine(context, layer, src, 1)


def _top5(context: MatchContext, layer: int, site: Site, src: Key) -> Tensor:
    return _cosine(context, layer, src, 5)


def _random(context: MatchContext, layer: int, site: Site, src: Key) -> Tensor:
    import torch

    top = _cosine(context, layer, src, 5)
    order = list(context.tracer.predecessor_keys(layer)).index(site)      # each site its own stream
    gen = torch.Generator().manual_seed(context.seed * 1009 + layer * 7 + order)
    pick = torch.randint(0, top.shape[1], (top.shape[0], 1), generator=gen).to(top.device)
    return top.gather(1, pick)


def _permutation(context: MatchContext, layer: int, site: Site, src: Key) -> Tensor:
    from tl_featureflow.flow.matching import permutation_match

    bank = context.tracer.bank
    _, indices = permutation_match(bank.decoder("res", layer), bank.decoder(*src))
    return indices[:, None]


def _pearson(acts: Mapping[Key, Tensor], layer: int, pred_keys: Mapping[Site, Key]) -> dict[Site, Tensor]:
    """Per site, the predecessor whose activations correlate best with each res(layer) feature.

    ``acts[key]`` are ``[n_tokens, d_sae]`` activations over the texts. Features that never
    vary get correlation -inf (no match: index -1).
    """
    import torch

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



for _method in (
    MatchingMethod("top1", "decoders", table=_top1, description="the predecessor with the highest decoder cosine"),
    MatchingMethod("top5", "decoders", table=_top5, description="the five highest cosines (active if any is)"),
    MatchingMethod("random", "decoders", table=_random, description="one of the top five, seeded (a control)"),
    MatchingMethod("permutation", "decoders", table=_permutation, description="SAE Match's one-to-one assignment"),
    MatchingMethod("pearson", "activations", fit=_pearson, description="the best-correlated predecessor over a token stream"),
    MatchingMethod("exhaustive", "search", description="per site, the removal alone that lowers the target most"),
    MatchingMethod("exhaustive_single", "search", picks="one",
                   description="the paper's exhaustive search: the best single removal over all sites"),
    MatchingMethod("attribution", "attribution", picks="one",
                   description="the largest contribution to the target's pre-activation (one forward)"),
):
    register(_method)

#: The built-in methods, in the order reports list them.
METHODS: tuple[str, ...] = names()
