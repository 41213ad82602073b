"""Names of SAE sites and features, and the one place that builds hook names.

A *site* is where an SAE reads the model: the residual stream leaving a layer
(``res``), the MLP output (``mlp``) or the attention output (``att``), all in the
same ``d_model`` space. A feature is named ``layer/site/index`` as in the paper,
e.g. ``12/res/4230``.

Layers count from 0, with one exception: the residual stream *entering* layer 0 (the token
and position embeddings, ``blocks.0.hook_resid_pre``) is the res site of layer -1
(:data:`EMBED_LAYER`). An embedding SAE there is the res predecessor of layer 0's features
(``-1/res/5``); layer -1 has no mlp or att site and no predecessors of its own.

>>> ref = FeatureRef.parse("12/res/4230")
>>> ref, str(ref), hook_name("res", 12)
(FeatureRef(layer=12, site='res', index=4230), '12/res/4230', 'blocks.12.hook_resid_post')
>>> FeatureRef.parse("-1/res/5").hook_name, site_of_hook("blocks.0.hook_resid_pre")
('blocks.0.hook_resid_pre', ('res', -1))
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from tl_featureflow.checks import check_int
from tl_featureflow.errors import UnknownFeatureError

__all__ = [
    "EMBED_LAYER",
    "block_of",
    "predecessor_keys",
    "Site",
    "SITES",
    "Key",
    "LABELS",
    "FeatureRef",
    "hook_name",
    "hook_aliases",
    "sae_hook_name",
    "resid_pre_hook",
    "site_of_hook",
    "check_site",
    "check_layer",
]

Site = Literal["res", "mlp", "att"]
SITES: tuple[Site, ...] = get_args(Site)
Key = tuple[Site, int]
"""An SAE's place in a bank: ``(site, layer)``, e.g. ``("res", 12)``."""
#: Where a res feature comes from, by its predecessor scores (method section 3; flow.origins).
LABELS: tuple[str, ...] = ("translated", "processed", "newborn", "unexplained")

_HOOK_SUFFIX: dict[str, str] = {
    "res": "hook_resid_post",
    "mlp": "hook_mlp_out",
    "att": "hook_attn_out",
}
#: The layer of the embedding SAE: ``("res", -1)`` reads ``blocks.0.hook_resid_pre``, the stream entering layer 0.
EMBED_LAYER = -1
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out)$")
_REF_RE = re.compile(r"^\s*(-?\d+)\s*/\s*([a-z]+)\s*/\s*(\d+)\s*$")


def check_site(site: object) -> Site:
    """Return ``site`` if it is one of ``res``, ``mlp``, ``att``; raise otherwise."""
    if site not in SITES:
        raise UnknownFeatureError(f"unknown site {site!r}: expected one of {', '.join(SITES)}")
    return site  # type: ignore[return-value]


def check_layer(layer: object, site: str | None = None) -> int:
    """Return ``layer`` if it is a non-negative int (not a bool), or :data:`EMBED_LAYER` (-1) when ``site``
    is ``"res"`` (the embedding SAE); raise otherwise."""
    if site == "res" and layer == EMBED_LAYER and isinstance(layer, int) and not isinstance(layer, bool):
        return EMBED_LAYER
    context = " (layer -1, the embedding, has a res site only)" if layer == EMBED_LAYER and site is not None else ""
    return check_int(layer, "layer", error=UnknownFeatureError, context=context)


def block_of(layer: int) -> int:
    """The transformer block whose forward runs the hooks of ``layer``'s SAEs: ``layer`` itself, and block 0
    for the embedding SAE (layer -1 reads ``blocks.0.hook_resid_pre``). A forward that reads them must run
    ``stop_at_layer=block_of(layer) + 1``."""
    return max(layer, 0)


def hook_name(site: Site, layer: int) -> str:
    """The TransformerLens hook where the SAE of ``(site, layer)`` reads and writes.

    res -> ``blocks.{L}.hook_resid_post``, mlp -> ``blocks.{L}.hook_mlp_out``,
    att -> ``blocks.{L}.hook_attn_out``; the embedding SAE ``("res", -1)`` -> ``blocks.0.hook_resid_pre``.
    """
    site = check_site(site)
    if check_layer(layer, site) == EMBED_LAYER:
        return resid_pre_hook(0)
    return f"blocks.{layer}.{_HOOK_SUFFIX[site]}"


