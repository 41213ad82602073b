"""The SAEs of a saved bank, read from disk when a computation needs them and released after.

A bank of Gemma Scope 2's 262k-wide SAEs is hundreds of GB; no host holds it at once, and a flow
map or a validation needs only a layer's SAEs at a time (res L, res L-1, mlp L, att L). A lazy bank
(``SAEBank.load(path, lazy=True)``) keeps at most ``keep`` SAEs in memory, least recently used
first out, and what it needs about every SAE without its weights (config, whether it reads
``hook_z`` or is a transcoder, its part of the bank's fingerprint) from one streaming pass when it
is opened. Every SAE is checked as an eager bank checks it, at that pass and at every later load.

A lazy bank's SAEs are read-only: an SAE edited in place is dropped with its edit when it leaves
memory and read again from disk (edit an eager bank, ``SAEBank.load(path)``, instead). Work that
splices SAEs into the model (validation, ``run_with_features``) needs ``keep`` at least the SAEs it
splices at once (a layer's four: the default); ``model.attach`` of a whole lazy bank holds every SAE.

>>> import tempfile
>>> from tl_featureflow.saes.bank import SAEBank
>>> from tl_featureflow.synthetic import planted_chain_bank
>>> path = planted_chain_bank()[0].save(tempfile.mkdtemp() + "/bank")
>>> lazy = SAEBank.load(path, lazy=True, keep=2)
>>> lazy.decoder("res", 3).shape, lazy.fingerprint() == SAEBank.load(path).fingerprint()
(torch.Size([12, 64]), True)
>>> lazy.saes.resident <= 2
True
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tl_featureflow.errors import CacheError, InvalidArgumentError, UnknownFeatureError
from tl_featureflow.refs import Key
from tl_featureflow.saes import sites

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = ["LazySAEs", "DEFAULT_KEEP"]

#: SAEs kept in memory by default: one layer's res, its predecessor res, mlp and att.
DEFAULT_KEEP = 4


@dataclass
class _Info:
    """What the bank needs about one SAE without its weights."""

    cfg: Any
    z: bool
    transcoder: bool
    digest: bytes


@dataclass
class _Shared:
    """The cache shared by a lazy bank and the banks made from it (``select``, ``bind``)."""

    keep: int
    device: torch.device | str
    dtype: str | None
    resident: OrderedDict[Key, SAE] = field(default_factory=OrderedDict)
    loads: int = 0
    peak: int = 0


class LazySAEs(Mapping[Key, "SAE"]):
    """``(site, layer) -> SAE`` read from the folders of a saved bank on access, at most ``keep`` in memory.

    Built by :meth:`SAEBank.load(path, lazy=True) <tl_featureflow.saes.bank.SAEBank.load>`; ``loads``
    counts reads from disk, ``resident`` the SAEs in memory now and ``peak`` the most at once.
    """

    def __init__(self, folders: Mapping[Key, Path], info: Mapping[Key, _Info], shared: _Shared,
                 load: Callable[[Key, Path, torch.device | str, str | None], SAE]):
        self._folders = dict(folders)
        self._info = dict(info)
        self._shared = shared
        self._load = load

    @classmethod
    def open(cls, folders: Mapping[Key, Path], *, keep: int, device: torch.device | str, dtype: str | None,
             load: Callable[[Key, Path, torch.device | str, str | None], SAE],
             digest: Callable[[Key, SAE], bytes]) -> LazySAEs:
        """Read every SAE once, in turn (one in memory at a time), to learn its config and fingerprint part."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise InvalidArgumentError(f"keep={keep!r}: expected the number of SAEs a lazy bank holds in memory, >= 1")
        info = {}
        for key, folder in folders.items():
            sae = load(key, folder, device, dtype)
            info[key] = _Info(sae.cfg, sites.is_z(sae), sites.is_transcoder(sae), digest(key, sae))
            del sae
        return cls(folders, info, _Shared(keep, device, dtype), load)

    # -- mapping ---------------------------------------------------------------------------------
    def __getitem__(self, key: Key) -> SAE:
        if key not in self._folders:
            raise KeyError(key)
        shared = self._shared
        sae = shared.resident.get(key)
        if sae is None:
            sae = self._load(key, self._folders[key], shared.device, shared.dtype)
            if sae.cfg.d_sae != self._info[key].cfg.d_sae:
                raise CacheError(f"the SAE for {key} at {self._folders[key]} changed on disk since the bank was "
                                 f"opened (d_sae {self._info[key].cfg.d_sae} -> {sae.cfg.d_sae})")
            shared.resident[key] = sae
            shared.loads += 1
            while len(shared.resident) > shared.keep:
                shared.resident.popitem(last=False)
            shared.peak = max(shared.peak, len(shared.resident))
        shared.resident.move_to_end(key)
        return sae

    def __iter__(self) -> Iterator[Key]:
        return iter(self._folders)

    def __len__(self) -> int:
        return len(self._folders)

    def __contains__(self, key: object) -> bool:
        return key in self._folders

    def __repr__(self) -> str:
        return f"LazySAEs({len(self)} SAEs, {self.resident} in memory of at most {self.keep}, {self.loads} loads)"

    # -- what is known without loading -------------------------------------------------------------
    def cfg(self, key: Key) -> Any:
        """The SAE's config (read when the bank was opened)."""
        try:
            return self._info[key].cfg
        except KeyError:
            raise UnknownFeatureError(f"no SAE for {key!r} in this lazy bank") from None

    def is_z(self, key: Key) -> bool:
        return self._info[key].z

    def is_transcoder(self, key: Key) -> bool:
        return self._info[key].transcoder

    def digest(self, key: Key) -> bytes:
        """The SAE's part of the bank's fingerprint, from its weights on disk."""
        return self._info[key].digest

    def is_resident(self, key: Key) -> bool:
        return key in self._shared.resident

    @property
    def keep(self) -> int:
        return self._shared.keep

    @property
    def resident(self) -> int:
        return len(self._shared.resident)

    @property
    def loads(self) -> int:
        return self._shared.loads

    @property
    def peak(self) -> int:
        return self._shared.peak

    # -- banks made from this one --------------------------------------------------------------------
    def restricted(self, keys: Iterable[Key]) -> LazySAEs:
        """The same SAEs (one cache, one memory budget) for some of the keys."""
        chosen = [key for key in keys if key in self._folders]
        return LazySAEs({k: self._folders[k] for k in chosen}, {k: self._info[k] for k in chosen}, self._shared,
                        self._load)

    def move(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """Later loads go to ``device``/``dtype``; the SAEs in memory move now."""
        shared = self._shared
        if device is not None:
            shared.device = device
        if dtype is not None:
            shared.dtype = str(dtype).removeprefix("torch.")
        for sae in shared.resident.values():
            sae.to(device=device, dtype=dtype)
