"""SAEs: the bank of one SAELens SAE per (site, layer), its training, corpus and quality.

``bank`` (SAEBank) · ``features`` (unit decoder rows, the rescale edit) · ``training``
(train_bank) · ``corpus`` (offline training text) · ``quality`` (explained variance, L0, loss).
"""

from tl_featureflow._lazy import submodule_getattr

__getattr__, __dir__ = submodule_getattr(__name__)
