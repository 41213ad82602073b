"""SAEBank: one SAELens SAE per ``(site, layer)``, validated, saved and loaded.

The bank is the input of everything else: matching reads its decoders, the
model splices its SAEs in, validation and steering read and write its features.
It accepts any SAELens SAE class (standard, JumpReLU, TopK, gated...) that reads and
writes the ``d_model`` space of its site, attention SAEs on ``attn.hook_z`` (Gemma
Scope's), whose rows are mapped into ``d_model`` through the model's ``W_O``
(:mod:`tl_featureflow.saes.sites`; such a bank needs the model: :meth:`SAEBank.bind`), and
single-layer transcoders at the mlp site (they read the MLP's input, :meth:`SAEBank.read_hook`,
and write ``hook_mlp_out``, :meth:`SAEBank.hook`).

>>> import tempfile
>>> from tl_featureflow.synthetic import planted_chain_bank
>>> planted, _ = planted_chain_bank()
>>> bank = SAEBank({("res", 1): planted["res", 1], ("res", 2): planted["res", 2]})   # any SAELens SAEs
>>> bank, bank.decoder("res", 2).shape           # unit rows of W_dec: [d_sae, d_model]
(SAEBank(d_model=64, res at layers 1-2 (2 SAEs)), torch.Size([12, 64]))
>>> path = bank.save(tempfile.mkdtemp() + "/my_bank")
>>> SAEBank.load(path).fingerprint() == bank.fingerprint()
True
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from tl_featureflow import _compat
from tl_featureflow._files import (
    atomic_directory,
    check_header,
    header,
    read_manifest,
    recover_directory,
    write_manifest,
)
from tl_featureflow.checks import check_device
from tl_featureflow.errors import BankError, CacheError, ModelMismatchError, TranscoderError, UnknownFeatureError
from tl_featureflow.refs import (
    EMBED_LAYER,
    SITES,
    FeatureRef,
    Key,
    Site,
    check_layer,
    check_site,
    hook_aliases,
    hook_name,
)
from tl_featureflow.saes import sites
from tl_featureflow.saes.features import unit_rows
from tl_featureflow.saes.lazy import DEFAULT_KEEP, LazySAEs

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["SAEBank", "BANK_SCHEMA_VERSION", "INDEX_FILE", "PRETRAINED_SOURCE"]

BANK_SCHEMA_VERSION = 1
INDEX_FILE = "bank.json"
#: ``metadata["source"]`` of a bank built by :meth:`SAEBank.from_pretrained` from SAELens releases.
PRETRAINED_SOURCE = "sae_lens.from_pretrained"



def _folder_name(key: Key) -> str:
    return f"{key[0]}_{key[1]}"


def _check_key(key: object) -> Key:
    if not (isinstance(key, tuple) and len(key) == 2):
        raise BankError(f"invalid bank key {key!r}: expected a (site, layer) tuple such as ('res', 12)")
    site, layer = key
    try:
        site = check_site(site)
        return site, check_layer(layer, site)
    except UnknownFeatureError as exc:
        raise BankError(f"invalid bank key {key!r}: {exc}") from None


def _check_transcoder(key: Key, sae: SAE) -> None:
    """A transcoder serves ``("mlp", L)`` when it reads layer L's MLP input and writes its ``hook_mlp_out``."""
    meta = sae.cfg.metadata
    if key[0] != "mlp":
        raise TranscoderError(f"the SAE for {key} is a transcoder (reads {meta.hook_name!r}, writes "
                              f"{meta.hook_name_out!r}): transcoders serve the mlp site only, as ('mlp', L)")
    layer = sites.transcoder_layer(sae, f"for {key}")
    if layer != key[1]:
        raise TranscoderError(f"the transcoder for {key} reads {meta.hook_name!r} and writes "
                              f"{meta.hook_name_out!r}: expected layer {key[1]}'s MLP input and output")


