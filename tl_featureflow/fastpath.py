"""A fast path for FlowTransformer's forward passes, generation above all: no per-step weight copies.

TransformerLens 3.9 copies weights on every forward: its gated MLP and unembedding call
``F.linear(x, W.T.contiguous())`` and its attention lays ``W_Q``, ``W_K``, ``W_V`` out
with ``einops.rearrange`` (a copy), so each decoding step of SmolLM2 copies about as
many bytes as the model holds; a profile put 66% of ``generate``'s time in those copies.
The fast path computes the same maths on views of the live parameters:

- gated MLP: ``F.linear(x, W_gate.T)`` etc. (a transposed view, no copy);
- unembedding: ``F.linear(residual, W_U.T, b_U)``;
- attention Q/K/V (the plain, non-split case): one ``einsum`` batched over heads, reading
  ``W_Q`` ``[head, d_model, d_head]`` as stored.

Every TransformerLens hook point still fires, in the same order, with tensors of the
same shapes, so the Steerer, validation and users' hooks work unchanged; edits of the
weights after loading are seen (nothing is cached). Results equal TransformerLens's own
forward up to float rounding (the matmuls sum in another order): within 1e-5 on the
tiny test models, about 2e-6 of the logits' scale on SmolLM2, greedy tokens identical.

Two modes. ``"views"`` (the default) keeps no copies: results equal TransformerLens's up
to float rounding, as above. ``"exact"`` stores each of those weights, once, in the
memory order TransformerLens copies it into every step (``W.T.contiguous()``, the rearranged
``W_Q``): same Parameter, same shape and values, other strides. TransformerLens's copy is then
a no-op and the fast path reads a view of the live storage, so results are TransformerLens's
bit for bit, at no extra memory, and every edit is seen, ``W.data`` edits included (no cached
copy to go stale). A parameter replaced since (a new tensor in TL's usual order) is copied
per call as TransformerLens does, still bit for bit.

Components it cannot serve (4-bit weights, layer-norm activations, split Q/K/V inputs,
Q/K norms...) keep TransformerLens's path; :func:`enable` reports them and the model
warns once.

>>> from tl_featureflow.synthetic import tiny_model
>>> model = tiny_model(gated=True)              # FlowTransformer: fast path on by default
>>> model.fast_path
FastPath(views: 4 gated MLPs, 4 attention Q/K/V, unembed; TransformerLens path: none)
>>> import torch
>>> fast = model(torch.tensor([[1, 2, 3]]))
>>> _ = disable(model)
>>> slow = model(torch.tensor([[1, 2, 3]]))
>>> torch.allclose(fast, slow, atol=1e-5), torch.equal(enable(model, "exact") and model(torch.tensor([[1, 2, 3]])), slow)
(True, True)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tl_featureflow import _compat
from tl_featureflow.errors import InvalidArgumentError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["FastPath", "Mode", "enable", "disable"]

Mode = Literal["views", "exact"]


@dataclass
class FastPath:
    """Which components of a model run the fast path, and which keep TransformerLens's (and why)."""

    mlps: int = 0
    attentions: int = 0
    unembed: bool = False
    fallback: list[str] = field(default_factory=list)
    enabled: bool = True
    mode: Mode = "views"

    def __repr__(self) -> str:
        if not self.enabled:
            return "FastPath(off)"
        on = [f"{self.mlps} gated MLPs", f"{self.attentions} attention Q/K/V"] + (["unembed"] if self.unembed else [])
        return f"FastPath({self.mode}: {', '.join(on)}; TransformerLens path: {', '.join(self.fallback) or 'none'})"


# -- weights: views, or laid out once ------------------------------------------------------------------
def _transposed(W: Tensor) -> Tensor:
    """``W.T``: TransformerLens's ``W.T.contiguous()`` operand, a view once :func:`_lay_out` ran."""
    return W.T


def _heads_flat(W: Tensor) -> Tensor:
    """``[head, d_model, d_head] -> [(head d_head), d_model]``, as TransformerLens's simple_attn_linear lays it."""
    return W.permute(0, 2, 1).reshape(-1, W.shape[1])


def _out_flat(W: Tensor) -> Tensor:
    """``W_O``: ``[head, d_head, d_model] -> [d_model, (head d_head)]``, as TransformerLens's attention
    forward rearranges it (and copies it, ``.contiguous()``) at every call."""
    return W.permute(2, 0, 1).reshape(W.shape[2], -1)


