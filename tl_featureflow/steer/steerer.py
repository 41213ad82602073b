"""Steerer: push SAE features up or down while a model runs or generates (method section 6).

>>> import torch
>>> from tl_featureflow.synthetic import planted_chain_bank, tiny_model
>>> model, (bank, _) = tiny_model(), planted_chain_bank()
>>> prompt = torch.tensor([[1, 2, 3]])
>>> kwargs = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
>>> plain = model.generate(prompt, **kwargs)
>>> with Steerer(model, bank, scale="unit").add("2/res/1", 40.0):   # h += 40 * v (unit v) at blocks.2.hook_resid_post
...     steered = model.generate(prompt, **kwargs)
>>> with Steerer(model, bank).rescale("2/res/1", 1.0):      # r = 1 changes nothing (rescale needs no scale)
...     same = model(prompt)
>>> torch.equal(same, model(prompt)), torch.equal(plain, steered)
(True, False)

The tiny model has no tokenizer, hence ``scale="unit"``; on a real model the default
``"typical"`` makes ``add(ref, 4.0)`` add four times what the feature usually writes.
Along a flow graph, ``Steerer(model, bank).along(graph, 4.0, mode="cumulative")``.

Two edits, both at the hook of the feature's site (``resid_post``, ``mlp_out`` or
``attn_out`` of its layer):

- ``add(ref, s)``: ``h <- h + s * v``; ``v`` is the decoder row times the feature's
  typical activation by default (``scale=``), so that one coefficient fits features
  of different magnitudes, or the unit decoder row (``scale="unit"``).
- ``rescale(ref, r)``: ``h <- h + (r - 1) * a * v`` with ``a`` read by the SAE's own
  encoder from the same ``h`` and ``v`` the raw decoder row (``r = 0`` removes the
  feature, ``r < 0`` reverses it, ``r > 1`` amplifies it, ``r = 1`` changes nothing).

Coefficients may be one number or one number per batch row (a list or 1-D tensor),
which is how :func:`tl_featureflow.steer.sweeps.steering_sweep` runs a whole grid of
settings as the rows of one batched ``generate``.

Positions. ``"all"`` steers every token; ``"prompt"`` only the prompt's tokens;
``"generated"`` only the tokens that ``generate`` adds. A forward pass outside
``generate`` is all prompt. With TransformerLens's KV cache each decoding step runs
on one position only, so the Steerer counts absolute positions itself: while it is
active it wraps the model's ``generate`` (an instance attribute, removed on exit) to
learn where a generation starts, whether it uses the cache, and how long the prompt
is, and a hook at ``blocks.0.hook_resid_pre`` counts the positions each forward
adds. Steered greedy generation gives the same tokens with and without the cache.

Each Steerer adds its hooks to TransformerLens's hook points at a level of its own
(``HookPoint.add_hook(level=)``) and removes exactly those on exit, also on exceptions
and KeyboardInterrupt (which are never swallowed): the user's own hooks and contexts
are left alone, and nested Steerers may exit in any order.

Threads: hooks live on the model, which every thread shares. A Steerer belongs to the
thread that entered it: a forward from another thread that runs through its hooks,
or a Steerer entered in another thread while one is active on the same model, raises
:class:`~tl_featureflow.errors.FeatureFlowError` (steer from one thread, or give each
thread its own model).
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from jaxtyping import Float
from torch import Tensor

from tl_featureflow import _compat
from tl_featureflow.backend import backend_of
from tl_featureflow.checks import check_device, check_int, check_number
from tl_featureflow.errors import (
    InvalidArgumentError,
    ModelMismatchError,
    StateError,
    UnknownFeatureError,
)
from tl_featureflow.refs import FeatureRef, Site, check_layer, check_site, hook_name
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.features import rescale_delta

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["Steerer", "Positions", "Schedule", "FlowMode", "Coefficient", "flow_coefficients", "POSITIONS", "SCALES",
           "typical_activation"]

Positions = Literal["all", "prompt", "generated"]
Schedule = Literal["constant", "linear", "exponential"]
FlowMode = Literal["single", "cumulative"]
Op = Literal["add", "rescale"]
SCALES = ("unit", "decoder", "threshold", "typical")
Coefficient = float | Sequence[float] | Tensor
POSITIONS: tuple[str, ...] = get_args(Positions)
_COUNTER_HOOK = "blocks.0.hook_resid_pre"


def typical_activation(contexts: Any, ref: FeatureRef | str, q: float = 0.5) -> float:
    """A feature's typical activation: the ``q`` quantile (default the median) of its positive
    activations in ``contexts`` (a TopContexts; read off its histogram, within one log bin, 12%);
    0 for a feature that never fired. ``Steerer(scale="typical")`` multiplies decoder rows by it."""
    return float(contexts.quantile(ref, q))


def flow_coefficients(
    graph: Any,
    strength: float | Tensor,
    *,
    schedule: Schedule = "constant",
    alpha: float = -0.05,
    mode: FlowMode = "single",
    up_to_layer: int | None = None,
) -> list[tuple[FeatureRef, Any]]:
    """The features of a FlowGraph to steer and the coefficient of each (method section 6).

    ``mode="single"``: the graph's features at one layer, ``up_to_layer`` (default: the
    seed's layer). ``mode="cumulative"``: every feature of the graph from its first
    layer up to ``up_to_layer`` (default: the end of the graph's span).

    The coefficient at layer ``l``: ``constant`` -> ``strength``; ``exponential`` ->
    ``strength * exp(alpha * l)`` (``l`` the model's layer index, as in the paper);
    ``linear`` -> from ``strength`` at the span's first layer to ``1`` at its last.
    ``strength`` may be a tensor of per-row strengths; each row is scheduled alike.

    >>> from tl_featureflow.flow.tracer import FlowTracer
    >>> from tl_featureflow.synthetic import planted_chain_bank
    >>> graph = FlowTracer(planted_chain_bank()[0]).trace("2/res/1", direction="backward")
    >>> [(str(ref), c) for ref, c in flow_coefficients(graph, 4.0, mode="cumulative", up_to_layer=1)]
    [('0/res/3', 4.0), ('1/res/7', 4.0)]
    """
    if schedule not in get_args(Schedule):
        raise InvalidArgumentError(f"unknown schedule {schedule!r}: expected one of {get_args(Schedule)}")
    if mode not in get_args(FlowMode):
        raise InvalidArgumentError(f"unknown mode {mode!r}: expected one of {get_args(FlowMode)}")
    check_number(alpha, "alpha")
    layers = sorted({node.ref.layer for node in graph.nodes})
    if up_to_layer is not None:
        check_int(up_to_layer, "up_to_layer")
    if up_to_layer is None:
        up_to_layer = graph.seed.layer if mode == "single" else max(layers)
    if up_to_layer not in layers and mode == "single":
        raise UnknownFeatureError(
            f"up_to_layer={up_to_layer}: the flow graph of {graph.seed} has no feature at layer {up_to_layer}: its layers are {layers}")
    if mode == "cumulative" and up_to_layer < min(layers):
        raise UnknownFeatureError(
            f"the flow graph of {graph.seed} starts at layer {min(layers)}, after up_to_layer={up_to_layer}")
    l_start, l_end = graph.span
    refs = sorted(n.ref for n in graph.nodes if (n.ref.layer == up_to_layer if mode == "single"
                                                 else n.ref.layer <= up_to_layer))

    def coefficient(layer: int) -> Any:
        if schedule == "exponential":
            return strength * math.exp(alpha * layer)
        if schedule == "linear" and l_end > l_start:
            t = min(max((layer - l_start) / (l_end - l_start), 0.0), 1.0)
            return strength + (1.0 - strength) * t
        return strength

    return [(ref, coefficient(ref.layer)) for ref in refs]


@dataclass
class _Edit:
    op: Op
    key: tuple[Site, int]
    index: int | None            # feature index; None for a raw direction
    coef: Tensor                 # [] or [batch]
    vector: Tensor | None = None  # the d_model direction of an add


@dataclass
class _Generation:
    """What the Steerer knows about the ``generate`` call in progress."""

    cached: bool
    prompt_len: int | None = None
    seen: int = 0                # positions already processed (with the KV cache)
    offset: int = 0              # absolute position of the current forward's first token


@dataclass
class _State:
    generation: _Generation | None = None
    stack: ExitStack | None = None
    thread: int | None = None    # the thread that entered the Steerer


# Hook levels of our own: TransformerLens's `hooks()` contexts use small integers (their nesting depth).
_LEVELS = itertools.count(1 << 30)
# Per model, the Steerers active on it (in the order entered) and the ExitStack of its `generate` wrapper.
_ACTIVE: weakref.WeakKeyDictionary[Any, list[Steerer]] = weakref.WeakKeyDictionary()
_GENERATE: weakref.WeakKeyDictionary[Any, ExitStack] = weakref.WeakKeyDictionary()


class Steerer:
    """Context manager that steers SAE features during ``model(...)`` and ``model.generate(...)``.

    Args:
        model: any TransformerLens ``HookedTransformer`` (a FlowTransformer or a plain
            one; SAEs need not be attached).
        bank: the SAEs whose decoders give the directions (needed for feature refs).
        positions: ``"all"``, ``"prompt"`` or ``"generated"`` (see the module docs).
        scale: how ``add`` scales the direction: ``"typical"`` (the default, below),
            ``"unit"`` (unit decoder row), ``"decoder"`` (the raw decoder row: strength in activation units),
            ``"threshold"`` (decoder row times the JumpReLU threshold: SAE Match's
            folding), ``"typical"`` (decoder row times the feature's typical activation:
            the median of its positive activations on held-out text, read off the
            histogram of ``contexts``; so strength 1 adds what the feature itself
            usually writes; the default everywhere, as the report cards measured
            one coefficient fitting features of different magnitudes: docs/steering.md),
            or a mapping ``ref -> typical activation`` (e.g. measured max activations)
            multiplying the raw decoder row.
        contexts: for ``scale="typical"``: a :class:`~tl_featureflow.flow.contexts.TopContexts`
            of the bank (default: :func:`~tl_featureflow.flow.contexts.feature_contexts`,
            computed once per bank and cached; needs the model's tokenizer).
        device: where coefficients and directions live (default: the model's).
    """

    def __init__(
        self,
        model: HookedTransformer,
        bank: SAEBank | None = None,
        *,
        positions: Positions = "all",
        scale: Literal["unit", "decoder", "threshold", "typical"] | Mapping[FeatureRef | str, float] = "typical",
        contexts: Any = None,
        device: torch.device | str | None = None,
    ):
        if not (hasattr(model, "hooks") and hasattr(model, "hook_dict") and hasattr(model, "generate")):
            raise InvalidArgumentError(f"Steerer needs a TransformerLens HookedTransformer, got {type(model).__name__}")
        if positions not in POSITIONS:
            raise InvalidArgumentError(f"unknown positions {positions!r}: expected one of {POSITIONS}")
        if bank is not None and not isinstance(bank, SAEBank):
            raise InvalidArgumentError(f"bank must be an SAEBank, got {type(bank).__name__}")
        if bank is not None:
            bank = bank.bind(model)        # attention SAEs on attn.hook_z: directions through the model's W_O
        if bank is not None and bank.d_model != model.cfg.d_model:
            raise ModelMismatchError(
                f"the bank's SAEs read d_in={bank.d_model} but the model has d_model={model.cfg.d_model}")
        if isinstance(scale, str) and scale not in SCALES:
            raise InvalidArgumentError(f"unknown scale {scale!r}: expected one of {SCALES} or a mapping")
        self.model = model
        self.bank = bank
        self.positions: Positions = positions
        self.scale = scale if isinstance(scale, str) else {
            FeatureRef.parse(k): check_number(v, f"scale[{str(k)!r}]", positive=True,
                                              context=" (a typical activation of the feature)")
            for k, v in scale.items()}
        self.device = check_device(device) if device is not None else torch.device(model.cfg.device)
        self.contexts = contexts
        self._edits: list[_Edit] = []
        self._state = _State()

    # -- building ------------------------------------------------------------------------------
    def add(self, ref: FeatureRef | str, strength: Coefficient) -> Steerer:
        """``h <- h + strength * v`` at the feature's site (``v`` per ``scale``); returns self."""
        ref = self._ref(ref)
        vector = self._direction(ref)
        self._edits.append(_Edit("add", ref.key, ref.index, self._coef(strength), vector))
        return self

    def add_direction(self, site: Site, layer: int, direction: Float[Tensor, " d_model"],
                      strength: Coefficient) -> Steerer:
        """``h <- h + strength * direction`` at ``(site, layer)``: steering without an SAE."""
        check_site(site)
        if check_layer(layer) >= self.model.cfg.n_layers:
            raise UnknownFeatureError(f"layer {layer} does not exist: the model has {self.model.cfg.n_layers} layers")
        direction = torch.as_tensor(direction).detach()
        if direction.shape != (self.model.cfg.d_model,):
            raise InvalidArgumentError(
                f"direction has shape {tuple(direction.shape)}: expected ({self.model.cfg.d_model},) (d_model)")
        if not torch.isfinite(direction).all():
            raise InvalidArgumentError(f"direction for {(site, layer)} has NaN or inf entries")
        self._edits.append(_Edit("add", (site, layer), None, self._coef(strength), direction.to(self.device)))
        return self

    def rescale(self, ref: FeatureRef | str, r: Coefficient) -> Steerer:
        """``h <- h + (r - 1) * a * v`` with ``a`` from the SAE's encoder; returns self."""
        ref = self._ref(ref)
        self._edits.append(_Edit("rescale", ref.key, ref.index, self._coef(r)))
        return self

    def along(
        self,
        graph: Any,
        strength: Coefficient,
        *,
        schedule: Schedule = "constant",
        alpha: float = -0.05,
        mode: FlowMode = "single",
        up_to_layer: int | None = None,
        op: Op = "add",
    ) -> Steerer:
        """Steer every feature of a FlowGraph that :func:`flow_coefficients` selects.

        ``op="add"`` promotes (``strength`` is ``s``); ``op="rescale"`` rescales
        (``strength`` is ``r``; the paper suppresses with ``r <= 0``). The schedule
        multiplies ``strength`` layer by layer; per-row strengths are scheduled alike.
        """
        if op not in get_args(Op):
            raise InvalidArgumentError(f"unknown op {op!r}: expected 'add' or 'rescale'")
        plan = flow_coefficients(graph, self._coef(strength), schedule=schedule, alpha=alpha, mode=mode,
                                 up_to_layer=up_to_layer)
        for ref, value in plan:
            getattr(self, op)(ref, value)
        return self

    def clear(self) -> Steerer:
        """Forget every edit (not allowed while active)."""
        self._check_inactive("clear")
        self._edits.clear()
        return self

    @property
    def edits(self) -> list[tuple[str, str, Tensor]]:
        """``(op, feature or site/layer, coefficient)`` of every edit, in order."""
        out = []
        for e in self._edits:
            name = str(FeatureRef(e.key[1], e.key[0], e.index)) if e.index is not None else f"{e.key[1]}/{e.key[0]}/*"
            out.append((e.op, name, e.coef))
        return out

    # -- hooks ---------------------------------------------------------------------------------
    def hooks(self) -> list[tuple[str, Callable]]:
        """Forward hooks ``(hook_name, fn)`` for ``model.run_with_hooks`` / ``model.hooks``.

        Outside ``generate`` every position counts as prompt.
        """
        by_hook: dict[tuple[tuple[Site, int], str], list[_Edit]] = {}
        for edit in self._edits:
            by_hook.setdefault((edit.key, self._edit_hook(edit)), []).append(edit)
        ordered = sorted(by_hook.items(), key=lambda kv: (kv[0][0][1], kv[0][0][0], kv[0][1]))  # by layer, site
        hooks = []
        for (key, name), edits in ordered:
            store: dict[str, Tensor] | None = None
            if self.bank is not None and any(e.op == "rescale" for e in edits) \
                    and self.bank.read_hook(key) != self.bank.hook(key):
                # a transcoder: its encoder reads its input hook, earlier in the same forward, kept here
                store = {}
                hooks.append((self._hook_name(key, self.bank.read_hook(key)), functools.partial(_keep, store)))
            hooks.append((name, self._make_hook(key, edits, store)))
        if hooks and self.positions != "all":
            hooks.insert(0, (_COUNTER_HOOK, self._count_positions))
        return hooks

    def __enter__(self) -> Steerer:
        self._check_inactive("enter")
        me = threading.get_ident()
        active = _ACTIVE.setdefault(self.model, [])
        foreign = [s for s in active if s._state.thread != me]
        if foreign:
            raise StateError(f"{foreign[0]!r} is active on this model in another thread: a model's hooks are "
                                   "shared by every thread, so its forwards would be steered by both; steer from one "
                                   "thread, or give each thread its own model")
        level = next(_LEVELS)
        stack = ExitStack()
        try:
            for name, fn in self.hooks():
                point = self.model.hook_dict[name]
                stack.callback(point.remove_hooks, "fwd", including_permanent=False, level=level)
                point.add_hook(self._owned(fn), dir="fwd", level=level)
            active.append(self)
            stack.callback(self._leave, active)
            if self.positions != "all" and self.model not in _GENERATE:
                _GENERATE[self.model] = ExitStack()
                _wrap_generate(self.model, _GENERATE[self.model])
        except BaseException:
            stack.close()
            raise
        self._state.stack, self._state.thread = stack, me
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._state.stack = self._state.stack, None
        self._state.generation, self._state.thread = None, None
        if stack is not None:
            stack.close()   # never swallows: returns None

    def _leave(self, active: list[Steerer]) -> None:
        """Off the model's active list; the last Steerer that counts positions unwraps ``generate``."""
        active.remove(self)
        if not any(s.positions != "all" for s in active) and self.model in _GENERATE:
            _GENERATE.pop(self.model).close()

    def _owned(self, fn: Callable) -> Callable:
        """``fn``, refusing to run in a thread other than the one that entered this Steerer."""
        def hook(h: Tensor, hook: Any) -> Any:
            if threading.get_ident() != self._state.thread:
                raise StateError(f"{self!r} was entered in another thread: this forward ran through its "
                                       "hooks (a model's hooks are shared by every thread); steer from one thread, "
                                       "or give each thread its own model")
            return fn(h, hook)

        return hook

    @property
    def active(self) -> bool:
        return self._state.stack is not None

    def __repr__(self) -> str:
        return f"Steerer({len(self._edits)} edits, positions={self.positions!r}, active={self.active})"

    # -- internals -----------------------------------------------------------------------------
    def _check_inactive(self, what: str) -> None:
        if self._state.stack is not None:
            raise StateError(f"cannot {what} a Steerer that is already active (exit its `with` block first)")

    def _ref(self, ref: FeatureRef | str) -> FeatureRef:
        if self.bank is None:
            raise InvalidArgumentError(f"steering feature {ref} needs the SAE bank: Steerer(model, bank)")
        ref = self.bank.check_ref(ref)
        if ref.layer >= self.model.cfg.n_layers:
            raise UnknownFeatureError(f"feature {ref}: the model has only {self.model.cfg.n_layers} layers")
        return ref

    def _coef(self, value: Coefficient) -> Tensor:
        coef = torch.as_tensor(value, dtype=torch.float32).detach().to(self.device)
        if coef.ndim > 1:
            raise InvalidArgumentError(f"a coefficient must be a number or one number per batch row, got shape "
                                   f"{tuple(coef.shape)}")
        if not torch.isfinite(coef).all():
            raise InvalidArgumentError(f"coefficient {value!r} has NaN or inf entries")
        return coef

    def _direction(self, ref: FeatureRef) -> Tensor:
        assert self.bank is not None
        sae = self.bank[ref.key]
        if self.scale == "unit":
            return self.bank.decoder(*ref.key, unit=True, device=self.device)[ref.index].float()
        row = self.bank.model_decoder(*ref.key)[0][ref.index].to(self.device, torch.float32)   # in d_model
        if self.scale == "decoder":
            return row
        if self.scale == "threshold":
            threshold = getattr(sae, "threshold", None)
            if threshold is None:
                raise InvalidArgumentError(f"scale='threshold' needs a JumpReLU SAE, but the SAE of {ref} is "
                                           f"{type(sae).__name__}: use scale='unit', 'decoder' or a mapping")
            return row * float(threshold.detach()[ref.index])
        if self.scale == "typical":
            return row * self._typical(ref)
        assert isinstance(self.scale, dict)
        if ref not in self.scale:
            raise UnknownFeatureError(f"scale mapping has no typical activation for {ref}")
        return row * self.scale[ref]

    def _typical(self, ref: FeatureRef) -> float:
        if self.contexts is None:
            from tl_featureflow.flow.contexts import feature_contexts

            if getattr(self.model, "tokenizer", None) is None:
                raise InvalidArgumentError(
                    "scale='typical' (the default) reads each feature's typical activation off text, but the "
                    "model has no tokenizer: pass contexts=feature_contexts(model, bank, tokens) with token ids, "
                    "scale={ref: activation, ...}, or scale='unit'")
            self.contexts = feature_contexts(self.model, self.bank)  # type: ignore[arg-type]
        value = typical_activation(self.contexts, ref)
        if value <= 0:
            raise InvalidArgumentError(f"scale='typical': {ref} never fired on the {self.contexts.n_tokens} tokens its "
                                   "contexts were read from, so it has no typical activation; use another scale")
        return value

    def _edit_hook(self, edit: _Edit) -> str:
        """Adds go to the site's hook (in ``d_model``); rescales read the SAE's own encoder at the SAE's
        own hook (``attn.hook_z`` for a z-SAE, where the rescale of ``a * v`` is exact; a transcoder's edit
        is at ``hook_mlp_out``, its activations read from its input hook in the same forward)."""
        if edit.op == "rescale" and self.bank is not None:
            return self._hook_name(edit.key, self.bank.hook(edit.key))
        return self._hook_name(edit.key)

    def _hook_name(self, key: tuple[Site, int], name: str | None = None) -> str:
        name = name or hook_name(*key)
        if backend_of(self.model).has_hook(name):
            return name
        spliced = f"{name}.hook_sae_output"     # an SAE is spliced in there: steer its output
        if backend_of(self.model).has_hook(spliced):
            return spliced
        raise UnknownFeatureError(f"the model has no hook {name!r} for {key}")

    def _count_positions(self, h: Tensor, hook: Any) -> None:
        gen = self._state.generation
        if gen is None:
            return
        n = h.shape[1]
        if gen.prompt_len is None:
            gen.prompt_len = n
        gen.offset = gen.seen if gen.cached else 0
        gen.seen += n

    def _steered_positions(self, n: int, device: torch.device) -> Tensor | None:
        """Indices (within this forward) of positions to steer; None means all."""
        if self.positions == "all":
            return None
        gen = self._state.generation
        if gen is None or gen.prompt_len is None:   # not generating: everything is prompt
            return None if self.positions == "prompt" else torch.empty(0, dtype=torch.long, device=device)
        absolute = torch.arange(gen.offset, gen.offset + n, device=device)
        keep = absolute < gen.prompt_len if self.positions == "prompt" else absolute >= gen.prompt_len
        return keep.nonzero().squeeze(-1)

    def _make_hook(self, key: tuple[Site, int], edits: list[_Edit], store: dict[str, Tensor] | None = None
                   ) -> Callable:
        adds = [e for e in edits if e.op == "add"]
        rescales = [e for e in edits if e.op == "rescale"]
        sae = self.bank[key] if rescales else None  # type: ignore[index]
        feats = torch.tensor([e.index for e in rescales], dtype=torch.long)
        # everything that does not depend on the activations is summed once here, not at every decoding step
        W = sae.W_dec.detach()[feats.to(sae.W_dec.device)].float() if sae is not None else None   # [f, d_model]
        constant = sum((e.coef * e.vector for e in adds if e.coef.ndim == 0), torch.zeros(()))  # [d_model] or 0
        per_row = [e for e in adds if e.coef.ndim == 1]
        rows_total = (torch.stack([e.coef for e in per_row], 1) @ torch.stack([e.vector for e in per_row])
                      if per_row else None)                                                  # [batch, d_model]

        def hook(h: Tensor, hook: Any) -> Tensor:
            kept = store.pop("x", None) if store is not None else None    # a transcoder's input, this forward's
            batch = h.shape[0]
            idx = self._steered_positions(h.shape[1], h.device)
            if idx is not None and idx.numel() == 0:
                return h
            sub = h if idx is None else h[:, idx]          # [batch, n, d_model] (hook_z: [batch, n, n_heads, d_head])
            delta = None
            if adds:
                delta = constant.to(h.device).expand(batch, 1, h.shape[-1]).float()
                if rows_total is not None:
                    delta = delta + _rows(rows_total, batch, key).to(h.device)[:, None, :]
                delta = delta.expand(batch, sub.shape[1], h.shape[-1])
            if rescales:
                factors = torch.stack([_rows(e.coef, batch, key).to(h.device) - 1.0 for e in rescales], -1)
                x = kept if kept is None or idx is None else kept[:, idx]
                change = rescale_delta(sub, sae, feats, factors[:, None, :], W, x=x)
                delta = change if delta is None else delta + change
            steered = sub + delta.to(h.dtype)
            if idx is None:
                return steered
            out = h.clone()
            out[:, idx] = steered
            return out

        return hook


def _keep(store: dict[str, Tensor], x: Tensor, hook: Any) -> None:
    """Keep a transcoder's input (``store["x"]``) for the rescale at its output hook, later in the forward."""
    store["x"] = x


def _wrap_generate(model: HookedTransformer, stack: ExitStack) -> None:
    """While Steerers that count positions are active, ``model.generate`` tells each of them that
    a generation starts and whether it uses the KV cache (TransformerLens's own default when not
    given). One wrapper per model, whatever the number of Steerers or the order they exit in."""
    method = type(model).generate

    def make(previous: Callable) -> Callable:
        def generate(*args: Any, **kwargs: Any) -> Any:
            arguments = _compat.bind_arguments(method, model, *args, **kwargs)
            cached = bool(arguments.get("use_past_kv_cache", True))
            states = [s._state for s in _ACTIVE.get(model, []) if s.positions != "all"]
            outer = [state.generation for state in states]
            for state in states:
                state.generation = _Generation(cached=cached)
            try:
                return previous(*args, **kwargs)
            finally:
                for state, before in zip(states, outer, strict=True):
                    state.generation = before

        return generate

    _compat.wrap_instance_method(stack, model, "generate", make)


def _rows(coef: Tensor, batch: int, key: tuple[Site, int]) -> Tensor:
    """A coefficient as one value per batch row (``[batch]``; a ``[batch, d]`` table passes when its rows fit)."""
    if coef.ndim == 0:
        return coef.expand(batch)
    if coef.shape[0] != batch:
        raise InvalidArgumentError(
            f"a steering coefficient at {key} has {coef.shape[0]} rows but the batch has {batch}: give one "
            "number, or one per batch row")
    return coef
