"""The one error family of tl_featureflow.

Every bad input a user can give (an SAE that does not fit the model, an unknown
feature or layer, NaN weights, a corrupt cache file...) raises a subclass of
:class:`FeatureFlowError`, whose message names the offending value and what was
expected. Catch ``FeatureFlowError`` to catch them all.
"""

from __future__ import annotations

__all__ = [
    "FeatureFlowError",
    "InvalidArgumentError",
    "BankError",
    "TranscoderError",
    "ModelMismatchError",
    "UnknownFeatureError",
    "CacheError",
    "MissingDependencyError",
    "DistributedError",
    "StateError",
]


class FeatureFlowError(Exception):
    """Base class of every error raised on purpose by tl_featureflow."""


class InvalidArgumentError(FeatureFlowError, ValueError):
    """An argument out of its allowed range or set (a bad ``k``, method, schedule, token id...).

    Also a ``ValueError``, so ``except ValueError`` in user code keeps working.
    """


class BankError(FeatureFlowError, ValueError):
    """An SAE bank is invalid: bad keys, mixed widths, NaN weights, wrong hooks."""


class TranscoderError(BankError):
    """A transcoder an SAEBank cannot serve: cross-layer, or hooks other than one layer's MLP input and
    ``hook_mlp_out``."""


class ModelMismatchError(FeatureFlowError, ValueError):
    """An SAE bank does not fit a model (d_model, layer count, hook names)."""


class UnknownFeatureError(FeatureFlowError, KeyError):
    """A feature, site or layer that the bank or model does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CacheError(FeatureFlowError, OSError):
    """A cached or saved file is missing, partial or corrupt."""


class MissingDependencyError(FeatureFlowError, ImportError):
    """An optional package is needed; the message says what to install and how."""


class DistributedError(FeatureFlowError, RuntimeError):
    """A distributed run cannot go on: a rank failed (the message names it, what it said and the text where
    known), did not answer within the timeout, or the process is not under torchrun."""


class StateError(FeatureFlowError, RuntimeError):
    """A call made before the object is ready for it, or while it is busy: a judge not calibrated, a Steerer
    already active or entered in another thread, a bank already attached. The message says what to call first."""