#: each layout's inverse: TL's contiguous operand back to a tensor of the parameter's shape (a view of it)
_UNDO = {
    _transposed: lambda laid, shape: laid.T,
    _heads_flat: lambda laid, shape: laid.reshape(shape[0], shape[2], shape[1]).permute(0, 2, 1),
    _out_flat: lambda laid, shape: laid.reshape(shape[2], shape[0], shape[1]).permute(1, 2, 0),
}


def _lay_out(module: Any, name: str, make: Any) -> None:
    """Store parameter ``name`` so that ``make(W)`` is a contiguous view of it (same shape, other strides).

    The parameter object, its values and its shape stay; only its memory order changes, so
    TransformerLens's own copy (``W.T.contiguous()``, the rearranged ``W_Q`` and ``W_O``) becomes a
    no-op and the fast path reads the very storage the user edits (``W.data.mul_(2)`` included:
    issue 24 #1).
    """
    W = getattr(module, name)
    view = make(W)
    if view.is_contiguous() and view.data_ptr() == W.data_ptr():     # already laid out (reshape may copy)
        return
    with torch.no_grad():
        W.data = _UNDO[make](make(W.detach()).contiguous(), W.shape)


def _laid_out(module: Any, name: str, make: Any) -> Tensor:
    """``make(weight)`` contiguous: a view of the live parameter after :func:`_lay_out`; a fresh copy
    (TransformerLens's own) when the parameter was replaced since, so nothing can go stale."""
    return make(getattr(module, name)).contiguous()


# -- the fast forwards (same hook points, same shapes) ---------------------------------------------
def _gated_mlp_forward(mlp: Any, x: Tensor, exact: bool = False) -> Tensor:
    """TransformerLens's GatedMLP.forward without its per-step copies (views, or copies made once);
    TransformerLens's own forward when a flag set since :func:`enable` asks for what it cannot serve."""
    if _mlp_unsupported(mlp):
        return type(mlp).forward(mlp, x)
    if mlp.W_gate.device != x.device:
        x = x.to(mlp.W_gate.device)

    def weight(name: str) -> Tensor:
        return _laid_out(mlp, name, _transposed) if exact else getattr(mlp, name).T

    pre_act = mlp.hook_pre(F.linear(x, weight("W_gate")))              # [batch, pos, d_mlp]
    pre_linear = mlp.hook_pre_linear(F.linear(x, weight("W_in")))      # [batch, pos, d_mlp]
    post_act = mlp.hook_post(mlp.act_fn(pre_act) * pre_linear + mlp.b_in)
    return F.linear(post_act, weight("W_out"), mlp.b_out)


def _unembed_forward(unembed: Any, residual: Tensor, exact: bool = False) -> Tensor:
    residual = unembed.hook_in(residual)
    W_U = _laid_out(unembed, "W_U", _transposed) if exact else unembed.W_U.T
    return unembed.hook_out(F.linear(residual, W_U, unembed.b_U))