def _check_sae(key: Key, sae: object) -> SAE:
    if not isinstance(sae, SAE):
        raise BankError(f"bank entry {key} is a {type(sae).__name__}: expected a sae_lens.SAE")
    meta = sae.cfg.metadata
    name = meta.hook_name
    z = key[0] == "att" and sites.layer_of_z_hook(name) == key[1]
    transcoder = sites.is_transcoder(sae)
    if transcoder:
        _check_transcoder(key, sae)
    if name is not None and name not in hook_aliases(*key) and not z and not transcoder:
        also = f" or {sites.z_hook_name(key[1])!r}" if key[0] == "att" else ""
        raise BankError(
            f"SAE for {key} reads hook {name!r} (d_in {sae.cfg.d_in}): expected {hook_name(*key)!r}{also}. "
            "Feature flow compares SAEs in the d_model space of the residual stream, MLP output "
            "and attention output (attention SAEs on attn.hook_z are mapped there through W_O)."
        )
    reshape = getattr(sae.cfg, "reshape_activations", "none")
    if reshape not in ("none", None) and not (z and reshape == "hook_z"):
        raise BankError(
            f"SAE for {key} reshapes its input ({reshape!r}) but reads {name!r}: expected an SAE on the "
            "flat activations of its hook (or a hook_z SAE on attn.hook_z)"
        )
    for pname, tensor in [*sae.named_parameters(), *sae.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise BankError(f"SAE for {key} has {bad} NaN/inf values in {pname}: expected finite weights")
    return sae


def _bool_layer(key: object) -> bool:
    """A key whose layer is a bool (``True == 1`` as a dict key): never a bank's."""
    return isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], bool)