def sae_hook_name(site: Site, layer: int, point: str = "hook_sae_acts_post") -> str:
    """Name of a hook inside the SAE spliced at ``(site, layer)`` by ``FlowTransformer.attach``.

    ``sae_hook_name("res", 3)`` is ``blocks.3.hook_resid_post.hook_sae_acts_post``, the
    feature activations; ``point`` may name any SAELens SAE hook (``hook_sae_input``,
    ``hook_sae_acts_pre``, ``hook_sae_recons``, ``hook_sae_error``, ``hook_sae_output``).
    """
    return f"{hook_name(site, layer)}.{point}"


def predecessor_keys(layer: int) -> dict[Site, Key]:
    """Where the predecessors of res(``layer``) features live: res(L-1), mlp(L), att(L). Layer 0's res
    predecessor is the embedding SAE ``("res", -1)``; the embedding (layer -1) has none. Callers keep
    those their bank has.

    >>> predecessor_keys(3)
    {'res': ('res', 2), 'mlp': ('mlp', 3), 'att': ('att', 3)}
    >>> predecessor_keys(0)["res"], predecessor_keys(-1)
    (('res', -1), {})
    """
    keys: dict[Site, Key] = {"res": ("res", layer - 1), "mlp": ("mlp", layer), "att": ("att", layer)}
    return {site: key for site, key in keys.items() if layer >= 0 and key[1] >= (EMBED_LAYER if site == "res" else 0)}


def resid_pre_hook(layer: int) -> str:
    """``blocks.{L}.hook_resid_pre``: the residual stream entering layer L (for layer-local reruns)."""
    return f"blocks.{check_layer(layer)}.hook_resid_pre"


def hook_aliases(site: Site, layer: int) -> tuple[str, ...]:
    """Hook names that carry the same tensor as ``hook_name(site, layer)``.

    The residual stream leaving layer L is also the one entering layer L+1, so a
    res SAE trained on ``blocks.{L+1}.hook_resid_pre`` belongs to ``("res", L)`` (and one on
    ``blocks.0.hook_resid_pre``, the embeddings, to ``("res", -1)``).
    """
    names = (hook_name(site, layer),)
    if site == "res" and layer != EMBED_LAYER:
        names += (f"blocks.{layer + 1}.hook_resid_pre",)
    return names


def site_of_hook(name: str) -> tuple[Site, int] | None:
    """The ``(site, layer)`` whose tensor a hook name carries, or None if none does.

    ``blocks.{L}.hook_resid_pre`` maps to ``("res", L - 1)``, ``blocks.0.hook_resid_pre`` (the
    embeddings) to ``("res", -1)`` (:data:`EMBED_LAYER`); hooks of other spaces (e.g. ``attn.hook_z``)
    map to None.
    """
    match = _HOOK_RE.match(name)
    if match is None:
        return None
    layer, suffix = int(match.group(1)), match.group(2)
    if suffix == "hook_resid_pre":
        return "res", layer - 1
    site = next(s for s, suf in _HOOK_SUFFIX.items() if suf == suffix)
    return site, layer  # type: ignore[return-value]


@dataclass(frozen=True, order=True)
class FeatureRef:
    """One SAE feature: ``FeatureRef(layer=12, site="res", index=4230)``.

    Ordered by layer, then site, then index, so sorting a list of refs follows the
    forward pass. ``str(ref)`` and :meth:`parse` use the paper's ``12/res/4230``; a feature
    of the embedding SAE is ``-1/res/<index>`` (layer -1 has the res site only).
    """

    layer: int
    site: Site
    index: int

    def __post_init__(self) -> None:
        check_site(self.site)
        check_layer(self.layer, self.site)
        check_int(self.index, "index", error=UnknownFeatureError, context=f" of feature {self.layer}/{self.site}/?")

    @classmethod
    def parse(cls, text: str | FeatureRef) -> FeatureRef:
        """Parse ``"layer/site/index"`` (e.g. ``"12/res/4230"``, ``"-1/res/5"``); a FeatureRef passes through."""
        if isinstance(text, FeatureRef):
            return text
        match = _REF_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise UnknownFeatureError(
                f"cannot parse feature {text!r}: expected 'layer/site/index' such as '12/res/4230'"
            )
        return cls(int(match.group(1)), check_site(match.group(2)), int(match.group(3)))

    @property
    def key(self) -> tuple[Site, int]:
        """The ``(site, layer)`` key of this feature's SAE in an :class:`SAEBank`."""
        return self.site, self.layer

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook of this feature's site."""
        return hook_name(self.site, self.layer)

    def __str__(self) -> str:
        return f"{self.layer}/{self.site}/{self.index}"