def _project(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``[batch, pos, d_model] x [head, d_model, d_head] -> [batch, pos, head, d_head]`` without copying W."""
    if x.device != W.device:
        x = x.to(W.device)
    return torch.einsum("bpm,hmd->bphd", x, W) + b     # batched over heads: W is read as stored


def _project_exact(attn: Any, x: Tensor, name: str, b: Tensor) -> Tensor:
    """TransformerLens's simple_attn_linear with the rearranged weight made once."""
    W = _laid_out(attn, name, _heads_flat)
    if x.device != W.device:
        x = x.to(W.device)
    return F.linear(x, W, b.reshape(-1).to(W.device)).reshape(x.shape[0], x.shape[1], b.shape[0], b.shape[1])


def _qkv_forward(attn: Any, query_input: Tensor, key_input: Tensor, value_input: Tensor,
                 exact: bool = False) -> tuple[Tensor, ...]:
    """TransformerLens's calculate_qkv_matrices (simple, non-4-bit case) without its per-step copies.

    Config flags are read at every call: a flag set after :func:`enable` (split Q/K/V inputs, as
    TransformerLens's own tests do) sends the call to TransformerLens's path (issue 24 #2).
    """
    if _attention_unsupported(attn):
        return type(attn).calculate_qkv_matrices(attn, query_input, key_input, value_input)
    k_name, b_k_name, v_name, b_v_name = _compat.stored_kv_names(attn)
    W_K, b_K, W_V, b_V = (getattr(attn, name) for name in (k_name, b_k_name, v_name, b_v_name))
    if exact:
        q = attn.hook_q(_project_exact(attn, query_input, "W_Q", attn.b_Q))
        k = attn.hook_k(_project_exact(attn, key_input, k_name, b_K))
        v = attn.hook_v(_project_exact(attn, value_input, v_name, b_V))
    else:
        q = attn.hook_q(_project(query_input, attn.W_Q, attn.b_Q))
        k = attn.hook_k(_project(key_input, W_K, b_K))
        v = attn.hook_v(_project(value_input, W_V, b_V))
    return q, k, v


# -- switching ---------------------------------------------------------------------------------------
def _mlp_unsupported(mlp: Any) -> str | None:
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    if type(mlp) is not GatedMLP:
        return None if not isinstance(mlp, GatedMLP) else f"{type(mlp).__name__} (e.g. 4-bit)"
    if mlp.cfg.is_layer_norm_activation():
        return "gated MLP with a layer-norm activation"
    return None


def _attention_unsupported(attn: Any) -> str | None:
    cfg = attn.cfg
    reasons = [name for name, on in (("split Q/K/V inputs", cfg.use_split_qkv_input or cfg.use_attn_in),
                                     ("4-bit weights", cfg.load_in_4bit), ("Q/K norms", cfg.use_qk_norm))
               if on]
    if getattr(cfg, "original_architecture", None) in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"):
        reasons.append(f"{cfg.original_architecture} Q/K norms")
    return ", ".join(reasons) or None


def enable(model: HookedTransformer, mode: Mode = "views") -> FastPath:
    """Route ``model``'s gated MLPs, attention Q/K/V and unembedding through the fast forwards.

    Only ``model``'s own modules change (instance attributes; the classes are untouched).
    Returns what runs where; :func:`disable` undoes it.
    """
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    if mode not in ("views", "exact"):
        raise InvalidArgumentError(f"fast path mode {mode!r}: expected 'views' or 'exact'")
    exact = mode == "exact"
    disable(model)
    report = FastPath(mode=mode)
    for i, block in enumerate(model.blocks):
        mlp = getattr(block, "mlp", None)
        if isinstance(mlp, GatedMLP):
            reason = _mlp_unsupported(mlp)
            if reason:
                report.fallback.append(f"blocks.{i}.mlp ({reason})")
            else:
                if exact:
                    for name in ("W_gate", "W_in", "W_out"):
                        _lay_out(mlp, name, _transposed)
                _compat.set_mlp_forward(mlp, functools.partial(_gated_mlp_forward, mlp, exact=exact))
                report.mlps += 1
        attn = getattr(block, "attn", None)
        if attn is not None and hasattr(attn, "calculate_qkv_matrices"):
            reason = _attention_unsupported(attn)
            if reason:
                report.fallback.append(f"blocks.{i}.attn ({reason})")
            else:
                if exact:
                    k_name, _, v_name, _ = _compat.stored_kv_names(attn)
                    for name in ("W_Q", k_name, v_name):
                        if name in attn._parameters:
                            _lay_out(attn, name, _heads_flat)
                    _lay_out(attn, "W_O", _out_flat)       # TL's own forward copies it: now a no-op
                attn.calculate_qkv_matrices = functools.partial(_qkv_forward, attn, exact=exact)
                report.attentions += 1
    unembed = getattr(model, "unembed", None)
    if unembed is not None and type(unembed).__name__ == "Unembed":
        if exact:
            _lay_out(unembed, "W_U", _transposed)
        unembed.forward = functools.partial(_unembed_forward, unembed, exact=exact)
        report.unembed = True
    return report


def disable(model: HookedTransformer) -> FastPath:
    """Give every component back TransformerLens's own forward."""
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    for block in model.blocks:
        mlp = getattr(block, "mlp", None)
        if isinstance(mlp, GatedMLP):
            _compat.set_mlp_forward(mlp, functools.partial(type(mlp).forward, mlp))
        attn = getattr(block, "attn", None)
        if attn is not None:
            vars(attn).pop("calculate_qkv_matrices", None)
    unembed = getattr(model, "unembed", None)
    if unembed is not None:
        vars(unembed).pop("forward", None)
    return FastPath(enabled=False)