def _sae_digest(key: Key, sae: SAE) -> bytes:
    """One SAE's part of :meth:`SAEBank.fingerprint`: its key, decoder shape and sum, a strided sample."""
    W = sae.W_dec.detach()
    sample = W.flatten()[:: max(1, W.numel() // 65536)].float().cpu().numpy().tobytes()
    return f"{key}{tuple(W.shape)}{float(W.double().sum()):.12e}".encode() + sample


def _keyed_by_hook(saes: Sequence[object]) -> dict[Key, object]:
    """``{(site, layer): sae}`` from each SAE's hook (``blocks.{L+1}.hook_resid_pre`` is ``("res", L)``,
    ``blocks.0.hook_resid_pre``, the embeddings, ``("res", -1)``)."""
    keyed: dict[Key, object] = {}
    for i, sae in enumerate(saes):
        if not isinstance(sae, SAE):
            raise BankError(f"SAE {i} of the list is a {type(sae).__name__}: expected a sae_lens.SAE")
        name = sae.cfg.metadata.hook_name
        if sites.is_transcoder(sae):
            sites.transcoder_layer(sae, f"{i} of the list")       # cross-layer or foreign hooks: refused by name
        key = sites.key_of_sae_hook(name, sae.cfg.metadata.hook_name_out)
        if key is None:
            raise BankError(f"SAE {i} of the list reads hook {name!r}: its (site, layer) cannot be told from it; "
                            "expected blocks.L.hook_resid_post / hook_resid_pre / hook_mlp_out / hook_attn_out / "
                            "attn.hook_z (or a transcoder writing hook_mlp_out), or pass a mapping "
                            "{(site, layer): sae}")
        if key in keyed:
            raise BankError(f"SAEs {list(keyed).index(key)} and {i} of the list both read {key} ({name!r})")
        keyed[key] = sae
    return keyed


class SAEBank(Mapping[Key, SAE]):
    """A read-only mapping ``(site, layer) -> SAE`` with validated, shared ``d_model``.

    Args:
        saes: the SAEs, keyed by ``(site, layer)`` with site in ``res``, ``mlp``, ``att``, or a list
            of SAEs keyed by their hooks. ``("res", -1)`` is the embedding SAE: it reads
            ``blocks.0.hook_resid_pre`` (the token and position embeddings) and is the res
            predecessor of layer 0's features.
        metadata: JSON-serialisable facts about the bank (model, corpus, preset...),
            saved and loaded with it.

    Raises:
        BankError: on an empty bank, a bad key, an object that is not a SAELens SAE,
            an SAE whose ``cfg.metadata.hook_name`` is not its key's hook, NaN/inf
            weights, or SAEs of different ``d_in``.
    """

    def __init__(self, saes: Mapping[Key, SAE] | Sequence[SAE], *, metadata: Mapping[str, Any] | None = None):
        self._lazy = saes if isinstance(saes, LazySAEs) else None     # SAEBank.load(..., lazy=True); checked there
        if self._lazy is not None:
            self._init_state(self._lazy, metadata)
            return
        if isinstance(saes, Sequence) and not isinstance(saes, str):
            saes = _keyed_by_hook(saes)
        if not isinstance(saes, Mapping) or len(saes) == 0:
            what = f"an empty {type(saes).__name__}" if isinstance(saes, Mapping) else f"a {type(saes).__name__}"
            raise BankError(f"an SAEBank needs a non-empty mapping of (site, layer) -> SAE, or a list of SAEs whose "
                            f"hooks name their keys; got {what}")
        checked: dict[Key, SAE] = {}
        for raw_key, sae in saes.items():
            key = _check_key(raw_key)
            checked[key] = _check_sae(key, sae)
        widths = {key: sae.cfg.d_in for key, sae in checked.items() if not sites.is_z(sae)}
        if len(set(widths.values())) > 1:
            raise BankError(f"SAEs of one bank must share d_in (= the model's d_model), got {widths}")
        order = sorted(checked, key=lambda k: (k[1], SITES.index(k[0])))
        self._init_state({k: checked[k] for k in order}, metadata)

    def _init_state(self, saes: Mapping[Key, SAE], metadata: Mapping[str, Any] | None) -> None:
        self._saes: Mapping[Key, SAE] = saes
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._decoders: dict[Key, tuple[tuple[Any, ...], Tensor]] = {}
        self._mapped: dict[Key, tuple[tuple[Any, ...], tuple[Tensor, Tensor]]] = {}   # z-SAEs' (W, b) in d_model
        self._model: HookedTransformer | None = None   # set by bind(): the model whose W_O maps the z-SAEs
        lazy = self._lazy
        self._z_keys = [key for key in saes if (lazy.is_z(key) if lazy is not None else sites.is_z(saes[key]))]
        self._transcoder_keys = [key for key in saes
                                 if (lazy.is_transcoder(key) if lazy is not None else sites.is_transcoder(saes[key]))]

    def _cfg(self, key: Key) -> Any:
        """The config of the SAE at ``key`` (a lazy bank's without loading it)."""
        if self._lazy is None:
            return self[key].cfg
        self._known(key)
        return self._lazy.cfg(key)

    def _known(self, key: Key) -> None:
        """Raise for a key the bank does not have (naming what it has), without loading a lazy bank's SAE."""
        if self._lazy is None or _bool_layer(key):
            self[key]
        elif key not in self._lazy:
            raise UnknownFeatureError(f"no SAE for {key!r} in this bank: it has {self.describe()}")

    @property
    def saes(self) -> Mapping[Key, SAE]:
        """The SAEs by key: a dict, or for a lazy bank its :class:`~tl_featureflow.saes.lazy.LazySAEs`
        (``loads``, ``resident``, ``peak``)."""
        return self._saes

    # -- mapping -----------------------------------------------------------------------------
    def __getitem__(self, key: Key) -> SAE:
        if _bool_layer(key):
            raise UnknownFeatureError(f"no SAE for {key!r}: its layer must be an int, not a bool")
        try:
            return self._saes[key]
        except (KeyError, TypeError):
            raise UnknownFeatureError(
                f"no SAE for {key!r} in this bank: it has {self.describe()}"
            ) from None

    def __contains__(self, key: object) -> bool:       # Mapping's would load a lazy bank's SAE
        if _bool_layer(key):
            return False
        try:
            return key in self._saes
        except TypeError:                                # an unhashable key
            return False

    def __iter__(self) -> Iterator[Key]:
        return iter(self._saes)

    def __len__(self) -> int:
        return len(self._saes)

    def __repr__(self) -> str:
        return f"SAEBank(d_model={self.d_model}, {self.describe()})"

    def describe(self) -> str:
        """A short text of what the bank holds, e.g. ``res, mlp at layers 3-5 (6 SAEs)``."""
        layers = [layer for layer in self.layers if layer != EMBED_LAYER]
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0]) if layers else ""
        if EMBED_LAYER in self.layers:
            span = "-1 (embedding)" + (f", {span}" if span else "")
        z, tc = len(self.z_keys), len(self.transcoder_keys)
        notes = [f"{z} att on attn.hook_z"] if z else []
        notes += [f"{tc} mlp transcoder{'s' if tc > 1 else ''}"] if tc else []
        return f"{', '.join(self.sites)} at layers {span} ({len(self)} SAEs{'; ' + ', '.join(notes) if notes else ''})"

    # -- shape facts ---------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        """The width every d_model-space SAE reads (its ``d_in``), which must equal the model's ``d_model``.

        A bank of z-SAEs only takes it from the model it is bound to (:meth:`bind`).
        """
        for key in self._saes:
            if key not in self._z_keys:
                return self._cfg(key).d_in
        if self._model is None:
            raise BankError("a bank of attn.hook_z SAEs only knows d_model from its model: bank.bind(model)")
        return int(self._model.cfg.d_model)

    # -- where each SAE sits -------------------------------------------------------------------
    @property
    def z_keys(self) -> list[Key]:
        """Keys whose SAE reads ``attn.hook_z`` (mapped into ``d_model`` through ``W_O``)."""
        return list(self._z_keys)

    @property
    def transcoder_keys(self) -> list[Key]:
        """Keys whose SAE is a transcoder: it reads the MLP's input (:meth:`read_hook`), writes ``hook_mlp_out``."""
        return list(self._transcoder_keys)

    def hook(self, key: Key) -> str:
        """Where the features of ``key`` are edited and its SAE is spliced (its ``hook_sae_acts_post`` lives
        under it): its site's hook (:func:`~tl_featureflow.refs.hook_name`; ``hook_mlp_out`` for a
        transcoder), or ``blocks.L.attn.hook_z`` for a z-SAE. For all but transcoders also :meth:`read_hook`."""
        self._known(key)                                  # an unknown key raises, naming what the bank has
        return sites.z_hook_name(key[1]) if key in self._z_keys else hook_name(*key)

    def read_hook(self, key: Key) -> str:
        """Where the encoder of ``key`` reads its input: a transcoder's input hook (``cfg.metadata.hook_name``,
        e.g. ``blocks.L.ln2.hook_normalized``; Gemma Scope 2's ``hook_mlp_in`` is read where it was trained,
        :func:`~tl_featureflow.saes.sites.transcoder_read_hook`), else :meth:`hook`. It fires before
        :meth:`hook` in a forward."""
        if key not in self._transcoder_keys:
            return self.hook(key)
        return sites.transcoder_read_hook(self._cfg(key))

    @property
    def model(self) -> HookedTransformer | None:
        """The model this bank is bound to (:meth:`bind`), or None."""
        return self._model

    def bind(self, model: HookedTransformer) -> SAEBank:
        """This bank with ``model``'s ``W_O`` mapping its z-SAEs into ``d_model``; the same bank when it
        has no z-SAE or is bound to ``model`` already (a new bank of the same SAE objects otherwise).

        Raises:
            ModelMismatchError: a z-SAE's ``d_in`` is not the model's ``n_heads * d_head``, or the model
                lacks (or does not run) a transcoder's input hook.
        """
        for key in self._transcoder_keys:
            sites.check_transcoder_hooks(model, key, self.read_hook(key))
        if not self._z_keys or self._model is model:
            return self
        width = model.cfg.n_heads * model.cfg.d_head
        for key in self.z_keys:
            if self._cfg(key).d_in != width:
                raise ModelMismatchError(
                    f"the SAE at {key} reads attn.hook_z with d_in {self._cfg(key).d_in}, but the model's hook_z has "
                    f"n_heads * d_head = {model.cfg.n_heads} * {model.cfg.d_head} = {width}")
            if key[1] >= model.cfg.n_layers:
                raise ModelMismatchError(f"the SAE at {key} is past the model's {model.cfg.n_layers} layers")
        bound = SAEBank(self._saes, metadata=self.metadata)
        bound._model = model
        return bound

    def _bound(self, key: Key) -> HookedTransformer:
        """The bound model, which the z-SAE at ``key`` needs."""
        if self._model is None:
            raise BankError(
                f"the SAE at {key} reads attn.hook_z: its directions in the residual stream are its decoder rows "
                "through the model's W_O, so this needs the model: bank.bind(model), or give the model to "
                "FlowTracer(bank, model) / validate / Steerer")
        return self._model

    def model_decoder(self, site: Site, layer: int) -> tuple[Float[Tensor, "d_sae d_model"], Float[Tensor, " d_model"]]:
        """``(W, b)``: what the SAE of ``(site, layer)`` writes into its site's ``d_model`` space,
        ``recons = acts @ W + b`` (``W_dec, b_dec``; for a z-SAE ``W_dec @ W_O``, ``b_dec @ W_O + b_O``).
        Detached, in the SAE's dtype and device; a z-SAE's mapped pair is cached like :meth:`decoder`'s rows."""
        sae = self[(site, layer)]
        W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
        if (site, layer) not in self._z_keys:
            return W_dec, b_dec
        stamp = self._stamp((site, layer)) + _compat.tensor_stamp(sae.b_dec)
        cached = self._mapped.get((site, layer))
        if cached is None or cached[0] != stamp:
            W_O, b_O = sites.z_write_map(self._bound((site, layer)), layer, device=W_dec.device)
            cached = (stamp, (W_dec @ W_O.to(W_dec.dtype), b_dec @ W_O.to(W_dec.dtype) + b_O.to(W_dec.dtype)))
            self._mapped[(site, layer)] = cached
            self._forget_released()
        return cached[1]

    def _forget_released(self) -> None:
        """A lazy bank keeps derived decoders only of the SAEs in memory (memory stays ~``keep`` SAEs)."""
        if self._lazy is not None:
            for cache in (self._decoders, self._mapped):
                for key in [k for k in cache if not self._lazy.is_resident(k)]:
                    del cache[key]

    def _stamp(self, key: Key) -> tuple[Any, ...]:
        """Changes whenever the SAE's decoder rows in ``d_model`` may have: ``W_dec``, and for a z-SAE the
        bound model and its ``W_O`` (and post-attention norm)."""
        stamp = _compat.tensor_stamp(self[key].W_dec)
        if key in self._z_keys:
            stamp += (id(self._model), *sites.z_map_tensors(self._bound(key), key[1], stamp=_compat.tensor_stamp))
        return stamp

    @property
    def layers(self) -> list[int]:
        """Layers that have at least one SAE, ascending (-1 first: the embedding SAE, when there is one)."""
        return sorted({layer for _, layer in self._saes})

    @property
    def sites(self) -> list[Site]:
        """Sites that have at least one SAE, in the order res, mlp, att."""
        present = {site for site, _ in self._saes}
        return [s for s in SITES if s in present]

    def d_sae(self, site: Site, layer: int) -> int:
        """Number of features of the SAE at ``(site, layer)``."""
        return self._cfg((site, layer)).d_sae

    def check_ref(self, ref: FeatureRef | str) -> FeatureRef:
        """Parse ``ref`` and check that the bank has its SAE and feature index."""
        ref = FeatureRef.parse(ref)
        d_sae = self._cfg(ref.key).d_sae
        if ref.index >= d_sae:
            raise UnknownFeatureError(f"feature {ref} does not exist: the SAE at {ref.key} has d_sae {d_sae}")
        return ref

    def select(self, sites: Iterable[Site] | None = None, layers: Iterable[int] | None = None) -> SAEBank:
        """A bank of the same SAE objects restricted to some sites and/or layers."""
        site_set = set(self.sites if sites is None else [check_site(s) for s in sites])
        layer_set = set(self.layers if layers is None else [check_layer(layer, "res") for layer in layers])
        keys = [k for k in self._saes if k[0] in site_set and k[1] in layer_set]
        if not keys:
            raise UnknownFeatureError(
                f"no SAE at sites {sorted(site_set)} and layers {sorted(layer_set)}: the bank has {self.describe()}"
            )
        chosen = SAEBank(self._lazy.restricted(keys) if self._lazy is not None else {k: self._saes[k] for k in keys},
                         metadata=self.metadata)
        return chosen.bind(self._model) if self._model is not None else chosen

    # -- decoders ------------------------------------------------------------------------------
    def decoder(
        self,
        site: Site,
        layer: int,
        *,
        unit: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Float[Tensor, "d_sae d_model"]:
        """Decoder directions of ``(site, layer)``: rows of ``W_dec``, unit-norm by default.

        For a z-SAE, the rows mapped into ``d_model`` (``W_dec @ W_O``, :meth:`model_decoder`).

        Unit rows are computed in float32 (whatever the SAE's dtype), cached, and
        recomputed if ``W_dec`` is modified in place. The result is detached; it is
        returned in the SAE's dtype and device unless ``dtype``/``device`` say otherwise.
        """
        sae = self[(site, layer)]
        if not unit:
            W = self.model_decoder(site, layer)[0]
        else:
            stamp = self._stamp((site, layer))
            cached = self._decoders.get((site, layer))
            if cached is None or cached[0] != stamp:
                cached = (stamp, unit_rows(self.model_decoder(site, layer)[0]).to(sae.W_dec.dtype))
                self._decoders[(site, layer)] = cached
                self._forget_released()
            W = cached[1]
        return W.to(device=device or W.device, dtype=dtype or W.dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SAEBank:
        """Move every SAE in place (like ``nn.Module.to``) and return the bank (a lazy bank: those in memory,
        and every later load)."""
        if self._lazy is not None:
            self._lazy.move(device, dtype)
        else:
            for sae in self._saes.values():
                sae.to(device=device, dtype=dtype)
        self._decoders.clear()
        self._mapped.clear()
        return self

    def fingerprint(self) -> str:
        """A short hash of the bank's keys, shapes and a strided sample of every decoder.

        Results computed from a bank (a flow map, cached contexts, a demo's validation)
        record it, so a cache made with other SAEs is never reused.
        """
        digest = hashlib.sha256()
        for key in self._saes:
            digest.update(self._lazy.digest(key) if self._lazy is not None else _sae_digest(key, self._saes[key]))
            if key in self._z_keys and self._model is not None:   # the mapped directions depend on the model's W_O
                W_O = sites.z_write_map(self._model, key[1])[0]
                digest.update(f"W_O{float(W_O.double().sum()):.12e}".encode())
        return digest.hexdigest()[:16]

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save the bank to folder ``path``, atomically; returns the path.

        Each SAE is written by SAELens's own ``save_model`` into ``path/<site>_<layer>/``;
        ``bank.json`` (schema version, keys, metadata and a SHA-256 of every file) is
        written last. The folder is built under a temporary name and swapped in, so a
        crash never leaves a half-written bank that loads. An existing saved bank at
        ``path`` is replaced; any other existing file or non-empty folder is refused.
        """
        path = Path(path)
        for key, sae in self._saes.items():     # a NaN written in place would save, then fail every load
            bad = [name for name, t in sae.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:
                raise BankError(f"the SAE for {key} ({sae.cfg.metadata.hook_name}) has NaN or inf entries in {bad}: "
                                "refusing to save it")
        if path.exists() and not (path / INDEX_FILE).is_file():
            if path.is_file() or any(path.iterdir()):
                raise BankError(f"refusing to overwrite {path}: it exists and is not a saved SAEBank")
        with atomic_directory(path) as tmp:
            entries = []
            for key, sae in self._saes.items():
                sae.save_model(tmp / _folder_name(key))
                entries.append(
                    {"site": key[0], "layer": key[1], "folder": _folder_name(key),
                     "architecture": sae.cfg.architecture(), "d_sae": sae.cfg.d_sae}
                )
            index = {
                **header("SAEBank", BANK_SCHEMA_VERSION),
                "d_model": self.d_model if len(self._z_keys) < len(self) or self._model is not None else None,
                "saes": entries,
                "metadata": self.metadata,
            }
            try:
                json.dumps(index)
            except TypeError as exc:
                raise BankError(f"bank metadata must be JSON-serialisable: {exc}") from None
            write_manifest(tmp, INDEX_FILE, index)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        verify: bool = True,
        lazy: bool = False,
        keep: int = DEFAULT_KEEP,
    ) -> SAEBank:
        """Load a bank saved by :meth:`save`, bit-exact.

        Checks the schema version and (``verify=True``) every file's SHA-256 first:
        a partial or corrupt bank raises :class:`~tl_featureflow.errors.CacheError`.

        ``lazy=True`` opens a bank too big for memory (:mod:`tl_featureflow.saes.lazy`): its SAEs are read
        when a computation needs them, at most ``keep`` at a time, so a flow map or a validation holds
        about one layer's SAEs. Opening reads every SAE once, in turn, to check it and learn its config.
        """
        device = check_device(device)       # "cuda" without a GPU read as a corrupt bank
        path = Path(path)
        recover_directory(path)              # a save killed between its two renames left the old bank aside
        if not path.is_dir():
            raise CacheError(f"no saved SAEBank at {path}: expected a folder written by SAEBank.save")
        index = read_manifest(path, INDEX_FILE, verify=verify)
        check_header(index, "SAEBank", BANK_SCHEMA_VERSION, path / INDEX_FILE)
        dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else None
        if not isinstance(index.get("metadata", {}), dict):
            raise CacheError(f"{path / INDEX_FILE}: its metadata is a {type(index['metadata']).__name__}, expected a mapping")
        entries: dict[Key, dict[str, Any]] = {}
        for entry in index["saes"]:
            key = (entry["site"], entry["layer"])
            if key in entries:
                raise CacheError(f"{path / INDEX_FILE} lists the SAE for {key} twice")
            entries[key] = entry

        def load_one(key: Key, folder: Path, device: torch.device | str, dtype_name: str | None) -> SAE:
            try:
                sae = SAE.load_from_disk(folder, device=str(device), dtype=dtype_name)
            except Exception as exc:  # SAELens raises many types on a bad folder
                raise CacheError(f"could not load the SAE for {key} from {folder}: {exc}") from exc
            found = {"architecture": sae.cfg.architecture(), "d_sae": sae.cfg.d_sae}
            wrong = {name: value for name, value in found.items() if entries[key].get(name, value) != value}
            if wrong:
                raise CacheError(f"{path / INDEX_FILE} says the SAE for {key} has "
                                 f"{ {name: entries[key][name] for name in wrong} }, its folder holds {wrong}")
            return _check_sae(key, sae) if lazy else sae      # an eager bank checks them all when it is built

        folders = {key: path / entries[key]["folder"] for key in entries}
        if lazy:
            order = sorted((_check_key(key) for key in folders), key=lambda k: (k[1], SITES.index(k[0])))
            folders = {key: folders[key] for key in order}
            saes: Mapping[Key, SAE] = LazySAEs.open(folders, keep=keep, device=device, dtype=dtype_name,
                                                    load=load_one, digest=_sae_digest)
        else:
            saes = {key: load_one(key, folder, device, dtype_name) for key, folder in folders.items()}
        bank = cls(saes, metadata=index.get("metadata"))
        if index.get("d_model") is not None and len(bank.z_keys) < len(bank) and index["d_model"] != bank.d_model:
            raise CacheError(f"{path / INDEX_FILE} says d_model={index['d_model']}, its SAEs read d_in={bank.d_model}")
        return bank

    @classmethod
    def from_pretrained(
        cls,
        releases: Mapping[Site, str] | str,
        sae_id: str | Mapping[Site, str] | Sequence[str],
        layers: Iterable[int] | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: str = "float32",
        progress: bool = True,
    ) -> SAEBank:
        """Build a bank from SAELens pretrained releases (needs the Hugging Face hub).

        Two forms:

        - ``releases`` one per site and ``sae_id`` a template formatted with ``layer=`` (or one
          template per site), for ``layers``;
        - ``releases`` one release and ``sae_id`` a list of its SAE ids: each SAE's key comes from
          the hook its config names (``blocks.{L+1}.hook_resid_pre`` is ``("res", L)``,
          ``blocks.0.hook_resid_pre``, the embedding SAE, ``("res", -1)``, ``blocks.L.attn.hook_z`` is
          ``("att", L)``), so GPT-2's ``res-jb`` loads as it is, its layer-0 SAE included.

        Every SAE's config is read first (SAELens's ``load_sae_config_from_huggingface``: no weights)
        and its hooks checked, so a release this bank cannot hold (cross-layer transcoders, another
        site) is refused before any weights download. Single-layer transcoders (Gemma Scope's,
        ``blocks.L.ln2.hook_normalized`` to ``blocks.L.hook_mlp_out``) serve the mlp site; with a
        list of ids they are keyed ``("mlp", L)`` by their output hook.

        Example:
            >>> bank = SAEBank.from_pretrained(                      # doctest: +SKIP
            ...     {"res": "gemma-scope-2b-pt-res-canonical", "att": "gemma-scope-2b-pt-att-canonical"},
            ...     "layer_{layer}/width_16k/canonical", layers=range(26))
            >>> bank = SAEBank.from_pretrained(                      # doctest: +SKIP
            ...     "gpt2-small-res-jb", [f"blocks.{layer}.hook_resid_pre" for layer in range(1, 12)])

        Gemma Scope's attention SAEs read ``attn.hook_z``: they serve the att site through the
        model's ``W_O`` (:mod:`tl_featureflow.saes.sites`; the bank needs :meth:`bind`).

        The bank is marked (``metadata["preflight"] = "on_load"``; ``metadata["sae_ids"]`` names each
        key's release and id): when it first meets a model (``model.attach``, ``FlowTracer(bank, model)``,
        ``validate``) a short preflight checks that each SAE reconstructs its site there, and warns
        (:func:`tl_featureflow.saes.preflight.preflight_on_load`; off with ``preflight=False`` or
        ``TL_FEATUREFLOW_PREFLIGHT=0``).
        """
        from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface
        from tqdm.auto import tqdm

        jobs: list[tuple[str, str, Key | None]] = []          # (release, sae id, key or None: from the hook)
        if isinstance(releases, str):
            if isinstance(sae_id, str) or isinstance(sae_id, Mapping) or layers is not None:
                raise BankError("from_pretrained(release, sae_ids): give one release and a list of its SAE ids "
                                f"(keys come from their hooks), got sae_id={sae_id!r}, layers={layers!r}")
            jobs = [(releases, str(this_id), None) for this_id in sae_id]
        else:
            layer_list = [check_layer(layer) for layer in (layers if layers is not None else [])]
            if not layer_list or not releases:
                raise BankError(f"from_pretrained needs at least one release and one layer, got {dict(releases)} "
                                f"and {layer_list}")
            for site in releases:
                template = sae_id[site] if isinstance(sae_id, Mapping) else sae_id
                if not isinstance(template, str):
                    raise BankError(f"sae_id for {site!r} must be a template such as 'layer_{{layer}}/width_16k/"
                                    f"canonical', got {template!r}")
                jobs += [(releases[site], template.format(layer=layer), (check_site(site), layer))
                         for layer in layer_list]
        if not jobs:
            raise BankError("from_pretrained: no SAE ids given")
        keys: list[Key] = []
        for release, this_id, key in jobs:       # configs only: refuse before any weights
            _refuse_cross_layer_release(release, this_id, f"release={release!r} sae_id={this_id!r}")
            try:
                cfg = load_sae_config_from_huggingface(release, this_id, device=str(device))
            except Exception as exc:
                raise BankError(f"could not read the config of SAE release={release!r} sae_id={this_id!r}: {exc}"
                                ) from exc
            keys.append(_key_of_config(cfg, key, f"release={release!r} sae_id={this_id!r}"))
            if keys[-1] in keys[:-1]:
                raise BankError(f"two SAEs of the request are both {keys[-1]}: {jobs[keys.index(keys[-1])][:2]} "
                                f"and {(release, this_id)}")
        saes: dict[Key, SAE] = {}
        for (release, this_id, _), key in tqdm(list(zip(jobs, keys, strict=True)), desc="loading SAEs",
                                               disable=not progress):
            try:
                saes[key] = SAE.from_pretrained(release, this_id, device=str(device), dtype=dtype)
            except Exception as exc:
                raise BankError(f"could not load SAE release={release!r} sae_id={this_id!r} for {key}: {exc}") from exc
        return cls(saes, metadata={"source": PRETRAINED_SOURCE,
                                   "releases": releases if isinstance(releases, str) else dict(releases),
                                   "sae_id": sae_id if isinstance(sae_id, str) else
                                   (dict(sae_id) if isinstance(sae_id, Mapping) else list(sae_id)),
                                   "sae_ids": {f"{key[1]}/{key[0]}": [release, this_id]
                                               for (release, this_id, _), key in zip(jobs, keys, strict=True)},
                                   "preflight": "on_load"})


def _key_of_config(cfg: Mapping[str, Any], key: Key | None, what: str) -> Key:
    """The bank key of an SAE from its SAELens config dict (checked against ``key`` when one is asked for)."""
    meta = cfg.get("metadata") or {}
    name = cfg.get("hook_name") or meta.get("hook_name")
    out = cfg.get("hook_name_out") or meta.get("hook_name_out")
    if out is not None and out != name:                  # a transcoder: one layer's MLP input to its hook_mlp_out
        sites.check_transcoder_config(name, out, what, d_in=cfg.get("d_in"), d_out=cfg.get("d_out"),
                                      hooks_out=cfg.get("hook_names_out") or meta.get("hook_names_out"))
    found = sites.key_of_sae_hook(name, out)
    if key is None:
        if found is None:
            raise BankError(f"SAE {what} reads hook {name!r}: its (site, layer) cannot be told from it; expected "
                            "blocks.L.hook_resid_post / hook_resid_pre / hook_mlp_out / hook_attn_out / attn.hook_z")
        return found
    if name is not None and found != key:
        writes = f" and writes {out!r}" if out is not None and out != name else ""
        raise BankError(f"SAE {what} reads hook {name!r}{writes}, which is {found or 'no site of a bank'}, not the "
                        f"{key} it was asked for")
    return key


_CLT_RE = re.compile(r"(^|[^a-z])clt([^a-z]|$)")
#: SAELens loaders that turn a cross-layer transcoder into a single-layer one by summing its decoders over the
#: layers they write: fine for reading activations, wrong for editing them (an SAEBank refuses them).
_CLT_LOADERS = ("mntss_clt_layer_transcoder",)


def _refuse_cross_layer_release(release: str, sae_id: str, what: str) -> None:
    """Refuse SAELens releases of cross-layer transcoders (from SAELens's offline directory, before any download):
    SAELens loads them as single-layer transcoders whose decoder is the sum of the layers they write, which
    their configs do not say."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    info = get_pretrained_saes_directory().get(release)
    if info is None:
        return
    folder = str(info.saes_map.get(sae_id, ""))
    if info.conversion_func in _CLT_LOADERS or _CLT_RE.search(folder.lower()) or _CLT_RE.search(release.lower()):
        raise TranscoderError(
            f"SAE {what} is a cross-layer transcoder (SAELens loads it as one layer by summing the decoders of "
            "every layer it writes): an SAEBank serves single-layer transcoders only, one layer's MLP input to "
            "the same layer's hook_mlp_out")
